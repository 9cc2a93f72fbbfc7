//! `dmsc-bench gossip`: membership convergence, key propagation, failure
//! detection and gossip bandwidth, for real clusters (full `App`s over QUIC
//! on loopback) and simulated ones (the same chitchat and encoding over the
//! in-memory network, on a paused clock).
//!
//! Every node carries the gossip keys a running mesh has: its `node`
//! announcement, a record and a load report per agent (`--agents`), the
//! tenant policy announcement, and the operator's revocations (every node
//! re-publishes each one). During the bandwidth window the mesh changes the
//! way a working one does: load reports change (`--load-changes` per node per
//! second) and agent records are renewed (`--renew-secs`, by default every
//! 100 s: a third of the default 300 s TTL). `--compact on|off|both` runs each size with and without
//! compact digests (`docs/gossip.md`), side by side.

use std::time::Duration;

use dmsc_gossip::sim::SimNetwork;
use dmsc_gossip::{Gossip, GossipConfig, GossipStats, MemberState};
use dmsc_node::config::{RawConfig, RawGossip};
use dmsc_node::App;
use dmsc_registry::{AgentRecord, Health, LoadReport, SkillTags};
use dmsc_transport::pki::{CertificateAuthority, NODE_VALIDITY};
use std::sync::atomic::Ordering;
use tokio::time::Instant;

#[derive(clap::Args)]
pub struct GossipArgs {
    /// Real loopback cluster sizes (empty: none).
    #[arg(long, value_delimiter = ',', default_value = "3,10,30")]
    real: Vec<String>,
    /// Simulated cluster sizes (empty: none).
    #[arg(long, value_delimiter = ',', default_value = "100,500")]
    sim: Vec<String>,
    /// Gossip round interval (default: the node's).
    #[arg(long, default_value_t = dmsc_gossip::gossip_defaults::INTERVAL.as_millis() as u64)]
    interval_ms: u64,
    #[arg(long, default_value_t = 8.0)]
    phi: f64,
    /// Steady-state window for the bandwidth figure.
    #[arg(long, default_value_t = 5)]
    window_secs: u64,
    /// Time the mesh runs (with churn) before that window: a node learns
    /// each peer's id list from that peer's own digests, so compact digests
    /// reach their steady size only once every pair has talked.
    #[arg(long, default_value_t = 10)]
    settle_secs: u64,
    /// Agents per node (each: an `agent/…` record and a `load/…` report).
    #[arg(long, default_value_t = 5)]
    agents: usize,
    /// Load reports each node changes per second during the window.
    #[arg(long, default_value_t = 2.0)]
    load_changes: f64,
    /// Seconds between renewals of each agent record (a node renews every
    /// third of `agent_ttl_secs`, 300 s by default).
    #[arg(long, default_value_t = 100)]
    renew_secs: u64,
    /// Compact digests: on, off, or both (each size twice, side by side).
    #[arg(long, default_value = "both")]
    compact: String,
}

struct Row {
    kind: &'static str,
    compact: bool,
    n: usize,
    converge: Duration,
    propagate: Duration,
    detect: Duration,
    /// Bytes per node per second: all, then SYN, SYN-ACK, ACK.
    rate: [f64; 4],
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn sizes(v: &[String]) -> anyhow::Result<Vec<usize>> {
    v.iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| Ok(s.trim().parse()?))
        .collect()
}

pub fn run(args: GossipArgs) -> anyhow::Result<()> {
    let window = Duration::from_secs(args.window_secs);
    let modes: &[bool] = match args.compact.as_str() {
        "on" => &[true],
        "off" => &[false],
        "both" => &[false, true],
        other => anyhow::bail!("--compact {other}: expected on, off or both"),
    };
    let w = Workload {
        agents: args.agents,
        load_changes: args.load_changes,
        settle: Duration::from_secs(args.settle_secs),
        renew: Duration::from_secs(args.renew_secs),
    };
    let mut rows = Vec::new();
    let clusters = sizes(&args.real)?.into_iter().map(|n| (n, false));
    for (n, simulated) in clusters.chain(sizes(&args.sim)?.into_iter().map(|n| (n, true))) {
        for &compact in modes {
            let run = Run {
                args: &args,
                compact,
                w: &w,
                window,
            };
            let row = if simulated {
                // Paused clock: time advances only when every node is idle.
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .start_paused(true)
                    .build()?;
                rt.block_on(sim(n, &run))?
            } else {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(real(n, &run))?
            };
            eprintln!("{} {n} (compact {compact}): done", row.kind);
            rows.push(row);
        }
    }
    println!(
        "gossip interval {} ms, phi threshold {}, {} agents per node, {} load changes per node per second, records renewed every {} s, {} s window after {} s",
        args.interval_ms, args.phi, args.agents, args.load_changes, args.renew_secs, args.window_secs, args.settle_secs
    );
    println!("| cluster | nodes | digests | membership converged | key on all nodes | dead node detected by all | gossip bytes/node/s | SYN | SYN-ACK | ACK |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            r.kind,
            r.n,
            if r.compact { "compact" } else { "chitchat" },
            ms(r.converge),
            ms(r.propagate),
            ms(r.detect),
            r.rate[0],
            r.rate[1],
            r.rate[2],
            r.rate[3],
        );
    }
    Ok(())
}

/// What one cluster run is measured with.
#[derive(Clone, Copy)]
struct Run<'a> {
    args: &'a GossipArgs,
    compact: bool,
    w: &'a Workload,
    window: Duration,
}

/// The keys a node of a working mesh gossips, and how they change.
struct Workload {
    agents: usize,
    load_changes: f64,
    settle: Duration,
    renew: Duration,
}

/// A 64-hex-digit stand-in for a SHA-256 (card digests, policy digests, signatures).
fn hex64(seed: usize) -> String {
    format!("{:016x}", seed as u64 * 0x9e37_79b9_7f4a_7c15).repeat(4)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

fn record(node: usize, agent: usize) -> String {
    AgentRecord {
        digest: hex64(node * 1000 + agent),
        skills: (0..2)
            .map(|s| SkillTags {
                id: format!("skill-{s}"),
                name: format!("Skill {s} of agent {agent}"),
                tags: vec![
                    "invoices".into(),
                    "billing".into(),
                    format!("region-{node}"),
                ],
            })
            .collect(),
        protocols: vec!["JSONRPC".into()],
        a2a: Vec::new(),
        health: Health::Healthy,
        expires_ms: now_ms() + 60_000,
    }
    .encode()
}

fn load(i: u64) -> String {
    LoadReport {
        in_flight: (i % 7) as u32,
        queue: 0,
        ewma_ms: 3.0 + (i % 13) as f32 * 0.37,
        error_rate: 0.0,
        cpu: 0.0,
    }
    .encode()
}

impl Workload {
    /// The keys node `i` starts with (besides the `node` key a real node sets itself).
    fn initial(&self, i: usize) -> Vec<(String, String)> {
        let mut kv = vec![("policy/acme".to_string(), format!("3:{}", hex64(7)))];
        for r in 0..3 {
            kv.push((
                format!("revoked/{:032x}", r + 1),
                format!(
                    r#"{{"v":1,"serial":"{:032x}","reason":"key-compromise","revoked_at":1764000000,"sig":"{}{}"}}"#,
                    r + 1,
                    hex64(r),
                    hex64(r + 1)
                ),
            ));
        }
        for a in 0..self.agents {
            kv.push((format!("agent/acme/agent-{i}-{a}"), record(i, a)));
            kv.push((format!("load/acme/agent-{i}-{a}"), load(a as u64)));
        }
        kv
    }

    /// What a node's own gossip would say about itself (the simulator's
    /// nodes have no `App` to set it).
    fn node_key(&self, i: usize) -> (String, String) {
        (
            dmsc_gossip::KEY_NODE.to_string(),
            format!(
                r#"{{"name":"n{i}","region":"region-{}","overlay":"10.0.{}.{}:7400","spiffe":"spiffe://bench.local/node/n{i}","version":"0.1.0","started_at":1764000000,"roles":[],"wire":2}}"#,
                i % 3,
                i / 250,
                i % 250
            ),
        )
    }

    /// Changes load reports and renews agent records on `g` for `window`.
    async fn churn(&self, g: &Gossip, i: usize, window: Duration) {
        if self.agents == 0 {
            tokio::time::sleep(window).await;
            return;
        }
        let end = Instant::now() + window;
        let every = if self.load_changes > 0.0 {
            Duration::from_secs_f64(1.0 / self.load_changes)
        } else {
            window
        };
        let renew = self.renew / self.agents as u32;
        // Spread the nodes' phases over one period.
        let mut next_load = Instant::now() + every.mul_f64((i % 97) as f64 / 97.0);
        let mut next_renew = Instant::now() + renew.mul_f64((i % 89) as f64 / 89.0);
        let mut k = i as u64;
        loop {
            let at = next_load.min(next_renew);
            if at >= end {
                tokio::time::sleep_until(end).await;
                return;
            }
            tokio::time::sleep_until(at).await;
            k += 1;
            let a = (k as usize) % self.agents;
            if at == next_load {
                g.set(&format!("load/acme/agent-{i}-{a}"), &load(k)).await;
                next_load += every;
            } else {
                g.set(&format!("agent/acme/agent-{i}-{a}"), &record(i, a))
                    .await;
                next_renew += renew;
            }
        }
    }
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

fn sent(s: &GossipStats) -> [u64; 4] {
    [
        s.bytes_sent.load(Ordering::Relaxed),
        s.syn_bytes_sent.load(Ordering::Relaxed),
        s.syn_ack_bytes_sent.load(Ordering::Relaxed),
        s.ack_bytes_sent.load(Ordering::Relaxed),
    ]
}

fn total_sent(nodes: &[&Gossip]) -> [u64; 4] {
    let mut t = [0u64; 4];
    for g in nodes {
        for (a, b) in t.iter_mut().zip(sent(&g.stats())) {
            *a += b;
        }
    }
    t
}

/// Compact digest entries sent: (with the full id, by position).
fn entries_sent(nodes: &[&Gossip]) -> (u64, u64) {
    nodes.iter().fold((0, 0), |(f, p), g| {
        let s = g.stats();
        (
            f + s.compact_full_entries.load(Ordering::Relaxed),
            p + s.compact_positional_entries.load(Ordering::Relaxed),
        )
    })
}

struct Cluster<'a> {
    kind: &'static str,
    compact: bool,
    gossips: Vec<&'a Gossip>,
    started: Instant,
}

async fn measure(
    c: Cluster<'_>,
    w: &Workload,
    window: Duration,
    kill: impl FnOnce(),
) -> anyhow::Result<Row> {
    let n = c.gossips.len();
    let gossips = c.gossips;
    let limit = Duration::from_secs(120);
    wait_until(limit, || all_alive(&gossips, n)).await?;
    let converge = c.started.elapsed();

    let t = Instant::now();
    gossips[n / 2].set("bench/key", "v1").await;
    wait_until(limit, || all_have(&gossips, "bench/key", "v1")).await?;
    let propagate = t.elapsed();

    let settle: Vec<_> = gossips
        .iter()
        .enumerate()
        .map(|(i, g)| w.churn(g, i, w.settle))
        .collect();
    futures_util::future::join_all(settle).await;
    let before = total_sent(&gossips);
    let entries_before = entries_sent(&gossips);
    let t = Instant::now();
    let churn: Vec<_> = gossips
        .iter()
        .enumerate()
        .map(|(i, g)| w.churn(g, i, window))
        .collect();
    futures_util::future::join_all(churn).await;
    let after = total_sent(&gossips);
    let entries = entries_sent(&gossips);
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "{} {n}: compact digest entries in the window: {} with the full id, {} by position",
        c.kind,
        entries.0 - entries_before.0,
        entries.1 - entries_before.1
    );
    let mut rate = [0f64; 4];
    for (k, r) in rate.iter_mut().enumerate() {
        *r = (after[k] - before[k]) as f64 / n as f64 / secs;
    }

    let victim = gossips[n - 1].config().node_name.clone();
    kill();
    let t = Instant::now();
    let others = &gossips[..n - 1];
    wait_until(limit, || all_see_dead(others, &victim)).await?;
    let detect = t.elapsed();
    Ok(Row {
        kind: c.kind,
        compact: c.compact,
        n,
        converge,
        propagate,
        detect,
        rate,
    })
}

async fn real(n: usize, run: &Run<'_>) -> anyhow::Result<Row> {
    let Run {
        args,
        compact,
        w,
        window,
    } = *run;
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
            interval_ms: Some(args.interval_ms),
            phi_threshold: Some(args.phi),
            compact_digests: Some(compact),
            ..Default::default()
        };
        let app = App::build(raw.validate()?).await?;
        for (k, v) in w.initial(i) {
            app.gossip().set(&k, &v).await;
        }
        apps.push(app);
    }
    let victim = apps.pop().ok_or_else(|| anyhow::anyhow!("no nodes"))?;
    let mut gossips: Vec<&Gossip> = apps.iter().map(|a| &**a.gossip()).collect();
    gossips.push(&**victim.gossip());
    // Crash, not leave: stop its gossip and close its overlay without announcing.
    let crash = || {
        let (gossip, overlay) = (victim.gossip().clone(), victim.overlay().clone());
        tokio::spawn(async move {
            gossip.stop().await;
            overlay.shutdown().await;
        });
    };
    let c = Cluster {
        kind: "real QUIC",
        compact,
        gossips,
        started,
    };
    let row = measure(c, w, window, crash).await?;
    for a in apps {
        a.stop().await;
    }
    Ok(row)
}

async fn sim(n: usize, run: &Run<'_>) -> anyhow::Result<Row> {
    let Run {
        args,
        compact,
        w,
        window,
    } = *run;
    let net = SimNetwork::new(65_507);
    let addr =
        |i: usize| std::net::SocketAddr::from(([10, (i / 250) as u8, (i % 250) as u8, 1], 7400));
    let started = Instant::now();
    let mut nodes = Vec::new();
    for i in 0..n {
        let t = net.attach(addr(i));
        let mut cfg = GossipConfig::new(&format!("n{i}"), addr(i), "sim");
        cfg.seeds = vec![addr(0).to_string()];
        cfg.interval = Duration::from_millis(args.interval_ms);
        cfg.phi_threshold = args.phi;
        cfg.suspect_after = cfg.interval * 5;
        cfg.compact_digests = compact;
        let mut initial = w.initial(i);
        initial.push(w.node_key(i));
        nodes.push(Gossip::start(cfg, &t, initial).await?);
    }
    let victim = addr(n - 1);
    let c = Cluster {
        kind: "simulated",
        compact,
        gossips: nodes.iter().collect(),
        started,
    };
    measure(c, w, window, || net.isolate(victim)).await
}
