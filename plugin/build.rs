//! Generates the KMS v2 and v1beta1 gRPC code (server and client) from `proto/` with protox:
//! pure Rust, so no system `protoc` is needed to build the plugin.

/// The messages whose payload is a plaintext seed (v2 `plaintext`, v1beta1 `plain`).
const PLAINTEXT_MESSAGES: [&str; 4] = [
    ".v2.EncryptRequest",
    ".v2.DecryptResponse",
    ".v1beta1.EncryptRequest",
    ".v1beta1.DecryptResponse",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "../proto";
    let files = [
        "k8s/kms/v2/api.proto",
        "k8s/kms/v1beta1/api.proto",
        "kleidi/v1beta1/envelope.proto",
    ];
    let fds = protox::compile(files, [root])?;
    tonic_prost_build::configure()
        // prost's derived Debug prints a bytes field in full; these four carry the seed in clear, so
        // their Debug is written by hand in src/lib.rs and prints only the length.
        .skip_debug(PLAINTEXT_MESSAGES)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed={root}");
    Ok(())
}
