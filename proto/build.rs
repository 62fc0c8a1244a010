//! Compiles the .proto files with protox (pure Rust; no protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/spiffe/workload.proto",
        "proto/sigil/common.proto",
        "proto/sigil/agent.proto",
        "proto/sigil/admin.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
