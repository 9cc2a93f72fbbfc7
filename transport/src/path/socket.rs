//! [`PathSocket`]: the `quinn::AsyncUdpSocket` the overlay's endpoint runs
//! on. It wraps the real UDP socket; sends follow [`Paths::route`], relayed
//! datagrams are handed to QUIC as if they came off the wire from the
//! sender's advertised address, disco packets are taken out for the engine,
//! and direct packets from a peer with a confirmed direct path are reported
//! from its advertised address, so QUIC sees one stable address per peer.
//!
//! [`Impair`] drops and delays outgoing UDP datagrams for chaos tests on a
//! kernel without netem (`DMSC_IMPAIR`, read by the node).

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::mpsc;

use super::{canonical, disco, lock, DiscoIn, Paths, Route};

/// Loss and delay applied to outgoing UDP datagrams (test networks).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impair {
    /// Probability in [0, 1] that a datagram is dropped.
    pub loss: f64,
    /// Added one-way delay.
    pub delay: Duration,
}

impl Impair {
    /// Parses `loss=0.05,delay_ms=50` (either key may be left out).
    pub fn parse(s: &str) -> Result<Impair, String> {
        let mut imp = Impair {
            loss: 0.0,
            delay: Duration::ZERO,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}` is not KEY=VALUE"))?;
            match k.trim() {
                "loss" => {
                    imp.loss = v
                        .trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|l| (0.0..=1.0).contains(l))
                        .ok_or_else(|| format!("loss `{v}` is not a number in [0, 1]"))?
                }
                "delay_ms" => {
                    imp.delay = Duration::from_millis(
                        v.trim()
                            .parse()
                            .map_err(|_| format!("delay_ms `{v}` is not a whole number"))?,
                    )
                }
                other => return Err(format!("unknown impairment `{other}` (loss, delay_ms)")),
            }
        }
        Ok(imp)
    }
}

/// The socket state shared with the disco engine (direct disco sends).
pub(crate) struct Inner {
    pub(crate) udp: Arc<dyn AsyncUdpSocket>,
    ipv6: bool,
    impair: Option<Impair>,
    delayed: Option<mpsc::UnboundedSender<(tokio::time::Instant, SocketAddr, Bytes)>>,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PathSocketInner")
            .field("ipv6", &self.ipv6)
            .field("impair", &self.impair)
            .finish()
    }
}

/// `addr` in the socket's family (a dual-stack socket wants IPv4
/// destinations in the mapped form).
fn in_family(ipv6: bool, addr: SocketAddr) -> SocketAddr {
    match (ipv6, addr) {
        (true, SocketAddr::V4(v4)) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        _ => addr,
    }
}

impl Inner {
    fn family(&self, addr: SocketAddr) -> SocketAddr {
        in_family(self.ipv6, addr)
    }

    /// Sends one datagram straight to `to` (disco packets, impaired sends).
    pub(crate) fn send_direct(&self, to: SocketAddr, bytes: &[u8]) {
        let t = Transmit {
            destination: self.family(to),
            ecn: None,
            contents: bytes,
            segment_size: None,
            src_ip: None,
        };
        let _ = self.udp.try_send(&t);
    }
}

/// The most UDP payload one GSO send may carry in all: an IPv4 packet's
/// 65535 bytes less its IP and UDP headers.
const MAX_GSO_BYTES: usize = 65507;

/// The overlay endpoint's socket.
pub struct PathSocket {
    inner: Arc<Inner>,
    paths: Arc<Paths>,
    /// Datagrams coalesced by GRO that one receive buffer must hold.
    receive_segments: usize,
    /// Datagrams of one GSO send (all of them one IP packet before the
    /// kernel splits it: 64 KiB at most, or the send fails).
    transmit_segments: usize,
    /// Which receive source goes first this time.
    flip: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for PathSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PathSocket")
            .field("inner", &self.inner)
            .finish()
    }
}

impl PathSocket {
    pub(crate) fn new(
        udp: Arc<dyn AsyncUdpSocket>,
        paths: Arc<Paths>,
        impair: Option<Impair>,
        max_udp_payload: u16,
    ) -> io::Result<PathSocket> {
        // quinn sizes each receive buffer as payload x segments; the kernel
        // never coalesces more than 64 KiB into one, so with large payloads
        // fewer segments fill it (8 of 8952 bytes, not 64 of them).
        let payload = usize::from(max_udp_payload.max(1200));
        let receive_segments = udp
            .max_receive_segments()
            .min((u16::MAX as usize).div_ceil(payload));
        // quinn batches up to 10 datagrams of the path's current size; at
        // jumbo sizes that would pass 64 KiB, and the kernel refuses such a
        // send with EMSGSIZE, which quinn takes as the loss of all of them.
        let transmit_segments = udp
            .max_transmit_segments()
            .min((MAX_GSO_BYTES / payload).max(1));
        let ipv6 = udp.local_addr()?.is_ipv6();
        let impair = impair.filter(|i| i.loss > 0.0 || !i.delay.is_zero());
        let mut inner = Inner {
            udp,
            ipv6,
            impair,
            delayed: None,
        };
        if impair.is_some_and(|i| !i.delay.is_zero()) {
            let (tx, mut rx) =
                mpsc::unbounded_channel::<(tokio::time::Instant, SocketAddr, Bytes)>();
            let udp = inner.udp.clone();
            let fam = ipv6;
            tokio::spawn(async move {
                while let Some((due, to, bytes)) = rx.recv().await {
                    tokio::time::sleep_until(due).await;
                    let t = Transmit {
                        destination: in_family(fam, to),
                        ecn: None,
                        contents: &bytes,
                        segment_size: None,
                        src_ip: None,
                    };
                    let _ = udp.try_send(&t);
                }
            });
            inner.delayed = Some(tx);
        }
        let inner = Arc::new(inner);
        *lock(&paths.direct_out) = Some(Arc::downgrade(&inner));
        Ok(PathSocket {
            inner,
            paths,
            receive_segments,
            transmit_segments,
            flip: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A direct send, through the impairment when one is set.
    fn send_udp(&self, transmit: &Transmit, to: SocketAddr) -> io::Result<()> {
        let Some(imp) = self.inner.impair else {
            if canonical(transmit.destination) == to {
                return self.inner.udp.try_send(transmit);
            }
            let t = Transmit {
                destination: self.inner.family(to),
                ecn: transmit.ecn,
                contents: transmit.contents,
                segment_size: transmit.segment_size,
                src_ip: transmit.src_ip,
            };
            return self.inner.udp.try_send(&t);
        };
        for seg in segments(transmit) {
            if imp.loss > 0.0 && rand::random::<f64>() < imp.loss {
                self.paths
                    .stats
                    .impaired_dropped
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match &self.inner.delayed {
                Some(q) => {
                    let due = tokio::time::Instant::now() + imp.delay;
                    let _ = q.send((due, to, Bytes::copy_from_slice(seg)));
                }
                None => self.inner.send_direct(to, seg),
            }
        }
        Ok(())
    }
}

/// The datagrams of a transmit (several when GSO batches them).
fn segments<'a>(t: &'a Transmit<'a>) -> impl Iterator<Item = &'a [u8]> + 'a {
    let size = t.segment_size.unwrap_or(t.contents.len()).max(1);
    t.contents.chunks(size)
}

/// Weak handle the disco engine sends through.
pub(crate) fn direct_out(paths: &Paths) -> Option<Arc<Inner>> {
    lock(&paths.direct_out).as_ref().and_then(Weak::upgrade)
}

impl AsyncUdpSocket for PathSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.udp.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        if !self.paths.is_active() {
            return match self.inner.impair {
                None => self.inner.udp.try_send(transmit),
                Some(_) => self.send_udp(transmit, canonical(transmit.destination)),
            };
        }
        let dst = canonical(transmit.destination);
        match self.paths.route(dst) {
            Route::Direct(to) => self.send_udp(transmit, to),
            Route::Session(s) => {
                for seg in segments(transmit) {
                    self.paths.enqueue(&s, dst, seg);
                }
                Ok(())
            }
            Route::Local(server) => {
                for seg in segments(transmit) {
                    server.deliver_local(dst, Bytes::copy_from_slice(seg));
                }
                Ok(())
            }
            Route::Drop => {
                self.paths
                    .stats
                    .relayed_dropped
                    .fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        // No relay in sight: the plain socket, nothing else on this path.
        // (When relays come later, the driver's next wake-up, at most a
        // keep-alive interval away, registers the waker below.)
        if !self.paths.is_active() {
            return self.inner.udp.poll_recv(cx, bufs, meta);
        }
        // Waker first, queue second: a datagram relayed in between wakes
        // us instead of being missed.
        {
            let mut w = lock(&self.paths.recv_waker);
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
        }
        // Alternate which source goes first, so neither starves the other.
        let relayed_first = self.flip.fetch_xor(true, Ordering::Relaxed);
        for _ in 0..16 {
            if relayed_first {
                if let Some(n) = self.take_relayed(bufs, meta) {
                    return Poll::Ready(Ok(n));
                }
            }
            match self.inner.udp.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(n)) => {
                    if !self.paths.is_active() {
                        return Poll::Ready(Ok(n));
                    }
                    let kept = self.sift(n, bufs, meta);
                    if kept > 0 {
                        return Poll::Ready(Ok(kept));
                    }
                    // Only disco packets: read on.
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    return match self.take_relayed(bufs, meta) {
                        Some(n) => Poll::Ready(Ok(n)),
                        None => Poll::Pending,
                    };
                }
            }
        }
        // A flood of disco packets: give the runtime a turn.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.udp.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.transmit_segments
    }

    fn max_receive_segments(&self) -> usize {
        self.receive_segments
    }

    fn may_fragment(&self) -> bool {
        self.inner.udp.may_fragment()
    }
}

impl PathSocket {
    /// Datagrams relays delivered, into the buffers; `None` if there are none.
    fn take_relayed(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> Option<usize> {
        if !self.paths.is_active() {
            return None;
        }
        let mut q = lock(&self.paths.relayed_in);
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let Some((src, payload)) = q.pop_front() else {
                break;
            };
            if payload.len() > bufs[n].len() {
                self.paths
                    .stats
                    .relayed_dropped
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            bufs[n][..payload.len()].copy_from_slice(&payload);
            meta[n] = RecvMeta {
                addr: self.inner.family(src),
                len: payload.len(),
                stride: payload.len(),
                ecn: None,
                dst_ip: None,
            };
            n += 1;
        }
        (n > 0).then_some(n)
    }

    /// Takes disco packets out of a received batch and rewrites the source
    /// of direct packets from peers with a confirmed direct path; returns
    /// how many datagrams are left for QUIC (moved to the front).
    fn sift(&self, n: usize, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> usize {
        let st = lock(&self.paths.st);
        let mut kept = 0;
        for i in 0..n {
            let m = meta[i];
            let from = canonical(m.addr);
            if m.len == m.stride && disco::is_disco(&bufs[i][..m.len]) {
                let bytes = Bytes::copy_from_slice(&bufs[i][..m.len]);
                let _ = self
                    .paths
                    .disco_tx
                    .try_send(DiscoIn::Direct { from, bytes });
                continue;
            }
            let mut m = m;
            if let Some(adv) = st.by_direct.get(&from) {
                m.addr = self.inner.family(*adv);
            }
            if kept != i {
                let (head, tail) = bufs.split_at_mut(i);
                head[kept][..m.len].copy_from_slice(&tail[0][..m.len]);
            }
            meta[kept] = m;
            kept += 1;
        }
        kept
    }
}
