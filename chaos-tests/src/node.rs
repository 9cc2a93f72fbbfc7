//! `dmsc-node` processes inside lab hosts, driven as an operator would.
//!
//! Certificates come from the node's own CLI (`ca init`, `ca issue-node`),
//! configs are written as TOML files, processes are started with
//! `ip netns exec <ns> dmsc-node run --config …` and every claim about the
//! mesh is read back through `dmsc-node status --json`, run in the same
//! namespace (the admin API listens on the namespace's own loopback). The
//! process spawned by `ip netns exec` *is* the node (it execs), so
//! `kill -9` hits the node itself.

use crate::lab::Lab;
use crate::{run, Error, Result};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Admin API address of every node: each namespace has its own loopback.
pub const ADMIN: &str = "127.0.0.1:9400";
/// Ingress (tenant [`TENANT`]) of every node, on the namespace's loopback.
pub const INGRESS: &str = "127.0.0.1:15001";
/// The tenant of every lab agent.
pub const TENANT: &str = "acme";
/// Overlay port of every node.
pub const OVERLAY_PORT: u16 = 7400;

/// The mesh's operator CA, created with `dmsc-node ca init`.
#[derive(Debug)]
pub struct MeshCa {
    bin: PathBuf,
    dir: PathBuf,
}

impl MeshCa {
    /// Creates a CA for trust domain `chaos.test` in `dir`.
    pub fn init(bin: &Path, dir: &Path) -> Result<MeshCa> {
        run(Command::new(bin)
            .args(["ca", "init", "--trust-domain", "chaos.test", "--out"])
            .arg(dir))?;
        Ok(MeshCa {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
        })
    }

    /// Issues node `name`'s certificate into `out` (`ca.pem`, `node.pem`, `node.key`).
    pub fn issue_node(&self, name: &str, out: &Path) -> Result<()> {
        run(Command::new(&self.bin)
            .args(["ca", "issue-node", "--name", name, "--ca-dir"])
            .arg(&self.dir)
            .arg("--out")
            .arg(out))
        .map(drop)
    }
}

/// One node's configuration, rendered to the TOML `dmsc-node run` reads.
#[derive(Debug, Clone, Default)]
pub struct NodeConfig {
    pub name: String,
    pub overlay: Option<SocketAddr>,
    pub bootstrap: Vec<SocketAddr>,
    /// URLs of agents this node is home to (tenant [`TENANT`]).
    pub agents: Vec<String>,
    /// Overlay addresses of relays (`[overlay] relays`).
    pub relays: Vec<SocketAddr>,
    /// `[overlay] reachability`: `auto`, `direct` or `relayed`.
    pub reachability: Option<String>,
    /// This node is a relay (`[relay] enabled = true`).
    pub relay: bool,
}

impl NodeConfig {
    /// The TOML text; `creds` is the directory holding the node's certificates.
    pub fn render(&self, creds: &Path) -> String {
        let list = |v: &[SocketAddr]| {
            v.iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let overlay = self
            .overlay
            .map(|a| a.to_string())
            .unwrap_or_else(|| format!("0.0.0.0:{OVERLAY_PORT}"));
        let mut t = format!(
            "name = \"{name}\"\nregion = \"r-{name}\"\n\n[overlay]\nlisten = \"{overlay}\"\nbootstrap = [{boot}]\n",
            name = self.name,
            boot = list(&self.bootstrap),
        );
        if !self.relays.is_empty() {
            t.push_str(&format!("relays = [{}]\n", list(&self.relays)));
        }
        if let Some(r) = &self.reachability {
            t.push_str(&format!("reachability = \"{r}\"\n"));
        }
        t.push_str(&format!(
            "\n[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/node.pem\"\nkey = \"{c}/node.key\"\n\n[admin]\nlisten = \"{ADMIN}\"\n\n[[ingress]]\nlisten = \"{INGRESS}\"\ntenant = \"{TENANT}\"\n",
            c = creds.display()
        ));
        if self.relay {
            t.push_str("\n[relay]\nenabled = true\n");
        }
        for url in &self.agents {
            t.push_str(&format!(
                "\n[[agents]]\ntenant = \"{TENANT}\"\nurl = \"{url}\"\n"
            ));
        }
        t
    }
}

/// A `dmsc-node run` process inside a lab host.
#[derive(Debug)]
pub struct NodeProc {
    pub name: String,
    /// Lab host (namespace) it runs in.
    pub host: String,
    ns: String,
    bin: PathBuf,
    config: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
    log_file: PathBuf,
}

/// How long a node may take to print its readiness line on a loaded machine.
const READY_WITHIN: Duration = Duration::from_secs(60);

impl NodeProc {
    /// Writes `config` (certificates issued by `ca` into the lab's
    /// directory), starts the node in `host` with `env` and waits until it
    /// is ready.
    pub fn start(
        lab: &Lab,
        bin: &Path,
        ca: &MeshCa,
        host: &str,
        config: &NodeConfig,
        env: &[(&str, &str)],
    ) -> Result<NodeProc> {
        let dir = lab.dir().join(&config.name);
        if !dir.join("node.pem").exists() {
            ca.issue_node(&config.name, &dir)?;
        }
        let path = lab.dir().join(format!("{}.toml", config.name));
        std::fs::write(&path, config.render(&dir))
            .map_err(Error::io(format!("write {}", path.display())))?;
        NodeProc::start_file(lab, bin, &config.name, host, &path, env)
    }

    /// Starts node `name` in `host` from an existing config file.
    pub fn start_file(
        lab: &Lab,
        bin: &Path,
        name: &str,
        host: &str,
        config: &Path,
        env: &[(&str, &str)],
    ) -> Result<NodeProc> {
        let mut node = NodeProc {
            name: name.to_string(),
            host: host.to_string(),
            ns: lab.ns(host)?,
            bin: bin.to_path_buf(),
            config: config.to_path_buf(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            log: Arc::default(),
            log_file: lab.dir().join(format!("{name}.log")),
        };
        node.spawn()?;
        Ok(node)
    }

    /// Starts the process (again) and waits for `dmsc-node ready`.
    pub fn spawn(&mut self) -> Result<Duration> {
        let started = Instant::now();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(&self.bin)
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            cmd: crate::show(&cmd),
            source,
        })?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| Error::Setup("no stderr pipe".into()))?;
        let (tx, rx) = mpsc::channel();
        let log = self.log.clone();
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)
            .map_err(Error::io(format!("open {}", self.log_file.display())))?;
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("dmsc-node ready") {
                    let _ = tx.send(());
                }
                let _ = writeln!(file, "{line}");
                if let Ok(mut l) = log.lock() {
                    // Bounded: a long run keeps the recent past only.
                    if l.len() > 20_000 {
                        l.drain(..10_000);
                    }
                    l.push(line);
                }
            }
        });
        self.child = Some(child);
        // Ready, or gone (a refused config exits at once), or too slow.
        let why = loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(()) => return Ok(started.elapsed()),
                Err(mpsc::RecvTimeoutError::Disconnected) => break "it exited",
                Err(mpsc::RecvTimeoutError::Timeout) if !self.running() => break "it exited",
                Err(mpsc::RecvTimeoutError::Timeout) if started.elapsed() > READY_WITHIN => {
                    break "timed out"
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        };
        self.kill();
        // The reader thread may still be copying the last lines.
        std::thread::sleep(Duration::from_millis(100));
        Err(Error::NotReady {
            name: self.name.clone(),
            why: why.to_string(),
            secs: READY_WITHIN.as_secs(),
            log: self.tail(30),
        })
    }

    /// `kill -9`, and reaps the process.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the process is running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The last `n` log lines.
    pub fn tail(&self, n: usize) -> String {
        self.log
            .lock()
            .map(|l| l[l.len().saturating_sub(n)..].join("\n"))
            .unwrap_or_default()
    }

    /// Whether any log line so far contains `needle`.
    pub fn log_contains(&self, needle: &str) -> bool {
        self.log
            .lock()
            .map(|l| l.iter().any(|x| x.contains(needle)))
            .unwrap_or(false)
    }

    /// `dmsc-node status --json`, run in the node's namespace.
    pub fn status(&self) -> Result<Status> {
        let out = run(Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(&self.bin)
            .args(["status", "--json", "--admin", ADMIN]))?;
        let v = serde_json::from_str(&out).map_err(|e| Error::Parse {
            what: format!("`dmsc-node status --json` of {}", self.name),
            detail: e.to_string(),
        })?;
        Ok(Status(v))
    }

    /// Where the node's log is written.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A node's `status --json`, with accessors for what the tests read.
#[derive(Debug, Clone)]
pub struct Status(pub serde_json::Value);

impl Status {
    /// The state (`alive`, `suspect`, `dead`, `left`) of peer `name`.
    pub fn peer_state(&self, name: &str) -> Option<String> {
        self.peer(name)?["state"].as_str().map(str::to_string)
    }

    /// Peer `name`'s entry.
    pub fn peer(&self, name: &str) -> Option<&serde_json::Value> {
        self.0["peers"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == name)
    }

    /// Peer `name`'s `path` (`direct` or `relayed`; relay-capable nodes).
    pub fn peer_path(&self, name: &str) -> Option<String> {
        self.peer(name)?["path"].as_str().map(str::to_string)
    }

    /// Peer `name`'s `via` (the relay's name, when relayed).
    pub fn peer_via(&self, name: &str) -> Option<String> {
        self.peer(name)?["via"].as_str().map(str::to_string)
    }

    /// Peer `name`'s `transport` (`quic` or `tcp`; relay-capable nodes).
    pub fn peer_transport(&self, name: &str) -> Option<String> {
        self.peer(name)?["transport"].as_str().map(str::to_string)
    }

    /// Agents this node can route to whose home is `node` and that the
    /// home node reports healthy.
    pub fn healthy_agents_of(&self, node: &str) -> Vec<String> {
        self.0["agents"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|x| x["node"] == node && x["health"] == "healthy")
                    .filter_map(|x| x["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Whether this `dmsc-node` has the relay features (it lists `netcheck`).
pub fn has_relay_support(bin: &Path) -> bool {
    Command::new(bin)
        .arg("--help")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim_start().starts_with("netcheck"))
        })
        .unwrap_or(false)
}

/// A `dmsc-node sample-agent` in `host` (card with one skill tagged `tag`),
/// listening on `listen` in that namespace; killed when dropped.
#[derive(Debug)]
pub struct AgentProc {
    child: Child,
}

impl AgentProc {
    pub fn start(
        lab: &Lab,
        bin: &Path,
        host: &str,
        listen: &str,
        name: &str,
        tag: &str,
    ) -> Result<AgentProc> {
        let mut cmd = lab.command(host, bin)?;
        cmd.args([
            "sample-agent",
            "--listen",
            listen,
            "--name",
            name,
            "--skill",
        ])
        .arg(format!("{tag}:Chaos test capability {tag}:{tag}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            cmd: crate::show(&cmd),
            source,
        })?;
        Ok(AgentProc { child })
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `cond` every 100 ms until it holds or `limit` passes; the time it
/// took, or `None` on timeout.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
