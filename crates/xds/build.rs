//! Compiles Istio's CA proto with protox (pure Rust, no protoc) and generates its tonic client and server.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/ca.proto");
    let fds = protox::compile(["proto/ca.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_well_known_types(true)
        // Struct comes from the Envoy types this crate already re-exports, not a second copy.
        .extern_path(".google.protobuf", "::envoy_types::pb::google::protobuf")
        .compile_fds(fds)?;
    Ok(())
}
