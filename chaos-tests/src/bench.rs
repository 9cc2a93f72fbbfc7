//! `dmsc-chaos bench-relay`: issue 11's benchmarks of relays and NAT
//! traversal, on real `dmsc-node` processes in one lab, every variant in
//! one run (the machine is shared: read the ratios).
//!
//! Shape:
//!
//! ```text
//!  wan 10.99.0.0/24: r1 (relay)  c1 (client)  c1n (client, direct_upgrade = false)  s1d (public)
//!  gw1 --EI NAT-- nat1: s1r (direct_upgrade = false)        variant (ii)  relayed over QUIC
//!  gw2 --EI NAT-- nat2: s1p (hole punching on)              variant (iii) direct after punching
//!  gw3 --EI NAT-- nat3: s1t (UDP blocked, nft)              variant (iv)  relayed over TCP + TLS
//! ```
//!
//! Every `s1*` host runs `dmsc-node sample-agent` (`echo-<host>`, answers
//! GET with an echo) and a node home to it. The client of (i), (iii) and
//! (iv) is `c1`; the client of (ii) is `c1n`, which, like `s1r`, has
//! `[overlay] direct_upgrade = false` (both ends must have it off, or the
//! public end's pings would punch the hole). Load is `dmsc-chaos load`
//! inside the client's namespace against its ingress, Host
//! `echo-<host>.acme.dmsc`. All node and agent processes are pinned to CPU 0
//! (`taskset -a -p`), the load generator to CPU 1.
//!
//! Measured:
//! 1. p50/p99 at fixed rates (bounded counts) and max throughput (a closed
//!    loop: a rate no worker can keep up with), per variant, in rounds
//!    whose variant order alternates;
//! 2. the relay's CPU (utime+stime of `r1`, `/proc/<pid>/stat`) over each
//!    load, per successful request, raw and net of its idle rate;
//! 3. time from a NAT'd node's process start to the first successful
//!    request to its agent, and from then to `status` on the client showing
//!    the peer `direct` (repetitions: kill, wait until the client sees it
//!    gone, restart);
//! 4. (ii) vs (iv) from the same numbers.
//!
//! Bounded: every loop has a count or a deadline. The lab (and every
//! process in it) is removed when this returns.

use crate::lab::{Lab, Nat};
use crate::load::Summary;
use crate::node::{AgentProc, MeshCa, NodeConfig, NodeProc, INGRESS, OVERLAY_PORT, TENANT};
use crate::{run, Error, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    pub node_bin: PathBuf,
    pub chaos_bin: PathBuf,
    /// Fixed rates (requests per second), each for `secs` seconds.
    pub rates: Vec<f64>,
    pub secs: f64,
    /// Workers of the fixed-rate loads.
    pub rate_workers: usize,
    /// Requests and workers of the closed-loop max-throughput load.
    pub max_count: u64,
    pub max_workers: usize,
    pub rounds: usize,
    /// Repetitions of the path-establishment measure.
    pub reps: usize,
    /// Pin nodes and agents to CPU 0, the load generator to CPU 1.
    pub pin: bool,
    /// Seconds to wait, after the client sees the killed server gone,
    /// before restarting it (a direct path is dropped after 6.5 s without
    /// an answer: under that, the client may still hold the old one).
    pub settle_secs: f64,
}

/// One variant: who calls whom.
#[derive(Debug, Clone, Copy)]
struct Variant {
    key: &'static str,
    what: &'static str,
    client: &'static str,
    server: &'static str,
}

const VARIANTS: [Variant; 4] = [
    Variant {
        key: "i-direct",
        what: "(i) s1 public, direct",
        client: "c1",
        server: "s1d",
    },
    Variant {
        key: "ii-relay-quic",
        what: "(ii) s1 behind NAT, relayed via r1 (QUIC), no punching",
        client: "c1n",
        server: "s1r",
    },
    Variant {
        key: "iii-punched",
        what: "(iii) s1 behind EI NAT, hole punched (direct)",
        client: "c1",
        server: "s1p",
    },
    Variant {
        key: "iv-relay-tcp",
        what: "(iv) s1 UDP blocked, relayed via r1 (TCP+TLS session)",
        client: "c1",
        server: "s1t",
    },
];

/// One load's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub round: usize,
    pub variant: String,
    /// `rate-200`, `rate-1000`, `max`.
    pub load: String,
    pub offered_rate: Option<f64>,
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub elapsed_s: f64,
    pub achieved_per_s: f64,
    /// The relay's CPU over the load, per successful request (µs).
    pub relay_cpu_us_per_req: f64,
    /// The same, net of the relay's idle CPU rate over the same time.
    pub relay_cpu_net_us_per_req: f64,
    /// The client's `status` for the server, after the load.
    pub path_after: String,
    pub first_errors: Vec<String>,
}

/// One repetition of the establishment measure.
#[derive(Debug, Clone, Serialize)]
pub struct Establish {
    pub server: String,
    pub client: String,
    /// Kill to the client's `status` no longer showing the server alive.
    pub gone_s: Option<f64>,
    pub settle_s: f64,
    /// Process start to `dmsc-node ready`.
    pub ready_s: f64,
    /// Process start to the first successful request (None: not within the limit).
    pub first_ok_s: Option<f64>,
    /// The client's `status` path for the server right after that success.
    pub path_at_first_ok: String,
    /// First success to `status` showing `direct` (None: not within the limit).
    pub to_direct_s: Option<f64>,
    pub probes: u32,
}

/// Everything, printed as JSON by `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub node_bin: String,
    pub pinned: bool,
    pub relay_idle_cpu_pct: f64,
    pub samples: Vec<Sample>,
    pub establish: Vec<Establish>,
    /// Path of each variant's server as its client saw it before the loads.
    pub paths_before: BTreeMap<String, serde_json::Value>,
    pub started: String,
    pub elapsed_s: f64,
}

struct Bench {
    nodes: BTreeMap<String, NodeProc>,
    _agents: Vec<AgentProc>,
    // Last: dropped after the processes.
    lab: Lab,
}

const AGENT_LISTEN: &str = "127.0.0.1:9101";

fn agent_host(server: &str) -> String {
    format!("echo-{server}.{TENANT}.dmsc")
}

fn overlay(lab: &Lab, host: &str) -> Result<SocketAddr> {
    Ok(SocketAddr::new(lab.addr(host)?.into(), OVERLAY_PORT))
}

/// Runs every benchmark; the report.
pub fn run_bench(spec: &BenchSpec) -> Result<Report> {
    let t0 = Instant::now();
    let started = run(Command::new("date").arg("-u").arg("+%Y-%m-%dT%H:%M:%SZ"))?
        .trim()
        .to_string();
    let mut b = build(spec)?;
    if spec.pin {
        for n in ["r1", "c1", "c1n", "s1d", "s1r", "s1p", "s1t"] {
            pin(&b.lab, n)?;
        }
    }
    // Warm up every pair, and wait for (iii) to be punched.
    for v in VARIANTS {
        let s = load(&b.lab, spec, v, 100, 100.0, 2)?;
        eprintln!(
            "warm-up {}: {}/{} ok {:?}",
            v.key, s.ok, s.sent, s.first_errors
        );
    }
    let punched = crate::node::eventually(Duration::from_secs(30), || {
        path_of(&b, "c1", "s1p") == "direct"
    });
    eprintln!("c1 -> s1p direct: {punched:?}");
    let mut paths_before = BTreeMap::new();
    for v in VARIANTS {
        let p = b.nodes[v.client]
            .status()
            .ok()
            .and_then(|s| s.peer(v.server).cloned())
            .unwrap_or_default();
        // The server's view of the client: on a UDP-blocked server, the
        // transport of *its* relay session (tcp) shows here.
        let back = b.nodes[v.server]
            .status()
            .ok()
            .and_then(|s| s.peer(v.client).cloned())
            .unwrap_or_default();
        eprintln!("{} -> {}: {p}", v.client, v.server);
        eprintln!("{} -> {}: {back}", v.server, v.client);
        paths_before.insert(
            v.key.to_string(),
            serde_json::json!({ "client_view": p, "server_view": back }),
        );
    }
    let r1 = pid_in(&b.lab, "r1")?;
    let tick = clk_tck();
    // The relay's idle CPU rate (gossip, pings of every session).
    let (c0, i0) = (cpu_ticks(r1)?, Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let idle_rate = (cpu_ticks(r1)? - c0) as f64 / tick / i0.elapsed().as_secs_f64();
    eprintln!("relay idle CPU: {:.2} %", idle_rate * 100.0);

    let mut samples = Vec::new();
    for round in 0..spec.rounds {
        let order: Vec<Variant> = if round % 2 == 0 {
            VARIANTS.to_vec()
        } else {
            VARIANTS.iter().rev().copied().collect()
        };
        for v in order {
            let mut loads: Vec<(String, Option<f64>, u64, usize)> = spec
                .rates
                .iter()
                .map(|r| {
                    (
                        format!("rate-{r}"),
                        Some(*r),
                        (r * spec.secs).round() as u64,
                        spec.rate_workers,
                    )
                })
                .collect();
            loads.push(("max".into(), None, spec.max_count, spec.max_workers));
            for (name, rate, count, workers) in loads {
                let (c0, i0) = (cpu_ticks(r1)?, Instant::now());
                let s = load(&b.lab, spec, v, count, rate.unwrap_or(1e9), workers)?;
                let cpu = (cpu_ticks(r1)? - c0) as f64 / tick;
                let wall = i0.elapsed().as_secs_f64();
                let ok = s.ok.max(1) as f64;
                let sample = Sample {
                    round,
                    variant: v.key.into(),
                    load: name,
                    offered_rate: rate,
                    sent: s.sent,
                    ok: s.ok,
                    failed: s.failed,
                    p50_ms: s.p50_ms,
                    p99_ms: s.p99_ms,
                    max_ms: s.max_ms,
                    elapsed_s: s.elapsed_s,
                    achieved_per_s: s.ok as f64 / s.elapsed_s.max(1e-9),
                    relay_cpu_us_per_req: cpu / ok * 1e6,
                    relay_cpu_net_us_per_req: (cpu - idle_rate * wall) / ok * 1e6,
                    path_after: format!(
                        "{} / back: {}",
                        path_of(&b, v.client, v.server),
                        path_of(&b, v.server, v.client)
                    ),
                    first_errors: s.first_errors.iter().take(3).cloned().collect(),
                };
                eprintln!(
                    "round {round} {:<14} {:<10} ok {}/{} p50 {:.3} ms p99 {:.3} ms {:.0}/s relay {:.1} µs/req (net {:.1}) path {}",
                    sample.variant,
                    sample.load,
                    sample.ok,
                    sample.sent,
                    sample.p50_ms,
                    sample.p99_ms,
                    sample.achieved_per_s,
                    sample.relay_cpu_us_per_req,
                    sample.relay_cpu_net_us_per_req,
                    sample.path_after
                );
                samples.push(sample);
            }
        }
    }

    let mut establish = Vec::new();
    for rep in 0..spec.reps {
        for (client, server) in [("c1", "s1p"), ("c1n", "s1r")] {
            let e = establish_once(&mut b, spec, client, server)?;
            eprintln!("establish rep {rep}: {e:?}");
            establish.push(e);
        }
    }
    let report = Report {
        node_bin: spec.node_bin.display().to_string(),
        pinned: spec.pin,
        relay_idle_cpu_pct: idle_rate * 100.0,
        samples,
        establish,
        paths_before,
        started,
        elapsed_s: t0.elapsed().as_secs_f64(),
    };
    drop(b);
    Ok(report)
}

/// Builds the lab and starts every process; returns once the clients see
/// their servers' agents healthy.
fn build(spec: &BenchSpec) -> Result<Bench> {
    let bin = &spec.node_bin;
    let mut lab = Lab::new()?;
    for net in ["wan", "nat1", "nat2", "nat3"] {
        lab.network(net)?;
    }
    for h in ["r1", "c1", "c1n", "s1d"] {
        lab.host(h, "wan")?;
    }
    for (gw, net, h) in [
        ("gw1", "nat1", "s1r"),
        ("gw2", "nat2", "s1p"),
        ("gw3", "nat3", "s1t"),
    ] {
        lab.router(gw, net, "wan", Nat::EndpointIndependent)?;
        lab.host(h, net)?;
    }
    lab.block_udp("s1t")?;
    let ca = MeshCa::init(bin, &lab.dir().join("ca"))?;
    let r1 = overlay(&lab, "r1")?;
    let c1 = overlay(&lab, "c1")?;
    let mut nodes = BTreeMap::new();
    let mut agents = Vec::new();
    let start = |lab: &Lab, cfg: NodeConfig, no_upgrade: bool| -> Result<NodeProc> {
        let dir = lab.dir().join(&cfg.name);
        ca.issue_node(&cfg.name, &dir)?;
        let mut text = cfg.render(&dir);
        if no_upgrade {
            text = text.replacen("[overlay]\n", "[overlay]\ndirect_upgrade = false\n", 1);
        }
        let path = lab.dir().join(format!("{}.toml", cfg.name));
        std::fs::write(&path, text).map_err(Error::io(format!("write {}", path.display())))?;
        NodeProc::start_file(lab, bin, &cfg.name, &cfg.name, &path, &[])
    };
    nodes.insert(
        "r1".to_string(),
        start(
            &lab,
            NodeConfig {
                name: "r1".into(),
                overlay: Some(r1),
                relay: true,
                ..NodeConfig::default()
            },
            false,
        )?,
    );
    for h in ["c1", "c1n", "s1d", "s1r", "s1p", "s1t"] {
        let mut cfg = NodeConfig {
            name: h.into(),
            overlay: Some(overlay(&lab, h)?),
            bootstrap: vec![r1],
            relays: vec![r1],
            ..NodeConfig::default()
        };
        if h != "c1" {
            // c1 is a second observer of the NAT'd nodes' public address.
            cfg.bootstrap.push(c1);
        }
        if h.starts_with("s1") {
            agents.push(AgentProc::start(
                &lab,
                bin,
                h,
                AGENT_LISTEN,
                &format!("echo-{h}"),
                "echo",
            )?);
            cfg.agents = vec![format!("http://{AGENT_LISTEN}")];
        }
        let node = start(&lab, cfg, matches!(h, "c1n" | "s1r"))?;
        eprintln!("{h} is up ({})", lab.addr(h)?);
        nodes.insert(h.to_string(), node);
    }
    let b = Bench {
        nodes,
        _agents: agents,
        lab,
    };
    let t = crate::node::eventually(Duration::from_secs(60), || {
        VARIANTS.iter().all(|v| {
            b.nodes[v.client]
                .status()
                .map(|s| !s.healthy_agents_of(v.server).is_empty())
                .unwrap_or(false)
        })
    });
    match t {
        Some(t) => eprintln!("every client sees its server's agent healthy after {t:?}"),
        None => {
            return Err(Error::Setup(
                "the clients did not see their servers' agents within 60 s".into(),
            ))
        }
    }
    Ok(b)
}

/// `dmsc-chaos load` in the variant's client namespace; its summary.
fn load(
    lab: &Lab,
    spec: &BenchSpec,
    v: Variant,
    count: u64,
    rate: f64,
    workers: usize,
) -> Result<Summary> {
    load_to(lab, spec, v.client, v.server, count, rate, workers, 10)
}

#[allow(clippy::too_many_arguments)]
fn load_to(
    lab: &Lab,
    spec: &BenchSpec,
    client: &str,
    server: &str,
    count: u64,
    rate: f64,
    workers: usize,
    timeout_s: u64,
) -> Result<Summary> {
    let mut cmd = if spec.pin {
        let mut c = lab.command(client, "taskset")?;
        c.args(["-c", "1"]).arg(&spec.chaos_bin);
        c
    } else {
        lab.command(client, &spec.chaos_bin)?
    };
    cmd.args([
        "load",
        "--connect",
        INGRESS,
        "--host",
        &agent_host(server),
        "--path",
        "/bench",
        "--count",
        &count.to_string(),
        "--rate",
        &rate.to_string(),
        "--concurrency",
        &workers.to_string(),
        "--timeout",
        &timeout_s.to_string(),
        "--json",
    ]);
    let out = run(&mut cmd)?;
    serde_json::from_str(&out).map_err(|e| Error::Parse {
        what: format!("load {client} -> {server}"),
        detail: e.to_string(),
    })
}

/// The client's `status` path for `server` (`direct`, `relayed`, or `?`),
/// with the transport when relayed.
fn path_of(b: &Bench, client: &str, server: &str) -> String {
    match b.nodes[client].status() {
        Ok(s) => {
            let p = s.peer_path(server).unwrap_or_else(|| "?".into());
            match (p.as_str(), s.peer_via(server), s.peer_transport(server)) {
                ("relayed", Some(via), Some(t)) => format!("relayed via {via} ({t})"),
                _ => p,
            }
        }
        Err(_) => "status failed".into(),
    }
}

/// Kill `server`, wait until `client` no longer sees it alive, restart it
/// and time the first success and the upgrade to direct.
fn establish_once(
    b: &mut Bench,
    spec: &BenchSpec,
    client: &str,
    server: &str,
) -> Result<Establish> {
    const LIMIT: Duration = Duration::from_secs(30);
    if let Some(n) = b.nodes.get_mut(server) {
        n.kill();
    }
    let gone = crate::node::eventually(LIMIT, || {
        b.nodes[client]
            .status()
            .ok()
            .and_then(|s| s.peer_state(server))
            .is_some_and(|st| st != "alive")
    });
    if gone.is_none() {
        eprintln!("warning: {client} still saw {server} alive {LIMIT:?} after the kill");
    }
    std::thread::sleep(Duration::from_secs_f64(spec.settle_secs));
    let start = Instant::now();
    let ready = match b.nodes.get_mut(server) {
        Some(n) => n.spawn()?,
        None => return Err(Error::Setup(format!("no node {server}"))),
    };
    let mut probes = 0;
    let mut first_ok = None;
    while start.elapsed() < LIMIT {
        probes += 1;
        let s = load_to(&b.lab, spec, client, server, 1, 1.0, 1, 2)?;
        if s.ok == 1 {
            first_ok = Some(start.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let path_at_first_ok = path_of(b, client, server);
    let mut to_direct = None;
    if let Some(t1) = first_ok {
        let since = start + t1;
        while since.elapsed() < LIMIT {
            if path_of(b, client, server) == "direct" {
                to_direct = Some(since.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    if spec.pin {
        pin(&b.lab, server)?;
    }
    Ok(Establish {
        server: server.into(),
        client: client.into(),
        gone_s: gone.map(|d| d.as_secs_f64()),
        settle_s: spec.settle_secs,
        ready_s: ready.as_secs_f64(),
        first_ok_s: first_ok.map(|d| d.as_secs_f64()),
        path_at_first_ok,
        to_direct_s: to_direct.map(|d| d.as_secs_f64()),
        probes,
    })
}

/// Pins every process (all threads) in host `name` to CPU 0.
fn pin(lab: &Lab, name: &str) -> Result<()> {
    let ns = lab.ns(name)?;
    let pids = run(Command::new("ip").args(["netns", "pids", &ns]))?;
    for pid in pids.split_whitespace() {
        run(Command::new("taskset").args(["-a", "-p", "-c", "0", pid]))?;
    }
    Ok(())
}

/// The pid of the only `dmsc-node` in host `name`.
fn pid_in(lab: &Lab, name: &str) -> Result<u32> {
    let ns = lab.ns(name)?;
    let pids = run(Command::new("ip").args(["netns", "pids", &ns]))?;
    for pid in pids.split_whitespace() {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "dmsc-node" {
            return pid
                .parse()
                .map_err(|_| Error::Setup(format!("bad pid {pid}")));
        }
    }
    Err(Error::Setup(format!("no dmsc-node in {name}")))
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(Error::io(format!("read /proc/{pid}/stat")))?;
    // Fields after the `(comm)`, which may hold spaces: state is field 3,
    // utime 14, stime 15.
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| {
        f.get(i - 3)
            .and_then(|x| x.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(get(14) + get(15))
}

fn clk_tck() -> f64 {
    run(Command::new("getconf").arg("CLK_TCK"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Median of `xs` (0 when empty).
pub fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// The report as Markdown tables: per variant and load, medians over
/// rounds (and the range), the added latency vs (i), the establishment
/// medians.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let loads: Vec<String> = {
        let mut l: Vec<String> = Vec::new();
        for s in &r.samples {
            if !l.contains(&s.load) {
                l.push(s.load.clone());
            }
        }
        l
    };
    let pick = |v: &str, load: &str, f: &dyn Fn(&Sample) -> f64| -> Vec<f64> {
        r.samples
            .iter()
            .filter(|s| s.variant == v && s.load == load)
            .map(f)
            .collect()
    };
    let range = |xs: &[f64]| {
        let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lo, hi)
    };
    out.push_str(&format!(
        "relay idle CPU {:.2} % of a core; pinned: {}\n\n",
        r.relay_idle_cpu_pct, r.pinned
    ));
    out.push_str("| variant | load | ok/sent | p50 ms (range) | p99 ms (range) | req/s | p50 - (i) | p99 - (i) | relay CPU µs/req (net of idle) | path after |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for load in &loads {
        let base50 = median(pick("i-direct", load, &|s| s.p50_ms));
        let base99 = median(pick("i-direct", load, &|s| s.p99_ms));
        for v in VARIANTS {
            let p50 = pick(v.key, load, &|s| s.p50_ms);
            let p99 = pick(v.key, load, &|s| s.p99_ms);
            if p50.is_empty() {
                continue;
            }
            let ok: f64 = pick(v.key, load, &|s| s.ok as f64).iter().sum();
            let sent: f64 = pick(v.key, load, &|s| s.sent as f64).iter().sum();
            let rps = median(pick(v.key, load, &|s| s.achieved_per_s));
            let cpu = median(pick(v.key, load, &|s| s.relay_cpu_us_per_req));
            let net = median(pick(v.key, load, &|s| s.relay_cpu_net_us_per_req));
            let paths: Vec<String> = r
                .samples
                .iter()
                .filter(|s| s.variant == v.key && s.load == *load)
                .map(|s| s.path_after.clone())
                .collect();
            let (l50, h50) = range(&p50);
            let (l99, h99) = range(&p99);
            let (m50, m99) = (median(p50.clone()), median(p99.clone()));
            out.push_str(&format!(
                "| {} | {load} | {ok}/{sent} | {m50:.3} ({l50:.3}-{h50:.3}) | {m99:.3} ({l99:.3}-{h99:.3}) | {rps:.0} | {:+.3} | {:+.3} | {cpu:.1} ({net:.1}) | {} |\n",
                v.what,
                m50 - base50,
                m99 - base99,
                paths.join(", ")
            ));
        }
    }
    out.push('\n');
    for server in ["s1p", "s1r"] {
        let e: Vec<&Establish> = r.establish.iter().filter(|e| e.server == server).collect();
        if e.is_empty() {
            continue;
        }
        let first: Vec<f64> = e.iter().filter_map(|e| e.first_ok_s).collect();
        let direct: Vec<f64> = e.iter().filter_map(|e| e.to_direct_s).collect();
        let ready: Vec<f64> = e.iter().map(|e| e.ready_s).collect();
        out.push_str(&format!(
            "establish {server} (client {}, settle {} s), {} reps: ready median {:.2} s; first ok median {:.2} s {:?}; paths at first ok {:?}; to direct median {:.2} s {:?} ({} of {} reached direct)\n",
            e[0].client,
            e[0].settle_s,
            e.len(),
            median(ready),
            median(first.clone()),
            first.iter().map(|x| (x * 100.0).round() / 100.0).collect::<Vec<_>>(),
            e.iter().map(|e| e.path_at_first_ok.as_str()).collect::<Vec<_>>(),
            median(direct.clone()),
            direct.iter().map(|x| (x * 100.0).round() / 100.0).collect::<Vec<_>>(),
            direct.len(),
            e.len()
        ));
    }
    out
}

/// Where the node binary is by default: next to this one.
pub fn default_node_bin() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("dmsc-node")))
}

/// Checks a binary exists.
pub fn check_bin(p: &Path) -> Result<()> {
    if p.is_file() {
        Ok(())
    } else {
        Err(Error::Setup(format!("no binary at {}", p.display())))
    }
}
