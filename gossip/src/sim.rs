//! An in-memory network for simulated clusters.
//!
//! Hundreds of gossip instances in one process, under `tokio::time::pause`,
//! exchanging the same encoded bytes they would send over QUIC. Links can be
//! cut one way, both ways, or for a whole node; an MTU is enforced (a message
//! over it is dropped, as a datagram would be); bytes are counted per sender.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::link::{Link, LinkTransport};

#[derive(Default)]
struct State {
    inboxes: HashMap<SocketAddr, mpsc::Sender<(SocketAddr, Bytes)>>,
    cut: HashSet<(SocketAddr, SocketAddr)>,
    isolated: HashSet<SocketAddr>,
    bytes_sent: HashMap<SocketAddr, u64>,
    dropped: u64,
    dropped_over_mtu: u64,
}

/// The shared network. Clone freely.
#[derive(Clone)]
pub struct SimNetwork {
    state: Arc<Mutex<State>>,
    mtu: usize,
}

impl std::fmt::Debug for SimNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNetwork")
            .field("mtu", &self.mtu)
            .finish()
    }
}

impl SimNetwork {
    pub fn new(mtu: usize) -> Self {
        SimNetwork {
            state: Arc::default(),
            mtu,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every critical section is a single map operation: recover from poison.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches a node at `addr` and returns the transport its gossip uses.
    pub fn attach(&self, addr: SocketAddr) -> LinkTransport {
        let (tx, rx) = mpsc::channel(4096);
        self.state().inboxes.insert(addr, tx);
        let link = Arc::new(SimLink {
            net: self.clone(),
            addr,
        });
        LinkTransport::new(link, addr, rx)
    }

    /// Cuts every link of `addr` (both directions).
    pub fn isolate(&self, addr: SocketAddr) {
        self.state().isolated.insert(addr);
    }

    /// Restores the links of an isolated node.
    pub fn heal(&self, addr: SocketAddr) {
        self.state().isolated.remove(&addr);
    }

    /// Cuts the one-way link `from -> to`.
    pub fn cut(&self, from: SocketAddr, to: SocketAddr) {
        self.state().cut.insert((from, to));
    }

    pub fn bytes_sent(&self, addr: SocketAddr) -> u64 {
        self.state().bytes_sent.get(&addr).copied().unwrap_or(0)
    }

    /// Messages dropped for any reason (MTU, cut, isolation, full inbox).
    pub fn dropped(&self) -> u64 {
        self.state().dropped
    }

    /// Of [`dropped`](Self::dropped), the messages larger than the MTU.
    pub fn dropped_over_mtu(&self) -> u64 {
        self.state().dropped_over_mtu
    }
}

struct SimLink {
    net: SimNetwork,
    addr: SocketAddr,
}

impl Link for SimLink {
    fn send(&self, to: SocketAddr, payload: &[u8]) {
        let mut s = self.net.state();
        let over_mtu = payload.len() > self.net.mtu;
        if over_mtu {
            s.dropped_over_mtu += 1;
        }
        let blocked = over_mtu
            || s.isolated.contains(&self.addr)
            || s.isolated.contains(&to)
            || s.cut.contains(&(self.addr, to));
        if blocked {
            s.dropped += 1;
            return;
        }
        *s.bytes_sent.entry(self.addr).or_default() += payload.len() as u64;
        let delivered = s.inboxes.get(&to).is_some_and(|tx| {
            tx.try_send((self.addr, Bytes::copy_from_slice(payload)))
                .is_ok()
        });
        if !delivered {
            s.dropped += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn mtu_and_cuts_drop_exactly_what_they_should() {
        let net = SimNetwork::new(100);
        let a: SocketAddr = ([10, 0, 0, 1], 1).into();
        let b: SocketAddr = ([10, 0, 0, 2], 1).into();
        let _ta = net.attach(a);
        let (tx, mut rx) = mpsc::channel(8);
        net.state().inboxes.insert(b, tx);
        let link = SimLink {
            net: net.clone(),
            addr: a,
        };

        link.send(b, &[0u8; 100]);
        assert_eq!(rx.try_recv().expect("at the MTU: delivered").1.len(), 100);
        link.send(b, &[0u8; 101]);
        assert!(rx.try_recv().is_err(), "over the MTU: dropped");
        assert_eq!(net.dropped(), 1);

        net.cut(a, b);
        link.send(b, b"x");
        assert!(rx.try_recv().is_err(), "cut link: dropped");
        net.state().cut.clear();
        net.isolate(b);
        link.send(b, b"x");
        assert!(rx.try_recv().is_err(), "isolated peer: dropped");
        net.heal(b);
        link.send(b, b"x");
        assert_eq!(&rx.try_recv().expect("healed").1[..], b"x");
        assert_eq!(net.dropped(), 3);
        assert_eq!(net.dropped_over_mtu(), 1, "only the 101-byte message");
        assert_eq!(net.bytes_sent(a), 101);
    }
}
