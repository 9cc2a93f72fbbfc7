//! `dmsc-audit`: a tamper-evident, append-only audit log per node.
//!
//! Who delegated what to whom, which requests policy denied, which
//! handshakes failed, which certificates were issued or revoked: a node
//! records these in `<dir>/audit.jsonl` so an operator can answer "what did
//! this node do for tenant T" and trust that nobody quietly edited the answer.
//!
//! # Format
//!
//! One JSON object per line, fields always in this order:
//!
//! ```text
//! {"seq":0,"ts":1718000000000,"node":"eu-1","tenant":"acme","kind":"delegation","prev":"00…00","detail":{…}}
//! ```
//!
//! `seq` counts from 0 without gaps; `ts` is unix milliseconds at
//! `record()`; `prev` is the lowercase hex SHA-256 of the previous line's
//! exact bytes (without its newline), 64 zeros for the first line. Editing,
//! removing, inserting or swapping any line therefore breaks a link that
//! [`verify`] finds. Kinds: `delegation`, `denied`, `auth_failure`,
//! `enrollment`, `revocation`, `policy`, `tenant_key` (see [`EventKind`]),
//! plus two the log writes itself: `checkpoint` and `recovery`.
//! [`report`] counts one tenant's entries for compliance (`dmsc-node audit
//! report`), by kind, so kinds added later are counted without code changes.
//!
//! With a [`Sealer`] ([`AuditConfig::sealer`]), the tenant payload fields of
//! a tenant's events are sealed with that tenant's key before the line is
//! hashed (see the `seal` module): `verify` needs no keys, and deleting a
//! tenant's keys makes its payload unreadable without breaking the chain.
//!
//! A hash chain alone does not stop someone who rewrites everything after
//! an edit and recomputes every hash. Checkpoints do: every
//! `checkpoint_every` entries (default 1000), or `checkpoint_interval`
//! (default 10 s) after new entries, and at clean shutdown, the writer
//! appends a `checkpoint` line whose `detail` is `{head, seq, cert, sig}`:
//! `head` equals the line's `prev`, `seq` the line's seq, `cert` the node's
//! certificate (base64 DER) and `sig` an ECDSA P-256 SHA-256 signature
//! (ASN.1, base64) with the node's key over
//! `"dmsc-audit-checkpoint-v1\n{node}\n{seq}\n{head}"`. A rewrite then needs
//! the node's key; verified against the mesh CA ([`VerifyOptions::roots`]) a
//! checkpoint cannot be forged with some other key. Signing failures are
//! logged and counted, never fatal. Entries after the last checkpoint can be
//! truncated without trace in the file alone: the last checkpoint bounds the
//! loss, and the checkpoint at shutdown keeps that window empty after a
//! clean stop.
//!
//! # Durability ([`FsyncPolicy`])
//!
//! One task owns the chain; `record()` only queues. The task encodes each
//! entry as it arrives and hands the line to the appender's thread, which
//! lingers ([`AuditConfig::linger`], 5 ms by default, none for `interval`)
//! for the lines of the next moment, writes everything it has with one
//! `write` call, then:
//!
//! * `batch` (default): `sync_data` after every such write. An entry is on
//!   stable storage at most one linger plus one sync after it was recorded;
//!   under load one fsync covers every entry of those milliseconds (group
//!   commit: with no linger, a sync per handful of entries cost the
//!   delegation path a third of its throughput, BENCHMARKS.md). A crash
//!   loses at most the entries queued but not yet synced.
//! * `interval:<ms>`: `sync_data` at most once per interval (the timer
//!   syncs an idle log too). A crash can lose up to one interval of entries.
//! * `never`: the kernel writes back when it likes (typically within
//!   ~30 s); a crash of the machine, not just the process, can lose that
//!   much. The process dying loses only what was still queued.
//!
//! Every policy syncs once more at clean shutdown, and [`AuditHandle::flush`]
//! forces a sync. A crash mid-write can leave a partial last line: reopening
//! the log moves it to `audit.jsonl.partial-<unix ms>`, cuts it from the log
//! (so the chain stays parsable) and writes a `recovery` line saying so.
//!
//! # Backpressure
//!
//! The queue (default 65536 entries) is bounded. [`AuditHandle::record`]
//! tries a non-blocking send first and only waits when the queue is full
//! (counted in [`AuditStats::queue_full_waits`]); entries are never dropped
//! silently. [`AuditHandle::try_record`] never waits and says whether the
//! entry was queued.

#![forbid(unsafe_code)]

mod appender;
mod event;
mod line;
pub mod report;
mod seal;
mod signer;
mod verify;
mod writer;

use std::path::PathBuf;

pub use event::{
    AuthFailure, AuthMethod, Checkpoint, Delegation, Denied, EnrollVia, Enrollment, Event,
    EventKind, Masked, Onboarding, PolicyChange, RateLimited, Recovery, Revocation, TenantKey,
};
pub use line::{line_hash, parse_line, Body, Line, GENESIS_PREV, MAX_LINE};
pub use seal::{
    clear_fields, line_context, open_line, SealState, Sealer, SEALED_FIELD, UNREADABLE_FIELD,
    WITHHELD_FIELD,
};
pub use signer::{checkpoint_message, Signer};
pub use verify::{log_path, tail, verify, Problem, ProblemKind, Tail, VerifyOptions, VerifyReport};
pub use writer::{
    AuditConfig, AuditHandle, AuditLog, AuditStats, AuditTask, FsyncPolicy, LOG_FILE,
};

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log `{path}`: {op} failed: {source}; check that the directory exists, is writable by the node and that the disk is not full")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("audit log `{path}` is damaged: {reason}; run `dmsc-node audit verify {path}` to see where, then move the file aside so the node starts a new log")]
    Corrupt { path: PathBuf, reason: String },
    #[error("audit log `{path}` was written by node `{found}`, but this node is `{expected}`; give every node its own audit directory")]
    WrongNode {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("not an audit log line: {reason}")]
    Line { reason: String },
    #[error("audit config: {0}")]
    Config(String),
    #[error("audit checkpoint signer: {0}")]
    Signer(String),
    #[error("the audit log is shut down; the entry was not recorded")]
    Closed,
    #[error("audit writer for `{path}`: {reason}")]
    Writer { path: PathBuf, reason: String },
}
