//! `weir`: the user's command.
//!
//! # Layout
//! - [`demo`]: `weir demo`, the whole mesh on loopback running a canary rollout under load.
//! - [`canary`]: `weir canary status|promote|abort|pause|resume`.
//! - [`inspect`]: `weir proxy-status` and `weir stat`.
//! - [`check`]: `weir check`.
//! - [`backend`]: `weir demo-backend`, a test application that fails or slows down on command.
//! - [`admin`]: how commands reach the controllers' and sidecars' admin endpoints (directly,
//!   or through the Kubernetes API server).
//! - [`procs`]: child processes started by the demo and the end-to-end tests.
#![forbid(unsafe_code)]

pub mod admin;
pub mod analyze;
pub mod backend;
pub mod canary;
pub mod check;
pub mod demo;
pub mod inject;
pub mod inspect;
pub mod procs;
pub mod proxy_config;
pub mod tap;
