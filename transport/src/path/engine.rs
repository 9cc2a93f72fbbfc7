//! The disco engine: one task per node that upgrades relayed peers to a
//! direct path (hole punching), keeps direct paths alive and drops them
//! when they stop answering, probes relays over UDP (is UDP getting out,
//! and what address does the world see), and answers pings.
//!
//! Upgrade, per relayed peer in use: send it `CallMeMaybe` through the relay
//! with our candidate addresses (what relays observed, our bound address)
//! and a fresh token; it answers in kind; both sides ping every candidate of
//! the other at once, which opens both NATs' mappings; the first pong fixes
//! the direct path. A peer that pings us from an address we did not know is
//! pinged back there (one side public, the other behind any NAT). Attempts
//! back off from 1 s to 60 s; a direct path unanswered for 6.5 s goes back
//! to the relay at once and is retried.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{debug, info};

use super::disco::Disco;
use super::socket::direct_out;
use super::{canonical, lock, Direct, DiscoIn, Paths};

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
/// Unanswered attempts after which a peer's note says why it stays relayed.
const NOTE_AFTER: u32 = 3;

#[derive(Debug)]
struct Peer {
    /// The token this node gave the peer (its pings to us carry it).
    mine: [u8; 16],
    /// The token the peer gave us.
    theirs: Option<[u8; 16]>,
    candidates: Vec<SocketAddr>,
    last_cmm: Option<Instant>,
    next_attempt: Instant,
    backoff: Duration,
    failures: u32,
    last_ping: Option<Instant>,
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
    tokens: HashMap<[u8; 16], SocketAddr>,
    pings: HashMap<[u8; 12], (Target, SocketAddr, Instant)>,
    relay_probed: HashMap<SocketAddr, Instant>,
}

/// Starts the engine; it stops when the paths' owner drops the sender.
pub(crate) fn spawn_engine(
    paths: Arc<Paths>,
    rx: mpsc::Receiver<DiscoIn>,
) -> tokio::task::JoinHandle<()> {
    let engine = Engine {
        paths,
        peers: HashMap::new(),
        tokens: HashMap::new(),
        pings: HashMap::new(),
        relay_probed: HashMap::new(),
    };
    tokio::spawn(engine.run(rx))
}

impl Engine {
    async fn run(mut self, mut rx: mpsc::Receiver<DiscoIn>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => self.on_message(m),
                    None => return,
                },
                _ = tick.tick() => self.on_tick(),
            }
        }
    }

    fn peer(&mut self, adv: SocketAddr) -> &mut Peer {
        let tokens = &mut self.tokens;
        self.peers.entry(adv).or_insert_with(|| {
            let mine: [u8; 16] = rand::random();
            tokens.insert(mine, adv);
            Peer {
                mine,
                theirs: None,
                candidates: Vec::new(),
                last_cmm: None,
                next_attempt: Instant::now(),
                backoff: MIN_BACKOFF,
                failures: 0,
                last_ping: None,
            }
        })
    }

    fn send_direct(&self, to: SocketAddr, msg: &Disco) {
        if let Some(out) = direct_out(&self.paths) {
            out.send_direct(to, &msg.to_bytes());
        }
    }

    fn ping(&mut self, target: Target, to: SocketAddr, token: [u8; 16]) {
        let tx: [u8; 12] = rand::random();
        self.pings.insert(tx, (target, to, Instant::now()));
        self.send_direct(to, &Disco::Ping { tx, token });
    }

    fn candidates(&self) -> Vec<SocketAddr> {
        let mut c: Vec<SocketAddr> = self.paths.observed().into_iter().map(|(_, o)| o).collect();
        if let Some(out) = direct_out(&self.paths) {
            if let Ok(local) = out.udp.local_addr() {
                let local = canonical(local);
                if !local.ip().is_unspecified() {
                    c.push(local);
                }
            }
        }
        c.sort();
        c.dedup();
        c.truncate(super::disco::MAX_CANDIDATES);
        c
    }

    fn call_me_maybe(&mut self, adv: SocketAddr) {
        let candidates = self.candidates();
        let p = self.peer(adv);
        p.last_cmm = Some(Instant::now());
        let msg = Disco::CallMeMaybe {
            token: p.mine,
            candidates,
        };
        self.paths.send_relayed(adv, msg.to_bytes());
    }

    fn ping_candidates(&mut self, adv: SocketAddr) {
        let Some(p) = self.peers.get_mut(&adv) else {
            return;
        };
        let Some(token) = p.theirs else { return };
        p.last_ping = Some(Instant::now());
        let cands = p.candidates.clone();
        for c in cands {
            self.ping(Target::Peer(adv), c, token);
        }
    }

    fn on_message(&mut self, m: DiscoIn) {
        match m {
            DiscoIn::Relayed { .. } if !self.paths.upgrade => {}
            DiscoIn::Relayed { src, bytes } => {
                let src = canonical(src);
                if let Some(Disco::CallMeMaybe { token, candidates }) = Disco::parse(&bytes) {
                    debug!(peer = %src, ?candidates, "call-me-maybe through the relay");
                    let p = self.peer(src);
                    p.theirs = Some(token);
                    p.candidates = candidates;
                    let answer = p
                        .last_cmm
                        .is_none_or(|t| t.elapsed() > Duration::from_millis(500));
                    self.ping_candidates(src);
                    if answer {
                        self.call_me_maybe(src);
                    }
                }
            }
            DiscoIn::Direct { from, bytes } => match Disco::parse(&bytes) {
                Some(Disco::Ping { tx, token }) => self.on_ping(from, tx, token),
                Some(Disco::Pong { tx, observed }) => self.on_pong(from, tx, observed),
                Some(Disco::DialBack { nonce }) => {
                    lock(&self.paths.st).dialbacks.insert(nonce);
                }
                _ => {}
            },
        }
    }

    fn on_ping(&mut self, from: SocketAddr, tx: [u8; 12], token: [u8; 16]) {
        // A probe of a relay session's client (relay role): tell it what we see.
        if lock(&self.paths.st).welcome_tokens.contains(&token) {
            self.send_direct(from, &Disco::Pong { tx, observed: from });
            return;
        }
        let Some(&adv) = self.tokens.get(&token) else {
            return;
        };
        self.send_direct(from, &Disco::Pong { tx, observed: from });
        let has_direct = {
            let mut st = lock(&self.paths.st);
            st.by_direct.insert(from, adv);
            st.direct.contains_key(&adv)
        };
        // Pinged from an address we never tried (the peer is behind a NAT
        // and we are not): ping back there.
        if !has_direct {
            if let Some(theirs) = self.peers.get(&adv).and_then(|p| p.theirs) {
                self.ping(Target::Peer(adv), from, theirs);
            }
        }
    }

    fn on_pong(&mut self, from: SocketAddr, tx: [u8; 12], observed: SocketAddr) {
        let Some((target, _to, sent)) = self.pings.remove(&tx) else {
            return;
        };
        let rtt = sent.elapsed();
        match target {
            Target::Relay(relay) => self.paths.note_udp_ok(relay, canonical(observed)),
            Target::Peer(adv) => {
                let mut st = lock(&self.paths.st);
                let fresh = !st.direct.contains_key(&adv);
                st.direct.insert(
                    adv,
                    Direct {
                        addr: from,
                        last_pong: Instant::now(),
                        rtt,
                    },
                );
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
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        self.pings
            .retain(|_, (_, _, t)| now.duration_since(*t) < Duration::from_secs(10));
        self.probe_relays(now);
        if !self.paths.is_active() {
            return;
        }
        // Keep direct paths alive; drop the silent ones.
        let (direct, recent, udp_blocked) = {
            let mut st = lock(&self.paths.st);
            st.relayed_recent
                .retain(|_, t| now.duration_since(*t) < RECENT);
            let direct: Vec<(SocketAddr, Direct)> =
                st.direct.iter().map(|(a, d)| (*a, *d)).collect();
            let recent: Vec<SocketAddr> = st.relayed_recent.keys().copied().collect();
            (direct, recent, st.udp_blocked)
        };
        for (adv, d) in direct {
            if now.duration_since(d.last_pong) > DIRECT_TIMEOUT {
                let mut st = lock(&self.paths.st);
                st.direct.remove(&adv);
                st.by_direct.retain(|_, a| *a != adv);
                drop(st);
                self.paths.stats.direct_lost.fetch_add(1, Ordering::Relaxed);
                info!(peer = %adv, direct = %d.addr, "direct path stopped answering; back through the relay");
                let p = self.peer(adv);
                p.next_attempt = now + MIN_BACKOFF;
                p.backoff = MIN_BACKOFF;
                continue;
            }
            let due = self.peers.get(&adv).is_none_or(|p| {
                p.last_ping
                    .is_none_or(|t| now.duration_since(t) >= KEEPALIVE)
            });
            if due {
                if let Some(token) = self.peers.get(&adv).and_then(|p| p.theirs) {
                    if let Some(p) = self.peers.get_mut(&adv) {
                        p.last_ping = Some(now);
                    }
                    self.ping(Target::Peer(adv), d.addr, token);
                }
            }
        }
        if udp_blocked || !self.paths.upgrade {
            return;
        }
        // Try to upgrade relayed peers in use.
        for adv in recent {
            let has_direct = lock(&self.paths.st).direct.contains_key(&adv);
            let p = self.peer(adv);
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
                    format!("direct path: {} probe rounds unanswered (a NAT that maps per destination, or a firewall); staying relayed", failures - 1),
                );
            }
            self.call_me_maybe(adv);
            self.ping_candidates(adv);
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
                self.ping(Target::Relay(s.relay_addr), s.relay_addr, s.token);
            }
        }
    }
}
