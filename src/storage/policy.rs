//! The quota policy a serving process runs with, recorded in the repository
//! (`REPO/cas/policy`) so that offline tools act on the cache's own policy instead of a
//! default of their own: `gc REPO` evicts exactly what the server would.
//!
//! The file is a few `key=value` lines, written whole (temporary file, then rename) at
//! every start of `serve`; the last server started wins when two share a repository.

use super::cas::QuotaPolicy;
use std::path::{Path, PathBuf};

const FILE: &str = "cas/policy";

fn path(repo: &Path) -> PathBuf {
    repo.join(FILE)
}

/// Records `policy` for the repository at `repo`.
pub fn record(repo: &Path, policy: &QuotaPolicy) -> std::io::Result<()> {
    let text = format!(
        "# The quota policy of the last `bst-artifact-server serve` started on this repository\n\
         # (read by `gc`; see docs/operating.md). Written at every start.\n\
         quota={}\nlow_watermark={}\nreserve={}\n",
        policy.quota.unwrap_or(0),
        policy.low_watermark,
        policy.reserve
    );
    let target = path(repo);
    let tmp = target.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &target).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The recorded policy, `Ok(None)` if no server has recorded one.
pub fn recorded(repo: &Path) -> Result<Option<QuotaPolicy>, String> {
    let file = path(repo);
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("reading {}: {e}", file.display())),
    };
    let mut values = std::collections::HashMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("{}: {line:?} is not key=value", file.display()))?;
        let value: u64 = value
            .trim()
            .parse()
            .map_err(|_| format!("{}: {key} is not a number", file.display()))?;
        values.insert(key.trim().to_owned(), value);
    }
    let get = |key: &str| {
        values
            .get(key)
            .copied()
            .ok_or_else(|| format!("{}: no {key}", file.display()))
    };
    let quota = get("quota")?;
    Ok(Some(QuotaPolicy {
        quota: (quota > 0).then_some(quota),
        low_watermark: get("low_watermark")?,
        reserve: get("reserve")?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_policy_reads_back() {
        let repo = tempfile::tempdir().unwrap();
        std::fs::create_dir(repo.path().join("cas")).unwrap();
        assert_eq!(recorded(repo.path()), Ok(None));
        let policy = QuotaPolicy {
            quota: Some(10_000_000_000),
            low_watermark: 5_000_000_000,
            reserve: 2_000_000_000,
        };
        record(repo.path(), &policy).unwrap();
        assert_eq!(recorded(repo.path()), Ok(Some(policy)));
        let none = QuotaPolicy {
            quota: None,
            ..policy
        };
        record(repo.path(), &none).unwrap();
        assert_eq!(recorded(repo.path()).unwrap().unwrap().quota, None);
        std::fs::write(repo.path().join("cas/policy"), "quota=x\n").unwrap();
        assert!(recorded(repo.path()).is_err());
    }
}
