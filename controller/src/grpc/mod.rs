//! gRPC servers: [`discovery`] (the per-sidecar config stream), served through [`stream`]
//! (snapshots encoded once per state by [`crate::wire`], not once per sidecar), and [`certify`] (workload
//! certificates from the mesh CA), over [`tls`] when the controller serves identities.

pub mod certify;
pub mod discovery;
pub mod stream;
pub mod tls;
