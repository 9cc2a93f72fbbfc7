//! The relay role. A session is registered under the overlay address its
//! node advertises (checked: the node's mapped address, the address the
//! relay observes the session from, or an address the mesh's gossip gives
//! for that node) and under the node's mapped address; `Send` frames are
//! forwarded to the session registered for their destination as `Recv`
//! frames naming the sender's registered address.
//!
//! Admission is the mesh's mutual TLS (same CA, SPIFFE rules and
//! revocations as the overlay): no open relay. Limits are per pair of
//! sender and destination (packets and bytes per second, a token bucket
//! with one second of burst), so a flood from one node is cut at its limit
//! and other pairs keep their share; each session's outbound queue is
//! bounded and drops when full, as UDP would. Refusals are counted and, at
//! most once per pair every ten seconds, reported for the audit log.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustls::pki_types::CertificateDer;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};

use super::frame::{Decoder, Frame};
use super::{SessionRead, SessionWrite};
use crate::path::disco::Disco;
use crate::path::{canonical, lock, mapped_addr, Paths, Transport};
use crate::revoke::RevocationSet;

/// A session that sends nothing (not even its keepalive, every second) for
/// this long ends: its node is gone, and senders get `Unknown` at once.
const SESSION_IDLE: Duration = Duration::from_secs(4);
/// Frames queued towards one session before further ones are dropped.
const SESSION_QUEUE: usize = 4096;
/// Bytes queued towards one session before further frames are dropped.
const SESSION_QUEUE_BYTES: usize = 4 << 20;
/// Live sessions one node may hold at a relay.
const MAX_SESSIONS_PER_NODE: usize = 4;
/// Bound of each session's own tables (limits, refusals said).
const SESSION_TABLE: usize = 1024;
/// One dial-back per session per this interval.
const DIALBACK_EVERY: Duration = Duration::from_secs(2);
/// One audit event per (node, destination) per this interval.
const EVENT_EVERY: Duration = Duration::from_secs(10);

/// Per-pair forwarding limits.
#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    pub pair_packets_per_sec: u32,
    pub pair_bytes_per_sec: u64,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            pair_packets_per_sec: 20_000,
            pair_bytes_per_sec: 32 << 20,
        }
    }
}

/// Relay counters (`dmsc_relay_*`).
#[derive(Debug, Default)]
pub struct RelayStats {
    pub datagrams: AtomicU64,
    pub bytes: AtomicU64,
    pub refused_unknown: AtomicU64,
    pub refused_limit: AtomicU64,
    pub refused_claim: AtomicU64,
    /// TCP sessions refused at the TLS handshake (not a mesh node, revoked).
    pub refused_handshake: AtomicU64,
    pub refused_queue: AtomicU64,
    pub malformed: AtomicU64,
    pub sessions: AtomicU64,
    pub sessions_total: AtomicU64,
}

/// A refusal worth an audit entry.
#[derive(Debug, Clone)]
pub struct RelayEvent {
    /// The node whose frame was refused.
    pub peer: String,
    pub reason: String,
}

#[derive(Clone)]
struct Client {
    id: u64,
    name: Arc<str>,
    adv: SocketAddr,
    tx: mpsc::Sender<Bytes>,
    /// Bytes queued towards this session.
    queued: Arc<AtomicUsize>,
    close: Arc<Notify>,
    chain: Option<Arc<Vec<CertificateDer<'static>>>>,
}

impl Client {
    /// Queues a frame unless the session's queue is full (frames or bytes).
    fn offer(&self, frame: Bytes) -> bool {
        let len = frame.len();
        if self.queued.fetch_add(len, Ordering::Relaxed) + len > SESSION_QUEUE_BYTES {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            return false;
        }
        if self.tx.try_send(frame).is_err() {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            return false;
        }
        true
    }
}

/// Checks a node's claim to an advertised address (wired to gossip).
pub type ClaimCheck = Arc<dyn Fn(&str, SocketAddr) -> bool + Send + Sync>;

/// The relay of one node.
pub struct RelayServer {
    name: String,
    paths: Arc<Paths>,
    clients: Mutex<HashMap<SocketAddr, Client>>,
    limits: RelayLimits,
    pub stats: Arc<RelayStats>,
    events: mpsc::Sender<RelayEvent>,
    claim: Mutex<Option<ClaimCheck>>,
    next_id: AtomicU64,
    capturing: AtomicBool,
    capture: Mutex<Option<mpsc::UnboundedSender<Bytes>>>,
    /// This relay's own mapped address (datagrams for it are delivered here).
    own_mapped: SocketAddr,
    revoked: Arc<RevocationSet>,
    /// Live sessions per node name (registered or not).
    per_node: Mutex<HashMap<Arc<str>, usize>>,
    handshake_events: Mutex<HashMap<std::net::IpAddr, Instant>>,
}

impl std::fmt::Debug for RelayServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayServer")
            .field("name", &self.name)
            .field("limits", &self.limits)
            .finish()
    }
}

/// Token bucket for one pair.
#[derive(Debug)]
struct Bucket {
    packets: f64,
    bytes: f64,
    at: Instant,
}

impl Bucket {
    fn new(l: &RelayLimits) -> Bucket {
        Bucket {
            packets: l.pair_packets_per_sec as f64,
            bytes: l.pair_bytes_per_sec as f64,
            at: Instant::now(),
        }
    }

    fn take(&mut self, l: &RelayLimits, len: usize) -> bool {
        let now = Instant::now();
        let dt = now.duration_since(self.at).as_secs_f64();
        self.at = now;
        let (pmax, bmax) = (l.pair_packets_per_sec as f64, l.pair_bytes_per_sec as f64);
        self.packets = (self.packets + dt * pmax).min(pmax);
        self.bytes = (self.bytes + dt * bmax).min(bmax);
        if self.packets >= 1.0 && self.bytes >= len as f64 {
            self.packets -= 1.0;
            self.bytes -= len as f64;
            true
        } else {
            false
        }
    }
}

fn frame_bytes(f: &Frame) -> Option<Bytes> {
    f.to_bytes().ok()
}

impl RelayServer {
    pub(crate) fn new(
        name: &str,
        paths: Arc<Paths>,
        limits: RelayLimits,
        revoked: Arc<RevocationSet>,
    ) -> (Arc<RelayServer>, mpsc::Receiver<RelayEvent>) {
        let (events, rx) = mpsc::channel(256);
        let server = Arc::new(RelayServer {
            name: name.to_string(),
            paths: paths.clone(),
            clients: Mutex::new(HashMap::new()),
            limits,
            stats: Arc::new(RelayStats::default()),
            events,
            claim: Mutex::new(None),
            next_id: AtomicU64::new(1),
            capturing: AtomicBool::new(false),
            capture: Mutex::new(None),
            own_mapped: mapped_addr(name),
            revoked,
            per_node: Mutex::new(HashMap::new()),
            handshake_events: Mutex::new(HashMap::new()),
        });
        paths.set_local_relay(&server);
        (server, rx)
    }

    /// A copy of every datagram payload this relay forwards from now on:
    /// what tests (and an operator in doubt) inspect to see that a relay
    /// handles only ciphertext.
    pub fn capture(&self) -> mpsc::UnboundedReceiver<Bytes> {
        let (tx, rx) = mpsc::unbounded_channel();
        *lock(&self.capture) = Some(tx);
        self.capturing.store(true, Ordering::Release);
        rx
    }

    fn captured(&self, payload: &Bytes) {
        if !self.capturing.load(Ordering::Acquire) {
            return;
        }
        if let Some(c) = lock(&self.capture).as_ref() {
            let _ = c.send(payload.clone());
        }
    }

    /// A TCP session refused at the TLS handshake (no mesh certificate, a
    /// revoked one): counted, and reported for the audit log at most once
    /// per source address every ten seconds.
    pub(crate) fn refused_handshake(&self, from: SocketAddr, why: &str) {
        self.stats.refused_handshake.fetch_add(1, Ordering::Relaxed);
        let mut last = lock(&self.handshake_events);
        if last.len() > 4096 {
            last.retain(|_, t| t.elapsed() < EVENT_EVERY);
        }
        let due = last
            .get(&from.ip())
            .is_none_or(|t| t.elapsed() >= EVENT_EVERY);
        if due {
            last.insert(from.ip(), Instant::now());
            let _ = self.events.try_send(RelayEvent {
                peer: from.to_string(),
                reason: format!("relay session refused at the TLS handshake: {why}"),
            });
        }
    }

    /// Installs the check of advertised addresses against gossip.
    pub fn set_claim_check(&self, check: ClaimCheck) {
        *lock(&self.claim) = Some(check);
    }

    /// True if a session answers for `dst`.
    pub fn knows(&self, dst: SocketAddr) -> bool {
        lock(&self.clients).contains_key(&canonical(dst))
    }

    /// The node names with a live session.
    pub fn client_names(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.clients)
            .values()
            .map(|c| c.name.to_string())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// A datagram this node's own endpoint sends to a session's node.
    pub(crate) fn deliver_local(&self, dst: SocketAddr, payload: Bytes) -> bool {
        let target = lock(&self.clients).get(&canonical(dst)).cloned();
        let Some(target) = target else { return false };
        self.captured(&payload);
        let len = payload.len();
        let Some(f) = frame_bytes(&Frame::Recv {
            src: self.paths.me(),
            payload,
        }) else {
            return false;
        };
        let ok = target.offer(f);
        if ok {
            self.stats.datagrams.fetch_add(1, Ordering::Relaxed);
            self.stats.bytes.fetch_add(len as u64, Ordering::Relaxed);
        } else {
            self.stats.refused_queue.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Ends the sessions (TCP ones; QUIC ones end with their connection)
    /// of nodes whose chain holds a revoked certificate.
    pub fn close_revoked(&self, revoked: &RevocationSet) -> Vec<String> {
        let mut closed = Vec::new();
        for c in lock(&self.clients).values() {
            if let Some(chain) = &c.chain {
                if revoked.revoked_in(chain.iter()).is_some() {
                    c.close.notify_one();
                    closed.push(c.name.to_string());
                }
            }
        }
        closed.sort();
        closed.dedup();
        closed
    }

    fn event(&self, last: &mut HashMap<String, Instant>, peer: &str, key: String, reason: String) {
        let due = last.get(&key).is_none_or(|t| t.elapsed() >= EVENT_EVERY);
        if due {
            last.insert(key, Instant::now());
            let _ = self.events.try_send(RelayEvent {
                peer: peer.to_string(),
                reason,
            });
        }
    }

    /// Serves one session until it ends. `observed`: the UDP address the
    /// session comes from (QUIC sessions); `chain`: the peer's certificate
    /// chain (TCP sessions, for revocation).
    pub async fn serve(
        self: Arc<Self>,
        (mut rd, wr): (SessionRead, SessionWrite),
        peer: Arc<str>,
        observed: Option<SocketAddr>,
        transport: Transport,
        chain: Option<Vec<CertificateDer<'static>>>,
    ) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let observed = observed.map(canonical);
        {
            let mut per = lock(&self.per_node);
            let n = per.entry(peer.clone()).or_insert(0);
            if *n >= MAX_SESSIONS_PER_NODE {
                drop(per);
                self.stats.refused_limit.fetch_add(1, Ordering::Relaxed);
                debug!(peer = %peer, "refusing a relay session: this node holds {MAX_SESSIONS_PER_NODE} already");
                return;
            }
            *n += 1;
        }
        let (tx, rx) = mpsc::channel::<Bytes>(SESSION_QUEUE);
        let queued = Arc::new(AtomicUsize::new(0));
        let close = Arc::new(Notify::new());
        let token: [u8; 16] = rand::random();
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        self.stats.sessions_total.fetch_add(1, Ordering::Relaxed);
        let writer = super::spawn_writer(wr, rx, Some(queued.clone()));
        let chain = chain.map(Arc::new);
        let me = Client {
            id,
            name: peer.clone(),
            adv: self.own_mapped,
            tx: tx.clone(),
            queued,
            close: close.clone(),
            chain: chain.clone(),
        };
        let say = |f: Frame| {
            if let Some(b) = frame_bytes(&f) {
                me.offer(b);
            }
        };
        let mut dec = Decoder::new();
        let mut buf = vec![0u8; 32 * 1024];
        let mut adv: Option<SocketAddr> = None;
        let mut greeted = false;
        let mut buckets: HashMap<u64, Bucket> = HashMap::new();
        let mut unknown_said: HashMap<SocketAddr, Instant> = HashMap::new();
        let mut events: HashMap<String, Instant> = HashMap::new();
        let mut last_dialback: Option<Instant> = None;
        let why: String = 'session: loop {
            let n = tokio::select! {
                _ = close.notified() => break 'session "certificate revoked".into(),
                r = tokio::time::timeout(SESSION_IDLE, rd.read(&mut buf)) => match r {
                    Ok(Ok(0)) => break 'session "closed by the node".into(),
                    Ok(Ok(n)) => n,
                    Ok(Err(e)) => break 'session format!("read error: {e}"),
                    Err(_) => break 'session "idle".into(),
                },
            };
            dec.push(&buf[..n]);
            loop {
                let f = match dec.next_frame() {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                        warn!(peer = %peer, error = %e, "malformed relay frame; closing this session");
                        say(Frame::Refused {
                            reason: e.to_string(),
                        });
                        break 'session format!("malformed frame: {e}");
                    }
                };
                if !greeted && !matches!(f, Frame::Hello { .. }) {
                    say(Frame::Refused {
                        reason: "the first frame must be Hello".into(),
                    });
                    break 'session "a frame before Hello".into();
                }
                match f {
                    // An unspecified address: a probe (`netcheck`) that
                    // measures the relay and must not take over the
                    // node's registration.
                    Frame::Hello { advertised } if advertised.ip().is_unspecified() => {
                        if !greeted {
                            greeted = true;
                            lock(&self.paths.st).welcome_tokens.insert(token);
                            say(Frame::Welcome { observed, token });
                        }
                    }
                    // Unchanged: nothing to do (a Hello flood costs nothing).
                    Frame::Hello { advertised } if adv == Some(canonical(advertised)) => {}
                    Frame::Hello { advertised } => {
                        let a = canonical(advertised);
                        let claim = lock(&self.claim).clone();
                        let ok = a == mapped_addr(&peer)
                            || Some(a) == observed
                            || claim.is_some_and(|c| c(&peer, a));
                        if !ok {
                            // Keep the session under the node's mapped
                            // address only; say why once in a while.
                            self.stats.refused_claim.fetch_add(1, Ordering::Relaxed);
                            let reason = format!("node `{peer}` claims overlay address {a}, which is neither its mapped address, nor the address this relay sees, nor the one gossip gives for it: registered under its mapped address only");
                            warn!(peer = %peer, claimed = %a, "relay claim refused");
                            self.event(&mut events, &peer, "claim".into(), reason);
                        }
                        let key = if ok { a } else { mapped_addr(&peer) };
                        match self.register(&me, key, &chain) {
                            Ok(()) => {}
                            Err(why) => {
                                say(Frame::Refused {
                                    reason: why.clone(),
                                });
                                break 'session why;
                            }
                        }
                        adv = Some(key);
                        if !greeted {
                            greeted = true;
                            lock(&self.paths.st).welcome_tokens.insert(token);
                            say(Frame::Welcome { observed, token });
                        }
                    }
                    Frame::Send { dst, payload } => {
                        let Some(src) = adv else {
                            break 'session "datagram from a probe session".into();
                        };
                        let dst = canonical(dst);
                        let len = payload.len();
                        if dst == self.paths.me() || dst == self.own_mapped {
                            self.captured(&payload);
                            self.paths.on_relayed(src, payload);
                            self.stats.datagrams.fetch_add(1, Ordering::Relaxed);
                            self.stats.bytes.fetch_add(len as u64, Ordering::Relaxed);
                            continue;
                        }
                        let target = lock(&self.clients).get(&dst).cloned();
                        let Some(t) = target else {
                            self.stats.refused_unknown.fetch_add(1, Ordering::Relaxed);
                            if unknown_said.len() > SESSION_TABLE {
                                unknown_said.clear();
                            }
                            let due = unknown_said
                                .get(&dst)
                                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
                            if due {
                                unknown_said.insert(dst, Instant::now());
                                say(Frame::Unknown { dst });
                                self.event(&mut events, &peer, "unknown".into(), format!("no mesh node with a session here is known as {dst}: not forwarded"));
                            }
                            continue;
                        };
                        // One bucket per destination node, whatever address
                        // names it.
                        if buckets.len() > SESSION_TABLE {
                            buckets.clear();
                        }
                        let bucket = buckets
                            .entry(t.id)
                            .or_insert_with(|| Bucket::new(&self.limits));
                        if !bucket.take(&self.limits, len) {
                            self.stats.refused_limit.fetch_add(1, Ordering::Relaxed);
                            self.event(
                                &mut events,
                                &peer,
                                format!("limit {}", t.name),
                                format!("per-pair relay limit reached towards node `{}`", t.name),
                            );
                            continue;
                        }
                        self.captured(&payload);
                        let sent =
                            frame_bytes(&Frame::Recv { src, payload }).is_some_and(|f| t.offer(f));
                        if sent {
                            self.stats.datagrams.fetch_add(1, Ordering::Relaxed);
                            self.stats.bytes.fetch_add(len as u64, Ordering::Relaxed);
                        } else {
                            self.stats.refused_queue.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Frame::Ping { nonce } => say(Frame::Pong { nonce }),
                    Frame::DialBack { nonce } => {
                        let due = last_dialback.is_none_or(|t| t.elapsed() >= DIALBACK_EVERY);
                        if let (Some(to), true) = (observed, due) {
                            last_dialback = Some(Instant::now());
                            tokio::spawn(dial_back(to, nonce));
                        }
                    }
                    Frame::Pong { .. } => {}
                    other => {
                        debug!(peer = %peer, frame = ?other, "ignoring a relay-to-node frame sent by a node");
                    }
                }
            }
        };
        self.unregister(id);
        lock(&self.paths.st).welcome_tokens.remove(&token);
        {
            let mut per = lock(&self.per_node);
            if let Some(n) = per.get_mut(&peer) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    per.remove(&peer);
                }
            }
        }
        self.stats.sessions.fetch_sub(1, Ordering::Relaxed);
        drop(me);
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
        info!(peer = %peer, transport = transport.as_str(), reason = %why, "relay session ended");
    }

    /// Registers `me` under `adv` and its node's mapped address. Refused
    /// for a revoked chain, and never over another node's keys.
    fn register(
        &self,
        me: &Client,
        adv: SocketAddr,
        chain: &Option<Arc<Vec<CertificateDer<'static>>>>,
    ) -> Result<(), String> {
        if let Some(r) = chain
            .as_ref()
            .and_then(|c| self.revoked.revoked_in(c.iter()))
        {
            return Err(format!("certificate {} is revoked", r.serial));
        }
        let client = Client { adv, ..me.clone() };
        let mut clients = lock(&self.clients);
        let keys = [adv, mapped_addr(&me.name)];
        if let Some(other) = keys
            .iter()
            .filter_map(|k| clients.get(k))
            .find(|c| c.name != me.name)
        {
            return Err(format!(
                "address {adv} is registered by node `{}`",
                other.name
            ));
        }
        // A re-Hello (new advertised address) replaces this session's keys.
        clients.retain(|_, c| c.id != me.id);
        let fresh = !clients.values().any(|c| c.name == me.name);
        for key in keys {
            clients.insert(key, client.clone());
        }
        drop(clients);
        if fresh {
            info!(peer = %me.name, advertised = %adv, "relay session registered");
        }
        Ok(())
    }

    fn unregister(&self, id: u64) {
        lock(&self.clients).retain(|_, c| c.id != id);
    }

    /// Registered advertised address of each node, for `status`.
    pub fn sessions(&self) -> Vec<(String, SocketAddr)> {
        let mut v: Vec<(String, SocketAddr)> = lock(&self.clients)
            .values()
            .map(|c| (c.name.to_string(), c.adv))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Sends a dial-back probe to `to` from a fresh socket the node never sent
/// to: only a node reachable from anywhere receives it.
async fn dial_back(to: SocketAddr, nonce: [u8; 16]) {
    let bind: SocketAddr = if to.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let Ok(sock) = UdpSocket::bind(bind) else {
        return;
    };
    let msg = Disco::DialBack { nonce }.to_bytes();
    for _ in 0..3 {
        let _ = sock.send_to(&msg, to);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    struct Peer {
        io: DuplexStream,
        dec: Decoder,
    }

    impl Peer {
        async fn send(&mut self, f: Frame) {
            let b = f.to_bytes().expect("encode");
            self.io.write_all(&b).await.expect("write");
        }

        /// The next frame, or `None` if the session closed or went quiet.
        async fn next(&mut self) -> Option<Frame> {
            let mut buf = [0u8; 4096];
            loop {
                if let Ok(Some(f)) = self.dec.next_frame() {
                    return Some(f);
                }
                let n = tokio::time::timeout(Duration::from_secs(2), self.io.read(&mut buf))
                    .await
                    .ok()?
                    .ok()?;
                if n == 0 {
                    return None;
                }
                self.dec.push(&buf[..n]);
            }
        }
    }

    /// A session of node `name` on `server`, nothing said yet.
    fn open(server: &Arc<RelayServer>, name: &str) -> Peer {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let (rd, wr) = tokio::io::split(theirs);
        tokio::spawn(server.clone().serve(
            (Box::new(rd), Box::new(wr)),
            name.into(),
            None,
            Transport::Tcp,
            None,
        ));
        Peer {
            io: ours,
            dec: Decoder::new(),
        }
    }

    /// A session of node `name` on `server`, said hello with its mapped
    /// address and welcomed.
    async fn join(server: &Arc<RelayServer>, name: &str) -> Peer {
        let mut p = open(server, name);
        p.send(Frame::Hello {
            advertised: mapped_addr(name),
        })
        .await;
        assert!(matches!(p.next().await, Some(Frame::Welcome { .. })));
        p
    }

    fn server(limits: RelayLimits) -> (Arc<RelayServer>, mpsc::Receiver<RelayEvent>) {
        let (paths, _rx) = Paths::new("relay", true);
        RelayServer::new("relay", paths, limits, Arc::default())
    }

    fn dgram(i: u32) -> Bytes {
        Bytes::from(format!("datagram {i}").into_bytes())
    }

    #[tokio::test]
    async fn datagrams_go_to_the_named_node_with_the_senders_address() {
        let (s, _ev) = server(RelayLimits::default());
        let mut a = join(&s, "a").await;
        let mut b = join(&s, "b").await;
        a.send(Frame::Send {
            dst: mapped_addr("b"),
            payload: dgram(1),
        })
        .await;
        assert_eq!(
            b.next().await,
            Some(Frame::Recv {
                src: mapped_addr("a"),
                payload: dgram(1)
            })
        );
    }

    #[tokio::test]
    async fn a_malformed_frame_closes_only_that_session() {
        let (s, _ev) = server(RelayLimits::default());
        let mut a = join(&s, "a").await;
        let mut b = join(&s, "b").await;
        let mut bad = join(&s, "bad").await;
        bad.io.write_all(&[0xee, 0, 1, 0]).await.expect("write");
        assert!(matches!(bad.next().await, Some(Frame::Refused { .. })));
        assert_eq!(bad.next().await, None, "the bad session is closed");
        assert!(!s.knows(mapped_addr("bad")));
        assert_eq!(s.stats.malformed.load(Ordering::Relaxed), 1);
        a.send(Frame::Send {
            dst: mapped_addr("b"),
            payload: dgram(2),
        })
        .await;
        assert!(
            matches!(b.next().await, Some(Frame::Recv { .. })),
            "others unaffected"
        );
    }

    #[tokio::test]
    async fn a_claim_to_another_address_is_refused_and_reported() {
        let (s, mut ev) = server(RelayLimits::default());
        let _victim = join(&s, "victim").await;
        let mut m = open(&s, "mallory");
        let elsewhere: SocketAddr = "198.51.100.1:7400".parse().expect("addr");
        m.send(Frame::Hello {
            advertised: elsewhere,
        })
        .await;
        assert!(matches!(m.next().await, Some(Frame::Welcome { .. })));
        assert!(!s.knows(elsewhere), "the claim is not registered");
        assert!(
            s.knows(mapped_addr("mallory")),
            "only its own mapped address"
        );
        assert_eq!(ev.recv().await.expect("event").peer, "mallory");
        // Nor can it take the victim's mapped address.
        m.send(Frame::Hello {
            advertised: mapped_addr("victim"),
        })
        .await;
        for _ in 0..200 {
            if s.stats.refused_claim.load(Ordering::Relaxed) == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(s.stats.refused_claim.load(Ordering::Relaxed), 2);
        assert!(s
            .sessions()
            .iter()
            .any(|(n, a)| n == "victim" && *a == mapped_addr("victim")));
        assert!(!s
            .sessions()
            .iter()
            .any(|(n, a)| n == "mallory" && *a == mapped_addr("victim")));
    }

    #[tokio::test]
    async fn a_session_must_say_hello_first() {
        let (s, _ev) = server(RelayLimits::default());
        let mut p = open(&s, "early");
        p.send(Frame::DialBack { nonce: [1; 16] }).await;
        assert!(matches!(p.next().await, Some(Frame::Refused { .. })));
        assert_eq!(p.next().await, None);
    }

    #[tokio::test]
    async fn unknown_destinations_are_refused_not_forwarded() {
        let (s, mut ev) = server(RelayLimits::default());
        let mut a = join(&s, "a").await;
        let nobody: SocketAddr = "203.0.113.9:7400".parse().expect("addr");
        a.send(Frame::Send {
            dst: nobody,
            payload: dgram(3),
        })
        .await;
        assert_eq!(a.next().await, Some(Frame::Unknown { dst: nobody }));
        assert_eq!(s.stats.refused_unknown.load(Ordering::Relaxed), 1);
        assert!(ev.recv().await.is_some(), "reported for the audit log");
    }

    #[tokio::test]
    async fn a_flood_hits_its_pair_limit_and_other_pairs_keep_flowing() {
        let limits = RelayLimits {
            pair_packets_per_sec: 100,
            pair_bytes_per_sec: 1 << 20,
        };
        let (s, _ev) = server(limits);
        let mut flood = join(&s, "flood").await;
        let mut calm = join(&s, "calm").await;
        let mut b = join(&s, "b").await;
        for i in 0..1000 {
            flood
                .send(Frame::Send {
                    dst: mapped_addr("b"),
                    payload: dgram(i),
                })
                .await;
        }
        calm.send(Frame::Send {
            dst: mapped_addr("b"),
            payload: Bytes::from_static(b"calm"),
        })
        .await;
        let mut from_flood = 0;
        let mut calm_seen = false;
        while let Some(f) = b.next().await {
            match f {
                Frame::Recv { src, payload } if src == mapped_addr("calm") => {
                    assert_eq!(&payload[..], b"calm");
                    calm_seen = true;
                    break;
                }
                Frame::Recv { .. } => from_flood += 1,
                _ => {}
            }
        }
        assert!(calm_seen, "the calm pair got through");
        assert!(
            from_flood <= 150,
            "{from_flood} of 1000 flood datagrams forwarded with a 100/s pair limit"
        );
        assert!(s.stats.refused_limit.load(Ordering::Relaxed) >= 850);
    }
}
