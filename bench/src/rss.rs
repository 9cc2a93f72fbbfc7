//! `dmsc-bench registry-rss`: the memory a node needs to know a large mesh.
//!
//! Publisher nodes (`--publishers`, in this process) gossip `--agents`
//! remote agents (a record and a load report each, spread over `--tenants`
//! and over the publishers, as a mesh spreads them); the measured
//! node is a real `dmsc-node run` process that joins it and learns them
//! all through gossip, as it would from a mesh of many nodes. Reported: the
//! measured process's resident memory (VmRSS, and its peak VmHWM) before it
//! joins, when its registry holds every agent (`dmsc_agents` on
//! `/metrics`), and how long learning them took.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dmsc_node::config::RawConfig;
use dmsc_node::App;
use dmsc_registry::{AgentRecord, Health, LoadReport, SkillTags};
use dmsc_transport::pki::{CertificateAuthority, NODE_VALIDITY};
use tokio::time::Instant;

#[derive(clap::Args)]
pub struct RssArgs {
    /// Remote agents the publisher gossips.
    #[arg(long, default_value_t = 100_000)]
    agents: usize,
    /// Tenants they are spread over.
    #[arg(long, default_value_t = 100)]
    tenants: usize,
    /// Nodes they are spread over (each a full node in this process; at
    /// 100k agents more than one saturates two cores: they also learn each
    /// other's agents).
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// The `dmsc-node` binary to measure (default: beside this one).
    #[arg(long)]
    node_bin: Option<PathBuf>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Seconds between the last agent learned and the reading of RSS.
    #[arg(long, default_value_t = 5)]
    settle_secs: u64,
}

fn record(i: usize) -> String {
    AgentRecord {
        digest: format!("{:016x}", i as u64 * 0x9e37_79b9_7f4a_7c15).repeat(4),
        skills: (0..2)
            .map(|s| SkillTags {
                id: format!("skill-{s}"),
                name: format!("Skill {s} of agent {i}"),
                tags: vec![
                    "invoices".into(),
                    format!("topic-{}", i % 1000),
                    format!("region-{}", i % 7),
                ],
            })
            .collect(),
        protocols: vec!["JSONRPC".into()],
        a2a: Vec::new(),
        health: Health::Healthy,
        // Far out: the publisher does not renew them during the run.
        expires_ms: u64::MAX / 2,
    }
    .encode()
}

/// Resident and peak resident memory of `pid`, in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `dmsc_agents` from the node's `/metrics`, if it answers.
async fn agents_known(admin: u16) -> Option<u64> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", admin))
        .await
        .ok()?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix("dmsc_agents "))
        .and_then(|v| v.trim().parse().ok())
}

fn node_bin(args: &RssArgs) -> anyhow::Result<PathBuf> {
    let bin = match &args.node_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(|d| d.join("dmsc-node"))
            .ok_or_else(|| anyhow::anyhow!("no directory for this binary"))?,
    };
    anyhow::ensure!(
        bin.is_file(),
        "{} not found: build it (cargo build --release -p dmsc-node) or pass --node-bin",
        bin.display()
    );
    Ok(bin)
}

fn write_config(
    dir: &Path,
    admin: u16,
    bootstrap: std::net::SocketAddr,
) -> anyhow::Result<PathBuf> {
    let path = dir.join("node.toml");
    let mut f = std::fs::File::create(&path)?;
    writeln!(
        f,
        "name = \"measured\"\ndata_dir = \"data\"\n\
         [overlay]\nlisten = \"127.0.0.1:0\"\nbootstrap = [\"{bootstrap}\"]\n\
         [tls]\nca = \"ca.pem\"\ncert = \"node.pem\"\nkey = \"node.key\"\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\""
    )?;
    Ok(path)
}

pub async fn run(args: RssArgs) -> anyhow::Result<()> {
    let bin = node_bin(&args)?;
    let dir = tempfile::tempdir()?;
    let ca = CertificateAuthority::generate("bench.local")?;
    ca.issue_node("measured", NODE_VALIDITY)?
        .write_node_dir(&dir.path().join("measured"), &ca.cert_pem)?;
    let mut publishers: Vec<App> = Vec::new();
    for p in 0..args.publishers.max(1) {
        let name = format!("publisher-{p}");
        let nd = dir.path().join(&name);
        ca.issue_node(&name, NODE_VALIDITY)?
            .write_node_dir(&nd, &ca.cert_pem)?;
        let seed = publishers.first().map(|a| a.bound().overlay);
        publishers.push(App::build(RawConfig::loopback(&name, &nd, seed).validate()?).await?);
    }
    let t = Instant::now();
    for i in 0..args.agents {
        let (tenant, name) = (format!("t{}", i % args.tenants), format!("agent-{i}"));
        let g = publishers[i % publishers.len()].gossip();
        g.set(&dmsc_registry::agent_key(&tenant, &name), &record(i))
            .await;
        let load = LoadReport {
            in_flight: (i % 5) as u32,
            ewma_ms: 3.0 + (i % 11) as f32,
            ..Default::default()
        };
        g.set(&dmsc_registry::load_key(&tenant, &name), &load.encode())
            .await;
    }
    eprintln!(
        "{} publishers hold {} agents ({:?})",
        publishers.len(),
        args.agents,
        t.elapsed()
    );

    let admin = free_port()?;
    let measured_dir = dir.path().join("measured");
    let config = write_config(&measured_dir, admin, publishers[0].bound().overlay)?;
    let mut child = tokio::process::Command::new(&bin)
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| anyhow::anyhow!("the node exited at once"))?;
    let started = Instant::now();
    // Its idle footprint: up and answering, before gossip has delivered much.
    let mut idle = None;
    let limit = Duration::from_secs(args.timeout_secs);
    let learned = loop {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("the measured node exited: {status}");
        }
        anyhow::ensure!(
            started.elapsed() < limit,
            "the node did not learn {} agents within {limit:?}",
            args.agents
        );
        let known = agents_known(admin).await;
        if idle.is_none() && known.is_some() {
            idle = Some((rss_kib(pid)?, known.unwrap_or(0), started.elapsed()));
        }
        if known.is_some_and(|n| n as usize >= args.agents) {
            break started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Let allocations settle (caches filled, gossip at steady state).
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let full = rss_kib(pid)?;
    let ((idle_rss, _), idle_known, idle_at) = idle.unwrap_or(((0, 0), 0, Duration::ZERO));
    println!(
        "| agents | tenants | nodes | RSS when up ({} agents known, {:.1} s) | RSS with all agents | peak RSS | all agents learned after |",
        idle_known,
        idle_at.as_secs_f64()
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {:.1} MB | {:.1} MB | {:.1} MB | {:.1} s |",
        args.agents,
        args.tenants,
        args.publishers.max(1),
        idle_rss as f64 / 1024.0,
        full.0 as f64 / 1024.0,
        full.1 as f64 / 1024.0,
        learned.as_secs_f64()
    );
    // A graceful stop (a profiler wrapping the node writes its data then).
    let _ = std::process::Command::new("kill")
        .arg(pid.to_string())
        .status();
    if tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .is_err()
    {
        child.kill().await?;
    }
    for p in publishers {
        p.stop().await;
    }
    Ok(())
}
