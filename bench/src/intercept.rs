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
        i.bind(&cg.group, 1, node)?;
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
