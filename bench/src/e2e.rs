//! `dmsc-bench e2e-serve` / `e2e-load`: end-to-end overhead of the mesh on
//! loopback, side by side in one run.
//!
//! `e2e-serve` starts a minimal HTTP backend (answers every request with
//! 1 KiB) and two dmsc nodes in one process; the backend is an agent of
//! node `a`. It prints one JSON line with three addresses for the same
//! backend: `direct`, `one_node` (node a's ingress, local agent) and
//! `two_nodes` (node b's ingress: QUIC with mutual TLS 1.3 to a, then the
//! agent), then serves until stdin closes. Run it pinned to one core
//! (`taskset -c 0`) and it gets one tokio worker, like the reference setups
//! in PERFORMANCE.md.
//!
//! `e2e-load` (pin it to the other core) drives each path in turn with the
//! same load, rounds alternating the order: open-loop at fixed rates with
//! latency measured from each request's *intended* send time (so queueing
//! is not hidden: coordinated omission corrected), then a closed-loop
//! max-throughput run. 1 KiB POST bodies, pooled keep-alive connections.
//! `bench/e2e.sh` runs both.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dmsc_node::config::{RawAgent, RawSkill};
use dmsc_node::demo::mesh::LocalMesh;
use dmsc_node::forward::client::Upstream;
use dmsc_node::proto::http::full;
use http_body_util::BodyExt;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
pub struct Addrs {
    pub direct: SocketAddr,
    pub one_node: SocketAddr,
    pub two_nodes: SocketAddr,
}

#[derive(clap::Args, Debug)]
pub struct LoadArgs {
    /// The JSON line printed by `e2e-serve`.
    #[arg(long)]
    pub addrs: String,
    /// Fixed request rates for the open-loop runs.
    #[arg(long, value_delimiter = ',', default_value = "500,2000")]
    pub rates: Vec<u64>,
    /// Seconds per open-loop run.
    #[arg(long, default_value_t = 5)]
    pub secs: u64,
    /// Concurrent requests of the max-throughput run.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Rounds; each alternates the order of the paths.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Address of an nginx mTLS chain in front of the same backend
    /// (bench/e2e.sh starts one when nginx is installed).
    #[arg(long)]
    pub nginx: Option<SocketAddr>,
}

const BODY: usize = 1024;

/// A minimal HTTP backend: every request gets 1 KiB.
pub(crate) async fn backend(listener: tokio::net::TcpListener) {
    let answer = Bytes::from(vec![b'x'; BODY]);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            Ok((stream, _)) = listener.accept() => {
                let _ = stream.set_nodelay(true);
                let answer = answer.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let answer = answer.clone();
                        async move {
                            let _ = req.into_body().collect().await;
                            Ok::<_, Infallible>(Response::new(http_body_util::Full::new(answer)))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// `e2e-serve`: backend + two nodes; prints the addresses; runs until stdin closes.
pub async fn serve() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let direct = listener.local_addr()?;
    let backend_task = tokio::spawn(backend(listener));
    let url = format!("http://{direct}");
    let mesh = LocalMesh::start(&["a", "b"], "bench", |i, raw| {
        if i == 0 {
            raw.agents = vec![RawAgent {
                tenant: "bench".into(),
                url: url.clone(),
                name: Some("echo".into()),
                skills: Some(vec![RawSkill {
                    id: "echo".into(),
                    tags: vec!["echo".into()],
                    ..Default::default()
                }]),
                ..Default::default()
            }];
        }
    })
    .await?;
    let start = Instant::now();
    while !mesh.routable_everywhere("echo") {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(20),
            "mesh did not converge"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let addrs = Addrs {
        direct,
        one_node: mesh.ingress(0),
        two_nodes: mesh.ingress(1),
    };
    println!("{}", serde_json::to_string(&addrs)?);
    // Serve until the parent closes our stdin.
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink)
    })
    .await;
    mesh.stop().await;
    backend_task.abort();
    Ok(())
}

#[derive(Clone, Copy)]
struct Path {
    name: &'static str,
    addr: SocketAddr,
    host: &'static str,
}

fn request(p: &Path, body: &Bytes) -> anyhow::Result<Request<dmsc_node::proto::http::Body>> {
    Ok(Request::post(format!("http://{}/", p.addr))
        .header("host", p.host)
        .header("content-type", "application/octet-stream")
        .body(full(body.clone()))?)
}

async fn one(client: &Upstream, p: &Path, body: &Bytes) -> bool {
    let Ok(req) = request(p, body) else {
        return false;
    };
    match client.h1.request(req).await {
        Ok(resp) => {
            let ok = resp.status().is_success();
            ok && resp.into_body().collect().await.is_ok()
        }
        Err(_) => false,
    }
}

/// Open loop at `rate`/s for `secs`: latency from each intended send time.
/// Returns (latencies in ms of successful requests, failures).
async fn open_loop(client: &Upstream, p: &Path, rate: u64, secs: u64) -> (Vec<f64>, usize) {
    let body = Bytes::from(vec![b'y'; BODY]);
    let n = rate * secs;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now() + Duration::from_millis(5);
    let mut set = tokio::task::JoinSet::new();
    let client = Arc::new(client.clone());
    let mut lat = Vec::with_capacity(n as usize);
    let mut errors = 0usize;
    let mut take = |r: (bool, f64)| {
        if r.0 {
            lat.push(r.1);
        } else {
            errors += 1;
        }
    };
    for i in 0..n {
        let due = start + interval.mul_f64(i as f64);
        // Coarse sleep, then yield-spin to the exact time (tokio timers
        // have millisecond resolution; sub-ms scheduling needs this).
        let now = Instant::now();
        if due > now + Duration::from_millis(3) {
            tokio::time::sleep(due - now - Duration::from_millis(2)).await;
        }
        while Instant::now() < due {
            tokio::task::yield_now().await;
        }
        let client = client.clone();
        let body = body.clone();
        let path = *p;
        set.spawn(async move {
            let ok = one(&client, &path, &body).await;
            (ok, due.elapsed().as_secs_f64() * 1000.0)
        });
        while let Some(r) = set.try_join_next() {
            if let Ok(r) = r {
                take(r);
            }
        }
    }
    while let Some(r) = set.join_next().await {
        if let Ok(r) = r {
            take(r);
        }
    }
    (lat, errors)
}

/// Closed loop with `c` concurrent requesters for `secs`: requests/s.
async fn max_throughput(client: &Upstream, p: &Path, c: usize, secs: u64) -> (f64, usize) {
    let body = Bytes::from(vec![b'y'; BODY]);
    let until = Instant::now() + Duration::from_secs(secs);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..c {
        let client = client.clone();
        let body = body.clone();
        let path = *p;
        set.spawn(async move {
            let (mut ok, mut err) = (0usize, 0usize);
            while Instant::now() < until {
                if one(&client, &path, &body).await {
                    ok += 1;
                } else {
                    err += 1;
                }
            }
            (ok, err)
        });
    }
    let (mut ok, mut err) = (0, 0);
    while let Some(r) = set.join_next().await {
        if let Ok((o, e)) = r {
            ok += o;
            err += e;
        }
    }
    (ok as f64 / secs as f64, err)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

/// `e2e-load`.
pub async fn load(args: LoadArgs) -> anyhow::Result<()> {
    let addrs: Addrs = serde_json::from_str(&args.addrs)?;
    let mut paths = vec![
        Path {
            name: "direct",
            addr: addrs.direct,
            host: "backend",
        },
        Path {
            name: "1 node",
            addr: addrs.one_node,
            host: "echo.bench.dmsc",
        },
        Path {
            name: "2 nodes (QUIC)",
            addr: addrs.two_nodes,
            host: "echo.bench.dmsc",
        },
    ];
    if let Some(addr) = args.nginx {
        paths.push(Path {
            name: "nginx mTLS chain",
            addr,
            host: "backend",
        });
    }
    let client = Upstream::new();
    // Warm up every path (connections, pools, registry caches).
    for p in &paths {
        for _ in 0..200 {
            anyhow::ensure!(
                one(&client, p, &Bytes::from(vec![b'w'; BODY])).await,
                "warm-up request to {} failed",
                p.name
            );
        }
    }
    // lat[path][rate] accumulates over rounds; thr[path] too.
    let mut lat: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); args.rates.len()]; paths.len()];
    let mut errs: Vec<usize> = vec![0; paths.len()];
    let mut thr: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for round in 0..args.rounds {
        let mut order: Vec<usize> = (0..paths.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for (ri, &rate) in args.rates.iter().enumerate() {
            for &pi in &order {
                let (l, e) = open_loop(&client, &paths[pi], rate, args.secs).await;
                let mut sorted = l.clone();
                eprintln!(
                    "round {round} {:>15} @{rate}/s: {} ok, {e} failed; p50 {:.3} p90 {:.3} p99 {:.3} p99.9 {:.3} max {:.3} ms",
                    paths[pi].name,
                    l.len(),
                    pct(&mut sorted, 0.5),
                    pct(&mut sorted, 0.9),
                    pct(&mut sorted, 0.99),
                    pct(&mut sorted, 0.999),
                    pct(&mut sorted, 1.0)
                );
                lat[pi][ri].extend(l);
                errs[pi] += e;
            }
        }
        for &pi in &order {
            let (t, e) = max_throughput(&client, &paths[pi], args.concurrency, args.secs).await;
            eprintln!(
                "round {round} {:>15} max: {t:.0} req/s, {e} failed",
                paths[pi].name
            );
            thr[pi].push(t);
            errs[pi] += e;
        }
    }
    let mut header = String::from("| path |");
    let mut sep = String::from("|---|");
    for r in &args.rates {
        header.push_str(&format!(" p50 @{r}/s | p99 @{r}/s |"));
        sep.push_str("---|---|");
    }
    header.push_str(" max req/s | failed |");
    sep.push_str("---|---|");
    println!("{header}\n{sep}");
    let mut p50s = vec![vec![0.0; args.rates.len()]; paths.len()];
    let mut p99s = vec![vec![0.0; args.rates.len()]; paths.len()];
    for (pi, p) in paths.iter().enumerate() {
        let mut row = format!("| {} |", p.name);
        for ri in 0..args.rates.len() {
            let v = &mut lat[pi][ri];
            p50s[pi][ri] = pct(v, 0.50);
            p99s[pi][ri] = pct(v, 0.99);
            row.push_str(&format!(
                " {:.3} ms | {:.3} ms |",
                p50s[pi][ri], p99s[pi][ri]
            ));
        }
        let t = thr[pi].iter().sum::<f64>() / thr[pi].len().max(1) as f64;
        row.push_str(&format!(" {t:.0} | {} |", errs[pi]));
        println!("{row}");
    }
    println!();
    for (pi, p) in paths.iter().enumerate().skip(1) {
        for (ri, r) in args.rates.iter().enumerate() {
            println!(
                "{} @{r}/s: added p50 {:+.0} us, added p99 {:+.0} us vs direct",
                p.name,
                (p50s[pi][ri] - p50s[0][ri]) * 1000.0,
                (p99s[pi][ri] - p99s[0][ri]) * 1000.0
            );
        }
        let t = |i: usize| thr[i].iter().sum::<f64>() / thr[i].len().max(1) as f64;
        println!("{}: max throughput {:.2}x of direct", p.name, t(pi) / t(0));
    }
    if let Some(ng) = paths.iter().position(|p| p.name.starts_with("nginx")) {
        let t = |i: usize| thr[i].iter().sum::<f64>() / thr[i].len().max(1) as f64;
        for (ri, r) in args.rates.iter().enumerate() {
            println!(
                "2 nodes vs nginx chain @{r}/s: p50 {:.2}x, p99 {:.2}x",
                p50s[2][ri] / p50s[ng][ri],
                p99s[2][ri] / p99s[ng][ri]
            );
        }
        println!(
            "2 nodes vs nginx chain: max throughput {:.2}x",
            t(2) / t(ng)
        );
    }
    Ok(())
}
