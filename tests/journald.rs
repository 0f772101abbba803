//! Logging to a real systemd-journald (run privately by tests/scripts/private-journald.sh)
//! keeps the structured fields, `--log-target auto` picks journald exactly when stderr is
//! the journal stream, and a forced but absent journald falls back to stderr.
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

type Entry = HashMap<String, String>;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/private-journald.sh")
}

/// Whether this machine can run a private journald; skips loudly outside CI, fails in CI.
fn journald_available() -> bool {
    let mut missing = Vec::new();
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        missing.push("root (for a private mount namespace)".to_owned());
    }
    for tool in ["unshare", "journalctl"] {
        if !Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            missing.push(tool.to_owned());
        }
    }
    if ![
        "/lib/systemd/systemd-journald",
        "/usr/lib/systemd/systemd-journald",
    ]
    .iter()
    .any(|p| Path::new(p).exists())
    {
        missing.push("systemd-journald (apt-get install systemd)".to_owned());
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("journald tests need {}", missing.join(", "));
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg}");
    }
    eprintln!("\n*** SKIPPED: {msg} ***\n");
    false
}

/// Runs the server inside the private namespace: start, wait until it listens, SIGTERM.
/// `wrap` is put in front of the server command (e.g. systemd-cat). Returns the journal
/// entries the server wrote and the output of the run.
fn run_server(without_journald: bool, wrap: &str, extra: &str) -> (Vec<Entry>, Output, PathBuf) {
    let dir = tempfile::tempdir().unwrap().keep();
    let json = dir.join("journal.json");
    let snippet = format!(
        r#"set -e
{wrap} "$BIN" serve --bind 127.0.0.1 --port 0 --port-file "$D/port" --log-level info {extra} "$D/repo" >"$D/stdout" 2>"$D/stderr" &
pid=$!
for _ in $(seq 600); do [ -s "$D/port" ] && break; sleep 0.05; done
[ -s "$D/port" ] || {{ echo "server did not start" >&2; cat "$D/stderr" >&2; kill -9 $pid; exit 1; }}
kill -TERM $pid
wait $pid
"#
    );
    let mut cmd = Command::new(script());
    if without_journald {
        cmd.arg("--without-journald");
    }
    let out = cmd
        .arg(&json)
        .args(["--", "timeout", "60", "sh", "-c", &snippet])
        .env("BIN", common::BIN)
        .env("D", &dir)
        .env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&json).unwrap();
    let entries = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| parse_flat_json(l).unwrap_or_else(|| panic!("bad journal line {l}")))
        .filter(|e| {
            e.get("SYSLOG_IDENTIFIER").map(String::as_str) == Some("bst-artifact-server")
                || e.get("_COMM")
                    .is_some_and(|c| c.starts_with("bst-artifact"))
        })
        .collect();
    (entries, out, dir)
}

fn find<'a>(entries: &'a [Entry], message_part: &str) -> &'a Entry {
    entries
        .iter()
        .find(|e| e.get("MESSAGE").is_some_and(|m| m.contains(message_part)))
        .unwrap_or_else(|| panic!("no entry with {message_part:?} in {entries:#?}"))
}

fn field<'a>(e: &'a Entry, name: &str) -> &'a str {
    e.get(name)
        .unwrap_or_else(|| panic!("no {name} in {e:#?}"))
        .as_str()
}

#[test]
fn forced_journald_keeps_structured_fields() {
    if !journald_available() {
        return;
    }
    let (entries, _, dir) = run_server(false, "", "--log-target journald");
    let port = std::fs::read_to_string(dir.join("port")).unwrap();

    let serving = find(&entries, "serving ");
    assert_eq!(field(serving, "_TRANSPORT"), "journal", "{serving:#?}");
    // The start-up line: the effective settings, in the message itself.
    let message = field(serving, "MESSAGE");
    assert!(
        message.starts_with("serving ") && message.contains("plain gRPC (no TLS), read-only"),
        "{message}"
    );
    assert_eq!(
        field(serving, "BST_ADDRESS"),
        format!("127.0.0.1:{}", port.trim())
    );
    assert_eq!(field(serving, "BST_PUSH"), "false");
    assert_eq!(field(serving, "BST_INDEX_ONLY"), "false");
    assert!(field(serving, "BST_REPO").ends_with("/repo"));
    // INFO is journald's "notice" (5), WARN its "warning" (4).
    assert_eq!(field(serving, "PRIORITY"), "5");
    assert_eq!(field(serving, "TARGET"), "bst_artifact_server::server");
    assert!(field(serving, "CODE_FILE").ends_with("server.rs"));
    assert!(serving.contains_key("CODE_LINE"));

    // A normal stop is ordinary news (INFO), not a warning.
    let stopping = find(&entries, "stopping");
    assert_eq!(field(stopping, "PRIORITY"), "5");
    assert_eq!(field(stopping, "BST_SIGNAL"), "SIGTERM");

    // Everything went to the journal: nothing logged on stderr.
    let stderr = std::fs::read_to_string(dir.join("stderr")).unwrap();
    assert!(stderr.is_empty(), "stderr: {stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn auto_picks_journald_when_stderr_is_the_journal_stream() {
    if !journald_available() {
        return;
    }
    // systemd-cat connects stdout to a journal stream, as systemd does for a service;
    // JOURNAL_STREAM is what systemd would set for it. The server's own redirections in
    // run_server would break that, so stderr is pointed back at the stream here.
    let wrap = r#"systemd-cat -t bst-stream sh -c 'exec 2>&1; JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec "$0" "$@"'"#;
    let (entries, _, dir) = run_server(false, wrap, "");
    let serving = find(&entries, "serving");
    assert_eq!(field(serving, "_TRANSPORT"), "journal", "{serving:#?}");
    assert!(serving.contains_key("BST_ADDRESS"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn auto_uses_stderr_when_journal_stream_is_stale() {
    // A JOURNAL_STREAM inherited from a parent service while stderr goes elsewhere.
    let repo = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let log = scratch.path().join("stderr");
    let mut server = common::Server::start_with(repo.path(), &[], |cmd| {
        cmd.env("JOURNAL_STREAM", "1:1")
            .stderr(std::fs::File::create(&log).unwrap());
    });
    let status = server.signal_and_wait(libc::SIGTERM);
    assert!(status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("INFO") && text.contains("serving") && text.contains("address="),
        "no human-readable log on stderr: {text}"
    );
}

#[test]
fn forced_journald_without_journald_falls_back_to_stderr() {
    let direct = !Path::new("/run/systemd/journal/socket").exists();
    if !direct && !journald_available() {
        return;
    }
    let stderr = if direct {
        let repo = tempfile::tempdir().unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let log = scratch.path().join("stderr");
        let mut server =
            common::Server::start_with(repo.path(), &["--log-target", "journald"], |cmd| {
                cmd.stderr(std::fs::File::create(&log).unwrap());
            });
        server.signal_and_wait(libc::SIGTERM);
        std::fs::read_to_string(&log).unwrap()
    } else {
        // This machine runs a journald: hide it in a private /run.
        let (_, _, dir) = run_server(true, "", "--log-target journald");
        let text = std::fs::read_to_string(dir.join("stderr")).unwrap();
        let _ = std::fs::remove_dir_all(dir);
        text
    };
    assert!(
        stderr.contains("journald is unavailable; logging to stderr instead"),
        "{stderr}"
    );
    assert!(stderr.contains("serving"), "{stderr}");
}

/// Parses one `journalctl -o json` line: a flat object whose values are strings, or (for
/// binary or repeated fields, which these tests do not look at) arrays and null.
fn parse_flat_json(line: &str) -> Option<Entry> {
    let mut chars = line.trim().chars().peekable();
    let mut entry = Entry::new();
    if chars.next()? != '{' {
        return None;
    }
    loop {
        match chars.next()? {
            '}' => return Some(entry),
            ',' | ' ' => continue,
            '"' => {}
            _ => return None,
        }
        let key = json_string(&mut chars)?;
        if chars.next()? != ':' {
            return None;
        }
        if chars.peek() == Some(&'"') {
            chars.next();
            entry.insert(key, json_string(&mut chars)?);
        } else {
            // Skip a non-string value up to the next top-level ',' or '}'.
            let mut depth = 0i32;
            while let Some(&c) = chars.peek() {
                match c {
                    '[' | '{' => depth += 1,
                    ']' | '}' if depth > 0 => depth -= 1,
                    ',' | '}' if depth == 0 => break,
                    _ => {}
                }
                chars.next();
            }
        }
    }
}

/// Reads the rest of a JSON string whose opening quote was consumed.
fn json_string(chars: &mut impl Iterator<Item = char>) -> Option<String> {
    let mut s = String::new();
    loop {
        match chars.next()? {
            '"' => return Some(s),
            '\\' => match chars.next()? {
                'n' => s.push('\n'),
                't' => s.push('\t'),
                'r' => s.push('\r'),
                'b' => s.push('\u{8}'),
                'f' => s.push('\u{c}'),
                'u' => {
                    let hex: String = chars.take(4).collect();
                    s.push(
                        char::from_u32(u32::from_str_radix(&hex, 16).ok()?).unwrap_or('\u{fffd}'),
                    );
                }
                c => s.push(c),
            },
            c => s.push(c),
        }
    }
}

#[test]
fn flat_json_parser() {
    let e = parse_flat_json(r#"{"A":"x\"y","B":[1,2],"C":null,"D":"\u00e9\n"}"#).unwrap();
    assert_eq!(e["A"], "x\"y");
    assert_eq!(e["D"], "é\n");
    assert!(!e.contains_key("B") && !e.contains_key("C"));
}
