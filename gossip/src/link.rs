//! The byte-moving boundary under chitchat, and the adapter chitchat sees.
//!
//! chitchat hands us typed messages addressed by `SocketAddr`; we encode them
//! with chitchat's own wire codec and pass bytes to a [`Link`]. Sending never
//! blocks the gossip loop: a `Link` queues or drops. Messages larger than
//! chitchat's 65,507-byte budget are refused here (chitchat sizes deltas to
//! that limit, so this only trips on a bug) and counted.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use chitchat::transport::{Socket, Transport};
use chitchat::{ChitchatMessage, Deserializable, Serializable};
use tokio::sync::mpsc;
use tracing::warn;

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
    /// Gossip rounds initiated: bursts of SYN messages (chitchat sends a
    /// round's SYNs back to back, one interval apart from the next round's).
    pub rounds: AtomicU64,
}

/// chitchat `Transport` over a [`Link`] plus an inbox of `(from, bytes)`.
pub struct LinkTransport {
    link: Arc<dyn Link>,
    inbox: Mutex<Option<mpsc::Receiver<(SocketAddr, Bytes)>>>,
    local: SocketAddr,
    stats: Arc<GossipStats>,
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
        }
    }

    pub fn stats(&self) -> Arc<GossipStats> {
        self.stats.clone()
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
            buf: Vec::with_capacity(4096),
            last_syn: None,
        }))
    }
}

struct LinkSocket {
    link: Arc<dyn Link>,
    inbox: mpsc::Receiver<(SocketAddr, Bytes)>,
    stats: Arc<GossipStats>,
    buf: Vec<u8>,
    last_syn: Option<tokio::time::Instant>,
}

/// SYNs closer together than this belong to the same round.
const SAME_ROUND: std::time::Duration = std::time::Duration::from_millis(5);

#[async_trait]
impl Socket for LinkSocket {
    async fn send(&mut self, to: SocketAddr, msg: ChitchatMessage) -> anyhow::Result<()> {
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
        if self.buf.len() > MAX_GOSSIP_MESSAGE {
            warn!(len = self.buf.len(), peer = %to, "gossip message over the 65,507-byte budget; dropped");
            return Ok(());
        }
        self.stats.messages_sent.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_sent
            .fetch_add(self.buf.len() as u64, Ordering::Relaxed);
        self.link.send(to, &self.buf);
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
            match ChitchatMessage::deserialize(&mut &bytes[..]) {
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
