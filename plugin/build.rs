//! Generates the KMS v2 and v1beta1 gRPC code (server and client) from `proto/` with protox:
//! pure Rust, so no system `protoc` is needed to build the plugin.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "../proto";
    let files = [
        "k8s/kms/v2/api.proto",
        "k8s/kms/v1beta1/api.proto",
        "kleidi/v1beta1/envelope.proto",
    ];
    let fds = protox::compile(files, [root])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    println!("cargo:rerun-if-changed={root}");
    Ok(())
}
