//! Offline maintenance of a repository: `gc`, `verify` and `stats`. Each is safe to run
//! beside a live server: eviction takes the same lock the server takes, deletions and
//! quarantines are single renames or unlinks, and nothing here refreshes LRU stamps.

use crate::cli::parse_size;
use crate::storage::asset::AssetStore;
use crate::storage::cas::{CasStore, QuotaPolicy};
use crate::storage::digest::Digest;
use crate::storage::entry_missing_content;
use anyhow::Context;
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct GcArgs {
    /// Evict least recently used blobs beyond this size (0: evict nothing) [default: the
    /// quota the server last started on REPO runs with, recorded in REPO/cas/policy].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub quota: Option<u64>,
    /// What eviction frees down to [default: the recorded one with the recorded quota,
    /// else half of --quota].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub quota_low: Option<u64>,
    /// Report what would be removed without removing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// The repository (the server's REPO directory).
    pub repo: PathBuf,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The repository (the server's REPO directory).
    pub repo: PathBuf,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    /// The repository (the server's REPO directory).
    pub repo: PathBuf,
}

/// The policy `gc` acts on: what the command line says, else what the serving process
/// recorded; never a default of its own, which could evict far more than the cache's.
fn gc_policy(args: &GcArgs) -> anyhow::Result<QuotaPolicy> {
    let policy = match args.quota {
        Some(quota) => {
            crate::cli::check_quota(quota, args.quota_low).map_err(anyhow::Error::msg)?;
            QuotaPolicy {
                quota: (quota > 0).then_some(quota),
                low_watermark: args.quota_low.unwrap_or(quota / 2),
                reserve: 0,
            }
        }
        None => {
            let recorded = crate::storage::policy::recorded(&args.repo)
                .map_err(anyhow::Error::msg)?
                .with_context(|| {
                    format!(
                        "{} has no recorded quota (no server has started on it since the \
                         record was introduced): pass --quota SIZE, the quota the server runs \
                         with",
                        args.repo.display()
                    )
                })?;
            anyhow::ensure!(
                args.quota_low.is_none(),
                "--quota-low needs --quota (gc otherwise uses the recorded quota and low \
                 watermark together)"
            );
            QuotaPolicy {
                reserve: 0,
                ..recorded
            }
        }
    };
    Ok(policy)
}

fn ensure_repository(repo: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        repo.join("cas").is_dir() || repo.join("assets").is_dir(),
        "{} is not a bst-artifact-server repository (no cas/ or assets/ directory)",
        repo.display()
    );
    Ok(())
}

fn open(repo: &Path, policy: QuotaPolicy) -> anyhow::Result<(CasStore, AssetStore)> {
    ensure_repository(repo)?;
    let cas = CasStore::open_with(repo, policy)
        .with_context(|| format!("opening {}", repo.display()))?
        .without_lru_refresh();
    let assets = AssetStore::open(repo).with_context(|| format!("opening {}", repo.display()))?;
    Ok((cas, assets))
}

/// Asset entries that are unreadable, expired, or whose content is incomplete.
fn dangling_assets(cas: &CasStore, assets: &AssetStore) -> Vec<(PathBuf, String)> {
    let now = std::time::SystemTime::now();
    let mut out = Vec::new();
    assets.for_each_entry(|path, decoded| {
        let problem = match decoded {
            Err(reason) => Some(format!("unreadable: {reason}")),
            Ok((_, e)) if e.is_expired(now) => Some(format!("{} expired", e.uri)),
            // Its content lives on another server (docs/adr/0007): nothing to check here.
            Ok((_, e)) if e.content_elsewhere => None,
            Ok((kind, e)) => match entry_missing_content(cas, kind, &e) {
                Ok(Some(missing)) => Some(format!("{} references missing {missing}", e.uri)),
                Ok(None) => None,
                Err(err) => Some(format!("{}: {err}", e.uri)),
            },
        };
        if let Some(p) = problem {
            out.push((path.to_owned(), p));
        }
    });
    out
}

pub fn gc(args: &GcArgs) -> anyhow::Result<()> {
    ensure_repository(&args.repo)?;
    let policy = gc_policy(args)?;
    let quota = policy.quota;
    let source = if args.quota.is_some() {
        "from the command line"
    } else {
        "recorded by the server in REPO/cas/policy"
    };
    match quota {
        Some(q) => println!(
            "policy ({source}): quota {}, evicting down to {}",
            crate::cli::format_size(q),
            crate::cli::format_size(policy.low_watermark)
        ),
        None => println!("policy ({source}): no quota, nothing is evicted"),
    }
    let (cas, assets) = open(&args.repo, policy)?;
    let before = cas.objects_total();
    let over = quota.is_some_and(|q| before.bytes > q);
    let report = if over {
        cas.evict_to_low_watermark(args.dry_run)
            .context("evicting least recently used blobs")?
    } else {
        Default::default()
    };
    let verb = if args.dry_run {
        "would remove"
    } else {
        "removed"
    };
    println!(
        "blobs: {} objects, {} bytes stored; {verb} {} objects ({} bytes)",
        before.objects, before.bytes, report.freed_objects, report.freed_bytes
    );
    let dangling = dangling_assets(&cas, &assets);
    for (path, why) in &dangling {
        println!("asset entry {}: {why}", path.display());
        if !args.dry_run {
            std::fs::remove_file(path)
                .or_else(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => Ok(()),
                    _ => Err(e),
                })
                .with_context(|| format!("removing {}", path.display()))?;
        }
    }
    println!("asset entries: {verb} {} dangling", dangling.len());
    Ok(())
}

pub fn verify(args: &VerifyArgs) -> anyhow::Result<()> {
    let (cas, assets) = open(&args.repo, QuotaPolicy::unlimited())?;
    let (mut checked, mut corrupt) = (0u64, Vec::<Digest>::new());
    cas.for_each_object(|digest, path| {
        checked += 1;
        if !cas.object_matches(&digest, &path) {
            corrupt.push(digest);
        }
    });
    for d in &corrupt {
        cas.quarantine(d, "verify: content does not match its name");
        println!("corrupt blob {d}: quarantined");
    }
    // A damaged empty blob was just moved aside; every repository holds a good one.
    cas.ensure_empty_blob();
    let dangling = dangling_assets(&cas, &assets);
    for (path, why) in &dangling {
        println!("dangling asset entry {}: {why}", path.display());
    }
    println!(
        "verified {checked} blobs: {} corrupt (quarantined); {} dangling asset entries",
        corrupt.len(),
        dangling.len()
    );
    anyhow::ensure!(
        corrupt.is_empty(),
        "{} corrupt blobs were found and quarantined",
        corrupt.len()
    );
    Ok(())
}

pub fn stats(args: &StatsArgs) -> anyhow::Result<()> {
    let (cas, assets) = open(&args.repo, QuotaPolicy::unlimited())?;
    let s = cas.objects_total();
    let mut entries = 0u64;
    assets.for_each_entry(|_, _| entries += 1);
    let when = |ns: Option<i64>| {
        ns.and_then(|ns| {
            time::OffsetDateTime::from_unix_timestamp_nanos(ns as i128)
                .ok()
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
        })
        .unwrap_or_else(|| "-".into())
    };
    println!("objects: {}", s.objects);
    println!("bytes: {}", s.bytes);
    println!("assets: {entries}");
    println!("oldest: {}", when(s.oldest));
    println!("newest: {}", when(s.newest));
    Ok(())
}
