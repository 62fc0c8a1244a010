//! Compiles the .proto files with protox (pure Rust; no protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/spiffe/workload.proto",
        "proto/spiffe/broker.proto",
        "proto/sigil/common.proto",
        "proto/sigil/agent.proto",
        "proto/sigil/admin.proto",
        "proto/sigil/task.proto",
        "proto/sigil/delegation.proto",
        "proto/envoy/service/secret/v3/sds.proto",
        "proto/envoy/extensions/transport_sockets/tls/v3/tls.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // The agent serves the same certificate chain, key and bundle to
        // every FetchX509SVID call: as `bytes::Bytes` they are shared by
        // reference count instead of copied per message. Only these two
        // Workload API messages (the file has no package) change type.
        .bytes(".X509SVID")
        .bytes(".X509SVIDResponse")
        // A mint batch's CSRs are read in place from the request buffer
        // (one shared buffer per call) instead of copied into a vector
        // each: 500 allocations and copies fewer per batch.
        .bytes(".sigil.agent.CsrForEntry.csr")
        // Entry claims in key order: the same entry always encodes alike.
        .btree_map(".sigil.common.Entry.jwt_claims")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    // The standard's WIT-SVID profile on its own: it names the same
    // package-less service as workload.proto, so it is compiled apart, into
    // its own directory, and only as a client.
    let wit = "proto/spiffe/workloadapiwitsvid.proto";
    println!("cargo:rerun-if-changed={wit}");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("wit");
    std::fs::create_dir_all(&out)?;
    tonic_prost_build::configure()
        .out_dir(&out)
        .build_client(true)
        .build_server(false)
        .compile_fds(protox::compile([wit], ["proto"])?)?;
    Ok(())
}
