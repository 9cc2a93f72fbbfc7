//! End-to-end: events go through the real writer task into a real file,
//! then the file is tampered with in every way the verifier claims to
//! classify, and reopened after clean stops and crashes.

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use dmsc_audit::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType, SigningKey as _,
};

const NODE: &str = "eu-1";
const EVERY: u64 = 50;

/// A mesh CA that issues node signers like `dmsc-node ca init` + `issue`
/// do (CN and SPIFFE URI name the node).
struct Mesh {
    issuer: Issuer<'static, KeyPair>,
    root: Vec<u8>,
}

impl Mesh {
    fn new() -> Self {
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca = CertificateParams::default();
        ca.distinguished_name
            .push(DnType::CommonName, "dmsc mesh CA test");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
        Mesh {
            issuer: Issuer::new(ca, ca_key),
            root: ca_cert.der().to_vec(),
        }
    }

    fn issue(&self, node: &str) -> Signer {
        let key = KeyPair::generate().expect("node key");
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, node);
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://test.dmsc/node/{node}")
                .try_into()
                .expect("uri"),
        )];
        let cert = params.signed_by(&key, &self.issuer).expect("node cert");
        Signer::from_pem(&key.serialize_pem(), &cert.pem()).expect("signer")
    }
}

fn mesh_signer(node: &str) -> (Signer, Vec<u8>) {
    let mesh = Mesh::new();
    (mesh.issue(node), mesh.root)
}

fn event(i: u64) -> Event {
    let tenant = match i % 3 {
        0 => Some("acme".to_string()),
        1 => Some("globex".to_string()),
        _ => None,
    };
    let kind: EventKind = match i % 5 {
        0 => Delegation {
            caller: format!("caller-{i}"),
            target: "agent:summarizer".into(),
            route: "p2c load 0.2 vs 0.6".into(),
            agent: Some("summarizer-2".into()),
            serving_node: Some("us-1".into()),
            outcome: "ok".into(),
            status: Some(200),
            duration_ms: i,
            trace_id: Some(format!("trace-{i}")),
        }
        .into(),
        1 => Denied {
            caller: format!("caller-{i}"),
            target: "tag:billing".into(),
            reason: "tenant policy forbids billing".into(),
            rule: Some("acme:export".into()),
        }
        .into(),
        2 => AuthFailure {
            listener: "ingress".into(),
            method: AuthMethod::Jwt,
            reason: "expired token".into(),
            peer: "10.0.0.7:5555".into(),
            claimed: Some(format!("agent-{i}")),
        }
        .into(),
        3 => Enrollment {
            agent: format!("agent-{i}"),
            serial: "0a1b2c".into(),
            not_after: 1_900_000_000,
            via: if i.is_multiple_of(2) {
                EnrollVia::Renewal("09".into())
            } else {
                EnrollVia::Token("tok-7".into())
            },
        }
        .into(),
        _ => Revocation {
            serial: "0a1b2c".into(),
            reason: "key compromise".into(),
            source: "admin".into(),
        }
        .into(),
    };
    Event { tenant, kind }
}

fn config(dir: &Path) -> AuditConfig {
    let mut cfg = AuditConfig::new(dir, NODE);
    cfg.checkpoint_every = EVERY;
    cfg
}

/// Records events `from..to` through the real writer and shuts it down.
async fn write(dir: &Path, signer: Option<Signer>, from: u64, to: u64) -> AuditStats {
    let (h, task) = AuditLog::open(config(dir), signer).expect("open");
    for i in from..to {
        h.record(event(i)).await.expect("record");
    }
    task.shutdown().await.expect("shutdown")
}

/// A fresh log of `n` events; returns the dir, the CA root and its lines.
async fn fresh(n: u64) -> (tempfile::TempDir, Vec<u8>, Vec<Vec<u8>>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (signer, root) = mesh_signer(NODE);
    write(dir.path(), Some(signer), 0, n).await;
    let lines = read_lines(dir.path());
    (dir, root, lines)
}

fn read_lines(dir: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(dir.join(LOG_FILE)).expect("read log");
    assert_eq!(bytes.last(), Some(&b'\n'));
    bytes[..bytes.len() - 1]
        .split(|b| *b == b'\n')
        .map(<[u8]>::to_vec)
        .collect()
}

fn write_lines(dir: &Path, lines: &[Vec<u8>]) {
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(l);
        out.push(b'\n');
    }
    std::fs::write(dir.join(LOG_FILE), out).expect("write log");
}

fn check(dir: &Path) -> VerifyReport {
    verify(dir, &VerifyOptions::default()).expect("verify")
}

fn problem(r: &VerifyReport) -> &Problem {
    r.problem.as_ref().expect("a problem must be found")
}

fn kind_of(line: &[u8]) -> String {
    parse_line(line).expect("parse").kind
}

/// Replaces the 64-hex value of `"field":"..."` in a line.
fn set_hex_field(line: &mut [u8], field: &str, value: &str) {
    let needle = format!("\"{field}\":\"");
    let text = std::str::from_utf8(line).expect("utf8");
    let at = text.find(&needle).expect("field") + needle.len();
    line[at..at + 64].copy_from_slice(value.as_bytes());
}

/// Changes one character inside the first string value of `detail`,
/// keeping the JSON valid.
fn tweak_detail(line: &mut [u8]) {
    let text = std::str::from_utf8(line).expect("utf8");
    let d = text.find("\"detail\":{").expect("detail");
    let v = d + text[d..].find(":\"").expect("string value") + 2;
    line[v] = if line[v] == b'x' { b'y' } else { b'x' };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untouched_log_verifies_clean_with_counts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (signer, root) = mesh_signer(NODE);
    let n = 260;
    let stats = write(dir.path(), Some(signer), 0, n).await;
    // A checkpoint after every 50 events, plus one at shutdown for the last 10.
    let cps = n / EVERY + 1;
    assert_eq!(stats.checkpoints, cps);
    assert_eq!(stats.appended, n + cps);
    assert_eq!(stats.lost, 0);
    assert!(stats.fsyncs >= 1);
    let lines = read_lines(dir.path());
    assert_eq!(lines.len() as u64, n + cps);
    assert_eq!(kind_of(lines.last().expect("last")), "checkpoint");

    let r = verify(dir.path(), &VerifyOptions { roots: vec![root] }).expect("verify");
    assert!(r.is_clean(), "{:?}", r.problem);
    assert!(r.roots_checked);
    assert_eq!(r.entries, n + cps);
    assert_eq!(r.checkpoints, cps);
    assert_eq!(r.last_checkpoint_seq, Some(n + cps - 1));
    assert_eq!(r.unsealed, 0);
    assert_eq!(r.signers.len(), 1);
    assert_eq!(
        r.tenants.iter().map(String::as_str).collect::<Vec<_>>(),
        ["acme", "globex"]
    );

    // Every line decodes to the typed event that was recorded.
    let mut i = 0;
    for line in tail(dir.path(), None).expect("tail") {
        let line = line.expect("line");
        match line.body().expect("body") {
            Body::Event(kind) => {
                assert_eq!(kind, event(i).kind);
                assert_eq!(line.tenant, event(i).tenant);
                i += 1;
            }
            Body::Checkpoint(cp) => {
                assert_eq!(cp.seq, line.seq);
                assert_eq!(cp.head, line.prev);
            }
            Body::Recovery(_) => panic!("no recovery expected"),
        }
        assert_eq!(line.node, NODE);
    }
    assert_eq!(i, n);
}

#[tokio::test]
async fn checkpoints_from_another_ca_are_refused_with_roots() {
    let (dir, _root, _) = fresh(60).await;
    let (_, other_root) = mesh_signer(NODE);
    let r = verify(
        dir.path(),
        &VerifyOptions {
            roots: vec![other_root],
        },
    )
    .expect("verify");
    let p = problem(&r);
    assert_eq!(p.kind, ProblemKind::UntrustedSigner);
    assert_eq!(p.line as u64, EVERY + 1, "the first checkpoint");
    assert!(p.detail.contains("not issued by"), "{}", p.detail);
    // Says the likelier cause (the wrong bundle) and not that lines were
    // rewritten: every line is intact.
    assert!(
        p.detail.contains("otherwise verify with the right bundle")
            && !p.detail.contains("rewritten"),
        "{}",
        p.detail
    );
}

#[tokio::test]
async fn edited_detail_is_modified_at_that_line() {
    let (dir, root, mut lines) = fresh(120).await;
    tweak_detail(&mut lines[29]);
    assert!(parse_line(&lines[29]).is_ok(), "still valid JSON");
    write_lines(dir.path(), &lines);
    let r = verify(dir.path(), &VerifyOptions { roots: vec![root] }).expect("verify");
    let p = problem(&r);
    assert_eq!(
        (p.kind, p.line, p.seq),
        (ProblemKind::Modified, 30, Some(29)),
        "{p}"
    );
    assert_eq!(
        r.entries, 30,
        "lines up to the edited one passed their own link"
    );
}

#[tokio::test]
async fn edit_that_breaks_json_is_unparsable() {
    let (dir, _, mut lines) = fresh(120).await;
    let len = lines[29].len();
    lines[29].truncate(len - 1); // drop the closing brace
    write_lines(dir.path(), &lines);
    let r = check(dir.path());
    let p = problem(&r);
    assert_eq!((p.kind, p.line), (ProblemKind::Unparsable, 30), "{p}");
    assert!(p.detail.contains("modified"), "{}", p.detail);
}

#[tokio::test]
async fn deleted_line_is_removed_with_the_missing_seq() {
    let (dir, _, mut lines) = fresh(120).await;
    lines.remove(39); // seq 39
    write_lines(dir.path(), &lines);
    let p = problem(&check(dir.path())).clone();
    assert_eq!(
        (p.kind, p.line, p.seq),
        (ProblemKind::Removed, 40, Some(39)),
        "{p}"
    );
    assert!(p.detail.contains("seq 39 is missing"), "{}", p.detail);

    let (dir, _, mut lines) = fresh(120).await;
    lines.drain(9..12); // seqs 9, 10, 11
    write_lines(dir.path(), &lines);
    let p = problem(&check(dir.path())).clone();
    assert_eq!((p.kind, p.line, p.seq), (ProblemKind::Removed, 10, Some(9)));
    assert!(p.detail.contains("9..=11"), "{}", p.detail);
}

#[tokio::test]
async fn swapped_lines_are_reordered() {
    let (dir, _, mut lines) = fresh(120).await;
    lines.swap(39, 40); // seqs 39 and 40
    write_lines(dir.path(), &lines);
    let p = problem(&check(dir.path())).clone();
    assert_eq!(
        (p.kind, p.line, p.seq),
        (ProblemKind::Reordered, 40, Some(40)),
        "{p}"
    );

    // A line moved further down.
    let (dir, _, mut lines) = fresh(120).await;
    let moved = lines.remove(20);
    lines.insert(25, moved);
    write_lines(dir.path(), &lines);
    let p = problem(&check(dir.path())).clone();
    assert_eq!((p.kind, p.line), (ProblemKind::Reordered, 21), "{p}");
}

#[tokio::test]
async fn forged_lines_are_inserted() {
    let (dir, _, lines) = fresh(120).await;
    // A well-forged line: next seq, correct prev, plausible content.
    let forged = |prev: &str, seq: u64| {
        format!(
            r#"{{"seq":{seq},"ts":1,"node":"{NODE}","tenant":"acme","kind":"denied","prev":"{prev}","detail":{{"caller":"x","target":"y","reason":"z"}}}}"#
        )
        .into_bytes()
    };
    let mut tampered = lines.clone();
    tampered.insert(40, forged(&line_hash(&lines[39]), 40));
    write_lines(dir.path(), &tampered);
    let p = problem(&check(dir.path())).clone();
    assert_eq!(
        (p.kind, p.line, p.seq),
        (ProblemKind::Inserted, 41, Some(40)),
        "{p}"
    );

    // The same with a made-up prev.
    let mut tampered = lines.clone();
    tampered.insert(40, forged(&"ab".repeat(32), 40));
    write_lines(dir.path(), &tampered);
    let p = problem(&check(dir.path())).clone();
    assert_eq!((p.kind, p.line), (ProblemKind::Inserted, 41), "{p}");

    // A replayed copy of an earlier line.
    let mut tampered = lines.clone();
    tampered.insert(40, lines[10].clone());
    write_lines(dir.path(), &tampered);
    let p = problem(&check(dir.path())).clone();
    assert_eq!(
        (p.kind, p.line, p.seq),
        (ProblemKind::Inserted, 41, Some(10)),
        "{p}"
    );

    // A forged first line.
    let mut tampered = lines.clone();
    tampered.insert(0, forged(GENESIS_PREV, 0));
    write_lines(dir.path(), &tampered);
    let p = problem(&check(dir.path())).clone();
    assert_eq!((p.kind, p.line), (ProblemKind::Inserted, 1), "{p}");
}

/// Edits line `from` and recomputes every later `prev` (and checkpoint
/// `head`), as an attacker without the key would.
fn rewrite_from(lines: &mut [Vec<u8>], from: usize) {
    tweak_detail(&mut lines[from]);
    for i in from + 1..lines.len() {
        let h = line_hash(&lines[i - 1]);
        set_hex_field(&mut lines[i], "prev", &h);
        if kind_of(&lines[i]) == "checkpoint" {
            set_hex_field(&mut lines[i], "head", &h);
        }
    }
}

#[tokio::test]
async fn recomputed_rewrite_is_caught_by_the_next_checkpoint() {
    let (dir, root, mut lines) = fresh(160).await;
    rewrite_from(&mut lines, 60);
    write_lines(dir.path(), &lines);
    let first_cp_after = (61..lines.len())
        .find(|i| kind_of(&lines[*i]) == "checkpoint")
        .expect("a later checkpoint");
    for opts in [
        VerifyOptions::default(),
        VerifyOptions {
            roots: vec![root.clone()],
        },
    ] {
        let r = verify(dir.path(), &opts).expect("verify");
        let p = problem(&r);
        assert_eq!(p.kind, ProblemKind::BadSignature, "{p}");
        assert_eq!(p.line, first_cp_after + 1);
        assert_eq!(p.seq, Some(first_cp_after as u64));
        assert!(p.detail.contains("rewritten"), "{}", p.detail);
        assert_eq!(r.checkpoints, 1, "the checkpoint before the edit held");
    }
}

#[tokio::test]
async fn resigned_rewrite_needs_roots_to_be_caught() {
    let (dir, root, mut lines) = fresh(160).await;
    rewrite_from(&mut lines, 60);
    // The attacker also re-signs every checkpoint with a key of their own,
    // under a self-made certificate that names the node.
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, NODE);
    let cert = params.self_signed(&key).expect("cert");
    let b64 = base64::engine::general_purpose::STANDARD;
    for line in lines.iter_mut() {
        let parsed = parse_line(line).expect("parse");
        if parsed.kind != "checkpoint" {
            continue;
        }
        let mut v: serde_json::Value = serde_json::from_slice(line).expect("json");
        let sig = key
            .sign(&checkpoint_message(NODE, parsed.seq, &parsed.prev))
            .expect("sign");
        v["detail"]["cert"] = b64.encode(cert.der()).into();
        v["detail"]["sig"] = b64.encode(sig).into();
        *line = serde_json::to_vec(&v).expect("json");
    }
    for i in 1..lines.len() {
        let h = line_hash(&lines[i - 1]);
        set_hex_field(&mut lines[i], "prev", &h);
        if kind_of(&lines[i]) == "checkpoint" {
            // Re-sign over the final head.
            let mut v: serde_json::Value = serde_json::from_slice(&lines[i]).expect("json");
            let seq = v["seq"].as_u64().expect("seq");
            v["detail"]["head"] = h.clone().into();
            let sig = key.sign(&checkpoint_message(NODE, seq, &h)).expect("sign");
            v["detail"]["sig"] = b64.encode(sig).into();
            lines[i] = serde_json::to_vec(&v).expect("json");
        }
    }
    write_lines(dir.path(), &lines);
    // Without roots the forgery is internally consistent (documented).
    assert!(check(dir.path()).is_clean());
    let r = verify(dir.path(), &VerifyOptions { roots: vec![root] }).expect("verify");
    let p = problem(&r);
    assert_eq!(p.kind, ProblemKind::UntrustedSigner, "{p}");
    assert_eq!(
        p.line as u64,
        EVERY + 1,
        "already the first checkpoint is foreign"
    );
}

#[tokio::test]
async fn tampered_checkpoint_signature_is_bad_signature() {
    let (dir, _, mut lines) = fresh(60).await;
    let last = lines.len() - 1;
    let text = String::from_utf8(lines[last].clone()).expect("utf8");
    let at = text.find("\"sig\":\"").expect("sig") + 10;
    lines[last][at] = if lines[last][at] == b'A' { b'B' } else { b'A' };
    write_lines(dir.path(), &lines);
    let p = problem(&check(dir.path())).clone();
    assert_eq!(
        (p.kind, p.line),
        (ProblemKind::BadSignature, lines.len()),
        "{p}"
    );
}

#[tokio::test]
async fn partial_last_line_is_truncated_tail_then_recovered_on_reopen() {
    let (dir, root, lines) = fresh(70).await;
    let partial = br#"{"seq":73,"ts":17000,"node":"eu-1","ten"#;
    let mut bytes = std::fs::read(dir.path().join(LOG_FILE)).expect("read");
    bytes.extend_from_slice(partial);
    std::fs::write(dir.path().join(LOG_FILE), &bytes).expect("write");
    let p = problem(&check(dir.path())).clone();
    assert_eq!(
        (p.kind, p.line),
        (ProblemKind::TruncatedTail, lines.len() + 1)
    );

    // Recovery must not depend on signing: reopen without a signer.
    write(dir.path(), None, 70, 80).await;
    let r = verify(dir.path(), &VerifyOptions { roots: vec![root] }).expect("verify");
    assert!(r.is_clean(), "{:?}", r.problem);
    let all: Vec<Line> = tail(dir.path(), None)
        .expect("tail")
        .collect::<Result<_, _>>()
        .expect("lines");
    let rec = &all[lines.len()];
    assert_eq!(rec.kind, "recovery");
    let Body::Recovery(info) = rec.body().expect("body") else {
        panic!("recovery body");
    };
    assert_eq!(info.truncated_bytes, partial.len() as u64);
    let saved = std::fs::read(info.saved_to.expect("saved")).expect("saved file");
    assert_eq!(saved, partial, "the cut bytes are kept aside");
}

#[tokio::test]
async fn reopen_continues_seq_and_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mesh = Mesh::new();
    write(dir.path(), Some(mesh.issue(NODE)), 0, 30).await;
    let first = read_lines(dir.path());
    // The next run of the node, with a renewed certificate from the same CA.
    write(dir.path(), Some(mesh.issue(NODE)), 30, 45).await;
    let all = read_lines(dir.path());
    assert_eq!(
        all.len(),
        first.len() + 15 + 1,
        "15 events and a checkpoint"
    );
    let next = parse_line(&all[first.len()]).expect("parse");
    let last_before = parse_line(&first[first.len() - 1]).expect("parse");
    assert_eq!(next.seq, last_before.seq + 1);
    assert_eq!(next.prev, line_hash(&first[first.len() - 1]));
    let seqs: Vec<u64> = tail(dir.path(), None)
        .expect("tail")
        .map(|l| l.expect("line").seq)
        .collect();
    assert_eq!(seqs, (0..all.len() as u64).collect::<Vec<_>>());
    let r = verify(
        dir.path(),
        &VerifyOptions {
            roots: vec![mesh.root.clone()],
        },
    )
    .expect("verify");
    assert!(r.is_clean(), "{:?}", r.problem);
    assert_eq!(r.entries, all.len() as u64);
    assert_eq!(r.signers.len(), 2, "one certificate per run");
    assert_eq!(r.unsealed, 0);

    // A run without a signer leaves its entries unsealed, but chained.
    write(dir.path(), None, 45, 50).await;
    let r = verify(
        dir.path(),
        &VerifyOptions {
            roots: vec![mesh.root],
        },
    )
    .expect("verify");
    assert!(r.is_clean(), "{:?}", r.problem);
    assert_eq!(r.unsealed, 5);

    // Another node must not continue this log.
    let err = AuditLog::open(AuditConfig::new(dir.path(), "us-1"), None).expect_err("wrong node");
    assert!(matches!(err, AuditError::WrongNode { .. }), "{err}");
}

#[tokio::test]
async fn tail_filters_by_tenant() {
    let (dir, _, lines) = fresh(90).await;
    let acme: Vec<Line> = tail(dir.path(), Some("acme"))
        .expect("tail")
        .collect::<Result<_, _>>()
        .expect("lines");
    assert_eq!(acme.len(), 30);
    assert!(acme.iter().all(|l| l.tenant.as_deref() == Some("acme")));
    assert_eq!(tail(dir.path(), Some("nobody")).expect("tail").count(), 0);
    assert_eq!(tail(dir.path(), None).expect("tail").count(), lines.len());
    // A directory or the file itself.
    assert_eq!(
        tail(dir.path().join(LOG_FILE), Some("globex"))
            .expect("tail")
            .count(),
        30
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_waits_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.queue = 1;
    let (h, task) = AuditLog::open(cfg, None).expect("open");
    let producers: Vec<_> = (0..4)
        .map(|p| {
            let h = h.clone();
            tokio::spawn(async move {
                for i in 0..250 {
                    h.record(event(p * 1000 + i)).await.expect("record");
                }
            })
        })
        .collect();
    for p in producers {
        p.await.expect("producer");
    }
    let stats = task.shutdown().await.expect("shutdown");
    assert_eq!(stats.appended, 1000);
    assert!(stats.queue_full_waits > 0, "{stats:?}");
    assert_eq!(stats.lost + stats.rejected, 0);
    assert_eq!(check(dir.path()).entries, 1000);

    // After shutdown nothing is accepted, and the caller is told.
    assert!(matches!(h.record(event(0)).await, Err(AuditError::Closed)));
    assert!(!h.try_record(event(0)));
    assert_eq!(h.stats().rejected, 2);
}

#[tokio::test]
async fn flush_makes_entries_visible_before_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.fsync = FsyncPolicy::Never;
    let (h, task) = AuditLog::open(cfg, None).expect("open");
    assert!(h.try_record(event(0)));
    h.record(event(1)).await.expect("record");
    h.flush().await.expect("flush");
    assert_eq!(read_lines(dir.path()).len(), 2);
    assert!(h.stats().fsyncs >= 1, "flush syncs even under `never`");
    task.shutdown().await.expect("shutdown");
}

/// Under the default `batch` policy nobody waits for a batch's write (the
/// writer hands lines to the I/O thread and goes on): the lines still reach
/// the file and the counters, also when no later batch or flush follows.
#[tokio::test]
async fn unflushed_batches_reach_the_file_and_the_counters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (h, task) = AuditLog::open(config(dir.path()), None).expect("open");
    for i in 0..3 {
        h.record(event(i)).await.expect("record");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        eventually(Duration::from_secs(3), || h.stats().appended == 3
            && h.stats().fsyncs >= 1)
        .await,
        "counters after 3 s: {:?}",
        h.stats()
    );
    assert_eq!(read_lines(dir.path()).len(), 3);
    let stats = task.shutdown().await.expect("shutdown");
    assert_eq!(stats.appended, 3, "no checkpoint without a signer");
    assert_eq!(read_lines(dir.path()).len(), 3);
    assert_eq!(stats.lost, 0);
}

async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

#[tokio::test]
async fn idle_log_gets_a_timed_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.checkpoint_every = 1_000_000;
    cfg.checkpoint_interval = Duration::from_millis(50);
    cfg.fsync = FsyncPolicy::Interval(Duration::from_millis(20));
    let (signer, _) = mesh_signer(NODE);
    let (h, task) = AuditLog::open(cfg, Some(signer)).expect("open");
    for i in 0..3 {
        h.record(event(i)).await.expect("record");
    }
    assert!(
        eventually(Duration::from_secs(5), || h.stats().checkpoints == 1).await,
        "{:?}",
        h.stats()
    );
    // Nothing new since: no further checkpoint, even at shutdown.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stats = task.shutdown().await.expect("shutdown");
    assert_eq!(stats.checkpoints, 1);
    assert_eq!(stats.appended, 4);
    assert!(check(dir.path()).is_clean());
}

#[tokio::test]
async fn dropping_the_task_still_drains_and_seals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (signer, _) = mesh_signer(NODE);
    let (h, task) = AuditLog::open(config(dir.path()), Some(signer)).expect("open");
    for i in 0..10 {
        h.record(event(i)).await.expect("record");
    }
    drop(task);
    let path = dir.path().to_path_buf();
    let sealed = eventually(Duration::from_secs(5), || {
        let r = verify(&path, &VerifyOptions::default()).expect("verify");
        r.is_clean() && r.entries == 11 && r.checkpoints == 1
    })
    .await;
    assert!(sealed);
    assert!(matches!(h.record(event(0)).await, Err(AuditError::Closed)));
}

#[tokio::test]
async fn unsigned_log_verifies_without_checkpoints() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), None, 0, 120).await;
    let r = check(dir.path());
    assert!(r.is_clean());
    assert_eq!((r.entries, r.checkpoints, r.unsealed), (120, 0, 120));
}

#[tokio::test]
async fn absurd_periods_do_not_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.checkpoint_interval = Duration::MAX;
    cfg.fsync = "interval:18446744073709551615".parse().expect("policy");
    let (h, task) = AuditLog::open(cfg, None).expect("open");
    h.record(event(0)).await.expect("record");
    let stats = task.shutdown().await.expect("shutdown");
    assert_eq!(
        (stats.appended, stats.fsyncs),
        (1, 1),
        "synced once at shutdown"
    );
}
