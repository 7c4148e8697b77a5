//! gRPC servers: [`discovery`] (the per-sidecar config stream), served through [`wire`]
//! (snapshots encoded once per state, not once per sidecar), and [`certify`] (workload
//! certificates from the mesh CA), over [`tls`] when the controller serves identities.

pub mod certify;
pub mod discovery;
pub mod tls;
pub mod wire;
