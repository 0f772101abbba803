//! bst-artifact-server: an artifact and source cache for BuildStream and any Remote
//! Execution API client. The binary is a thin wrapper around [`cli`] and [`server`].

// Raw system calls live in `sys`, behind safe functions; nowhere else may use `unsafe`.
#![deny(unsafe_code)]

pub mod accept;
pub mod admin;
pub mod certs;
pub mod cli;
pub mod client_limit;
pub mod error_text;
pub mod healthcheck;
pub mod logging;
pub mod server;
pub mod service;
pub mod storage;
#[allow(unsafe_code)]
pub mod sys;
pub mod systemd;
pub mod tls;
pub mod units;
