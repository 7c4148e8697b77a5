//! Sources of resources. Each produces definitions for the same [`crate::index::Index`].
//!
//! - [`local`]: a directory of YAML files, watched for changes (local mode).

pub mod local;
