//! gRPC servers: [`discovery`] (the per-sidecar config stream).

pub mod discovery;
