//! A minimal blocking HTTP/1.1 load generator, and its launcher.
//!
//! Why its own client: the load must run *inside* a lab namespace, and
//! the workspace forbids `unsafe` (no `setns` from the test process), so
//! it runs as `ip netns exec <ns> dmsc-chaos load …`, a separate process
//! that prints one JSON [`Summary`]. Plain `std::net::TcpStream`, no
//! runtime: fewer moving parts between the numbers and the wire.
//!
//! Shape: `concurrency` workers, each with one keep-alive connection,
//! share a fixed schedule (request `i` is due at `i / rate` seconds), so
//! the offered load is steady and does not slow down when the mesh does
//! (open loop as long as workers keep up). Requests go round-robin over
//! the given `Host` names (agents by name, or capabilities
//! `<tag>.cap.<tenant>.dmsc`). A request fails on a non-2xx status, an I/O
//! error or the timeout. One retry, like every HTTP client's: a request
//! written on a *reused* connection that the server had closed (no byte
//! of a response came back) is sent again on a new connection; that says
//! nothing about the mesh and is counted apart (`stale_retries`).

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The ingress to connect to.
    pub connect: SocketAddr,
    /// `Host` headers, used round-robin.
    pub hosts: Vec<String>,
    pub path: String,
    pub count: u64,
    /// Requests per second over all workers.
    pub rate: f64,
    pub concurrency: usize,
    pub timeout: Duration,
}

/// What happened, printed as JSON by `dmsc-chaos load --json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    /// Status codes (`"200"`), or `"io"` / `"timeout"` for no answer.
    pub statuses: BTreeMap<String, u64>,
    /// Who served the successful requests (`dmsc-node` response header).
    pub served_by: BTreeMap<String, u64>,
    pub stale_retries: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub elapsed_s: f64,
    /// The first few failures, for the test's message.
    pub first_errors: Vec<String>,
    /// The slowest requests: when they started, where to, how they ended.
    pub slowest: Vec<Slow>,
}

/// One slow request, to tell a fault's victims from a mesh problem.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Slow {
    pub ms: f64,
    /// Seconds after the load started.
    pub at_s: f64,
    pub host: String,
    /// `200 from n2`, or the error.
    pub outcome: String,
}

impl Summary {
    /// Adds `other`'s counts to this one; percentiles become the worst of the two.
    pub fn merge(&mut self, other: &Summary) {
        self.sent += other.sent;
        self.ok += other.ok;
        self.failed += other.failed;
        for (k, v) in &other.statuses {
            *self.statuses.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.served_by {
            *self.served_by.entry(k.clone()).or_default() += v;
        }
        self.stale_retries += other.stale_retries;
        self.p50_ms = self.p50_ms.max(other.p50_ms);
        self.p99_ms = self.p99_ms.max(other.p99_ms);
        self.max_ms = self.max_ms.max(other.max_ms);
        self.elapsed_s = self.elapsed_s.max(other.elapsed_s);
        self.first_errors
            .extend(other.first_errors.iter().take(5).cloned());
        self.slowest.extend(other.slowest.iter().cloned());
        self.slowest.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        self.slowest.truncate(SLOWEST);
    }

    /// Successful share of the requests sent (1.0 when none were sent).
    pub fn success_ratio(&self) -> f64 {
        if self.sent == 0 {
            1.0
        } else {
            self.ok as f64 / self.sent as f64
        }
    }
}

/// One outcome.
struct Done {
    host: String,
    /// Seconds since the start of the run.
    at: f64,
    status: Result<(u16, Option<String>), String>,
    latency: Duration,
    stale_retry: bool,
}

/// How many of the slowest requests a summary lists.
const SLOWEST: usize = 5;

/// Runs the load to completion.
pub fn generate(spec: &LoadSpec) -> Result<Summary> {
    if spec.hosts.is_empty() || spec.concurrency == 0 || spec.rate <= 0.0 {
        return Err(Error::Setup(
            "load: need at least one host, concurrency >= 1 and rate > 0".into(),
        ));
    }
    let start = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel::<Done>();
    let mut workers = Vec::new();
    for w in 0..spec.concurrency {
        let (spec, tx) = (spec.clone(), tx.clone());
        workers.push(std::thread::spawn(move || {
            let mut conn: Option<Conn> = None;
            let mut i = w as u64;
            while i < spec.count {
                let due = start + Duration::from_secs_f64(i as f64 / spec.rate);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let host = &spec.hosts[(i % spec.hosts.len() as u64) as usize];
                let t = Instant::now();
                let (status, stale_retry) = request(&spec, &mut conn, host);
                let _ = tx.send(Done {
                    host: host.clone(),
                    at: (t - start).as_secs_f64(),
                    status,
                    latency: t.elapsed(),
                    stale_retry,
                });
                i += spec.concurrency as u64;
            }
        }));
    }
    drop(tx);
    let mut s = Summary::default();
    let mut lat = Vec::new();
    for d in rx {
        s.sent += 1;
        s.stale_retries += u64::from(d.stale_retry);
        let ms = d.latency.as_secs_f64() * 1000.0;
        lat.push(ms);
        if s.slowest.len() < SLOWEST || s.slowest.last().is_some_and(|x| x.ms < ms) {
            let outcome = match &d.status {
                Ok((code, node)) => format!("{code} from {}", node.as_deref().unwrap_or("?")),
                Err(e) => e.clone(),
            };
            s.slowest.push(Slow {
                ms,
                at_s: d.at,
                host: d.host.clone(),
                outcome,
            });
            s.slowest.sort_by(|a, b| b.ms.total_cmp(&a.ms));
            s.slowest.truncate(SLOWEST);
        }
        match d.status {
            Ok((code, node)) => {
                *s.statuses.entry(code.to_string()).or_default() += 1;
                if (200..300).contains(&code) {
                    s.ok += 1;
                    *s.served_by
                        .entry(node.unwrap_or_else(|| "?".into()))
                        .or_default() += 1;
                } else {
                    s.failed += 1;
                    if s.first_errors.len() < 10 {
                        s.first_errors.push(format!("HTTP {code}"));
                    }
                }
            }
            Err(e) => {
                let kind = if e.contains("timed out") || e.contains("WouldBlock") {
                    "timeout"
                } else {
                    "io"
                };
                *s.statuses.entry(kind.into()).or_default() += 1;
                s.failed += 1;
                if s.first_errors.len() < 10 {
                    s.first_errors.push(e);
                }
            }
        }
    }
    for w in workers {
        let _ = w.join();
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if lat.is_empty() {
            0.0
        } else {
            lat[((lat.len() - 1) as f64 * p).round() as usize]
        }
    };
    s.p50_ms = pct(0.50);
    s.p99_ms = pct(0.99);
    s.max_ms = pct(1.0);
    s.elapsed_s = start.elapsed().as_secs_f64();
    Ok(s)
}

struct Conn {
    reader: BufReader<TcpStream>,
    used: bool,
}

/// One request, on the kept-alive connection if there is one.
fn request(
    spec: &LoadSpec,
    conn: &mut Option<Conn>,
    host: &str,
) -> (Result<(u16, Option<String>), String>, bool) {
    let reused = conn.as_ref().is_some_and(|c| c.used);
    match attempt(spec, conn, host) {
        Err(Attempt::NoResponse(_)) if reused => {
            *conn = None;
            match attempt(spec, conn, host) {
                Ok(r) => (Ok(r), true),
                Err(e) => (Err(e.to_string()), true),
            }
        }
        Ok(r) => (Ok(r), false),
        Err(e) => {
            *conn = None;
            (Err(e.to_string()), false)
        }
    }
}

enum Attempt {
    /// Failed before any byte of a response arrived.
    NoResponse(String),
    /// Failed mid-response.
    Broken(String),
}

impl std::fmt::Display for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attempt::NoResponse(e) => write!(f, "no response: {e}"),
            Attempt::Broken(e) => write!(f, "broken response: {e}"),
        }
    }
}

fn attempt(
    spec: &LoadSpec,
    conn: &mut Option<Conn>,
    host: &str,
) -> Result<(u16, Option<String>), Attempt> {
    let none = |e: std::io::Error| Attempt::NoResponse(e.to_string());
    if conn.is_none() {
        let s = TcpStream::connect_timeout(&spec.connect, spec.timeout).map_err(none)?;
        s.set_read_timeout(Some(spec.timeout)).map_err(none)?;
        s.set_write_timeout(Some(spec.timeout)).map_err(none)?;
        let _ = s.set_nodelay(true);
        *conn = Some(Conn {
            reader: BufReader::new(s),
            used: false,
        });
    }
    let Some(c) = conn.as_mut() else {
        return Err(Attempt::NoResponse("no connection".into()));
    };
    c.used = true;
    write!(
        c.reader.get_mut(),
        "GET {} HTTP/1.1\r\nhost: {host}\r\n\r\n",
        spec.path
    )
    .map_err(none)?;
    let mut line = String::new();
    match c.reader.read_line(&mut line) {
        Ok(0) => return Err(Attempt::NoResponse("connection closed".into())),
        Ok(_) => {}
        Err(e) => return Err(none(e)),
    }
    let broken = |e: String| Attempt::Broken(e);
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| broken(format!("bad status line {line:?}")))?;
    let (mut len, mut chunked, mut close, mut node) = (0usize, false, false, None);
    loop {
        let mut h = String::new();
        if c.reader
            .read_line(&mut h)
            .map_err(|e| broken(e.to_string()))?
            == 0
        {
            return Err(broken("closed in the head".into()));
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let Some((k, v)) = h.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        match k.as_str() {
            "content-length" => len = v.parse().map_err(|_| broken(format!("bad length {v}")))?,
            "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
            "connection" => close = v.eq_ignore_ascii_case("close"),
            "dmsc-node" => node = Some(v.to_string()),
            _ => {}
        }
    }
    let r = &mut c.reader;
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).map_err(|e| broken(e.to_string()))?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| broken(format!("bad chunk size {size:?}")))?;
            let mut skip = vec![0u8; n + 2];
            r.read_exact(&mut skip).map_err(|e| broken(e.to_string()))?;
            if n == 0 {
                break;
            }
        }
    } else {
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).map_err(|e| broken(e.to_string()))?;
    }
    if close {
        *conn = None;
    }
    Ok((code, node))
}

/// A `dmsc-chaos load` process running inside a lab host.
#[derive(Debug)]
pub struct LoadRun {
    what: String,
    child: std::process::Child,
}

impl LoadRun {
    /// Starts `chaos_bin load …` in `host`, against that host's ingress.
    pub fn start(
        lab: &crate::Lab,
        chaos_bin: &std::path::Path,
        host: &str,
        hosts: &[String],
        count: u64,
        rate: f64,
    ) -> Result<LoadRun> {
        let mut cmd = lab.command(host, chaos_bin)?;
        cmd.args([
            "load",
            "--connect",
            crate::node::INGRESS,
            "--path",
            "/chaos",
            "--count",
            &count.to_string(),
            "--rate",
            &rate.to_string(),
            "--concurrency",
            "4",
            "--json",
        ]);
        for h in hosts {
            cmd.args(["--host", h]);
        }
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit());
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            cmd: crate::show(&cmd),
            source,
        })?;
        Ok(LoadRun {
            what: format!("load from {host}"),
            child,
        })
    }

    /// Waits for the summary.
    pub fn finish(self) -> Result<Summary> {
        let out = self
            .child
            .wait_with_output()
            .map_err(Error::io(format!("wait for the {}", self.what)))?;
        serde_json::from_slice(&out.stdout).map_err(|e| Error::Parse {
            what: self.what.clone(),
            detail: format!("{e} ({})", out.status),
        })
    }
}
