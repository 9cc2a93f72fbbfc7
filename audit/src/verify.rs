//! Offline checking (`dmsc-node audit verify`) and reading (`audit tail`).
//!
//! Verification streams the file once, holding only the previous two line
//! hashes and one line of lookahead, so a multi-gigabyte log verifies in
//! constant memory. It stops at the first problem; classifying that problem
//! sometimes needs the rest of the file (is the missing seq further down?
//! does some later line link to this one?), which is one more streaming pass
//! over the remainder, never a second copy of the log.
//!
//! How the first broken link is classified (line `i`, expected seq `e`,
//! `h(x)` the hash of line `x`):
//!
//! * line `i` does not parse: `Inserted` if line `i+1` links to line `i-1`,
//!   else `Unparsable` (an edit that broke the JSON, or corruption);
//! * seq is `e` but `prev != h(i-1)`: `Inserted` if line `i+1` links to
//!   line `i-1`; else `Modified` at `i-1` if line `i+1` links to line `i`
//!   (line `i-1` changed after line `i` recorded its hash); else `Modified`
//!   at `i` (its own `prev` was edited);
//! * seq is not `e` but `prev == h(i-1)`: `Inserted` if line `i+1` also
//!   links to line `i-1`, else `Modified` (the seq field was edited);
//! * seq jumps forward to `s > e`: `Inserted` if line `i+1` links to line
//!   `i-1` and nothing links to line `i`; `Reordered` if one of the seqs
//!   `e..s` appears later in the file; otherwise `Removed` (`e..s` are gone);
//! * seq goes back (`s < e`, a seq already used): `Inserted` — at line `i-1`
//!   when line `i` skips over it to link to line `i-2`, else at line `i`;
//! * a checkpoint whose signature, certificate or head does not check out:
//!   `BadSignature` — with every link intact this means the chain up to the
//!   checkpoint was rewritten with recomputed hashes (or the checkpoint was
//!   forged);
//! * a last line without a newline: `TruncatedTail`.
//!
//! What verification cannot see: entries after the last checkpoint can be
//! cut off (or rewritten with recomputed hashes) without trace in the file
//! itself; the report's `last_checkpoint_seq` and `unsealed` say how much is
//! exposed, and the writer seals the log at every clean shutdown. Without
//! `roots`, checkpoints prove only that someone holding a key for a
//! certificate naming this node signed them; with the mesh CA as a root, a
//! rewrite needs the node's own key.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::event::{Checkpoint, KIND_CHECKPOINT};
use crate::line::{hex, parse_line, Line, GENESIS_PREV, MAX_LINE};
use crate::signer::{certs_der, check_checkpoint, CheckpointFault};
use crate::writer::LOG_FILE;
use crate::AuditError;

/// What to trust when checking checkpoints.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// DER certificates of CAs that must have issued the checkpoint
    /// certificates (directly: the mesh PKI has no intermediates). Empty:
    /// only check that each certificate parses, names the line's node and
    /// verifies the signature.
    pub roots: Vec<Vec<u8>>,
}

impl VerifyOptions {
    /// Trust the certificates in a PEM bundle (e.g. the mesh `ca.pem`).
    pub fn with_roots_pem(pem: &str) -> Result<Self, AuditError> {
        let roots = certs_der(pem)?;
        if roots.is_empty() {
            return Err(AuditError::Config(
                "the roots PEM holds no CERTIFICATE block; pass the mesh ca.pem".into(),
            ));
        }
        Ok(VerifyOptions { roots })
    }
}

/// What went wrong first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    Modified,
    Removed,
    Reordered,
    Inserted,
    BadSignature,
    /// A checkpoint's certificate does not chain to the roots given: signed
    /// with a key of another CA (a forgery), or the wrong `--ca` bundle.
    UntrustedSigner,
    Unparsable,
    TruncatedTail,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line number in the file.
    pub line: usize,
    /// The seq the problem is about (for `Removed`: the first missing one).
    pub seq: Option<u64>,
    pub kind: ProblemKind,
    pub detail: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}", self.line)?;
        if let Some(s) = self.seq {
            write!(f, " (seq {s})")?;
        }
        write!(f, ": {:?}: {}", self.kind, self.detail)
    }
}

/// The outcome of [`verify`]. Counts cover the lines that passed before the
/// first problem (all of them when `problem` is `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub path: PathBuf,
    /// Lines checked (events, checkpoints, recoveries).
    pub entries: u64,
    /// Checkpoints whose signature verified.
    pub checkpoints: u64,
    pub tenants: BTreeSet<String>,
    pub last_checkpoint_seq: Option<u64>,
    /// Lines after the last verified checkpoint (not protected against
    /// truncation or a recomputed rewrite).
    pub unsealed: u64,
    /// SHA-256 fingerprints (hex, of the DER) of the checkpoint certificates.
    pub signers: BTreeSet<String>,
    /// Whether checkpoint certificates were checked against roots.
    pub roots_checked: bool,
    pub problem: Option<Problem>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.problem.is_none()
    }
}

/// `<dir>/audit.jsonl` for a directory, the path itself otherwise.
pub fn log_path(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(LOG_FILE)
    } else {
        path.to_path_buf()
    }
}

/// One line as read from the file.
pub(crate) struct RawLine {
    /// 1-based.
    pub no: usize,
    /// `None` if longer than [`MAX_LINE`] (it was hashed, not kept).
    pub bytes: Option<Vec<u8>>,
    /// Hex SHA-256 of the line without its newline.
    pub hash: String,
    pub len: u64,
    pub terminated: bool,
}

impl RawLine {
    fn parse(&self) -> Result<Line, String> {
        match &self.bytes {
            None => Err(format!("line is longer than {MAX_LINE} bytes")),
            Some(b) => parse_line(b).map_err(|e| e.to_string()),
        }
    }
}

/// Splits a reader into lines with bounded memory per line.
pub(crate) struct LineReader<R> {
    r: R,
    no: usize,
}

impl<R: BufRead> LineReader<R> {
    pub(crate) fn new(r: R) -> Self {
        LineReader { r, no: 0 }
    }

    pub(crate) fn next_line(&mut self) -> std::io::Result<Option<RawLine>> {
        let mut bytes = Some(Vec::new());
        let mut hasher = Sha256::new();
        let mut len: u64 = 0;
        loop {
            let avail = match self.r.fill_buf() {
                Ok(a) => a,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if avail.is_empty() {
                if len == 0 {
                    return Ok(None);
                }
                self.no += 1;
                return Ok(Some(RawLine {
                    no: self.no,
                    bytes,
                    hash: hex(&hasher.finalize()),
                    len,
                    terminated: false,
                }));
            }
            let (chunk, found) = match avail.iter().position(|b| *b == b'\n') {
                Some(p) => (&avail[..p], true),
                None => (avail, false),
            };
            hasher.update(chunk);
            len += chunk.len() as u64;
            if let Some(b) = &mut bytes {
                if b.len() + chunk.len() > MAX_LINE {
                    bytes = None;
                } else {
                    b.extend_from_slice(chunk);
                }
            }
            let consumed = chunk.len() + usize::from(found);
            self.r.consume(consumed);
            if found {
                self.no += 1;
                return Ok(Some(RawLine {
                    no: self.no,
                    bytes,
                    hash: hex(&hasher.finalize()),
                    len,
                    terminated: true,
                }));
            }
        }
    }
}

fn open(path: &Path, op: &'static str) -> Result<LineReader<BufReader<File>>, AuditError> {
    let file = File::open(path).map_err(|source| AuditError::Io {
        path: path.to_path_buf(),
        op,
        source,
    })?;
    Ok(LineReader::new(BufReader::with_capacity(256 * 1024, file)))
}

/// Checks the whole chain of the log at `path` (a file, or a directory
/// holding `audit.jsonl`). `Err` only for I/O failures; a damaged log is an
/// `Ok` report with a `problem`.
pub fn verify(path: impl AsRef<Path>, opts: &VerifyOptions) -> Result<VerifyReport, AuditError> {
    let path = log_path(path.as_ref());
    let mut rd = open(&path, "opening the log to verify it")?;
    let io = |source| AuditError::Io {
        path: path.clone(),
        op: "reading the log",
        source,
    };
    let mut report = VerifyReport {
        path: path.clone(),
        entries: 0,
        checkpoints: 0,
        tenants: BTreeSet::new(),
        last_checkpoint_seq: None,
        unsealed: 0,
        signers: BTreeSet::new(),
        roots_checked: !opts.roots.is_empty(),
        problem: None,
    };
    let mut st = Chain {
        prev_hash: GENESIS_PREV.to_string(),
        prev2_hash: None,
        prev_seq: None,
        last_cp_line: None,
    };
    let mut next = rd.next_line().map_err(io)?;
    while let Some(cur) = next.take() {
        next = rd.next_line().map_err(io)?;
        match st.check(&cur, next.as_ref(), &mut rd, opts, &mut report) {
            Ok(None) => {}
            Ok(Some(p)) => {
                report.problem = Some(p);
                break;
            }
            Err(e) => return Err(io(e)),
        }
    }
    Ok(report)
}

/// What the verifier remembers about the accepted chain.
struct Chain {
    prev_hash: String,
    prev2_hash: Option<String>,
    prev_seq: Option<u64>,
    /// (line number, seq) of the last verified checkpoint.
    last_cp_line: Option<(usize, u64)>,
}

fn problem(line: usize, seq: Option<u64>, kind: ProblemKind, detail: String) -> Option<Problem> {
    Some(Problem {
        line,
        seq,
        kind,
        detail,
    })
}

impl Chain {
    fn expected(&self) -> u64 {
        self.prev_seq.map_or(0, |s| s.saturating_add(1))
    }

    /// Checks `cur`; `Some` is the first problem.
    fn check<R: BufRead>(
        &mut self,
        cur: &RawLine,
        next: Option<&RawLine>,
        rest: &mut LineReader<R>,
        opts: &VerifyOptions,
        report: &mut VerifyReport,
    ) -> std::io::Result<Option<Problem>> {
        let e = self.expected();
        let parsed = cur.parse();
        if !cur.terminated {
            return Ok(problem(
                cur.no,
                parsed.ok().map(|l| l.seq),
                ProblemKind::TruncatedTail,
                format!(
                    "the last line ({} bytes) has no newline: the writer stopped mid-write (reopening the log moves the partial line aside) or the file was cut",
                    cur.len
                ),
            ));
        }
        let next_l = next.and_then(|n| n.parse().ok());
        let next_links_back = next_l.as_ref().is_some_and(|n| n.prev == self.prev_hash);
        let before = cur.no.saturating_sub(1);
        let line = match parsed {
            Ok(l) => l,
            Err(reason) => {
                if next_links_back {
                    return Ok(problem(
                        cur.no,
                        None,
                        ProblemKind::Inserted,
                        format!("an unparsable line was inserted: the next line links straight to line {before} ({reason})"),
                    ));
                }
                return Ok(problem(
                    cur.no,
                    None,
                    ProblemKind::Unparsable,
                    format!("the line was modified or corrupted (seq {e} expected here): {reason}"),
                ));
            }
        };
        let s = line.seq;

        if s != e {
            if line.prev == self.prev_hash {
                if next_links_back {
                    return Ok(problem(
                        cur.no,
                        Some(s),
                        ProblemKind::Inserted,
                        format!("this line (seq {s}, {e} expected) and the next one both link to line {before}: this one was inserted"),
                    ));
                }
                return Ok(problem(
                    cur.no,
                    Some(s),
                    ProblemKind::Modified,
                    format!("seq is {s} but {e} was expected, while the line still links to line {before}: its seq was edited"),
                ));
            }
            if s > e {
                let mut links_to_cur = false;
                let mut gap_later = false;
                scan(next, rest, |l| {
                    links_to_cur |= l.prev == cur.hash;
                    gap_later |= (e..s).contains(&l.seq);
                })?;
                if next_links_back && !links_to_cur {
                    return Ok(problem(
                        cur.no,
                        Some(s),
                        ProblemKind::Inserted,
                        format!("line with seq {s} (expected {e}) links to nothing before it and the next line links to line {before}: it was inserted"),
                    ));
                }
                if gap_later {
                    return Ok(problem(
                        cur.no,
                        Some(s),
                        ProblemKind::Reordered,
                        format!("seq {s} comes before seq {e}, which appears further down: lines were reordered"),
                    ));
                }
                let missing = if s - e == 1 {
                    format!("seq {e} is missing")
                } else {
                    format!("seqs {e}..={} ({} entries) are missing", s - 1, s - e)
                };
                return Ok(problem(
                    cur.no,
                    Some(e),
                    ProblemKind::Removed,
                    format!(
                        "{missing} before line {} (which has seq {s}): removed",
                        cur.no
                    ),
                ));
            }
            // s < e: a seq that was already used.
            if !next_links_back
                && Some(s) == self.prev_seq
                && self.prev2_hash.as_deref() == Some(line.prev.as_str())
            {
                return Ok(problem(
                    before,
                    self.prev_seq,
                    ProblemKind::Inserted,
                    format!("line {before} and line {} both have seq {s}, and line {} links past line {before} to the line before it: line {before} was inserted", cur.no, cur.no),
                ));
            }
            return Ok(problem(
                cur.no,
                Some(s),
                ProblemKind::Inserted,
                format!("seq {s} was already used before this line ({e} expected): this line was inserted"),
            ));
        }

        if line.prev != self.prev_hash {
            if next_links_back {
                return Ok(problem(
                    cur.no,
                    Some(s),
                    ProblemKind::Inserted,
                    format!("this line does not link to line {before} but the next one does: this line was inserted"),
                ));
            }
            if cur.no == 1 {
                return Ok(problem(
                    1,
                    Some(s),
                    ProblemKind::Modified,
                    "the first line's prev must be 64 zeros: it was modified".into(),
                ));
            }
            if next_l.as_ref().is_none_or(|n| n.prev == cur.hash) {
                return Ok(problem(
                    before,
                    self.prev_seq,
                    ProblemKind::Modified,
                    format!(
                        "line {} records prev {} but line {before} now hashes to {}: line {before} was modified after it was written",
                        cur.no, line.prev, self.prev_hash
                    ),
                ));
            }
            return Ok(problem(
                cur.no,
                Some(s),
                ProblemKind::Modified,
                format!("this line's prev does not match line {before} and the next line does not link to it either: this line (at least its prev) was modified"),
            ));
        }

        // The link holds. Checkpoints additionally prove the head is genuine.
        if line.kind == KIND_CHECKPOINT {
            let since = match self.last_cp_line {
                Some((l, cs)) => format!("the checkpoint at line {l} (seq {cs})"),
                None => "the start of the log".to_string(),
            };
            let verdict = serde_json::from_value::<Checkpoint>(line.detail.clone())
                .map_err(|e| {
                    CheckpointFault::Invalid(format!("checkpoint detail is malformed: {e}"))
                })
                .and_then(|cp| {
                    check_checkpoint(&line.node, s, &line.prev, line.ts, &cp, &opts.roots)
                });
            match verdict {
                Ok(fingerprint) => {
                    report.checkpoints += 1;
                    report.last_checkpoint_seq = Some(s);
                    report.unsealed = 0;
                    report.signers.insert(fingerprint);
                    self.last_cp_line = Some((cur.no, s));
                }
                Err(fault) => {
                    let (kind, why) = match fault {
                        CheckpointFault::Untrusted(reason) => (ProblemKind::UntrustedSigner, format!("{reason}: if --ca is this mesh's CA bundle, this checkpoint was signed with a key of another CA (forged); otherwise verify with the right bundle")),
                        CheckpointFault::Invalid(reason) => (ProblemKind::BadSignature, format!("{reason}; every hash link up to here is intact, so the lines between {since} and this checkpoint were rewritten with recomputed hashes, or this checkpoint was forged")),
                    };
                    return Ok(problem(cur.no, Some(s), kind, why));
                }
            }
        } else {
            report.unsealed += 1;
        }
        report.entries += 1;
        if let Some(t) = &line.tenant {
            if !report.tenants.contains(t) {
                report.tenants.insert(t.clone());
            }
        }
        self.prev2_hash = Some(std::mem::replace(&mut self.prev_hash, cur.hash.clone()));
        self.prev_seq = Some(s);
        Ok(None)
    }
}

/// Calls `f` on every parsable line from `next` to the end of the file.
fn scan<R: BufRead>(
    next: Option<&RawLine>,
    rest: &mut LineReader<R>,
    mut f: impl FnMut(&Line),
) -> std::io::Result<()> {
    if let Some(Ok(l)) = next.map(RawLine::parse) {
        f(&l);
    }
    while let Some(raw) = rest.next_line()? {
        if let Ok(l) = raw.parse() {
            f(&l);
        }
    }
    Ok(())
}

/// Lines of the log, oldest first, optionally only those of one tenant
/// (checkpoints and other node-level lines have no tenant and are skipped
/// by a tenant filter). A final line without a newline is being written (or
/// was cut by a crash) and is not returned; unparsable lines come back as
/// errors and iteration goes on. Does not check the chain: see [`verify`].
pub fn tail(path: impl AsRef<Path>, tenant: Option<&str>) -> Result<Tail, AuditError> {
    let path = log_path(path.as_ref());
    let rd = open(&path, "opening the log to read it")?;
    Ok(Tail {
        rd,
        tenant: tenant.map(str::to_string),
        path,
        done: false,
    })
}

/// Iterator returned by [`tail`].
pub struct Tail {
    rd: LineReader<BufReader<File>>,
    tenant: Option<String>,
    path: PathBuf,
    done: bool,
}

impl std::fmt::Debug for Tail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tail")
            .field("path", &self.path)
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

impl Iterator for Tail {
    type Item = Result<Line, AuditError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let raw = match self.rd.next_line() {
                Ok(Some(raw)) => raw,
                Ok(None) => {
                    self.done = true;
                    return None;
                }
                Err(source) => {
                    self.done = true;
                    return Some(Err(AuditError::Io {
                        path: self.path.clone(),
                        op: "reading the log",
                        source,
                    }));
                }
            };
            if !raw.terminated {
                self.done = true;
                return None;
            }
            match raw.parse() {
                Err(reason) => {
                    return Some(Err(AuditError::Corrupt {
                        path: self.path.clone(),
                        reason: format!("line {}: {reason}", raw.no),
                    }))
                }
                Ok(line) => {
                    if self.tenant.is_none() || self.tenant.as_deref() == line.tenant.as_deref() {
                        return Some(Ok(line));
                    }
                }
            }
        }
        None
    }
}
