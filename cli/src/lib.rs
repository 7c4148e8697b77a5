//! `weir`: the user's command.
//!
//! # Layout
//! - [`demo`]: `weir demo`, the whole mesh on loopback with a weight-shifting load test.
//! - [`backend`]: `weir demo-backend`, a test application that fails or slows down on command.
//! - [`procs`]: child processes started by the demo and the end-to-end tests.
#![forbid(unsafe_code)]

pub mod backend;
pub mod demo;
pub mod procs;
