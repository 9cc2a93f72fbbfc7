//! `dmsc-chaos`: the helper binary of the chaos tests, and the way to bring
//! a lab up by hand.
//!
//! - `load`: runs inside a lab namespace (`ip netns exec`), where the
//!   test process cannot go without `unsafe` `setns`; prints a JSON summary;
//! - `udp-echo`, `udp-probe`: check that the lab's NATs map and its
//!   filters drop as they claim;
//! - `bench-relay`: issue 11's benchmarks of relays and NAT traversal
//!   (`bench` module; root);
//! - `up hybrid-cloud`: builds `topology-examples/hybrid-cloud` in
//!   namespaces and keeps it up until Ctrl-C, then tears it all down.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "dmsc-chaos",
    about = "dmsc chaos lab: load generator and topologies in network namespaces"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Steady HTTP/1.1 GET load (keep-alive) against one ingress
    Load {
        /// Ingress address to connect to
        #[arg(long)]
        connect: SocketAddr,
        /// Host header (agent `<name>.<tenant>.dmsc` or capability
        /// `<tag>.cap.<tenant>.dmsc`); repeatable, used round-robin
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value_t = 1000)]
        count: u64,
        /// Requests per second (all workers together)
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Workers, each with its own kept-alive connection
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Per-request timeout, seconds
        #[arg(long, default_value_t = 35)]
        timeout: u64,
        /// Print the summary as JSON (else a line of text)
        #[arg(long)]
        json: bool,
    },
    /// Answer UDP probes with the source address seen (checks the lab's NATs)
    UdpEcho {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// From one UDP socket, ask each echo server which source address it
    /// sees; prints a JSON list (null: no answer)
    UdpProbe {
        #[arg(long = "to", required = true)]
        to: Vec<SocketAddr>,
        #[arg(long, default_value_t = 500)]
        timeout_ms: u64,
    },
    /// Benchmarks of relays and NAT traversal in one lab (root): direct,
    /// relayed over QUIC, hole punched, relayed over TCP
    BenchRelay {
        /// The dmsc-node binary (default: next to this binary)
        #[arg(long)]
        node_bin: Option<PathBuf>,
        /// Fixed rates, requests per second
        #[arg(long, value_delimiter = ',', default_values_t = [200.0, 1000.0])]
        rates: Vec<f64>,
        /// Seconds per fixed-rate load
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
        /// Requests of the closed-loop max-throughput load
        #[arg(long, default_value_t = 15_000)]
        max_count: u64,
        /// Workers of the max-throughput load
        #[arg(long, default_value_t = 16)]
        max_workers: usize,
        /// Rounds (variant order alternates)
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Repetitions of the path-establishment measure
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Seconds between the client seeing a killed server gone and its
        /// restart, in the path-establishment measure
        #[arg(long, default_value_t = 1.0)]
        settle_secs: f64,
        /// Do not pin (nodes to CPU 0, load to CPU 1)
        #[arg(long)]
        no_pin: bool,
        /// Print the full report as JSON (else Markdown tables)
        #[arg(long)]
        json: bool,
    },
    /// Bring a topology up in network namespaces until Ctrl-C (root)
    Up {
        /// Topology name: `hybrid-cloud`
        topology: String,
        /// The dmsc-node binary (default: next to this binary)
        #[arg(long)]
        node_bin: Option<PathBuf>,
        /// Directory of the topology's configs (default: topology-examples/<topology> of this repository)
        #[arg(long)]
        configs: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Load {
            connect,
            hosts,
            path,
            count,
            rate,
            concurrency,
            timeout,
            json,
        } => {
            let s = dmsc_chaos::load::generate(&dmsc_chaos::LoadSpec {
                connect,
                hosts,
                path,
                count,
                rate,
                concurrency,
                timeout: Duration::from_secs(timeout),
            })?;
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                println!(
                    "{} sent, {} ok, {} failed ({:.4} %), p50 {:.1} ms, p99 {:.1} ms, statuses {:?}",
                    s.sent,
                    s.ok,
                    s.failed,
                    s.success_ratio() * 100.0,
                    s.p50_ms,
                    s.p99_ms,
                    s.statuses
                );
            }
            Ok(())
        }
        Cmd::UdpEcho { listen } => Ok(dmsc_chaos::udp::echo(listen)?),
        Cmd::UdpProbe { to, timeout_ms } => {
            let seen = dmsc_chaos::udp::probe(&to, Duration::from_millis(timeout_ms))?;
            println!("{}", serde_json::to_string(&seen)?);
            Ok(())
        }
        Cmd::BenchRelay {
            node_bin,
            rates,
            secs,
            max_count,
            max_workers,
            rounds,
            reps,
            settle_secs,
            no_pin,
            json,
        } => {
            if let Some(why) = dmsc_chaos::preflight() {
                anyhow::bail!("cannot build the lab: {why}");
            }
            let node_bin = node_bin
                .or_else(dmsc_chaos::bench::default_node_bin)
                .context("no dmsc-node binary")?;
            dmsc_chaos::bench::check_bin(&node_bin)?;
            let spec = dmsc_chaos::bench::BenchSpec {
                node_bin,
                chaos_bin: std::env::current_exe()?,
                rates,
                secs,
                rate_workers: 8,
                max_count,
                max_workers,
                rounds,
                reps,
                pin: !no_pin,
                settle_secs,
            };
            let report = dmsc_chaos::bench::run_bench(&spec)?;
            if json {
                eprint!("{}", dmsc_chaos::bench::render(&report));
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", dmsc_chaos::bench::render(&report));
            }
            Ok(())
        }
        Cmd::Up {
            topology,
            node_bin,
            configs,
        } => up(&topology, node_bin, configs),
    }
}

fn up(topology: &str, node_bin: Option<PathBuf>, configs: Option<PathBuf>) -> anyhow::Result<()> {
    anyhow::ensure!(
        topology == "hybrid-cloud",
        "unknown topology `{topology}`: known is `hybrid-cloud`"
    );
    if let Some(why) = dmsc_chaos::preflight() {
        anyhow::bail!("cannot build the lab: {why}");
    }
    let bin = match node_bin {
        Some(b) => b,
        None => std::env::current_exe()?
            .parent()
            .context("this binary has no directory")?
            .join("dmsc-node"),
    };
    anyhow::ensure!(
        bin.is_file(),
        "no dmsc-node at {}: build it first (`cargo build -p dmsc-node`) or pass --node-bin",
        bin.display()
    );
    if !dmsc_chaos::node::has_relay_support(&bin) {
        eprintln!(
            "warning: {} has no relay support (no `netcheck` subcommand): the hybrid-cloud configs use [relay] and [overlay] relays, which it will refuse",
            bin.display()
        );
    }
    let configs = configs.unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../topology-examples/hybrid-cloud")
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let hybrid = dmsc_chaos::hybrid::up(&bin, &configs)?;
    let ns = |h: &str| hybrid.lab.ns(h).unwrap_or_default();
    println!(
        "hybrid-cloud is up; run directory {}",
        hybrid.lab.dir().display()
    );
    println!("try (each host's ingress is 127.0.0.1:15001 in its namespace):");
    println!(
        "  ip netns exec {} {} status --admin 127.0.0.1:9400",
        ns("eu-1"),
        bin.display()
    );
    println!(
        "  ip netns exec {} curl -si -H 'Host: ledger.acme.dmsc' http://127.0.0.1:15001/hello",
        ns("eu-1")
    );
    println!("Ctrl-C tears it all down.");
    rt.block_on(async {
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r,
                _ = term.recv() => Ok(()),
            }
        }
        #[cfg(not(unix))]
        tokio::signal::ctrl_c().await
    })?;
    eprintln!("tearing down");
    drop(hybrid);
    Ok(())
}
