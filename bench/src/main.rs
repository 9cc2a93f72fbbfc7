//! `dmsc-bench`: reproducible measurements behind BENCHMARKS.md.
//!
//! `dmsc-bench gossip` measures, for each cluster size: membership
//! convergence (every node sees every other alive), propagation of a key set
//! on one node to all others, failure detection (one node stops abruptly,
//! time until all others say dead) and gossip bytes per node per second at
//! steady state. Sizes up to ~30 run as real nodes (QUIC, mutual TLS, the
//! full `App`) on loopback in this process; larger sizes run in the
//! simulator (same chitchat, same encoding, in-memory links, paused clock,
//! so its times are simulated time, independent of machine load).
//!
//! `dmsc-bench audit`, `jwt`, `handshake` and `auth-e2e` measure what the
//! security offload costs (see `audit.rs`, `jwt.rs`, `security.rs`).
//!
//! `dmsc-bench mask` measures masking throughput on JSON and SSE bodies
//! (see `mask.rs`).
//!
//! `dmsc-bench flood` checks that one tenant's flood (10x its rate limit)
//! leaves another tenant's latency and error rate as they were (see
//! `flood.rs`).
//!
//! `dmsc-bench balance` compares the registry's selection (P2C on gossiped
//! load plus local in-flight counts) with round-robin, random and an
//! omniscient oracle in a deterministic discrete-event simulation of
//! heterogeneous agents (see `balance.rs`).

mod audit;
mod balance;
mod e2e;
mod flood;
mod intent;
mod jwt;
mod mask;
mod mqtt;
mod policy;
mod security;

use std::time::Duration;

use clap::Parser;
use dmsc_gossip::sim::SimNetwork;
use dmsc_gossip::{Gossip, GossipConfig, MemberState};
use dmsc_node::config::{RawConfig, RawGossip};
use dmsc_node::App;
use dmsc_transport::pki::{CertificateAuthority, NODE_VALIDITY};
use tokio::time::Instant;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Intent routing accuracy on labelled sets (bench/intent/*.json).
    Intent(intent::IntentArgs),
    /// MQTT request/response through the mesh vs directly on the broker
    /// (needs mosquitto).
    Mqtt(mqtt::MqttArgs),
    /// Gossip convergence, propagation, failure detection and bandwidth.
    Gossip {
        /// Real loopback cluster sizes.
        #[arg(long, value_delimiter = ',', default_value = "3,10,30")]
        real: Vec<usize>,
        /// Simulated cluster sizes.
        #[arg(long, value_delimiter = ',', default_value = "100,500")]
        sim: Vec<usize>,
        #[arg(long, default_value_t = 200)]
        interval_ms: u64,
        #[arg(long, default_value_t = 8.0)]
        phi: f64,
        /// Steady-state window for the bandwidth figure.
        #[arg(long, default_value_t = 5)]
        window_secs: u64,
    },
    /// Load balancing quality: dmsc selection vs round-robin, random, oracle (simulated).
    Balance(balance::Args),
    /// End-to-end overhead, server side: backend + two nodes (run via bench/e2e.sh).
    E2eServe,
    /// The 1 KiB backend alone, for `bench/compare.sh` (each server its own
    /// process, as a user runs them).
    E2eBackend {
        #[arg(long, default_value = "127.0.0.1:18000")]
        listen: std::net::SocketAddr,
    },
    /// End-to-end overhead, load side: direct vs 1 node vs 2 nodes (run via bench/e2e.sh).
    E2eLoad(e2e::LoadArgs),
    /// Audit log append throughput and record() latency per fsync policy.
    Audit(audit::AuditArgs),
    /// JWT validations per second (RS256, ES256, EdDSA).
    Jwt(jwt::JwtArgs),
    /// New overlay connections (QUIC + mutual TLS 1.3 handshakes) per second.
    Handshake(security::HandshakeArgs),
    /// Delegation through two nodes with authentication off vs mTLS vs JWT.
    AuthE2e(security::AuthE2eArgs),
    /// Tenant-policy decision latency with documents of many rules.
    Policy(policy::PolicyArgs),
    /// Masking throughput (MB/s) on a ~64 KiB A2A body: JSON and SSE.
    Mask(mask::MaskArgs),
    /// Isolation under flood: tenant B's latency and errors while tenant A
    /// sends 10x its rate limit, alternating rounds.
    Flood(flood::FloodArgs),
    /// The flood benchmark's servers (backend, two nodes): run via bench/flood.sh.
    FloodServe(flood::FloodArgs),
    /// The flood benchmark's load (A and B): run via bench/flood.sh.
    FloodLoad(flood::FloodArgs),
}

struct Row {
    kind: &'static str,
    n: usize,
    converge: Duration,
    propagate: Duration,
    detect: Duration,
    bytes_per_node_sec: f64,
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

async fn wait_until<F, Fut>(limit: Duration, mut cond: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(
            start.elapsed() < limit,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn all_alive(nodes: &[&Gossip], n: usize) -> bool {
    for g in nodes {
        let alive = g
            .members()
            .await
            .iter()
            .filter(|m| m.state == MemberState::Alive)
            .count();
        if alive != n - 1 {
            return false;
        }
    }
    true
}

async fn all_have(nodes: &[&Gossip], key: &str, value: &str) -> bool {
    for g in nodes {
        if !g.values_of(key).await.iter().any(|(_, v)| v == value) {
            return false;
        }
    }
    true
}

async fn all_see_dead(nodes: &[&Gossip], name: &str) -> bool {
    for g in nodes {
        let m = g.members().await;
        if m.iter().find(|m| m.name == name).map(|m| m.state) != Some(MemberState::Dead) {
            return false;
        }
    }
    true
}

async fn measure(
    kind: &'static str,
    n: usize,
    gossips: Vec<&Gossip>,
    started: Instant,
    window: Duration,
    kill: impl FnOnce(),
) -> anyhow::Result<Row> {
    let limit = Duration::from_secs(120);
    wait_until(limit, || all_alive(&gossips, n)).await?;
    let converge = started.elapsed();

    let t = Instant::now();
    gossips[n / 2].set("bench/key", "v1").await;
    wait_until(limit, || all_have(&gossips, "bench/key", "v1")).await?;
    let propagate = t.elapsed();

    let before: u64 = gossips
        .iter()
        .map(|g| {
            g.stats()
                .bytes_sent
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum();
    let t = Instant::now();
    tokio::time::sleep(window).await;
    let after: u64 = gossips
        .iter()
        .map(|g| {
            g.stats()
                .bytes_sent
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum();
    let bytes_per_node_sec = (after - before) as f64 / n as f64 / t.elapsed().as_secs_f64();

    let victim = gossips[n - 1].config().node_name.clone();
    kill();
    let t = Instant::now();
    let others = &gossips[..n - 1];
    wait_until(limit, || all_see_dead(others, &victim)).await?;
    let detect = t.elapsed();
    Ok(Row {
        kind,
        n,
        converge,
        propagate,
        detect,
        bytes_per_node_sec,
    })
}

async fn real(n: usize, interval_ms: u64, phi: f64, window: Duration) -> anyhow::Result<Row> {
    let dir = tempfile::tempdir()?;
    let ca = CertificateAuthority::generate("bench.local")?;
    let started = Instant::now();
    let mut apps: Vec<App> = Vec::new();
    for i in 0..n {
        let name = format!("n{i}");
        let nd = dir.path().join(&name);
        ca.issue_node(&name, NODE_VALIDITY)?
            .write_node_dir(&nd, &ca.cert_pem)?;
        let mut raw = RawConfig::loopback(&name, &nd, apps.first().map(|a| a.bound().overlay));
        raw.gossip = RawGossip {
            interval_ms: Some(interval_ms),
            phi_threshold: Some(phi),
            ..Default::default()
        };
        apps.push(App::build(raw.validate()?).await?);
    }
    let victim = apps.pop().ok_or_else(|| anyhow::anyhow!("no nodes"))?;
    let mut gossips: Vec<&Gossip> = apps.iter().map(|a| &**a.gossip()).collect();
    gossips.push(&**victim.gossip());
    // Crash, not leave: stop its gossip and close its overlay without announcing.
    let crash = || {
        // Abort its tasks outright (no leave), and close its overlay.
        let (gossip, overlay) = (victim.gossip().clone(), victim.overlay().clone());
        tokio::spawn(async move {
            gossip.stop().await;
            overlay.shutdown().await;
        });
    };
    let row = measure("real QUIC", n, gossips, started, window, crash).await?;
    for a in apps {
        a.stop().await;
    }
    Ok(row)
}

async fn sim(n: usize, interval_ms: u64, phi: f64, window: Duration) -> anyhow::Result<Row> {
    let net = SimNetwork::new(65_507);
    let addr =
        |i: usize| std::net::SocketAddr::from(([10, (i / 250) as u8, (i % 250) as u8, 1], 7400));
    let started = Instant::now();
    let mut nodes = Vec::new();
    for i in 0..n {
        let t = net.attach(addr(i));
        let mut cfg = GossipConfig::new(&format!("n{i}"), addr(i), "sim");
        cfg.seeds = vec![addr(0).to_string()];
        cfg.interval = Duration::from_millis(interval_ms);
        cfg.phi_threshold = phi;
        cfg.suspect_after = cfg.interval * 5;
        nodes.push(Gossip::start(cfg, &t, vec![]).await?);
    }
    let gossips: Vec<&Gossip> = nodes.iter().collect();
    let victim = addr(n - 1);
    measure("simulated", n, gossips, started, window, || {
        net.isolate(victim)
    })
    .await
}

fn print(rows: &[Row], interval_ms: u64, phi: f64) {
    println!("gossip interval {interval_ms} ms, phi threshold {phi}");
    println!("| cluster | nodes | membership converged | key on all nodes | dead node detected by all | gossip bytes/node/s |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {:.0} |",
            r.kind,
            r.n,
            ms(r.converge),
            ms(r.propagate),
            ms(r.detect),
            r.bytes_per_node_sec
        );
    }
}

fn rt() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Gossip {
            real: real_sizes,
            sim: sim_sizes,
            interval_ms,
            phi,
            window_secs,
        } => {
            let window = Duration::from_secs(window_secs);
            let mut rows = Vec::new();
            for n in real_sizes {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()?;
                let row = rt.block_on(real(n, interval_ms, phi, window))?;
                eprintln!("real {n}: done");
                rows.push(row);
            }
            for n in sim_sizes {
                // Paused clock: time advances only when every node is idle.
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .start_paused(true)
                    .build()?;
                let row = rt.block_on(sim(n, interval_ms, phi, window))?;
                eprintln!("sim {n}: done");
                rows.push(row);
            }
            print(&rows, interval_ms, phi);
        }
        Cmd::Balance(args) => balance::run(args)?,
        Cmd::Audit(args) => rt()?.block_on(audit::run(args))?,
        Cmd::Jwt(args) => rt()?.block_on(jwt::run(args))?,
        Cmd::Handshake(args) => rt()?.block_on(security::handshake(args))?,
        Cmd::AuthE2e(args) => rt()?.block_on(security::auth_e2e(args))?,
        Cmd::Policy(args) => policy::run(args)?,
        Cmd::Mask(args) => mask::run(args)?,
        Cmd::Intent(args) => intent::run(args)?,
        Cmd::Mqtt(args) => rt()?.block_on(mqtt::run(args))?,
        Cmd::Flood(args) => rt()?.block_on(flood::run(args))?,
        Cmd::FloodServe(args) => rt()?.block_on(flood::serve(args))?,
        Cmd::FloodLoad(args) => {
            // One thread, on its own core (bench/flood.sh pins it).
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(flood::load(args))?
        }
        Cmd::E2eBackend { listen } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind(listen).await?;
                e2e::backend(l).await;
                anyhow::Ok(())
            })?
        }
        Cmd::E2eServe => {
            // One worker per available core: pinned to one core, one worker.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(e2e::serve())?
        }
        Cmd::E2eLoad(args) => {
            // The load generator is one thread (its own core).
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(e2e::load(args))?
        }
    }
    Ok(())
}
