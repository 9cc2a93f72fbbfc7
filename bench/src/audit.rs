//! `dmsc-bench audit`: what the audit log costs the data path.
//!
//! For each fsync policy, `--concurrency` producer tasks record
//! `--entries` delegation events in total through one `AuditHandle` into a
//! fresh log in a temp dir (with a signer, so checkpoints are included).
//! Reported: append throughput from the first `record()` to the end of
//! `shutdown()` (everything written, sealed and synced), and the latency of
//! the `record()` call itself (what a delegation pays), p50 / p99 / max.
//! The log is verified afterwards so a fast but broken writer cannot win.
//! `--sealed` seals each event's tenant payload as a node does.

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Context;
use dmsc_audit::{AuditConfig, AuditLog, Delegation, Event, FsyncPolicy, Signer, VerifyOptions};

#[derive(clap::Args, Debug, Clone)]
pub struct AuditArgs {
    /// Events recorded per policy.
    #[arg(long, default_value_t = 200_000)]
    pub entries: usize,
    /// Fsync policies to compare: batch, never, interval:<ms>.
    #[arg(long, value_delimiter = ',', default_value = "batch,never,interval:10")]
    pub policies: Vec<String>,
    /// Producer tasks recording concurrently.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Seal each event's tenant payload with a tenant key (as a node does;
    /// a key store in the temp dir, 8 tenants).
    #[arg(long)]
    pub sealed: bool,
}

struct Row {
    policy: String,
    entries: usize,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
    queue_full_waits: u64,
    fsyncs: u64,
    checkpoints: u64,
    bytes: u64,
}

fn event(i: usize) -> Event {
    Event::tenant(
        format!("tenant-{}", i % 8),
        Delegation {
            caller: format!("agent-{}", i % 100),
            target: "tag:summarize".into(),
            route: "p2c load 0.21 vs 0.64".into(),
            agent: Some("summarizer-3".into()),
            serving_node: Some("eu-2".into()),
            outcome: "ok".into(),
            status: Some(200),
            duration_ms: (i % 250) as u64,
            trace_id: Some(format!("{i:032x}")),
        },
    )
}

fn pct(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

async fn run_one(policy: &str, args: &AuditArgs) -> anyhow::Result<Row> {
    let fsync = FsyncPolicy::from_str(policy)?;
    let dir = tempfile::tempdir().context("temp dir for the audit log")?;
    let mut cfg = AuditConfig::new(dir.path(), "bench");
    cfg.fsync = fsync;
    if args.sealed {
        let keys = dmsc_keys::KeyStore::load(dir.path()).context("tenant key store")?;
        cfg.sealer = Some(std::sync::Arc::new(
            dmsc_node::security::tenant_keys::AuditSealer(std::sync::Arc::new(keys)),
        ));
    }
    let signer = Signer::generate_self_signed("bench")?;
    let (handle, task) = AuditLog::open(cfg, Some(signer))?;

    let producers = args.concurrency.max(1);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(producers);
    for p in 0..producers {
        let share = args.entries / producers + usize::from(p < args.entries % producers);
        let handle = handle.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(share);
            for i in 0..share {
                let e = event(p + i * producers);
                let t = Instant::now();
                handle.record(e).await?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::with_capacity(args.entries);
    for t in tasks {
        lat.extend(t.await.context("producer task")??);
    }
    let stats = task.shutdown().await?;
    let elapsed = started.elapsed();
    lat.sort_unstable();

    let report = dmsc_audit::verify(dir.path(), &VerifyOptions::default())?;
    anyhow::ensure!(
        report.is_clean(),
        "{policy}: the written log does not verify: {:?}",
        report.problem
    );
    anyhow::ensure!(
        report.entries == stats.appended,
        "{policy}: verified {} lines but the writer appended {}",
        report.entries,
        stats.appended
    );
    Ok(Row {
        policy: if args.sealed {
            format!("{policy} (sealed)")
        } else {
            policy.to_string()
        },
        entries: args.entries,
        elapsed,
        p50: pct(&lat, 0.50),
        p99: pct(&lat, 0.99),
        max: lat.last().copied().unwrap_or_default(),
        queue_full_waits: stats.queue_full_waits,
        fsyncs: stats.fsyncs,
        checkpoints: stats.checkpoints,
        bytes: stats.bytes,
    })
}

pub async fn run(args: AuditArgs) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for policy in &args.policies {
        eprintln!(
            "audit: {policy}, {} entries from {} producers...",
            args.entries, args.concurrency
        );
        rows.push(run_one(policy, &args).await?);
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "| fsync | entries | entries/s (to durable shutdown) | record() p50 µs | p99 µs | max µs | queue-full waits | fsyncs | checkpoints | MiB |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.0} | {} | {} | {} | {:.1} |",
            r.policy,
            r.entries,
            r.entries as f64 / r.elapsed.as_secs_f64(),
            us(r.p50),
            us(r.p99),
            us(r.max),
            r.queue_full_waits,
            r.fsyncs,
            r.checkpoints,
            r.bytes as f64 / (1024.0 * 1024.0),
        );
    }
    Ok(())
}
