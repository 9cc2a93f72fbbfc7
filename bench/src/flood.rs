//! `dmsc-bench flood`: isolation under flood (issue 12, item 4).
//!
//! Two nodes in this process: `a` is home to one agent of each of two
//! tenants (the same 1 KiB backend), `b` has a plain ingress per tenant.
//! Tenant A has a rate limit; tenant B sends a steady open-loop load
//! through `b` (each request its own task, so a slow answer never holds
//! back the next), in rounds that alternate "quiet" (B alone) and
//! "flood" (A at `--flood-x` times its limit at the same time), the order
//! switching every round. In the quiet phases A sends `--quiet-x` times its
//! limit (default 1: A at its limit, so the comparison is what the flood's
//! excess costs B; 0: A silent). Reported: B's p50/p99 per phase and round, the
//! median p99 of each phase and their ratio (the bound: at most 1.2), every
//! B request that was not a 200 (the bound: none; a 429 or a shed 503 would
//! show here), and what A got (admitted rate against its limit).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dmsc_node::config::{RawAgent, RawIngress, RawSkill};
use dmsc_node::demo::mesh::LocalMesh;
use dmsc_node::forward::client::Upstream;
use dmsc_node::limits::{Limit, Rate, TenantLimits};
use dmsc_node::proto::http::full;
use http_body_util::BodyExt;
use hyper::Request;
use serde::{Deserialize, Serialize};

#[derive(clap::Args, Debug)]
pub struct FloodArgs {
    /// Tenant A's mesh-wide limit, requests a second.
    #[arg(long, default_value_t = 100.0)]
    pub limit: f64,
    /// Tenant A's burst.
    #[arg(long, default_value_t = 20)]
    pub burst: u32,
    /// A's load in the flood phases, as a multiple of its limit.
    #[arg(long, default_value_t = 10.0)]
    pub flood_x: f64,
    /// A's load in the quiet phases, as a multiple of its limit: 1 (A at
    /// its limit: what the flood adds is the excess the limiter refuses),
    /// or 0 (A silent: the flood's admitted part counts too).
    #[arg(long, default_value_t = 1.0)]
    pub quiet_x: f64,
    /// Tenant B's steady rate, requests a second.
    #[arg(long, default_value_t = 200)]
    pub b_rate: u64,
    /// Seconds per phase.
    #[arg(long, default_value_t = 4)]
    pub secs: u64,
    /// Rounds (each has a quiet and a flood phase, order alternating).
    #[arg(long, default_value_t = 6)]
    pub rounds: usize,
    /// `flood-load`: the JSON line `flood-serve` printed.
    #[arg(long)]
    pub addrs: Option<String>,
}

const BODY: usize = 1024;

/// Statuses of one open-loop run, and latencies (ms) of its 200s.
#[derive(Default)]
struct Tally {
    lat: Vec<f64>,
    ok: u64,
    limited: u64,
    shed: u64,
    other: u64,
}

async fn one(client: &Upstream, addr: std::net::SocketAddr, host: &str, body: &Bytes) -> u16 {
    let Ok(req) = Request::post(format!("http://{addr}/"))
        .header("host", host)
        .header("content-type", "application/octet-stream")
        .body(full(body.clone()))
    else {
        return 0;
    };
    match client.h1.request(req).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            match resp.into_body().collect().await {
                Ok(_) => status,
                Err(_) => 0,
            }
        }
        Err(_) => 0,
    }
}

/// Open loop at `rate`/s for `secs` against `host` at `addr`, sent in
/// ticks of `tick` (several requests per tick at high rates). Latency runs
/// from the moment a request is handed to the runtime: the generator
/// sleeps between ticks instead of spinning (it shares the nodes' cores,
/// and a spinning generator would be the flood), and since every request
/// is its own task, a slow answer never delays the next send.
async fn open_loop(
    client: &Upstream,
    addr: std::net::SocketAddr,
    host: &'static str,
    rate: f64,
    secs: u64,
    tick: Duration,
) -> Tally {
    let body = Bytes::from(vec![b'y'; BODY]);
    let n = (rate * secs as f64) as u64;
    let start = tokio::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let client = Arc::new(client.clone());
    let mut t = Tally::default();
    let take = |t: &mut Tally, (status, ms): (u16, f64)| match status {
        200 => {
            t.ok += 1;
            t.lat.push(ms);
        }
        429 => t.limited += 1,
        503 => t.shed += 1,
        _ => t.other += 1,
    };
    let mut sent = 0u64;
    let mut ticks = tokio::time::interval_at(start, tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while sent < n {
        ticks.tick().await;
        // Everything due by now (a late tick catches up).
        let due = ((start.elapsed().as_secs_f64() * rate).floor() as u64 + 1).min(n);
        while sent < due {
            sent += 1;
            let (client, body) = (client.clone(), body.clone());
            let at = Instant::now();
            set.spawn(async move {
                let s = one(&client, addr, host, &body).await;
                (s, at.elapsed().as_secs_f64() * 1000.0)
            });
        }
        while let Some(r) = set.try_join_next() {
            if let Ok(r) = r {
                take(&mut t, r);
            }
        }
    }
    while let Some(r) = set.join_next().await {
        if let Ok(r) = r {
            take(&mut t, r);
        }
    }
    t
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The two nodes, the backend and the limits.
struct Served {
    mesh: LocalMesh,
    backend: tokio::task::JoinHandle<()>,
    addrs: Addrs,
}

/// Where tenant A's and tenant B's ingress listen (`flood-serve` prints it).
#[derive(Debug, Serialize, Deserialize)]
pub struct Addrs {
    pub a: std::net::SocketAddr,
    pub b: std::net::SocketAddr,
}

async fn setup(args: &FloodArgs) -> anyhow::Result<Served> {
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", backend.local_addr()?);
    let backend_task = tokio::spawn(crate::e2e::backend(backend));
    let agent = |tenant: &str| RawAgent {
        tenant: tenant.into(),
        url: url.clone(),
        name: Some("echo".into()),
        skills: Some(vec![RawSkill {
            id: "echo".into(),
            tags: vec!["echo".into()],
            ..Default::default()
        }]),
        ..Default::default()
    };
    let mesh = LocalMesh::start(&["a", "b"], "ta", |i, raw| {
        // The audit log on, as in production: refusals are sampled into it.
        raw.audit.enabled = Some(true);
        if i == 0 {
            raw.agents = vec![agent("ta"), agent("tb")];
        } else {
            raw.ingress.push(RawIngress {
                listen: "127.0.0.1:0".into(),
                tenant: Some("tb".into()),
                ..Default::default()
            });
        }
    })
    .await?;
    let started = Instant::now();
    while !mesh.nodes[1]
        .agent_statuses()
        .iter()
        .filter(|a| a.name == "echo")
        .count()
        .eq(&2)
    {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(20),
            "mesh did not converge"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ingress = mesh.nodes[1].bound().ingress;
    let (a_addr, b_addr) = (ingress[0], ingress[1]);
    let rate = |per_sec, burst| Limit {
        rate: Some(Rate { per_sec, burst }),
        concurrent: None,
    };
    for n in &mesh.nodes {
        n.limiter().set(
            "ta",
            Some(TenantLimits {
                tenant: rate(args.limit, args.burst),
                ..Default::default()
            }),
        );
        // B has a limit too (well above its load): its requests take the
        // same path through the limiter as A's.
        n.limiter().set(
            "tb",
            Some(TenantLimits {
                tenant: rate(args.b_rate as f64 * 5.0, 100),
                ..Default::default()
            }),
        );
    }
    Ok(Served {
        mesh,
        backend: backend_task,
        addrs: Addrs {
            a: a_addr,
            b: b_addr,
        },
    })
}

impl Served {
    /// What the flood cost the audit log of the ingress node; stops all.
    async fn finish(self) -> anyhow::Result<()> {
        let mesh = &self.mesh;
        // What the flood cost the audit log of the ingress node.
        if let Some(audit) = mesh.nodes[1].security().audit.as_ref() {
            audit.flush().await?;
            let dir = mesh.node_dir(1).join("data").join("audit");
            let (mut entries, mut refused) = (0u64, 0u64);
            for line in dmsc_audit::tail(&dir, None)? {
                let line = line?;
                if line.kind == "rate_limited" {
                    entries += 1;
                    refused += line.detail["refused"].as_u64().unwrap_or(0);
                }
            }
            println!(
            "audit: {entries} rate_limited entries standing for {refused} refusals (the window still open is written when it closes)"
        );
        }
        self.mesh.stop().await;
        self.backend.abort();
        Ok(())
    }
}

/// Warms both paths (A may already be limited), then runs the phases.
async fn phases(args: &FloodArgs, addrs: &Addrs) -> anyhow::Result<bool> {
    let (a_addr, b_addr) = (addrs.a, addrs.b);
    let client = Upstream::new();
    // Warm both paths (connections, pools); the limits are already set,
    // so a quick warm-up may meet them.
    for _ in 0..200 {
        let body = Bytes::from(vec![b'w'; BODY]);
        for (addr, host) in [(a_addr, "echo.ta.dmsc"), (b_addr, "echo.tb.dmsc")] {
            let status = one(&client, addr, host, &body).await;
            anyhow::ensure!(
                status == 200 || status == 429,
                "warm-up request to {host} answered {status}"
            );
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let flood_rate = args.limit * args.flood_x;
    let quiet_rate = args.limit * args.quiet_x;
    println!(
        "flood: A limit {} req/s (burst {}), A load {flood_rate} req/s in flood phases, {quiet_rate} req/s in quiet ones; B load {} req/s; {} s phases, {} rounds",
        args.limit, args.burst, args.b_rate, args.secs, args.rounds
    );
    println!("audit log on (fsync batch); A's 429s are audited sampled");
    println!("round  phase   B p50 ms  B p99 ms  B ok  B 429  B 503  B other  A ok/s  A 429/s");
    let (mut quiet_p99, mut flood_p99) = (Vec::new(), Vec::new());
    let (mut b_bad, mut a_ok, mut a_limited, mut a_other) = (0u64, 0u64, 0u64, 0u64);
    for round in 0..args.rounds {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for flood in order {
            let a_rate = if flood { flood_rate } else { quiet_rate };
            let a = (a_rate > 0.0).then(|| {
                let client = client.clone();
                let secs = args.secs;
                tokio::spawn(async move {
                    let tick = Duration::from_millis(1);
                    open_loop(&client, a_addr, "echo.ta.dmsc", a_rate, secs, tick).await
                })
            });
            let tick = Duration::from_secs_f64(1.0 / args.b_rate as f64);
            let mut b = open_loop(
                &client,
                b_addr,
                "echo.tb.dmsc",
                args.b_rate as f64,
                args.secs,
                tick,
            )
            .await;
            let a = match a {
                Some(h) => Some(h.await?),
                None => None,
            };
            let (p50, p99) = (pct(&mut b.lat, 0.5), pct(&mut b.lat, 0.99));
            b_bad += b.limited + b.shed + b.other;
            let (a_ok_s, a_lim_s) = match &a {
                Some(a) => {
                    if flood {
                        a_ok += a.ok;
                        a_limited += a.limited;
                    }
                    a_other += a.shed + a.other;
                    (
                        format!("{:.0}", a.ok as f64 / args.secs as f64),
                        format!("{:.0}", a.limited as f64 / args.secs as f64),
                    )
                }
                None => ("-".into(), "-".into()),
            };
            println!(
                "{round:>5}  {:<6} {p50:>9.2} {p99:>9.2} {:>5} {:>6} {:>6} {:>8} {a_ok_s:>7} {a_lim_s:>8}",
                if flood { "flood" } else { "quiet" },
                b.ok,
                b.limited,
                b.shed,
                b.other
            );
            if flood {
                flood_p99.push(p99);
            } else {
                quiet_p99.push(p99);
            }
        }
    }
    let (q, f) = (median(quiet_p99), median(flood_p99));
    let flood_secs = (args.secs * args.rounds as u64) as f64;
    println!(
        "B p99 median: quiet {q:.2} ms, flood {f:.2} ms, ratio {:.3} (bound 1.2)",
        f / q
    );
    println!("B requests not answered 200: {b_bad} (bound 0)");
    println!(
        "A in the flood phases: {:.1} req/s admitted of a {} req/s limit ({:.2}x), {:.0} req/s refused with 429; A requests neither 200 nor 429: {a_other}",
        a_ok as f64 / flood_secs,
        args.limit,
        a_ok as f64 / flood_secs / args.limit,
        a_limited as f64 / flood_secs
    );
    let pass = f / q <= 1.2 && b_bad == 0;
    println!("{}", if pass { "PASS" } else { "FAIL" });
    Ok(pass)
}

/// `flood`: everything in this process.
pub async fn run(args: FloodArgs) -> anyhow::Result<()> {
    let served = setup(&args).await?;
    phases(&args, &served.addrs).await?;
    served.finish().await
}

/// `flood-serve`: backend and nodes; prints the addresses; serves until
/// stdin closes, then reports the audit log.
pub async fn serve(args: FloodArgs) -> anyhow::Result<()> {
    let served = setup(&args).await?;
    println!("{}", serde_json::to_string(&served.addrs)?);
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink)
    })
    .await;
    served.finish().await
}

/// `flood-load`: the phases against a `flood-serve`.
pub async fn load(args: FloodArgs) -> anyhow::Result<()> {
    let addrs: Addrs = serde_json::from_str(
        args.addrs
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("--addrs: the JSON line flood-serve printed"))?,
    )?;
    phases(&args, &addrs).await?;
    Ok(())
}
