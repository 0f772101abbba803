//! bst-artifact-server: an artifact and source cache for BuildStream and any Remote
//! Execution API client. The binary is a thin wrapper around [`cli`] and [`server`].
//!
//! Every module is private: the binary gets the few entry points below and nothing else,
//! so the compiler reports whatever the crate itself no longer uses.

// Raw system calls live in `sys`, behind safe functions; nowhere else may use `unsafe`.
#![deny(unsafe_code)]

mod accept;
mod admin;
mod certs;
mod cli;
mod client_limit;
mod error_text;
mod healthcheck;
mod logging;
mod server;
mod service;
mod storage;
#[allow(unsafe_code)]
mod sys;
mod systemd;
mod tls;
mod units;

pub use admin::{gc, stats, verify};
pub use certs::{add_client, gen_client_cert, gen_server_cert, list_clients, remove_client};
pub use cli::{normalize_args, Cli, Command};
pub use error_text::one_line;
pub use healthcheck::check as healthcheck;
pub use logging::init as init_logging;
pub use server::run as serve;
pub use units::run as install_units;
