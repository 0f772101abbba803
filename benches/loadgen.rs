//! Load generator and benchmark driver for bst-artifact-server (and, for comparison, any
//! REAPI CAS / ByteStream / Remote Asset server such as BuildStream's reference server or
//! buildbox-casd).
//!
//! ```sh
//! cargo bench --bench loadgen -- --target http://127.0.0.1:PORT \
//!     --scenario batch-update --concurrency 8 [--tls-ca FILE] [--server-pid PID]
//! cargo bench --bench loadgen -- --scenario sha256
//! cargo bench --bench loadgen -- --scenario startup --objects 1000000 --repo DIR \
//!     --server-bin target/release/bst-artifact-server
//! ```
//!
//! Every scenario verifies every byte the server returns, exits non-zero on any error and
//! prints exactly one JSON line on stdout (progress goes to stderr). `--scenario` takes a
//! comma-separated list; each scenario prints its own line. `benches/compare.sh` runs
//! the whole set against this server and the reference servers and prints ratios; see
//! docs/performance.md for the figures and what they mean.
//!
//! Data is generated, never read from disk: blob N of a run is a pseudo-random stream
//! that can be regenerated at any offset, so uploads of any size stream with bounded
//! memory and downloads are checked against a regeneration of the expected bytes. Each
//! run uses a fresh seed, so repeated runs against one server never hit "already stored".
//!
//! `cargo test --all-targets` also builds and runs this binary, without `--bench`: it
//! then does nothing, so the test suite never runs a benchmark.

use anyhow::{anyhow, bail, ensure, Context, Result};
use bazel_remote_apis::build::bazel::remote::asset::v1 as ra;
use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use bazel_remote_apis::google::bytestream as bs;
use clap::{Parser, ValueEnum};
use prost::Message;
use sha2::{Digest as _, Sha256};
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

type CasClient =
    reapi::content_addressable_storage_client::ContentAddressableStorageClient<Channel>;
type BsClient = bs::byte_stream_client::ByteStreamClient<Channel>;
type CapsClient = reapi::capabilities_client::CapabilitiesClient<Channel>;
type FetchClient = ra::fetch_client::FetchClient<Channel>;
type PushClient = ra::push_client::PushClient<Channel>;

/// Message size limit for our side of every call (BatchReadBlobs answers included).
const MAX_MESSAGE: usize = 64 << 20;
/// Batch limit assumed when a server does not implement GetCapabilities (casd's default).
const DEFAULT_BATCH_LIMIT: u64 = 4 * 1024 * 1024 - 64 * 1024;
/// Upper bound for any single wait that is not an RPC (server start, log lines, exits).
const WAIT_LIMIT: Duration = Duration::from_secs(900);

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// ByteStream.Write of --blob-size blobs, --rounds per worker.
    BytestreamUpload,
    /// ByteStream.Read of --blob-size blobs, --rounds per worker.
    BytestreamDownload,
    /// BatchUpdateBlobs of --count blobs of --small-size bytes.
    BatchUpdate,
    /// BatchReadBlobs of --count blobs of --small-size bytes.
    BatchRead,
    /// FindMissingBlobs with --digests-per-request digests, --requests requests.
    FindMissing,
    /// Remote Asset PushBlob + FetchBlob, --ops round trips.
    AssetRoundtrip,
    /// BuildStream-like artifact push then pull of --files files per worker.
    Artifact,
    /// Single-core SHA-256 rate of this machine (no server involved).
    Sha256,
    /// Buffered write of --rounds new files of --blob-size in --scratch-dir (the
    /// filesystem's own speed for what an upload does; no server involved).
    DiskWrite,
    /// Start-up on a repository of --objects objects (spawns --server-bin on --repo).
    Startup,
}

impl Scenario {
    fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }
    fn needs_target(self) -> bool {
        !matches!(
            self,
            Scenario::Sha256 | Scenario::DiskWrite | Scenario::Startup
        )
    }
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "loadgen",
    about = "Benchmark scenarios for REAPI CAS / ByteStream / Remote Asset servers",
    args_override_self = true
)]
struct Opts {
    /// Server URL, http://HOST:PORT or https://HOST:PORT (https needs --tls-ca).
    #[arg(long)]
    target: Option<String>,
    /// Scenarios to run, comma-separated; one JSON line is printed per scenario.
    #[arg(long, value_delimiter = ',', required = true)]
    scenario: Vec<Scenario>,
    /// Parallel workers, each on its own connection.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// CA certificate (PEM) that signed the server's certificate, for https targets.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Name to verify the server certificate against [default: the URL's host].
    #[arg(long)]
    tls_domain: Option<String>,
    /// Client certificate (PEM) for servers that require client authentication.
    #[arg(long, value_name = "FILE", requires = "tls_client_key")]
    tls_client_cert: Option<PathBuf>,
    /// Client private key (PEM) for --tls-client-cert.
    #[arg(long, value_name = "FILE", requires = "tls_client_cert")]
    tls_client_key: Option<PathBuf>,
    /// REAPI instance name.
    #[arg(long, default_value = "")]
    instance: String,
    /// Size of each ByteStream blob.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    blob_size: u64,
    /// ByteStream blobs per worker (each upload is a new blob; downloads re-read one).
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// ByteStream.Write chunk (buildbox-casd sends 2 MiB).
    #[arg(long, default_value = "2M", value_parser = parse_size)]
    chunk: u64,
    /// Small blobs per batch scenario.
    #[arg(long, default_value_t = 100_000)]
    count: usize,
    /// Size of each small blob.
    #[arg(long, default_value = "4K", value_parser = parse_size)]
    small_size: u64,
    /// batch-update: upload the blobs once before the timed phase, so that what is timed
    /// is a server receiving, hashing and checking blobs it already stores (no files
    /// created): the ceiling of what any storage format could reach on this machine.
    #[arg(long)]
    already_stored: bool,
    /// Most blob bytes per Batch request (further capped by the server's advertised limit).
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    batch_bytes: u64,
    /// Distinct small blobs that batch-read cycles over.
    #[arg(long, default_value_t = 25_600)]
    read_pool: usize,
    /// Digests per FindMissingBlobs request.
    #[arg(long, default_value_t = 10_000)]
    digests_per_request: usize,
    /// Percentage of FindMissingBlobs digests that are absent.
    #[arg(long, default_value_t = 0.0)]
    missing_percent: f64,
    /// FindMissingBlobs requests in all.
    #[arg(long, default_value_t = 500)]
    requests: usize,
    /// Remote Asset round trips in all.
    #[arg(long, default_value_t = 5_000)]
    ops: usize,
    /// Files per artifact.
    #[arg(long, default_value_t = 5_000)]
    files: usize,
    /// Artifact files are log-uniformly 64 bytes to this size...
    #[arg(long, default_value = "128K", value_parser = parse_size)]
    max_file_size: u64,
    /// ...plus this many files of --big-file-size (beyond the batch limit: ByteStream).
    #[arg(long, default_value_t = 2)]
    big_files: usize,
    #[arg(long, default_value = "8M", value_parser = parse_size)]
    big_file_size: u64,
    /// Longest timed phase of a count-bounded scenario, in seconds; rates are computed
    /// over what was done when it ends.
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Deadline of each RPC, in seconds.
    #[arg(long, default_value_t = 900.0)]
    rpc_timeout: f64,
    /// Server process ids (comma-separated; e.g. a Python server and its casd) whose CPU
    /// time and memory are reported for each timed phase.
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Free-form label copied into the results (e.g. which server this is).
    #[arg(long, default_value = "")]
    label: String,
    /// Bytes hashed by the sha256 scenario.
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    sha_bytes: u64,
    /// HTTP/2 stream receive window (connection window is twice this).
    #[arg(long, default_value = "8M", value_parser = parse_size)]
    window: u64,
    /// HTTP/2 SETTINGS_MAX_FRAME_SIZE we announce (what the server may send us).
    #[arg(long, value_parser = parse_size)]
    max_frame: Option<u64>,
    /// disk-write: directory to write in (put it on the servers' filesystem).
    #[arg(long, default_value = ".")]
    scratch_dir: PathBuf,
    /// startup: repository directory (created and filled to --objects objects, reused).
    #[arg(long)]
    repo: Option<PathBuf>,
    /// startup: number of objects in the repository.
    #[arg(long, default_value_t = 1_000_000)]
    objects: u64,
    /// startup: the server binary [default: $CARGO_TARGET_DIR or ./target, release].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// startup: fraction of the store the eviction measurement frees (0 skips it).
    #[arg(long, default_value_t = 0.5)]
    evict_fraction: f64,
    /// startup: drop the page cache before starting the server (cold start; needs root).
    #[arg(long)]
    drop_caches: bool,
    /// Passed by `cargo bench`; without it (under `cargo test`) nothing is run.
    #[arg(long, hide = true)]
    bench: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.trim_end_matches("ib").trim_end_matches('b');
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4K, 256M, 1G, 10e9)"))?;
    if !(0.0..1.8e19).contains(&v) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok((v * mult as f64).round() as u64)
}

// ---------------------------------------------------------------------------------------
// Deterministic data
// ---------------------------------------------------------------------------------------

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Identifies one generated stream: (run seed, kind of blob, index).
fn stream_id(seed: u64, kind: u64, index: u64) -> u64 {
    splitmix(splitmix(seed ^ kind.rotate_left(48)) ^ index)
}

/// Words in the shared random texture that every stream is derived from (1 MiB).
const TEXTURE_WORDS: usize = 1 << 17;

fn texture() -> &'static [u64] {
    static TEXTURE: std::sync::OnceLock<Vec<u64>> = std::sync::OnceLock::new();
    TEXTURE.get_or_init(|| {
        (0..TEXTURE_WORDS as u64)
            .map(|i| splitmix(i ^ 0x7e57))
            .collect()
    })
}

/// Word `w` of stream `id`: the texture XOR a key per (stream, 1 MiB block). Cheap
/// enough (a load and an XOR) that generating and checking data costs the client far
/// less than the server's work, yet no two blocks of any two streams are equal.
fn block_key(id: u64, block: u64) -> u64 {
    splitmix(id ^ block.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Fills `buf` with bytes `[offset, offset + buf.len())` of stream `id`.
fn fill(id: u64, offset: u64, buf: &mut [u8]) {
    let tex = texture();
    let mask = TEXTURE_WORDS as u64 - 1;
    let word_at = |w: u64| tex[(w & mask) as usize] ^ block_key(id, w / TEXTURE_WORDS as u64);
    let mut word = offset / 8;
    let skip = (offset % 8) as usize;
    let mut rest: &mut [u8] = buf;
    if skip != 0 {
        let bytes = word_at(word).to_le_bytes();
        let n = (8 - skip).min(rest.len());
        rest[..n].copy_from_slice(&bytes[skip..skip + n]);
        rest = &mut rest[n..];
        word += 1;
    }
    let whole = rest.len() / 8;
    let (body, tail) = rest.split_at_mut(whole * 8);
    let mut done = 0usize;
    while done < whole {
        // One run of words inside a single texture block shares one key.
        let w = word + done as u64;
        let key = block_key(id, w / TEXTURE_WORDS as u64);
        let start = (w & mask) as usize;
        let n = (TEXTURE_WORDS - start).min(whole - done);
        for (dst, t) in body[done * 8..(done + n) * 8]
            .chunks_exact_mut(8)
            .zip(&tex[start..start + n])
        {
            dst.copy_from_slice(&(t ^ key).to_le_bytes());
        }
        done += n;
    }
    if !tail.is_empty() {
        let bytes = word_at(word + whole as u64).to_le_bytes();
        let n = tail.len();
        tail.copy_from_slice(&bytes[..n]);
    }
}

fn generate(id: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill(id, 0, &mut v);
    v
}

fn digest_of(data: &[u8]) -> reapi::Digest {
    reapi::Digest {
        hash: hex::encode(Sha256::digest(data)),
        size_bytes: data.len() as i64,
    }
}

/// SHA-256 of a whole generated stream, computed in 1 MiB pieces.
fn stream_digest(id: u64, size: u64) -> reapi::Digest {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        fill(id, off, &mut buf[..n]);
        h.update(&buf[..n]);
        off += n as u64;
    }
    reapi::Digest {
        hash: hex::encode(h.finalize()),
        size_bytes: size as i64,
    }
}

/// Digests of several generated streams, hashed on every core.
/// Generated streams held in memory before a timed phase when they fit in
/// [`PREGENERATED_LIMIT`]: generating data while sending (or checking) it cost the client
/// about a fifth of a CPU-second per GiB on cores it shares with the server. Larger runs
/// (e.g. 32 x 512 MiB) generate as they go.
const PREGENERATED_LIMIT: u64 = 1 << 30;

type Pregenerated = Option<Arc<Vec<Arc<Vec<u8>>>>>;

async fn pregenerate(ids: &[u64], size: u64) -> Result<Pregenerated> {
    if ids.len() as u64 * size > PREGENERATED_LIMIT {
        return Ok(None);
    }
    let ids = ids.to_vec();
    let blobs = tokio::task::spawn_blocking(move || {
        ids.iter()
            .map(|&id| Arc::new(generate(id, size as usize)))
            .collect::<Vec<_>>()
    })
    .await?;
    Ok(Some(Arc::new(blobs)))
}

async fn stream_digests(ids: Vec<u64>, size: u64) -> Result<Vec<reapi::Digest>> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let ids = Arc::new(ids);
    let next = Arc::new(AtomicUsize::new(0));
    let out = Arc::new(Mutex::new(vec![None; ids.len()]));
    let mut handles = Vec::new();
    for _ in 0..threads {
        let (ids, next, out) = (ids.clone(), next.clone(), out.clone());
        handles.push(tokio::task::spawn_blocking(move || loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= ids.len() {
                return;
            }
            let d = stream_digest(ids[i], size);
            out.lock().unwrap()[i] = Some(d);
        }));
    }
    for h in handles {
        h.await?;
    }
    let out = std::mem::take(&mut *out.lock().unwrap());
    out.into_iter()
        .map(|d| d.ok_or_else(|| anyhow!("a digest was not computed")))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------

/// One JSON object, in insertion order.
#[derive(Default)]
struct Json(Vec<(String, String)>);

impl Json {
    fn str(&mut self, k: &str, v: &str) -> &mut Self {
        let mut s = String::from("\"");
        for c in v.chars() {
            match c {
                '"' => s.push_str("\\\""),
                '\\' => s.push_str("\\\\"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(s, "\\u{:04x}", c as u32);
                }
                c => s.push(c),
            }
        }
        s.push('"');
        self.0.push((k.to_owned(), s));
        self
    }
    fn int(&mut self, k: &str, v: u64) -> &mut Self {
        self.0.push((k.to_owned(), v.to_string()));
        self
    }
    fn num(&mut self, k: &str, v: f64) -> &mut Self {
        let s = if v.is_finite() {
            format!("{}", (v * 1000.0).round() / 1000.0)
        } else {
            "null".to_owned()
        };
        self.0.push((k.to_owned(), s));
        self
    }
    fn opt_num(&mut self, k: &str, v: Option<f64>) -> &mut Self {
        match v {
            Some(v) => self.num(k, v),
            None => {
                self.0.push((k.to_owned(), "null".to_owned()));
                self
            }
        }
    }
    fn opt_int(&mut self, k: &str, v: Option<u64>) -> &mut Self {
        match v {
            Some(v) => self.int(k, v),
            None => {
                self.0.push((k.to_owned(), "null".to_owned()));
                self
            }
        }
    }
    fn extend(&mut self, other: Json) -> &mut Self {
        self.0.extend(other.0);
        self
    }
    fn render(&self) -> String {
        let body: Vec<String> = self.0.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        format!("{{{}}}", body.join(","))
    }
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[loadgen] {}", msg.as_ref());
}

// ---------------------------------------------------------------------------------------
// Process accounting (/proc)
// ---------------------------------------------------------------------------------------

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Field 3 (state) is f[0]; utime is field 14, stime field 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks())
}

fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

fn sum_over(pids: &[u32], f: impl Fn(u32) -> Option<u64>) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| f(p)).sum()
}

fn self_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Times a phase and accounts the servers' CPU and memory over it.
struct Measure {
    pids: Vec<u32>,
    start: Instant,
    server_cpu0: Option<f64>,
    client_cpu0: f64,
    stop: Arc<AtomicBool>,
    max_rss: Arc<AtomicU64>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

struct Measured {
    seconds: f64,
    server_cpu: Option<f64>,
    client_cpu: f64,
    rss_max_kb: Option<u64>,
    rss_end_kb: Option<u64>,
    hwm_kb: Option<u64>,
}

impl Measure {
    fn start(pids: &[u32]) -> Measure {
        let pids = pids.to_vec();
        let stop = Arc::new(AtomicBool::new(false));
        let max_rss = Arc::new(AtomicU64::new(0));
        let sampler = (!pids.is_empty()).then(|| {
            let (pids, stop, max_rss) = (pids.clone(), stop.clone(), max_rss.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(kb) = sum_over(&pids, |p| status_kb(p, "VmRSS")) {
                        max_rss.fetch_max(kb, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(25));
                }
            })
        });
        Measure {
            server_cpu0: cpu_of(&pids),
            pids,
            start: Instant::now(),
            client_cpu0: self_cpu_seconds(),
            stop,
            max_rss,
            sampler,
        }
    }

    fn finish(mut self) -> Measured {
        let seconds = self.start.elapsed().as_secs_f64();
        let client_cpu = self_cpu_seconds() - self.client_cpu0;
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.sampler.take() {
            let _ = h.join();
        }
        let server_cpu = cpu_of(&self.pids).zip(self.server_cpu0).map(|(b, a)| b - a);
        let rss_end = sum_over(&self.pids, |p| status_kb(p, "VmRSS"));
        let max = self
            .max_rss
            .load(Ordering::Relaxed)
            .max(rss_end.unwrap_or(0));
        Measured {
            seconds,
            server_cpu,
            client_cpu,
            rss_max_kb: (!self.pids.is_empty()).then_some(max),
            rss_end_kb: rss_end,
            hwm_kb: sum_over(&self.pids, |p| status_kb(p, "VmHWM")),
        }
    }
}

fn cpu_of(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| cpu_seconds(p)).sum()
}

impl Measured {
    /// Fields for the result line, with `prefix` (e.g. "push_") on each name.
    fn json(&self, prefix: &str, ops: u64, bytes: u64, unit: &str) -> Json {
        let mut j = Json::default();
        let p = |s: &str| format!("{prefix}{s}");
        j.num(&p("seconds"), self.seconds)
            .int(&p(unit), ops)
            .int(&p("bytes"), bytes)
            .num(&p(&format!("{unit}_per_s")), ops as f64 / self.seconds)
            .num(&p("mb_per_s"), bytes as f64 / self.seconds / 1e6)
            .opt_num(&p("server_cpu_s"), self.server_cpu)
            .opt_num(
                &p(&format!("server_cpu_us_per_{}", unit.trim_end_matches('s'))),
                self.server_cpu
                    .filter(|_| ops > 0)
                    .map(|c| c * 1e6 / ops as f64),
            )
            .num(&p("client_cpu_s"), self.client_cpu)
            .opt_int(&p("server_rss_max_kb"), self.rss_max_kb)
            .opt_int(&p("server_rss_end_kb"), self.rss_end_kb)
            .opt_int(&p("server_hwm_kb"), self.hwm_kb);
        j
    }
}

// ---------------------------------------------------------------------------------------
// Connections and RPC helpers
// ---------------------------------------------------------------------------------------

#[derive(Clone)]
struct Conn {
    cas: CasClient,
    bs: BsClient,
    /// For ByteStream.Read with [`ReadResponseBytes`].
    reads: tonic::client::Grpc<Channel>,
    caps: CapsClient,
    fetch: FetchClient,
    push: PushClient,
}

async fn connect(opts: &Opts) -> Result<Conn> {
    let target = opts
        .target
        .clone()
        .ok_or_else(|| anyhow!("--target is required for this scenario"))?;
    let window = u32::try_from(opts.window).context("--window is too large")?;
    let mut ep = Endpoint::from_shared(target.clone())
        .with_context(|| format!("bad --target {target:?}"))?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs_f64(opts.rpc_timeout))
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(window))
        .initial_connection_window_size(Some(window.saturating_mul(2)));
    if let Some(f) = opts.max_frame {
        ep = ep.max_frame_size(Some(u32::try_from(f).context("--max-frame")?));
    }
    if target.starts_with("https://") {
        let ca_path = opts
            .tls_ca
            .as_ref()
            .ok_or_else(|| anyhow!("an https target needs --tls-ca"))?;
        let ca = std::fs::read(ca_path).with_context(|| format!("reading {ca_path:?}"))?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some(d) = &opts.tls_domain {
            tls = tls.domain_name(d.clone());
        }
        if let (Some(c), Some(k)) = (&opts.tls_client_cert, &opts.tls_client_key) {
            let cert = std::fs::read(c).with_context(|| format!("reading {c:?}"))?;
            let key = std::fs::read(k).with_context(|| format!("reading {k:?}"))?;
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        ep = ep.tls_config(tls).context("configuring TLS")?;
    }
    let ch = ep
        .connect()
        .await
        .with_context(|| format!("connecting to {target}"))?;
    Ok(Conn {
        cas: CasClient::new(ch.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
        bs: BsClient::new(ch.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
        reads: tonic::client::Grpc::new(ch.clone()).max_decoding_message_size(MAX_MESSAGE),
        caps: CapsClient::new(ch.clone()).max_decoding_message_size(MAX_MESSAGE),
        fetch: FetchClient::new(ch.clone()).max_decoding_message_size(MAX_MESSAGE),
        push: PushClient::new(ch).max_encoding_message_size(MAX_MESSAGE),
    })
}

struct Ctx {
    opts: Opts,
    conns: Vec<Conn>,
    /// Most blob bytes per Batch request.
    batch_limit: u64,
    /// What GetCapabilities advertised (0: not implemented or no limit).
    advertised_batch: u64,
    seed: u64,
}

impl Ctx {
    fn prefix(&self) -> String {
        if self.opts.instance.is_empty() {
            String::new()
        } else {
            format!("{}/", self.opts.instance)
        }
    }
    fn deadline(&self) -> Instant {
        Instant::now() + Duration::from_secs_f64(self.opts.duration)
    }
}

/// Runs `f(worker)` for every worker concurrently; the first error aborts the rest.
async fn run_workers<T, F, Fut>(n: usize, f: F) -> Result<Vec<T>>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for w in 0..n {
        let fut = f(w);
        set.spawn(async move { (w, fut.await) });
    }
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        let (w, r) = joined.context("a worker panicked")?;
        out[w] = Some(r.with_context(|| format!("worker {w}"))?);
    }
    Ok(out.into_iter().flatten().collect())
}

fn check_status(s: &Option<bazel_remote_apis::google::rpc::Status>, what: &str) -> Result<()> {
    match s {
        Some(st) if st.code != 0 => bail!(
            "{what}: status {:?}: {}",
            Code::from_i32(st.code),
            st.message
        ),
        _ => Ok(()),
    }
}

/// Streams generated stream `id` as a blob with ByteStream.Write.
async fn write_generated(
    bs: &mut BsClient,
    prefix: &str,
    id: u64,
    d: &reapi::Digest,
    chunk: u64,
    pre: Option<Arc<Vec<u8>>>,
) -> Result<()> {
    let size = d.size_bytes as u64;
    let name = format!(
        "{prefix}uploads/{}/blobs/{}/{}",
        uuid::Uuid::new_v4(),
        d.hash,
        size
    );
    let (tx, rx) = tokio::sync::mpsc::channel::<bs::WriteRequest>(2);
    let producer = tokio::spawn(async move {
        let mut off = 0u64;
        loop {
            let n = (size - off).min(chunk) as usize;
            let data = match &pre {
                Some(pre) => pre[off as usize..off as usize + n].to_vec(),
                None => {
                    let mut data = vec![0u8; n];
                    fill(id, off, &mut data);
                    data
                }
            };
            let finish = off + n as u64 == size;
            let msg = bs::WriteRequest {
                resource_name: if off == 0 {
                    name.clone()
                } else {
                    String::new()
                },
                write_offset: off as i64,
                finish_write: finish,
                data,
            };
            if tx.send(msg).await.is_err() || finish {
                return;
            }
            off += n as u64;
        }
    });
    let resp = bs
        .write(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .with_context(|| format!("ByteStream.Write of {}/{}", d.hash, size))?
        .into_inner();
    producer.abort();
    ensure!(
        resp.committed_size == size as i64,
        "ByteStream.Write of {}: committed_size {} != {size}",
        d.hash,
        resp.committed_size
    );
    Ok(())
}

/// Writes an in-memory blob with ByteStream.Write.
async fn write_bytes(bs: &mut BsClient, prefix: &str, data: &[u8], chunk: usize) -> Result<()> {
    let d = digest_of(data);
    let name = format!(
        "{prefix}uploads/{}/blobs/{}/{}",
        uuid::Uuid::new_v4(),
        d.hash,
        data.len()
    );
    let mut msgs = Vec::new();
    let mut off = 0usize;
    loop {
        let n = (data.len() - off).min(chunk);
        let finish = off + n == data.len();
        msgs.push(bs::WriteRequest {
            resource_name: if off == 0 {
                name.clone()
            } else {
                String::new()
            },
            write_offset: off as i64,
            finish_write: finish,
            data: data[off..off + n].to_vec(),
        });
        off += n;
        if finish {
            break;
        }
    }
    let resp = bs
        .write(futures::stream::iter(msgs))
        .await
        .with_context(|| format!("ByteStream.Write of {}/{}", d.hash, d.size_bytes))?
        .into_inner();
    ensure!(
        resp.committed_size == data.len() as i64,
        "ByteStream.Write: committed_size {} != {}",
        resp.committed_size,
        data.len()
    );
    Ok(())
}

/// Reads a blob with ByteStream.Read, handing each piece to `check(offset, data)`.
/// Returns the number of bytes received, which must equal the digest's size.
/// A ReadResponse whose data is decoded as `Bytes`, sharing the receive buffer instead
/// of being copied into a new `Vec` (prost's `bytes` mapping), as a lean client reads.
#[derive(Clone, PartialEq, prost::Message)]
struct ReadResponseBytes {
    #[prost(bytes = "bytes", tag = "10")]
    data: bytes::Bytes,
}

async fn read_stream(
    reads: &mut tonic::client::Grpc<Channel>,
    prefix: &str,
    d: &reapi::Digest,
    mut check: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<u64> {
    let name = format!("{prefix}blobs/{}/{}", d.hash, d.size_bytes);
    reads
        .ready()
        .await
        .map_err(|e| anyhow!("ByteStream.Read {name}: connection not ready: {e}"))?;
    let request = tonic::Request::new(bs::ReadRequest {
        resource_name: name.clone(),
        read_offset: 0,
        read_limit: 0,
    });
    let codec = tonic_prost::ProstCodec::<bs::ReadRequest, ReadResponseBytes>::default();
    let path = http::uri::PathAndQuery::from_static("/google.bytestream.ByteStream/Read");
    let mut stream = reads
        .server_streaming(request, path, codec)
        .await
        .with_context(|| format!("ByteStream.Read {name}"))?
        .into_inner();
    let mut off = 0u64;
    while let Some(msg) = stream
        .message()
        .await
        .with_context(|| format!("ByteStream.Read {name} at offset {off}"))?
    {
        ensure!(
            off + msg.data.len() as u64 <= d.size_bytes as u64,
            "ByteStream.Read {name}: more data than the digest says"
        );
        check(off, &msg.data)?;
        off += msg.data.len() as u64;
    }
    ensure!(
        off == d.size_bytes as u64,
        "ByteStream.Read {name}: got {off} bytes, expected {}",
        d.size_bytes
    );
    Ok(off)
}

/// Groups digests (with their sizes) into Batch requests of at most `limit` blob bytes.
fn group_by_size<T>(items: Vec<T>, size: impl Fn(&T) -> u64, limit: u64) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut bytes = 0u64;
    for it in items {
        let s = size(&it);
        if !cur.is_empty() && bytes + s > limit {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes += s;
        cur.push(it);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

async fn batch_update(
    cas: &mut CasClient,
    instance: &str,
    blobs: Vec<(reapi::Digest, Vec<u8>)>,
) -> Result<usize> {
    let n = blobs.len();
    let expected: HashSet<String> = blobs.iter().map(|(d, _)| d.hash.clone()).collect();
    let req = reapi::BatchUpdateBlobsRequest {
        instance_name: instance.to_owned(),
        requests: blobs
            .into_iter()
            .map(|(d, data)| reapi::batch_update_blobs_request::Request {
                digest: Some(d),
                data,
                compressor: 0,
            })
            .collect(),
        digest_function: 0,
    };
    let resp = cas
        .batch_update_blobs(req)
        .await
        .context("BatchUpdateBlobs")?
        .into_inner();
    ensure!(
        resp.responses.len() == n,
        "BatchUpdateBlobs: {} responses for {n} blobs",
        resp.responses.len()
    );
    for r in &resp.responses {
        let h = r.digest.as_ref().map(|d| d.hash.as_str()).unwrap_or("");
        ensure!(
            expected.contains(h),
            "BatchUpdateBlobs: unexpected digest {h}"
        );
        check_status(&r.status, &format!("BatchUpdateBlobs {h}"))?;
    }
    Ok(n)
}

/// BatchReadBlobs; every blob must come back whole and match `expect(digest)`.
async fn batch_read(
    cas: &mut CasClient,
    instance: &str,
    digests: Vec<reapi::Digest>,
    mut expect: impl FnMut(&reapi::Digest, &[u8]) -> Result<()>,
) -> Result<(usize, u64)> {
    let n = digests.len();
    let mut wanted: HashMap<String, i64> = digests
        .iter()
        .map(|d| (d.hash.clone(), d.size_bytes))
        .collect();
    let resp = cas
        .batch_read_blobs(reapi::BatchReadBlobsRequest {
            instance_name: instance.to_owned(),
            digests,
            acceptable_compressors: vec![],
            digest_function: 0,
        })
        .await
        .context("BatchReadBlobs")?
        .into_inner();
    ensure!(
        resp.responses.len() == n,
        "BatchReadBlobs: {} responses for {n} digests",
        resp.responses.len()
    );
    let mut bytes = 0u64;
    for r in &resp.responses {
        let d = r
            .digest
            .as_ref()
            .ok_or_else(|| anyhow!("BatchReadBlobs: response without digest"))?;
        check_status(&r.status, &format!("BatchReadBlobs {}", d.hash))?;
        ensure!(
            wanted.remove(&d.hash).is_some(),
            "BatchReadBlobs: unrequested or repeated digest {}",
            d.hash
        );
        ensure!(
            r.data.len() as i64 == d.size_bytes,
            "BatchReadBlobs {}: {} bytes, expected {}",
            d.hash,
            r.data.len(),
            d.size_bytes
        );
        expect(d, &r.data)?;
        bytes += r.data.len() as u64;
    }
    Ok((n, bytes))
}

async fn find_missing(
    cas: &mut CasClient,
    instance: &str,
    digests: Vec<reapi::Digest>,
) -> Result<Vec<reapi::Digest>> {
    Ok(cas
        .find_missing_blobs(reapi::FindMissingBlobsRequest {
            instance_name: instance.to_owned(),
            blob_digests: digests,
            digest_function: 0,
        })
        .await
        .context("FindMissingBlobs")?
        .into_inner()
        .missing_blob_digests)
}

/// Uploads small in-memory blobs with every worker's connection, in Batch requests.
async fn upload_small(ctx: &Ctx, blobs: Vec<(reapi::Digest, Vec<u8>)>) -> Result<()> {
    let limit = ctx.batch_limit;
    let batches = group_by_size(blobs, |(d, _)| d.size_bytes as u64, limit);
    let queue = Arc::new(Mutex::new(VecDeque::from(batches)));
    let instance = ctx.opts.instance.clone();
    run_workers(ctx.conns.len(), |w| {
        let (queue, instance) = (queue.clone(), instance.clone());
        let mut cas = ctx.conns[w].cas.clone();
        async move {
            loop {
                let Some(b) = queue.lock().unwrap().pop_front() else {
                    return Ok(());
                };
                batch_update(&mut cas, &instance, b).await?;
            }
        }
    })
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

const KIND_BIG: u64 = 1;
const KIND_SMALL: u64 = 2;
const KIND_FMB: u64 = 3;
const KIND_ASSET: u64 = 4;
const KIND_ARTIFACT: u64 = 5;

async fn bytestream_upload(ctx: &Ctx) -> Result<Json> {
    let o = &ctx.opts;
    let n = o.concurrency * o.rounds;
    let ids: Vec<u64> = (0..n as u64)
        .map(|i| stream_id(ctx.seed, KIND_BIG, i))
        .collect();
    log(format!(
        "hashing {n} blobs of {} bytes before the timed phase",
        o.blob_size
    ));
    let digests = Arc::new(stream_digests(ids.clone(), o.blob_size).await?);
    let pre = pregenerate(&ids, o.blob_size).await?;
    let ids = Arc::new(ids);
    let m = Measure::start(&o.server_pid);
    let prefix = ctx.prefix();
    let (rounds, chunk) = (o.rounds, o.chunk);
    let per_blob = run_workers(o.concurrency, |w| {
        let (ids, digests, prefix) = (ids.clone(), digests.clone(), prefix.clone());
        let pre = pre.clone();
        let mut bs = ctx.conns[w].bs.clone();
        async move {
            let mut times = Vec::new();
            for r in 0..rounds {
                let i = w * rounds + r;
                let t = Instant::now();
                let blob = pre.as_ref().map(|p| p[i].clone());
                write_generated(&mut bs, &prefix, ids[i], &digests[i], chunk, blob).await?;
                times.push(t.elapsed().as_secs_f64());
            }
            Ok(times)
        }
    })
    .await?;
    let measured = m.finish();
    // Everything must now be stored.
    let missing =
        find_missing(&mut ctx.conns[0].cas.clone(), &o.instance, digests.to_vec()).await?;
    ensure!(
        missing.is_empty(),
        "{} uploaded blobs are missing afterwards",
        missing.len()
    );
    let total = n as u64 * o.blob_size;
    let stream_rates: Vec<f64> = per_blob
        .iter()
        .flatten()
        .map(|s| o.blob_size as f64 / s)
        .collect();
    let mut j = measured.json("", n as u64, total, "blobs");
    j.int("blob_size", o.blob_size)
        .num(
            "per_stream_mb_per_s",
            total as f64 / measured.seconds / 1e6 / o.concurrency as f64,
        )
        .num(
            "slowest_blob_mb_per_s",
            stream_rates.iter().cloned().fold(f64::INFINITY, f64::min) / 1e6,
        );
    Ok(j)
}

async fn bytestream_download(ctx: &Ctx) -> Result<Json> {
    let o = &ctx.opts;
    let ids: Vec<u64> = (0..o.concurrency as u64)
        .map(|i| stream_id(ctx.seed, KIND_BIG, 1_000_000 + i))
        .collect();
    let digests = Arc::new(stream_digests(ids.clone(), o.blob_size).await?);
    let pre = pregenerate(&ids, o.blob_size).await?;
    let ids = Arc::new(ids);
    log(format!(
        "setup: uploading {} blobs of {} bytes",
        o.concurrency, o.blob_size
    ));
    let prefix = ctx.prefix();
    let chunk = o.chunk;
    run_workers(o.concurrency, |w| {
        let (ids, digests, prefix) = (ids.clone(), digests.clone(), prefix.clone());
        let blob = pre.as_ref().map(|p| p[w].clone());
        let mut bs = ctx.conns[w].bs.clone();
        async move { write_generated(&mut bs, &prefix, ids[w], &digests[w], chunk, blob).await }
    })
    .await?;
    let m = Measure::start(&o.server_pid);
    let rounds = o.rounds;
    run_workers(o.concurrency, |w| {
        let (ids, digests, prefix) = (ids.clone(), digests.clone(), prefix.clone());
        let blob = pre.as_ref().map(|p| p[w].clone());
        let mut reads = ctx.conns[w].reads.clone();
        async move {
            let mut scratch = Vec::new();
            for _ in 0..rounds {
                read_stream(&mut reads, &prefix, &digests[w], |off, data| {
                    let expected = match &blob {
                        Some(blob) => &blob[off as usize..off as usize + data.len()],
                        None => {
                            scratch.resize(data.len(), 0);
                            fill(ids[w], off, &mut scratch);
                            &scratch[..]
                        }
                    };
                    ensure!(expected == data, "downloaded bytes differ at offset {off}");
                    Ok(())
                })
                .await?;
            }
            Ok(())
        }
    })
    .await?;
    let measured = m.finish();
    let n = (o.concurrency * rounds) as u64;
    let total = n * o.blob_size;
    let mut j = measured.json("", n, total, "blobs");
    j.int("blob_size", o.blob_size).num(
        "per_stream_mb_per_s",
        total as f64 / measured.seconds / 1e6 / o.concurrency as f64,
    );
    Ok(j)
}

/// `count` small generated blobs with their digests.
async fn small_pool(
    seed: u64,
    kind: u64,
    count: usize,
    size: u64,
) -> Result<Vec<(reapi::Digest, Vec<u8>)>> {
    Ok(tokio::task::spawn_blocking(move || {
        (0..count as u64)
            .map(|i| {
                let data = generate(stream_id(seed, kind, i), size as usize);
                (digest_of(&data), data)
            })
            .collect()
    })
    .await?)
}

async fn batch_update_scenario(ctx: &Ctx) -> Result<Json> {
    let o = &ctx.opts;
    log(format!(
        "generating {} blobs of {} bytes",
        o.count, o.small_size
    ));
    let pool = small_pool(ctx.seed, KIND_SMALL, o.count, o.small_size).await?;
    let batches = group_by_size(pool, |(d, _)| d.size_bytes as u64, ctx.batch_limit);
    let per_batch = batches.first().map_or(0, Vec::len);
    if o.already_stored {
        log("setup: storing every blob once");
        upload_small(ctx, batches.iter().flatten().cloned().collect()).await?;
    }
    let queue = Arc::new(Mutex::new(VecDeque::from(batches)));
    let done = Arc::new(AtomicU64::new(0));
    let deadline = ctx.deadline();
    let m = Measure::start(&o.server_pid);
    run_workers(o.concurrency, |w| {
        let (queue, done, instance) = (queue.clone(), done.clone(), o.instance.clone());
        let mut cas = ctx.conns[w].cas.clone();
        async move {
            while Instant::now() < deadline {
                let Some(b) = queue.lock().unwrap().pop_front() else {
                    break;
                };
                let n = batch_update(&mut cas, &instance, b).await?;
                done.fetch_add(n as u64, Ordering::Relaxed);
            }
            Ok(())
        }
    })
    .await?;
    let measured = m.finish();
    let n = done.load(Ordering::Relaxed);
    let mut j = measured.json("", n, n * o.small_size, "blobs");
    j.int("blob_size", o.small_size)
        .int("blobs_per_request", per_batch as u64)
        .int("batch_limit", ctx.batch_limit)
        .int("already_stored", o.already_stored as u64);
    Ok(j)
}

async fn batch_read_scenario(ctx: &Ctx) -> Result<Json> {
    let o = &ctx.opts;
    let pool_n = o.count.min(o.read_pool).max(1);
    log(format!(
        "setup: uploading {pool_n} blobs of {} bytes",
        o.small_size
    ));
    let pool = small_pool(ctx.seed, KIND_SMALL, pool_n, o.small_size).await?;
    upload_small(ctx, pool.clone()).await?;
    let index: Arc<HashMap<String, usize>> = Arc::new(
        pool.iter()
            .enumerate()
            .map(|(i, (d, _))| (d.hash.clone(), i))
            .collect(),
    );
    let digests: Vec<reapi::Digest> = pool.iter().map(|(d, _)| d.clone()).collect();
    let batches = Arc::new(group_by_size(
        digests,
        |d| d.size_bytes as u64,
        ctx.batch_limit,
    ));
    let per_batch = batches[0].len();
    let pool = Arc::new(pool);
    // Enough batches to read `count` blobs, cycling over the pool.
    let total_batches = o.count.div_ceil(per_batch);
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let deadline = ctx.deadline();
    let m = Measure::start(&o.server_pid);
    run_workers(o.concurrency, |w| {
        let (batches, next, done, bytes) =
            (batches.clone(), next.clone(), done.clone(), bytes.clone());
        let (pool, index, instance) = (pool.clone(), index.clone(), o.instance.clone());
        let mut cas = ctx.conns[w].cas.clone();
        async move {
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total_batches {
                    break;
                }
                let b = batches[i % batches.len()].clone();
                let (n, got) = batch_read(&mut cas, &instance, b, |d, data| {
                    let k = index
                        .get(&d.hash)
                        .ok_or_else(|| anyhow!("unknown digest {}", d.hash))?;
                    ensure!(
                        pool[*k].1 == data,
                        "BatchReadBlobs {}: wrong content",
                        d.hash
                    );
                    Ok(())
                })
                .await?;
                done.fetch_add(n as u64, Ordering::Relaxed);
                bytes.fetch_add(got, Ordering::Relaxed);
            }
            Ok(())
        }
    })
    .await?;
    let measured = m.finish();
    let mut j = measured.json(
        "",
        done.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed),
        "blobs",
    );
    j.int("blob_size", o.small_size)
        .int("blobs_per_request", per_batch as u64)
        .int("batch_limit", ctx.batch_limit)
        .int("pool", pool_n as u64);
    Ok(j)
}

async fn find_missing_scenario(ctx: &Ctx) -> Result<Json> {
    let o = &ctx.opts;
    let per = o.digests_per_request.max(1);
    let absent = ((per as f64) * o.missing_percent / 100.0).round() as usize;
    let present = per.saturating_sub(absent);
    log(format!("setup: uploading {present} blobs of 100 bytes"));
    let pool = small_pool(ctx.seed, KIND_FMB, present, 100).await?;
    upload_small(ctx, pool.clone()).await?;
    let mut digests: Vec<reapi::Digest> = pool.into_iter().map(|(d, _)| d).collect();
    let missing: Vec<reapi::Digest> = (0..absent as u64)
        .map(|i| digest_of(&generate(stream_id(ctx.seed, KIND_FMB, 1 << 40 | i), 100)))
        .collect();
    digests.extend(missing.iter().cloned());
    // Interleave present and absent digests.
    let mut order: Vec<(u64, reapi::Digest)> = digests
        .into_iter()
        .enumerate()
        .map(|(i, d)| (splitmix(i as u64 ^ ctx.seed), d))
        .collect();
    order.sort_by_key(|(k, _)| *k);
    let request: Arc<Vec<reapi::Digest>> = Arc::new(order.into_iter().map(|(_, d)| d).collect());
    let expect_missing: Arc<HashSet<String>> =
        Arc::new(missing.into_iter().map(|d| d.hash).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let deadline = ctx.deadline();
    let total = o.requests;
    let m = Measure::start(&o.server_pid);
    run_workers(o.concurrency, |w| {
        let (request, expect_missing, next, done) = (
            request.clone(),
            expect_missing.clone(),
            next.clone(),
            done.clone(),
        );
        let instance = o.instance.clone();
        let mut cas = ctx.conns[w].cas.clone();
        async move {
            while Instant::now() < deadline && next.fetch_add(1, Ordering::Relaxed) < total {
                let got = find_missing(&mut cas, &instance, request.to_vec()).await?;
                let got: HashSet<String> = got.into_iter().map(|d| d.hash).collect();
                ensure!(
                    got == *expect_missing,
                    "FindMissingBlobs reported {} missing, expected {}",
                    got.len(),
                    expect_missing.len()
                );
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }
    })
    .await?;
    let measured = m.finish();
    let reqs = done.load(Ordering::Relaxed);
    let mut j = measured.json("", reqs * per as u64, 0, "digests");
    j.int("requests", reqs)
        .int("digests_per_request", per as u64)
        .int("absent_per_request", absent as u64);
    Ok(j)
}

async fn asset_roundtrip(ctx: &Ctx) -> Result<Json> {
    let o = &ctx.opts;
    let pool = small_pool(ctx.seed, KIND_ASSET, o.concurrency, 1024).await?;
    upload_small(ctx, pool.clone()).await?;
    let pool = Arc::new(pool);
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let deadline = ctx.deadline();
    let total = o.ops;
    let seed = ctx.seed;
    let m = Measure::start(&o.server_pid);
    run_workers(o.concurrency, |w| {
        let (pool, next, done, instance) =
            (pool.clone(), next.clone(), done.clone(), o.instance.clone());
        let mut fetch = ctx.conns[w].fetch.clone();
        let mut push = ctx.conns[w].push.clone();
        async move {
            let digest = pool[w].0.clone();
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let uri = format!("urn:fdc:loadgen.example:2026:asset:{seed:016x}/{i}");
                push.push_blob(ra::PushBlobRequest {
                    instance_name: instance.clone(),
                    uris: vec![uri.clone()],
                    blob_digest: Some(digest.clone()),
                    ..Default::default()
                })
                .await
                .with_context(|| format!("PushBlob {uri}"))?;
                let got = fetch
                    .fetch_blob(ra::FetchBlobRequest {
                        instance_name: instance.clone(),
                        uris: vec![uri.clone()],
                        ..Default::default()
                    })
                    .await
                    .with_context(|| format!("FetchBlob {uri}"))?
                    .into_inner();
                check_status(&got.status, &format!("FetchBlob {uri}"))?;
                ensure!(
                    got.blob_digest.as_ref() == Some(&digest),
                    "FetchBlob {uri}: wrong digest {:?}",
                    got.blob_digest
                );
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }
    })
    .await?;
    let measured = m.finish();
    Ok(measured.json("", done.load(Ordering::Relaxed), 0, "roundtrips"))
}

/// The parts of buildstream.v2.Artifact that a pull needs (see BuildStream's
/// `buildstream/_protos/buildstream/v2/artifact.proto`).
#[derive(Clone, PartialEq, prost::Message)]
struct Artifact {
    #[prost(int32, tag = "1")]
    version: i32,
    #[prost(bool, tag = "2")]
    build_success: bool,
    #[prost(string, tag = "5")]
    strong_key: String,
    #[prost(string, tag = "6")]
    weak_key: String,
    #[prost(message, optional, tag = "8")]
    files: Option<reapi::Digest>,
    #[prost(message, optional, tag = "14")]
    low_diversity_meta: Option<reapi::Digest>,
    #[prost(message, optional, tag = "15")]
    high_diversity_meta: Option<reapi::Digest>,
    #[prost(string, tag = "16")]
    strict_key: String,
}

/// One worker's artifact: every blob by hash, and the names a client needs.
struct ArtifactSet {
    blobs: HashMap<String, Vec<u8>>,
    artifact: reapi::Digest,
    meta: Vec<reapi::Digest>,
    root: reapi::Digest,
    uri: String,
    files: usize,
    file_bytes: u64,
    dirs: usize,
}

impl ArtifactSet {
    fn digests(&self) -> Vec<reapi::Digest> {
        self.blobs
            .iter()
            .map(|(h, v)| reapi::Digest {
                hash: h.clone(),
                size_bytes: v.len() as i64,
            })
            .collect()
    }
    fn total_bytes(&self) -> u64 {
        self.blobs.values().map(|v| v.len() as u64).sum()
    }
}

fn build_artifact(o: &Opts, seed: u64, worker: usize) -> ArtifactSet {
    let mut blobs = HashMap::new();
    let mut add = |data: Vec<u8>| -> reapi::Digest {
        let d = digest_of(&data);
        blobs.insert(d.hash.clone(), data);
        d
    };
    let base = (worker as u64) << 32;
    let mut files = Vec::new();
    let mut file_bytes = 0u64;
    let (lo, hi) = (64f64.ln(), (o.max_file_size.max(65) as f64).ln());
    for i in 0..o.files + o.big_files {
        let id = stream_id(seed, KIND_ARTIFACT, base | i as u64);
        let size = if i < o.files {
            let u = (splitmix(id) >> 11) as f64 / (1u64 << 53) as f64;
            (lo + u * (hi - lo)).exp() as u64
        } else {
            o.big_file_size
        };
        let d = add(generate(id, size as usize));
        file_bytes += size;
        files.push(reapi::FileNode {
            name: format!("file{i:06}"),
            digest: Some(d),
            is_executable: i % 7 == 0,
            ..Default::default()
        });
    }
    // Leaf directories of up to 64 files, then parents of up to 16 directories each.
    let mut dirs = 0;
    let mut level: Vec<reapi::DirectoryNode> = files
        .chunks(64)
        .enumerate()
        .map(|(i, chunk)| {
            dirs += 1;
            let dir = reapi::Directory {
                files: chunk.to_vec(),
                ..Default::default()
            };
            reapi::DirectoryNode {
                name: format!("d{i:05}"),
                digest: Some(add(dir.encode_to_vec())),
            }
        })
        .collect();
    while level.len() > 1 {
        level = level
            .chunks(16)
            .enumerate()
            .map(|(i, chunk)| {
                dirs += 1;
                let dir = reapi::Directory {
                    directories: chunk.to_vec(),
                    ..Default::default()
                };
                reapi::DirectoryNode {
                    name: format!("d{i:05}"),
                    digest: Some(add(dir.encode_to_vec())),
                }
            })
            .collect();
    }
    let root = level
        .pop()
        .and_then(|n| n.digest)
        .unwrap_or_else(|| add(reapi::Directory::default().encode_to_vec()));
    let key = hex::encode(Sha256::digest(format!("{seed}-{worker}")));
    let low = add(format!("low diversity meta {key}").into_bytes());
    let high = add(format!("high diversity meta {key}").into_bytes());
    let artifact = add(Artifact {
        version: 1,
        build_success: true,
        strong_key: key.clone(),
        weak_key: key.clone(),
        files: Some(root.clone()),
        low_diversity_meta: Some(low.clone()),
        high_diversity_meta: Some(high.clone()),
        strict_key: key.clone(),
    }
    .encode_to_vec());
    ArtifactSet {
        blobs,
        artifact,
        meta: vec![low, high],
        root,
        uri: format!("urn:fdc:buildstream.build:2020:artifact:loadgen/element-{worker}/{key}"),
        files: o.files + o.big_files,
        file_bytes,
        dirs,
    }
}

async fn push_artifact(
    conn: &mut Conn,
    ctx_prefix: &str,
    instance: &str,
    limit: u64,
    a: &ArtifactSet,
    chunk: usize,
) -> Result<()> {
    let mut missing = Vec::new();
    for part in a.digests().chunks(10_000) {
        missing.extend(find_missing(&mut conn.cas, instance, part.to_vec()).await?);
    }
    let (big, small): (Vec<_>, Vec<_>) = missing
        .into_iter()
        .partition(|d| d.size_bytes as u64 > limit);
    for group in group_by_size(small, |d| d.size_bytes as u64, limit) {
        let blobs = group
            .into_iter()
            .map(|d| {
                let data = a.blobs[&d.hash].clone();
                (d, data)
            })
            .collect();
        batch_update(&mut conn.cas, instance, blobs).await?;
    }
    for d in big {
        write_bytes(&mut conn.bs, ctx_prefix, &a.blobs[&d.hash], chunk).await?;
    }
    let uris = vec![a.uri.clone()];
    match conn
        .fetch
        .fetch_blob(ra::FetchBlobRequest {
            instance_name: instance.to_owned(),
            uris: uris.clone(),
            ..Default::default()
        })
        .await
    {
        Err(s) if s.code() == Code::NotFound => {}
        Ok(r) => {
            let r = r.into_inner();
            ensure!(
                r.blob_digest.as_ref() == Some(&a.artifact),
                "FetchBlob {}: another artifact is already stored there",
                a.uri
            );
            return Ok(());
        }
        Err(s) => return Err(anyhow!("FetchBlob {}: {s}", a.uri)),
    }
    conn.push
        .push_blob(ra::PushBlobRequest {
            instance_name: instance.to_owned(),
            uris,
            blob_digest: Some(a.artifact.clone()),
            references_directories: vec![a.root.clone()],
            references_blobs: a.meta.clone(),
            ..Default::default()
        })
        .await
        .with_context(|| format!("PushBlob {}", a.uri))?;
    Ok(())
}

/// Pulls an artifact as buildbox-casd does for `bst artifact pull` (protocol doc §6.2)
/// and checks every blob. Returns (blobs, bytes) received.
async fn pull_artifact(
    conn: &mut Conn,
    prefix: &str,
    instance: &str,
    limit: u64,
    a: &ArtifactSet,
) -> Result<(u64, u64)> {
    let (mut blobs, mut bytes) = (0u64, 0u64);
    let check = |d: &reapi::Digest, data: &[u8]| -> Result<()> {
        let want = a
            .blobs
            .get(&d.hash)
            .ok_or_else(|| anyhow!("received unknown blob {}", d.hash))?;
        ensure!(want == data, "blob {} has wrong content", d.hash);
        Ok(())
    };
    let got = conn
        .fetch
        .fetch_blob(ra::FetchBlobRequest {
            instance_name: instance.to_owned(),
            uris: vec![a.uri.clone()],
            ..Default::default()
        })
        .await
        .with_context(|| format!("FetchBlob {}", a.uri))?
        .into_inner();
    let artifact_digest = got
        .blob_digest
        .ok_or_else(|| anyhow!("FetchBlob {}: no digest", a.uri))?;
    ensure!(
        artifact_digest == a.artifact,
        "FetchBlob {}: wrong digest",
        a.uri
    );
    let mut artifact_bytes = Vec::new();
    let (n, b) = batch_read(&mut conn.cas, instance, vec![artifact_digest], |d, data| {
        check(d, data)?;
        artifact_bytes = data.to_vec();
        Ok(())
    })
    .await?;
    blobs += n as u64;
    bytes += b;
    let artifact = Artifact::decode(artifact_bytes.as_slice()).context("decoding the Artifact")?;
    let root = artifact
        .files
        .ok_or_else(|| anyhow!("the Artifact has no files tree"))?;
    // The root Directory by ByteStream (casd's FetchTree does that even for tiny ones).
    let mut root_bytes = Vec::new();
    bytes += read_stream(&mut conn.reads, prefix, &root, |_, data| {
        root_bytes.extend_from_slice(data);
        Ok(())
    })
    .await?;
    blobs += 1;
    check(&root, &root_bytes)?;
    let mut level = vec![reapi::Directory::decode(root_bytes.as_slice()).context("decoding root")?];
    let mut file_digests: Vec<reapi::Digest> = Vec::new();
    let mut seen = HashSet::new();
    while !level.is_empty() {
        let mut subdirs = Vec::new();
        for dir in &level {
            for f in &dir.files {
                let d = f
                    .digest
                    .clone()
                    .ok_or_else(|| anyhow!("file without digest"))?;
                if seen.insert(d.hash.clone()) {
                    file_digests.push(d);
                }
            }
            for s in &dir.directories {
                let d = s
                    .digest
                    .clone()
                    .ok_or_else(|| anyhow!("dir without digest"))?;
                if seen.insert(d.hash.clone()) {
                    subdirs.push(d);
                }
            }
        }
        let mut next = Vec::new();
        for group in group_by_size(subdirs, |d| d.size_bytes as u64, limit) {
            let (n, b) = batch_read(&mut conn.cas, instance, group, |d, data| {
                check(d, data)?;
                next.push(reapi::Directory::decode(data).context("decoding a Directory")?);
                Ok(())
            })
            .await?;
            blobs += n as u64;
            bytes += b;
        }
        level = next;
    }
    let (big, small): (Vec<_>, Vec<_>) = file_digests
        .into_iter()
        .partition(|d| d.size_bytes as u64 > limit);
    for group in group_by_size(small, |d| d.size_bytes as u64, limit) {
        let (n, b) = batch_read(&mut conn.cas, instance, group, check).await?;
        blobs += n as u64;
        bytes += b;
    }
    for d in big {
        let want = &a.blobs[&d.hash];
        bytes += read_stream(&mut conn.reads, prefix, &d, |off, data| {
            ensure!(
                want[off as usize..off as usize + data.len()] == *data,
                "blob {} differs at offset {off}",
                d.hash
            );
            Ok(())
        })
        .await?;
        blobs += 1;
    }
    let meta: Vec<reapi::Digest> = [artifact.low_diversity_meta, artifact.high_diversity_meta]
        .into_iter()
        .flatten()
        .collect();
    let (n, b) = batch_read(&mut conn.cas, instance, meta, check).await?;
    blobs += n as u64;
    bytes += b;
    Ok((blobs, bytes))
}

async fn artifact_scenario(ctx: &Ctx) -> Result<Json> {
    let o = &ctx.opts;
    log(format!(
        "generating {} artifacts of {} files",
        o.concurrency,
        o.files + o.big_files
    ));
    let sets: Vec<Arc<ArtifactSet>> = {
        let mut v = Vec::new();
        for w in 0..o.concurrency {
            let (opts, seed) = (o.clone(), ctx.seed);
            v.push(Arc::new(
                tokio::task::spawn_blocking(move || build_artifact(&opts, seed, w)).await?,
            ));
        }
        v
    };
    let limit = ctx.batch_limit;
    let chunk = o.chunk as usize;
    let prefix = ctx.prefix();
    let m = Measure::start(&o.server_pid);
    run_workers(o.concurrency, |w| {
        let (a, prefix, instance) = (sets[w].clone(), prefix.clone(), o.instance.clone());
        let mut conn = ctx.conns[w].clone();
        async move { push_artifact(&mut conn, &prefix, &instance, limit, &a, chunk).await }
    })
    .await?;
    let push = m.finish();
    let m = Measure::start(&o.server_pid);
    let pulled = run_workers(o.concurrency, |w| {
        let (a, prefix, instance) = (sets[w].clone(), prefix.clone(), o.instance.clone());
        let mut conn = ctx.conns[w].clone();
        async move { pull_artifact(&mut conn, &prefix, &instance, limit, &a).await }
    })
    .await?;
    let pull = m.finish();
    let files: u64 = sets.iter().map(|a| a.files as u64).sum();
    let bytes: u64 = sets.iter().map(|a| a.total_bytes()).sum();
    let blobs: u64 = sets.iter().map(|a| a.blobs.len() as u64).sum();
    let (pulled_blobs, pulled_bytes) = pulled.iter().fold((0, 0), |(a, b), (x, y)| (a + x, b + y));
    ensure!(
        pulled_blobs == blobs && pulled_bytes == bytes,
        "pulled {pulled_blobs} blobs / {pulled_bytes} bytes, pushed {blobs} / {bytes}"
    );
    let mut j = Json::default();
    j.int("files_per_artifact", sets[0].files as u64)
        .int("dirs_per_artifact", sets[0].dirs as u64)
        .int("file_bytes_per_artifact", sets[0].file_bytes)
        .int("blobs", blobs)
        .int("bytes", bytes)
        .int("batch_limit", limit)
        .extend(push.json("push_", files, bytes, "files"))
        .extend(pull.json("pull_", files, bytes, "files"));
    Ok(j)
}

fn sha256_scenario(o: &Opts) -> Json {
    let buf = generate(0x5eed, 1 << 20);
    let mut h = Sha256::new();
    let start = Instant::now();
    let mut done = 0u64;
    while done < o.sha_bytes {
        h.update(&buf);
        done += buf.len() as u64;
    }
    let hash = h.finalize();
    let secs = start.elapsed().as_secs_f64();
    std::hint::black_box(hash);
    let mut j = Json::default();
    j.num("seconds", secs)
        .int("bytes", done)
        .num("mb_per_s", done as f64 / secs / 1e6);
    j
}

/// Writes --rounds new files of --blob-size, keeping them all until the end (as a store
/// keeps its blobs, so the page cache must keep finding new pages), then removes them.
fn disk_write_scenario(o: &Opts) -> Result<Json> {
    use std::io::Write as _;
    let mut buf = vec![0u8; o.chunk.max(8) as usize];
    let paths: Vec<PathBuf> = (0..o.rounds.max(1))
        .map(|r| {
            o.scratch_dir
                .join(format!(".loadgen-disk-write-{}-{r}", std::process::id()))
        })
        .collect();
    let start = Instant::now();
    let result = (|| -> Result<u64> {
        let mut total = 0u64;
        for (r, path) in paths.iter().enumerate() {
            let mut f = std::fs::File::create(path)
                .with_context(|| format!("creating {}", path.display()))?;
            let mut off = 0u64;
            while off < o.blob_size {
                let n = (o.blob_size - off).min(buf.len() as u64) as usize;
                fill(0xd15c ^ r as u64, off, &mut buf[..n]);
                f.write_all(&buf[..n])?;
                off += n as u64;
            }
            total += o.blob_size;
        }
        Ok(total)
    })();
    let secs = start.elapsed().as_secs_f64();
    for p in &paths {
        let _ = std::fs::remove_file(p);
    }
    let total = result?;
    let mut j = Json::default();
    j.num("seconds", secs)
        .int("bytes", total)
        .num("mb_per_s", total as f64 / secs / 1e6)
        .str("dir", &o.scratch_dir.display().to_string());
    Ok(j)
}

// ---------------------------------------------------------------------------------------
// Start-up on a large repository
// ---------------------------------------------------------------------------------------

/// Object `i` of the start-up repository: 100 to 200 unique bytes.
fn startup_object(i: u64) -> Vec<u8> {
    let len = 100 + (splitmix(i) % 101) as usize;
    let mut v = format!("bst-artifact-server start-up benchmark object {i}\n").into_bytes();
    v.resize(len, b'.');
    v
}

fn object_path(objects: &Path, hash: &str) -> PathBuf {
    objects.join(&hash[..2]).join(&hash[2..])
}

/// Makes sure objects 0..n exist in REPO/cas/objects; returns (created, total bytes).
fn populate(repo: &Path, n: u64) -> Result<(u64, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    let objects = repo.join("cas/objects");
    for b in 0..=255u8 {
        std::fs::create_dir_all(objects.join(format!("{b:02x}")))?;
    }
    let threads = std::thread::available_parallelism().map_or(2, |p| p.get()) as u64 * 2;
    let created = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    let failed = Mutex::new(None);
    let progress = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (objects, created, bytes, failed, progress) =
                (&objects, &created, &bytes, &failed, &progress);
            s.spawn(move || {
                let mut i = t;
                while i < n {
                    let data = startup_object(i);
                    bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                    let hash = hex::encode(Sha256::digest(&data));
                    let path = object_path(objects, &hash);
                    if std::fs::symlink_metadata(&path).is_err() {
                        let r = std::fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .mode(0o444)
                            .open(&path)
                            .and_then(|mut f| std::io::Write::write_all(&mut f, &data));
                        match r {
                            Ok(()) => {
                                created.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                            Err(e) => {
                                *failed.lock().unwrap() = Some(format!("{}: {e}", path.display()));
                                return;
                            }
                        }
                    }
                    let p = progress.fetch_add(1, Ordering::Relaxed) + 1;
                    if p % 200_000 == 0 {
                        log(format!("populate: {p}/{n} objects checked"));
                    }
                    i += threads;
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap() {
        bail!("creating objects: {e}");
    }
    Ok((created.into_inner(), bytes.into_inner()))
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn field(line: &str, key: &str) -> Option<u64> {
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Waits (bounded) for a log line containing `needle`; returns it (ANSI stripped) and
/// when it was first seen.
fn wait_for_log(log_path: &Path, needle: &str, child: &mut Child) -> Result<(String, Instant)> {
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        let text = std::fs::read_to_string(log_path).unwrap_or_default();
        if let Some(line) = text.lines().map(strip_ansi).find(|l| l.contains(needle)) {
            return Ok((line, Instant::now()));
        }
        if let Some(st) = child.try_wait()? {
            bail!(
                "server exited ({st}) before logging {needle:?}; see {}",
                log_path.display()
            );
        }
        ensure!(
            Instant::now() < deadline,
            "no {needle:?} in {} after {WAIT_LIMIT:?}",
            log_path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct Spawned {
    child: Child,
    port_file: PathBuf,
    log_path: PathBuf,
}

impl Spawned {
    fn pid(&self) -> u32 {
        self.child.id()
    }
    fn stop(mut self) -> Result<()> {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        bail!("the server did not stop within 30 s of SIGTERM")
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.port_file);
    }
}

fn spawn_server(bin: &Path, repo: &Path, extra: &[String], tag: &str) -> Result<Spawned> {
    let dir = repo
        .parent()
        .ok_or_else(|| anyhow!("--repo has no parent directory"))?;
    let name = repo.file_name().and_then(|n| n.to_str()).unwrap_or("repo");
    let port_file = dir.join(format!("{name}.{tag}.port"));
    let log_path = dir.join(format!("{name}.{tag}.log"));
    let _ = std::fs::remove_file(&port_file);
    let log_file = std::fs::File::create(&log_path)?;
    let child = Command::new(bin)
        .args([
            "serve",
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--log-level",
            "info",
        ])
        .arg("--port-file")
        .arg(&port_file)
        .args(extra)
        .arg(repo)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(Spawned {
        child,
        port_file,
        log_path,
    })
}

fn startup_digests(n: u64, count: usize, salt: u64) -> Vec<reapi::Digest> {
    (0..count as u64)
        .map(|k| digest_of(&startup_object(splitmix(k ^ salt) % n)))
        .collect()
}

async fn startup_scenario(o: &Opts) -> Result<Json> {
    let repo = o
        .repo
        .clone()
        .ok_or_else(|| anyhow!("--scenario startup needs --repo DIR"))?;
    let bin = match &o.server_bin {
        Some(b) => b.clone(),
        None => {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("target"));
            target.join("release/bst-artifact-server")
        }
    };
    ensure!(
        bin.is_file(),
        "no server binary at {} (build it with cargo build --release, or pass --server-bin)",
        bin.display()
    );
    ensure!(o.objects > 0, "--objects must be positive");
    std::fs::create_dir_all(&repo)?;
    let repo = repo.canonicalize()?;
    let n = o.objects;
    log(format!(
        "populate: making sure {} holds objects 0..{n}",
        repo.display()
    ));
    let t = Instant::now();
    let (objects, created, expected_bytes) = {
        let repo = repo.clone();
        let (created, bytes) = tokio::task::spawn_blocking(move || populate(&repo, n)).await??;
        (n, created, bytes)
    };
    let populate_s = t.elapsed().as_secs_f64();
    log(format!(
        "populate: created {created} objects in {populate_s:.1} s"
    ));
    if o.drop_caches {
        // SAFETY: sync(2) has no preconditions.
        unsafe { libc::sync() };
        std::fs::write("/proc/sys/vm/drop_caches", "3\n")
            .context("dropping the page cache (needs root)")?;
    }

    // Phase 1: start, first answers, the background scan, FindMissingBlobs rate.
    let t0 = Instant::now();
    let mut server = spawn_server(&bin, &repo, &["--quota".into(), "0".into()], "startup")?;
    let pid = server.pid();
    let port = loop {
        if let Some(p) = std::fs::read_to_string(&server.port_file)
            .ok()
            .and_then(|s| s.trim().parse::<u16>().ok())
        {
            break p;
        }
        if let Some(st) = server.child.try_wait()? {
            bail!("server exited ({st}); see {}", server.log_path.display());
        }
        ensure!(t0.elapsed() < WAIT_LIMIT, "the server wrote no port file");
        std::thread::sleep(Duration::from_micros(500));
    };
    let t_port = t0.elapsed().as_secs_f64();
    let mut opts = o.clone();
    opts.target = Some(format!("http://127.0.0.1:{port}"));
    opts.tls_ca = None;
    let conn = loop {
        if let Ok(mut c) = connect(&opts).await {
            if c.caps
                .get_capabilities(reapi::GetCapabilitiesRequest::default())
                .await
                .is_ok()
            {
                break c;
            }
        }
        ensure!(t0.elapsed() < WAIT_LIMIT, "GetCapabilities never succeeded");
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let t_caps = t0.elapsed().as_secs_f64();
    let probe = startup_digests(n, 1, 0xfeed);
    let mut cas = conn.cas.clone();
    loop {
        match find_missing(&mut cas, "", probe.clone()).await {
            Ok(m) if m.is_empty() => break,
            Ok(_) => bail!("FindMissingBlobs says a stored object is missing"),
            Err(_) => {
                ensure!(
                    t0.elapsed() < WAIT_LIMIT,
                    "FindMissingBlobs never succeeded"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    let t_fmb = t0.elapsed().as_secs_f64();
    let rss_start = status_kb(pid, "VmRSS");
    let hwm_start = status_kb(pid, "VmHWM");
    let (line, seen) = wait_for_log(
        &server.log_path,
        "measured the object store",
        &mut server.child,
    )?;
    let t_scan_seen = seen.duration_since(t0).as_secs_f64();
    let scan_objects = field(&line, "objects");
    let scan_bytes = field(&line, "bytes");
    let scan_ms = field(&line, "elapsed_ms");
    let rss_scan = status_kb(pid, "VmRSS");
    let hwm_scan = status_kb(pid, "VmHWM");
    log(format!("start-up: port {t_port:.3} s, GetCapabilities {t_caps:.3} s, FindMissingBlobs {t_fmb:.3} s, scan done at {t_scan_seen:.2} s ({line})"));

    // FindMissingBlobs rate over present digests spread across the whole repository.
    let per = o.digests_per_request.max(1);
    let requests: Arc<Vec<Vec<reapi::Digest>>> = Arc::new(
        tokio::task::spawn_blocking(move || {
            (0..8u64)
                .map(|r| startup_digests(n, per, r * 7919 + 1))
                .collect()
        })
        .await?,
    );
    let mut conns = Vec::new();
    for _ in 0..o.concurrency {
        conns.push(connect(&opts).await?);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(o.duration);
    let total = o.requests;
    let m = Measure::start(&[pid]);
    run_workers(o.concurrency, |w| {
        let (requests, next, done) = (requests.clone(), next.clone(), done.clone());
        let mut cas = conns[w].cas.clone();
        async move {
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let req = requests[i % requests.len()].clone();
                let missing = find_missing(&mut cas, "", req).await?;
                ensure!(
                    missing.is_empty(),
                    "{} stored objects reported missing",
                    missing.len()
                );
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }
    })
    .await?;
    let fmb = m.finish();
    drop(conns);
    drop(conn);
    server.stop()?;

    let mut j = Json::default();
    j.int("objects", objects)
        .int("objects_created", created)
        .num("populate_s", populate_s)
        .bool_("cold_cache", o.drop_caches)
        .num("port_file_s", t_port)
        .num("first_get_capabilities_s", t_caps)
        .num("first_find_missing_s", t_fmb)
        .opt_int("rss_after_start_kb", rss_start)
        .opt_int("hwm_after_start_kb", hwm_start)
        .opt_int("scan_objects", scan_objects)
        .opt_int("scan_bytes", scan_bytes)
        .opt_int("scan_ms", scan_ms)
        .num("scan_done_s", t_scan_seen)
        .opt_int("rss_after_scan_kb", rss_scan)
        .opt_int("hwm_after_scan_kb", hwm_scan)
        .extend(fmb.json(
            "fmb_",
            done.load(Ordering::Relaxed) * per as u64,
            0,
            "digests",
        ));

    // Phase 2: restart over quota and time the eviction the server does on its own.
    if o.evict_fraction > 0.0 {
        let usage = scan_bytes.unwrap_or(expected_bytes);
        let quota = (usage as f64 * 0.95) as u64;
        let low = (usage as f64 * (1.0 - o.evict_fraction.min(1.0))) as u64;
        let t0 = Instant::now();
        let mut server = spawn_server(
            &bin,
            &repo,
            &[
                "--quota".into(),
                quota.to_string(),
                "--quota-low".into(),
                low.to_string(),
            ],
            "evict",
        )?;
        let pid = server.pid();
        let m = Measure::start(&[pid]);
        let (line, seen) = wait_for_log(
            &server.log_path,
            "evicted least recently used objects",
            &mut server.child,
        )?;
        let ev = m.finish();
        log(format!("eviction: {line}"));
        let freed_objects = field(&line, "freed_objects").unwrap_or(0);
        let freed_bytes = field(&line, "freed_bytes").unwrap_or(0);
        let evict_ms = field(&line, "elapsed_ms");
        let secs = evict_ms.map(|ms| ms as f64 / 1000.0);
        j.int("evict_quota", quota)
            .int("evict_quota_low", low)
            .int("evict_freed_objects", freed_objects)
            .int("evict_freed_bytes", freed_bytes)
            .opt_num("evict_s", secs)
            .num(
                "evict_done_after_start_s",
                seen.duration_since(t0).as_secs_f64(),
            )
            .opt_num(
                "evict_objects_per_s",
                secs.map(|s| freed_objects as f64 / s),
            )
            .opt_num("evict_mb_per_s", secs.map(|s| freed_bytes as f64 / s / 1e6))
            .opt_num("evict_server_cpu_s", ev.server_cpu)
            .opt_int("evict_server_hwm_kb", status_kb(pid, "VmHWM"));
        server.stop()?;
    }
    Ok(j)
}

impl Json {
    fn bool_(&mut self, k: &str, v: bool) -> &mut Self {
        self.0.push((k.to_owned(), v.to_string()));
        self
    }
}

// ---------------------------------------------------------------------------------------

async fn run(opts: Opts) -> Result<()> {
    let needs_target = opts.scenario.iter().any(|s| s.needs_target());
    let mut ctx = None;
    if needs_target {
        let n = opts.concurrency.max(1);
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            conns.push(connect(&opts).await?);
        }
        let advertised = match conns[0]
            .caps
            .clone()
            .get_capabilities(reapi::GetCapabilitiesRequest {
                instance_name: opts.instance.clone(),
            })
            .await
        {
            Ok(r) => r
                .into_inner()
                .cache_capabilities
                .map_or(0, |c| c.max_batch_total_size_bytes.max(0) as u64),
            Err(s) if s.code() == Code::Unimplemented => 0,
            Err(s) => bail!("GetCapabilities: {s}"),
        };
        let server_limit = if advertised > 0 {
            advertised
        } else {
            DEFAULT_BATCH_LIMIT
        };
        let seed = splitmix(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
                ^ (std::process::id() as u64) << 32,
        );
        ctx = Some(Ctx {
            batch_limit: opts.batch_bytes.min(server_limit).max(1),
            advertised_batch: advertised,
            conns,
            seed,
            opts: opts.clone(),
        });
    }
    for &s in &opts.scenario {
        log(format!("scenario {}", s.name()));
        let result = match (s, &ctx) {
            (Scenario::Sha256, _) => sha256_scenario(&opts),
            (Scenario::DiskWrite, _) => disk_write_scenario(&opts)?,
            (Scenario::Startup, _) => startup_scenario(&opts).await?,
            (_, None) => bail!("--target is required for {}", s.name()),
            (Scenario::BytestreamUpload, Some(c)) => bytestream_upload(c).await?,
            (Scenario::BytestreamDownload, Some(c)) => bytestream_download(c).await?,
            (Scenario::BatchUpdate, Some(c)) => batch_update_scenario(c).await?,
            (Scenario::BatchRead, Some(c)) => batch_read_scenario(c).await?,
            (Scenario::FindMissing, Some(c)) => find_missing_scenario(c).await?,
            (Scenario::AssetRoundtrip, Some(c)) => asset_roundtrip(c).await?,
            (Scenario::Artifact, Some(c)) => artifact_scenario(c).await?,
        };
        let mut j = Json::default();
        j.str("scenario", &s.name())
            .str("label", &opts.label)
            .str("target", opts.target.as_deref().unwrap_or(""))
            .bool_(
                "tls",
                opts.target
                    .as_deref()
                    .is_some_and(|t| t.starts_with("https://")),
            )
            .int("concurrency", opts.concurrency as u64);
        if let Some(c) = &ctx {
            j.int("advertised_batch_limit", c.advertised_batch);
        }
        j.extend(result);
        println!("{}", j.render());
    }
    Ok(())
}

/// The load generator allocates and frees a message-sized buffer per chunk. glibc gives
/// such memory back to the kernel and faults it in again (zeroed) for the next chunk,
/// which cost the client as much CPU as generating the data. Keeping freed memory makes
/// the client lighter for every server alike, so that more of the shared cores measure
/// the server.
fn keep_freed_memory() {
    // SAFETY: mallopt only sets allocator parameters; called before any other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() {
    // `cargo test --all-targets` runs bench binaries without `--bench`: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("loadgen: benchmarks run only under `cargo bench --bench loadgen -- ...`");
        return;
    }
    keep_freed_memory();
    let opts = Opts::parse();
    if opts.concurrency == 0 {
        eprintln!("loadgen: --concurrency must be at least 1");
        std::process::exit(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(opts)) {
        eprintln!("loadgen: FAILED: {e:#}");
        std::process::exit(1);
    }
}
