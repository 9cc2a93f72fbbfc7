//! `dmsc-node`: parse the command line, start logging, call the library.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use dmsc_node::admin::status;
use dmsc_node::config::{RawAdmin, RawConfig, RawOverlay, RawTls};
use dmsc_node::{App, NodeError};

/// The node's allocator: a proxy allocates and frees many small buffers per
/// request, from several threads; jemalloc does that for less CPU and keeps
/// less memory per small allocation than glibc's (BENCHMARKS.md, issue 14).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "dmsc-node",
    version,
    about = "A peer gateway node of the dmsc agent mesh"
)]
struct Cli {
    /// Log format: text or json (filter with RUST_LOG, e.g. RUST_LOG=debug).
    #[arg(long, global = true, default_value = "text")]
    log_format: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node.
    Run(RunArgs),
    /// Show this node, its peers and their state (a client of the admin API).
    Status {
        /// Admin address of the node.
        #[arg(long, default_value = dmsc_node::config::DEFAULT_ADMIN_LISTEN, env = "DMSC_ADMIN")]
        admin: SocketAddr,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// A token file to send: the node admin token, or a tenant read
        /// token (needed when the node sets `[admin] open_reads = false`).
        #[arg(long, env = "DMSC_STATUS_TOKEN_FILE")]
        admin_token: Option<PathBuf>,
    },
    /// Operator CA: create it, issue node certificates, sign revocations.
    #[command(subcommand)]
    Ca(CaCmd),
    /// One-time, tenant-scoped join tokens for agent enrollment.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Tenant-scoped, read-only tokens for the admin API.
    #[command(subcommand)]
    AdminToken(AdminTokenCmd),
    /// Hand a signed revocation to a running node (it spreads by gossip).
    #[command(subcommand)]
    Revoke(RevokeCmd),
    /// Tenant policies: sign a document, apply it through a node (it
    /// spreads by gossip), show what a node enforces, diff against it.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Verify or read a node's audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Tenant data keys: sign and apply `rotate-key` / `delete` (crypto-
    /// shredding) statements; they spread to every node by gossip.
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// Transparent interception on a running node (its `[intercept]`
    /// section): bind a cgroup's or a user's processes to a tenant, unbind,
    /// list. Changes last until disabled or the node stops.
    #[command(subcommand)]
    Intercept(InterceptCmd),
    /// Check certificates, key files, CA agreement and clock skew with
    /// peers; exits 1 with a clear line for each problem.
    Check {
        #[command(flatten)]
        run: ConfigArgs,
        /// Clock skew with a peer above this fails the check.
        #[arg(long, default_value_t = 1000)]
        max_skew_ms: u64,
    },
    /// What the network lets through to the mesh: UDP, the public address
    /// relays see, NAT mapping behaviour, TCP fallback, RTT to each relay and
    /// bootstrap peer.
    Netcheck {
        #[command(flatten)]
        run: ConfigArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the built-in sample A2A agent (serves a card, answers
    /// message/send and message/stream in both A2A dialects).
    SampleAgent {
        #[arg(long, default_value = "127.0.0.1:9101")]
        listen: std::net::SocketAddr,
        #[arg(long, default_value = "sample")]
        name: String,
        #[arg(long, default_value = "A sample agent")]
        description: String,
        /// A skill as id:description:tag1,tag2 (repeatable).
        #[arg(long = "skill")]
        skills: Vec<String>,
        /// Added before every answer.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Card shape: 0.3 (url, preferredTransport) or 1.0 (supportedInterfaces).
        #[arg(long, default_value = "0.3")]
        a2a: String,
    },
    /// A local 3-node mesh on loopback with a throwaway CA. Start here.
    Demo {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        duration: Option<u64>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Check the configuration and exit.
    #[arg(long)]
    validate_only: bool,
}

/// The node's configuration: a file, and flags over it.
#[derive(clap::Args)]
struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Bootstrap peer HOST:PORT (repeatable; replaces overlay.bootstrap).
    #[arg(long)]
    bootstrap: Vec<String>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    region: Option<String>,
    /// Overlay listen address (overlay.listen).
    #[arg(long)]
    listen: Option<String>,
    /// Address peers dial (overlay.advertise).
    #[arg(long)]
    advertise: Option<String>,
    /// Admin API listen address (admin.listen).
    #[arg(long)]
    admin: Option<String>,
    #[arg(long)]
    ca: Option<PathBuf>,
    #[arg(long)]
    cert: Option<PathBuf>,
    #[arg(long)]
    key: Option<PathBuf>,
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create the operator root CA: writes ca.pem and ca.key (mode 0600).
    Init {
        #[arg(long)]
        trust_domain: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a node's credentials: its certificate (node.pem, node.key
    /// 0600), its issuing certificate for agents (issuer.pem, issuer.key
    /// 0600) and a copy of ca.pem; recorded in the CA directory's
    /// issued.jsonl (`ca revoke --node`).
    IssueNode {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u64,
        /// Extra DNS name or IP address agents reach the node's TLS ingress
        /// by (repeatable; default: localhost and 127.0.0.1).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Limit the node to this tenant (repeatable; default: any tenant):
        /// both certificates carry the scope; its issuing certificate signs
        /// agents of these tenants only, and home nodes deliver its
        /// delegations for these tenants only.
        #[arg(long = "tenant")]
        tenants: Vec<String>,
    },
    /// Issue a tenant admin key: it signs that tenant's policy documents
    /// only (`policy sign --cert --key`). Writes tenant-<T>.pem and .key.
    IssueTenant {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        tenant: String,
        /// Directory to write to (default: the CA directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
    /// Sign a revocation of a certificate (by serial or file), or of every
    /// certificate of a node, with the CA key; prints the statements (JSON,
    /// one per line) for `dmsc-node revoke apply`.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["serial", "cert", "node"])))]
    Revoke {
        #[arg(long)]
        ca_dir: PathBuf,
        /// Serial in hex (as `status`, the audit log or openssl print it).
        #[arg(long)]
        serial: Option<String>,
        /// A PEM certificate to revoke (its leaf).
        #[arg(long)]
        cert: Option<PathBuf>,
        /// Every unexpired certificate this CA issued to the node of that
        /// name (node and issuing certificates; the CA directory's
        /// issued.jsonl): cuts the node and the agents it certified off.
        #[arg(long)]
        node: Option<String>,
        #[arg(long, default_value = "unspecified")]
        reason: String,
        /// Write the statement here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Where a mutating admin call goes, and the token it needs.
#[derive(clap::Args)]
struct AdminArgs {
    #[arg(long, default_value = dmsc_node::config::DEFAULT_ADMIN_LISTEN, env = "DMSC_ADMIN")]
    admin: SocketAddr,
    /// The node's admin token file (`<data_dir>/admin.token`).
    #[arg(
        long,
        default_value = "data/admin.token",
        env = "DMSC_ADMIN_TOKEN_FILE"
    )]
    admin_token: PathBuf,
}

impl AdminArgs {
    fn token(&self) -> anyhow::Result<String> {
        dmsc_node::ops::read_admin_token(&self.admin_token).map_err(anyhow::Error::msg)
    }
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a join token for one agent of one tenant (printed once).
    Create {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        agent: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// Bind it to a cgroup v2 group: only its processes may redeem it,
        /// at the node's metadata endpoint (`[intercept] metadata_socket`).
        #[arg(long, conflicts_with = "uid")]
        cgroup: Option<String>,
        /// Bind it to a user id (same endpoint).
        #[arg(long, conflicts_with = "netns")]
        uid: Option<u32>,
        /// Bind it to a named network namespace (same endpoint).
        #[arg(long)]
        netns: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum AdminTokenCmd {
    /// Create a read-only token for one tenant's operators (printed once):
    /// with it `/v1/status`, `/v1/agents`, `/v1/audit` show that tenant only.
    Create {
        #[arg(long)]
        tenant: String,
        /// Required: tenant tokens can only read.
        #[arg(long, required = true)]
        read_only: bool,
        /// Lifetime, e.g. 24h, 30d (default: until revoked).
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<Duration>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List the node's tenant read tokens (ids, tenants, expiry; no secrets).
    List {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Revoke a tenant read token by its id.
    Revoke {
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum InterceptCmd {
    /// Redirect the outbound connections of a cgroup's (or a user's)
    /// processes to mesh agents through this node, as callers of a tenant.
    Enable {
        /// A cgroup v2 group, relative to the cgroup2 mount.
        #[arg(long, required_unless_present_any = ["uid", "netns"], conflicts_with_all = ["uid", "netns"])]
        cgroup: Option<String>,
        /// A user id (nftables).
        #[arg(long, conflicts_with = "netns")]
        uid: Option<u32>,
        /// A named network namespace, every process in it (nftables,
        /// rules inside the namespace).
        #[arg(long)]
        netns: Option<String>,
        #[arg(long)]
        tenant: String,
        /// The agent they are, in audit entries and `dmsc-caller`.
        #[arg(long)]
        agent: Option<String>,
        /// Only connections to these destination ports (e.g. 80,8080;
        /// default: any port of a selected address).
        #[arg(long, value_delimiter = ',')]
        ports: Vec<u16>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Stop intercepting a cgroup, a user, or everything: their
    /// connections go direct again and the rules are removed.
    Disable {
        #[arg(long, conflicts_with_all = ["uid", "netns", "all"])]
        cgroup: Option<String>,
        #[arg(long, conflicts_with_all = ["netns", "all"])]
        uid: Option<u32>,
        #[arg(long, conflicts_with = "all")]
        netns: Option<String>,
        #[arg(long, required_unless_present_any = ["cgroup", "uid", "netns"])]
        all: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// The mechanism in use (eBPF or nftables, and why) and the bindings.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// Percent-encodes what is not safe in a query value.
fn query_escape(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"/._-".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    dmsc_node::admin::audit::parse_duration(s)
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Check a policy document (every problem at once) and sign its exact
    /// bytes with the operator CA key or a tenant admin key.
    Sign {
        /// The policy document (TOML or JSON).
        file: PathBuf,
        /// Sign with the operator CA in this directory.
        #[arg(long, conflicts_with_all = ["cert", "key"])]
        ca_dir: Option<PathBuf>,
        /// Tenant admin certificate (`ca issue-tenant`).
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// Tenant admin key.
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        /// Write the signed policy here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Hand a signed policy to a node: verified, persisted, spread by gossip.
    Apply {
        file: PathBuf,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// The policies a node enforces (one tenant's document with TENANT).
    Show {
        tenant: Option<String>,
        #[arg(long, default_value = dmsc_node::config::DEFAULT_ADMIN_LISTEN, env = "DMSC_ADMIN")]
        admin: SocketAddr,
        /// A token file for a node with `[admin] open_reads = false` (the
        /// node admin token, or a tenant read token: its own policy only).
        #[arg(long, env = "DMSC_STATUS_TOKEN_FILE")]
        admin_token: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Line diff between the document a node enforces for a tenant and a
    /// file (a document or a signed policy). Exit 1 when they differ.
    Diff {
        file: PathBuf,
        #[arg(long, default_value = dmsc_node::config::DEFAULT_ADMIN_LISTEN, env = "DMSC_ADMIN")]
        admin: SocketAddr,
        #[arg(long, env = "DMSC_STATUS_TOKEN_FILE")]
        admin_token: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum RevokeCmd {
    /// Publish revocations from `dmsc-node ca revoke` (one statement or
    /// several, one per line) through a node.
    Apply {
        file: PathBuf,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum TenantCmd {
    /// Sign a statement making every node create a new data key for the
    /// tenant (new data uses it, old data stays readable); without --out,
    /// apply it through the local node.
    RotateKey {
        #[command(flatten)]
        statement: TenantStatementArgs,
    },
    /// Sign a statement making every node destroy the tenant's data keys
    /// (crypto-shredding: its sealed data becomes unreadable); without
    /// --out, apply it through the local node.
    Delete {
        #[command(flatten)]
        statement: TenantStatementArgs,
    },
    /// Hand a signed statement (from `--out`) to a running node.
    Apply {
        file: PathBuf,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(clap::Args)]
struct TenantStatementArgs {
    /// The operator CA directory (its key signs the statement).
    #[arg(long)]
    ca_dir: PathBuf,
    #[arg(long)]
    tenant: String,
    /// Write the statement here (for `tenant apply` on any node) instead
    /// of applying it through the local node.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check the hash chain and the signed checkpoints; report the first
    /// entry modified, removed, reordered or inserted. Exit 1 if any.
    Verify {
        /// The audit directory (or the audit.jsonl file).
        #[arg(long, default_value = "data/audit")]
        dir: PathBuf,
        /// CA bundle the checkpoint signers must chain to.
        #[arg(long)]
        ca: Option<PathBuf>,
    },
    /// Counts of one tenant's audit entries for compliance: delegations by
    /// outcome, denials by rule, rate-limited requests, masked values by
    /// rule, enrollments, policy changes, auth failures, and any other kind.
    Report {
        #[arg(long)]
        tenant: String,
        /// Count entries from this RFC 3339 time, or this long ago (24h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// The audit directory or its audit.jsonl (default: data/audit).
        #[arg(long, alias = "dir", conflicts_with = "data_dir")]
        file: Option<PathBuf>,
        /// The node's data directory (the log is in <data_dir>/audit).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Print entries (JSON lines), optionally of one tenant only. Sealed
    /// tenant fields are opened with the node's tenant keys where present;
    /// otherwise they stay sealed with `"unreadable"` saying why.
    Tail {
        #[arg(long, default_value = "data/audit")]
        dir: PathBuf,
        #[arg(long)]
        tenant: Option<String>,
        /// The node's data dir (its `tenant-keys/` opens sealed fields).
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
}

fn init_logging(format: &str, default: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let logging = tracing_subscriber::registry()
        .with(filter)
        .with(dmsc_node::edge::embedded::QuietBrokerRouter);
    if format == "json" {
        logging.with(fmt.json()).init();
    } else {
        logging.with(fmt).init();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

fn load_config(args: &ConfigArgs) -> Result<dmsc_node::NodeConfig, dmsc_node::ConfigError> {
    let file = match &args.config {
        Some(p) => RawConfig::from_file(p)?,
        None => RawConfig::default(),
    };
    let env: HashMap<String, String> = std::env::vars().collect();
    let flags = RawConfig {
        name: args.name.clone(),
        region: args.region.clone(),
        overlay: RawOverlay {
            listen: args.listen.clone(),
            advertise: args.advertise.clone(),
            bootstrap: (!args.bootstrap.is_empty()).then(|| args.bootstrap.clone()),
            ..Default::default()
        },
        tls: RawTls {
            ca: args.ca.clone(),
            cert: args.cert.clone(),
            key: args.key.clone(),
            ..Default::default()
        },
        admin: RawAdmin {
            listen: args.admin.clone(),
            ..Default::default()
        },
        ..Default::default()
    };
    file.overlay_with(RawConfig::from_env(&env)?)?
        .overlay_with(flags)?
        .validate()
}

async fn run(args: RunArgs) -> Result<(), NodeError> {
    let config = load_config(&args.config)?;
    tracing::info!(config = %config.summary(), "effective configuration");
    if args.validate_only {
        // As `run` takes the identity: unreadable files, a key of another
        // pair, a name the certificate does not carry.
        dmsc_node::App::identity(&config)?;
        println!("configuration is valid");
        return Ok(());
    }
    let app = App::build(config).await?;
    // A second SIGTERM or Ctrl-C during the drain stops at once. Made only
    // after the first, so the first signal does not also count as the second.
    app.run_with(shutdown_signal(), || async {
        shutdown_signal().await;
        tracing::warn!(
            "second shutdown signal: stopping without waiting for the requests in flight"
        );
    })
    .await;
    Ok(())
}

fn ca(cmd: CaCmd) -> anyhow::Result<()> {
    use dmsc_node::ops::ca;
    match cmd {
        CaCmd::Init { trust_domain, out } => println!("{}", ca::init(&trust_domain, &out)?),
        CaCmd::IssueNode {
            ca_dir,
            name,
            out,
            days,
            sans,
            tenants,
        } => {
            let req = ca::IssueNode {
                ca_dir,
                name,
                out,
                days,
                sans,
                tenants,
            };
            println!("{}", ca::issue_node(&req)?);
        }
        CaCmd::IssueTenant {
            ca_dir,
            tenant,
            out,
            days,
        } => {
            let out = out.unwrap_or_else(|| ca_dir.clone());
            println!(
                "{}",
                dmsc_node::ops::policy::issue_tenant(&ca_dir, &tenant, &out, days)?
            );
        }
        CaCmd::Revoke {
            ca_dir,
            serial,
            cert,
            node,
            reason,
            out,
        } => {
            let (revocations, what) = match node {
                Some(name) => {
                    let signed = ca::revoke_node(&ca_dir, &name, &reason)?;
                    let what = signed
                        .iter()
                        .map(|(i, r)| format!("{} certificate, serial {}", i.role, r.serial))
                        .collect::<Vec<_>>()
                        .join("; ");
                    let rs: Vec<_> = signed.into_iter().map(|(_, r)| r).collect();
                    let what = format!("{} revocation(s) of node `{name}` ({what})", rs.len());
                    (rs, what)
                }
                None => {
                    let r = ca::revoke(&ca_dir, serial, cert.as_deref(), &reason)?;
                    let what = format!("revocation of serial {}", r.serial);
                    (vec![r], what)
                }
            };
            match out {
                Some(path) => {
                    ca::write_revocations(&revocations, &path)?;
                    eprintln!("{what} written to {}", path.display());
                }
                None => {
                    for r in &revocations {
                        println!("{}", r.to_json());
                    }
                }
            }
        }
    }
    Ok(())
}

/// Writes a command's output; `false` once the reader went away (`| head`):
/// the command stops quietly instead of panicking on a broken pipe.
fn write_out(out: &mut impl std::io::Write, text: &str) -> anyhow::Result<bool> {
    match out.write_all(text.as_bytes()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(anyhow::anyhow!("cannot write the output: {e}")),
    }
}

/// Reads an optional admin token file.
fn read_token(path: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    path.map(dmsc_node::ops::read_admin_token)
        .transpose()
        .map_err(anyhow::Error::msg)
}

async fn policy(cmd: PolicyCmd) -> anyhow::Result<ExitCode> {
    use dmsc_node::ops::policy as p;
    match cmd {
        PolicyCmd::Sign {
            file,
            ca_dir,
            cert,
            key,
            out,
        } => {
            let with = match (ca_dir, cert, key) {
                (Some(ca_dir), _, _) => p::SignWith::Operator { ca_dir },
                (None, Some(cert), Some(key)) => p::SignWith::TenantAdmin { cert, key },
                _ => return Err(p::PolicyCmdError::NoKey.into()),
            };
            let signed = match p::sign(&file, &with) {
                Ok(s) => s,
                Err(p::PolicyCmdError::Policy(dmsc_policy::PolicyError::Invalid(problems))) => {
                    eprintln!(
                        "{}: {} problem(s), nothing signed:",
                        file.display(),
                        problems.len()
                    );
                    for pr in problems {
                        eprintln!("  {pr}");
                    }
                    return Ok(ExitCode::from(1));
                }
                Err(e) => return Err(e.into()),
            };
            match out {
                Some(path) => {
                    dmsc_transport::pki::write_file(&path, &signed, 0o644)?;
                    eprintln!("signed policy written to {}", path.display());
                }
                None => println!("{signed}"),
            }
        }
        PolicyCmd::Apply { file, admin } => {
            let (status, v) = p::apply(admin.admin, &admin.token()?, &file).await?;
            if (200..300).contains(&status) {
                println!(
                    "tenant `{}`: policy version {} {}",
                    v["tenant"].as_str().unwrap_or("?"),
                    v["version"],
                    if v["new"].as_bool() == Some(true) {
                        "applied; it spreads by gossip"
                    } else {
                        "already in force"
                    }
                );
            } else {
                let error = v["error"].as_str().unwrap_or_default();
                eprintln!("refused ({status}): {error}");
                // The problems list repeats a single problem as the error.
                for pr in v["problems"].as_array().into_iter().flatten() {
                    let pr = pr.as_str().unwrap_or_default();
                    if pr != error {
                        eprintln!("  {pr}");
                    }
                }
                return Ok(ExitCode::from(1));
            }
        }
        PolicyCmd::Show {
            tenant,
            admin,
            admin_token,
            json,
        } => {
            let token = read_token(admin_token.as_deref())?;
            let v = p::show(admin, tenant.as_deref(), token.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if tenant.is_some() {
                eprintln!(
                    "# tenant `{}` version {} signed by {} (digest {})",
                    v["tenant"].as_str().unwrap_or("?"),
                    v["version"],
                    v["signer"].as_str().unwrap_or("?"),
                    v["digest"].as_str().unwrap_or("?")
                );
                print!("{}", v["document"].as_str().unwrap_or_default());
            } else {
                let rows: Vec<[String; 5]> = v["policies"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| {
                        [
                            e["tenant"].as_str().unwrap_or("?").to_string(),
                            e["version"].to_string(),
                            e["rules"].to_string(),
                            e["signer"].as_str().unwrap_or("?").to_string(),
                            e["digest"]
                                .as_str()
                                .unwrap_or("?")
                                .get(..16)
                                .unwrap_or("")
                                .to_string(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    dmsc_node::admin::status::table(
                        &["TENANT", "VERSION", "RULES", "SIGNER", "DIGEST"],
                        &rows
                    )
                );
            }
        }
        PolicyCmd::Diff {
            file,
            admin,
            admin_token,
        } => {
            let token = read_token(admin_token.as_deref())?;
            let new = p::document_text(&file)?;
            let tenant = dmsc_policy::Policy::parse(new.as_bytes())
                .map(|p| p.tenant)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let held = match p::show(admin, Some(&tenant), token.as_deref()).await {
                Ok(v) => v["document"].as_str().unwrap_or_default().to_string(),
                Err(p::PolicyCmdError::Admin(dmsc_node::admin::status::StatusError::Http {
                    status: 404,
                    ..
                })) => String::new(),
                Err(e) => return Err(e.into()),
            };
            let d = p::diff(&held, &new);
            if d.is_empty() {
                println!("tenant `{tenant}`: the node enforces exactly this document");
            } else {
                println!(
                    "--- node's policy of tenant `{tenant}`\n+++ {}",
                    file.display()
                );
                print!("{d}");
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn sample_agent(
    listen: std::net::SocketAddr,
    name: String,
    description: String,
    skills: Vec<String>,
    delay_ms: u64,
    a2a: &str,
) -> anyhow::Result<()> {
    use dmsc_node::demo::sample_agent::{CardDialect, SampleAgent, SampleConfig, SampleSkill};
    let dialect = match a2a {
        "0.3" => CardDialect::V03,
        "1.0" => CardDialect::V10,
        other => anyhow::bail!("--a2a `{other}`: expected 0.3 or 1.0"),
    };
    let mut parsed = Vec::new();
    for s in &skills {
        parsed.push(SampleSkill::parse(s).map_err(anyhow::Error::msg)?);
    }
    if parsed.is_empty() {
        parsed.push(
            SampleSkill::parse(&format!("{name}:{description}:{name}"))
                .map_err(anyhow::Error::msg)?,
        );
    }
    let agent = SampleAgent::start(
        listen,
        SampleConfig {
            name: name.clone(),
            description,
            skills: parsed,
            delay: Duration::from_millis(delay_ms),
            dialect,
        },
    )
    .await?;
    tracing::info!(name = %name, url = %agent.url(), "sample agent ready");
    eprintln!("sample agent `{name}` listening on {}", agent.url());
    shutdown_signal().await;
    Ok(())
}

/// `tenant rotate-key|delete`: sign, then write to `--out` or apply
/// through the local node.
async fn tenant_statement(args: TenantStatementArgs, action: &str) -> anyhow::Result<()> {
    use dmsc_node::ops::ca;
    let st = ca::tenant_key_statement(&args.ca_dir, &args.tenant, action)?;
    match args.out {
        Some(path) => {
            ca::write_tenant_key_statement(&st, &path)?;
            eprintln!(
                "`{action}` statement for tenant `{}` written to {} (apply with `dmsc-node tenant apply`)",
                st.tenant,
                path.display()
            );
        }
        None => {
            let v = dmsc_node::ops::tenant_key_apply(
                args.admin.admin,
                &args.admin.token()?,
                st.to_json(),
            )
            .await?;
            print_tenant_applied(&v);
        }
    }
    Ok(())
}

fn print_tenant_applied(v: &serde_json::Value) {
    let tenant = v["tenant"].as_str().unwrap_or("?");
    let what = match (v["action"].as_str(), v["new"].as_bool()) {
        (_, Some(false)) => "already applied on this node".to_string(),
        (Some("delete"), _) => format!(
            "keys destroyed on this node: {} (other nodes shred theirs when gossip reaches them)",
            v["keys_destroyed"]
        ),
        _ => format!("new key {} on this node", v["key_id"]),
    };
    println!(
        "tenant `{tenant}` {}: {what}",
        v["action"].as_str().unwrap_or("?")
    );
}

async fn ops(cmd: Cmd) -> anyhow::Result<ExitCode> {
    use dmsc_node::ops;
    match cmd {
        Cmd::Token(TokenCmd::Create {
            tenant,
            agent,
            ttl,
            cgroup,
            uid,
            netns,
            admin,
        }) => {
            let v = ops::token_create(
                admin.admin,
                &admin.token()?,
                ops::TokenAsk {
                    tenant: &tenant,
                    agent: &agent,
                    ttl: Duration::from_secs(ttl),
                    cgroup: cgroup.as_deref(),
                    uid,
                    netns: netns.as_deref(),
                },
            )
            .await?;
            eprintln!(
                "join token for agent `{agent}` of tenant `{tenant}` (one use, expires at unix {}):",
                v["expires_at"]
            );
            println!("{}", v["token"].as_str().unwrap_or_default());
        }
        Cmd::AdminToken(AdminTokenCmd::Create {
            tenant,
            read_only: _,
            ttl,
            admin,
        }) => {
            let v = ops::admin_token_create(admin.admin, &admin.token()?, &tenant, ttl).await?;
            eprintln!(
                "read-only admin token `{}` for tenant `{tenant}` ({}); pass it as `Authorization: Bearer <token>` or `dmsc-node status --admin-token FILE`:",
                v["id"].as_str().unwrap_or("?"),
                match v["expires_at"].as_u64() {
                    Some(t) => format!("expires at unix {t}"),
                    None => "until revoked".to_string(),
                }
            );
            println!("{}", v["token"].as_str().unwrap_or_default());
        }
        Cmd::Intercept(InterceptCmd::Enable {
            cgroup,
            uid,
            netns,
            tenant,
            agent,
            ports,
            admin,
        }) => {
            let body = serde_json::json!({
                "cgroup": cgroup, "uid": uid, "netns": netns, "tenant": tenant, "agent": agent,
                "ports": ports,
            });
            let v = ops::intercept_call(
                admin.admin,
                Some(&admin.token()?),
                hyper::Method::POST,
                "/v1/intercept",
                Some(body),
            )
            .await?;
            let b = &v["bound"];
            println!(
                "intercepting {} as tenant {} ({})",
                b["who"].as_str().unwrap_or("?"),
                b["tenant"].as_str().unwrap_or("?"),
                b["mechanism"].as_str().unwrap_or("?")
            );
        }
        Cmd::Intercept(InterceptCmd::Disable {
            cgroup,
            uid,
            netns,
            all,
            admin,
        }) => {
            let query = match (cgroup, uid, netns) {
                _ if all => "all".to_string(),
                (Some(c), _, _) => format!("cgroup={}", query_escape(&c)),
                (None, Some(u), _) => format!("uid={u}"),
                (None, None, Some(n)) => format!("netns={}", query_escape(&n)),
                (None, None, None) => {
                    anyhow::bail!("say which: --cgroup PATH, --uid N, --netns NAME or --all")
                }
            };
            let v = ops::intercept_call(
                admin.admin,
                Some(&admin.token()?),
                hyper::Method::DELETE,
                &format!("/v1/intercept?{query}"),
                None,
            )
            .await?;
            for w in v["removed"].as_array().cloned().unwrap_or_default() {
                println!("no longer intercepting {}", w.as_str().unwrap_or("?"));
            }
        }
        Cmd::Intercept(InterceptCmd::Status { json, admin }) => {
            // A read: open unless the node sets `open_reads = false`, so the
            // token is sent when there is one, not required.
            let token = admin.token().ok();
            let v = ops::intercept_call(
                admin.admin,
                token.as_deref(),
                hyper::Method::GET,
                "/v1/intercept",
                None,
            )
            .await?;
            if json {
                println!("{v:#}");
            } else {
                println!("mechanism: {}", v["mechanism"].as_str().unwrap_or("?"));
                if let Some(why) = v["fallback"].as_str() {
                    println!("eBPF unavailable: {why}");
                }
                if let Some(l) = v["listen"].as_str() {
                    println!("eBPF listener: {l}");
                }
                for t in v["competing_tables"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                {
                    println!(
                        "warning: nftables table `{}` also redirects local connections and may take them first",
                        t.as_str().unwrap_or("?")
                    );
                }
                let bound = v["bindings"].as_array().cloned().unwrap_or_default();
                if bound.is_empty() {
                    println!("no bindings");
                }
                for b in bound {
                    let ports: Vec<u16> = b["ports"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|p| u16::try_from(p.as_u64()?).ok())
                                .collect()
                        })
                        .unwrap_or_default();
                    println!(
                        "{:<32}  {:<24}  {}{}{}",
                        b["who"].as_str().unwrap_or("?"),
                        format!(
                            "{}{}",
                            b["tenant"].as_str().unwrap_or("?"),
                            b["agent"]
                                .as_str()
                                .map(|a| format!("/{a}"))
                                .unwrap_or_default()
                        ),
                        b["mechanism"].as_str().unwrap_or("?"),
                        b["listen"]
                            .as_str()
                            .map(|l| format!(" on {l}"))
                            .unwrap_or_default(),
                        dmsc_node::admin::status::ports_text(&ports)
                    );
                }
            }
        }
        Cmd::AdminToken(AdminTokenCmd::List { admin }) => {
            let v = ops::admin_token_list(admin.admin, &admin.token()?).await?;
            println!("{:<16}  {:<24}  EXPIRES", "ID", "TENANT");
            for t in v["tokens"].as_array().cloned().unwrap_or_default() {
                println!(
                    "{:<16}  {:<24}  {}",
                    t["id"].as_str().unwrap_or("?"),
                    t["tenant"].as_str().unwrap_or("?"),
                    t["expires_at"]
                        .as_u64()
                        .map(|e| format!("unix {e}"))
                        .unwrap_or_else(|| "never".into())
                );
            }
        }
        Cmd::AdminToken(AdminTokenCmd::Revoke { id, admin }) => {
            if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                anyhow::bail!("`{id}` is not a token id (hex, as `admin-token list` shows)");
            }
            ops::admin_token_revoke(admin.admin, &admin.token()?, &id).await?;
            println!("tenant read token `{id}` revoked");
        }
        Cmd::Revoke(RevokeCmd::Apply { file, admin }) => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("cannot read `{}`: {e}", file.display()))?;
            // One statement, or several (`ca revoke --node`: one per line).
            let statements = serde_json::Deserializer::from_str(&text)
                .into_iter::<serde_json::Value>()
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    anyhow::anyhow!("`{}` is not revocation statements: {e}", file.display())
                })?;
            if statements.is_empty() {
                anyhow::bail!("`{}` holds no revocation statement", file.display());
            }
            let token = admin.token()?;
            let mut failed = 0;
            for statement in &statements {
                match ops::revoke_apply(admin.admin, &token, statement.to_string()).await {
                    Ok(v) => println!(
                        "serial {} revoked ({}); closed connections: {}",
                        v["serial"].as_str().unwrap_or("?"),
                        if v["new"].as_bool() == Some(true) {
                            "new"
                        } else {
                            "already known"
                        },
                        v["closed_connections"]
                    ),
                    Err(e) => {
                        failed += 1;
                        eprintln!(
                            "serial {}: {e}",
                            statement["serial"].as_str().unwrap_or("?")
                        );
                    }
                }
            }
            if failed > 0 {
                anyhow::bail!(
                    "{failed} of {} statements were not applied",
                    statements.len()
                );
            }
        }
        Cmd::Tenant(TenantCmd::RotateKey { statement }) => {
            tenant_statement(statement, "rotate-key").await?
        }
        Cmd::Tenant(TenantCmd::Delete { statement }) => {
            tenant_statement(statement, "delete").await?
        }
        Cmd::Tenant(TenantCmd::Apply { file, admin }) => {
            let statement = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("cannot read `{}`: {e}", file.display()))?;
            let v = ops::tenant_key_apply(admin.admin, &admin.token()?, statement.trim().into())
                .await?;
            print_tenant_applied(&v);
        }
        Cmd::Policy(cmd) => return policy(cmd).await,
        Cmd::Audit(AuditCmd::Verify { dir, ca }) => {
            let (line, intact) = ops::audit_verify(&dir, ca.as_deref())?;
            println!("{line}");
            if !intact {
                return Ok(ExitCode::from(1));
            }
        }
        Cmd::Audit(AuditCmd::Report {
            tenant,
            since,
            file,
            data_dir,
            json,
        }) => {
            let since_ms = since
                .as_deref()
                .map(|s| dmsc_node::admin::audit::parse_since(s, std::time::SystemTime::now()))
                .transpose()
                .map_err(|e| anyhow::anyhow!("--since: {e}"))?;
            let path = match (file, data_dir) {
                (Some(f), _) => f,
                (None, Some(d)) => d.join("audit"),
                (None, None) => PathBuf::from("data/audit"),
            };
            let report = ops::audit_report(&path, &tenant, since_ms)?;
            let text = if json {
                serde_json::to_string_pretty(&report)? + "\n"
            } else {
                report.render(ops::rfc3339_ms)
            };
            write_out(&mut std::io::stdout().lock(), &text)?;
        }
        Cmd::Audit(AuditCmd::Tail {
            dir,
            tenant,
            data_dir,
        }) => {
            // Without readable keys, tail still prints every line (sealed
            // fields say why they stay sealed).
            let sealer = match ops::audit_sealer(&data_dir) {
                Ok(Some(s)) => Some(s),
                Ok(None) => {
                    eprintln!(
                        "warning: sealed tenant fields stay sealed: `{}` holds no tenant keys (--data-dir: the node's data directory)",
                        data_dir.display()
                    );
                    None
                }
                Err(e) => {
                    eprintln!("warning: sealed tenant fields stay sealed: {e}");
                    None
                }
            };
            let mut out = std::io::stdout().lock();
            for line in dmsc_audit::tail(&dir, tenant.as_deref())? {
                match line {
                    Ok(mut l) => {
                        dmsc_audit::open_line(
                            &mut l,
                            sealer.as_ref().map(|s| s as &dyn dmsc_audit::Sealer),
                        );
                        let json = serde_json::json!({
                            "seq": l.seq, "ts": l.ts, "node": l.node, "tenant": l.tenant,
                            "kind": l.kind, "detail": l.detail,
                        });
                        if !write_out(&mut out, &format!("{json}\n"))? {
                            break;
                        }
                    }
                    Err(e) => eprintln!("error: {e}"),
                }
            }
        }
        Cmd::Netcheck { run, json } => {
            let config = load_config(&run)?;
            let report = ops::netcheck::netcheck(&config).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{}", report.text());
            }
        }
        Cmd::Check { run, max_skew_ms } => {
            let config = load_config(&run)?;
            let findings = ops::check(
                &config,
                config.admin_listen,
                Duration::from_millis(max_skew_ms),
            )
            .await;
            let mut bad = 0;
            for f in &findings {
                println!("{} {}", if f.ok { "ok  " } else { "FAIL" }, f.line);
                bad += usize::from(!f.ok);
            }
            if bad > 0 {
                eprintln!("{bad} problem(s)");
                return Ok(ExitCode::from(1));
            }
        }
        _ => {}
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_log = match cli.cmd {
        // The demo stops its nodes together; their goodbyes to each other are not news.
        Cmd::Demo { .. } => "warn,dmsc_transport::overlay=error,dmsc_node::security=error",
        Cmd::Status { .. }
        | Cmd::Ca(_)
        | Cmd::Token(_)
        | Cmd::AdminToken(_)
        | Cmd::Intercept(_)
        | Cmd::Revoke(_)
        | Cmd::Policy(_)
        | Cmd::Audit(_)
        | Cmd::Tenant(_)
        | Cmd::Check { .. }
        | Cmd::Netcheck { .. } => "warn",
        Cmd::SampleAgent { .. } => "info",
        // rumqttd (the embedded MQTT broker) logs every client that drops
        // before its CONNECT (a port probe, the node's own readiness check)
        // as an ERROR; the node's edge bridge says what matters.
        Cmd::Run(_) => "info,rumqttd::server::broker=off",
    };
    init_logging(&cli.log_format, default_log);
    // With one CPU to run on (affinity or a cgroup quota), a work-stealing
    // scheduler's single worker only adds hand-offs: run everything on one
    // thread instead (+5 % on the two-node path, BENCHMARKS.md). Blocking
    // work goes to the blocking pool either way.
    let one_cpu = std::thread::available_parallelism().is_ok_and(|n| n.get() == 1);
    let mut builder = if one_cpu {
        tracing::info!("one CPU available: single-threaded runtime");
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Run(args) => match run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(e.exit_code() as u8)
                }
            },
            Cmd::Status {
                admin,
                json,
                admin_token,
            } => {
                let token = match admin_token.as_deref().map(dmsc_node::ops::read_admin_token) {
                    None => None,
                    Some(Ok(t)) => Some(t),
                    Some(Err(e)) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(1);
                    }
                };
                match status::fetch_with(admin, token.as_deref()).await {
                    Ok(report) => {
                        if json {
                            match serde_json::to_string_pretty(&report) {
                                Ok(s) => println!("{s}"),
                                Err(e) => {
                                    eprintln!("error: {e}");
                                    return ExitCode::from(1);
                                }
                            }
                        } else {
                            print!("{}", report.render());
                        }
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        // 2 only when the node could not be reached; an
                        // answer (401, 403, ...) is 1, as for every command.
                        let unreachable = matches!(e, status::StatusError::Unreachable { .. });
                        ExitCode::from(if unreachable { 2 } else { 1 })
                    }
                }
            }
            cmd @ (Cmd::Token(_)
            | Cmd::AdminToken(_)
            | Cmd::Intercept(_)
            | Cmd::Revoke(_)
            | Cmd::Policy(_)
            | Cmd::Audit(_)
            | Cmd::Tenant(_)
            | Cmd::Check { .. }
            | Cmd::Netcheck { .. }) => match ops(cmd).await {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("error: {e}");
                    // 2 only when the node could not be reached (README's
                    // exit codes); anything it answered, or bad input, is 1.
                    let unreachable = e.chain().any(|c| {
                        matches!(
                            c.downcast_ref::<status::StatusError>(),
                            Some(status::StatusError::Unreachable { .. })
                        )
                    });
                    ExitCode::from(if unreachable { 2 } else { 1 })
                }
            },
            Cmd::Ca(cmd) => match ca(cmd) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            },
            Cmd::SampleAgent {
                listen,
                name,
                description,
                skills,
                delay_ms,
                a2a,
            } => match sample_agent(listen, name, description, skills, delay_ms, &a2a).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(64)
                }
            },
            Cmd::Demo { nodes, duration } => {
                let stop = async move {
                    match duration {
                        Some(s) => tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(s)) => {}
                            _ = shutdown_signal() => {}
                        },
                        None => shutdown_signal().await,
                    }
                };
                match dmsc_node::demo::run(nodes, stop).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::from(1)
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    /// A reader that went away (`dmsc-node audit tail | head -1`).
    struct Closed;

    impl std::io::Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_to_a_closed_pipe_stops_quietly_and_other_write_errors_fail() {
        assert!(!super::write_out(&mut Closed, "line\n").expect("quiet"));
        let mut full = std::io::Cursor::new([0u8; 2]);
        assert!(super::write_out(&mut full, "too long\n").is_err());
        let mut fine = Vec::new();
        assert!(super::write_out(&mut fine, "line\n").expect("written"));
        assert_eq!(fine, b"line\n");
    }
}
