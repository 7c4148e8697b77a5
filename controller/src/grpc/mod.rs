//! gRPC servers: [`discovery`] (the per-sidecar config stream), served through [`wire`]
//! (snapshots encoded once per state, not once per sidecar), over [`tls`] when the controller
//! serves identities.

pub mod discovery;
pub mod tls;
pub mod wire;
