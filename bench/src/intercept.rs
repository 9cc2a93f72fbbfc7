//! What interception costs per connection (issue 16): `connect()` to an
//! agent's address directly, against the same `connect()` from a process in
//! a bound cgroup, which the kernel's connect4 program sends to the node's
//! listener (and whose sockops program hands the original destination
//! over), measured one after the other in rounds. Plus the listener's side:
//! taking the original destination back (`Interceptor::take_orig`, two map
//! syscalls) for each accepted connection.
//!
//! Root only (a cgroup of its own and the eBPF programs); loopback only.
//! The clients are this binary again (`intercept-connect-client`), started
//! inside or outside the cgroup.

use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dmsc_ebpf::cgroup::{is_root, Scratch};
use dmsc_ebpf::Interceptor;

#[derive(clap::Args)]
pub struct Args {
    /// Connects per path and round.
    #[arg(long, default_value_t = 5000)]
    n: usize,
    /// Rounds (each runs both paths, direct first).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
}

#[derive(clap::Args)]
pub struct ClientArgs {
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long)]
    n: usize,
}

/// Connects `n` times (after 200 of warm-up), closing each with a reset
/// (no TIME_WAIT left behind); prints the connect() times in nanoseconds,
/// sorted, one per line.
pub fn client(args: ClientArgs) -> anyhow::Result<()> {
    let mut times = Vec::with_capacity(args.n);
    for i in 0..args.n + 200 {
        let t = Instant::now();
        let s = TcpStream::connect(args.addr)?;
        let d = t.elapsed();
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
        drop(s);
        if i >= 200 {
            times.push(d.as_nanos() as u64);
        }
    }
    times.sort_unstable();
    let out: Vec<String> = times.iter().map(u64::to_string).collect();
    println!("{}", out.join("\n"));
    Ok(())
}

/// A listener that accepts and drops every connection; `on_accept` sees
/// each peer first.
fn sink(on_accept: impl Fn(SocketAddrV4) + Send + 'static) -> anyhow::Result<SocketAddrV4> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let SocketAddr::V4(addr) = l.local_addr()? else {
        anyhow::bail!("not IPv4");
    };
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            if let Ok(SocketAddr::V4(p)) = s.peer_addr() {
                on_accept(p);
            }
        }
    });
    Ok(addr)
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        is_root(),
        "intercept-connect needs root (a cgroup and eBPF programs)"
    );
    anyhow::ensure!(
        dmsc_ebpf::built(),
        "this build has no eBPF programs (clang was missing)"
    );
    let agent = sink(|_| {})?;
    let ic = Arc::new(Mutex::new(Interceptor::load()?));
    let takes: Arc<Mutex<Vec<u64>>> = Arc::default();
    let (ic2, takes2) = (ic.clone(), takes.clone());
    let node = sink(move |peer| {
        let t = Instant::now();
        let got = ic2
            .lock()
            .map(|mut i| i.take_orig(peer).ok().flatten().is_some())
            .unwrap_or(false);
        let d = t.elapsed().as_nanos() as u64;
        if got {
            if let Ok(mut v) = takes2.lock() {
                v.push(d);
            }
        }
    })?;
    let cg = Scratch::new("bench")?;
    {
        let mut i = ic.lock().map_err(|_| anyhow::anyhow!("lock"))?;
        i.bind(&cg.group, 1, node, &[])?;
        i.add_dest(agent, 1)?;
    }
    let exe = std::env::current_exe()?;
    let cmd = format!(
        "{} intercept-connect-client --addr {agent} --n {}",
        exe.display(),
        args.n
    );
    let parse = |out: &[u8]| -> Vec<u64> {
        String::from_utf8_lossy(out)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    let mut direct: Vec<u64> = Vec::new();
    let mut intercepted: Vec<u64> = Vec::new();
    println!("| round | path | p50 | p90 | p99 |");
    println!("|---|---|---|---|---|");
    for r in 1..=args.rounds {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("exec {cmd}"))
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "direct client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let d = parse(&out.stdout);
        let out = cg.run(&cmd)?;
        anyhow::ensure!(
            out.status.success(),
            "intercepted client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let i = parse(&out.stdout);
        for (name, v) in [("direct connect()", &d), ("intercepted connect()", &i)] {
            println!(
                "| {r} | {name} | {:.1} µs | {:.1} µs | {:.1} µs |",
                pct(v, 0.5),
                pct(v, 0.9),
                pct(v, 0.99)
            );
        }
        direct.extend(d);
        intercepted.extend(i);
    }
    direct.sort_unstable();
    intercepted.sort_unstable();
    let mut t = takes.lock().map_err(|_| anyhow::anyhow!("lock"))?.clone();
    t.sort_unstable();
    println!();
    println!(
        "all rounds: direct p50 {:.1} µs, intercepted p50 {:.1} µs: +{:.1} µs in the kernel (p99 +{:.1} µs)",
        pct(&direct, 0.5),
        pct(&intercepted, 0.5),
        pct(&intercepted, 0.5) - pct(&direct, 0.5),
        pct(&intercepted, 0.99) - pct(&direct, 0.99)
    );
    println!(
        "listener side, take_orig per accepted connection ({} taken): p50 {:.1} µs, p99 {:.1} µs",
        t.len(),
        pct(&t, 0.5),
        pct(&t, 0.99)
    );
    let stats = ic.lock().map_err(|_| anyhow::anyhow!("lock"))?.stats()?;
    println!("kernel counters: {stats:?}");
    Ok(())
}

/// `intercept-request`: what an intercepted connection costs end to end,
/// against the node's own ingress.
#[derive(clap::Args)]
pub struct RequestArgs {
    /// Fresh connections (and keep-alive requests) per path and round.
    #[arg(long, default_value_t = 2000)]
    n: usize,
    #[arg(long, default_value_t = 2)]
    rounds: usize,
}

#[derive(clap::Args)]
pub struct RequestClientArgs {
    #[arg(long)]
    addr: SocketAddr,
    /// The `Host` header sent.
    #[arg(long)]
    host: String,
    #[arg(long)]
    n: usize,
    /// One connection, `n` requests on it (else a fresh connection each).
    #[arg(long)]
    keepalive: bool,
}

/// Reads one HTTP/1.1 response with a `content-length` from `s`; returns
/// when its last byte is in. `first` is set when its first byte arrives.
fn read_response(s: &mut TcpStream, first: &mut Option<Instant>) -> anyhow::Result<()> {
    use std::io::Read as _;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk)?;
        anyhow::ensure!(n > 0, "connection closed mid-response");
        first.get_or_insert_with(Instant::now);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            anyhow::ensure!(head.starts_with("http/1.1 200"), "not 200: {head}");
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| anyhow::anyhow!("no content-length: {head}"))?;
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk)?;
                anyhow::ensure!(n > 0, "connection closed mid-body");
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok(());
        }
    }
}

/// Times `n` requests (after 100 of warm-up): a fresh connection each
/// (connect, request, first response byte), or all on one keep-alive
/// connection (request to last byte); prints nanoseconds, sorted.
pub fn request_client(args: RequestClientArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    let req = format!(
        "GET /.well-known/agent-card.json HTTP/1.1\r\nHost: {}\r\n\r\n",
        args.host
    );
    let mut times = Vec::with_capacity(args.n);
    let mut kept: Option<TcpStream> = None;
    for i in 0..args.n + 100 {
        let t = Instant::now();
        let mut first = None;
        if args.keepalive {
            let s = match kept.as_mut() {
                Some(s) => s,
                None => kept.insert(TcpStream::connect(args.addr)?),
            };
            s.write_all(req.as_bytes())?;
            read_response(s, &mut first)?;
            first = Some(Instant::now());
        } else {
            let mut s = TcpStream::connect(args.addr)?;
            s.set_nodelay(true)?;
            s.write_all(req.as_bytes())?;
            read_response(&mut s, &mut first)?;
            socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
        }
        if i >= 100 {
            let end = first.unwrap_or_else(Instant::now);
            times.push(end.duration_since(t).as_nanos() as u64);
        }
    }
    times.sort_unstable();
    let out: Vec<String> = times.iter().map(u64::to_string).collect();
    println!("{}", out.join("\n"));
    Ok(())
}

/// One node with two local agents: requests by `Host` to its ingress (the
/// baseline), and the same requests from unmodified clients in two bound
/// cgroups to the agents' mapped addresses, intercepted by eBPF on node 0
/// and by nftables on node 1 (whose `mode = "nftables"`).
pub async fn request_run(args: RequestArgs) -> anyhow::Result<()> {
    use dmsc_node::config::{RawAgent, RawIntercept, RawInterceptBinding, RawInterceptMap};
    use dmsc_node::demo::sample_agent::{CardDialect, SampleAgent, SampleConfig, SampleSkill};
    anyhow::ensure!(
        is_root(),
        "intercept-request needs root (cgroups, eBPF, nftables)"
    );
    anyhow::ensure!(
        dmsc_ebpf::built(),
        "this build has no eBPF programs (clang was missing)"
    );
    let mut agents = Vec::new();
    for name in ["echo0", "echo1"] {
        agents.push(
            SampleAgent::start(
                "127.0.0.1:0".parse()?,
                SampleConfig {
                    name: name.into(),
                    description: "echoes".into(),
                    skills: vec![SampleSkill {
                        id: name.into(),
                        name: name.into(),
                        description: "echoes".into(),
                        tags: vec![name.into()],
                        examples: vec![],
                    }],
                    delay: Duration::ZERO,
                    dialect: CardDialect::V03,
                },
            )
            .await?,
        );
    }
    let cgs = [Scratch::new("req-ebpf")?, Scratch::new("req-nft")?];
    // The baseline's client runs in a cgroup of its own too (not bound):
    // the scheduler treats every client alike.
    let plain = Scratch::new("req-plain")?;
    let free =
        || -> anyhow::Result<u16> { Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()) };
    // The addresses the clients dial: nothing listens there.
    let dialled = [
        format!("127.0.0.1:{}", free()?),
        format!("127.0.0.1:{}", free()?),
    ];
    let urls: Vec<String> = agents.iter().map(|a| a.url()).collect();
    let rels: Vec<String> = cgs.iter().map(|c| c.rel.clone()).collect();
    let listen = format!("127.0.0.1:{}", free()?);
    let d2 = dialled.clone();
    let mesh = dmsc_node::demo::mesh::LocalMesh::start(&["ic0", "ic1"], "acme", move |i, raw| {
        raw.audit.enabled = Some(true);
        raw.agents = vec![RawAgent {
            tenant: "acme".into(),
            url: urls[i].clone(),
            name: Some(format!("echo{i}")),
            ..Default::default()
        }];
        raw.intercept = Some(RawIntercept {
            mode: Some(if i == 0 { "auto" } else { "nftables" }.into()),
            listen: Some(listen.clone()),
            bindings: vec![RawInterceptBinding {
                cgroup: Some(rels[i].clone()),
                tenant: "acme".into(),
                agent: Some("client".into()),
                ..Default::default()
            }],
            map: vec![RawInterceptMap {
                addr: d2[i].clone(),
                name: format!("echo{i}.acme.dmsc"),
            }],
            ..Default::default()
        });
    })
    .await?;
    let started = Instant::now();
    while !(mesh.routable_everywhere("echo0") && mesh.routable_everywhere("echo1")) {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(15),
            "agents not routable"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let exe = std::env::current_exe()?;
    let client = |addr: &str, host: &str, keepalive: bool| {
        format!(
            "{} intercept-request-client --addr {addr} --host {host} --n {}{}",
            exe.display(),
            args.n,
            if keepalive { " --keepalive" } else { "" }
        )
    };
    let parse = |out: &std::process::Output| -> anyhow::Result<Vec<u64>> {
        anyhow::ensure!(
            out.status.success(),
            "client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect())
    };
    let ingress = [mesh.ingress(0).to_string(), mesh.ingress(1).to_string()];
    println!("| round | path | fresh connection: p50 | p99 | keep-alive request: p50 | p99 |");
    println!("|---|---|---|---|---|---|");
    // Each interception mechanism next to its own node's ingress.
    let mut all: Vec<(&str, Vec<u64>, Vec<u64>)> = vec![
        ("node 0 ingress, Host: echo0.acme.dmsc", vec![], vec![]),
        ("node 0 intercepted (eBPF)", vec![], vec![]),
        ("node 1 ingress, Host: echo1.acme.dmsc", vec![], vec![]),
        ("node 1 intercepted (nftables)", vec![], vec![]),
    ];
    for r in 1..=args.rounds {
        for (k, entry) in all.iter_mut().enumerate() {
            let run = |keepalive: bool| -> anyhow::Result<Vec<u64>> {
                let node = k / 2;
                if k % 2 == 0 {
                    let host = format!("echo{node}.acme.dmsc");
                    parse(&plain.run(&client(&ingress[node], &host, keepalive))?)
                } else {
                    parse(&cgs[node].run(&client(&dialled[node], &dialled[node], keepalive))?)
                }
            };
            let fresh = tokio::task::block_in_place(|| run(false))?;
            let kept = tokio::task::block_in_place(|| run(true))?;
            println!(
                "| {r} | {} | {:.1} µs | {:.1} µs | {:.1} µs | {:.1} µs |",
                entry.0,
                pct(&fresh, 0.5),
                pct(&fresh, 0.99),
                pct(&kept, 0.5),
                pct(&kept, 0.99)
            );
            entry.1.extend(fresh);
            entry.2.extend(kept);
        }
    }
    println!();
    for (name, fresh, kept) in all.iter_mut() {
        fresh.sort_unstable();
        kept.sort_unstable();
        println!(
            "all rounds, {name}: fresh p50 {:.1} µs, keep-alive p50 {:.1} µs",
            pct(fresh, 0.5),
            pct(kept, 0.5)
        );
    }
    mesh.stop().await;
    drop(agents);
    Ok(())
}
