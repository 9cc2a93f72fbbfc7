//! The writer: one tokio task owns the file; handles feed it through a
//! bounded queue.
//!
//! A single owner makes `seq` and `prev` trivially consistent (no lock around
//! "hash the last line, then append") and turns fsync into group commit: while
//! one batch is being written and synced on the writer's I/O thread, the next
//! one piles up in the queue and goes out with one `write` and one
//! `sync_data`. That thread runs at the lowest CPU priority (nice 19): where
//! it competes for a CPU with the node's request path (a node on one core),
//! requests go first and each batch grows, so the log costs fewer syscalls
//! per entry under load (measured: 10-15 % more delegations per second at
//! max load on one core, BENCHMARKS.md); on an idle CPU it runs at once.
//! Producers pay a `try_send` (a few atomics); they only wait when the disk
//! is a whole queue (64k entries by default) behind, and then they wait
//! rather than lose entries — an audit log that silently drops is worse than
//! one that slows the data path. If a write fails (disk full, I/O error) the
//! task cuts the partial bytes back off, keeps the encoded lines and retries
//! every second without taking more from the queue, so producers feel the
//! backpressure instead of entries vanishing; `try_record` is the escape hatch
//! for callers that must never wait.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use crate::event::{DetailRef, Event, Recovery, KIND_CHECKPOINT, KIND_RECOVERY};
use crate::line::{
    encode_line, encode_line_json, line_hash, parse_line, Envelope, LineDigest, GENESIS_PREV,
    MAX_LINE,
};
use crate::seal::{line_context, seal_detail};
use crate::{AuditError, Sealer, Signer};

/// The log's file name inside the audit directory.
pub const LOG_FILE: &str = "audit.jsonl";

/// Most messages taken from the queue for one write.
const MAX_BATCH: usize = 4096;
/// Pause between retries after a failed write.
const RETRY: Duration = Duration::from_secs(1);
/// How soon the answer of a write that no other write followed is taken.
const REAP: Duration = Duration::from_secs(1);
/// How far back from the end `open` looks for the last line.
const TAIL_WINDOW: usize = 2 * MAX_LINE + 2;

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// When appended lines are forced to stable storage. See the crate docs for
/// what each one guarantees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// `sync_data` after every batch (group commit).
    #[default]
    Batch,
    /// `sync_data` at most once per interval (and at shutdown).
    Interval(Duration),
    /// Never explicitly, except once at clean shutdown.
    Never,
}

impl FromStr for FsyncPolicy {
    type Err = AuditError;

    /// `batch`, `interval:<ms>` (ms > 0) or `never`.
    fn from_str(s: &str) -> Result<Self, AuditError> {
        let bad = || {
            AuditError::Config(format!(
                "fsync policy `{s}` is not one of `batch`, `interval:<ms>` (e.g. `interval:10`) or `never`"
            ))
        };
        match s.trim() {
            "batch" => Ok(FsyncPolicy::Batch),
            "never" => Ok(FsyncPolicy::Never),
            other => {
                let ms: u64 = other
                    .strip_prefix("interval:")
                    .ok_or_else(bad)?
                    .trim()
                    .parse()
                    .map_err(|_| bad())?;
                if ms == 0 {
                    return Err(AuditError::Config(format!(
                        "fsync policy `{s}`: the interval must be at least 1 ms (use `batch` to sync every batch)"
                    )));
                }
                Ok(FsyncPolicy::Interval(Duration::from_millis(ms)))
            }
        }
    }
}

impl std::fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FsyncPolicy::Batch => f.write_str("batch"),
            FsyncPolicy::Interval(d) => write!(f, "interval:{}", d.as_millis()),
            FsyncPolicy::Never => f.write_str("never"),
        }
    }
}

/// Where and how the log is written.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Directory holding `audit.jsonl` (created if missing).
    pub dir: PathBuf,
    /// This node's name, written in every line and bound into checkpoints.
    pub node: String,
    pub fsync: FsyncPolicy,
    /// Write a checkpoint after this many entries...
    pub checkpoint_every: u64,
    /// ...or this long after the last one, if anything was appended since.
    pub checkpoint_interval: Duration,
    /// Queue capacity between producers and the writer.
    pub queue: usize,
    /// Group commit: after the first entry of a batch arrives, the writer
    /// waits up to this long for more before it writes and syncs, so that
    /// under load one `write` and one `sync_data` cover many entries (and
    /// when idle an entry is still on disk within this plus one sync).
    /// `Duration::ZERO` writes each arrival at once.
    pub linger: Duration,
    /// Seals the tenant payload of tenant events (see the crate docs);
    /// `None` writes everything in the clear.
    pub sealer: Option<Arc<dyn Sealer>>,
}

impl AuditConfig {
    /// Defaults: `batch` fsync, a checkpoint every 1000 entries or 10 s, a
    /// 65536-entry queue.
    pub fn new(dir: impl Into<PathBuf>, node: impl Into<String>) -> Self {
        AuditConfig {
            dir: dir.into(),
            node: node.into(),
            fsync: FsyncPolicy::Batch,
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(10),
            queue: 65536,
            linger: Duration::from_millis(5),
            sealer: None,
        }
    }

    fn validate(&self) -> Result<(), AuditError> {
        let mut errs = Vec::new();
        if self.node.is_empty() || self.node.contains('\n') {
            errs.push("node name must be non-empty and one line".to_string());
        }
        if self.checkpoint_every == 0 {
            errs.push("checkpoint_every must be at least 1".to_string());
        }
        if self.checkpoint_interval.is_zero() {
            errs.push("checkpoint_interval must be positive".to_string());
        }
        if self.queue == 0 {
            errs.push("queue must hold at least 1 entry".to_string());
        }
        if let FsyncPolicy::Interval(d) = self.fsync {
            if d.is_zero() {
                errs.push("fsync interval must be positive".to_string());
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(AuditError::Config(errs.join("; ")))
        }
    }
}

#[derive(Default)]
struct Counters {
    appended: AtomicU64,
    checkpoints: AtomicU64,
    queue_full_waits: AtomicU64,
    rejected: AtomicU64,
    lost: AtomicU64,
    bytes: AtomicU64,
    fsyncs: AtomicU64,
    last_fsync_micros: AtomicU64,
    write_errors: AtomicU64,
    checkpoint_failures: AtomicU64,
}

/// A snapshot of the writer's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditStats {
    /// Lines written to the file (events, checkpoints, recoveries).
    pub appended: u64,
    /// Checkpoint lines among them.
    pub checkpoints: u64,
    /// `record()` calls that found the queue full and waited.
    pub queue_full_waits: u64,
    /// Entries refused to the caller: `try_record` on a full queue, or any
    /// record after shutdown. The caller was told (false / `Err`).
    pub rejected: u64,
    /// Entries accepted but never written (disk failed until shutdown).
    pub lost: u64,
    /// Bytes appended.
    pub bytes: u64,
    pub fsyncs: u64,
    /// Duration of the most recent `sync_data`, in microseconds.
    pub last_fsync_micros: u64,
    pub write_errors: u64,
    /// Checkpoints that could not be signed (logged; the log goes on).
    pub checkpoint_failures: u64,
}

impl Counters {
    fn snapshot(&self) -> AuditStats {
        AuditStats {
            appended: self.appended.load(Relaxed),
            checkpoints: self.checkpoints.load(Relaxed),
            queue_full_waits: self.queue_full_waits.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            lost: self.lost.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            fsyncs: self.fsyncs.load(Relaxed),
            last_fsync_micros: self.last_fsync_micros.load(Relaxed),
            write_errors: self.write_errors.load(Relaxed),
            checkpoint_failures: self.checkpoint_failures.load(Relaxed),
        }
    }
}

// Flush is rare; boxing every event to shrink it would add an allocation
// per entry on the hot path.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Event { ts: u64, event: Event },
    Flush(oneshot::Sender<()>),
}

/// Records events. Cheap to clone; every clone feeds the same writer.
#[derive(Clone)]
pub struct AuditHandle {
    tx: mpsc::Sender<Msg>,
    counters: Arc<Counters>,
    /// Tells the writer to cut its linger short: the queue is full.
    full: Arc<Notify>,
}

impl std::fmt::Debug for AuditHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditHandle")
            .field("queued", &(self.tx.max_capacity() - self.tx.capacity()))
            .finish_non_exhaustive()
    }
}

impl AuditHandle {
    /// Queues `event`. Returns at once unless the queue is full, in which
    /// case it waits for room (counted in `queue_full_waits`). Fails only
    /// when the log is shut down.
    pub async fn record(&self, event: Event) -> Result<(), AuditError> {
        let msg = Msg::Event {
            ts: now_ms(),
            event,
        };
        match self.tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(msg)) => {
                self.counters.queue_full_waits.fetch_add(1, Relaxed);
                self.full.notify_one();
                self.tx.send(msg).await.map_err(|_| self.rejected())
            }
            Err(TrySendError::Closed(_)) => Err(self.rejected()),
        }
    }

    /// Queues `event` if there is room right now; never waits. `false` means
    /// it was not recorded (queue full or log shut down).
    pub fn try_record(&self, event: Event) -> bool {
        match self.tx.try_send(Msg::Event {
            ts: now_ms(),
            event,
        }) {
            Ok(()) => true,
            Err(e) => {
                if matches!(e, TrySendError::Full(_)) {
                    self.full.notify_one();
                }
                self.rejected();
                false
            }
        }
    }

    /// Queues `event` if there is room right now; never waits. A full queue
    /// hands the event back (so the caller can wait for room without having
    /// cloned it first); a shut-down log drops it and says `Ok`.
    // The event goes back by value on purpose (boxing it would allocate on
    // every call to save a move on the rare full-queue path).
    #[allow(clippy::result_large_err)]
    pub fn offer(&self, event: Event) -> Result<(), Event> {
        match self.tx.try_send(Msg::Event {
            ts: now_ms(),
            event,
        }) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(Msg::Event { event, .. })) => {
                self.full.notify_one();
                Err(event)
            }
            Err(_) => {
                self.rejected();
                Ok(())
            }
        }
    }

    /// Waits until everything queued before this call is written and synced
    /// to disk, whatever the fsync policy.
    pub async fn flush(&self) -> Result<(), AuditError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Flush(tx))
            .await
            .map_err(|_| AuditError::Closed)?;
        rx.await.map_err(|_| AuditError::Closed)
    }

    pub fn stats(&self) -> AuditStats {
        self.counters.snapshot()
    }

    fn rejected(&self) -> AuditError {
        self.counters.rejected.fetch_add(1, Relaxed);
        AuditError::Closed
    }
}

/// Owns the writer task. `shutdown().await` drains the queue, writes a final
/// checkpoint and syncs; dropping it asks for the same and lets the task
/// finish on its own (failures are logged).
pub struct AuditTask {
    stop: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<Result<(), AuditError>>>,
    counters: Arc<Counters>,
    path: PathBuf,
}

impl std::fmt::Debug for AuditTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditTask")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl AuditTask {
    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn stats(&self) -> AuditStats {
        self.counters.snapshot()
    }

    /// Stops taking entries, writes what is queued plus a final checkpoint,
    /// syncs, and returns the final counters.
    pub async fn shutdown(mut self) -> Result<AuditStats, AuditError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(join) = self.join.take() {
            join.await.map_err(|e| AuditError::Writer {
                path: self.path.clone(),
                reason: format!("the writer task ended abnormally: {e}"),
            })??;
        }
        Ok(self.counters.snapshot())
    }

    /// [`Self::shutdown`], but aborts the task if it has not finished within
    /// `limit` (e.g. a hung disk); whatever was still queued is then lost.
    pub async fn shutdown_within(mut self, limit: Duration) -> Result<AuditStats, AuditError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut join) = self.join.take() {
            match tokio::time::timeout(limit, &mut join).await {
                Ok(res) => res.map_err(|e| AuditError::Writer {
                    path: self.path.clone(),
                    reason: format!("the writer task ended abnormally: {e}"),
                })??,
                Err(_) => {
                    join.abort();
                    return Err(AuditError::Writer {
                        path: self.path.clone(),
                        reason: format!(
                            "did not finish writing within {limit:?} and was aborted; entries still queued are lost and the log may end without a final checkpoint"
                        ),
                    });
                }
            }
        }
        Ok(self.counters.snapshot())
    }
}

impl Drop for AuditTask {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Opens (or creates) a node's audit log.
#[derive(Debug)]
pub struct AuditLog;

impl AuditLog {
    /// Opens `<dir>/audit.jsonl`, continuing the chain if it exists (a
    /// partial last line from a crash is moved to
    /// `audit.jsonl.partial-<unix ms>` and cut off, and a `recovery` line
    /// records that), and spawns the writer task on the current tokio
    /// runtime. Without a `signer` no checkpoints are written. Does a little
    /// blocking file I/O (reads at most the last 2 MiB): call it at startup,
    /// not per request.
    pub fn open(
        cfg: AuditConfig,
        signer: Option<Signer>,
    ) -> Result<(AuditHandle, AuditTask), AuditError> {
        cfg.validate()?;
        let rt = tokio::runtime::Handle::try_current().map_err(|_| {
            AuditError::Config("AuditLog::open must be called inside a tokio runtime".into())
        })?;
        let prepared = prepare(&cfg.dir, &cfg.node)?;
        let path = cfg.dir.join(LOG_FILE);
        if signer.is_none() {
            tracing::warn!(path = %path.display(), "audit log has no signer: no checkpoints will be written, so a rewrite of the whole chain would go unnoticed");
        }
        let counters = Arc::new(Counters::default());
        let full = Arc::new(Notify::new());
        let io = Io::start().map_err(|e| AuditError::Writer {
            path: path.clone(),
            reason: format!("cannot start the audit I/O thread: {e}"),
        })?;
        let mut writer = Writer {
            path: path.clone(),
            io,
            file: Arc::new(prepared.file),
            node: cfg.node.clone(),
            fsync: cfg.fsync,
            checkpoint_every: cfg.checkpoint_every,
            linger: match cfg.fsync {
                // An interval policy already batches its syncs.
                FsyncPolicy::Interval(_) => Duration::ZERO,
                _ => cfg.linger,
            },
            signer,
            sealer: cfg.sealer.clone(),
            next_seq: prepared.next_seq,
            prev: prepared.prev,
            since_checkpoint: prepared.since_checkpoint,
            buf: Vec::with_capacity(64 * 1024),
            spare: Vec::with_capacity(64 * 1024),
            in_flight: None,
            buf_lines: 0,
            buf_checkpoints: 0,
            waiters: Vec::new(),
            committed_len: prepared.len,
            dirty: false,
            last_sync: Instant::now(),
            counters: counters.clone(),
            full: full.clone(),
        };
        if let Some(r) = prepared.recovery {
            writer.push_line(None, KIND_RECOVERY, now_ms(), |buf, env| {
                encode_line(buf, env, &r)
            });
        }
        let (tx, rx) = mpsc::channel(cfg.queue);
        let (stop_tx, stop_rx) = oneshot::channel();
        let span = tracing::info_span!("audit", node = %cfg.node);
        let join = rt.spawn(
            writer
                .run(rx, stop_rx, cfg.checkpoint_interval)
                .instrument(span),
        );
        Ok((
            AuditHandle {
                tx,
                counters: counters.clone(),
                full,
            },
            AuditTask {
                stop: Some(stop_tx),
                join: Some(join),
                counters,
                path,
            },
        ))
    }
}

struct Prepared {
    file: File,
    len: u64,
    next_seq: u64,
    prev: String,
    since_checkpoint: u64,
    recovery: Option<Recovery>,
}

/// Reads the last `TAIL_WINDOW` bytes (or the whole file).
fn read_tail(file: &File, len: u64, path: &Path) -> Result<(u64, Vec<u8>), AuditError> {
    let window = usize::try_from(len).unwrap_or(usize::MAX).min(TAIL_WINDOW);
    let start = len - window as u64;
    let mut tail = vec![0u8; window];
    file.read_exact_at(&mut tail, start)
        .map_err(|source| AuditError::Io {
            path: path.to_path_buf(),
            op: "reading the end of the log",
            source,
        })?;
    Ok((start, tail))
}

fn prepare(dir: &Path, node: &str) -> Result<Prepared, AuditError> {
    std::fs::create_dir_all(dir).map_err(|source| AuditError::Io {
        path: dir.to_path_buf(),
        op: "creating the audit directory",
        source,
    })?;
    let path = dir.join(LOG_FILE);
    let io = |op: &'static str| {
        let path = path.clone();
        move |source| AuditError::Io { path, op, source }
    };
    let existed = path.exists();
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&path)
        .map_err(io("opening the log"))?;
    if !existed {
        // Make the new directory entry itself durable.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    let mut len = file.metadata().map_err(io("reading the log's size"))?.len();
    let mut recovery = None;
    if len > 0 {
        let (start, tail) = read_tail(&file, len, &path)?;
        let complete = tail
            .iter()
            .rposition(|b| *b == b'\n')
            .map(|p| p + 1)
            .unwrap_or(0);
        if complete < tail.len() {
            if complete == 0 && start > 0 {
                return Err(AuditError::Corrupt {
                    path,
                    reason: format!(
                        "the last {TAIL_WINDOW} bytes contain no line break, so this is not an audit log (or it is badly damaged)"
                    ),
                });
            }
            let partial = &tail[complete..];
            let saved = dir.join(format!("{LOG_FILE}.partial-{}", now_ms()));
            std::fs::write(&saved, partial).map_err(|source| AuditError::Io {
                path: saved.clone(),
                op: "saving the partial last line before cutting it from the log",
                source,
            })?;
            let new_len = start + complete as u64;
            file.set_len(new_len)
                .map_err(io("cutting the partial last line"))?;
            file.sync_all().map_err(io("syncing after the recovery"))?;
            tracing::warn!(
                path = %path.display(),
                bytes = partial.len(),
                saved_to = %saved.display(),
                "audit log ended in a partial line (crash mid-write?): moved it aside and cut it off so the chain stays parsable"
            );
            recovery = Some(Recovery {
                truncated_bytes: partial.len() as u64,
                saved_to: Some(saved.display().to_string()),
            });
            len = new_len;
        }
    }
    if len == 0 {
        return Ok(Prepared {
            file,
            len,
            next_seq: 0,
            prev: GENESIS_PREV.to_string(),
            since_checkpoint: 0,
            recovery,
        });
    }
    // The file now ends with '\n': find the last complete line.
    let (start, tail) = read_tail(&file, len, &path)?;
    let body = tail.strip_suffix(b"\n").unwrap_or(&tail);
    let line_start = match body.iter().rposition(|b| *b == b'\n') {
        Some(p) => p + 1,
        None if start == 0 => 0,
        None => {
            return Err(AuditError::Corrupt {
                path,
                reason: format!("the last line is longer than {MAX_LINE} bytes"),
            })
        }
    };
    let last = &body[line_start..];
    let line = parse_line(last).map_err(|e| AuditError::Corrupt {
        path: path.clone(),
        reason: format!("the last line cannot be continued: {e}"),
    })?;
    if line.node != node {
        return Err(AuditError::WrongNode {
            path,
            found: line.node,
            expected: node.to_string(),
        });
    }
    let next_seq = line.seq.checked_add(1).ok_or_else(|| AuditError::Corrupt {
        path: path.clone(),
        reason: "the last line's seq is u64::MAX".into(),
    })?;
    Ok(Prepared {
        file,
        len,
        next_seq,
        prev: line_hash(last),
        since_checkpoint: u64::from(line.kind != KIND_CHECKPOINT),
        recovery,
    })
}

/// What one write (and sync) on the I/O thread gives back: the buffer (to
/// keep on failure, or reuse), the write's result and the sync's time.
type IoDone = (
    Vec<u8>,
    std::io::Result<()>,
    Option<std::io::Result<Duration>>,
);

/// One write for the I/O thread: append `buf` to `file` (cut back to
/// `committed` bytes if that fails, so no half line is left) and sync if
/// asked.
struct IoJob {
    file: Arc<File>,
    buf: Vec<u8>,
    committed: u64,
    sync: bool,
    done: oneshot::Sender<IoDone>,
}

/// The writer's file I/O thread (see the module header for why it is a
/// thread of its own, at the lowest priority).
struct Io {
    jobs: std::sync::mpsc::Sender<IoJob>,
}

impl Io {
    fn start() -> std::io::Result<Io> {
        let (jobs, rx) = std::sync::mpsc::channel::<IoJob>();
        std::thread::Builder::new()
            .name("audit-io".into())
            .spawn(move || {
                // On Linux this thread's own nice value (each thread has one).
                if let Err(e) = rustix::process::setpriority_process(None, 19) {
                    tracing::debug!("audit I/O thread keeps its priority: {e}");
                }
                // Ends when the writer (the only sender) is gone.
                for job in rx {
                    let IoJob {
                        file,
                        buf,
                        committed,
                        sync,
                        done,
                    } = job;
                    let written = (&*file).write_all(&buf);
                    if let Err(e) = written {
                        // Do not leave half a line behind: the next attempt
                        // appends the whole buffer again.
                        let _ = file.set_len(committed);
                        let _ = done.send((buf, Err(e), None));
                        continue;
                    }
                    let synced = sync.then(|| {
                        let t = Instant::now();
                        file.sync_data().map(|()| t.elapsed())
                    });
                    let _ = done.send((buf, Ok(()), synced));
                }
            })?;
        Ok(Io { jobs })
    }

    /// Hands one write to the thread; the answer comes on the returned
    /// channel. `Err` if the thread is gone.
    fn submit(
        &self,
        file: Arc<File>,
        buf: Vec<u8>,
        committed: u64,
        sync: bool,
    ) -> Result<oneshot::Receiver<IoDone>, String> {
        let (done, answer) = oneshot::channel();
        self.jobs
            .send(IoJob {
                file,
                buf,
                committed,
                sync,
                done,
            })
            .map_err(|_| "the audit I/O thread is gone".to_string())?;
        Ok(answer)
    }
}

/// A write handed to the I/O thread whose answer the writer has not taken
/// yet, with what to count (or give back) once it comes.
struct InFlight {
    answer: oneshot::Receiver<IoDone>,
    lines: u64,
    checkpoints: u64,
    /// `flush()` callers this write's sync releases.
    waiters: Vec<oneshot::Sender<()>>,
}

struct Writer {
    path: PathBuf,
    io: Io,
    file: Arc<File>,
    node: String,
    fsync: FsyncPolicy,
    checkpoint_every: u64,
    linger: Duration,
    signer: Option<Signer>,
    sealer: Option<Arc<dyn Sealer>>,
    next_seq: u64,
    prev: String,
    /// Lines since the last checkpoint.
    since_checkpoint: u64,
    /// Encoded lines not yet written (kept across a failed write).
    buf: Vec<u8>,
    /// The buffer of the last write, back from the I/O thread, for reuse.
    spare: Vec<u8>,
    /// The write on the I/O thread, if its answer has not been taken.
    in_flight: Option<InFlight>,
    buf_lines: u64,
    buf_checkpoints: u64,
    /// `flush()` callers waiting for the next synced write.
    waiters: Vec<oneshot::Sender<()>>,
    committed_len: u64,
    /// Written but not yet synced.
    dirty: bool,
    last_sync: Instant,
    counters: Arc<Counters>,
    /// Producers found the queue full: stop lingering.
    full: Arc<Notify>,
}

impl Writer {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Msg>,
        mut stop: oneshot::Receiver<()>,
        checkpoint_interval: Duration,
    ) -> Result<(), AuditError> {
        // Clamp absurd periods (`interval:<huge ms>`): `Instant + Duration`
        // would overflow, and a year is "never" for a running node anyway.
        const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
        let checkpoint_interval = checkpoint_interval.min(YEAR);
        let start = tokio::time::Instant::now();
        let mut cp_tick =
            tokio::time::interval_at(start + checkpoint_interval, checkpoint_interval);
        cp_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let sync_period = match self.fsync {
            FsyncPolicy::Interval(d) => d.min(YEAR),
            _ => Duration::from_secs(3600),
        };
        let mut sync_tick = tokio::time::interval_at(start + sync_period, sync_period);
        sync_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let interval_policy = matches!(self.fsync, FsyncPolicy::Interval(_));
        // A batch's write is not waited for (see `submit`): its answer is
        // taken before the next write, or by this tick when none follows.
        let mut reap_tick = tokio::time::interval_at(start + REAP, REAP);
        reap_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(MAX_BATCH);

        if !self.buf.is_empty() {
            let _ = self.commit(true).await;
        }
        loop {
            if !self.buf.is_empty() {
                // The last write failed: retry before taking more, so the
                // queue fills and producers wait instead of entries vanishing.
                tokio::select! {
                    biased;
                    _ = &mut stop => break,
                    _ = tokio::time::sleep(RETRY) => {}
                }
                let _ = self.commit(false).await;
                continue;
            }
            tokio::select! {
                biased;
                _ = &mut stop => break,
                n = rx.recv_many(&mut batch, MAX_BATCH) => {
                    if n == 0 {
                        break; // every handle is gone
                    }
                    if !self.linger.is_zero() {
                        // Group commit: let the entries of the next moment
                        // join this write and this sync. The writer sleeps
                        // through the linger and then takes what came, so
                        // an entry arriving meanwhile costs its producer a
                        // queue push and nothing else (no wake-up, no timer
                        // set again per entry). Producers that find the
                        // queue full cut it short.
                        tokio::select! {
                            _ = tokio::time::sleep(self.linger) => {}
                            _ = self.full.notified() => {}
                        }
                        while batch.len() < MAX_BATCH {
                            match rx.try_recv() {
                                Ok(msg) => batch.push(msg),
                                Err(_) => break,
                            }
                        }
                    }
                    let force = self.absorb(&mut batch);
                    if self.submit(force).await.is_ok() && self.wait_for_write() {
                        let _ = self.reap(true).await;
                    }
                }
                _ = reap_tick.tick(), if self.in_flight.is_some() => {
                    let _ = self.reap(false).await;
                }
                _ = cp_tick.tick() => {
                    if self.since_checkpoint > 0 {
                        self.push_checkpoint();
                        let _ = self.commit(false).await;
                    }
                }
                _ = sync_tick.tick(), if interval_policy && self.dirty => {
                    let _ = self.commit(true).await;
                }
            }
        }

        // Shutdown: refuse new entries, drain what is queued, seal, sync.
        rx.close();
        loop {
            let n = rx.recv_many(&mut batch, MAX_BATCH).await;
            if n == 0 {
                break;
            }
            self.absorb(&mut batch);
            if self.buf.len() >= 1 << 22 {
                let _ = self.commit(false).await;
            }
        }
        if self.since_checkpoint > 0 {
            self.push_checkpoint();
        }
        let mut last = self.commit(true).await;
        for _ in 0..2 {
            if last.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            last = self.commit(true).await;
        }
        if let Err(e) = last {
            self.counters.lost.fetch_add(self.buf_lines, Relaxed);
            tracing::error!(path = %self.path.display(), lost = self.buf_lines, "audit log shut down with entries it could not write: {e}");
            return Err(AuditError::Writer {
                path: self.path.clone(),
                reason: format!(
                    "{} entries could not be written at shutdown ({e})",
                    self.buf_lines
                ),
            });
        }
        tracing::debug!(path = %self.path.display(), next_seq = self.next_seq, "audit log closed");
        Ok(())
    }

    /// Encodes a batch of messages; true if a `flush()` asked for a sync.
    fn absorb(&mut self, batch: &mut Vec<Msg>) -> bool {
        let mut force = false;
        for msg in batch.drain(..) {
            match msg {
                Msg::Event { ts, event } => {
                    let tenant = event.tenant.as_deref();
                    let kind = event.kind.name();
                    let pushed = match self.seal(&event) {
                        Some(detail) => self.push_line(tenant, kind, ts, |buf, env| {
                            encode_line_json(buf, env, &detail)
                        }),
                        None => self.push_line(tenant, kind, ts, |buf, env| {
                            encode_line(buf, env, DetailRef(&event.kind))
                        }),
                    };
                    if pushed && self.since_checkpoint >= self.checkpoint_every {
                        self.push_checkpoint();
                    }
                }
                Msg::Flush(w) => {
                    self.waiters.push(w);
                    force = true;
                }
            }
        }
        force
    }

    /// The sealed `detail` of a tenant's event as JSON text, bound to the
    /// seq it is about to get; `None` when there is no sealer, no tenant or
    /// nothing to seal.
    fn seal(&self, event: &Event) -> Option<Vec<u8>> {
        let sealer = self.sealer.as_deref()?;
        let tenant = event.tenant.as_deref()?;
        let kind = event.kind.name();
        let context = line_context(&self.node, self.next_seq);
        seal_detail(sealer, tenant, kind, &context, &DetailRef(&event.kind))
    }

    /// Appends one encoded line to the buffer and advances the chain.
    fn push_line(
        &mut self,
        tenant: Option<&str>,
        kind: &str,
        ts: u64,
        encode: impl FnOnce(&mut Vec<u8>, &Envelope<'_>) -> Result<LineDigest, serde_json::Error>,
    ) -> bool {
        let env = Envelope {
            seq: self.next_seq,
            ts,
            node: &self.node,
            tenant,
            kind,
            prev: &self.prev,
        };
        match encode(&mut self.buf, &env) {
            Ok(hash) => {
                hash.write_hex(&mut self.prev);
                self.next_seq += 1;
                self.since_checkpoint += 1;
                self.buf_lines += 1;
                true
            }
            Err(e) => {
                self.counters.lost.fetch_add(1, Relaxed);
                tracing::error!(
                    kind,
                    "audit entry could not be encoded and was not written: {e}"
                );
                false
            }
        }
    }

    fn push_checkpoint(&mut self) {
        let Some(signer) = &self.signer else {
            self.since_checkpoint = 0;
            return;
        };
        let seq = self.next_seq;
        match signer.sign(&self.node, seq, &self.prev) {
            Ok(cp) => {
                if self.push_line(None, KIND_CHECKPOINT, now_ms(), |buf, env| {
                    encode_line(buf, env, &cp)
                }) {
                    self.buf_checkpoints += 1;
                    self.since_checkpoint = 0;
                }
            }
            Err(e) => {
                // Not fatal: the chain goes on and the next checkpoint covers
                // these entries too.
                self.counters.checkpoint_failures.fetch_add(1, Relaxed);
                self.since_checkpoint = 0;
                tracing::warn!(seq, "audit checkpoint not written: {e}");
            }
        }
    }

    /// Writes the buffer with one call and syncs if the policy (or `force`)
    /// says so, and waits for it. On a write error the partial bytes are cut
    /// off again and the buffer is kept for a retry.
    async fn commit(&mut self, force_sync: bool) -> Result<(), AuditError> {
        self.submit(force_sync).await?;
        self.reap(true).await
    }

    /// Whether the batch just submitted must be waited for: a `flush()`
    /// caller is waiting on its sync, or the interval policy needs to know
    /// what is still unsynced. Otherwise the answer is taken later, so that
    /// the I/O thread's answer does not wake the runtime once per batch.
    fn wait_for_write(&self) -> bool {
        matches!(self.fsync, FsyncPolicy::Interval(_))
            || self
                .in_flight
                .as_ref()
                .is_some_and(|f| !f.waiters.is_empty())
    }

    /// Hands the buffer to the I/O thread, with a sync if the policy (or
    /// `force`) says so, without waiting for the write. The write before it
    /// is reaped first (waited for if it is still running), so at most one is
    /// in flight and a failed one is retried before anything after it.
    async fn submit(&mut self, force_sync: bool) -> Result<(), AuditError> {
        self.reap(true).await?;
        let sync = force_sync
            || match self.fsync {
                FsyncPolicy::Batch => true,
                FsyncPolicy::Interval(d) => self.last_sync.elapsed() >= d,
                FsyncPolicy::Never => false,
            };
        if self.buf.is_empty() && !(sync && self.dirty) {
            if sync {
                for w in self.waiters.drain(..) {
                    let _ = w.send(());
                }
            }
            return Ok(());
        }
        let file = self.file.clone();
        let buf = std::mem::replace(&mut self.buf, std::mem::take(&mut self.spare));
        let lines = std::mem::take(&mut self.buf_lines);
        let checkpoints = std::mem::take(&mut self.buf_checkpoints);
        match self.io.submit(file, buf, self.committed_len, sync) {
            Ok(answer) => {
                let waiters = if sync {
                    std::mem::take(&mut self.waiters)
                } else {
                    Vec::new()
                };
                self.in_flight = Some(InFlight {
                    answer,
                    lines,
                    checkpoints,
                    waiters,
                });
                Ok(())
            }
            Err(reason) => {
                self.counters.lost.fetch_add(lines, Relaxed);
                Err(AuditError::Writer {
                    path: self.path.clone(),
                    reason,
                })
            }
        }
    }

    /// Takes the answer of the write in flight, if any: waits for it with
    /// `wait`, else only if it has come. A failed write puts its bytes back
    /// in front of whatever was encoded since, for the retry.
    async fn reap(&mut self, wait: bool) -> Result<(), AuditError> {
        let Some(mut f) = self.in_flight.take() else {
            return Ok(());
        };
        let done = if wait {
            (&mut f.answer).await.ok()
        } else {
            match f.answer.try_recv() {
                Ok(done) => Some(done),
                Err(oneshot::error::TryRecvError::Empty) => {
                    self.in_flight = Some(f);
                    return Ok(());
                }
                Err(oneshot::error::TryRecvError::Closed) => None,
            }
        };
        let Some((mut buf, written, synced)) = done else {
            self.counters.lost.fetch_add(f.lines, Relaxed);
            return Err(AuditError::Writer {
                path: self.path.clone(),
                reason: "the audit I/O thread stopped during a write".into(),
            });
        };
        if let Err(e) = written {
            buf.extend_from_slice(&self.buf);
            self.buf = buf;
            self.buf_lines += f.lines;
            self.buf_checkpoints += f.checkpoints;
            self.waiters.append(&mut f.waiters);
            self.counters.write_errors.fetch_add(1, Relaxed);
            tracing::error!(path = %self.path.display(), pending = self.buf_lines, "audit write failed, retrying: {e}");
            return Err(AuditError::Io {
                path: self.path.clone(),
                op: "appending to the log",
                source: e,
            });
        }
        let n = buf.len() as u64;
        self.committed_len += n;
        self.counters.bytes.fetch_add(n, Relaxed);
        self.counters.appended.fetch_add(f.lines, Relaxed);
        self.counters.checkpoints.fetch_add(f.checkpoints, Relaxed);
        buf.clear();
        if buf.capacity() > 8 << 20 {
            buf.shrink_to(1 << 20);
        }
        self.spare = buf;
        self.dirty = n > 0 || self.dirty;
        match synced {
            None => Ok(()),
            Some(Ok(took)) => {
                self.dirty = false;
                self.last_sync = Instant::now();
                self.counters.fsyncs.fetch_add(1, Relaxed);
                self.counters
                    .last_fsync_micros
                    .store(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Relaxed);
                for w in f.waiters {
                    let _ = w.send(());
                }
                Ok(())
            }
            Some(Err(e)) => {
                // The bytes are in the file (page cache); only durability is
                // in doubt. Keep `dirty` (and the waiters) so the next
                // commit syncs again.
                self.waiters.append(&mut f.waiters);
                self.counters.write_errors.fetch_add(1, Relaxed);
                tracing::error!(path = %self.path.display(), "audit fsync failed: {e}");
                Err(AuditError::Io {
                    path: self.path.clone(),
                    op: "syncing the log to disk",
                    source: e,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_policy_parses() {
        assert_eq!(
            "batch".parse::<FsyncPolicy>().ok(),
            Some(FsyncPolicy::Batch)
        );
        assert_eq!(
            "never".parse::<FsyncPolicy>().ok(),
            Some(FsyncPolicy::Never)
        );
        assert_eq!(
            "interval:250".parse::<FsyncPolicy>().ok(),
            Some(FsyncPolicy::Interval(Duration::from_millis(250)))
        );
        assert_eq!(FsyncPolicy::default(), FsyncPolicy::Batch);
        for bad in [
            "",
            "always",
            "interval:",
            "interval:0",
            "interval:-5",
            "interval:1s",
            "Batch",
        ] {
            let err = bad.parse::<FsyncPolicy>().expect_err(bad);
            assert!(err.to_string().contains("interval"), "{bad}: {err}");
        }
        for p in [
            FsyncPolicy::Batch,
            FsyncPolicy::Never,
            FsyncPolicy::Interval(Duration::from_millis(10)),
        ] {
            assert_eq!(p.to_string().parse::<FsyncPolicy>().ok(), Some(p));
        }
    }

    #[test]
    fn config_validation_reports_everything() {
        let mut cfg = AuditConfig::new("/tmp/x", "");
        cfg.queue = 0;
        cfg.checkpoint_every = 0;
        let err = cfg.validate().expect_err("invalid").to_string();
        for needle in ["node name", "checkpoint_every", "queue"] {
            assert!(err.contains(needle), "{err}");
        }
    }
}
