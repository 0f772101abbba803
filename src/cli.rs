//! Command-line interface. `bst-artifact-server --port P [...] REPO` (no subcommand), the
//! historical form from BuildStream's documentation and systemd units, means `serve`.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::ffi::OsString;
use std::net::IpAddr;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "bst-artifact-server",
    version,
    about = "Artifact and source cache server for BuildStream and Remote Execution API clients",
    after_help = "Without a subcommand, the arguments are those of `serve` (the historical form)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the cache (REAPI CAS, ByteStream, Capabilities, Remote Asset) from REPO.
    Serve(ServeArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// TCP port to listen on; 0 lets the system pick one (see --port-file).
    #[arg(short = 'p', long)]
    pub port: u16,

    /// Address to listen on [default: all interfaces, IPv6 and IPv4].
    #[arg(long, value_name = "ADDR")]
    pub bind: Option<IpAddr>,

    /// Accept uploads (CAS writes and Remote Asset pushes). Without it the server is read-only.
    #[arg(long)]
    pub enable_push: bool,

    /// Serve only the asset index (Capabilities and Remote Asset), no CAS or ByteStream.
    #[arg(long)]
    pub index_only: bool,

    /// Log verbosity.
    #[arg(long, value_enum, default_value_t = LogLevel::Warning)]
    pub log_level: LogLevel,

    /// Once listening, write the bound port number to this file (atomically).
    #[arg(long, value_name = "FILE")]
    pub port_file: Option<PathBuf>,

    /// Also answer to this REAPI instance name (repeatable). The empty name is always
    /// accepted; every name shares the one store.
    #[arg(long = "instance-name", value_name = "NAME")]
    pub instance_names: Vec<String>,

    /// Repository directory (created if missing). Uses buildbox-casd's layout, so a
    /// repository of the historical server is served in place.
    pub repo: PathBuf,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Warning,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_filter(self) -> &'static str {
        match self {
            LogLevel::Warning => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// Inserts `serve` when the first argument is not a subcommand, so the historical
/// subcommand-less form keeps working.
pub fn normalize_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut args: Vec<OsString> = args.into_iter().collect();
    let Some(first) = args.get(1).and_then(|a| a.to_str()) else {
        return args;
    };
    let is_subcommand = <Cli as clap::CommandFactory>::command()
        .get_subcommands()
        .any(|c| c.get_name() == first);
    let is_top_level_flag = matches!(first, "-h" | "--help" | "-V" | "--version" | "help");
    if !is_subcommand && !is_top_level_flag {
        args.insert(1, "serve".into());
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(normalize_args(args.iter().map(OsString::from))).unwrap()
    }

    #[test]
    fn historical_form_means_serve() {
        let Command::Serve(a) = parse(&["x", "--port", "11001", "--enable-push", "/r"]).command;
        assert_eq!(a.port, 11001);
        assert!(a.enable_push);
        assert_eq!(a.repo, PathBuf::from("/r"));
        let Command::Serve(a) = parse(&["x", "/r", "-p", "0"]).command;
        assert_eq!(a.port, 0);
    }

    #[test]
    fn serve_subcommand() {
        let Command::Serve(a) =
            parse(&["x", "serve", "-p", "1", "--log-level", "info", "/r"]).command;
        assert_eq!(a.log_level, LogLevel::Info);
        assert!(!a.enable_push);
    }

    #[test]
    fn port_is_required() {
        assert!(Cli::try_parse_from(normalize_args(["x", "/r"].map(OsString::from))).is_err());
    }
}
