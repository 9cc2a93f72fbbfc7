//! The appender: the thread that puts encoded lines into the file.
//!
//! The writer task (on the node's runtime) encodes each entry as soon as it
//! arrives and appends the line to a shared buffer; this thread takes that
//! buffer, lingers for group commit, writes it with one `write`, syncs as the
//! policy says, and keeps the counters. Nothing goes back to the runtime:
//! the node's request thread never sleeps on an audit timer or wakes for a
//! write's answer, and it never encodes a whole batch at once (a 500-entry
//! batch encoded in one go stalled the requests behind it for milliseconds).
//! The hand-off costs the writer a lock and, only when this thread is idle,
//! one wake-up. The thread runs at the lowest CPU priority (nice 19): where
//! it competes for a CPU with the request path (a node on one core), requests
//! go first and each batch grows.
//!
//! A failed write is cut back off the file and retried every second, ahead
//! of everything appended after it; the writer stops taking entries once
//! [`MAX_PENDING`] bytes wait, so producers feel the backpressure instead of
//! entries vanishing or memory growing.

use std::fs::File;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use crate::writer::{Counters, FsyncPolicy};
use crate::AuditError;

/// Bytes waiting for the thread beyond which the writer takes no more
/// entries (the queue then fills and producers wait).
pub(crate) const MAX_PENDING: usize = 8 << 20;
/// Pending bytes from which the thread writes without lingering.
const NO_LINGER: usize = 1 << 20;
/// Pause between retries after a failed write or sync.
const RETRY: Duration = Duration::from_secs(1);
/// Attempts at shutdown before the remaining entries are given up.
const FINAL_ATTEMPTS: u32 = 3;

/// Lines handed over but not yet taken by the thread.
#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    lines: u64,
    checkpoints: u64,
    /// `flush()` callers, released by the first sync after their lines.
    waiters: Vec<oneshot::Sender<()>>,
    /// A flush asked for a sync now.
    sync_now: bool,
    /// The writer is done: write everything, sync, report, end.
    closing: bool,
    /// The thread waits for work (a hand-off must wake it).
    idle: bool,
    /// The thread lingers (only a flush, the shutdown or a full buffer
    /// wake it).
    lingering: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    /// Signalled after each successful write (the writer may wait for room).
    drained: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock cannot leave `Pending` half-updated
        // in a way that matters more than losing the log: keep going.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The writer's side of the appender.
pub(crate) struct Appender {
    path: PathBuf,
    shared: Arc<Shared>,
    /// The thread's final report, taken by [`Appender::close`].
    done: Option<oneshot::Receiver<Result<(), AuditError>>>,
}

/// What the thread needs to know about the file and the policy.
pub(crate) struct Target {
    pub path: PathBuf,
    pub file: File,
    /// The file's length: a failed write is cut back to it.
    pub len: u64,
    pub fsync: FsyncPolicy,
    pub linger: Duration,
    pub counters: Arc<Counters>,
}

impl Appender {
    /// Starts the thread (`audit-io`).
    pub(crate) fn start(target: Target) -> std::io::Result<Appender> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            drained: Notify::new(),
        });
        let (report, done) = oneshot::channel();
        let theirs = shared.clone();
        let path = target.path.clone();
        std::thread::Builder::new()
            .name("audit-io".into())
            .spawn(move || {
                // On Linux this thread's own nice value (each thread has one).
                if let Err(e) = rustix::process::setpriority_process(None, 19) {
                    tracing::debug!("audit I/O thread keeps its priority: {e}");
                }
                let _ = report.send(Thread::new(target).run(&theirs));
            })?;
        Ok(Appender {
            path,
            shared,
            done: Some(done),
        })
    }

    /// Hands the encoded lines in `buf` over (leaving `buf` empty, with
    /// capacity), with the `flush()` callers they release; `sync_now` asks
    /// for a sync without lingering.
    pub(crate) fn hand_off(
        &self,
        buf: &mut Vec<u8>,
        lines: u64,
        checkpoints: u64,
        waiters: &mut Vec<oneshot::Sender<()>>,
        sync_now: bool,
    ) {
        if buf.is_empty() && waiters.is_empty() && !sync_now {
            return;
        }
        let mut p = self.shared.lock();
        move_bytes(buf, &mut p.buf);
        p.lines += lines;
        p.checkpoints += checkpoints;
        p.waiters.append(waiters);
        p.sync_now |= sync_now;
        let wake = p.idle || (p.lingering && (p.sync_now || p.buf.len() >= NO_LINGER));
        drop(p);
        if wake {
            self.shared.wake.notify_one();
        }
    }

    /// Bytes handed over and not yet written.
    pub(crate) fn pending(&self) -> usize {
        self.shared.lock().buf.len()
    }

    /// Resolves after the next successful write (or at once if one happened
    /// since the last call).
    pub(crate) async fn drained(&self) {
        self.shared.drained.notified().await
    }

    /// Tells the thread to write and sync everything and end; waits for its
    /// report. Later calls report the thread gone.
    pub(crate) async fn close(&mut self) -> Result<(), AuditError> {
        {
            let mut p = self.shared.lock();
            p.closing = true;
        }
        self.shared.wake.notify_one();
        match self.done.take() {
            Some(done) => done.await.unwrap_or_else(|_| {
                Err(AuditError::Writer {
                    path: self.path.clone(),
                    reason: "the audit I/O thread stopped abnormally".into(),
                })
            }),
            None => Ok(()),
        }
    }
}

impl Drop for Appender {
    fn drop(&mut self) {
        // Without a close (the writer task was aborted): let the thread
        // write what it has and end.
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
    }
}

/// Moves `from`'s bytes to the end of `to`, leaving `from` empty: a swap
/// (no copy) when `to` is empty, which is the usual case.
fn move_bytes(from: &mut Vec<u8>, to: &mut Vec<u8>) {
    if to.is_empty() {
        std::mem::swap(from, to);
    } else {
        to.extend_from_slice(from);
        from.clear();
    }
}

/// The thread's own state.
struct Thread {
    t: Target,
    /// Taken from `Pending`, not yet written (kept across failed writes).
    buf: Vec<u8>,
    lines: u64,
    checkpoints: u64,
    /// Released by the next successful sync.
    waiters: Vec<oneshot::Sender<()>>,
    /// Written but not yet synced.
    dirty: bool,
    /// A sync is owed (a flush, or a failed one to retry).
    sync_owed: bool,
    last_sync: Instant,
    /// The last write or sync failed: retry after [`RETRY`].
    failing: bool,
}

impl Thread {
    fn new(t: Target) -> Thread {
        Thread {
            t,
            buf: Vec::with_capacity(64 * 1024),
            lines: 0,
            checkpoints: 0,
            waiters: Vec::new(),
            dirty: false,
            sync_owed: false,
            last_sync: Instant::now(),
            failing: false,
        }
    }

    fn run(mut self, shared: &Shared) -> Result<(), AuditError> {
        let mut final_attempts = 0;
        loop {
            let closing = self.take(shared);
            let result = self.write_and_sync(closing);
            if let Ok(true) = result {
                shared.drained.notify_one();
            }
            if closing {
                match result {
                    Ok(_) if self.buf.is_empty() && !self.sync_owed => return Ok(()),
                    Ok(_) | Err(_) => {
                        final_attempts += 1;
                        if final_attempts >= FINAL_ATTEMPTS {
                            return Err(self.give_up(shared, result.err()));
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            } else if self.failing {
                // Retry after the pause, or at once when the writer closes.
                let p = shared.lock();
                drop(
                    shared
                        .wake
                        .wait_timeout_while(p, RETRY, |p| !p.closing)
                        .unwrap_or_else(|e| e.into_inner()),
                );
            }
        }
    }

    /// Waits for work (lingering for more once some came) and takes it.
    /// Returns whether the writer is closing.
    fn take(&mut self, shared: &Shared) -> bool {
        let mut p = shared.lock();
        loop {
            if p.closing || p.sync_now || !p.buf.is_empty() || self.owes_work() {
                break;
            }
            p.idle = true;
            p = match self.sync_due_in() {
                Some(due) => {
                    shared
                        .wake
                        .wait_timeout(p, due)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => shared.wake.wait(p).unwrap_or_else(|e| e.into_inner()),
            };
            p.idle = false;
            if self.sync_due_in() == Some(Duration::ZERO) {
                break;
            }
        }
        if !self.t.linger.is_zero() && !p.closing && !p.sync_now && p.buf.len() < NO_LINGER {
            // Group commit: let the entries of the next moment join this
            // write and this sync.
            p.lingering = true;
            p = shared
                .wake
                .wait_timeout_while(p, self.t.linger, |p| {
                    !p.closing && !p.sync_now && p.buf.len() < NO_LINGER
                })
                .unwrap_or_else(|e| e.into_inner())
                .0;
            p.lingering = false;
        }
        move_bytes(&mut p.buf, &mut self.buf);
        self.lines += std::mem::take(&mut p.lines);
        self.checkpoints += std::mem::take(&mut p.checkpoints);
        if !p.waiters.is_empty() || p.sync_now {
            self.sync_owed = true;
        }
        self.waiters.append(&mut p.waiters);
        p.sync_now = false;
        p.closing
    }

    /// Work left from before: unwritten lines or an owed sync (after a
    /// failure, retried once the pause is over).
    fn owes_work(&self) -> bool {
        !self.buf.is_empty() || self.sync_owed
    }

    /// With the interval policy and unsynced lines: how long until the sync
    /// is due.
    fn sync_due_in(&self) -> Option<Duration> {
        match self.t.fsync {
            FsyncPolicy::Interval(d) if self.dirty => {
                Some(d.saturating_sub(self.last_sync.elapsed()))
            }
            _ => None,
        }
    }

    /// Writes what was taken and syncs if due. `Ok(true)` when lines were
    /// written.
    fn write_and_sync(&mut self, closing: bool) -> Result<bool, AuditError> {
        self.failing = false;
        let wrote = !self.buf.is_empty();
        if wrote {
            if let Err(e) = (&self.t.file).write_all(&self.buf) {
                // Do not leave half a line behind: the retry appends the
                // whole buffer again.
                let _ = self.t.file.set_len(self.t.len);
                self.failing = true;
                self.t.counters.write_errors.fetch_add(1, Relaxed);
                tracing::error!(path = %self.t.path.display(), pending = self.lines, "audit write failed, retrying: {e}");
                return Err(self.io_error("appending to the log", e));
            }
            let n = self.buf.len() as u64;
            self.t.len += n;
            let c = &self.t.counters;
            c.bytes.fetch_add(n, Relaxed);
            c.appended
                .fetch_add(std::mem::take(&mut self.lines), Relaxed);
            c.checkpoints
                .fetch_add(std::mem::take(&mut self.checkpoints), Relaxed);
            self.buf.clear();
            if self.buf.capacity() > 8 << 20 {
                self.buf.shrink_to(1 << 20);
            }
            self.dirty = true;
        }
        let sync = closing
            || self.sync_owed
            || match self.t.fsync {
                FsyncPolicy::Batch => wrote,
                FsyncPolicy::Interval(d) => self.last_sync.elapsed() >= d,
                FsyncPolicy::Never => false,
            };
        if !sync {
            return Ok(wrote);
        }
        if self.dirty {
            let t = Instant::now();
            if let Err(e) = self.t.file.sync_data() {
                // The bytes are in the file (page cache); only durability is
                // in doubt: sync again after the pause, waiters still held.
                self.sync_owed = true;
                self.failing = true;
                self.t.counters.write_errors.fetch_add(1, Relaxed);
                tracing::error!(path = %self.t.path.display(), "audit fsync failed: {e}");
                return Err(self.io_error("syncing the log to disk", e));
            }
            let took = t.elapsed();
            self.dirty = false;
            self.last_sync = Instant::now();
            let c = &self.t.counters;
            c.fsyncs.fetch_add(1, Relaxed);
            c.last_fsync_micros
                .store(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Relaxed);
        }
        self.sync_owed = false;
        for w in self.waiters.drain(..) {
            let _ = w.send(());
        }
        Ok(wrote)
    }

    /// Shutdown could not write everything: count the loss and say so.
    fn give_up(&mut self, shared: &Shared, last: Option<AuditError>) -> AuditError {
        let lost = self.lines + std::mem::take(&mut shared.lock().lines);
        self.t.counters.lost.fetch_add(lost, Relaxed);
        tracing::error!(path = %self.t.path.display(), lost, "audit log shut down with entries it could not write");
        let why = last.map_or_else(|| "the final sync failed".to_string(), |e| e.to_string());
        AuditError::Writer {
            path: self.t.path.clone(),
            reason: format!("{lost} entries could not be written at shutdown ({why})"),
        }
    }

    fn io_error(&self, op: &'static str, source: std::io::Error) -> AuditError {
        AuditError::Io {
            path: self.t.path.clone(),
            op,
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(file: File, fsync: FsyncPolicy) -> (Target, Arc<Counters>) {
        let counters = Arc::new(Counters::default());
        let t = Target {
            path: PathBuf::from("/dev/full"),
            file,
            len: 0,
            fsync,
            linger: Duration::from_millis(5),
            counters: counters.clone(),
        };
        (t, counters)
    }

    /// A disk that refuses every write (`/dev/full`: ENOSPC): the lines are
    /// kept and retried, never counted as written, and a shutdown that still
    /// cannot write them says how many were lost.
    #[tokio::test]
    async fn failed_writes_are_kept_counted_and_reported_at_shutdown() {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("open /dev/full");
        let (t, counters) = target(file, FsyncPolicy::Batch);
        let mut a = Appender::start(t).expect("start");
        let mut buf = b"{\"seq\":0}\n{\"seq\":1}\n".to_vec();
        a.hand_off(&mut buf, 2, 0, &mut Vec::new(), false);
        assert!(buf.is_empty(), "the lines were handed over");
        let deadline = Instant::now() + Duration::from_secs(5);
        while counters.write_errors.load(Relaxed) == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(counters.write_errors.load(Relaxed) >= 1);
        assert_eq!(counters.appended.load(Relaxed), 0);
        let started = Instant::now();
        let err = a.close().await.expect_err("nothing could be written");
        assert!(
            err.to_string().contains("2 entries could not be written"),
            "{err}"
        );
        assert_eq!(counters.lost.load(Relaxed), 2);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the retry pause does not hold up a shutdown: {:?}",
            started.elapsed()
        );
    }

    /// Lines reach the file and the counters without anyone asking, a
    /// flush's waiter is released by a sync under `never`, and a flush cuts
    /// the linger short.
    #[tokio::test]
    async fn lines_are_written_and_flush_waiters_released_after_a_sync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("open");
        let (mut t, counters) = target(file, FsyncPolicy::Never);
        t.linger = Duration::from_secs(30);
        let mut a = Appender::start(t).expect("start");
        let (tx, rx) = oneshot::channel();
        let mut buf = b"one\n".to_vec();
        a.hand_off(&mut buf, 1, 0, &mut vec![tx], true);
        tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .expect("released well before the 30 s linger")
            .expect("released, not dropped");
        assert_eq!(std::fs::read(&path).expect("read"), b"one\n");
        assert_eq!(counters.appended.load(Relaxed), 1);
        assert_eq!(
            counters.fsyncs.load(Relaxed),
            1,
            "a flush syncs even under `never`"
        );
        let mut buf = b"two\n".to_vec();
        a.hand_off(&mut buf, 1, 0, &mut Vec::new(), false);
        a.close().await.expect("close");
        assert_eq!(std::fs::read(&path).expect("read"), b"one\ntwo\n");
        assert_eq!(counters.appended.load(Relaxed), 2);
    }
}
