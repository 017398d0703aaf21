//! mixed-docker-executor: a daemon that runs untrusted code submissions in a sandbox.
//!
//! See `ARCHITECTURE.md` for the map. In short: `api` parses and maps, `execution` runs
//! (and knows no HTTP), `runtimes` says what to run, `metrics` observes, `app` wires them,
//! `server` accepts and guards connections.

pub mod api;
pub mod app;
pub mod config;
pub mod error_code;
pub mod execution;
pub mod file_names;
pub mod limits;
pub mod metrics;
pub mod runtimes;
pub mod server;
