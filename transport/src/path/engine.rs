//! The disco engine: one task per node that upgrades relayed peers to a
//! direct path (hole punching), keeps direct paths alive and drops them
//! when they stop answering, probes relays over UDP (is UDP getting out,
//! and what address does the world see), and answers pings.
//!
//! Upgrade, per relayed peer in use: send it `CallMeMaybe` through the relay
//! with our candidate addresses (what relays observed, our bound address);
//! it answers in kind; both sides ping every candidate of the other at
//! once, which opens both NATs' mappings; the first pong from the address
//! pinged fixes the direct path. A peer that pings us from an address we did
//! not know is pinged back there (one side public, the other behind any
//! NAT). Every pair message is MAC'd with a key exported from the pair's own
//! QUIC connection (`disco.rs`): without that connection there is nothing
//! to upgrade, and nobody else can steer the pair's packets.
//!
//! Attempts back off from 1 s to 60 s; a peer is pinged at most once a
//! second per candidate round; a direct path unanswered for 6.5 s goes back
//! to the relay at once and is retried. Every table is bounded and pruned.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tracing::{debug, info};

use super::disco::{Disco, PairKey};
use super::socket::direct_out;
use super::{canonical, is_mapped, lock, Direct, DiscoIn, Paths};

const TICK: Duration = Duration::from_millis(250);
/// A direct path is pinged this often.
const KEEPALIVE: Duration = Duration::from_secs(2);
/// A direct path silent this long is dropped.
const DIRECT_TIMEOUT: Duration = Duration::from_millis(6500);
/// Relays are probed over UDP this often (faster while UDP seems blocked).
const RELAY_PROBE: Duration = Duration::from_secs(5);
const RELAY_PROBE_BLOCKED: Duration = Duration::from_secs(2);
/// Peers sent to through a relay within this window are upgrade candidates.
const RECENT: Duration = Duration::from_secs(30);
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// One round of pings to a peer's candidates at most this often.
const PING_ROUND_EVERY: Duration = Duration::from_secs(1);
/// Unanswered attempts after which a peer's note says why it stays relayed.
const NOTE_AFTER: u32 = 3;
/// Pings older than this (by the sender's clock) are refused: replays.
const PING_MAX_AGE_MS: u64 = 30_000;
/// Table bounds.
const MAX_PEERS: usize = 4096;
const MAX_PINGS: usize = 8192;
const MAX_SEEN_TX: usize = 8192;
/// A peer state unused this long is forgotten.
const PEER_IDLE: Duration = Duration::from_secs(300);

#[derive(Debug)]
struct Peer {
    candidates: Vec<SocketAddr>,
    last_cmm: Option<Instant>,
    last_round: Option<Instant>,
    next_attempt: Instant,
    backoff: Duration,
    failures: u32,
    last_keepalive: Option<Instant>,
    touched: Instant,
}

impl Peer {
    fn new() -> Peer {
        Peer {
            candidates: Vec::new(),
            last_cmm: None,
            last_round: None,
            next_attempt: Instant::now(),
            backoff: MIN_BACKOFF,
            failures: 0,
            last_keepalive: None,
            touched: Instant::now(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Target {
    Peer(SocketAddr),
    Relay(SocketAddr),
}

#[derive(Debug)]
struct Engine {
    paths: Arc<Paths>,
    peers: HashMap<SocketAddr, Peer>,
    pings: HashMap<[u8; 12], (Target, SocketAddr, Instant)>,
    seen_tx: HashSet<[u8; 12]>,
    relay_probed: HashMap<SocketAddr, Instant>,
}

/// Starts the engine; it stops when the paths' owner drops the senders.
pub(crate) fn spawn_engine(
    paths: Arc<Paths>,
    direct: mpsc::Receiver<DiscoIn>,
    relayed: mpsc::Receiver<DiscoIn>,
) -> tokio::task::JoinHandle<()> {
    let engine = Engine {
        paths,
        peers: HashMap::new(),
        pings: HashMap::new(),
        seen_tx: HashSet::new(),
        relay_probed: HashMap::new(),
    };
    tokio::spawn(engine.run(direct, relayed))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// Candidates worth pinging: not unspecified, multicast, broadcast or a
/// mapped address (a peer cannot make us spray packets at those).
fn usable_candidate(a: &SocketAddr) -> bool {
    let a = canonical(*a);
    if a.port() == 0 || is_mapped(a) {
        return false;
    }
    match a.ip() {
        IpAddr::V4(ip) => !(ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast()),
        IpAddr::V6(ip) => !(ip.is_unspecified() || ip.is_multicast()),
    }
}

impl Engine {
    async fn run(
        mut self,
        mut direct: mpsc::Receiver<DiscoIn>,
        mut relayed: mpsc::Receiver<DiscoIn>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                m = relayed.recv() => match m {
                    Some(m) => self.on_message(m),
                    None => return,
                },
                m = direct.recv() => match m {
                    Some(m) => self.on_message(m),
                    None => return,
                },
                _ = tick.tick() => self.on_tick(),
            }
        }
    }

    fn key(&self, adv: SocketAddr) -> Option<PairKey> {
        self.paths.pair_key(adv)
    }

    fn peer(&mut self, adv: SocketAddr) -> Option<&mut Peer> {
        if !self.peers.contains_key(&adv) && self.peers.len() >= MAX_PEERS {
            return None;
        }
        let p = self.peers.entry(adv).or_insert_with(Peer::new);
        p.touched = Instant::now();
        Some(p)
    }

    fn send_direct(&self, to: SocketAddr, msg: &Disco) {
        if let Some(out) = direct_out(&self.paths) {
            out.send_direct(to, &msg.to_bytes());
        }
    }

    fn remember_ping(&mut self, tx: [u8; 12], target: Target, to: SocketAddr) {
        if self.pings.len() >= MAX_PINGS {
            return;
        }
        self.pings.insert(tx, (target, to, Instant::now()));
    }

    fn ping_peer(&mut self, adv: SocketAddr, to: SocketAddr, key: &PairKey) {
        let tx: [u8; 12] = rand::random();
        self.remember_ping(tx, Target::Peer(adv), to);
        let me = self.paths.me();
        self.send_direct(to, &Disco::ping(key, tx, me, now_ms()));
    }

    fn candidates(&self) -> Vec<SocketAddr> {
        let mut c: Vec<SocketAddr> = self.paths.observed().into_iter().map(|(_, o)| o).collect();
        if let Some(out) = direct_out(&self.paths) {
            if let Ok(local) = out.udp.local_addr() {
                c.push(canonical(local));
            }
        }
        c.retain(usable_candidate);
        c.sort();
        c.dedup();
        c.truncate(super::disco::MAX_CANDIDATES);
        c
    }

    fn call_me_maybe(&mut self, adv: SocketAddr, key: &PairKey) {
        let msg = Disco::call_me_maybe(key, self.candidates());
        if let Some(p) = self.peer(adv) {
            p.last_cmm = Some(Instant::now());
        }
        self.paths.send_relayed(adv, msg.to_bytes());
    }

    /// One round of pings to the peer's candidates, at most once a second.
    fn ping_round(&mut self, adv: SocketAddr, key: &PairKey) {
        let Some(p) = self.peers.get_mut(&adv) else {
            return;
        };
        if p.last_round.is_some_and(|t| t.elapsed() < PING_ROUND_EVERY) {
            return;
        }
        p.last_round = Some(Instant::now());
        let cands = p.candidates.clone();
        for c in cands {
            self.ping_peer(adv, c, key);
        }
    }

    fn on_message(&mut self, m: DiscoIn) {
        match m {
            DiscoIn::Relayed { src, bytes } => {
                if !self.paths.upgrade {
                    return;
                }
                let src = canonical(src);
                let Some(msg @ Disco::CallMeMaybe { .. }) = Disco::parse(&bytes) else {
                    return;
                };
                // Only from a peer we hold a connection with, MAC'd with
                // that connection's key: a relay cannot forge it.
                let Some(key) = self.key(src).filter(|k| msg.verify(k)) else {
                    debug!(peer = %src, "dropping a call-me-maybe that does not verify");
                    return;
                };
                let Disco::CallMeMaybe { candidates, .. } = msg else {
                    return;
                };
                debug!(peer = %src, ?candidates, "call-me-maybe through the relay");
                let Some(p) = self.peer(src) else { return };
                p.candidates = candidates.into_iter().filter(usable_candidate).collect();
                let answer = p
                    .last_cmm
                    .is_none_or(|t| t.elapsed() > Duration::from_millis(500));
                self.ping_round(src, &key);
                if answer {
                    self.call_me_maybe(src, &key);
                }
            }
            DiscoIn::Direct { from, bytes } => match Disco::parse(&bytes) {
                // With `direct_upgrade = false` this node takes no part in
                // a peer's punching either (no pong, no ping back), so the
                // pair stays relayed whichever side starts.
                Some(msg @ Disco::Ping { .. }) if self.paths.upgrade => self.on_ping(from, msg),
                Some(msg @ Disco::Pong { .. }) if self.paths.upgrade => self.on_pong(from, msg),
                // A probe of one of this relay's session clients.
                Some(Disco::RelayPing { tx, token })
                    if lock(&self.paths.st).welcome_tokens.contains(&token) =>
                {
                    self.send_direct(from, &Disco::RelayPong { tx, observed: from });
                }
                Some(Disco::RelayPong { tx, observed }) => {
                    if let Some((Target::Relay(relay), to, _)) = self.pings.get(&tx).copied() {
                        if to == from {
                            self.pings.remove(&tx);
                            self.paths.note_udp_ok(relay, canonical(observed));
                        }
                    }
                }
                Some(Disco::DialBack { nonce }) => self.paths.note_dial_back(nonce),
                _ => {}
            },
        }
    }

    fn on_ping(&mut self, from: SocketAddr, msg: Disco) {
        let Disco::Ping {
            tx, sender, ts_ms, ..
        } = msg
        else {
            return;
        };
        let sender = canonical(sender);
        let Some(key) = self.key(sender).filter(|k| msg.verify(k)) else {
            return;
        };
        if now_ms().abs_diff(ts_ms) > PING_MAX_AGE_MS || !self.seen_tx.insert(tx) {
            return;
        }
        if self.seen_tx.len() > MAX_SEEN_TX {
            self.seen_tx.clear();
        }
        self.send_direct(from, &Disco::pong(&key, tx, from));
        let has_direct = {
            let mut st = lock(&self.paths.st);
            // Never relabel a relay's address or one already mapped to
            // another peer.
            let taken = st.relay_addrs.contains(&from)
                || st.by_direct.get(&from).is_some_and(|a| *a != sender);
            if !taken && st.by_direct.len() < super::MAX_BY_DIRECT {
                st.by_direct.insert(from, sender);
            }
            st.direct.contains_key(&sender)
        };
        // Pinged from an address we never tried (the peer is behind a NAT
        // and we are not): ping back there.
        if !has_direct {
            if let Some(p) = self.peer(sender) {
                if !p.candidates.contains(&from)
                    && p.candidates.len() < 2 * super::disco::MAX_CANDIDATES
                {
                    p.candidates.push(from);
                }
            }
            self.ping_peer(sender, from, &key);
        }
    }

    fn on_pong(&mut self, from: SocketAddr, msg: Disco) {
        let Disco::Pong { tx, .. } = msg else { return };
        let Some((Target::Peer(adv), to, sent)) = self.pings.get(&tx).copied() else {
            return;
        };
        // From the address pinged, MAC'd by the peer.
        if to != from || !self.key(adv).is_some_and(|k| msg.verify(&k)) {
            return;
        }
        self.pings.remove(&tx);
        let rtt = sent.elapsed();
        let mut st = lock(&self.paths.st);
        let fresh = match st.direct.get(&adv) {
            // The first path found stays while it answers.
            Some(d) if d.addr != from => return,
            Some(_) => false,
            None => true,
        };
        st.direct.insert(
            adv,
            Direct {
                addr: from,
                last_pong: Instant::now(),
                rtt,
            },
        );
        st.by_direct.retain(|k, a| *a != adv || *k == from);
        st.by_direct.insert(from, adv);
        st.notes.remove(&adv);
        drop(st);
        if fresh {
            self.paths
                .stats
                .direct_upgrades
                .fetch_add(1, Ordering::Relaxed);
            info!(peer = %adv, direct = %from, rtt = ?rtt, "direct path to a relayed peer confirmed (hole punched); its QUIC connection moves to it");
        }
        if let Some(p) = self.peers.get_mut(&adv) {
            p.failures = 0;
            p.backoff = MIN_BACKOFF;
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        self.pings
            .retain(|_, (_, _, t)| now.duration_since(*t) < Duration::from_secs(10));
        self.paths.refresh_udp();
        self.probe_relays(now);
        if !self.paths.is_active() {
            return;
        }
        let (direct, recent, udp_blocked) = {
            let mut st = lock(&self.paths.st);
            st.relayed_recent
                .retain(|_, t| now.duration_since(*t) < RECENT);
            let direct: Vec<(SocketAddr, Direct)> =
                st.direct.iter().map(|(a, d)| (*a, *d)).collect();
            let recent: Vec<SocketAddr> = st.relayed_recent.keys().copied().collect();
            (direct, recent, st.udp_blocked)
        };
        // Forget peers neither in use nor direct.
        self.peers.retain(|adv, p| {
            now.duration_since(p.touched) < PEER_IDLE || direct.iter().any(|(a, _)| a == adv)
        });
        // Keep direct paths alive; drop the silent ones.
        for (adv, d) in direct {
            if now.duration_since(d.last_pong) > DIRECT_TIMEOUT {
                let mut st = lock(&self.paths.st);
                st.direct.remove(&adv);
                st.by_direct.retain(|_, a| *a != adv);
                drop(st);
                self.paths.stats.direct_lost.fetch_add(1, Ordering::Relaxed);
                info!(peer = %adv, direct = %d.addr, "direct path stopped answering; back through the relay");
                if let Some(p) = self.peer(adv) {
                    p.next_attempt = now + MIN_BACKOFF;
                    p.backoff = MIN_BACKOFF;
                }
                continue;
            }
            let Some(key) = self.key(adv) else { continue };
            let due = self.peers.get(&adv).is_none_or(|p| {
                p.last_keepalive
                    .is_none_or(|t| now.duration_since(t) >= KEEPALIVE)
            });
            if due {
                if let Some(p) = self.peer(adv) {
                    p.last_keepalive = Some(now);
                }
                self.ping_peer(adv, d.addr, &key);
            }
        }
        if udp_blocked || !self.paths.upgrade {
            return;
        }
        // Try to upgrade relayed peers in use.
        for adv in recent {
            let has_direct = lock(&self.paths.st).direct.contains_key(&adv);
            let Some(key) = self.key(adv) else { continue };
            let Some(p) = self.peer(adv) else { continue };
            if has_direct || now < p.next_attempt {
                continue;
            }
            p.next_attempt = now + p.backoff;
            p.backoff = (p.backoff * 2).min(MAX_BACKOFF);
            p.failures += 1;
            let failures = p.failures;
            if failures > NOTE_AFTER {
                lock(&self.paths.st).notes.insert(
                    adv,
                    format!("direct path: {} probe rounds unanswered (the NATs or firewalls between drop them); staying relayed", failures - 1),
                );
            }
            self.call_me_maybe(adv, &key);
            self.ping_round(adv, &key);
        }
    }

    /// UDP probes to each relay we have a session with: is UDP getting out,
    /// and from which address.
    fn probe_relays(&mut self, now: Instant) {
        let every = if self.paths.udp_blocked() {
            RELAY_PROBE_BLOCKED
        } else {
            RELAY_PROBE
        };
        for s in self.paths.sessions() {
            let due = self
                .relay_probed
                .get(&s.relay_addr)
                .is_none_or(|t| now.duration_since(*t) >= every);
            if due {
                self.relay_probed.insert(s.relay_addr, now);
                let tx: [u8; 12] = rand::random();
                self.remember_ping(tx, Target::Relay(s.relay_addr), s.relay_addr);
                self.send_direct(s.relay_addr, &Disco::RelayPing { tx, token: s.token });
            }
        }
        self.relay_probed
            .retain(|_, t| now.duration_since(*t) < Duration::from_secs(60));
    }
}
