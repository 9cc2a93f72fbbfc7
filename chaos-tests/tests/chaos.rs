//! Chaos scenarios: real `dmsc-node` processes in network namespaces, under
//! steady idempotent (GET) load sent to capability and agent names through
//! the ingresses of several nodes, while the network misbehaves.
//!
//! - (d) partition and heal, (e) kill -9 and restart of a home node,
//!   (f) 5 % loss + 50 ms delay on one host: run against today's node;
//! - (a) NAT'd site via a relay, then direct (endpoint-independent NAT) or
//!   staying relayed (symmetric NAT), (b) a UDP-blocked site over TCP,
//!   (c) relay loss with a second relay taking over: run only when the
//!   `dmsc-node` under test has relay support (`dmsc-node --help` lists
//!   `netcheck`), else they say so and return.
//!
//! Needs root, `ip` and `nft`: without them the tests print why and skip;
//! with `CI=true` they fail instead (CI installs the tools and runs as root).
//! The `dmsc-node` binary is the one beside this crate's binary in the
//! target directory; when it is missing the tests build it
//! (`cargo build -p dmsc-node`). Build it yourself first to test a fresh one,
//! or point `DMSC_NODE_BIN` at another build.
//!
//! Goals (BENCHMARKS.md): >= 99.99 % of requests succeed, a partitioned or
//! killed node seen dead <= 3 s, a heal converged <= 5 s, a restarted node's
//! agents routable <= 3 s. The assertions are looser, for a loaded 2-core
//! CI machine: 3x the time goals, and >= 99.9 % success per scenario
//! (one scenario is a few thousand requests: one unlucky request would
//! fail a 99.99 % bound; the measured ratio is printed for the record).

use dmsc_chaos::lab::{Lab, Nat};
use dmsc_chaos::load::{LoadRun, Summary};
use dmsc_chaos::node::{
    eventually, has_relay_support, AgentProc, MeshCa, NodeConfig, NodeProc, INGRESS, OVERLAY_PORT,
};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const CHAOS: &str = env!("CARGO_BIN_EXE_dmsc-chaos");

/// CI bounds: about 3x the goals.
const DEAD_WITHIN: Duration = Duration::from_secs(9);
const HEAL_WITHIN: Duration = Duration::from_secs(15);
const ROUTABLE_WITHIN: Duration = Duration::from_secs(9);
const MIN_SUCCESS: f64 = 0.999;

/// Load per generator and scenario, and its rate: 3 generators x 1200
/// requests x 3 scenarios (d, e, f) = 10,800 requests, ~20 s each.
const PER_GEN: u64 = 1200;
const RATE: f64 = 60.0;

/// The labs are heavy for a 2-core machine: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// The dmsc-node binary, or `None` (with the reason printed) when the lab
/// cannot run here.
fn setup() -> Option<PathBuf> {
    let node = find_node()?;
    // Which build is under test matters (a shared target directory holds
    // whichever worktree built last): say it.
    let built = std::fs::metadata(&node)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .map(|e| format!("built {} s ago", e.as_secs()))
        .unwrap_or_default();
    eprintln!("dmsc-node under test: {} ({built})", node.display());
    Some(node)
}

fn find_node() -> Option<PathBuf> {
    if let Some(why) = dmsc_chaos::preflight() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(!ci, "CI=true and the chaos lab cannot run: {why}");
        eprintln!("skipping the chaos tests: {why}");
        return None;
    }
    // Another build of the node (e.g. a branch under review).
    if let Some(bin) = std::env::var_os("DMSC_NODE_BIN") {
        return Some(PathBuf::from(bin));
    }
    let dir = PathBuf::from(CHAOS)
        .parent()
        .expect("the test binary's directory")
        .to_path_buf();
    let node = dir.join("dmsc-node");
    if !node.is_file() {
        eprintln!(
            "no {}: building it (cargo build -p dmsc-node)",
            node.display()
        );
        let target = dir.parent().expect("target dir");
        let ok = Command::new(env!("CARGO"))
            .args(["build", "-p", "dmsc-node"])
            .env("CARGO_TARGET_DIR", target)
            .status()
            .expect("run cargo");
        assert!(ok.success(), "cargo build -p dmsc-node failed");
    }
    Some(node)
}

/// A mesh in a lab: nodes by name, their agents.
struct Mesh {
    bin: PathBuf,
    ca: MeshCa,
    configs: BTreeMap<String, NodeConfig>,
    nodes: BTreeMap<String, NodeProc>,
    _agents: Vec<AgentProc>,
    // Dropped last: kills whatever is left and removes the namespaces.
    lab: Lab,
}

impl Mesh {
    fn new(bin: PathBuf, lab: Lab) -> Mesh {
        let ca = MeshCa::init(&bin, &lab.dir().join("ca")).expect("ca init");
        Mesh {
            bin,
            ca,
            configs: BTreeMap::new(),
            nodes: BTreeMap::new(),
            _agents: Vec::new(),
            lab,
        }
    }

    /// Starts agent `name` (skill tagged `tag`) in `host` on `port`; its URL.
    fn agent(&mut self, host: &str, port: u16, name: &str, tag: &str) -> String {
        let listen = format!("127.0.0.1:{port}");
        let a = AgentProc::start(&self.lab, &self.bin, host, &listen, name, tag).expect("agent");
        self._agents.push(a);
        format!("http://{listen}")
    }

    fn start(&mut self, host: &str, config: NodeConfig, env: &[(&str, &str)]) {
        let name = config.name.clone();
        let node = NodeProc::start(&self.lab, &self.bin, &self.ca, host, &config, env)
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        self.configs.insert(name.clone(), config);
        self.nodes.insert(name, node);
    }

    fn node(&self, name: &str) -> &NodeProc {
        &self.nodes[name]
    }

    fn state(&self, on: &str, of: &str) -> Option<String> {
        self.node(on).status().ok()?.peer_state(of)
    }

    /// Every node in `among` sees every other alive, with healthy agents.
    fn converged(&self, among: &[&str], agents_on: &[&str]) -> bool {
        among.iter().all(|a| {
            let Ok(s) = self.node(a).status() else {
                return false;
            };
            among
                .iter()
                .filter(|b| *b != a)
                .all(|b| s.peer_state(b).as_deref() == Some("alive"))
                && agents_on.iter().all(|b| !s.healthy_agents_of(b).is_empty())
        })
    }

    /// One GET for `name` through `host`'s ingress; who served it, if it succeeded.
    fn probe(&self, host: &str, name: &str) -> Option<String> {
        let mut cmd = self.lab.command(host, CHAOS).ok()?;
        cmd.args([
            "load",
            "--connect",
            INGRESS,
            "--host",
            name,
            "--path",
            "/probe",
            "--count",
            "1",
            "--concurrency",
            "1",
            "--timeout",
            "3",
            "--json",
        ]);
        let out = cmd.output().ok()?;
        let s: Summary = serde_json::from_slice(&out.stdout).ok()?;
        (s.ok == 1)
            .then(|| s.served_by.keys().next().cloned())
            .flatten()
    }

    fn load(&self, from: &[&str], hosts: &[&str]) -> Vec<LoadRun> {
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        from.iter()
            .map(|f| {
                LoadRun::start(&self.lab, CHAOS.as_ref(), f, &hosts, PER_GEN, RATE).expect("load")
            })
            .collect()
    }

    fn dump_logs(&self) {
        for n in self.nodes.values() {
            eprintln!(
                "--- {} (log {}) ---\n{}",
                n.name,
                n.log_file().display(),
                n.tail(15)
            );
        }
    }
}

/// Waits for the load generators; the merged summary, printed.
fn finish(scenario: &str, runs: Vec<LoadRun>, started: Instant) -> Summary {
    finish_each(scenario, runs, started).0
}

/// [`finish`], also returning each generator's summary.
fn finish_each(scenario: &str, runs: Vec<LoadRun>, started: Instant) -> (Summary, Vec<Summary>) {
    let mut total = Summary::default();
    let mut each = Vec::new();
    for r in runs {
        let s = r.finish().expect("load summary");
        total.merge(&s);
        each.push(s);
    }
    eprintln!(
        "[{scenario}] {} requests, {} ok, {} failed: {:.4} % success (goal 99.99 %); p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; statuses {:?}; served by {:?}; stale keep-alive retries {}; scenario took {:.1} s",
        total.sent,
        total.ok,
        total.failed,
        total.success_ratio() * 100.0,
        total.p50_ms,
        total.p99_ms,
        total.max_ms,
        total.statuses,
        total.served_by,
        total.stale_retries,
        started.elapsed().as_secs_f64()
    );
    eprintln!("[{scenario}] slowest: {:?}", total.slowest);
    if !total.first_errors.is_empty() {
        eprintln!("[{scenario}] first errors: {:?}", total.first_errors);
    }
    (total, each)
}

fn check_success(scenario: &str, s: &Summary, expected: u64) {
    assert_eq!(s.sent, expected, "[{scenario}] every request was sent");
    assert!(
        s.success_ratio() >= MIN_SUCCESS,
        "[{scenario}] only {:.4} % of {} requests succeeded: {:?}",
        s.success_ratio() * 100.0,
        s.sent,
        s.first_errors
    );
}

fn overlay(lab: &Lab, host: &str) -> SocketAddr {
    SocketAddr::new(lab.addr(host).expect("addr").into(), OVERLAY_PORT)
}

const NODES: [&str; 4] = ["n1", "n2", "n3", "n4"];
const CAPS: [&str; 2] = ["alpha.cap.acme.dmsc", "beta.cap.acme.dmsc"];

/// Four nodes on one network; `alpha` served on n1 and n3, `beta` on n2
/// and n4, so every capability has agents on two nodes and most requests
/// cross the mesh.
fn flat_mesh(bin: PathBuf) -> Mesh {
    let mut lab = Lab::new().expect("lab");
    lab.network("lan").expect("network");
    for n in NODES {
        lab.host(n, "lan").expect("host");
    }
    let mut mesh = Mesh::new(bin, lab);
    for (i, n) in NODES.iter().enumerate() {
        let tag = if i % 2 == 0 { "alpha" } else { "beta" };
        let url = mesh.agent(n, 9101, &format!("{tag}-{n}"), tag);
        let config = NodeConfig {
            name: n.to_string(),
            overlay: Some(overlay(&mesh.lab, n)),
            bootstrap: NODES
                .iter()
                .filter(|o| *o != n)
                .map(|o| overlay(&mesh.lab, o))
                .collect(),
            agents: vec![url],
            ..NodeConfig::default()
        };
        mesh.start(n, config, &[]);
    }
    let t = eventually(Duration::from_secs(60), || mesh.converged(&NODES, &NODES));
    if t.is_none() {
        mesh.dump_logs();
    }
    eprintln!(
        "4-node mesh converged in {:?}",
        t.expect("the mesh converges")
    );
    mesh
}

#[test]
fn partition_node_loss_and_impairment_under_load() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Some(bin) = setup() else { return };
    let suite = Instant::now();
    let mut mesh = flat_mesh(bin);
    let mut all = Summary::default();

    // (d) Partition {n1, n2} | {n3, n4}: each side keeps one agent of each
    // capability, so requests keep succeeding (retried on the other
    // candidate when the first was across the cut).
    let started = Instant::now();
    let runs = mesh.load(&["n1", "n2", "n3"], &CAPS);
    std::thread::sleep(Duration::from_secs(3));
    mesh.lab
        .partition(&["n1", "n2"], &["n3", "n4"])
        .expect("partition");
    let dead = eventually(DEAD_WITHIN, || {
        ["n3", "n4"]
            .iter()
            .all(|o| mesh.state("n1", o).as_deref() == Some("dead"))
            && ["n1", "n2"]
                .iter()
                .all(|o| mesh.state("n3", o).as_deref() == Some("dead"))
    });
    if dead.is_none() {
        mesh.dump_logs();
    }
    let dead = dead.expect("(d) both sides see the other dead within 9 s");
    eprintln!("[d] partition: other side seen dead in {dead:?} (goal 3 s)");
    std::thread::sleep(Duration::from_secs(3));
    mesh.lab.heal().expect("heal");
    let healed = eventually(HEAL_WITHIN, || mesh.converged(&NODES, &NODES));
    if healed.is_none() {
        mesh.dump_logs();
    }
    let healed = healed.expect("(d) the healed mesh converges within 15 s");
    eprintln!(
        "[d] heal: converged (all alive, all agents healthy everywhere) in {healed:?} (goal 5 s)"
    );
    let s = finish("d", runs, started);
    check_success("d", &s, 3 * PER_GEN);
    all.merge(&s);

    // (e) kill -9 of n2, home of beta-n2; then restart it.
    let started = Instant::now();
    let runs = mesh.load(&["n1", "n3", "n4"], &CAPS);
    std::thread::sleep(Duration::from_secs(3));
    mesh.nodes.get_mut("n2").expect("n2").kill();
    let dead = eventually(DEAD_WITHIN, || {
        ["n1", "n3", "n4"]
            .iter()
            .all(|o| mesh.state(o, "n2").as_deref() == Some("dead"))
    })
    .expect("(e) n2 seen dead everywhere within 9 s");
    eprintln!("[e] kill -9: seen dead in {dead:?} (goal 3 s)");
    std::thread::sleep(Duration::from_secs(2));
    let ready = mesh
        .nodes
        .get_mut("n2")
        .expect("n2")
        .spawn()
        .expect("restart n2");
    let routable = eventually(ROUTABLE_WITHIN, || {
        ["n1", "n4"]
            .iter()
            .all(|o| mesh.probe(o, "beta-n2.acme.dmsc").as_deref() == Some("n2"))
    });
    if routable.is_none() {
        mesh.dump_logs();
    }
    let routable =
        routable.expect("(e) the restarted node's agent routable from n1 and n4 within 9 s");
    eprintln!("[e] restart: ready in {ready:?}, its agent routable from n1 and n4 {routable:?} later (goal 3 s)");
    let s = finish("e", runs, started);
    check_success("e", &s, 3 * PER_GEN);
    all.merge(&s);

    // (f) 5 % loss and 50 ms delay on n3's overlay sends (DMSC_IMPAIR,
    // honoured by the transport; this kernel has no netem).
    eventually(HEAL_WITHIN, || mesh.converged(&NODES, &NODES)).expect("mesh converged before (f)");
    {
        let n3 = mesh.nodes.get_mut("n3").expect("n3");
        n3.kill();
    }
    let config = mesh.configs["n3"].clone();
    mesh.nodes.remove("n3");
    mesh.start("n3", config, &[("DMSC_IMPAIR", "loss=0.05,delay_ms=50")]);
    eventually(HEAL_WITHIN, || mesh.converged(&NODES, &NODES))
        .expect("(f) the mesh converges with n3 impaired");
    let impaired = mesh.node("n3").log_contains("DMSC_IMPAIR");
    if !impaired {
        eprintln!("[f] note: n3's log does not mention DMSC_IMPAIR; this node may not implement the impairment yet (the scenario then runs unimpaired)");
    }
    let started = Instant::now();
    let runs = mesh.load(&["n1", "n3", "n4"], &CAPS);
    let (s, each) = finish_each("f", runs, started);
    eprintln!(
        "[f] from n3 (impaired): p50 {:.1} ms, p99 {:.1} ms; from n1: p50 {:.1} ms, p99 {:.1} ms",
        each[1].p50_ms, each[1].p99_ms, each[0].p50_ms, each[0].p99_ms
    );
    if impaired {
        // Half of n3's requests (beta) cross its delayed overlay: the
        // impairment must show, or it is not working.
        assert!(
            each[1].p99_ms >= 50.0,
            "[f] n3 is impaired (50 ms) but its p99 is {:.1} ms",
            each[1].p99_ms
        );
    }
    check_success("f", &s, 3 * PER_GEN);
    all.merge(&s);

    eprintln!(
        "[d+e+f] {} requests, {} ok: {:.4} % success; worst p99 {:.1} ms; suite took {:.1} s",
        all.sent,
        all.ok,
        all.success_ratio() * 100.0,
        all.p99_ms,
        suite.elapsed().as_secs_f64()
    );
    assert!(
        all.sent >= 10_000,
        "the suite sends at least 10,000 requests"
    );
}

// ---- relay scenarios (a), (b), (c) ----------------------------------------

/// A relay lab: relays r1 (and r2) and cloud node c1 on `wan`; site node
/// s1 behind router gw (NAT `nat`) on `site`; c2 on `wan`, or with
/// `c2_nat` behind its own endpoint-independent NAT gw2 (two NAT'd sites:
/// what a symmetric NAT keeps relayed; a symmetric NAT facing a public
/// peer still gets a direct path, learned from the peer's pings). alpha is
/// served on s1 and c1, beta on s1 and c2.
fn relay_mesh(bin: PathBuf, nat: Nat, two_relays: bool, block_udp: bool, c2_nat: bool) -> Mesh {
    let mut lab = Lab::new().expect("lab");
    lab.network("wan").expect("wan");
    lab.network("site").expect("site");
    if c2_nat {
        lab.network("site2").expect("site2");
    }
    let relays: Vec<&str> = if two_relays {
        vec!["r1", "r2"]
    } else {
        vec!["r1"]
    };
    for h in relays.iter().chain(&["c1"]) {
        lab.host(h, "wan").expect("host");
    }
    if c2_nat {
        lab.router("gw2", "site2", "wan", Nat::EndpointIndependent)
            .expect("router");
        lab.host("c2", "site2").expect("c2");
    } else {
        lab.host("c2", "wan").expect("c2");
    }
    lab.router("gw", "site", "wan", nat).expect("router");
    lab.host("s1", "site").expect("s1");
    if block_udp {
        lab.block_udp("s1").expect("block udp");
    }
    let mut mesh = Mesh::new(bin, lab);
    let relay_addrs: Vec<SocketAddr> = relays.iter().map(|r| overlay(&mesh.lab, r)).collect();
    for r in &relays {
        let config = NodeConfig {
            name: r.to_string(),
            overlay: Some(overlay(&mesh.lab, r)),
            bootstrap: relay_addrs
                .iter()
                .copied()
                .filter(|a| *a != overlay(&mesh.lab, r))
                .collect(),
            relay: true,
            ..NodeConfig::default()
        };
        mesh.start(r, config, &[]);
    }
    let agents = [
        ("c1", "alpha"),
        ("c2", "beta"),
        ("s1", "alpha"),
        ("s1", "beta"),
    ];
    let mut urls: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (i, (h, tag)) in agents.iter().enumerate() {
        let url = mesh.agent(h, 9101 + i as u16, &format!("{tag}-{h}"), tag);
        urls.entry(h).or_default().push(url);
    }
    // c1 is also a bootstrap peer: `netcheck` on s1 then has a relay and
    // a direct peer as two observers of its public address.
    let c1 = overlay(&mesh.lab, "c1");
    for h in ["c1", "c2", "s1"] {
        let mut bootstrap = relay_addrs.clone();
        if h != "c1" {
            bootstrap.push(c1);
        }
        let config = NodeConfig {
            name: h.to_string(),
            overlay: Some(overlay(&mesh.lab, h)),
            bootstrap,
            relays: relay_addrs.clone(),
            agents: urls.remove(h).unwrap_or_default(),
            ..NodeConfig::default()
        };
        mesh.start(h, config, &[]);
    }
    let mut all: Vec<&str> = relays.clone();
    all.extend(["c1", "c2", "s1"]);
    let t = eventually(Duration::from_secs(60), || {
        mesh.converged(&all, &["c1", "c2", "s1"])
    });
    if t.is_none() {
        mesh.dump_logs();
    }
    eprintln!(
        "relay mesh ({nat:?}, udp blocked: {block_udp}) converged in {:?}",
        t.expect("the relay mesh converges")
    );
    mesh
}

/// `dmsc-node netcheck --config FILE --json` on `node`.
fn netcheck(mesh: &Mesh, node: &str) -> serde_json::Value {
    let config = mesh.lab.dir().join(format!("{node}.toml"));
    let out = mesh
        .lab
        .command(node, &mesh.bin)
        .expect("cmd")
        .args(["netcheck", "--json", "--config"])
        .arg(&config)
        .output()
        .expect("netcheck");
    assert!(
        out.status.success(),
        "netcheck failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("netcheck json")
}

const SITE_LOAD: [&str; 4] = [
    "alpha.cap.acme.dmsc",
    "beta.cap.acme.dmsc",
    "alpha-s1.acme.dmsc",
    "beta-s1.acme.dmsc",
];

#[test]
fn nat_relay_tcp_fallback_and_relay_failover_under_load() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Some(bin) = setup() else { return };
    let netcheck_cli = has_relay_support(&bin);
    // DMSC_CHAOS_RELAY=1 runs them against a node with relays but no
    // `netcheck` yet (its netcheck assertions are then left out).
    let forced = std::env::var("DMSC_CHAOS_RELAY").is_ok_and(|v| v == "1");
    if !netcheck_cli && !forced {
        eprintln!("skipping relay scenarios: this dmsc-node has no relay support ({} --help lists no `netcheck`)", bin.display());
        return;
    }
    let netcheck = |mesh: &Mesh, node: &str| {
        if netcheck_cli {
            Some(netcheck(mesh, node))
        } else {
            eprintln!("note: no `dmsc-node netcheck`; its assertions are skipped");
            None
        }
    };
    let suite = Instant::now();
    let mut all = Summary::default();

    // (a1) Endpoint-independent NAT: reachable through the relay, then
    // direct once hole punching succeeds.
    {
        let mesh = relay_mesh(bin.clone(), Nat::EndpointIndependent, false, false, false);
        if let Some(nc) = netcheck(&mesh, "s1") {
            assert_eq!(nc["mapping"], "endpoint-independent", "{nc}");
            assert_eq!(nc["udp"], true, "{nc}");
        }
        let started = Instant::now();
        let runs = mesh.load(&["c1", "c2", "s1"], &SITE_LOAD);
        let direct = eventually(HEAL_WITHIN, || {
            mesh.node("c1")
                .status()
                .ok()
                .and_then(|s| s.peer_path("s1"))
                .as_deref()
                == Some("direct")
        });
        if direct.is_none() {
            mesh.dump_logs();
        }
        eprintln!(
            "[a] endpoint-independent NAT: c1 -> s1 direct after {:?}",
            direct.expect("(a) hole punched within 15 s")
        );
        // Before the hole was punched, s1 was reached through the relay: s1
        // advertises itself as relayed, r1 holds its session and forwarded
        // datagrams (QUIC ciphertext) for it.
        let c1 = mesh.node("c1").status().expect("status");
        assert_eq!(
            c1.peer("s1").and_then(|p| p["reachability"].as_str()),
            Some("relayed"),
            "{:?}",
            c1.peer("s1")
        );
        let r1 = mesh.node("r1").status().expect("status");
        let relay = &r1.0["paths"]["relay"];
        assert!(
            relay["clients"]
                .as_array()
                .is_some_and(|c| c.iter().any(|n| n == "s1")),
            "{relay}"
        );
        assert!(relay["datagrams"].as_u64().unwrap_or(0) > 0, "{relay}");
        let s = finish("a/endpoint-independent", runs, started);
        check_success("a/endpoint-independent", &s, 3 * PER_GEN);
        assert!(
            s.served_by.get("s1").copied().unwrap_or(0) > 0,
            "s1 served requests"
        );
        all.merge(&s);
    }

    // (a2) Symmetric NAT at s1, c2 behind its own NAT: hole punching
    // between the two sites cannot work; c2 -> s1 stays relayed via r1.
    // (c1 is public: s1's pings reach it, so c1 -> s1 may go direct.)
    {
        let mesh = relay_mesh(bin.clone(), Nat::Symmetric, false, false, true);
        if let Some(nc) = netcheck(&mesh, "s1") {
            assert_eq!(nc["mapping"], "endpoint-dependent", "{nc}");
        }
        let started = Instant::now();
        let runs = mesh.load(&["c1", "c2", "s1"], &SITE_LOAD);
        let mut checks = 0;
        while started.elapsed() < Duration::from_secs(15) {
            let s = mesh.node("c2").status().expect("status");
            assert_eq!(
                s.peer_path("s1").as_deref(),
                Some("relayed"),
                "{:?}",
                s.peer("s1")
            );
            assert_eq!(
                s.peer_via("s1").as_deref(),
                Some("r1"),
                "{:?}",
                s.peer("s1")
            );
            checks += 1;
            std::thread::sleep(Duration::from_secs(1));
        }
        eprintln!("[a] symmetric NAT: c2 (behind NAT) -> s1 relayed via r1 at all {checks} checks");
        let s = finish("a/symmetric", runs, started);
        check_success("a/symmetric", &s, 3 * PER_GEN);
        assert!(
            s.served_by.get("s1").copied().unwrap_or(0) > 0,
            "s1 served requests"
        );
        all.merge(&s);
    }

    // (b) UDP blocked at the site: QUIC cannot leave s1; it reaches the
    // relay over TCP + TLS and serves from there.
    {
        let mesh = relay_mesh(bin.clone(), Nat::EndpointIndependent, false, true, false);
        if let Some(nc) = netcheck(&mesh, "s1") {
            assert_eq!(
                (nc["udp"].clone(), nc["tcp"].clone()),
                (false.into(), true.into()),
                "{nc}"
            );
        }
        let started = Instant::now();
        let runs = mesh.load(&["c1", "c2", "s1"], &SITE_LOAD);
        // s1's packets to any peer travel in its TCP session to r1.
        let st = mesh.node("s1").status().expect("status");
        assert_eq!(
            (
                st.peer_path("c1").as_deref(),
                st.peer_via("c1").as_deref(),
                st.peer_transport("c1").as_deref()
            ),
            (Some("relayed"), Some("r1"), Some("tcp")),
            "{:?}",
            st.peer("c1")
        );
        let c1 = mesh.node("c1").status().expect("status");
        assert_eq!(
            c1.peer_path("s1").as_deref(),
            Some("relayed"),
            "{:?}",
            c1.peer("s1")
        );
        let s = finish("b", runs, started);
        check_success("b", &s, 3 * PER_GEN);
        assert!(
            s.served_by.get("s1").copied().unwrap_or(0) > 0,
            "s1 served requests"
        );
        all.merge(&s);
        // UDP comes back: s1's session moves back to QUIC by itself (UDP
        // probes every 2 s; the TCP session closes once one is answered).
        mesh.lab.unblock_udp("s1").expect("unblock udp");
        let unblocked = Instant::now();
        let back = eventually(HEAL_WITHIN, || {
            mesh.node("s1").status().ok().is_some_and(|st| {
                st.0["paths"]["sessions"]
                    .as_array()
                    .is_some_and(|v| !v.is_empty() && v.iter().all(|x| x["transport"] == "quic"))
                    && st.0["paths"]["udp"] == "ok"
            })
        });
        if back.is_none() {
            mesh.dump_logs();
        }
        eprintln!(
            "[b] UDP unblocked: s1's relay session back on QUIC after {:?}",
            back.expect("(b) back to QUIC within 15 s of UDP working again")
        );
        let serving = eventually(HEAL_WITHIN, || {
            mesh.probe("c1", "alpha-s1.acme.dmsc").as_deref() == Some("s1")
        });
        if serving.is_none() {
            mesh.dump_logs();
        }
        eprintln!(
            "[b] s1 serves c1 again {:?} after the unblock",
            serving.map(|_| unblocked.elapsed())
        );
        assert!(serving.is_some(), "(b) s1 serves after the switch to QUIC");
    }

    // (c) Two relays; s1 stays relayed (symmetric NAT); the relay it uses
    // is killed; the other takes over.
    {
        let mut mesh = relay_mesh(bin.clone(), Nat::Symmetric, true, false, true);
        let via = mesh
            .node("c2")
            .status()
            .expect("status")
            .peer_via("s1")
            .expect("c2 reaches s1 via a relay");
        let other = if via == "r1" { "r2" } else { "r1" };
        let started = Instant::now();
        let runs = mesh.load(&["c1", "c2", "s1"], &SITE_LOAD);
        std::thread::sleep(Duration::from_secs(3));
        mesh.nodes.get_mut(&via).expect("relay").kill();
        let t = eventually(HEAL_WITHIN, || {
            mesh.node("c2")
                .status()
                .ok()
                .and_then(|s| s.peer_via("s1"))
                .as_deref()
                == Some(other)
                && mesh.probe("c2", "alpha-s1.acme.dmsc").as_deref() == Some("s1")
        });
        if t.is_none() {
            mesh.dump_logs();
        }
        eprintln!(
            "[c] relay {via} killed: s1 reachable via {other} after {:?}",
            t.expect("(c) the second relay takes over within 15 s")
        );
        let s = finish("c", runs, started);
        check_success("c", &s, 3 * PER_GEN);
        all.merge(&s);
    }
    eprintln!(
        "[a+b+c] {} requests, {} ok: {:.4} % success; suite took {:.1} s",
        all.sent,
        all.ok,
        all.success_ratio() * 100.0,
        suite.elapsed().as_secs_f64()
    );
}

/// The path MTU of a relayed site shrinks mid-connection: s1 and its
/// router go from 1500 to 1280 bytes, and larger packets from the wan are
/// dropped without a word. The relay session and the overlay connections
/// through it must survive it, and a large body must still get through.
#[test]
fn a_relayed_path_survives_a_path_mtu_black_hole() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Some(bin) = setup() else { return };
    if !has_relay_support(&bin) {
        eprintln!("skipping: this dmsc-node has no relay support");
        return;
    }
    let mesh = relay_mesh(bin, Nat::Symmetric, false, false, true);
    assert_eq!(
        mesh.node("c2")
            .status()
            .expect("status")
            .peer_path("s1")
            .as_deref(),
        Some("relayed")
    );
    let big = mesh.lab.dir().join("big.bin");
    std::fs::write(&big, vec![b'x'; 200 * 1024]).expect("write body");
    let post = |from: &str, to: &str| {
        let started = Instant::now();
        let out = mesh
            .lab
            .command(from, "curl")
            .expect("cmd")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "20"])
            .args(["-H", &format!("Host: {to}"), "--data-binary"])
            .arg(format!("@{}", big.display()))
            .arg(format!("http://{INGRESS}/echo"))
            .output()
            .expect("curl");
        (
            String::from_utf8_lossy(&out.stdout).to_string(),
            started.elapsed(),
        )
    };
    let (code, took) = post("c2", "beta-s1.acme.dmsc");
    eprintln!("[mtu] before: {code} in {took:?}");
    // No connection of a node behind a NAT has packets larger than its
    // direct path carries (1500-byte links): discovery through a relay
    // would find any size, stale once the hole is punched.
    for n in ["s1", "c2"] {
        let st = mesh.node(n).status().expect("status");
        for p in st.0["peers"].as_array().into_iter().flatten() {
            eprintln!(
                "[mtu] {n} -> {} path {} mtu {}",
                p["name"], p["path"], p["mtu"]
            );
            assert!(p["mtu"].as_u64().is_some_and(|m| m <= 1472), "{n}: {p}");
        }
    }
    mesh.lab.set_mtu("gw", 1280).expect("mtu");
    mesh.lab.set_mtu("s1", 1280).expect("mtu");
    let (code, took) = post("c2", "beta-s1.acme.dmsc");
    eprintln!("[mtu] first large body after the drop: {code} in {took:?}");
    let (code2, took2) = post("c2", "beta-s1.acme.dmsc");
    eprintln!("[mtu] second: {code2} in {took2:?}");
    // A node behind a NAT that went direct after punching (c2 -> c1): its
    // connection kept the packet size the relayed path allowed.
    let (code3, took3) = post("c2", "alpha-c1.acme.dmsc");
    eprintln!("[mtu] c2 -> c1 (direct after punching): {code3} in {took3:?}");
    assert_eq!(code3, "200");
    let lost = mesh.node("s1").log_contains("relay session lost");
    eprintln!("[mtu] s1's relay session lost: {lost}");
    if lost || code != "200" {
        mesh.dump_logs();
    }
    assert_eq!(code, "200", "the first large body after the drop");
    assert!(!lost, "s1's relay session was lost");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

// ---- the lab itself ------------------------------------------------------

/// A process in a lab host, killed when dropped.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `dmsc-chaos udp-probe` from `host` to `to`: the source address each saw.
fn udp_probe(lab: &Lab, host: &str, to: &[SocketAddr]) -> Vec<Option<SocketAddr>> {
    let mut cmd = lab.command(host, CHAOS).expect("cmd");
    cmd.arg("udp-probe");
    for t in to {
        cmd.arg("--to").arg(t.to_string());
    }
    let out = dmsc_chaos::run(&mut cmd).expect("udp-probe");
    serde_json::from_str(&out).expect("probe json")
}

/// The relay scenarios mean something only if the lab's NATs and filters do
/// what they claim: checked here with UDP probes, no dmsc-node needed.
#[test]
fn lab_nats_map_and_filters_drop_as_claimed() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(why) = dmsc_chaos::preflight() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(!ci, "CI=true and the chaos lab cannot run: {why}");
        eprintln!("skipping the lab test: {why}");
        return;
    }
    let mut lab = Lab::new().expect("lab");
    let prefix = lab.prefix().to_string();
    for n in ["wan", "site1", "site2"] {
        lab.network(n).expect("network");
    }
    let e1 = lab.host("e1", "wan").expect("e1");
    let e2 = lab.host("e2", "wan").expect("e2");
    lab.host("w3", "wan").expect("w3");
    let ei = lab
        .router("gw1", "site1", "wan", Nat::EndpointIndependent)
        .expect("gw1");
    let sym = lab
        .router("gw2", "site2", "wan", Nat::Symmetric)
        .expect("gw2");
    lab.host("s1", "site1").expect("s1");
    lab.host("s2", "site2").expect("s2");
    let echo: Vec<SocketAddr> = [e1, e2]
        .iter()
        .map(|a| SocketAddr::new((*a).into(), 3478))
        .collect();
    let _servers: Vec<Proc> = ["e1", "e2"]
        .iter()
        .zip(&echo)
        .map(|(h, a)| {
            let mut cmd = lab.command(h, CHAOS).expect("cmd");
            cmd.args(["udp-echo", "--listen", &a.to_string()]);
            Proc(cmd.spawn().expect("udp-echo"))
        })
        .collect();
    // The servers bind asynchronously: wait until one answers from wan.
    eventually(Duration::from_secs(10), || {
        udp_probe(&lab, "w3", &echo).iter().all(Option::is_some)
    })
    .expect("echo servers answer");

    // Endpoint-independent: both servers see the router's address and one port.
    let seen = udp_probe(&lab, "s1", &echo);
    let (a, b) = (
        seen[0].expect("e1 answers s1"),
        seen[1].expect("e2 answers s1"),
    );
    assert_eq!(
        (a.ip(), b.ip()),
        (ei.into(), ei.into()),
        "translated to gw1's address"
    );
    assert_eq!(
        a.port(),
        b.port(),
        "one mapping for every destination: {seen:?}"
    );
    // Symmetric: a new port per destination.
    let seen = udp_probe(&lab, "s2", &echo);
    let (a, b) = (
        seen[0].expect("e1 answers s2"),
        seen[1].expect("e2 answers s2"),
    );
    assert_eq!(
        (a.ip(), b.ip()),
        (sym.into(), sym.into()),
        "translated to gw2's address"
    );
    assert_ne!(a.port(), b.port(), "a mapping per destination: {seen:?}");
    // Nothing gets in unsolicited: a port on the router that nothing
    // inside opened answers nothing.
    let to_router = SocketAddr::new(ei.into(), 3478);
    assert_eq!(udp_probe(&lab, "e1", &[to_router]), vec![None]);

    // Blocked UDP, then unblocked.
    lab.block_udp("s1").expect("block");
    assert_eq!(
        udp_probe(&lab, "s1", &echo),
        vec![None, None],
        "UDP blocked"
    );
    lab.unblock_udp("s1").expect("unblock");
    assert!(
        udp_probe(&lab, "s1", &echo).iter().all(Option::is_some),
        "UDP unblocked"
    );

    // Partition w3 | e1 (e2 unaffected), then heal.
    lab.partition(&["w3"], &["e1"]).expect("partition");
    assert_eq!(
        udp_probe(&lab, "w3", &echo)
            .iter()
            .map(Option::is_some)
            .collect::<Vec<_>>(),
        vec![false, true]
    );
    lab.heal().expect("heal");
    assert!(
        udp_probe(&lab, "w3", &echo).iter().all(Option::is_some),
        "healed"
    );

    // Teardown leaves no namespace behind.
    drop(_servers);
    drop(lab);
    let left = dmsc_chaos::run(Command::new("ip").args(["netns", "list"])).expect("ip netns list");
    assert!(
        !left.contains(&prefix),
        "namespaces left after teardown: {left}"
    );
}
