//! Log output: native journald records (structured fields kept) when the service runs under
//! systemd, human-readable lines on stderr otherwise.

use std::io::IsTerminal;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Where log records go.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogTarget {
    /// journald when stderr is the journal stream systemd gave the service, else stderr.
    #[default]
    Auto,
    /// journald's native protocol (falls back to stderr, with a warning, if it is unavailable).
    Journald,
    /// Human-readable lines on stderr.
    Stderr,
}

/// The identifier records carry in the journal (`SYSLOG_IDENTIFIER=`, `journalctl -t`).
pub const SYSLOG_IDENTIFIER: &str = "bst-artifact-server";

/// Prefix of our own structured fields in the journal: an event field `address` is stored as
/// `BST_ADDRESS`. Without a prefix a field could overwrite a trusted one such as `PRIORITY`.
pub const JOURNAL_FIELD_PREFIX: &str = "BST";

/// What [`init`] settled on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chosen {
    Journald,
    Stderr,
}

/// Installs the global subscriber. `filter` is an `EnvFilter` directive such as `info`; it
/// applies to both targets.
pub fn init(filter: &str, target: LogTarget) -> Chosen {
    let want_journald = match target {
        LogTarget::Journald => true,
        LogTarget::Stderr => false,
        LogTarget::Auto => stderr_is_journal_stream(),
    };
    let mut fallback_reason = None;
    if want_journald {
        match journald_layer() {
            Ok(layer) => {
                tracing_subscriber::registry()
                    .with(EnvFilter::new(filter))
                    .with(layer)
                    .init();
                return Chosen::Journald;
            }
            Err(e) => fallback_reason = Some(e),
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Some(e) = fallback_reason {
        // Only a forced journald target deserves a warning: in auto mode a journal stream
        // without a journal socket (e.g. a container) is an ordinary situation.
        if target == LogTarget::Journald {
            tracing::warn!(error = %e, "journald is unavailable; logging to stderr instead");
        } else {
            tracing::debug!(error = %e, "journald is unavailable; logging to stderr");
        }
    }
    Chosen::Stderr
}

fn journald_layer() -> std::io::Result<tracing_journald::Layer> {
    Ok(tracing_journald::layer()?
        .with_syslog_identifier(SYSLOG_IDENTIFIER.to_owned())
        .with_field_prefix(Some(JOURNAL_FIELD_PREFIX.to_owned())))
}

/// systemd sets `JOURNAL_STREAM=<dev>:<ino>` for a service whose stdout/stderr go to the
/// journal. The variable is inherited by children and survives redirections, so it only
/// counts when it still names the file stderr is connected to.
pub fn stderr_is_journal_stream() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(parse_journal_stream) else {
        return false;
    };
    stderr_dev_ino().is_some_and(|actual| actual == (dev, ino))
}

fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

fn stderr_dev_ino() -> Option<(u64, u64)> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let meta = std::fs::File::from(fd).metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_journal_stream() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8"), None);
        assert_eq!(parse_journal_stream("a:1"), None);
        assert_eq!(parse_journal_stream(""), None);
    }
}
