//! Compiles `proto/weir/v1/*.proto` and the vendored OTLP trace protocol
//! (`proto/opentelemetry/`) with the pure-Rust `protox` compiler (no protoc download) and hands
//! the descriptors to tonic's code generator.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/weir/v1/discovery.proto",
        "proto/weir/v1/identity.proto",
        "proto/opentelemetry/proto/collector/trace/v1/trace_service.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    // OTLP's comments hold JSON examples indented like code, which rustdoc would run as
    // doctests: its messages go without them (the vendored .proto files keep them).
    let mut config = tonic_prost_build::Config::new();
    config.disable_comments([".opentelemetry"]);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .type_attribute(".weir.v1", "#[derive(serde::Serialize)]")
        // Map fields encode in key order: the same Service always gives the same bytes, which
        // incremental snapshots compare to find what changed.
        .btree_map(".")
        .compile_fds_with_config(fds, config)?;
    Ok(())
}
