//! Zero-trust onboarding: an agent process joins the mesh with plain HTTP
//! to a node-local metadata endpoint, no SDK and no credential of its own
//! beyond a one-time join token.
//!
//! `POST /v1/onboard {"token": "dmsc-jt...", "card": {A2A card}}`. The node
//! asks the kernel who is calling (never the request): on the unix socket
//! the peer's credentials (`SO_PEERCRED`: pid, uid), over the link-local
//! HTTP address the owner of the peer's socket (from /proc); the pid's
//! cgroup comes from /proc/<pid>/cgroup. The token must have been created
//! bound to that cgroup (or one above it) or to that uid (`dmsc-node token
//! create --cgroup|--uid`); a token that is not bound, or bound to someone
//! else, is refused and stays usable. On success the token is spent, the
//! binding's connections are intercepted as the token's agent (so the
//! agent calls the mesh with no code change), its card is registered as an
//! agent of this node, and the answer says its mesh name. Every attempt is
//! audited (`onboarding`) with what the kernel said about the caller.
//!
//! Everything that can be checked before the token is spent is checked
//! first (a card that does not parse, a name already taken, a binding
//! interception cannot make): a one-time token is not burnt by a typo. If
//! the card cannot be registered after all, a binding made for it is
//! undone. At most 16 connections are served at once, each for 10 s.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use dmsc_auth::token::Holder;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UnixListener};
use tracing::{debug, info, warn};

use super::Intercept;
use crate::config::{InterceptBinding, RawAgent};
use crate::control::agents::AgentsCtx;
use crate::security::Security;

/// Largest onboarding request (a card and a token).
const MAX_BODY: usize = 256 * 1024;
/// Connections served at once (more are closed at once): onboarding is
/// rare, and finding a TCP caller walks /proc.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a connection may take, request and answer.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The metadata endpoint's state.
pub struct Metadata {
    pub intercept: Arc<Intercept>,
    pub security: Arc<Security>,
    pub agents: AgentsCtx,
    /// [`MAX_CONNECTIONS`].
    pub connections: Arc<tokio::sync::Semaphore>,
}

/// Who is calling, as the kernel says.
#[derive(Debug, Clone)]
struct Caller {
    pid: u32,
    uid: u32,
    cgroup: String,
    /// Its network namespace, if it is a named one (`/run/netns`).
    netns: Option<String>,
}

type Body = Full<Bytes>;

fn answer(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{v}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn refusal(status: StatusCode, code: &str, error: impl Into<String>) -> Response<Body> {
    answer(
        status,
        serde_json::json!({"error": error.into(), "code": code}),
    )
}

/// A process's cgroup v2 group (the `0::` line of /proc/<pid>/cgroup).
fn cgroup_of(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

/// The name of a process's network namespace, if one in /run/netns is it
/// (the same namespace inode).
fn netns_of(pid: u32) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let ino = std::fs::metadata(format!("/proc/{pid}/ns/net")).ok()?.ino();
    std::fs::read_dir("/run/netns")
        .ok()?
        .flatten()
        .find(|e| e.metadata().is_ok_and(|m| m.ino() == ino))
        .and_then(|e| e.file_name().to_str().map(str::to_string))
}

/// The local process that owns the TCP socket `peer` -> `local` (the
/// client's end of a connection this node accepted), found in /proc: the
/// socket table of each network namespace (the client may sit in one of
/// its own, behind a veth) gives the socket's inode and owner uid, the
/// processes' descriptors give its pid. Onboarding is rare; a walk of /proc
/// is fine.
fn tcp_owner(local: SocketAddr, peer: SocketAddr) -> Option<Caller> {
    let (SocketAddr::V4(local), SocketAddr::V4(peer)) = (local, peer) else {
        return None;
    };
    let hex = |a: std::net::SocketAddrV4| {
        format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(a.ip().octets()),
            a.port()
        )
    };
    // A dual-stack client socket lists the connection in tcp6, with both
    // addresses as ::ffff:a.b.c.d.
    let hex6 = |a: std::net::SocketAddrV4| format!("0000000000000000FFFF0000{}", hex(a));
    let (want_local, want_remote) = (hex(peer), hex(local));
    let (want_local6, want_remote6) = (hex6(peer), hex6(local));
    let mut seen_ns = std::collections::HashSet::new();
    let mut found: Option<(u64, u32)> = None;
    let pids: Vec<u32> = std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    for pid in &pids {
        let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        if !seen_ns.insert(ns) {
            continue;
        }
        for (file, l, r) in [
            ("tcp", &want_local, &want_remote),
            ("tcp6", &want_local6, &want_remote6),
        ] {
            let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
                continue;
            };
            for line in table.lines().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() > 9 && f[1] == l.as_str() && f[2] == r.as_str() {
                    found = Some((f[9].parse().ok()?, f[7].parse().ok()?));
                }
            }
        }
        if found.is_some() {
            break;
        }
    }
    let (inode, uid) = found?;
    let target = format!("socket:[{inode}]");
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()) {
                return Some(Caller {
                    pid,
                    uid,
                    cgroup: cgroup_of(pid)?,
                    netns: netns_of(pid),
                });
            }
        }
    }
    None
}

impl Metadata {
    /// Serves the unix socket at `path` (created mode 0666: the kernel's
    /// word on the peer is the credential) until the node stops.
    pub fn bind_unix(path: &Path) -> Result<UnixListener, String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("intercept.metadata_socket: {}: {e}", dir.display()))?;
        }
        // A socket a previous run left (a live one would still answer).
        if std::os::unix::net::UnixStream::connect(path).is_err() {
            let _ = std::fs::remove_file(path);
        }
        let l = UnixListener::bind(path)
            .map_err(|e| format!("intercept.metadata_socket: {}: {e}", path.display()))?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
            .map_err(|e| format!("intercept.metadata_socket: {}: {e}", path.display()))?;
        Ok(l)
    }

    pub async fn serve_unix(self: Arc<Self>, listener: UnixListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let Some(permit) = self.admit() else { continue };
            let caller = stream
                .peer_cred()
                .ok()
                .and_then(|c| {
                    let pid = u32::try_from(c.pid()?).ok()?;
                    Some(Caller {
                        pid,
                        uid: c.uid(),
                        cgroup: cgroup_of(pid)?,
                        netns: netns_of(pid),
                    })
                })
                .ok_or_else(|| "the kernel did not say who is calling".to_string());
            tokio::spawn(
                self.clone()
                    .connection(TokioIo::new(stream), caller, "unix", permit),
            );
        }
    }

    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let Some(permit) = self.admit() else { continue };
            let this = self.clone();
            tokio::spawn(async move {
                let caller = match stream.local_addr() {
                    Ok(local) => tokio::task::spawn_blocking(move || tcp_owner(local, peer))
                        .await
                        .ok()
                        .flatten()
                        .ok_or_else(|| format!("no local process owns the connection from {peer}")),
                    Err(e) => Err(e.to_string()),
                };
                this.connection(TokioIo::new(stream), caller, "http", permit)
                    .await
            });
        }
    }

    /// A place among the [`MAX_CONNECTIONS`], or `None` (the connection is
    /// then closed at once).
    fn admit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let p = self.connections.clone().try_acquire_owned().ok();
        if p.is_none() {
            debug!("metadata endpoint busy: connection closed");
        }
        p
    }

    async fn connection<S>(
        self: Arc<Self>,
        io: TokioIo<S>,
        caller: Result<Caller, String>,
        via: &'static str,
        _permit: tokio::sync::OwnedSemaphorePermit,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let svc = hyper::service::service_fn(move |req| {
            let (this, caller) = (self.clone(), caller.clone());
            async move { Ok::<_, std::convert::Infallible>(this.handle(req, caller, via).await) }
        });
        let served = hyper::server::conn::http1::Builder::new()
            .keep_alive(false)
            .serve_connection(io, svc);
        match tokio::time::timeout(REQUEST_TIMEOUT, served).await {
            Ok(Err(e)) => debug!(error = %e, "metadata connection ended"),
            Err(_) => debug!("metadata connection timed out"),
            Ok(Ok(())) => {}
        }
    }

    async fn handle(
        &self,
        req: Request<hyper::body::Incoming>,
        caller: Result<Caller, String>,
        via: &'static str,
    ) -> Response<Body> {
        if req.uri().path() != "/v1/onboard" {
            return refusal(
                StatusCode::NOT_FOUND,
                "not_found",
                "the metadata endpoint answers POST /v1/onboard {\"token\", \"card\"}",
            );
        }
        if req.method() != hyper::Method::POST {
            return refusal(StatusCode::METHOD_NOT_ALLOWED, "method", "use POST");
        }
        let caller = match caller {
            Ok(c) => c,
            Err(e) => return refusal(StatusCode::FORBIDDEN, "unknown_caller", e),
        };
        let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => return refusal(StatusCode::BAD_REQUEST, "body", e.to_string()),
        };
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Ask {
            token: String,
            card: serde_json::Value,
        }
        let ask: Ask = match serde_json::from_slice(&body) {
            Ok(a) => a,
            Err(e) => {
                return refusal(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("expected {{\"token\", \"card\"}}: {e}"),
                )
            }
        };
        let token_id = ask.token.split('.').nth(1).unwrap_or_default().to_string();
        let audit = |tenant: Option<&str>, agent: &str, outcome: &str, card: Option<String>| {
            let kind = dmsc_audit::Onboarding {
                agent: agent.to_string(),
                token: token_id.clone(),
                via: via.to_string(),
                pid: caller.pid,
                uid: caller.uid,
                cgroup: caller.cgroup.clone(),
                netns: caller.netns.clone(),
                outcome: outcome.to_string(),
                card,
            };
            self.security.record(match tenant {
                Some(t) => dmsc_audit::Event::tenant(t, kind),
                None => dmsc_audit::Event::global(kind),
            });
        };
        // What the token is for, looked up without spending it.
        let Some(info) = self.security.token_info(&token_id) else {
            audit(None, "", "no such join token", None);
            return refusal(
                StatusCode::UNAUTHORIZED,
                "token_unknown",
                "no such join token",
            );
        };
        let card = match dmsc_registry::AgentCard::from_value(ask.card) {
            Ok(c) => c,
            Err(e) => {
                return refusal(
                    StatusCode::BAD_REQUEST,
                    "bad_card",
                    format!("the card is not a valid A2A agent card: {e}"),
                )
            }
        };
        let Some(url) = card.endpoint_urls().next().and_then(origin) else {
            return refusal(
                StatusCode::BAD_REQUEST,
                "bad_card",
                "the card names no http:// endpoint URL where the agent answers",
            );
        };
        let id = dmsc_registry::AgentId::new(&info.tenant, &info.agent);
        if self.agents.agents.get(&id).is_some() {
            return refusal(
                StatusCode::CONFLICT,
                "duplicate",
                format!("{id} is already an agent of this node"),
            );
        }
        // The binding the token names must be one interception can make.
        if let Some(who) = info.binding.clone() {
            let spec = InterceptBinding {
                who,
                ports: Vec::new(),
                tenant: info.tenant.clone(),
                agent: Some(info.agent.clone()),
            };
            if let Err(e) = self.intercept.check(&spec) {
                return refusal(StatusCode::CONFLICT, "binding", e);
            }
        }
        let holder = Holder {
            uid: caller.uid,
            cgroup: caller.cgroup.clone(),
            netns: caller.netns.clone(),
        };
        let sec = self.security.clone();
        let token = ask.token.clone();
        let redeemed = tokio::task::spawn_blocking(move || sec.redeem_held(&token, &holder))
            .await
            .map_err(|e| dmsc_auth::TokenError::Store {
                path: "join tokens".into(),
                detail: e.to_string(),
            })
            .and_then(|r| r);
        let info = match redeemed {
            Ok(i) => i,
            Err(e) => {
                audit(Some(&info.tenant), &info.agent, &e.reason(), None);
                let status = match e {
                    dmsc_auth::TokenError::HolderMismatch { .. }
                    | dmsc_auth::TokenError::NotBound { .. } => StatusCode::FORBIDDEN,
                    dmsc_auth::TokenError::Store { .. } => StatusCode::INTERNAL_SERVER_ERROR,
                    _ => StatusCode::UNAUTHORIZED,
                };
                return refusal(status, e.code(), e.reason());
            }
        };
        // Spent: bind, then register.
        let Some(who) = info.binding.clone() else {
            return refusal(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "a token redeemed here has no binding",
            );
        };
        let was_bound = self.intercept.is_bound(&who);
        let bound = self
            .intercept
            .enable(InterceptBinding {
                who: who.clone(),
                ports: Vec::new(),
                tenant: info.tenant.clone(),
                agent: Some(info.agent.clone()),
            })
            .await;
        let spec = RawAgent {
            tenant: info.tenant.clone(),
            url: url.clone(),
            name: Some(info.agent.clone()),
            ..Default::default()
        };
        // Registered only once bound; a binding made for an agent that
        // could not be registered is undone.
        let registered = match &bound {
            Ok(_) => self
                .agents
                .add_card(&spec, card)
                .await
                .map_err(|e| e.to_string()),
            Err(_) => Err("not registered: its processes could not be bound".into()),
        };
        if registered.is_err() && bound.is_ok() && !was_bound {
            let _ = self.intercept.disable(&who).await;
        }
        match (bound, registered) {
            (Ok(b), Ok(agent)) => {
                audit(Some(&info.tenant), &info.agent, "ok", Some(agent.digest()));
                info!(agent = %agent.id, pid = caller.pid, uid = caller.uid, cgroup = %caller.cgroup, via, "agent onboarded through the metadata endpoint");
                answer(
                    StatusCode::OK,
                    serde_json::json!({
                        "tenant": info.tenant,
                        "agent": info.agent,
                        "dns": format!("{}.{}.dmsc", info.agent, info.tenant),
                        "mesh_url": format!("http://{}.{}.dmsc", info.agent, info.tenant),
                        "url": url,
                        "intercept": b.mechanism.as_str(),
                        "node": self.security.identity().name(),
                    }),
                )
            }
            (bound, registered) => {
                let why = [
                    bound.err().map(|e| format!("interception: {e}")),
                    registered.err().map(|e| format!("registration: {e}")),
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join("; ");
                warn!(tenant = %info.tenant, agent = %info.agent, error = %why, "onboarding failed after the token was spent");
                audit(Some(&info.tenant), &info.agent, &why, None);
                refusal(StatusCode::INTERNAL_SERVER_ERROR, "onboarding_failed", why)
            }
        }
    }
}

/// `http://host:port` of an endpoint URL.
fn origin(u: &str) -> Option<String> {
    let uri: hyper::Uri = u.parse().ok()?;
    (uri.scheme_str() == Some("http")).then_some(())?;
    Some(format!("http://{}", uri.authority()?))
}

/// Puts the link-local address of the endpoint on `lo` unless some
/// interface has it; `Some(address)` when this node added it (to take it
/// away at stop).
pub fn ensure_local_address(at: SocketAddr) -> Result<Option<String>, String> {
    if std::net::TcpListener::bind(SocketAddr::new(at.ip(), 0)).is_ok() {
        return Ok(None);
    }
    let cidr = match at.ip() {
        std::net::IpAddr::V4(ip) => format!("{ip}/32"),
        std::net::IpAddr::V6(ip) => format!("{ip}/128"),
    };
    let out = std::process::Command::new("ip")
        .args(["addr", "add", &cidr, "dev", "lo"])
        .output()
        .map_err(|e| format!("cannot run ip ({e}) to put {cidr} on lo"))?;
    if !out.status.success() {
        return Err(format!(
            "putting {cidr} on lo: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(Some(cidr))
}

/// Takes away an address [`ensure_local_address`] added.
pub fn remove_local_address(cidr: &str) {
    let _ = std::process::Command::new("ip")
        .args(["addr", "del", cidr, "dev", "lo"])
        .output();
}
