//! The byte-moving boundary under chitchat, and the adapter chitchat sees.
//!
//! chitchat hands us typed messages addressed by `SocketAddr`; we encode them
//! with chitchat's own wire codec, shrink their digests for peers that read
//! the compact form ([`crate::wire`]), and pass bytes to a [`Link`]. Sending never
//! blocks the gossip loop: a `Link` queues or drops. Messages larger than
//! chitchat's 65,507-byte budget are refused here (chitchat sizes deltas to
//! that limit, so this only trips on a bug) and counted.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use bytes::Bytes;
use chitchat::transport::{Socket, Transport};
use chitchat::{ChitchatMessage, Deserializable, Serializable};
use tokio::sync::mpsc;
use tracing::warn;

use crate::wire::{self, KnownIds, Listed, PeerList};

/// chitchat computes deltas against the UDP payload maximum.
pub const MAX_GOSSIP_MESSAGE: usize = 65_507;

/// Moves gossip bytes to a peer address. Implementations must not block.
pub trait Link: Send + Sync + 'static {
    fn send(&self, to: SocketAddr, payload: &[u8]);
}

impl Link for dmsc_transport::Overlay {
    fn send(&self, to: SocketAddr, payload: &[u8]) {
        // Errors here are encoding errors of an over-limit payload, which the
        // socket already refused; delivery failures are counted by the overlay.
        let _ = dmsc_transport::Overlay::send(self, to, dmsc_transport::Channel::Gossip, payload);
    }
}

/// Gossip traffic counters (what this node sent and received).
#[derive(Debug, Default)]
pub struct GossipStats {
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub messages_sent: AtomicU64,
    pub messages_received: AtomicU64,
    pub invalid_messages: AtomicU64,
    /// Of `bytes_sent`, by message: SYN and SYN-ACK carry a digest (one
    /// entry per node), SYN-ACK and ACK a delta (changed keys).
    pub syn_bytes_sent: AtomicU64,
    pub syn_ack_bytes_sent: AtomicU64,
    pub ack_bytes_sent: AtomicU64,
    /// Messages sent with compact digests ([`crate::wire`]), and their
    /// entries by how they name their node: in full, or by position.
    pub compact_sent: AtomicU64,
    pub compact_full_entries: AtomicU64,
    pub compact_positional_entries: AtomicU64,
    /// Gossip rounds initiated: bursts of SYN messages (chitchat sends a
    /// round's SYNs back to back, one interval apart from the next round's).
    pub rounds: AtomicU64,
}

/// The peers (gossip addresses) that read compact digests, as their gossip
/// says ([`crate::KEY_GOSSIP_WIRE`]); kept up to date by [`crate::Gossip`].
pub type CompactPeers = Arc<RwLock<HashSet<SocketAddr>>>;

/// chitchat `Transport` over a [`Link`] plus an inbox of `(from, bytes)`.
pub struct LinkTransport {
    link: Arc<dyn Link>,
    inbox: Mutex<Option<mpsc::Receiver<(SocketAddr, Bytes)>>>,
    local: SocketAddr,
    stats: Arc<GossipStats>,
    compact_peers: CompactPeers,
}

impl LinkTransport {
    /// `inbox` yields what peers sent to `local`.
    pub fn new(
        link: Arc<dyn Link>,
        local: SocketAddr,
        inbox: mpsc::Receiver<(SocketAddr, Bytes)>,
    ) -> Self {
        LinkTransport {
            link,
            inbox: Mutex::new(Some(inbox)),
            local,
            stats: Arc::new(GossipStats::default()),
            compact_peers: CompactPeers::default(),
        }
    }

    pub fn stats(&self) -> Arc<GossipStats> {
        self.stats.clone()
    }

    pub fn compact_peers(&self) -> CompactPeers {
        self.compact_peers.clone()
    }
}

#[async_trait]
impl Transport for LinkTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        anyhow::ensure!(
            listen_addr == self.local,
            "gossip asked to listen on {listen_addr}, the link is bound to {}",
            self.local
        );
        let inbox = self
            .inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| anyhow::anyhow!("gossip transport opened twice"))?;
        Ok(Box::new(LinkSocket {
            link: self.link.clone(),
            inbox,
            stats: self.stats.clone(),
            compact_peers: self.compact_peers.clone(),
            known: KnownIds::default(),
            peers: HashMap::new(),
            buf: Vec::with_capacity(4096),
            wire: Vec::with_capacity(4096),
            last_syn: None,
        }))
    }
}

struct LinkSocket {
    link: Arc<dyn Link>,
    inbox: mpsc::Receiver<(SocketAddr, Bytes)>,
    stats: Arc<GossipStats>,
    compact_peers: CompactPeers,
    /// The ids of this node's latest digest, to expand compact digests.
    known: KnownIds,
    /// Per peer, the id list of its last digest (see [`crate::wire`]).
    peers: HashMap<SocketAddr, PeerList>,
    /// chitchat's encoding of the message being sent.
    buf: Vec<u8>,
    /// What goes on the wire (compact or the same as `buf`).
    wire: Vec<u8>,
    last_syn: Option<tokio::time::Instant>,
}

/// SYNs closer together than this belong to the same round.
const SAME_ROUND: std::time::Duration = std::time::Duration::from_millis(5);

#[async_trait]
impl Socket for LinkSocket {
    async fn send(&mut self, to: SocketAddr, msg: ChitchatMessage) -> anyhow::Result<()> {
        let by_kind = match msg {
            ChitchatMessage::Syn { .. } => &self.stats.syn_bytes_sent,
            ChitchatMessage::SynAck { .. } => &self.stats.syn_ack_bytes_sent,
            _ => &self.stats.ack_bytes_sent,
        };
        if matches!(msg, ChitchatMessage::Syn { .. }) {
            let now = tokio::time::Instant::now();
            if self
                .last_syn
                .is_none_or(|t| now.duration_since(t) > SAME_ROUND)
            {
                self.stats.rounds.fetch_add(1, Ordering::Relaxed);
            }
            self.last_syn = Some(now);
        }
        self.buf.clear();
        msg.serialize(&mut self.buf);
        let compact = {
            let readers = self.compact_peers.read().unwrap_or_else(|p| p.into_inner());
            if self.peers.len() > readers.len() + 64 {
                self.peers.retain(|a, _| readers.contains(a));
            }
            readers.contains(&to)
        };
        let peer = compact.then(|| self.peers.get(&to));
        match wire::encode(&self.buf, peer, &mut self.known, &mut self.wire) {
            Ok(e) if self.wire.first() == Some(&wire::COMPACT) => {
                let s = &self.stats;
                s.compact_sent.fetch_add(1, Ordering::Relaxed);
                s.compact_full_entries
                    .fetch_add(e.full as u64, Ordering::Relaxed);
                s.compact_positional_entries
                    .fetch_add(e.positional as u64, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => {
                // chitchat's own encoding is always valid: this is a bug.
                warn!(error = %e, "could not read an outgoing digest; sent as chitchat wrote it");
                self.wire.clear();
                self.wire.extend_from_slice(&self.buf);
            }
        }
        if self.wire.len() > MAX_GOSSIP_MESSAGE {
            warn!(len = self.wire.len(), peer = %to, "gossip message over the 65,507-byte budget; dropped");
            return Ok(());
        }
        let len = self.wire.len() as u64;
        self.stats.messages_sent.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes_sent.fetch_add(len, Ordering::Relaxed);
        by_kind.fetch_add(len, Ordering::Relaxed);
        self.link.send(to, &self.wire);
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        loop {
            let (from, bytes) = self
                .inbox
                .recv()
                .await
                .ok_or_else(|| anyhow::anyhow!("gossip inbox closed"))?;
            self.stats.messages_received.fetch_add(1, Ordering::Relaxed);
            self.stats
                .bytes_received
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            let decoded = wire::decode(&bytes, &self.known, &mut self.buf)
                .map_err(anyhow::Error::from)
                .and_then(|listed| {
                    let msg = ChitchatMessage::deserialize(&mut &self.buf[..])?;
                    match listed {
                        Listed::List(list) => {
                            self.peers.insert(from, list);
                        }
                        Listed::Unknown => {
                            self.peers.remove(&from);
                        }
                        Listed::NoDigest => {}
                    }
                    Ok(msg)
                });
            match decoded {
                Ok(msg) => return Ok((from, msg)),
                Err(e) => {
                    self.stats.invalid_messages.fetch_add(1, Ordering::Relaxed);
                    warn!(peer = %from, error = %e, "dropping undecodable gossip message");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// chitchat's magic number (little-endian) and protocol version 0: bytes
    /// that get past the header check and into the message decoders.
    fn header(msg_type: u8) -> Vec<u8> {
        let mut h = 45_139u16.to_le_bytes().to_vec();
        h.push(0);
        h.push(msg_type);
        h
    }

    proptest! {
        // Every gossip payload a peer sends goes through this decoder; no
        // input may panic it (a panic would stop the node's gossip loop).
        #[test]
        fn gossip_decoder_never_panics(
            msg_type in 0u8..5,
            body in proptest::collection::vec(any::<u8>(), 0..512),
            raw in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let _ = ChitchatMessage::deserialize(&mut &raw[..]);
            let mut bytes = header(msg_type);
            bytes.extend_from_slice(&body);
            let _ = ChitchatMessage::deserialize(&mut &bytes[..]);
        }

        #[test]
        fn gossip_messages_round_trip_through_the_codec(cluster in "[a-z.]{0,40}") {
            let mut buf = Vec::new();
            let syn = ChitchatMessage::Syn { cluster_id: cluster.clone(), digest: Default::default() };
            syn.serialize(&mut buf);
            let back = ChitchatMessage::deserialize(&mut &buf[..]).expect("decode");
            prop_assert_eq!(back, syn);
        }
    }
}
