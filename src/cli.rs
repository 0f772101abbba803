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
    /// Evict blobs beyond a quota and remove dangling asset entries (safe beside a live server).
    Gc(crate::admin::GcArgs),
    /// Re-hash every blob, quarantine corrupt ones and report dangling asset entries.
    Verify(crate::admin::VerifyArgs),
    /// Print object count, bytes, asset entries and the oldest/newest LRU stamps.
    Stats(crate::admin::StatsArgs),
    /// Write systemd units for a pull-only and a push instance (see docs/systemd.md).
    InstallUnits(crate::units::InstallUnitsArgs),
    /// Ask a running server for its capabilities; exit 0 if it answers, 1 if not.
    Healthcheck(crate::healthcheck::HealthcheckArgs),
    /// Create the server's TLS key and self-signed certificate (server.key, server.crt).
    GenServerCert(crate::certs::GenServerCertArgs),
    /// Create a client key and self-signed certificate for pushing (client.key, client.crt).
    GenClientCert(crate::certs::GenClientCertArgs),
    /// Authorize a client certificate: append it to the --client-certs bundle.
    AddClient(crate::certs::AddClientArgs),
    /// List the authorized client certificates.
    ListClients(crate::certs::ListClientsArgs),
    /// Revoke a client certificate by fingerprint or subject.
    RemoveClient(crate::certs::RemoveClientArgs),
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

    /// Refuse Remote Asset pushes (FAILED_PRECONDITION) unless everything they reference
    /// is stored here. By default a push none of whose content is stored here is recorded
    /// as an index entry for content stored elsewhere, as a split set-up's index needs
    /// (docs/adr/0007).
    #[arg(long, conflicts_with = "index_only")]
    pub require_asset_content: bool,

    /// Private server key for TLS (PEM). Enables TLS, together with --server-cert.
    #[arg(long, value_name = "FILE")]
    pub server_key: Option<PathBuf>,

    /// Public server certificate for TLS (PEM), optionally followed by its chain.
    #[arg(long, value_name = "FILE")]
    pub server_cert: Option<PathBuf>,

    /// Client certificates allowed to connect (PEM bundle, e.g. certs/authorized.crt).
    /// Requires TLS; every client must then present one of them. Manage it with
    /// add-client/remove-client; changes apply to new connections without a restart.
    #[arg(long, value_name = "FILE")]
    pub client_certs: Option<PathBuf>,

    /// How often to check the TLS files for changes, in seconds (0: only on SIGHUP).
    #[arg(long, value_name = "SECONDS", default_value_t = 2.0)]
    pub tls_watch_interval: f64,

    /// Log verbosity. `info` (the default) logs the effective settings at start, each
    /// eviction pass, TLS reloads and refused connections; nothing per request.
    #[arg(long, value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,

    /// Where logs go: auto picks journald when stderr is the journal stream systemd
    /// set up for the service (JOURNAL_STREAM), stderr otherwise.
    #[arg(long, value_enum, default_value_t = crate::logging::LogTarget::Auto)]
    pub log_target: crate::logging::LogTarget,

    /// Once listening, write the bound port number to this file (atomically).
    #[arg(long, value_name = "FILE")]
    pub port_file: Option<PathBuf>,

    /// Also answer to this REAPI instance name (repeatable). The empty name is always
    /// accepted; every name shares the one store.
    #[arg(long = "instance-name", value_name = "NAME", value_parser = parse_instance_name)]
    pub instance_names: Vec<String>,

    /// Most bytes of blobs to keep; least recently used blobs are evicted beyond it.
    /// Accepts plain bytes, `10e9`, or K/M/G/T suffixes (powers of 1024). 0 disables it.
    #[arg(long, value_name = "SIZE", default_value = "10e9", value_parser = parse_size)]
    pub quota: u64,

    /// What eviction frees down to [default: half the quota].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub quota_low: Option<u64>,

    /// Free filesystem space to keep; below it, evict or refuse uploads
    /// [default: 2G or 5% of the filesystem, whichever is smaller].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub reserve: Option<u64>,

    /// Requests one client address may have in progress at once (streams included);
    /// more wait for one of them to finish. Bounds what a single misbehaving client can
    /// hold, e.g. streams it opens and never reads.
    #[arg(long, value_name = "N", default_value_t = crate::client_limit::DEFAULT_PER_CLIENT,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_client_requests: u32,

    /// Seconds a ByteStream stream may make no progress (no data from a writer, no data
    /// taken by a reader) before the server abandons it.
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    pub stream_idle_timeout: f64,

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

fn parse_instance_name(s: &str) -> Result<String, String> {
    crate::service::resource_name::check_instance_name(s).map(|()| s.to_owned())
}

/// Parses a byte size: `1048576`, `10e9`, `1.5G`, `512Ki`, `2TiB`, `500MB`.
///
/// `K M G T`, `Ki Mi Gi Ti` and `KiB MiB GiB TiB` are powers of 1024 (the single letters as
/// in BuildStream's own cache quota settings); `KB MB GB TB` are powers of 1000. Case does
/// not matter. The result must be a whole number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    const HELP: &str =
        "examples: 10e9, 500M, 2GiB, 20GB; K/M/G/T, Ki/Mi/Gi/Ti and KiB/MiB/GiB/TiB \
                        are powers of 1024, KB/MB/GB/TB powers of 1000";
    let t = s.trim();
    let split = t
        .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    let multiplier: u64 = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" => 1 << 10,
        "m" | "mi" | "mib" => 1 << 20,
        "g" | "gi" | "gib" => 1 << 30,
        "t" | "ti" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => return Err(format!("{s:?}: unknown unit {other:?} ({HELP})")),
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size ({HELP})"))?;
    let bytes = value * multiplier as f64;
    // 2^64 itself is out of range (`u64::MAX as f64` rounds up to it).
    if !bytes.is_finite() || !(0.0..18_446_744_073_709_551_616.0).contains(&bytes) {
        return Err(format!("{s:?} is out of range"));
    }
    // Decimal fractions are not exact in binary ("1.005KB" is 1004.9999...): a size is
    // whole if it is within a thousandth of a byte of a whole number.
    let whole = bytes.round();
    if (bytes - whole).abs() > 1e-3 {
        return Err(format!("{s:?} is not a whole number of bytes"));
    }
    Ok(whole as u64)
}

/// The smallest quota taken at face value: below it a size is almost certainly missing its
/// unit (`--quota 100` meaning 100G).
pub const MIN_QUOTA: u64 = 64 << 10;

/// Checks a quota policy given on the command line: `quota` 0 means none.
pub fn check_quota(quota: u64, low: Option<u64>) -> Result<(), String> {
    if quota > 0 && quota < MIN_QUOTA {
        return Err(format!(
            "--quota {quota} is {quota} bytes, less than the {MIN_QUOTA} bytes a cache needs \
             (a missing unit? e.g. --quota {quota}G; --quota 0 disables the quota)"
        ));
    }
    match low {
        Some(_) if quota == 0 => {
            Err("--quota-low needs a quota: with --quota 0 nothing is ever evicted".to_owned())
        }
        Some(low) if low > quota => Err(format!(
            "--quota-low ({}) is above --quota ({}): eviction frees down to the low \
             watermark, so it must be at most the quota",
            format_size(low),
            format_size(quota)
        )),
        _ => Ok(()),
    }
}

/// A byte count as an operator reads it: exact below 1 KiB, else in binary units with the
/// exact figure alongside ("10000000000 bytes (9.31 GiB)").
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut value = bytes as f64;
    let mut unit = "";
    for u in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = u;
    }
    format!("{bytes} bytes ({value:.2} {unit})").replace(".00 ", " ")
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

    fn serve(args: &[&str]) -> ServeArgs {
        match parse(args).command {
            Command::Serve(a) => a,
            other => panic!("expected serve, got {other:?}"),
        }
    }

    #[test]
    fn historical_form_means_serve() {
        let a = serve(&["x", "--port", "11001", "--enable-push", "/r"]);
        assert_eq!(a.port, 11001);
        assert!(a.enable_push);
        assert_eq!(a.repo, PathBuf::from("/r"));
        let a = serve(&["x", "/r", "-p", "0"]);
        assert_eq!(a.port, 0);
    }

    #[test]
    fn serve_subcommand() {
        let a = serve(&["x", "serve", "-p", "1", "--log-level", "info", "/r"]);
        assert_eq!(a.log_level, LogLevel::Info);
        assert!(!a.enable_push);
    }

    #[test]
    fn log_target() {
        use crate::logging::LogTarget;
        assert_eq!(serve(&["x", "-p", "1", "/r"]).log_target, LogTarget::Auto);
        let a = serve(&["x", "-p", "1", "--log-target", "journald", "/r"]);
        assert_eq!(a.log_target, LogTarget::Journald);
    }

    #[test]
    fn install_units_is_a_subcommand() {
        let cmd = parse(&["x", "install-units", "--repo", "/r", "--certs-dir", "/c"]).command;
        let Command::InstallUnits(a) = cmd else {
            panic!("expected install-units, got {cmd:?}");
        };
        assert_eq!((a.pull_port, a.push_port), (11001, 11002));
        assert_eq!(a.user, "artifacts");
        assert!(!a.force);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10e9"), Ok(10_000_000_000));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size("3MiB"), Ok(3 << 20));
        assert_eq!(parse_size("10Gi"), Ok(10 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("10 gib"), Ok(10 << 30));
        assert_eq!(parse_size("20GB"), Ok(20_000_000_000));
        assert_eq!(parse_size("500kB"), Ok(500_000));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("7b"), Ok(7));
        assert_eq!(parse_size("1.005KB"), Ok(1005));
        assert!(parse_size("16777216T").is_err(), "2^64 bytes");
        assert_eq!(parse_size("0"), Ok(0));
        for bad in ["-1", "lots", "", "0.5", "1.3", "10Gx", "10 GiBs", "1e400"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_size("0.5")
            .unwrap_err()
            .contains("whole number of bytes"));
        assert!(parse_size("10Q").unwrap_err().contains("powers of 1000"));
    }

    #[test]
    fn quota_policies() {
        assert!(check_quota(10_000_000_000, None).is_ok());
        assert!(check_quota(0, None).is_ok());
        assert!(check_quota(200_000, Some(100_000)).is_ok());
        assert!(check_quota(100, None).unwrap_err().contains("missing unit"));
        assert!(check_quota(1 << 30, Some(2 << 30))
            .unwrap_err()
            .contains("above --quota"));
        assert!(check_quota(0, Some(1))
            .unwrap_err()
            .contains("needs a quota"));
    }

    #[test]
    fn port_is_required() {
        assert!(Cli::try_parse_from(normalize_args(["x", "/r"].map(OsString::from))).is_err());
    }
}
