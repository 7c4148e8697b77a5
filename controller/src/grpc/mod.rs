//! gRPC servers: [`discovery`] (the per-sidecar config stream), served through [`wire`]
//! (snapshots encoded once per state, not once per sidecar).

pub mod discovery;
pub mod wire;
