//! Generates the `EncryptedObject` message kube-apiserver stores in etcd (`proto/k8s/apiserver/kmsv2`)
//! with protox: pure Rust, no system `protoc`. Messages only; the plugin's gRPC client comes from the
//! `kleidi` crate.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "../proto";
    let file = "k8s/apiserver/kmsv2/encrypted_object.proto";
    let fds = protox::compile([file], [root])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(false)
        // Sorted annotations: deterministic bytes, and the same order the apiserver's cache key uses.
        .btree_map(".")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed={root}/{file}");
    Ok(())
}
