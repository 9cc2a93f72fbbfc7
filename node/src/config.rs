//! Node configuration: serde defaults < TOML file < `DMSC_*` environment < CLI flags.
//!
//! The file is parsed into a raw struct of `Option`s so each layer can say
//! "I set this"; the merged result is validated into [`NodeConfig`], with
//! *every* problem reported at once (an operator fixing a file should not
//! have to run the node five times to find five typos). Relative paths in a
//! file are relative to that file, so `dmsc-node run --config /etc/dmsc/node.toml`
//! works from any directory.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One layer of settings; `None` means "this layer does not set it".
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub name: Option<String>,
    pub region: Option<String>,
    #[serde(default)]
    pub overlay: RawOverlay,
    #[serde(default)]
    pub tls: RawTls,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub gossip: RawGossip,
    /// Agents attached to this node (file only; a layer that sets any replaces the list).
    #[serde(default)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<RawAgent>,
    /// Ingress listeners for agents: unauthenticated (one tenant) or authenticated (mTLS, JWT).
    #[serde(default)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<RawIngress>,
    #[serde(default)]
    pub delegation: RawDelegation,
    /// Where the node keeps state: join tokens, revocations, the audit log.
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub jwt: Option<RawJwt>,
    #[serde(default)]
    pub audit: RawAudit,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub enrollment: RawEnrollment,
    #[serde(default)]
    pub relay: RawRelay,
    #[serde(default)]
    pub intent: RawIntent,
    /// Edge agents over MQTT v5 (see `edge`); absent: no bridge.
    #[serde(default)]
    pub mqtt: Option<RawMqtt>,
    /// Transparent interception of agents' outbound connections (see
    /// `intercept`); absent: none.
    #[serde(default)]
    pub intercept: Option<RawIntercept>,
}

/// `[intercept]`: agents that call the mesh with no code change.
#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawIntercept {
    /// How connects are redirected: `auto` (default: eBPF for cgroup
    /// bindings where it works, nftables otherwise and for uid bindings),
    /// `ebpf` (no fallback) or `nftables` (never eBPF).
    pub mode: Option<String>,
    /// The eBPF interception listener (IPv4, default 127.0.0.1:15080);
    /// nftables bindings get a listener each on 127.0.0.1.
    pub listen: Option<String>,
    /// The virtual range of `.dmsc` names (default 198.19.0.0/16).
    pub vip_range: Option<String>,
    /// A DNS responder for `.dmsc` names (UDP, e.g. "127.0.0.1:5353"): it
    /// answers them with virtual addresses and relays other names to the
    /// system's resolvers. Absent: none.
    pub dns: Option<String>,
    /// The node-local metadata endpoint where an agent process redeems a
    /// join token bound to its cgroup or user and registers its card: a
    /// unix socket (the kernel tells who connects), e.g.
    /// "/run/dmsc/meta.sock". Absent: none.
    pub metadata_socket: Option<String>,
    /// The same endpoint over HTTP on a link-local address for containers
    /// (e.g. "169.254.77.77:80"; the node puts the address on `lo` if no
    /// interface has it, and takes it away at stop).
    pub metadata_listen: Option<String>,
    /// `[[intercept.bindings]]`: whose connections are intercepted.
    #[serde(default)]
    pub bindings: Vec<RawInterceptBinding>,
    /// `[[intercept.map]]`: `addr = "10.0.0.5:8080"`, `name =
    /// "search.globex.dmsc"`: connections to that address go to that mesh
    /// name (gossip carries no agent URLs, so other nodes' agents are named
    /// here; this node's own agents are mapped from their `url`).
    #[serde(default)]
    pub map: Vec<RawInterceptMap>,
}

/// One `[[intercept.bindings]]`.
#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawInterceptBinding {
    /// A cgroup v2 group, relative to the cgroup2 mount (it must exist)...
    pub cgroup: Option<String>,
    /// ...or a user id whose processes are intercepted (nftables only)...
    pub uid: Option<u32>,
    /// ...or a named network namespace (`/run/netns/<name>`, nftables
    /// only): every process in it, by rules inside it.
    pub netns: Option<String>,
    /// Only connections to these destination ports (default: any port
    /// of a selected address).
    pub ports: Option<Vec<u16>>,
    /// The tenant its processes call as.
    pub tenant: String,
    /// Which agent they are, in audit entries (default: the cgroup path).
    pub agent: Option<String>,
}

/// One `[[intercept.map]]`.
#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawInterceptMap {
    pub addr: String,
    pub name: String,
}

/// How interception redirects connects (`[intercept] mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterceptMode {
    Auto,
    Ebpf,
    Nftables,
}

/// Whose connects a binding intercepts: a cgroup v2 group (relative to
/// the cgroup2 mount, with a leading `/`) or a user id. The same processes
/// a join token can be bound to.
pub use dmsc_auth::token::Binding as InterceptWho;

/// Whose connects, as operators write it (config, CLI, admin API, token
/// bindings): exactly one of the three.
#[derive(Debug, Clone, Copy, Default)]
pub struct WhoSpec<'a> {
    pub cgroup: Option<&'a str>,
    pub uid: Option<u32>,
    pub netns: Option<&'a str>,
}

impl WhoSpec<'_> {
    /// The binding it names.
    pub fn parse(self) -> Result<InterceptWho, String> {
        match (self.cgroup, self.uid, self.netns) {
            (Some(c), None, None) => {
                let c = c.trim();
                if c.trim_matches('/').is_empty() || c.split('/').any(|p| p == ".." || p == ".") {
                    return Err(format!(
                        "cgroup {c:?} must name a group below the cgroup2 root"
                    ));
                }
                Ok(InterceptWho::Cgroup(format!("/{}", c.trim_matches('/'))))
            }
            (None, Some(0), None) => {
                Err("uid 0 cannot be a binding: the node itself runs as root".into())
            }
            (None, Some(u), None) => Ok(InterceptWho::Uid(u)),
            (None, None, Some(n)) => {
                let ok = !n.is_empty()
                    && n.len() <= 64
                    && !n.starts_with('.')
                    && n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                if ok {
                    Ok(InterceptWho::Netns(n.to_string()))
                } else {
                    Err(format!(
                        "netns {n:?} is not a network namespace name (as in /run/netns)"
                    ))
                }
            }
            _ => Err("give exactly one of cgroup, uid and netns".into()),
        }
    }
}

impl InterceptBinding {
    /// A binding from its parts as operators write them (config, CLI,
    /// admin API).
    pub fn parse(
        who: WhoSpec<'_>,
        tenant: &str,
        agent: Option<&str>,
    ) -> Result<InterceptBinding, String> {
        let who = who.parse()?;
        if !dmsc_transport::identity::valid_name(tenant) {
            return Err(format!("`{tenant}` is not a tenant name"));
        }
        if let Some(a) = agent {
            if !dmsc_transport::identity::valid_name(a) {
                return Err(format!("`{a}` is not an agent name"));
            }
        }
        Ok(InterceptBinding {
            who,
            ports: Vec::new(),
            tenant: tenant.to_string(),
            agent: agent.map(str::to_string),
        })
    }

    /// The same binding, intercepting only connections to `ports`.
    pub fn with_ports(mut self, ports: &[u16]) -> Result<InterceptBinding, String> {
        if ports.contains(&0) {
            return Err("port 0 cannot be a destination port".into());
        }
        let mut p = ports.to_vec();
        p.sort_unstable();
        p.dedup();
        self.ports = p;
        Ok(self)
    }

    /// The caller its connections are audited as.
    pub fn caller(&self) -> String {
        match (&self.agent, &self.who) {
            (Some(a), _) => format!("intercept:{}/{a}", self.tenant),
            (None, InterceptWho::Cgroup(c)) => format!("intercept:{}:cgroup:{c}", self.tenant),
            (None, InterceptWho::Uid(u)) => format!("intercept:{}:uid:{u}", self.tenant),
            (None, InterceptWho::Netns(n)) => format!("intercept:{}:netns:{n}", self.tenant),
        }
    }
}

/// `[intercept]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct InterceptConfig {
    pub mode: InterceptMode,
    pub listen: std::net::SocketAddrV4,
    pub vip_range: (std::net::Ipv4Addr, u8),
    pub dns: Option<SocketAddr>,
    pub metadata_socket: Option<PathBuf>,
    pub metadata_listen: Option<SocketAddr>,
    pub bindings: Vec<InterceptBinding>,
    /// Address (port 0: any port) -> mesh name.
    pub map: Vec<(std::net::SocketAddrV4, String)>,
}

/// A validated binding.
#[derive(Debug, Clone, PartialEq)]
pub struct InterceptBinding {
    pub who: InterceptWho,
    /// The only destination ports intercepted (sorted; empty: any).
    pub ports: Vec<u16>,
    pub tenant: String,
    pub agent: Option<String>,
}

impl InterceptConfig {
    /// `[intercept]` with nothing set: what `intercept enable` starts on a
    /// node whose config has no `[intercept]`.
    pub fn defaults() -> InterceptConfig {
        let mut errors = Vec::new();
        let cfg = RawIntercept::default().validate(&mut errors);
        // The defaults are literals that validate.
        #[allow(clippy::expect_used)]
        cfg.expect("the default [intercept] is valid")
    }
}

impl RawIntercept {
    fn validate(&self, errors: &mut Vec<String>) -> Option<InterceptConfig> {
        let before = errors.len();
        let listen = match self.listen.as_deref().unwrap_or("127.0.0.1:15080").parse() {
            Ok(a) => a,
            Err(_) => {
                errors.push(format!(
                    "intercept.listen = {:?}: expected IPv4ADDR:PORT",
                    self.listen
                ));
                "127.0.0.1:15080".parse().expect("literal")
            }
        };
        let range = self.vip_range.as_deref().unwrap_or("198.19.0.0/16");
        let vip_range = match range
            .split_once('/')
            .and_then(|(a, p)| Some((a.parse().ok()?, p.parse::<u8>().ok()?)))
        {
            Some((a, p)) if (8..=32).contains(&p) => (a, p),
            _ => {
                errors.push(format!(
                    "intercept.vip_range = {range:?}: expected IPv4ADDR/PREFIX (8-32)"
                ));
                ("198.19.0.0".parse().expect("literal"), 16)
            }
        };
        let dns = match self.dns.as_deref().map(str::parse::<SocketAddr>) {
            None => None,
            Some(Ok(a)) => Some(a),
            Some(Err(_)) => {
                errors.push(format!(
                    "intercept.dns = {:?}: expected ADDR:PORT",
                    self.dns
                ));
                None
            }
        };
        let metadata_socket = self.metadata_socket.as_deref().map(PathBuf::from);
        if let Some(p) = &metadata_socket {
            if !p.is_absolute() {
                errors.push(format!(
                    "intercept.metadata_socket = {p:?}: give an absolute path"
                ));
            }
        }
        let metadata_listen = match self
            .metadata_listen
            .as_deref()
            .map(str::parse::<SocketAddr>)
        {
            None => None,
            Some(Ok(a)) if a.is_ipv4() => Some(a),
            Some(_) => {
                errors.push(format!(
                    "intercept.metadata_listen = {:?}: expected IPv4ADDR:PORT",
                    self.metadata_listen
                ));
                None
            }
        };
        let mode = match self.mode.as_deref().unwrap_or("auto") {
            "auto" => InterceptMode::Auto,
            "ebpf" => InterceptMode::Ebpf,
            "nftables" => InterceptMode::Nftables,
            other => {
                errors.push(format!(
                    "intercept.mode = {other:?}: expected \"auto\", \"ebpf\" or \"nftables\""
                ));
                InterceptMode::Auto
            }
        };
        let mut bindings: Vec<InterceptBinding> = Vec::new();
        for b in &self.bindings {
            let who = WhoSpec {
                cgroup: b.cgroup.as_deref(),
                uid: b.uid,
                netns: b.netns.as_deref(),
            };
            match InterceptBinding::parse(who, &b.tenant, b.agent.as_deref())
                .and_then(|x| x.with_ports(b.ports.as_deref().unwrap_or_default()))
            {
                Ok(b) if bindings.iter().any(|o| o.who == b.who) => {
                    errors.push(format!("intercept.bindings: {} is bound twice", b.who))
                }
                Ok(b) => bindings.push(b),
                Err(e) => errors.push(format!("intercept.bindings: {e}")),
            }
        }
        let mut map = Vec::new();
        for m in &self.map {
            let addr = m.addr.parse::<std::net::SocketAddrV4>().or_else(|_| {
                m.addr
                    .parse::<std::net::Ipv4Addr>()
                    .map(|ip| std::net::SocketAddrV4::new(ip, 0))
            });
            match addr {
                Ok(a) => map.push((a, m.name.to_ascii_lowercase())),
                Err(_) => errors.push(format!(
                    "intercept.map: addr {:?}: expected IPv4ADDR[:PORT]",
                    m.addr
                )),
            }
            // (The full grammar is the ingress's; this catches the typo.)
            let labels_ok = m.name.strip_suffix(".dmsc").is_some_and(|rest| {
                rest.split('.').count() >= 2
                    && rest.split('.').all(dmsc_transport::identity::valid_name)
            });
            if !labels_ok {
                errors.push(format!(
                    "intercept.map: name {:?} is not a mesh name (<agent>.<tenant>.dmsc, <tag>.cap.<tenant>.dmsc, mesh.<tenant>.dmsc)",
                    m.name
                ));
            }
        }
        (errors.len() == before).then_some(InterceptConfig {
            mode,
            listen,
            vip_range,
            dns,
            metadata_socket,
            metadata_listen,
            bindings,
            map,
        })
    }
}

/// `[mqtt]`: the broker this node bridges edge agents on.
#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawMqtt {
    /// `mqtt://host[:port]` (default 1883) or `mqtts://host[:port]`
    /// (TLS, default 8883); empty with `embedded`.
    #[serde(default)]
    pub broker: String,
    /// mqtts: the CA that signed the broker's certificate (PEM); default:
    /// the system's roots.
    pub ca: Option<PathBuf>,
    /// mqtts: a client certificate chain and key (PEM) for brokers that
    /// authenticate clients by certificate.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The tenants whose topics (`dmsc/<tenant>/...`) this node bridges.
    pub tenants: Vec<String>,
    /// Default: `dmsc-<node name>`.
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Largest message accepted or sent, in bytes (default 1 MiB).
    pub max_message: Option<usize>,
    /// Keep-alive in seconds (default 10).
    pub keep_alive_secs: Option<u64>,
    /// Calls from the edge into the mesh in progress at once, per tenant
    /// (default 64); past it a call is answered `overloaded` (503).
    pub max_calls: Option<usize>,
    /// `[mqtt.credentials.<tenant>]`: broker credentials of one tenant.
    /// Such a tenant gets an MQTT session of its own (client id
    /// `<client_id>-<tenant>`), so the broker's ACLs can confine what the
    /// node does for it to `dmsc/<tenant>/#`; the other tenants share the
    /// session of `username`/`password`/`cert`.
    #[serde(default)]
    pub credentials: std::collections::BTreeMap<String, RawMqttCredentials>,
    /// Run the brokers in process instead of using `broker`: one per
    /// tenant, at the address `listen` gives it (a broker per tenant keeps
    /// each tenant's topics apart by construction). For a standalone edge
    /// node; clients authenticate with the tenant's `credentials`.
    #[serde(default)]
    pub embedded: bool,
    /// With `embedded`: `<tenant> = "ADDR:PORT"` for every bridged tenant.
    #[serde(default)]
    pub listen: std::collections::BTreeMap<String, String>,
}

/// `[mqtt.credentials.<tenant>]`.
#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawMqttCredentials {
    pub username: Option<String>,
    pub password: Option<String>,
    /// mqtts: a client certificate chain and key (PEM) for this tenant's session.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// TLS to the broker.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttTls {
    pub ca: Option<PathBuf>,
    pub client: Option<(PathBuf, PathBuf)>,
}

/// `[mqtt]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    /// `Some` for mqtts: the CA (`None`: system roots) and the client
    /// certificate and key, if any.
    pub tls: Option<MqttTls>,
    pub tenants: Vec<String>,
    pub client_id: Option<String>,
    pub credentials: Option<(String, String)>,
    pub max_message: usize,
    pub keep_alive: Duration,
    /// Concurrent calls from the edge, per tenant.
    pub max_calls: usize,
    /// Tenants with a session of their own: its credentials and client
    /// certificate.
    pub per_tenant: std::collections::BTreeMap<String, MqttTenantSession>,
    /// Embedded brokers, one per tenant, at these addresses.
    pub embedded: Option<std::collections::BTreeMap<String, SocketAddr>>,
    /// Calls from the edge are read through a shared subscription (several
    /// nodes may bridge a tenant on one broker). Off for a session with an
    /// embedded broker, which only this node reads.
    pub shared_calls: bool,
}

/// A tenant's own MQTT session: who the node is to the broker for it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MqttTenantSession {
    pub credentials: Option<(String, String)>,
    pub client: Option<(PathBuf, PathBuf)>,
}

impl MqttConfig {
    /// The MQTT sessions the bridge keeps: one per tenant with credentials
    /// of its own (or per embedded broker), one for the others. Each comes
    /// back as a config of its own (its tenants, credentials, client id).
    pub fn sessions(&self, node: &str) -> Vec<MqttConfig> {
        let client_id = self
            .client_id
            .clone()
            .unwrap_or_else(|| format!("dmsc-{node}"));
        let base = MqttConfig {
            per_tenant: Default::default(),
            embedded: None,
            ..self.clone()
        };
        let mut out = Vec::new();
        let shared: Vec<String> = self
            .tenants
            .iter()
            .filter(|t| !self.per_tenant.contains_key(*t) && self.embedded.is_none())
            .cloned()
            .collect();
        if !shared.is_empty() {
            out.push(MqttConfig {
                tenants: shared,
                client_id: Some(client_id.clone()),
                ..base.clone()
            });
        }
        for t in &self.tenants {
            let own = self.per_tenant.get(t);
            let listen = self.embedded.as_ref().and_then(|e| e.get(t));
            if own.is_none() && listen.is_none() {
                continue;
            }
            let mut c = MqttConfig {
                tenants: vec![t.clone()],
                client_id: Some(format!("{client_id}-{t}")),
                ..base.clone()
            };
            if let Some(own) = own {
                c.credentials = own.credentials.clone();
                if let (Some(tls), Some(client)) = (c.tls.as_mut(), &own.client) {
                    tls.client = Some(client.clone());
                }
            }
            if let Some(addr) = listen {
                c.host = addr.ip().to_string();
                c.port = addr.port();
                c.tls = None;
                c.shared_calls = false;
            }
            out.push(c);
        }
        out
    }
}

impl RawMqtt {
    fn validate(&self, errors: &mut Vec<String>) -> Option<MqttConfig> {
        let before = errors.len();
        let scheme = self.broker.split_once("://").map(|(s, _)| s);
        let tls = scheme == Some("mqtts");
        let (host, port) = match self.broker.split_once("://") {
            _ if self.embedded => {
                if !self.broker.is_empty() {
                    errors.push(
                        "mqtt.broker and mqtt.embedded = true exclude each other (the embedded brokers listen at mqtt.listen)".to_string(),
                    );
                }
                ("embedded".to_string(), 0)
            }
            Some(("mqtt" | "mqtts", rest)) => {
                let rest = rest.trim_end_matches('/');
                let default = if tls { 8883 } else { 1883 };
                match rest.rsplit_once(':') {
                    Some((h, p)) => match p.parse::<u16>() {
                        Ok(p) => (h.trim_matches(['[', ']']).to_string(), p),
                        Err(_) => {
                            errors.push(format!("mqtt.broker = {:?}: bad port `{p}`", self.broker));
                            (String::new(), 0)
                        }
                    },
                    None => (rest.to_string(), default),
                }
            }
            _ => {
                errors.push(format!(
                    "mqtt.broker = {:?}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]",
                    self.broker
                ));
                (String::new(), 0)
            }
        };
        if errors.len() == before && host.is_empty() {
            errors.push(format!("mqtt.broker = {:?}: no host", self.broker));
        }
        if self.tenants.is_empty() {
            errors.push("mqtt.tenants: name at least one tenant to bridge".to_string());
        }
        for t in &self.tenants {
            if !dmsc_transport::identity::valid_name(t) {
                errors.push(format!("mqtt.tenants: `{t}` is not a tenant name"));
            }
        }
        let credentials = match (&self.username, &self.password) {
            (Some(u), Some(p)) => Some((u.clone(), p.clone())),
            (Some(u), None) => Some((u.clone(), String::new())),
            (None, Some(_)) => {
                errors.push("mqtt.password is set without mqtt.username".to_string());
                None
            }
            (None, None) => None,
        };
        for (what, p) in [("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)] {
            if let Some(p) = p {
                if !tls {
                    errors.push(format!("mqtt.{what} is only for an mqtts:// broker"));
                } else if !p.is_file() {
                    errors.push(format!("mqtt.{what} = `{}`: no such file", p.display()));
                }
            }
        }
        let client = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => {
                errors.push("mqtt.cert and mqtt.key go together".to_string());
                None
            }
        };
        let max_message = self.max_message.unwrap_or(1 << 20);
        // (MQTT's largest packet is 268,435,455 bytes; room for headers.)
        if !(1024..=268_000_000).contains(&max_message) {
            errors.push(format!(
                "mqtt.max_message = {max_message}: between 1024 and 268000000 bytes"
            ));
        }
        let keep_alive = Duration::from_secs(self.keep_alive_secs.unwrap_or(10));
        // (rumqttc refuses anything shorter.)
        if !(5..=65535).contains(&keep_alive.as_secs()) {
            errors.push("mqtt.keep_alive_secs must be within 5..=65535".to_string());
        }
        let max_calls = self.max_calls.unwrap_or(64);
        if !(1..=65536).contains(&max_calls) {
            errors.push(format!("mqtt.max_calls = {max_calls}: between 1 and 65536"));
        }
        if self
            .client_id
            .as_deref()
            .is_some_and(|c| c.is_empty() || c.len() > 256)
        {
            errors.push("mqtt.client_id must be 1-256 characters".to_string());
        }
        let mut per_tenant = std::collections::BTreeMap::new();
        for (t, c) in &self.credentials {
            if !self.tenants.contains(t) {
                errors.push(format!(
                    "mqtt.credentials.{t}: `{t}` is not one of mqtt.tenants"
                ));
            }
            let credentials = match (&c.username, &c.password) {
                (Some(u), p) => Some((u.clone(), p.clone().unwrap_or_default())),
                (None, Some(_)) => {
                    errors.push(format!(
                        "mqtt.credentials.{t}.password is set without a username"
                    ));
                    None
                }
                (None, None) => None,
            };
            let client = match (&c.cert, &c.key) {
                (Some(cert), Some(key)) => {
                    if !tls {
                        errors.push(format!(
                            "mqtt.credentials.{t}: cert and key are only for an mqtts:// broker"
                        ));
                    }
                    for p in [cert, key] {
                        if !p.is_file() {
                            errors.push(format!(
                                "mqtt.credentials.{t}: `{}`: no such file",
                                p.display()
                            ));
                        }
                    }
                    Some((cert.clone(), key.clone()))
                }
                (None, None) => None,
                _ => {
                    errors.push(format!("mqtt.credentials.{t}: cert and key go together"));
                    None
                }
            };
            if credentials.is_none() && client.is_none() {
                errors.push(format!(
                    "mqtt.credentials.{t}: give a username (and password) or a cert and key"
                ));
            }
            per_tenant.insert(
                t.clone(),
                MqttTenantSession {
                    credentials,
                    client,
                },
            );
        }
        let embedded = if self.embedded {
            let mut at = std::collections::BTreeMap::new();
            for t in &self.tenants {
                match self.listen.get(t).map(|a| a.parse::<SocketAddr>()) {
                    Some(Ok(a)) => {
                        at.insert(t.clone(), a);
                    }
                    Some(Err(_)) => errors.push(format!(
                        "mqtt.listen.{t} = {:?}: expected ADDR:PORT",
                        self.listen[t]
                    )),
                    None => errors.push(format!(
                        "mqtt.listen.{t}: an embedded broker needs an address for every bridged tenant"
                    )),
                }
            }
            let mut seen = std::collections::HashSet::new();
            for a in at.values() {
                if !seen.insert(*a) {
                    errors.push(format!(
                        "mqtt.listen: {a} is given twice (one broker per tenant, so one address each)"
                    ));
                }
            }
            for (t, a) in &at {
                // Anyone who can reach a non-loopback listener could
                // otherwise connect: ask for the tenant's credentials.
                if !a.ip().is_loopback()
                    && per_tenant
                        .get(t)
                        .is_none_or(|s: &MqttTenantSession| s.credentials.is_none())
                {
                    errors.push(format!(
                        "mqtt.listen.{t} = {a} is not a loopback address: set mqtt.credentials.{t} (username and password) for its clients"
                    ));
                }
            }
            Some(at)
        } else {
            if !self.listen.is_empty() {
                errors.push("mqtt.listen is only for mqtt.embedded = true".to_string());
            }
            None
        };
        (errors.len() == before).then(|| MqttConfig {
            per_tenant,
            embedded,
            shared_calls: true,
            host,
            port,
            tls: tls.then(|| MqttTls {
                ca: self.ca.clone(),
                client,
            }),
            tenants: self.tenants.clone(),
            client_id: self.client_id.clone(),
            credentials,
            max_message,
            keep_alive,
            max_calls,
        })
    }
}

/// `[intent]`: routing by intent (`mesh.<tenant>.dmsc`).
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawIntent {
    /// A sentence-embedding model (`config.json`, `tokenizer.json`,
    /// `model.safetensors`; `scripts/fetch-model.sh` installs one). Unset:
    /// lexical matching only. Set but unreadable: a configuration error.
    pub model_dir: Option<PathBuf>,
    /// `best` (default): route to the best match. `ask`: when unsure,
    /// answer with the candidates instead. A request's `dmsc-intent-mode`
    /// header overrides it.
    pub mode: Option<String>,
    /// Tenants whose cards this node embeds (default: the tenants of its
    /// ingress listeners and agents, and any tenant it routes an intent for).
    pub tenants: Option<Vec<String>>,
    /// Ask when the runner-up's score is within this of the best's (0..1,
    /// default 0.3).
    pub ask_margin: Option<f32>,
    /// Ask when the best match's semantic score is below this (default 0.45).
    pub ask_min_semantic: Option<f32>,
    /// Share of the semantic score in the fused one (0..=1, default 0.8).
    pub semantic_weight: Option<f32>,
    /// Seconds within which a call by name resolves an ask (default 300).
    pub learn_window_secs: Option<u64>,
    /// Examples one caller may teach this node per hour (default 20).
    pub learn_per_caller: Option<u32>,
    /// Learned examples kept per agent (default 32).
    pub learn_per_agent: Option<usize>,
}

/// Routing by intent, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct IntentConfig {
    pub model_dir: Option<PathBuf>,
    pub ask: bool,
    pub tenants: Option<Vec<String>>,
    pub ask_rule: dmsc_registry::semantic::AskRule,
    pub fusion: dmsc_registry::Fusion,
    pub learn_window: Duration,
    pub learn_per_caller: u32,
    pub learn_per_agent: usize,
}

impl Default for IntentConfig {
    fn default() -> Self {
        IntentConfig {
            model_dir: None,
            ask: false,
            tenants: None,
            ask_rule: Default::default(),
            fusion: Default::default(),
            learn_window: Duration::from_secs(300),
            learn_per_caller: 20,
            learn_per_agent: 32,
        }
    }
}

impl RawIntent {
    fn validate(&self, errors: &mut Vec<String>) -> IntentConfig {
        let d = IntentConfig::default();
        let ask = match self.mode.as_deref() {
            None | Some("best") => false,
            Some("ask") => true,
            Some(m) => {
                errors.push(format!("intent.mode = {m:?}: expected \"best\" or \"ask\""));
                false
            }
        };
        let mut share = |what: &str, v: Option<f32>, default: f32| match v {
            None => default,
            Some(x) if (0.0..=1.0).contains(&x) => x,
            Some(x) => {
                errors.push(format!("intent.{what} = {x} must be within 0..=1"));
                default
            }
        };
        let ask_rule = dmsc_registry::semantic::AskRule {
            margin: share("ask_margin", self.ask_margin, d.ask_rule.margin),
            min_semantic: share(
                "ask_min_semantic",
                self.ask_min_semantic,
                d.ask_rule.min_semantic,
            ),
            ..d.ask_rule
        };
        let fusion = dmsc_registry::Fusion {
            semantic_weight: share(
                "semantic_weight",
                self.semantic_weight,
                d.fusion.semantic_weight,
            ),
            ..d.fusion
        };
        if let Some(dir) = &self.model_dir {
            if !dir.is_dir() {
                errors.push(format!(
                    "intent.model_dir = `{}`: no such directory (scripts/fetch-model.sh installs the model)",
                    dir.display()
                ));
            }
        }
        IntentConfig {
            model_dir: self.model_dir.clone(),
            ask,
            tenants: self.tenants.clone(),
            ask_rule,
            fusion,
            learn_window: Duration::from_secs(self.learn_window_secs.unwrap_or(300).max(1)),
            learn_per_caller: self.learn_per_caller.unwrap_or(d.learn_per_caller),
            learn_per_agent: self
                .learn_per_agent
                .unwrap_or(d.learn_per_agent)
                .clamp(1, 1024),
        }
    }
}

/// `[enrollment]`: bounds on `/v1/enroll` and `/v1/renew` per source
/// address (IPv4 address or IPv6 /64).
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawEnrollment {
    /// Sustained requests per second per source (default 5).
    pub rate_per_sec: Option<f64>,
    /// Requests a source may send at once before the rate applies (default 20).
    pub burst: Option<u32>,
    /// Failed attempts per source and window audited one by one; the rest
    /// go into one aggregate entry per window (default 10).
    pub audit_failures_per_window: Option<u32>,
    /// The sampling window (default 10).
    pub audit_window_secs: Option<u64>,
}

/// Enrollment limits, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct EnrollmentLimits {
    pub rate_per_sec: f64,
    pub burst: u32,
    pub audit_failures_per_window: u32,
    pub audit_window: Duration,
}

impl Default for EnrollmentLimits {
    fn default() -> Self {
        EnrollmentLimits {
            rate_per_sec: 5.0,
            burst: 20,
            audit_failures_per_window: 10,
            audit_window: Duration::from_secs(10),
        }
    }
}

impl RawEnrollment {
    fn validate(&self, errors: &mut Vec<String>) -> EnrollmentLimits {
        let d = EnrollmentLimits::default();
        let rate_per_sec = match self.rate_per_sec {
            Some(r) if !(r.is_finite() && r > 0.0) => {
                errors.push(format!("enrollment.rate_per_sec = {r} must be > 0"));
                d.rate_per_sec
            }
            Some(r) => r,
            None => d.rate_per_sec,
        };
        let burst = match self.burst {
            Some(0) => {
                errors.push("enrollment.burst must be > 0".into());
                d.burst
            }
            Some(b) => b,
            None => d.burst,
        };
        let audit_window = match self.audit_window_secs {
            Some(0) => {
                errors.push("enrollment.audit_window_secs must be > 0".into());
                d.audit_window
            }
            Some(s) => Duration::from_secs(s),
            None => d.audit_window,
        };
        EnrollmentLimits {
            rate_per_sec,
            burst,
            audit_failures_per_window: self
                .audit_failures_per_window
                .unwrap_or(d.audit_failures_per_window),
            audit_window,
        }
    }
}

/// `[jwt]`: OAuth 2.0 bearer tokens accepted at authenticated ingress.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    #[serde(default)]
    pub issuers: Vec<String>,
    #[serde(default)]
    pub audiences: Vec<String>,
    pub jwks_file: Option<PathBuf>,
    pub jwks_url: Option<String>,
    pub tenant_claim: Option<String>,
    pub agent_claim: Option<String>,
    pub refresh_secs: Option<u64>,
    pub leeway_secs: Option<u64>,
}

/// `[audit]`: the node's append-only, hash-chained audit log.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub enabled: Option<bool>,
    /// Default: `<data_dir>/audit`.
    pub dir: Option<PathBuf>,
    /// `batch` (default), `interval:<ms>` or `never`.
    pub fsync: Option<String>,
    pub checkpoint_every: Option<u64>,
    pub checkpoint_interval_ms: Option<u64>,
    /// Group commit window of the `batch` policy: after an entry arrives
    /// the writer waits this long for more before it writes and syncs
    /// (default 5, at most 1000; 0 writes each arrival at once).
    pub linger_ms: Option<u64>,
}

/// `[[agents]]`: an agent this node is home to.
#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    pub tenant: String,
    /// The agent's own endpoint, e.g. `http://127.0.0.1:9101` (none for
    /// `protocol = "mqtt"`: an edge agent is reached over the broker).
    #[serde(default)]
    pub url: String,
    /// Mesh name; default: the card's name, slugged.
    pub name: Option<String>,
    /// For agents without an agent card: declare the skills here and the
    /// node builds the card (no fetch).
    pub skills: Option<Vec<RawSkill>>,
    pub description: Option<String>,
    /// Health-check path (default: the agent card path; `/` for declared agents).
    pub health_path: Option<String>,
    /// `grpc`, `h2c` or `http1`: how the node speaks to the agent, for
    /// health checks and calls. Default: found out by the health checks.
    /// `mqtt`: an edge agent on the broker of `[mqtt]` (declare `name` and
    /// `skills`; it answers on `dmsc/<tenant>/agents/<name>/req`).
    pub protocol: Option<String>,
    /// Data tags the agent may receive (`["pii", "financial"]`); a request
    /// with another tag is refused (403 `policy_violation`) by this node.
    /// Default: any (the tenant policy's `[agents.<name>] accepts` still applies).
    pub accepts: Option<Vec<String>>,
}

/// A skill declared in config for an agent without a card.
#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawSkill {
    pub id: String,
    pub name: Option<String>,
    pub description: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub examples: Vec<String>,
}

/// `[[ingress]]`: where local agents send their requests.
#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawIngress {
    pub listen: String,
    /// The tenant of every caller of an unauthenticated listener (local
    /// agents); authenticated listeners take the tenant from the caller.
    pub tenant: Option<String>,
    /// Serve TLS with the node certificate (default: false).
    pub tls: Option<bool>,
    /// How callers prove who they are: any of `mtls`, `jwt`; empty or
    /// absent with `tenant` set: none (the listener's tenant).
    pub auth: Option<Vec<String>>,
    /// `1.3` (default) or `1.2`.
    pub min_tls: Option<String>,
}

/// `[delegation]`: timeouts, retries, circuit breaking, agent health.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDelegation {
    pub timeout_ms: Option<u64>,
    pub retries: Option<u32>,
    pub max_buffered_body: Option<usize>,
    /// Bytes of buffered request bodies the node holds at once (all callers).
    pub max_buffered_total: Option<usize>,
    /// Largest deadline a caller may ask for with `dmsc-timeout`.
    pub max_timeout_ms: Option<u64>,
    pub circuit_failures: Option<u32>,
    pub circuit_error_rate: Option<f32>,
    pub circuit_open_ms: Option<u64>,
    pub health_interval_ms: Option<u64>,
    pub agent_ttl_secs: Option<u64>,
    pub load_interval_ms: Option<u64>,
    /// How often the home node fetches each agent's card again (a
    /// conditional GET), so a redeployed agent's new skills reach the mesh.
    pub card_refresh_interval_ms: Option<u64>,
    /// `least-loaded` (default: the least loaded eligible candidate, of at
    /// most 8 sampled on large sets) or `p2c` (power of two choices).
    pub selection: Option<String>,
    /// Routing by intent balances load only among the best-matching agent
    /// and its equals: the same card or skills, or an intent score within
    /// this share of the best (default 0.05).
    pub intent_margin: Option<f32>,
}

/// `[limits]`: what the ingress and admin listeners accept before they
/// refuse, shed or close (see [`crate::ingress::listen`]).
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub header_read_timeout_ms: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
    pub max_connections: Option<usize>,
    pub max_connections_per_listener: Option<usize>,
    pub max_in_flight_per_listener: Option<usize>,
    pub max_header_bytes: Option<usize>,
    pub max_headers: Option<usize>,
    pub h2_max_concurrent_streams: Option<u32>,
    /// On shutdown, how long the node waits for the requests in flight
    /// (default 25000; 0: stop at once).
    pub shutdown_grace_ms: Option<u64>,
}

/// Listener limits, validated. The defaults suit a node on a host with the
/// common 1024..20000 open-files limit serving agents on the same host or
/// network: generous for real callers, small enough that a flood meets a
/// refusal before it meets the kernel's limits.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitsConfig {
    /// A request head (HTTP/1) or the first request (any protocol, also
    /// after a TLS handshake) must arrive within this; an HTTP/1 keep-alive
    /// connection waits at most this long for its next request.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight is closed after this
    /// (HTTP/2 with GOAWAY; HTTP/1 is usually closed sooner by the header timeout).
    pub idle_timeout: Duration,
    /// Open connections over all ingress and admin listeners of the node.
    pub max_connections: usize,
    /// Open connections per listener.
    pub max_connections_per_listener: usize,
    /// Requests being answered at once per listener; more are shed (503).
    pub max_in_flight_per_listener: usize,
    /// Largest request head in bytes (HTTP/1: request line and headers;
    /// HTTP/2: the header list).
    pub max_header_bytes: usize,
    /// Most header fields in an HTTP/1 request (431 beyond).
    pub max_headers: usize,
    /// Concurrent streams an HTTP/2 client may open on one connection.
    pub h2_max_concurrent_streams: u32,
    /// On shutdown, how long the node waits for the requests in flight
    /// (ingress and delegations from peers) before it cuts them; zero:
    /// none. Under Kubernetes' default 30 s termination grace, so the node
    /// still closes its overlay and audit log itself.
    pub shutdown_grace: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            max_connections_per_listener: 4096,
            max_in_flight_per_listener: 1024,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            h2_max_concurrent_streams: 256,
            shutdown_grace: Duration::from_secs(25),
        }
    }
}

/// Smallest `limits.max_header_bytes`: hyper's smallest HTTP/1 read buffer.
pub const MIN_HEADER_BYTES: usize = 8192;

impl RawLimits {
    fn validate(&self, errors: &mut Vec<String>) -> LimitsConfig {
        let d = LimitsConfig::default();
        let ms = |v: Option<u64>, what: &str, default: Duration, errors: &mut Vec<String>| match v {
            Some(n) if !(1..=3_600_000).contains(&n) => {
                errors.push(format!("limits.{what} = {n} must be within 1..=3600000"));
                default
            }
            Some(n) => Duration::from_millis(n),
            None => default,
        };
        // Upper bounds keep semaphores and buffers in sane ranges (tokio's
        // semaphore panics above usize::MAX >> 3; hyper's buffer below 8 KiB).
        let count = |v: Option<usize>,
                     what: &str,
                     range: std::ops::RangeInclusive<usize>,
                     default: usize,
                     errors: &mut Vec<String>| match v {
            Some(n) if !range.contains(&n) => {
                errors.push(format!(
                    "limits.{what} = {n} must be within {}..={}",
                    range.start(),
                    range.end()
                ));
                default
            }
            Some(n) => n,
            None => default,
        };
        LimitsConfig {
            header_read_timeout: ms(
                self.header_read_timeout_ms,
                "header_read_timeout_ms",
                d.header_read_timeout,
                errors,
            ),
            idle_timeout: ms(
                self.idle_timeout_ms,
                "idle_timeout_ms",
                d.idle_timeout,
                errors,
            ),
            max_connections: count(
                self.max_connections,
                "max_connections",
                1..=1_000_000,
                d.max_connections,
                errors,
            ),
            max_connections_per_listener: count(
                self.max_connections_per_listener,
                "max_connections_per_listener",
                1..=1_000_000,
                d.max_connections_per_listener,
                errors,
            ),
            max_in_flight_per_listener: count(
                self.max_in_flight_per_listener,
                "max_in_flight_per_listener",
                1..=1_000_000,
                d.max_in_flight_per_listener,
                errors,
            ),
            max_header_bytes: count(
                self.max_header_bytes,
                "max_header_bytes",
                MIN_HEADER_BYTES..=16 << 20,
                d.max_header_bytes,
                errors,
            ),
            max_headers: count(
                self.max_headers,
                "max_headers",
                1..=10_000,
                d.max_headers,
                errors,
            ),
            h2_max_concurrent_streams: match self.h2_max_concurrent_streams {
                Some(n) if !(1..=100_000).contains(&n) => {
                    errors.push(format!(
                        "limits.h2_max_concurrent_streams = {n} must be within 1..=100000"
                    ));
                    d.h2_max_concurrent_streams
                }
                Some(n) => n,
                None => d.h2_max_concurrent_streams,
            },
            shutdown_grace: match self.shutdown_grace_ms {
                Some(n) if n > 3_600_000 => {
                    errors.push(format!(
                        "limits.shutdown_grace_ms = {n} must be within 0..=3600000"
                    ));
                    d.shutdown_grace
                }
                Some(n) => Duration::from_millis(n),
                None => d.shutdown_grace,
            },
        }
    }
}

/// Delegation settings, validated.
#[derive(Debug, Clone)]
pub struct DelegationConfig {
    /// Deadline of a request that sets none (`dmsc-timeout` header).
    pub timeout: Duration,
    /// Further candidates tried when a request certainly did not reach an agent.
    pub retries: u32,
    /// Request bodies up to this size are buffered (so they can be retried
    /// and read for intent); larger or unsized ones stream.
    pub max_buffered_body: usize,
    /// Node-wide budget for buffered request bodies; beyond it, 503.
    pub max_buffered_total: usize,
    /// Ceiling on any deadline: a larger `dmsc-timeout` (or the deadline a
    /// calling node states on the wire) is clamped to it.
    pub max_timeout: Duration,
    pub circuit: dmsc_registry::CircuitConfig,
    pub health_interval: Duration,
    pub agent_ttl: Duration,
    pub load_interval: Duration,
    /// How often each fetched agent card is fetched again (also right
    /// after an agent recovers: a restart is often a redeploy).
    pub card_refresh_interval: Duration,
    pub selection: dmsc_registry::Choice,
    pub intent_margin: f32,
}

impl Default for DelegationConfig {
    fn default() -> Self {
        DelegationConfig {
            timeout: Duration::from_secs(30),
            retries: 2,
            max_buffered_body: 1 << 20,
            max_buffered_total: 64 << 20,
            max_timeout: Duration::from_secs(300),
            circuit: dmsc_registry::CircuitConfig::default(),
            health_interval: Duration::from_secs(2),
            // A backstop: a dead home node's agents leave with it (membership),
            // a removed agent by its deleted key. Every renewal re-gossips the
            // whole record, so a short TTL costs bandwidth (BENCHMARKS.md, gossip).
            agent_ttl: Duration::from_secs(300),
            load_interval: Duration::from_millis(500),
            // A redeploy shows within a minute (at once if the agent was
            // seen down); an unchanged card costs a 304 where the agent
            // supports conditional GETs.
            card_refresh_interval: Duration::from_secs(60),
            selection: dmsc_registry::Choice::LeastLoaded,
            intent_margin: dmsc_registry::select::INTENT_MARGIN,
        }
    }
}

/// An ingress listener, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct IngressSpec {
    pub listen: SocketAddr,
    /// Set for unauthenticated listeners: every caller is of this tenant.
    pub tenant: Option<String>,
    pub tls: bool,
    pub mtls: bool,
    pub jwt: bool,
    pub allow_tls12: bool,
}

/// JWT validation settings, validated.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    pub issuers: Vec<String>,
    pub audiences: Vec<String>,
    pub jwks_file: Option<PathBuf>,
    pub jwks_url: Option<String>,
    pub tenant_claim: String,
    pub agent_claim: String,
    pub refresh: Duration,
    pub leeway: Duration,
}

/// Audit log settings, validated.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub dir: PathBuf,
    pub fsync: String,
    pub checkpoint_every: u64,
    pub checkpoint_interval: Duration,
    pub linger: Duration,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawOverlay {
    pub listen: Option<String>,
    pub advertise: Option<String>,
    pub bootstrap: Option<Vec<String>>,
    /// Overlay addresses (HOST:PORT) of relays to keep sessions with.
    pub relays: Option<Vec<String>>,
    /// `auto` (default), `direct` or `relayed`.
    pub reachability: Option<String>,
    /// The TCP + TLS relay listener of a relay (default: the overlay's
    /// listen address, TCP); also where nodes expect a relay's TCP listener
    /// when its gossip record does not say.
    pub tcp_listen: Option<String>,
    /// Move relayed peers to a direct path by hole punching (default true).
    pub direct_upgrade: Option<bool>,
    /// Ceiling of QUIC path MTU discovery, in bytes of UDP payload
    /// (default 8952; 1200..=65527).
    pub max_udp_payload: Option<u32>,
}

/// `[relay]`: this node forwards datagrams between mesh nodes.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRelay {
    pub enabled: Option<bool>,
    /// Per (sender, destination) pair (default 20000).
    pub pair_packets_per_sec: Option<u32>,
    /// Per (sender, destination) pair (default 33554432, 32 MiB/s).
    pub pair_bytes_per_sec: Option<u64>,
}

/// The relay role, validated.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub limits: dmsc_transport::relay::RelayLimits,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The node's issuing certificate and key (agent enrollment); default:
    /// `issuer.pem` / `issuer.key` beside the node certificate, if present.
    pub issuer_cert: Option<PathBuf>,
    pub issuer_key: Option<PathBuf>,
    /// Lifetime of the agent certificates this node issues (default 86400).
    pub agent_cert_ttl_secs: Option<u64>,
    /// How often the credential files are checked for changes (default 5000).
    pub reload_interval_ms: Option<u64>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<String>,
    /// Reads without a token (`/v1/status`, `/v1/agents`, `/v1/audit`, ...):
    /// default true. False leaves unauthenticated callers node health only
    /// (`/live`, `/ready`, `/v1/check`); the node admin token or a tenant
    /// read token (`dmsc-node admin-token create`) is needed for the rest.
    pub open_reads: Option<bool>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawGossip {
    pub interval_ms: Option<u64>,
    pub phi_threshold: Option<f64>,
    pub suspect_after_ms: Option<u64>,
    pub dead_grace_secs: Option<u64>,
    /// Compact digests with peers that read them (default true; docs/gossip.md).
    pub compact_digests: Option<bool>,
}

/// Defaults, the bottom layer.
pub const DEFAULT_OVERLAY_LISTEN: &str = "127.0.0.1:7400";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9400";
pub const DEFAULT_REGION: &str = "default";

/// Validated configuration of one node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Must match the certificate's SPIFFE name when set; `None`: take it from the certificate.
    pub name: Option<String>,
    pub region: String,
    pub overlay_listen: SocketAddr,
    pub advertise: Option<SocketAddr>,
    pub bootstrap: Vec<String>,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub admin_listen: SocketAddr,
    /// `[admin] open_reads` (default true): see [`RawAdmin::open_reads`].
    pub admin_open_reads: bool,
    pub gossip_interval: Duration,
    pub phi_threshold: f64,
    pub suspect_after: Option<Duration>,
    pub dead_grace: Duration,
    pub compact_digests: bool,
    pub agents: Vec<RawAgent>,
    pub ingress: Vec<IngressSpec>,
    pub delegation: DelegationConfig,
    pub issuer_cert: Option<PathBuf>,
    pub issuer_key: Option<PathBuf>,
    pub agent_cert_ttl: Duration,
    pub reload_interval: Duration,
    pub data_dir: PathBuf,
    pub jwt: Option<JwtSettings>,
    /// `None`: audit disabled.
    pub audit: Option<AuditSettings>,
    pub limits: LimitsConfig,
    pub enrollment: EnrollmentLimits,
    /// Relays to keep sessions with (HOST:PORT, resolved at start).
    pub relays: Vec<String>,
    pub reachability: dmsc_transport::Reachability,
    /// TCP relay listener (relay role); `None`: the overlay listen address.
    pub tcp_listen: Option<SocketAddr>,
    /// `Some`: this node is a relay.
    pub relay: Option<RelaySettings>,
    pub direct_upgrade: bool,
    /// Ceiling of QUIC path MTU discovery (`overlay.max_udp_payload`).
    pub max_udp_payload: u16,
    pub intent: IntentConfig,
    /// `Some`: bridge edge agents over MQTT.
    pub mqtt: Option<MqttConfig>,
    /// `Some`: intercept agents' outbound connections.
    pub intercept: Option<InterceptConfig>,
}

impl RawDelegation {
    fn validate(&self, errors: &mut Vec<String>) -> DelegationConfig {
        let d = DelegationConfig::default();
        let ms = |v: Option<u64>, what: &str, default: Duration, errors: &mut Vec<String>| match v {
            Some(0) => {
                errors.push(format!("delegation.{what} must be > 0"));
                default
            }
            Some(n) => Duration::from_millis(n),
            None => default,
        };
        let mut circuit = d.circuit.clone();
        if let Some(n) = self.circuit_failures {
            if n == 0 {
                errors.push("delegation.circuit_failures must be > 0".into());
            } else {
                circuit.consecutive_failures = n;
            }
        }
        if let Some(r) = self.circuit_error_rate {
            if !(r > 0.0 && r <= 1.0) {
                errors.push(format!(
                    "delegation.circuit_error_rate = {r} must be within (0, 1]"
                ));
            } else {
                circuit.error_rate = r;
            }
        }
        circuit.open_for = ms(
            self.circuit_open_ms,
            "circuit_open_ms",
            circuit.open_for,
            errors,
        );
        let timeout = ms(self.timeout_ms, "timeout_ms", d.timeout, errors);
        let max_timeout = ms(self.max_timeout_ms, "max_timeout_ms", d.max_timeout, errors);
        if timeout > max_timeout {
            errors.push(format!(
                "delegation.timeout_ms = {} exceeds delegation.max_timeout_ms = {}",
                timeout.as_millis(),
                max_timeout.as_millis()
            ));
        }
        let max_buffered_body = self.max_buffered_body.unwrap_or(d.max_buffered_body);
        let max_buffered_total = self.max_buffered_total.unwrap_or(d.max_buffered_total);
        if max_buffered_body > max_buffered_total {
            errors.push(format!(
                "delegation.max_buffered_body = {max_buffered_body} exceeds delegation.max_buffered_total = {max_buffered_total} (no body that size could ever be buffered)"
            ));
        }
        DelegationConfig {
            timeout,
            retries: self.retries.unwrap_or(d.retries),
            max_buffered_body,
            max_buffered_total,
            max_timeout,
            circuit,
            health_interval: ms(
                self.health_interval_ms,
                "health_interval_ms",
                d.health_interval,
                errors,
            ),
            agent_ttl: match self.agent_ttl_secs {
                Some(0) => {
                    errors.push("delegation.agent_ttl_secs must be > 0".into());
                    d.agent_ttl
                }
                Some(n) => Duration::from_secs(n),
                None => d.agent_ttl,
            },
            load_interval: ms(
                self.load_interval_ms,
                "load_interval_ms",
                d.load_interval,
                errors,
            ),
            card_refresh_interval: ms(
                self.card_refresh_interval_ms,
                "card_refresh_interval_ms",
                d.card_refresh_interval,
                errors,
            ),
            selection: match self.selection.as_deref() {
                Some("p2c") => dmsc_registry::Choice::PowerOfTwo,
                None | Some("least-loaded") => dmsc_registry::Choice::LeastLoaded,
                Some(other) => {
                    errors.push(format!(
                        "delegation.selection = `{other}` must be `p2c` or `least-loaded`"
                    ));
                    d.selection
                }
            },
            intent_margin: match self.intent_margin {
                None => d.intent_margin,
                Some(m) if (0.0..=1.0).contains(&m) => m,
                Some(m) => {
                    errors.push(format!(
                        "delegation.intent_margin = {m} must be within 0..=1 (a share of the best intent score, e.g. 0.05)"
                    ));
                    d.intent_margin
                }
            },
        }
    }
}

/// All the problems found in a configuration.
#[derive(Debug)]
pub struct ConfigError(pub Vec<String>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for p in &self.0 {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// How an environment variable's text becomes a value.
#[derive(Debug, Clone, Copy)]
pub enum EnvKind {
    Text,
    /// Comma-separated.
    List,
    Whole,
    Number,
    /// `true`/`false` (also `1`/`0`, `yes`/`no`).
    Bool,
}

/// Every `DMSC_*` variable and the key it sets (one row per key).
pub const ENV: &[(&str, &str, EnvKind)] = &[
    ("DMSC_NAME", "name", EnvKind::Text),
    ("DMSC_REGION", "region", EnvKind::Text),
    ("DMSC_INTENT_MODEL_DIR", "intent.model_dir", EnvKind::Text),
    ("DMSC_INTENT_MODE", "intent.mode", EnvKind::Text),
    ("DMSC_OVERLAY_LISTEN", "overlay.listen", EnvKind::Text),
    ("DMSC_OVERLAY_ADVERTISE", "overlay.advertise", EnvKind::Text),
    ("DMSC_OVERLAY_BOOTSTRAP", "overlay.bootstrap", EnvKind::List),
    ("DMSC_OVERLAY_RELAYS", "overlay.relays", EnvKind::List),
    (
        "DMSC_OVERLAY_REACHABILITY",
        "overlay.reachability",
        EnvKind::Text,
    ),
    (
        "DMSC_OVERLAY_TCP_LISTEN",
        "overlay.tcp_listen",
        EnvKind::Text,
    ),
    ("DMSC_TLS_CA", "tls.ca", EnvKind::Text),
    ("DMSC_TLS_CERT", "tls.cert", EnvKind::Text),
    ("DMSC_TLS_KEY", "tls.key", EnvKind::Text),
    ("DMSC_DATA_DIR", "data_dir", EnvKind::Text),
    ("DMSC_ADMIN_LISTEN", "admin.listen", EnvKind::Text),
    ("DMSC_ADMIN_OPEN_READS", "admin.open_reads", EnvKind::Bool),
    (
        "DMSC_GOSSIP_INTERVAL_MS",
        "gossip.interval_ms",
        EnvKind::Whole,
    ),
    (
        "DMSC_GOSSIP_PHI_THRESHOLD",
        "gossip.phi_threshold",
        EnvKind::Number,
    ),
    (
        "DMSC_GOSSIP_SUSPECT_AFTER_MS",
        "gossip.suspect_after_ms",
        EnvKind::Whole,
    ),
    (
        "DMSC_GOSSIP_DEAD_GRACE_SECS",
        "gossip.dead_grace_secs",
        EnvKind::Whole,
    ),
    (
        "DMSC_DELEGATION_TIMEOUT_MS",
        "delegation.timeout_ms",
        EnvKind::Whole,
    ),
    (
        "DMSC_DELEGATION_MAX_TIMEOUT_MS",
        "delegation.max_timeout_ms",
        EnvKind::Whole,
    ),
    (
        "DMSC_DELEGATION_RETRIES",
        "delegation.retries",
        EnvKind::Whole,
    ),
    (
        "DMSC_DELEGATION_MAX_BUFFERED_BODY",
        "delegation.max_buffered_body",
        EnvKind::Whole,
    ),
    (
        "DMSC_DELEGATION_MAX_BUFFERED_TOTAL",
        "delegation.max_buffered_total",
        EnvKind::Whole,
    ),
    (
        "DMSC_LIMITS_HEADER_READ_TIMEOUT_MS",
        "limits.header_read_timeout_ms",
        EnvKind::Whole,
    ),
    (
        "DMSC_LIMITS_IDLE_TIMEOUT_MS",
        "limits.idle_timeout_ms",
        EnvKind::Whole,
    ),
    (
        "DMSC_LIMITS_MAX_CONNECTIONS",
        "limits.max_connections",
        EnvKind::Whole,
    ),
    (
        "DMSC_LIMITS_MAX_CONNECTIONS_PER_LISTENER",
        "limits.max_connections_per_listener",
        EnvKind::Whole,
    ),
    (
        "DMSC_LIMITS_MAX_IN_FLIGHT_PER_LISTENER",
        "limits.max_in_flight_per_listener",
        EnvKind::Whole,
    ),
    (
        "DMSC_LIMITS_SHUTDOWN_GRACE_MS",
        "limits.shutdown_grace_ms",
        EnvKind::Whole,
    ),
];

impl RawConfig {
    /// A node on loopback with every listener on port 0 and its credentials
    /// in `creds` (`ca.pem`, `node.pem`, `node.key`): what the demo, the
    /// benchmarks and in-process test clusters start.
    pub fn loopback(name: &str, creds: &Path, bootstrap: Option<SocketAddr>) -> RawConfig {
        RawConfig {
            name: Some(name.to_string()),
            region: None,
            overlay: RawOverlay {
                listen: Some("127.0.0.1:0".into()),
                advertise: None,
                bootstrap: bootstrap.map(|b| vec![b.to_string()]),
                ..Default::default()
            },
            tls: RawTls {
                ca: Some(creds.join("ca.pem")),
                cert: Some(creds.join("node.pem")),
                key: Some(creds.join("node.key")),
                ..Default::default()
            },
            admin: RawAdmin {
                listen: Some("127.0.0.1:0".into()),
                open_reads: None,
            },
            gossip: RawGossip::default(),
            agents: Vec::new(),
            ingress: Vec::new(),
            delegation: RawDelegation::default(),
            data_dir: Some(creds.join("data")),
            jwt: None,
            audit: RawAudit::default(),
            limits: RawLimits::default(),
            enrollment: RawEnrollment::default(),
            relay: RawRelay::default(),
            intent: RawIntent::default(),
            mqtt: None,
            intercept: None,
        }
    }

    /// Reads a TOML file; relative TLS paths become relative to the file.
    pub fn from_file(path: &Path) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(vec![format!("cannot read `{}`: {e}", path.display())]))?;
        let mut raw: RawConfig = toml::from_str(&text)
            .map_err(|e| ConfigError(vec![format!("`{}`: {e}", path.display())]))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let jwks = raw.jwt.as_mut().and_then(|j| j.jwks_file.as_mut());
        let mqtt = raw
            .mqtt
            .as_mut()
            .map(|m| [&mut m.ca, &mut m.cert, &mut m.key].into_iter().flatten())
            .into_iter()
            .flatten();
        for p in [
            &mut raw.tls.ca,
            &mut raw.tls.cert,
            &mut raw.tls.key,
            &mut raw.tls.issuer_cert,
            &mut raw.tls.issuer_key,
            &mut raw.data_dir,
            &mut raw.audit.dir,
            &mut raw.intent.model_dir,
        ]
        .into_iter()
        .flatten()
        .chain(jwks)
        .chain(mqtt)
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(raw)
    }

    /// The `DMSC_*` environment layer: each variable of [`ENV`] sets its
    /// key; the values are typed as the key wants, and every bad one is
    /// reported.
    pub fn from_env(env: &HashMap<String, String>) -> Result<RawConfig, ConfigError> {
        let mut errors = Vec::new();
        let mut root = toml::Table::new();
        for (var, path, kind) in ENV {
            let Some(v) = env.get(*var).filter(|v| !v.is_empty()) else {
                continue;
            };
            let value = match kind {
                EnvKind::Text => toml::Value::String(v.clone()),
                EnvKind::List => toml::Value::Array(
                    v.split(',')
                        .map(|s| s.trim())
                        .filter(|s| !s.is_empty())
                        .map(|s| toml::Value::String(s.to_string()))
                        .collect(),
                ),
                EnvKind::Whole => match v.trim().parse::<i64>() {
                    Ok(n) if n >= 0 => toml::Value::Integer(n),
                    _ => {
                        errors.push(format!("{var}=`{v}` is not a whole number"));
                        continue;
                    }
                },
                EnvKind::Bool => match v.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" => toml::Value::Boolean(true),
                    "false" | "0" | "no" => toml::Value::Boolean(false),
                    _ => {
                        errors.push(format!("{var}=`{v}` is not true or false"));
                        continue;
                    }
                },
                EnvKind::Number => match v.trim().parse::<f64>() {
                    Ok(n) => toml::Value::Float(n),
                    Err(_) => {
                        errors.push(format!("{var}=`{v}` is not a number"));
                        continue;
                    }
                },
            };
            let mut table = &mut root;
            let mut keys = path.split('.').peekable();
            while let Some(k) = keys.next() {
                if keys.peek().is_none() {
                    table.insert(k.to_string(), value);
                    break;
                }
                let entry = table
                    .entry(k.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                match entry {
                    toml::Value::Table(t) => table = t,
                    // ENV's paths never make a key both a value and a table.
                    _ => break,
                }
            }
        }
        if !errors.is_empty() {
            return Err(ConfigError(errors));
        }
        toml::Value::Table(root)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError(vec![format!("environment: {e}")]))
    }

    /// Lays `top` over `self`: every field `top` sets wins. Written once
    /// for every field: both layers become TOML trees (an unset field is
    /// absent), tables merge key by key, anything else `top` sets replaces.
    pub fn overlay_with(self, top: RawConfig) -> Result<RawConfig, ConfigError> {
        fn merge(base: &mut toml::Value, top: toml::Value) {
            match (base, top) {
                (toml::Value::Table(b), toml::Value::Table(t)) => {
                    for (k, v) in t {
                        match b.get_mut(&k) {
                            Some(bv) => merge(bv, v),
                            None => {
                                b.insert(k, v);
                            }
                        }
                    }
                }
                (b, t) => *b = t,
            }
        }
        let tree = |raw: &RawConfig| {
            toml::Value::try_from(raw)
                .map_err(|e| ConfigError(vec![format!("cannot layer the configuration: {e}")]))
        };
        let mut base = tree(&self)?;
        merge(&mut base, tree(&top)?);
        base.try_into().map_err(|e: toml::de::Error| {
            ConfigError(vec![format!("cannot layer the configuration: {e}")])
        })
    }

    /// Applies defaults and checks everything, collecting all problems.
    pub fn validate(self) -> Result<NodeConfig, ConfigError> {
        let mut errors = Vec::new();
        let addr = |what: &str, v: &str, errors: &mut Vec<String>| -> Option<SocketAddr> {
            match v.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    errors.push(format!("{what} = `{v}` is not an IP:port address"));
                    None
                }
            }
        };
        if let Some(n) = &self.name {
            if !dmsc_transport::identity::valid_name(n) {
                errors.push(format!(
                    "name = `{n}` must be 1-63 of a-z, 0-9 and - (it is the node's SPIFFE name)"
                ));
            }
        }
        let overlay_listen = addr(
            "overlay.listen",
            self.overlay
                .listen
                .as_deref()
                .unwrap_or(DEFAULT_OVERLAY_LISTEN),
            &mut errors,
        );
        let advertise = self
            .overlay
            .advertise
            .as_deref()
            .and_then(|v| addr("overlay.advertise", v, &mut errors));
        let max_udp_payload = match self.overlay.max_udp_payload {
            None => dmsc_transport::overlay::DEFAULT_MAX_UDP_PAYLOAD,
            Some(v) => match u16::try_from(v) {
                Ok(v) if dmsc_transport::overlay::MAX_UDP_PAYLOAD_RANGE.contains(&v) => v,
                _ => {
                    errors.push(format!(
                        "overlay.max_udp_payload = {v} must be within 1200..=65527 (bytes of UDP payload)"
                    ));
                    dmsc_transport::overlay::DEFAULT_MAX_UDP_PAYLOAD
                }
            },
        };
        if let (Some(l), None) = (overlay_listen, advertise) {
            if l.ip().is_unspecified() {
                errors.push(format!(
                    "overlay.listen = `{l}` is a wildcard address: set overlay.advertise to the address peers should dial"
                ));
            }
        }
        if let Some(a) = advertise {
            if a.ip().is_unspecified() || a.port() == 0 {
                errors.push(format!(
                    "overlay.advertise = `{a}` must be a concrete IP and port"
                ));
            }
        }
        let relays = self.overlay.relays.clone().unwrap_or_default();
        for r in &relays {
            if split_relay(r).is_none() {
                errors.push(format!(
                    "overlay.relays entry `{r}` is not HOST:PORT (or HOST:PORT;tcp=PORT for a relay \
                     whose TCP listener is on another port)"
                ));
            }
        }
        let reachability = match self.overlay.reachability.as_deref() {
            None | Some("auto") => dmsc_transport::Reachability::Auto,
            Some("direct") => dmsc_transport::Reachability::Direct,
            Some("relayed") => dmsc_transport::Reachability::Relayed,
            Some(other) => {
                errors.push(format!(
                    "overlay.reachability = `{other}`: use auto, direct or relayed"
                ));
                dmsc_transport::Reachability::Auto
            }
        };
        let tcp_listen = self
            .overlay
            .tcp_listen
            .as_deref()
            .and_then(|v| addr("overlay.tcp_listen", v, &mut errors));
        let relay = match self.relay.enabled {
            Some(true) => {
                let d = dmsc_transport::relay::RelayLimits::default();
                let limits = dmsc_transport::relay::RelayLimits {
                    pair_packets_per_sec: self
                        .relay
                        .pair_packets_per_sec
                        .unwrap_or(d.pair_packets_per_sec),
                    pair_bytes_per_sec: self
                        .relay
                        .pair_bytes_per_sec
                        .unwrap_or(d.pair_bytes_per_sec),
                };
                if limits.pair_packets_per_sec == 0 || limits.pair_bytes_per_sec < 2048 {
                    errors.push("relay.pair_packets_per_sec must be > 0 and relay.pair_bytes_per_sec at least 2048".into());
                }
                if reachability == dmsc_transport::Reachability::Relayed {
                    errors.push("relay.enabled = true with overlay.reachability = relayed: a relay must be reachable directly".into());
                }
                Some(RelaySettings { limits })
            }
            _ => None,
        };
        let bootstrap = self.overlay.bootstrap.unwrap_or_default();
        for b in &bootstrap {
            let ok = match b.rsplit_once(':') {
                Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
                None => false,
            };
            if !ok {
                errors.push(format!("overlay.bootstrap entry `{b}` is not HOST:PORT"));
            }
        }
        let admin_listen = addr(
            "admin.listen",
            self.admin.listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN),
            &mut errors,
        );
        let ca = self.tls.ca.unwrap_or_else(|| PathBuf::from("ca.pem"));
        let cert = self.tls.cert.unwrap_or_else(|| PathBuf::from("node.pem"));
        let key = self.tls.key.unwrap_or_else(|| PathBuf::from("node.key"));
        for (what, p) in [("tls.ca", &ca), ("tls.cert", &cert), ("tls.key", &key)] {
            if !p.is_file() {
                errors.push(format!("{what} = `{}`: no such file", p.display()));
            }
        }
        let interval_ms = self
            .gossip
            .interval_ms
            .unwrap_or(dmsc_gossip::gossip_defaults::INTERVAL.as_millis() as u64);
        if !(10..=60_000).contains(&interval_ms) {
            errors.push(format!(
                "gossip.interval_ms = {interval_ms} must be within 10..=60000"
            ));
        }
        let phi_threshold = self
            .gossip
            .phi_threshold
            .unwrap_or(dmsc_gossip::gossip_defaults::PHI);
        if phi_threshold.is_nan() || phi_threshold <= 0.0 || phi_threshold > 100.0 {
            errors.push(format!(
                "gossip.phi_threshold = {phi_threshold} must be within (0, 100]"
            ));
        }
        for (i, a) in self.agents.iter().enumerate() {
            if let Err(e) = check_spec(a) {
                errors.push(format!("agents[{i}]: {e}"));
            }
            let bridged = self
                .mqtt
                .as_ref()
                .is_some_and(|m| m.tenants.contains(&a.tenant));
            if a.protocol.as_deref() == Some(crate::proto::agent::EDGE_PROTOCOL) && !bridged {
                errors.push(format!(
                    "agents[{i}]: protocol = \"mqtt\" needs [mqtt] with tenant `{}` in `tenants`",
                    a.tenant
                ));
            }
        }
        let mut ingress = Vec::new();
        for (i, g) in self.ingress.iter().enumerate() {
            let (mut mtls, mut jwt) = (false, false);
            for m in g.auth.iter().flatten() {
                match m.as_str() {
                    "mtls" => mtls = true,
                    "jwt" => jwt = true,
                    "none" => {}
                    other => errors.push(format!(
                        "ingress[{i}].auth: `{other}` is not one of `mtls`, `jwt`, `none`"
                    )),
                }
            }
            // Authenticated listeners are TLS unless told otherwise, and
            // credentials never travel in clear text.
            let tls = g.tls.unwrap_or(mtls || jwt);
            if mtls && !tls {
                errors.push(format!(
                    "ingress[{i}]: auth `mtls` needs `tls = true` (client certificates travel in the TLS handshake)"
                ));
            }
            if jwt && !tls {
                errors.push(format!(
                    "ingress[{i}]: auth `jwt` needs `tls = true` (a bearer token in clear text can be replayed by anyone on the path)"
                ));
            }
            if jwt && self.jwt.is_none() {
                errors.push(format!(
                    "ingress[{i}]: auth `jwt` needs a [jwt] section (issuers, audiences, jwks_file or jwks_url)"
                ));
            }
            match (&g.tenant, mtls || jwt) {
                (Some(t), false) if !dmsc_transport::identity::valid_name(t) => errors.push(format!(
                    "ingress[{i}].tenant = `{t}` must be 1-63 of a-z, 0-9 and -"
                )),
                (Some(_), true) => errors.push(format!(
                    "ingress[{i}]: `tenant` is for unauthenticated listeners; with `auth` the caller's identity decides the tenant"
                )),
                (None, false) => errors.push(format!(
                    "ingress[{i}]: set `tenant` (every caller is of that tenant) or `auth = [\"mtls\", \"jwt\"]`"
                )),
                _ => {}
            }
            let allow_tls12 = match g.min_tls.as_deref() {
                None | Some("1.3") => false,
                Some("1.2") => true,
                Some(other) => {
                    errors.push(format!(
                        "ingress[{i}].min_tls = `{other}` must be `1.3` or `1.2`"
                    ));
                    false
                }
            };
            if let Some(listen) = addr(&format!("ingress[{i}].listen"), &g.listen, &mut errors) {
                ingress.push(IngressSpec {
                    listen,
                    tenant: g.tenant.clone(),
                    tls,
                    mtls,
                    jwt,
                    allow_tls12,
                });
            }
        }
        let jwt = self.jwt.as_ref().map(|j| {
            if j.issuers.is_empty() || j.audiences.is_empty() {
                errors.push("jwt: set at least one of `issuers` and of `audiences`".into());
            }
            if j.jwks_file.is_some() == j.jwks_url.is_some() {
                errors.push("jwt: set exactly one of `jwks_file` and `jwks_url`".into());
            }
            JwtSettings {
                issuers: j.issuers.clone(),
                audiences: j.audiences.clone(),
                jwks_file: j.jwks_file.clone(),
                jwks_url: j.jwks_url.clone(),
                tenant_claim: j.tenant_claim.clone().unwrap_or_else(|| "tenant".into()),
                agent_claim: j.agent_claim.clone().unwrap_or_else(|| "sub".into()),
                refresh: Duration::from_secs(j.refresh_secs.unwrap_or(300).max(1)),
                leeway: Duration::from_secs(j.leeway_secs.unwrap_or(30)),
            }
        });
        // Default: beside the node's credentials, which are per node already.
        let data_dir = self.data_dir.clone().unwrap_or_else(|| {
            cert.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .join("data")
        });
        let audit = if self.audit.enabled.unwrap_or(true) {
            let fsync = self.audit.fsync.clone().unwrap_or_else(|| "batch".into());
            if let Err(e) = fsync.parse::<dmsc_audit::FsyncPolicy>() {
                errors.push(format!("audit.fsync: {e}"));
            }
            let linger_ms = self.audit.linger_ms.unwrap_or(5);
            if linger_ms > 1000 {
                errors.push(format!(
                    "audit.linger_ms: {linger_ms} is more than 1000 (an entry would wait that long to reach the disk)"
                ));
            }
            Some(AuditSettings {
                dir: self
                    .audit
                    .dir
                    .clone()
                    .unwrap_or_else(|| data_dir.join("audit")),
                fsync,
                checkpoint_every: self.audit.checkpoint_every.unwrap_or(1000).max(1),
                checkpoint_interval: Duration::from_millis(
                    self.audit.checkpoint_interval_ms.unwrap_or(10_000).max(10),
                ),
                linger: Duration::from_millis(linger_ms),
            })
        } else {
            None
        };
        let beside = |name: &str| cert.parent().map(|d| d.join(name));
        let issuer_cert = self
            .tls
            .issuer_cert
            .clone()
            .or_else(|| beside(dmsc_transport::pki::ISSUER_CERT).filter(|p| p.is_file()));
        let issuer_key = self
            .tls
            .issuer_key
            .clone()
            .or_else(|| beside(dmsc_transport::pki::ISSUER_KEY).filter(|p| p.is_file()));
        for (what, p) in [
            ("tls.issuer_cert", &issuer_cert),
            ("tls.issuer_key", &issuer_key),
        ] {
            if let Some(p) = p {
                if !p.is_file() {
                    errors.push(format!("{what} = `{}`: no such file", p.display()));
                }
            }
        }
        let delegation = self.delegation.validate(&mut errors);
        let limits = self.limits.validate(&mut errors);
        let enrollment = self.enrollment.validate(&mut errors);
        let intent = self.intent.validate(&mut errors);
        let mqtt = self.mqtt.as_ref().and_then(|m| m.validate(&mut errors));
        let intercept = self
            .intercept
            .as_ref()
            .and_then(|i| i.validate(&mut errors));
        if !errors.is_empty() {
            return Err(ConfigError(errors));
        }
        Ok(NodeConfig {
            issuer_cert,
            issuer_key,
            agent_cert_ttl: Duration::from_secs(
                self.tls.agent_cert_ttl_secs.unwrap_or(86_400).max(60),
            ),
            reload_interval: Duration::from_millis(
                self.tls.reload_interval_ms.unwrap_or(5_000).max(50),
            ),
            data_dir,
            jwt,
            audit,
            agents: self.agents,
            ingress,
            delegation,
            limits,
            enrollment,
            relays,
            reachability,
            tcp_listen,
            relay,
            direct_upgrade: self.overlay.direct_upgrade.unwrap_or(true),
            max_udp_payload,
            intent,
            mqtt,
            intercept,
            name: self.name,
            region: self.region.unwrap_or_else(|| DEFAULT_REGION.to_string()),
            // Every `None` above pushed an error, so these are present.
            overlay_listen: overlay_listen.ok_or_else(|| ConfigError(vec![]))?,
            advertise,
            bootstrap,
            ca,
            cert,
            key,
            admin_listen: admin_listen.ok_or_else(|| ConfigError(vec![]))?,
            admin_open_reads: self.admin.open_reads.unwrap_or(true),
            gossip_interval: Duration::from_millis(interval_ms),
            phi_threshold,
            suspect_after: self.gossip.suspect_after_ms.map(Duration::from_millis),
            dead_grace: Duration::from_secs(self.gossip.dead_grace_secs.unwrap_or(3600)),
            compact_digests: self.gossip.compact_digests.unwrap_or(true),
        })
    }
}

/// A relay entry: `HOST:PORT` (its overlay address; its TCP listener on
/// the same port) or `HOST:PORT;tcp=PORT` (its `overlay.tcp_listen` on
/// another port, e.g. 443). `None` when malformed.
pub fn split_relay(entry: &str) -> Option<(&str, Option<u16>)> {
    let (udp, tcp) = match entry.split_once(';') {
        Some((udp, rest)) => {
            let port = rest.trim().strip_prefix("tcp=")?.parse::<u16>().ok()?;
            if port == 0 {
                return None;
            }
            (udp.trim(), Some(port))
        }
        None => (entry, None),
    };
    let (host, port) = udp.rsplit_once(':')?;
    (!host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)).then_some((udp, tcp))
}

/// Resolves `overlay.relays` entries ([`split_relay`]) to relay addresses;
/// an entry that does not resolve is logged and left out. A relay's TCP
/// listener is on its overlay port unless the entry says otherwise (its
/// gossip record corrects it later, for a node that gets gossip at all).
pub async fn resolve_relays(list: &[String]) -> Vec<dmsc_transport::RelayAddr> {
    let mut out = Vec::new();
    for entry in list {
        let Some((udp, tcp)) = split_relay(entry) else {
            continue;
        };
        for overlay in resolve_hosts("a configured relay", &[udp.to_string()]).await {
            let tcp = tcp.map_or(overlay, |p| SocketAddr::new(overlay.ip(), p));
            out.push(dmsc_transport::RelayAddr { overlay, tcp });
        }
    }
    out
}

/// Resolves `HOST:PORT` entries (relays, bootstrap peers) to their first
/// address; an entry that does not resolve is logged and left out.
pub async fn resolve_hosts(what: &str, list: &[String]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for h in list {
        match tokio::net::lookup_host(h.as_str()).await {
            Ok(mut addrs) => out.extend(addrs.next()),
            Err(e) => tracing::warn!(entry = %h, error = %e, "cannot resolve {what}; skipping it"),
        }
    }
    out
}

impl NodeConfig {
    /// The effective configuration as log fields (no secrets: key *paths* only).
    pub fn summary(&self) -> String {
        format!(
            "name={} region={} overlay.listen={} overlay.advertise={} bootstrap={:?} overlay.relays={:?} overlay.reachability={:?} overlay.tcp_listen={} overlay.direct_upgrade={} relay.enabled={} admin.listen={} admin.open_reads={} tls.ca={} tls.cert={} tls.key={} gossip.interval={:?} gossip.phi={} ingress=[{}] agents={} delegation.timeout={:?} delegation.retries={} delegation.selection={:?} limits.header_read_timeout={:?} limits.idle_timeout={:?} limits.max_connections={} limits.max_connections_per_listener={} limits.max_in_flight_per_listener={} limits.shutdown_grace={:?}",
            self.name.as_deref().unwrap_or("<from certificate>"),
            self.region,
            self.overlay_listen,
            self.advertise.map(|a| a.to_string()).unwrap_or_else(|| "<listen address>".into()),
            self.bootstrap,
            self.relays,
            self.reachability,
            self.tcp_listen.map(|a| a.to_string()).unwrap_or_else(|| "<overlay address>".into()),
            self.direct_upgrade,
            self.relay.is_some(),
            self.admin_listen,
            self.admin_open_reads,
            self.ca.display(),
            self.cert.display(),
            self.key.display(),
            self.gossip_interval,
            self.phi_threshold,
            self.ingress
                .iter()
                .map(|i| format!(
                    "{}:{}{}",
                    i.tenant.as_deref().unwrap_or("auth"),
                    i.listen,
                    if i.tls { "/tls" } else { "" }
                ))
                .collect::<Vec<_>>()
                .join(","),
            self.agents.len(),
            self.delegation.timeout,
            self.delegation.retries,
            self.delegation.selection,
            self.limits.header_read_timeout,
            self.limits.idle_timeout,
            self.limits.max_connections,
            self.limits.max_connections_per_listener,
            self.limits.max_in_flight_per_listener,
            self.limits.shutdown_grace,
        )
    }
}

/// Checks an agent spec without touching the network (config validation).
pub fn check_spec(a: &RawAgent) -> Result<(), String> {
    let mut problems = Vec::new();
    if !dmsc_transport::identity::valid_name(&a.tenant) {
        problems.push(format!(
            "tenant = `{}` must be 1-63 of a-z, 0-9 and -",
            a.tenant
        ));
    }
    let edge = a.protocol.as_deref() == Some(crate::proto::agent::EDGE_PROTOCOL);
    if edge {
        if a.name.is_none() || a.skills.is_none() {
            problems.push(
                "protocol = \"mqtt\" needs `name` and `skills` (an edge agent publishes no card over HTTP; or let it publish its card on dmsc/<tenant>/agents/<name>/card)"
                    .to_string(),
            );
        }
    } else {
        match a.url.parse::<hyper::Uri>() {
            Ok(u) if u.scheme_str() == Some("http") && u.authority().is_some() => {}
            Ok(_) => problems.push(format!(
                "url = `{}` must be an absolute http:// URL (the agent's own endpoint)",
                a.url
            )),
            Err(e) => problems.push(format!("url = `{}` is not a URL: {e}", a.url)),
        }
    }
    if let Some(n) = &a.name {
        if !dmsc_transport::identity::valid_name(n) || n == "mesh" {
            problems.push(format!(
                "name = `{n}` must be 1-63 of a-z, 0-9 and - (and not `mesh`, which is reserved)"
            ));
        }
    }
    for t in a.accepts.iter().flatten() {
        if !dmsc_transport::identity::valid_name(t) {
            problems.push(format!(
                "accepts: `{t}` is not a data tag name (1-63 of a-z, 0-9 and -; e.g. pii, phi, pci, financial, confidential)"
            ));
        }
    }
    if let Some(p) = &a.protocol {
        if crate::proto::agent::Protocol::parse(p).is_none() && !edge {
            problems.push(format!(
                "protocol = `{p}` must be `grpc`, `h2c`, `http1` or `mqtt` (or left out: the node finds out)"
            ));
        }
    }
    if let Some(skills) = &a.skills {
        if a.name.is_none() {
            problems.push("an agent declared with `skills` needs a `name`".into());
        }
        for (i, s) in skills.iter().enumerate() {
            if s.id.trim().is_empty() {
                problems.push(format!("skills[{i}].id must not be empty"));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        for f in ["ca.pem", "node.pem", "node.key"] {
            std::fs::write(d.path().join(f), "x").expect("write");
        }
        d
    }

    #[test]
    fn layers_apply_in_order_and_paths_follow_the_file() {
        let d = files();
        let file = d.path().join("node.toml");
        std::fs::write(
            &file,
            r#"
name = "eu-1"
region = "eu"
[overlay]
listen = "127.0.0.1:7401"
bootstrap = ["127.0.0.1:7400"]
[tls]
ca = "ca.pem"
cert = "node.pem"
key = "node.key"
[admin]
listen = "127.0.0.1:9401"
"#,
        )
        .expect("write");
        let env: HashMap<String, String> = [
            ("DMSC_REGION".to_string(), "us".to_string()),
            (
                "DMSC_ADMIN_LISTEN".to_string(),
                "127.0.0.1:9999".to_string(),
            ),
        ]
        .into();
        let flags = RawConfig {
            admin: RawAdmin {
                listen: Some("127.0.0.1:0".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let cfg = RawConfig::from_file(&file)
            .expect("file")
            .overlay_with(RawConfig::from_env(&env).expect("env"))
            .expect("env layer")
            .overlay_with(flags)
            .expect("flag layer")
            .validate()
            .expect("valid");
        assert_eq!(cfg.name.as_deref(), Some("eu-1"));
        assert_eq!(cfg.region, "us", "env beats file");
        assert_eq!(
            cfg.admin_listen.to_string(),
            "127.0.0.1:0",
            "flags beat env"
        );
        assert_eq!(cfg.overlay_listen.to_string(), "127.0.0.1:7401");
        assert_eq!(cfg.bootstrap, vec!["127.0.0.1:7400".to_string()]);
        assert_eq!(cfg.ca, d.path().join("ca.pem"));
    }

    #[test]
    fn admin_open_reads_defaults_open_and_the_env_can_close_it() {
        let d = files();
        let file = d.path().join("node.toml");
        std::fs::write(
            &file,
            "[tls]\nca = \"ca.pem\"\ncert = \"node.pem\"\nkey = \"node.key\"\n",
        )
        .expect("write");
        let base = RawConfig::from_file(&file).expect("file");
        assert!(base.clone().validate().expect("valid").admin_open_reads);
        let env: HashMap<String, String> =
            [("DMSC_ADMIN_OPEN_READS".to_string(), "false".to_string())].into();
        let closed = base
            .overlay_with(RawConfig::from_env(&env).expect("env"))
            .expect("layer")
            .validate()
            .expect("valid");
        assert!(!closed.admin_open_reads, "the env closes reads");
        let bad: HashMap<String, String> =
            [("DMSC_ADMIN_OPEN_READS".to_string(), "maybe".to_string())].into();
        let e = RawConfig::from_env(&bad).expect_err("not a bool");
        assert!(e.to_string().contains("DMSC_ADMIN_OPEN_READS"), "{e}");
    }

    #[tokio::test]
    async fn a_relay_entry_may_name_its_tcp_port() {
        let got = resolve_relays(&["127.0.0.1:7400;tcp=443".into(), "127.0.0.2:7401".into()]).await;
        let want = [
            ("127.0.0.1:7400", "127.0.0.1:443"),
            ("127.0.0.2:7401", "127.0.0.2:7401"),
        ];
        assert_eq!(got.len(), 2);
        for (r, (udp, tcp)) in got.iter().zip(want) {
            assert_eq!(
                (r.overlay.to_string(), r.tcp.to_string()),
                (udp.to_string(), tcp.to_string())
            );
        }
    }

    #[test]
    fn relay_settings_parse_and_a_relay_cannot_be_relayed() {
        let text = r#"
[overlay]
relays = ["10.0.0.1:7400", "relay.example:443", "10.0.0.2:7400;tcp=443"]
reachability = "relayed"
tcp_listen = "0.0.0.0:8443"
direct_upgrade = false
[relay]
enabled = true
"#;
        let raw: RawConfig = toml::from_str(text).expect("toml");
        let err = raw
            .clone()
            .validate()
            .expect_err("a relay must be reachable");
        assert!(err.to_string().contains("reachable directly"), "{err}");
        let d = files();
        let mut raw = raw;
        raw.overlay.reachability = Some("auto".into());
        raw.tls.ca = Some(d.path().join("ca.pem"));
        raw.tls.cert = Some(d.path().join("node.pem"));
        raw.tls.key = Some(d.path().join("node.key"));
        let cfg = raw.validate().expect("valid");
        assert_eq!(cfg.relays.len(), 3);
        assert_eq!(
            split_relay("10.0.0.2:7400;tcp=443"),
            Some(("10.0.0.2:7400", Some(443)))
        );
        assert_eq!(split_relay("10.0.0.1:7400"), Some(("10.0.0.1:7400", None)));
        for bad in [
            "10.0.0.1:7400;tcp=0",
            "10.0.0.1:7400;443",
            "10.0.0.1;tcp=443",
            ":7400",
        ] {
            assert_eq!(split_relay(bad), None, "{bad}");
        }
        assert_eq!(cfg.tcp_listen, Some("0.0.0.0:8443".parse().expect("addr")));
        assert!(!cfg.direct_upgrade);
        assert_eq!(
            cfg.max_udp_payload,
            dmsc_transport::overlay::DEFAULT_MAX_UDP_PAYLOAD
        );
        assert_eq!(
            cfg.relay.expect("relay role").limits.pair_packets_per_sec,
            20_000
        );
    }

    #[test]
    fn all_errors_are_reported_together() {
        let raw = RawConfig {
            name: Some("Bad Name".into()),
            overlay: RawOverlay {
                listen: Some("0.0.0.0:7400".into()),
                advertise: None,
                bootstrap: Some(vec!["nope".into()]),
                relays: Some(vec!["relay-without-port".into()]),
                reachability: Some("sometimes".into()),
                ..Default::default()
            },
            relay: RawRelay {
                enabled: Some(true),
                pair_packets_per_sec: Some(0),
                ..Default::default()
            },
            admin: RawAdmin {
                listen: Some("localhost".into()),
                ..Default::default()
            },
            tls: RawTls {
                ca: Some("/nonexistent/ca.pem".into()),
                ..Default::default()
            },
            gossip: RawGossip {
                interval_ms: Some(0),
                ..Default::default()
            },
            audit: RawAudit {
                linger_ms: Some(5000),
                ..Default::default()
            },
            ..Default::default()
        };
        let err = raw.validate().expect_err("invalid");
        let text = err.to_string();
        for needle in [
            "name",
            "wildcard",
            "nope",
            "admin.listen",
            "tls.ca",
            "interval_ms",
            "relay-without-port",
            "sometimes",
            "pair_packets_per_sec",
            "audit.linger_ms",
        ] {
            assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
        }
        assert!(err.0.len() >= 10, "{text}");
    }

    #[test]
    fn every_environment_variable_names_a_real_key_and_layers_over_the_file() {
        // deny_unknown_fields: a row whose path is not a key fails here.
        for (var, path, kind) in ENV {
            let v = match kind {
                EnvKind::Text => "text",
                EnvKind::List => "a:1,b:2",
                EnvKind::Whole => "7",
                EnvKind::Number => "2.5",
                EnvKind::Bool => "false",
            };
            let env: HashMap<String, String> = [(var.to_string(), v.to_string())].into();
            RawConfig::from_env(&env).unwrap_or_else(|e| panic!("{var} -> {path}: {e}"));
        }
        let env: HashMap<String, String> = [
            ("DMSC_LIMITS_MAX_CONNECTIONS", "77"),
            ("DMSC_DELEGATION_TIMEOUT_MS", "1234"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .into();
        let mut file = RawConfig::default();
        file.limits.max_connections = Some(5);
        file.limits.idle_timeout_ms = Some(999);
        let merged = file
            .overlay_with(RawConfig::from_env(&env).expect("env"))
            .expect("layer");
        assert_eq!(merged.limits.max_connections, Some(77), "env wins");
        assert_eq!(
            merged.limits.idle_timeout_ms,
            Some(999),
            "the file's other keys stay"
        );
        assert_eq!(merged.delegation.timeout_ms, Some(1234));
    }

    #[test]
    fn unknown_keys_and_bad_env_are_errors() {
        let d = tempfile::tempdir().expect("tempdir");
        let file = d.path().join("n.toml");
        std::fs::write(&file, "nmae = \"x\"\n").expect("write");
        assert!(RawConfig::from_file(&file)
            .expect_err("typo")
            .to_string()
            .contains("nmae"));
        let env: HashMap<String, String> =
            [("DMSC_GOSSIP_INTERVAL_MS".to_string(), "fast".to_string())].into();
        assert!(RawConfig::from_env(&env).is_err());
    }
    #[test]
    fn the_mqtt_section_and_edge_agents_are_checked_at_load() {
        let d = files();
        let file = d.path().join("node.toml");
        let with = |rest: &str| {
            std::fs::write(
                &file,
                format!(
                    "name = \"eu-1\"\n[tls]\nca = \"ca.pem\"\ncert = \"node.pem\"\nkey = \"node.key\"\n{rest}\n"
                ),
            )
            .expect("write");
            RawConfig::from_file(&file).expect("file").validate()
        };
        let edge = "[[agents]]\ntenant = \"acme\"\nname = \"meter\"\nprotocol = \"mqtt\"\nskills = [{ id = \"read\", tags = [\"meter\"] }]\n";
        let cfg = with(&format!(
            "[mqtt]\nbroker = \"mqtt://127.0.0.1:1884\"\ntenants = [\"acme\"]\n{edge}"
        ))
        .expect("valid");
        let m = cfg.mqtt.expect("mqtt");
        assert_eq!(
            (m.host.as_str(), m.port, m.max_message),
            ("127.0.0.1", 1884, 1 << 20)
        );
        assert_eq!(
            with("[mqtt]\nbroker = \"mqtt://broker\"\ntenants = [\"acme\"]")
                .expect("default port")
                .mqtt
                .map(|m| m.port),
            Some(1883)
        );
        // Sessions: one per tenant with credentials of its own, one for the
        // rest; an embedded broker per tenant, each with its own session.
        type Session = (String, Vec<String>, Option<(String, String)>, u16, bool);
        let sessions = |toml: &str| -> Vec<Session> {
            with(toml)
                .expect(toml)
                .mqtt
                .expect("mqtt")
                .sessions("n1")
                .into_iter()
                .map(|s| {
                    let id = s.client_id.expect("client id");
                    (id, s.tenants, s.credentials, s.port, s.shared_calls)
                })
                .collect()
        };
        let creds = |u: &str, p: &str| Some((u.to_string(), p.to_string()));
        assert_eq!(
            sessions("[mqtt]\nbroker = \"mqtt://b\"\ntenants = [\"acme\", \"globex\", \"initech\"]\nusername = \"all\"\npassword = \"p\"\n[mqtt.credentials.globex]\nusername = \"g\"\npassword = \"gp\""),
            vec![
                ("dmsc-n1".to_string(), vec!["acme".to_string(), "initech".to_string()], creds("all", "p"), 1883, true),
                ("dmsc-n1-globex".to_string(), vec!["globex".to_string()], creds("g", "gp"), 1883, true),
            ]
        );
        assert_eq!(
            sessions("[mqtt]\nembedded = true\ntenants = [\"acme\", \"globex\"]\n[mqtt.listen]\nacme = \"127.0.0.1:2883\"\nglobex = \"127.0.0.1:2884\"\n[mqtt.credentials.acme]\nusername = \"acme\"\npassword = \"change-me\""),
            vec![
                ("dmsc-n1-acme".to_string(), vec!["acme".to_string()], creds("acme", "change-me"), 2883, false),
                ("dmsc-n1-globex".to_string(), vec!["globex".to_string()], None, 2884, false),
            ]
        );
        let tls =
            with("[mqtt]\nbroker = \"mqtts://broker\"\ntenants = [\"acme\"]\nca = \"ca.pem\"")
                .expect("mqtts")
                .mqtt
                .expect("mqtt");
        assert_eq!(tls.port, 8883);
        let ca = tls.tls.expect("tls").ca.expect("ca");
        assert!(
            ca.is_absolute() && ca.ends_with("ca.pem"),
            "{}",
            ca.display()
        );
        for (bad, says) in [
            (
                "[mqtt]\nbroker = \"mqtts://b\"\ntenants = [\"acme\"]\nca = \"nope.pem\"",
                "mqtt.ca = ",
            ),
            (
                "[mqtt]\nbroker = \"mqtt://b\"\ntenants = [\"acme\"]\nca = \"ca.pem\"",
                "only for an mqtts:// broker",
            ),
            (
                "[mqtt]\nbroker = \"mqtts://b\"\ntenants = [\"acme\"]\ncert = \"node.pem\"",
                "go together",
            ),
            ("[mqtt]\nbroker = \"tcp://b\"\ntenants = [\"acme\"]", "expected mqtt://HOST[:PORT]"),
            ("[mqtt]\nbroker = \"mqtt://b:x\"\ntenants = [\"acme\"]", "bad port"),
            ("[mqtt]\nbroker = \"mqtt://b\"\ntenants = []", "at least one tenant"),
            ("[mqtt]\nbroker = \"mqtt://b\"\ntenants = [\"a/#\"]", "not a tenant name"),
            ("[mqtt]\nbroker = \"mqtt://b\"\ntenants = [\"acme\"]\nkeep_alive_secs = 2", "within 5..=65535"),
            ("[mqtt]\nbroker = \"mqtt://b\"\ntenants = [\"acme\"]\nkeep_alive_secs = 70000", "within 5..=65535"),
            ("[mqtt]\nbroker = \"mqtt://b\"\ntenants = [\"acme\"]\nmax_calls = 0", "mqtt.max_calls = 0"),
            ("[overlay]\nmax_udp_payload = 1000", "overlay.max_udp_payload = 1000 must be within 1200..=65527"),
            ("[overlay]\nmax_udp_payload = 70000", "overlay.max_udp_payload = 70000"),
            ("[intercept]\nmode = \"iptables\"", "intercept.mode"),
            ("[intercept]\n[[intercept.bindings]]\nnetns = \"../x\"\ntenant = \"acme\"", "not a network namespace name"),
            ("[intercept]\nmetadata_socket = \"meta.sock\"", "absolute path"),
            ("[intercept]\nmetadata_listen = \"169.254.77.77\"", "intercept.metadata_listen"),
            ("[intercept]\n[[intercept.bindings]]\nuid = 0\ntenant = \"acme\"", "uid 0 cannot be a binding"),
            ("[intercept]\n[[intercept.bindings]]\nuid = 5\ncgroup = \"a\"\ntenant = \"acme\"", "exactly one of cgroup, uid and netns"),
            ("[intercept]\n[[intercept.bindings]]\nuid = 5\ntenant = \"acme\"\n[[intercept.bindings]]\nuid = 5\ntenant = \"acme\"", "uid 5 is bound twice"),
            ("[intercept]\ndns = \"nowhere\"\n[[intercept.bindings]]\ncgroup = \"a\"\ntenant = \"acme\"", "intercept.dns"),
            ("[intercept]\nlisten = \"[::1]:80\"\n[[intercept.bindings]]\ncgroup = \"a\"\ntenant = \"acme\"", "expected IPv4ADDR:PORT"),
            ("[intercept]\nvip_range = \"198.19.0.0/40\"\n[[intercept.bindings]]\ncgroup = \"a\"\ntenant = \"acme\"", "intercept.vip_range"),
            ("[intercept]\n[[intercept.bindings]]\ncgroup = \"../x\"\ntenant = \"acme\"", "below the cgroup2 root"),
            ("[intercept]\n[[intercept.bindings]]\ncgroup = \"a\"\ntenant = \"Not A Tenant\"", "is not a tenant name"),
            ("[intercept]\n[[intercept.bindings]]\ncgroup = \"a\"\ntenant = \"acme\"\n[[intercept.map]]\naddr = \"x\"\nname = \"billing.acme.dmsc\"", "expected IPv4ADDR[:PORT]"),
            ("[intercept]\n[[intercept.bindings]]\ncgroup = \"a\"\ntenant = \"acme\"\n[[intercept.map]]\naddr = \"10.0.0.5:80\"\nname = \"billing.example.com\"", "is not a mesh name"),
            ("[mqtt]\nbroker = \"mqtt://b\"\ntenants = [\"acme\"]\n[mqtt.credentials.globex]\nusername = \"u\"", "`globex` is not one of mqtt.tenants"),
            ("[mqtt]\nbroker = \"mqtt://b\"\ntenants = [\"acme\"]\n[mqtt.credentials.acme]\npassword = \"p\"", "password is set without a username"),
            ("[mqtt]\nbroker = \"mqtt://b\"\ntenants = [\"acme\"]\n[mqtt.credentials.acme]\ncert = \"c.pem\"", "cert and key go together"),
            ("[mqtt]\nbroker = \"mqtt://b\"\ntenants = [\"acme\"]\nembedded = true\n[mqtt.listen]\nacme = \"127.0.0.1:1884\"", "exclude each other"),
            ("[mqtt]\nembedded = true\ntenants = [\"acme\"]", "needs an address for every bridged tenant"),
            ("[mqtt]\nembedded = true\ntenants = [\"acme\"]\n[mqtt.listen]\nacme = \"nowhere\"", "expected ADDR:PORT"),
            ("[mqtt]\nembedded = true\ntenants = [\"acme\", \"globex\"]\n[mqtt.listen]\nacme = \"127.0.0.1:1884\"\nglobex = \"127.0.0.1:1884\"", "given twice"),
            ("[mqtt]\nembedded = true\ntenants = [\"acme\"]\n[mqtt.listen]\nacme = \"0.0.0.0:1884\"", "not a loopback address"),
            ("[mqtt]\nbroker = \"mqtt://b\"\ntenants = [\"acme\"]\n[mqtt.listen]\nacme = \"127.0.0.1:1884\"", "only for mqtt.embedded"),
            ("[mqtt]\nbroker = \"mqtt://b\"\ntenants = [\"acme\"]\nmax_message = 4294967295", "between 1024"),
            ("[mqtt]\nbroker = \"mqtt://b\"\ntenants = [\"acme\"]\nclient_id = \"\"", "1-256 characters"),
            (edge, "needs [mqtt] with tenant `acme`"),
            (
                "[mqtt]\nbroker = \"mqtt://b\"\ntenants = [\"acme\"]\n[[agents]]\ntenant = \"acme\"\nprotocol = \"mqtt\"",
                "needs `name` and `skills`",
            ),
        ] {
            let e = with(bad).expect_err(bad).to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn an_agent_protocol_is_one_of_three() {
        let d = files();
        let file = d.path().join("node.toml");
        let with = |protocol: &str| {
            std::fs::write(
                &file,
                format!(
                    r#"
name = "eu-1"
[tls]
ca = "ca.pem"
cert = "node.pem"
key = "node.key"
[[agents]]
tenant = "acme"
url = "http://127.0.0.1:50051"
name = "greeter"
skills = [{{ id = "greet" }}]
{protocol}
"#
                ),
            )
            .expect("write");
            RawConfig::from_file(&file).expect("file").validate()
        };
        let cfg = with(r#"protocol = "grpc""#).expect("grpc is valid");
        assert_eq!(cfg.agents[0].protocol.as_deref(), Some("grpc"));
        for ok in ["", r#"protocol = "h2c""#, r#"protocol = "http1""#] {
            with(ok).expect(ok);
        }
        let e = with(r#"protocol = "http2""#).expect_err("http2 is not a protocol name");
        assert!(
            e.to_string()
                .contains("agents[0]: protocol = `http2` must be `grpc`, `h2c`, `http1` or `mqtt`"),
            "{e}"
        ); // Data tags an agent accepts: names, checked at load.
        let cfg = with(r#"accepts = ["pii", "financial"]"#).expect("tags");
        assert_eq!(
            cfg.agents[0].accepts.as_deref(),
            Some(&["pii".to_string(), "financial".to_string()][..])
        );
        let e = with(r#"accepts = ["P I I"]"#).expect_err("not a tag name");
        assert!(e.to_string().contains("accepts: `P I I`"), "{e}");
    }
}

#[cfg(test)]
mod limits_tests {
    use super::*;

    fn with_limits(toml_text: &str) -> Result<NodeConfig, ConfigError> {
        let d = tempfile::tempdir().expect("tempdir");
        for f in ["ca.pem", "node.pem", "node.key"] {
            std::fs::write(d.path().join(f), "x").expect("write");
        }
        let file = d.path().join("n.toml");
        let tls = "[tls]\nca = \"ca.pem\"\ncert = \"node.pem\"\nkey = \"node.key\"\n";
        std::fs::write(&file, format!("{toml_text}\n{tls}")).expect("write");
        RawConfig::from_file(&file)?.validate()
    }

    #[test]
    fn limits_default_when_absent_and_layer_per_key() {
        let c = with_limits("").expect("valid");
        assert_eq!(c.limits, LimitsConfig::default());
        assert_eq!(c.limits.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.limits.max_connections, 10_000);
        let c = with_limits(
            "[limits]\nheader_read_timeout_ms = 1500\nmax_in_flight_per_listener = 4\n",
        )
        .expect("valid");
        assert_eq!(c.limits.header_read_timeout, Duration::from_millis(1500));
        assert_eq!(c.limits.max_in_flight_per_listener, 4);
        assert_eq!(c.limits.shutdown_grace, Duration::from_secs(25));
        let c = with_limits("[limits]\nshutdown_grace_ms = 0\n").expect("0: stop at once");
        assert_eq!(c.limits.shutdown_grace, Duration::ZERO);
        assert_eq!(
            c.limits.idle_timeout,
            Duration::from_secs(60),
            "unset keys keep their default"
        );
        // A higher layer sets one key and keeps the file's others.
        let file = RawConfig {
            limits: RawLimits {
                max_headers: Some(50),
                idle_timeout_ms: Some(5000),
                ..Default::default()
            },
            ..Default::default()
        };
        let top = RawConfig {
            limits: RawLimits {
                idle_timeout_ms: Some(7000),
                ..Default::default()
            },
            ..Default::default()
        };
        let merged = file.overlay_with(top).expect("layer").limits;
        assert_eq!(merged.max_headers, Some(50));
        assert_eq!(merged.idle_timeout_ms, Some(7000));
    }

    #[test]
    fn every_bad_limit_is_reported_at_once() {
        let e = with_limits(
            "[limits]\nheader_read_timeout_ms = 0\nidle_timeout_ms = 0\nmax_connections = 0\n\
             max_connections_per_listener = 0\nmax_in_flight_per_listener = 0\n\
             max_header_bytes = 100\nmax_headers = 0\nh2_max_concurrent_streams = 0\n\
             shutdown_grace_ms = 3600001\n",
        )
        .expect_err("invalid");
        let text = e.to_string();
        for key in [
            "header_read_timeout_ms",
            "idle_timeout_ms",
            "max_connections =",
            "max_connections_per_listener",
            "max_in_flight_per_listener",
            "max_header_bytes = 100 must be within 8192",
            "max_headers",
            "h2_max_concurrent_streams",
            "shutdown_grace_ms = 3600001",
        ] {
            assert!(
                text.contains(&format!("limits.{key}")),
                "missing {key}:\n{text}"
            );
        }
        assert_eq!(e.0.len(), 9, "{text}");
        assert!(with_limits("[limits]\nmax_conections = 5\n")
            .expect_err("typo")
            .to_string()
            .contains("max_conections"));
    }
}

#[cfg(test)]
mod ingress_tests {
    use super::*;

    fn with_ingress(dir: &Path, ingress: RawIngress, jwt: bool) -> Result<NodeConfig, ConfigError> {
        for f in ["ca.pem", "node.pem", "node.key"] {
            std::fs::write(dir.join(f), "x").expect("write");
        }
        let mut raw = RawConfig::loopback("n1", dir, None);
        raw.ingress = vec![ingress];
        if jwt {
            raw.jwt = Some(RawJwt {
                issuers: vec!["https://idp".into()],
                audiences: vec!["dmsc".into()],
                jwks_file: Some(dir.join("jwks.json")),
                ..Default::default()
            });
        }
        raw.validate()
    }

    #[test]
    fn authenticated_listeners_are_tls_and_never_take_credentials_in_clear() {
        let d = tempfile::tempdir().expect("dir");
        let auth = |a: &[&str]| Some(a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        // auth set, tls unset: TLS by default.
        let c = with_ingress(
            d.path(),
            RawIngress {
                listen: "127.0.0.1:0".into(),
                auth: auth(&["jwt"]),
                ..Default::default()
            },
            true,
        )
        .expect("valid");
        assert!(c.ingress[0].tls && c.ingress[0].jwt && c.ingress[0].tenant.is_none());
        // JWT over plain HTTP, mTLS without TLS, auth plus tenant, nothing: refused, each named.
        for (ingress, needle) in [
            (
                RawIngress {
                    listen: "127.0.0.1:0".into(),
                    auth: auth(&["jwt"]),
                    tls: Some(false),
                    ..Default::default()
                },
                "clear text",
            ),
            (
                RawIngress {
                    listen: "127.0.0.1:0".into(),
                    auth: auth(&["mtls"]),
                    tls: Some(false),
                    ..Default::default()
                },
                "client certificates travel in the TLS handshake",
            ),
            (
                RawIngress {
                    listen: "127.0.0.1:0".into(),
                    auth: auth(&["mtls"]),
                    tenant: Some("acme".into()),
                    ..Default::default()
                },
                "the caller's identity decides the tenant",
            ),
            (
                RawIngress {
                    listen: "127.0.0.1:0".into(),
                    ..Default::default()
                },
                "set `tenant`",
            ),
            (
                RawIngress {
                    listen: "127.0.0.1:0".into(),
                    auth: auth(&["kerberos"]),
                    ..Default::default()
                },
                "`kerberos` is not one of",
            ),
        ] {
            let e = with_ingress(d.path(), ingress, true).expect_err(needle);
            assert!(e.to_string().contains(needle), "{needle}: {e}");
        }
        // jwt without a [jwt] section.
        let e = with_ingress(
            d.path(),
            RawIngress {
                listen: "127.0.0.1:0".into(),
                auth: auth(&["jwt"]),
                ..Default::default()
            },
            false,
        )
        .expect_err("no jwt section");
        assert!(e.to_string().contains("needs a [jwt] section"), "{e}");
    }
}

#[cfg(test)]
mod request_limits_tests {
    use super::*;

    fn raw_with(dir: &Path, toml_text: &str) -> Result<NodeConfig, ConfigError> {
        for f in ["ca.pem", "node.pem", "node.key"] {
            std::fs::write(dir.join(f), "x").expect("write");
        }
        let file = dir.join("n.toml");
        std::fs::write(&file, toml_text).expect("write");
        RawConfig::loopback("n1", dir, None)
            .overlay_with(RawConfig::from_file(&file)?)?
            .validate()
    }

    #[test]
    fn body_budget_timeout_ceiling_and_enrollment_limits_have_defaults_and_keys() {
        let d = tempfile::tempdir().expect("dir");
        let cfg = raw_with(d.path(), "").expect("valid");
        assert_eq!(cfg.delegation.max_buffered_total, 64 << 20);
        assert_eq!(cfg.delegation.max_timeout, Duration::from_secs(300));
        assert_eq!(cfg.enrollment, EnrollmentLimits::default());
        let cfg = raw_with(
            d.path(),
            r#"
[delegation]
max_buffered_body = 1024
max_buffered_total = 4096
max_timeout_ms = 60000
[enrollment]
rate_per_sec = 0.5
burst = 3
audit_failures_per_window = 2
audit_window_secs = 60
"#,
        )
        .expect("valid");
        assert_eq!(cfg.delegation.max_buffered_total, 4096);
        assert_eq!(cfg.delegation.max_timeout, Duration::from_secs(60));
        assert_eq!(
            cfg.enrollment,
            EnrollmentLimits {
                rate_per_sec: 0.5,
                burst: 3,
                audit_failures_per_window: 2,
                audit_window: Duration::from_secs(60),
            }
        );
    }

    #[test]
    fn card_refresh_interval_has_a_default_a_key_and_must_be_positive() {
        let d = tempfile::tempdir().expect("dir");
        let cfg = raw_with(d.path(), "").expect("valid");
        assert_eq!(
            cfg.delegation.card_refresh_interval,
            Duration::from_secs(60)
        );
        let cfg =
            raw_with(d.path(), "[delegation]\ncard_refresh_interval_ms = 5000\n").expect("valid");
        assert_eq!(cfg.delegation.card_refresh_interval, Duration::from_secs(5));
        let err = raw_with(
            d.path(),
            "[delegation]\ncard_refresh_interval_ms = 0\nhealth_interval_ms = 0\n",
        )
        .expect_err("invalid");
        let text = err.to_string();
        assert!(
            text.contains("delegation.card_refresh_interval_ms must be > 0")
                && text.contains("delegation.health_interval_ms"),
            "{text}"
        );
    }

    #[test]
    fn inconsistent_limits_are_reported_together() {
        let d = tempfile::tempdir().expect("dir");
        let err = raw_with(
            d.path(),
            r#"
[delegation]
timeout_ms = 600000
max_buffered_body = 8192
max_buffered_total = 4096
[enrollment]
rate_per_sec = 0
burst = 0
audit_window_secs = 0
"#,
        )
        .expect_err("invalid");
        let text = err.to_string();
        for needle in [
            "max_timeout_ms",
            "max_buffered_total",
            "enrollment.rate_per_sec",
            "enrollment.burst",
            "enrollment.audit_window_secs",
        ] {
            assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
        }
    }
}
