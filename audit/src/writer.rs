//! The writer: one tokio task owns the chain; handles feed it through a
//! bounded queue.
//!
//! A single owner makes `seq` and `prev` trivially consistent (no lock around
//! "hash the last line, then append"). It encodes each entry as it arrives,
//! in the same turn of the runtime that recorded it, and hands the line to
//! the appender's thread (`appender`), which lingers for group commit, writes
//! with one `write`, syncs and keeps the counters: the runtime never waits
//! for the disk or wakes for it. Producers pay a `try_send` (a few atomics);
//! they only wait when the disk is a whole queue (64k entries by default, plus
//! 8 MiB of encoded lines) behind, and then they wait rather than lose
//! entries: an audit log that silently drops is worse than one that slows the
//! data path. If a write fails (disk full, I/O error) the appender cuts the
//! partial bytes back off, keeps the lines and retries every second; the
//! writer stops taking from the queue once too much waits, so producers feel
//! the backpressure instead of entries vanishing. `try_record` is the escape
//! hatch for callers that must never wait.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use crate::appender::{Appender, Target, MAX_PENDING};
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
pub(crate) struct Counters {
    pub appended: AtomicU64,
    pub checkpoints: AtomicU64,
    pub queue_full_waits: AtomicU64,
    pub rejected: AtomicU64,
    pub lost: AtomicU64,
    pub bytes: AtomicU64,
    pub fsyncs: AtomicU64,
    pub last_fsync_micros: AtomicU64,
    pub write_errors: AtomicU64,
    pub checkpoint_failures: AtomicU64,
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
            Err(_) => {
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
            Err(TrySendError::Full(Msg::Event { event, .. })) => Err(event),
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
        let appender = Appender::start(Target {
            path: path.clone(),
            file: prepared.file,
            len: prepared.len,
            fsync: cfg.fsync,
            linger: match cfg.fsync {
                // An interval policy already batches its syncs.
                FsyncPolicy::Interval(_) => Duration::ZERO,
                _ => cfg.linger,
            },
            counters: counters.clone(),
        })
        .map_err(|e| AuditError::Writer {
            path: path.clone(),
            reason: format!("cannot start the audit I/O thread: {e}"),
        })?;
        let mut writer = Writer {
            appender,
            node: cfg.node.clone(),
            checkpoint_every: cfg.checkpoint_every,
            signer,
            sealer: cfg.sealer.clone(),
            next_seq: prepared.next_seq,
            prev: prepared.prev,
            since_checkpoint: prepared.since_checkpoint,
            buf: Vec::with_capacity(64 * 1024),
            buf_lines: 0,
            buf_checkpoints: 0,
            waiters: Vec::new(),
            counters: counters.clone(),
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

struct Writer {
    appender: Appender,
    node: String,
    checkpoint_every: u64,
    signer: Option<Signer>,
    sealer: Option<Arc<dyn Sealer>>,
    next_seq: u64,
    prev: String,
    /// Lines since the last checkpoint.
    since_checkpoint: u64,
    /// Encoded lines not yet handed to the appender.
    buf: Vec<u8>,
    buf_lines: u64,
    buf_checkpoints: u64,
    /// `flush()` callers, handed over with the lines before them.
    waiters: Vec<oneshot::Sender<()>>,
    counters: Arc<Counters>,
}

impl Writer {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Msg>,
        mut stop: oneshot::Receiver<()>,
        checkpoint_interval: Duration,
    ) -> Result<(), AuditError> {
        // Clamp absurd periods: `Instant + Duration` would overflow, and a
        // year is "never" for a running node anyway.
        const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
        let checkpoint_interval = checkpoint_interval.min(YEAR);
        let start = tokio::time::Instant::now();
        let mut cp_tick =
            tokio::time::interval_at(start + checkpoint_interval, checkpoint_interval);
        cp_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(MAX_BATCH);

        self.hand_off(false);
        'run: loop {
            // The disk is far behind (or failing): take no more entries
            // until it catches up, so the queue fills and producers wait.
            while self.appender.pending() >= MAX_PENDING {
                tokio::select! {
                    biased;
                    _ = &mut stop => break 'run,
                    _ = self.appender.drained() => {}
                }
            }
            tokio::select! {
                biased;
                _ = &mut stop => break,
                n = rx.recv_many(&mut batch, MAX_BATCH) => {
                    if n == 0 {
                        break; // every handle is gone
                    }
                    // Encoded now, in the turn of the runtime that recorded
                    // them (one or a few lines, never a whole linger's
                    // worth); the appender lingers for group commit.
                    let force = self.absorb(&mut batch);
                    self.hand_off(force);
                }
                _ = cp_tick.tick() => {
                    if self.since_checkpoint > 0 {
                        self.push_checkpoint();
                        self.hand_off(false);
                    }
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
            self.hand_off(false);
        }
        if self.since_checkpoint > 0 {
            self.push_checkpoint();
        }
        self.hand_off(true);
        self.appender.close().await?;
        tracing::debug!(next_seq = self.next_seq, "audit log closed");
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

    /// Hands the encoded lines (and the `flush()` callers after them) to
    /// the appender.
    fn hand_off(&mut self, sync_now: bool) {
        let lines = std::mem::take(&mut self.buf_lines);
        let checkpoints = std::mem::take(&mut self.buf_checkpoints);
        self.appender.hand_off(
            &mut self.buf,
            lines,
            checkpoints,
            &mut self.waiters,
            sync_now,
        );
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
