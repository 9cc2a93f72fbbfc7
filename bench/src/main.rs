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
mod gossip;
mod intent;
mod intercept;
mod jwt;
mod mask;
mod mqtt;
mod policy;
mod rss;
mod security;

use clap::Parser;

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
    /// Memory of a node that knows many remote agents (a real `dmsc-node`
    /// process learning them by gossip).
    RegistryRss(rss::RssArgs),
    /// What transparent interception costs per connection (root, eBPF).
    InterceptConnect(intercept::Args),
    /// The client of `intercept-connect` (run by it, inside or outside the cgroup).
    #[command(hide = true)]
    InterceptConnectClient(intercept::ClientArgs),
    /// An intercepted request end to end (fresh connection and keep-alive)
    /// against the node's ingress, eBPF and nftables (root).
    InterceptRequest(intercept::RequestArgs),
    /// The client of `intercept-request`.
    #[command(hide = true)]
    InterceptRequestClient(intercept::RequestClientArgs),
    /// Gossip convergence, propagation, failure detection and bandwidth.
    Gossip(gossip::GossipArgs),
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

fn rt() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Gossip(args) => gossip::run(args)?,
        Cmd::Balance(args) => balance::run(args)?,
        Cmd::Audit(args) => rt()?.block_on(audit::run(args))?,
        Cmd::Jwt(args) => rt()?.block_on(jwt::run(args))?,
        Cmd::Handshake(args) => rt()?.block_on(security::handshake(args))?,
        Cmd::AuthE2e(args) => rt()?.block_on(security::auth_e2e(args))?,
        Cmd::Policy(args) => policy::run(args)?,
        Cmd::Mask(args) => mask::run(args)?,
        Cmd::Intent(args) => intent::run(args)?,
        Cmd::Mqtt(args) => rt()?.block_on(mqtt::run(args))?,
        Cmd::RegistryRss(args) => rt()?.block_on(rss::run(args))?,
        Cmd::InterceptConnect(args) => intercept::run(args)?,
        Cmd::InterceptConnectClient(args) => intercept::client(args)?,
        Cmd::InterceptRequest(args) => rt()?.block_on(intercept::request_run(args))?,
        Cmd::InterceptRequestClient(args) => intercept::request_client(args)?,
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
