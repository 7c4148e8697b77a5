//! Sources of resources. Each produces definitions for the same [`crate::index::Index`].
//!
//! - [`local`]: a directory of YAML files, watched for changes (local mode).
//! - [`kubernetes`]: watchers over the Kubernetes API.

pub mod kubernetes;
pub mod local;
