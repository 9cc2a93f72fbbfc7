//! Which way each overlay packet goes: directly over UDP, or wrapped in a
//! relay session. The design is iroh's magicsock and Tailscale's DERP: the
//! overlay's QUIC endpoint runs on a [`PathSocket`] instead of a plain UDP
//! socket, and the socket picks the path per destination, so one QUIC +
//! mutual TLS 1.3 connection per pair of nodes runs unchanged over a direct
//! path, a relay, or first one then the other (a path change under QUIC,
//! never a new connection), and a relay only ever moves QUIC ciphertext.
//!
//! Addresses. Peers stay addressed by a `SocketAddr`, as gossip wants. A
//! node that is not reachable directly advertises a *mapped* address,
//! [`mapped_addr`] of its name, in 240.0.0.0/4 (reserved, never routed);
//! packets to it go through a relay, and packets from it arrive from that
//! address whichever path they took. A directly reachable node advertises
//! its real address, as before.
//!
//! Routing rules ([`Paths::route`]), in order:
//! 1. a destination with a confirmed direct path (found by disco, see
//!    [`disco`]) gets it, unless this node's UDP is blocked;
//! 2. a relay's own address is sent to directly (the relay sessions ride on
//!    that connection), unless UDP is blocked;
//! 3. mapped addresses, and every destination while this node is relayed or
//!    its UDP is blocked, go through a relay session: one of the relays the
//!    destination advertises, else any; a relay that says it does not know
//!    the destination is not asked again for a while;
//! 4. everything else goes directly, as it always did.
//!
//! With no relay configured or known and no relay role, the socket is
//! inactive and every packet takes the plain UDP path after one atomic load.

pub mod disco;
mod engine;
mod socket;
mod udp;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Waker;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

pub(crate) use engine::spawn_engine;
pub use socket::{Impair, PathSocket};
pub(crate) use udp::UdpSocket as OverlayUdp;

use crate::relay::frame::Frame;
use crate::relay::server::RelayServer;

/// A relayed destination a relay said it does not know is not routed
/// through that relay again for this long.
const UNKNOWN_HOLD: Duration = Duration::from_secs(5);
/// Relayed datagrams waiting for the QUIC endpoint to read them.
const RELAYED_QUEUE: usize = 4096;
/// Bound of the direct-source -> peer table.
pub(crate) const MAX_BY_DIRECT: usize = 4096;
/// A UDP probe answered this recently means UDP gets out.
const UDP_FRESH: Duration = Duration::from_secs(15);
/// After a QUIC session attempt failed while probes got through, UDP is
/// not trusted again for a while (small probes pass, QUIC does not): this
/// long after the first failure, doubling with each further one in a row
/// up to [`QUIC_DISTRUST_MAX`]; a QUIC session that opens ends it. A relay
/// that restarts fails one attempt and costs only the first wait, a path
/// that passes probes but never QUIC soon waits the longest.
const QUIC_DISTRUST_FIRST: Duration = Duration::from_secs(5);
const QUIC_DISTRUST_MAX: Duration = Duration::from_secs(60);

/// Where the path layer gets the disco key of a pair: from the pair's QUIC
/// connection (the overlay installs it).
pub type KeySource = Arc<dyn Fn(SocketAddr) -> Option<disco::PairKey> + Send + Sync>;

/// The address that stands for node `name` when it is reached through a
/// relay: 240.0.0.0/4 plus 28 bits of a hash of the name, and a port from
/// the same hash. Stable, computed the same way on every node.
pub fn mapped_addr(name: &str) -> SocketAddr {
    let d = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
    let b = d.as_ref();
    let ip = Ipv4Addr::new(240 | (b[0] & 0x0f), b[1], b[2], b[3]);
    let port = u16::from_be_bytes([b[4], b[5]]).max(1);
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// True for addresses in the mapped range.
pub fn is_mapped(addr: SocketAddr) -> bool {
    match canonical(addr).ip() {
        IpAddr::V4(ip) => ip.octets()[0] & 0xf0 == 240,
        IpAddr::V6(_) => false,
    }
}

/// IPv4-mapped IPv6 addresses as plain IPv4 (a dual-stack socket reports
/// IPv4 peers in the mapped form).
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// How a relay session is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A bidirectional stream on the overlay's QUIC connection to the relay.
    Quic,
    /// TCP + TLS 1.3 to the relay (UDP does not get through).
    Tcp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        }
    }
}

/// One live relay session, as the socket uses it.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: u64,
    /// The relay's node name, from its verified certificate.
    pub relay: Arc<str>,
    /// The relay's overlay address.
    pub relay_addr: SocketAddr,
    pub transport: Transport,
    /// This node's address as the relay sees it (QUIC sessions).
    pub observed: Option<SocketAddr>,
    /// The token UDP probes to this relay carry.
    pub token: [u8; 16],
    pub since: Instant,
    pub(crate) rtt_us: Arc<AtomicU64>,
    pub(crate) tx: mpsc::Sender<Bytes>,
    /// Ends the session (the relay's certificate was revoked).
    pub(crate) close: Arc<tokio::sync::Notify>,
    /// The relay's certificate chain (TCP sessions; QUIC ones end with
    /// their overlay connection).
    pub(crate) chain: Option<Arc<Vec<rustls::pki_types::CertificateDer<'static>>>>,
}

impl Session {
    pub fn rtt(&self) -> Option<Duration> {
        match self.rtt_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }
}

/// A confirmed direct path to a peer that is otherwise relayed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Direct {
    pub addr: SocketAddr,
    pub last_pong: Instant,
    pub rtt: Duration,
}

/// The path a packet to some destination takes now.
#[derive(Debug, Clone)]
pub(crate) enum Route {
    Direct(SocketAddr),
    Session(Session),
    Local(Arc<RelayServer>),
    Drop,
}

/// How a peer connection's packets travel, for `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// `direct` or `relayed`.
    pub path: &'static str,
    /// The relay, when relayed.
    pub via: Option<String>,
    /// `quic` (UDP) or `tcp`.
    pub transport: &'static str,
    /// Why a relayed peer is not direct, when known.
    pub note: Option<String>,
}

/// Whether this node can be dialed directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reachability {
    /// Find out: ask a relay to dial back the address it sees.
    #[default]
    Auto,
    Direct,
    Relayed,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    /// This node's advertised overlay address.
    pub me: Option<SocketAddr>,
    pub relayed_mode: bool,
    /// Why this node is reachable as it is (the start-up decision).
    pub decided: Option<String>,
    pub udp_blocked: bool,
    /// Overlay addresses of relays (sent to directly).
    pub relay_addrs: HashSet<SocketAddr>,
    pub sessions: Vec<Session>,
    /// Confirmed direct paths, by the peer's advertised address.
    pub direct: HashMap<SocketAddr, Direct>,
    /// Source address of direct packets -> the peer's advertised address.
    pub by_direct: HashMap<SocketAddr, SocketAddr>,
    /// The relays each peer says it is reachable through (from gossip).
    pub via: HashMap<SocketAddr, Vec<Arc<str>>>,
    /// (destination, session id) a relay refused, and when.
    pub unknown: HashMap<(SocketAddr, u64), Instant>,
    /// Destinations recently sent through a relay (candidates for a direct
    /// path upgrade).
    pub relayed_recent: HashMap<SocketAddr, Instant>,
    /// Peers whose direct probes went unanswered: why they stay relayed.
    pub notes: HashMap<SocketAddr, String>,
    /// Tokens of this node's relay sessions with clients (relay role).
    pub welcome_tokens: HashSet<[u8; 16]>,
    /// Our address as each relay saw our UDP probes (relay addr -> ours).
    pub observed: HashMap<SocketAddr, SocketAddr>,
    /// When a UDP probe to a relay was last answered.
    pub udp_ok_at: Option<Instant>,
    /// The dial-back nonce `establish` waits for, and whether it came.
    pub pending_dialback: Option<[u8; 16]>,
    pub dialback_seen: bool,
    /// When a QUIC relay session last failed to open although UDP probes
    /// were answered.
    pub quic_failed_at: Option<Instant>,
    /// QUIC session attempts failed in a row while probes got through.
    pub quic_failures: u32,
    pub next_session: u64,
}

/// Counters of the path layer.
#[derive(Debug, Default)]
pub struct PathStats {
    pub relayed_sent: AtomicU64,
    pub relayed_received: AtomicU64,
    pub relayed_dropped: AtomicU64,
    pub direct_upgrades: AtomicU64,
    pub direct_lost: AtomicU64,
    pub impaired_dropped: AtomicU64,
}

/// The engine's inputs: direct disco packets, disco inside relay sessions.
pub(crate) type DiscoQueues = (mpsc::Receiver<DiscoIn>, mpsc::Receiver<DiscoIn>);

/// What arrives for the disco engine.
#[derive(Debug)]
pub(crate) enum DiscoIn {
    /// A disco packet straight off the UDP socket.
    Direct { from: SocketAddr, bytes: Bytes },
    /// A disco packet inside a relay session, from the node at `src`.
    Relayed { src: SocketAddr, bytes: Bytes },
}

/// The state the socket, the relay sessions and the disco engine share.
pub struct Paths {
    pub(crate) name: String,
    /// False until relays or the relay role exist: then every packet goes
    /// straight to the UDP socket.
    active: AtomicBool,
    pub(crate) st: Mutex<State>,
    relayed_in: Mutex<VecDeque<(SocketAddr, Bytes)>>,
    recv_waker: Mutex<Option<Waker>>,
    pub(crate) disco_tx: mpsc::Sender<DiscoIn>,
    /// Disco inside relay sessions: its own queue, so a flood of junk UDP
    /// cannot crowd out call-me-maybes.
    relayed_disco_tx: mpsc::Sender<DiscoIn>,
    keys: Mutex<Option<KeySource>>,
    pub(crate) local_relay: Mutex<Option<Weak<RelayServer>>>,
    pub stats: PathStats,
    /// Set by the socket once bound: sends disco packets directly.
    pub(crate) direct_out: Mutex<Option<Weak<socket::Inner>>>,
    /// Hole punching on (`overlay.direct_upgrade`).
    pub(crate) upgrade: bool,
}

impl std::fmt::Debug for Paths {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Paths")
            .field("name", &self.name)
            .field("active", &self.is_active())
            .finish()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Paths {
    pub(crate) fn new(name: &str, upgrade: bool) -> (Arc<Paths>, DiscoQueues) {
        let (disco_tx, rx) = mpsc::channel(1024);
        let (relayed_disco_tx, relayed_rx) = mpsc::channel(1024);
        let paths = Paths {
            name: name.to_string(),
            active: AtomicBool::new(false),
            st: Mutex::new(State {
                me: Some(mapped_addr(name)),
                ..State::default()
            }),
            relayed_in: Mutex::new(VecDeque::new()),
            recv_waker: Mutex::new(None),
            disco_tx,
            relayed_disco_tx,
            keys: Mutex::new(None),
            local_relay: Mutex::new(None),
            stats: PathStats::default(),
            direct_out: Mutex::new(None),
            upgrade,
        };
        (Arc::new(paths), (rx, relayed_rx))
    }

    pub(crate) fn set_key_source(&self, keys: KeySource) {
        *lock(&self.keys) = Some(keys);
    }

    /// The disco key shared with the peer at `adv`, while a connection is up.
    pub(crate) fn pair_key(&self, adv: SocketAddr) -> Option<disco::PairKey> {
        let keys = lock(&self.keys).clone()?;
        keys(adv)
    }

    pub(crate) fn expect_dial_back(&self, nonce: [u8; 16]) {
        let mut st = lock(&self.st);
        st.pending_dialback = Some(nonce);
        st.dialback_seen = false;
    }

    pub(crate) fn note_dial_back(&self, nonce: [u8; 16]) {
        let mut st = lock(&self.st);
        if st.pending_dialback == Some(nonce) {
            st.dialback_seen = true;
        }
    }

    pub(crate) fn dial_back_seen(&self) -> bool {
        lock(&self.st).dialback_seen
    }

    /// A QUIC relay session could not be opened. Only a failure while UDP
    /// probes get answered (small packets pass, QUIC does not) makes UDP
    /// untrusted for a while; one while UDP is blocked says nothing new.
    pub(crate) fn note_quic_failed(&self) {
        let mut st = lock(&self.st);
        if st.udp_ok_at.is_some_and(|t| t.elapsed() < UDP_FRESH) {
            st.quic_failed_at = Some(Instant::now());
            st.quic_failures = st.quic_failures.saturating_add(1);
        }
        Self::recompute_udp(&mut st);
    }

    /// A QUIC session to a relay opened: UDP is trusted again at once.
    pub(crate) fn note_quic_ok(&self) {
        let mut st = lock(&self.st);
        st.quic_failed_at = None;
        st.quic_failures = 0;
        Self::recompute_udp(&mut st);
    }

    /// How long UDP stays distrusted after the last failed QUIC attempt.
    fn quic_distrust(failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(8);
        (QUIC_DISTRUST_FIRST * 2u32.pow(doublings)).min(QUIC_DISTRUST_MAX)
    }

    /// Re-evaluates the time-based part of "UDP is blocked" (the engine
    /// calls it every tick).
    pub(crate) fn refresh_udp(&self) {
        Self::recompute_udp(&mut lock(&self.st));
    }

    /// UDP probes get answered and QUIC has not failed since: worth moving
    /// TCP sessions back to QUIC.
    pub(crate) fn udp_usable(&self) -> bool {
        Self::udp_fresh(&lock(&self.st))
    }

    fn udp_fresh(st: &State) -> bool {
        st.udp_ok_at.is_some_and(|t| t.elapsed() < UDP_FRESH)
            && st
                .quic_failed_at
                .is_none_or(|f| f.elapsed() >= Self::quic_distrust(st.quic_failures))
    }

    pub(crate) fn activate(&self) {
        self.active.store(true, Ordering::Release);
    }

    pub(crate) fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// This node's advertised overlay address.
    pub fn me(&self) -> SocketAddr {
        lock(&self.st).me.unwrap_or_else(|| mapped_addr(&self.name))
    }

    /// Makes relay sessions probes that never register this endpoint for
    /// delivery (`netcheck` beside a running node with the same name).
    pub fn set_probe_only(&self) {
        self.set_me(SocketAddr::from(([0, 0, 0, 0], 0)), false);
    }

    /// Sets the advertised address; live relay sessions announce it at once.
    pub(crate) fn set_me(&self, me: SocketAddr, relayed: bool) {
        let mut st = lock(&self.st);
        st.me = Some(me);
        st.relayed_mode = relayed;
        if let Ok(hello) = (Frame::Hello { advertised: me }).to_bytes() {
            for s in &st.sessions {
                let _ = s.tx.try_send(hello.clone());
            }
        }
    }

    pub fn relayed_mode(&self) -> bool {
        lock(&self.st).relayed_mode
    }

    /// Why this node is reachable directly or through relays: the reason
    /// of the decision taken when the overlay started (`status`).
    pub fn decided(&self) -> Option<String> {
        lock(&self.st).decided.clone()
    }

    pub(crate) fn set_decided(&self, why: &str) {
        lock(&self.st).decided = Some(why.to_string());
    }

    pub fn udp_blocked(&self) -> bool {
        lock(&self.st).udp_blocked
    }

    pub(crate) fn is_relay_addr(&self, addr: SocketAddr) -> bool {
        lock(&self.st).relay_addrs.contains(&canonical(addr))
    }

    pub(crate) fn add_relay_addr(&self, addr: SocketAddr) {
        lock(&self.st).relay_addrs.insert(canonical(addr));
    }

    /// The live relay sessions.
    pub fn sessions(&self) -> Vec<Session> {
        lock(&self.st).sessions.clone()
    }

    pub(crate) fn add_session(&self, mut s: Session) -> u64 {
        let mut st = lock(&self.st);
        st.next_session += 1;
        s.id = st.next_session;
        st.sessions.push(s);
        Self::recompute_udp(&mut st);
        st.next_session
    }

    pub(crate) fn remove_session(&self, id: u64) {
        let mut st = lock(&self.st);
        st.sessions.retain(|s| s.id != id);
        st.unknown.retain(|(_, sid), _| *sid != id);
        Self::recompute_udp(&mut st);
    }

    /// UDP counts as blocked when the only sessions are over TCP and UDP
    /// is not known to work (no fresh probe answer, or QUIC failed since).
    fn recompute_udp(st: &mut State) {
        let quic = st.sessions.iter().any(|s| s.transport == Transport::Quic);
        let tcp = st.sessions.iter().any(|s| s.transport == Transport::Tcp);
        st.udp_blocked = tcp && !quic && !Self::udp_fresh(st);
    }

    pub(crate) fn note_udp_ok(&self, relay: SocketAddr, observed: SocketAddr) {
        let mut st = lock(&self.st);
        st.udp_ok_at = Some(Instant::now());
        st.observed.insert(relay, observed);
        Self::recompute_udp(&mut st);
    }

    /// Ends live sessions to relays whose certificate chain holds a revoked
    /// certificate; returns the relays.
    pub(crate) fn close_revoked(&self, revoked: &crate::RevocationSet) -> Vec<String> {
        let st = lock(&self.st);
        let mut out = Vec::new();
        for s in &st.sessions {
            if let Some(chain) = &s.chain {
                if revoked.revoked_in(chain.iter()).is_some() {
                    s.close.notify_one();
                    out.push(s.relay.to_string());
                }
            }
        }
        out
    }

    /// True if a UDP probe to a relay was answered in the last `within`.
    pub fn udp_answered_within(&self, within: Duration) -> bool {
        lock(&self.st)
            .udp_ok_at
            .is_some_and(|t| t.elapsed() < within)
    }

    /// This node's addresses as relays saw them (sessions and UDP probes).
    pub fn observed(&self) -> Vec<(SocketAddr, SocketAddr)> {
        let st = lock(&self.st);
        let mut v: Vec<_> = st.observed.iter().map(|(r, o)| (*r, *o)).collect();
        for s in &st.sessions {
            if let Some(o) = s.observed {
                if !v.iter().any(|(r, _)| *r == s.relay_addr) {
                    v.push((s.relay_addr, o));
                }
            }
        }
        v
    }

    /// Records the relays a peer says it can be reached through.
    pub fn set_via(&self, peer: SocketAddr, via: Vec<Arc<str>>) {
        let mut st = lock(&self.st);
        if via.is_empty() {
            st.via.remove(&canonical(peer));
        } else {
            st.via.insert(canonical(peer), via);
        }
    }

    pub(crate) fn mark_unknown(&self, dst: SocketAddr, session: u64) {
        lock(&self.st)
            .unknown
            .insert((canonical(dst), session), Instant::now());
    }

    pub(crate) fn set_local_relay(&self, server: &Arc<RelayServer>) {
        *lock(&self.local_relay) = Some(Arc::downgrade(server));
        self.activate();
    }

    fn local_relay(&self) -> Option<Arc<RelayServer>> {
        lock(&self.local_relay).as_ref().and_then(Weak::upgrade)
    }

    /// The path for a packet to `dst` now (rules in the module header).
    pub(crate) fn route(&self, dst: SocketAddr) -> Route {
        self.route_with(dst, true)
    }

    /// `mark`: note a relayed destination as in use (a candidate for a
    /// direct path); a status read does not.
    fn route_with(&self, dst: SocketAddr, mark: bool) -> Route {
        let dst = canonical(dst);
        {
            let st = lock(&self.st);
            if !st.udp_blocked {
                if let Some(d) = st.direct.get(&dst) {
                    return Route::Direct(d.addr);
                }
                if st.relay_addrs.contains(&dst) {
                    return Route::Direct(dst);
                }
            }
            if !(st.udp_blocked || is_mapped(dst) || st.relayed_mode) {
                return Route::Direct(dst);
            }
        }
        // Relayed. This node's own relay first (no lock held: the relay's
        // session table has its own).
        if let Some(server) = self.local_relay().filter(|s| s.knows(dst)) {
            return Route::Local(server);
        }
        let mut st = lock(&self.st);
        match Self::pick_session(&mut st, dst) {
            Some(s) => {
                if mark {
                    st.relayed_recent.insert(dst, Instant::now());
                }
                Route::Session(s)
            }
            // No relay answers for a real address: try it directly (it may
            // be a bootstrap peer no relay knows yet).
            None if !is_mapped(dst) && !st.udp_blocked => Route::Direct(dst),
            None => Route::Drop,
        }
    }

    /// A relay session for `dst`: one the destination advertises first,
    /// skipping sessions whose relay recently said it does not know `dst`.
    fn pick_session(st: &mut State, dst: SocketAddr) -> Option<Session> {
        if st.unknown.len() > 1024 {
            st.unknown.retain(|_, t| t.elapsed() < UNKNOWN_HOLD);
        }
        // A QUIC session to a relay rides the overlay connection to that
        // relay: that connection's packets must never go inside it.
        let usable = |s: &&Session| {
            st.unknown
                .get(&(dst, s.id))
                .is_none_or(|t| t.elapsed() >= UNKNOWN_HOLD)
                && !(s.transport == Transport::Quic && s.relay_addr == dst)
        };
        if let Some(via) = st.via.get(&dst) {
            if let Some(s) = st
                .sessions
                .iter()
                .filter(usable)
                .find(|s| via.iter().any(|v| **v == *s.relay))
            {
                return Some(s.clone());
            }
        }
        if let Some(s) = st.sessions.iter().find(usable) {
            return Some(s.clone());
        }
        // Every relay said it does not know this mapped address lately: ask
        // one anyway rather than drop (the node may be re-registering right
        // now). A real address goes direct instead (the caller's rule).
        if !is_mapped(dst) {
            return None;
        }
        st.sessions.first().cloned()
    }

    /// Sends `payload` to `dst` through a relay, whatever the direct path
    /// (disco's CallMeMaybe must take the authenticated way).
    pub(crate) fn send_relayed(&self, dst: SocketAddr, payload: Bytes) -> bool {
        let dst = canonical(dst);
        if let Some(server) = self.local_relay().filter(|s| s.knows(dst)) {
            return server.deliver_local(dst, payload);
        }
        let session = Self::pick_session(&mut lock(&self.st), dst);
        match session {
            Some(s) => self.enqueue(&s, dst, &payload),
            None => false,
        }
    }

    pub(crate) fn enqueue(&self, s: &Session, dst: SocketAddr, payload: &[u8]) -> bool {
        let Ok(frame) = Frame::send_bytes(dst, payload) else {
            return false;
        };
        let ok = s.tx.try_send(frame).is_ok();
        let c = if ok {
            &self.stats.relayed_sent
        } else {
            &self.stats.relayed_dropped
        };
        c.fetch_add(1, Ordering::Relaxed);
        ok
    }

    /// A datagram a relay delivered from the node at `src`.
    pub(crate) fn on_relayed(&self, src: SocketAddr, payload: Bytes) {
        if disco::is_disco(&payload) {
            let _ = self.relayed_disco_tx.try_send(DiscoIn::Relayed {
                src,
                bytes: payload,
            });
            return;
        }
        self.stats.relayed_received.fetch_add(1, Ordering::Relaxed);
        {
            let mut q = lock(&self.relayed_in);
            if q.len() >= RELAYED_QUEUE {
                q.pop_front();
                self.stats.relayed_dropped.fetch_add(1, Ordering::Relaxed);
            }
            q.push_back((canonical(src), payload));
        }
        if let Some(w) = lock(&self.recv_waker).take() {
            w.wake();
        }
    }

    /// How packets to the peer at `addr` travel now.
    pub fn describe(&self, addr: SocketAddr) -> PathInfo {
        let addr = canonical(addr);
        let note = lock(&self.st).notes.get(&addr).cloned();
        let quic = "quic";
        match self.route_peek(addr) {
            Route::Direct(_) => PathInfo {
                path: "direct",
                via: None,
                transport: quic,
                note: lock(&self.st)
                    .direct
                    .get(&addr)
                    .map(|d| format!("hole punched; probe RTT {:?}", d.rtt)),
            },
            Route::Session(s) => PathInfo {
                path: "relayed",
                via: Some(s.relay.to_string()),
                transport: s.transport.as_str(),
                note,
            },
            Route::Local(_) => PathInfo {
                path: "relayed",
                via: Some(self.name.clone()),
                transport: quic,
                note,
            },
            Route::Drop => PathInfo {
                path: "relayed",
                via: None,
                transport: quic,
                note: Some("no relay session answers for this peer".into()),
            },
        }
    }

    /// [`Paths::route`] without recording the destination as in use.
    fn route_peek(&self, dst: SocketAddr) -> Route {
        if !self.is_active() {
            return Route::Direct(dst);
        }
        self.route_with(dst, false)
    }
}

#[cfg(test)]
mod distrust_tests {
    use super::*;

    /// One failed QUIC attempt (a relay that restarted) costs a short wait;
    /// failures in a row wait longer, up to a minute; a QUIC session that
    /// opens trusts UDP again at once.
    #[test]
    fn quic_distrust_backs_off_and_a_quic_session_ends_it() {
        let waits: Vec<u64> = (1..=6).map(|n| Paths::quic_distrust(n).as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 60, 60]);
        assert_eq!(Paths::quic_distrust(u32::MAX).as_secs(), 60);
        let (paths, _queues) = Paths::new("n", true);
        paths.note_udp_ok(
            "10.0.0.1:7400".parse().expect("addr"),
            "10.0.0.2:7400".parse().expect("addr"),
        );
        assert!(paths.udp_usable());
        paths.note_quic_failed();
        assert!(
            !paths.udp_usable(),
            "distrusted after a failed QUIC attempt"
        );
        paths.note_quic_ok();
        assert!(paths.udp_usable(), "a QUIC session ends the distrust");
        // Without fresh probes a QUIC failure says nothing about UDP.
        let (paths, _queues) = Paths::new("n", true);
        paths.note_quic_failed();
        assert_eq!(lock(&paths.st).quic_failures, 0);
    }
}
