//! [`UdpSocket`]: the overlay's UDP socket, as quinn's tokio one but
//! registered with the reactor for reading only.
//!
//! Why: every datagram sent on a socket that epoll watches for writing
//! reports it writable again as soon as the kernel frees the datagram (on
//! loopback, at once), so each send cost the node one more `epoll_wait`
//! and a turn of the runtime for nothing; quinn only needs to hear about
//! writability after a send found the buffer full. Sends here are plain
//! non-blocking sends; after a `WouldBlock`, the poller registers a
//! duplicate of the socket for writing until it is writable, then drops it.
//! A read that brings fewer datagrams than it had room for also marks the
//! socket drained, sparing the `recvmmsg` that would only say `EAGAIN`.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// A UDP socket read through the reactor and written without it.
pub(crate) struct UdpSocket {
    io: AsyncFd<std::net::UdpSocket>,
    state: UdpSocketState,
    /// A send found the buffer full; cleared once it is writable again.
    full: AtomicBool,
}

impl fmt::Debug for UdpSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UdpSocket")
            .field("local", &self.io.get_ref().local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl UdpSocket {
    /// Takes over `sock` (made non-blocking, with quinn's socket options).
    /// Needs a tokio runtime.
    pub(crate) fn new(sock: std::net::UdpSocket) -> io::Result<UdpSocket> {
        let state = UdpSocketState::new((&sock).into())?;
        sock.set_nonblocking(true)?;
        Ok(UdpSocket {
            io: register(sock, Interest::READABLE)?,
            state,
            full: AtomicBool::new(false),
        })
    }
}

impl AsyncUdpSocket for UdpSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(WritablePoller {
            socket: self,
            waiting: None,
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let sent = self.state.send(self.io.get_ref().into(), transmit);
        if sent
            .as_ref()
            .is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock)
        {
            self.full.store(true, Ordering::Relaxed);
        }
        sent
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let room = bufs.len().min(meta.len());
        loop {
            let mut guard = ready!(self.io.poll_read_ready(cx))?;
            if let Ok(res) = guard.try_io(|io| self.state.recv(io.get_ref().into(), bufs, meta)) {
                if res.as_ref().is_ok_and(|n| *n < room) {
                    // Fewer datagrams than asked for: the queue is empty,
                    // so skip the read that would only say `EAGAIN`. A
                    // datagram that came after the read is a new event
                    // for the reactor, which this does not clear.
                    guard.clear_ready();
                }
                return Poll::Ready(res);
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}

/// Registers `sock` with the reactor for `interest`.
// `with_interest` is deprecated because a `T` could hand the reactor a file
// descriptor that it later closes or swaps; a `std::net::UdpSocket` owns
// its descriptor for as long as it lives, which is the contract the
// (unsafe) replacement asks callers to keep.
#[allow(deprecated)]
fn register(
    sock: std::net::UdpSocket,
    interest: Interest,
) -> io::Result<AsyncFd<std::net::UdpSocket>> {
    AsyncFd::with_interest(sock, interest)
}

/// Waits for the socket to take sends again after one found it full: a
/// duplicate of the socket registered for writing, only while waiting.
struct WritablePoller {
    socket: Arc<UdpSocket>,
    waiting: Option<AsyncFd<std::net::UdpSocket>>,
}

impl fmt::Debug for WritablePoller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WritablePoller")
            .field("waiting", &self.waiting.is_some())
            .finish()
    }
}

impl UdpPoller for WritablePoller {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let fd = match this.waiting {
            Some(ref fd) => fd,
            // quinn asks before every send: answer at once unless a send
            // found the buffer full.
            None if !this.socket.full.load(Ordering::Relaxed) => return Poll::Ready(Ok(())),
            None => {
                let dup = this.socket.io.get_ref().try_clone()?;
                this.waiting.insert(register(dup, Interest::WRITABLE)?)
            }
        };
        let ready = ready!(fd.poll_write_ready(cx)).map(drop);
        // Writable (or broken): stop watching until a send finds it full.
        this.waiting = None;
        this.socket.full.store(false, Ordering::Relaxed);
        Poll::Ready(ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Datagrams go out and come in through the socket, and the poller
    /// waits for room only after a send found none.
    #[tokio::test]
    async fn sends_receives_and_waits_for_room() {
        let a = Arc::new(
            UdpSocket::new(std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a")).expect("a"),
        );
        let b =
            UdpSocket::new(std::net::UdpSocket::bind("127.0.0.1:0").expect("bind b")).expect("b");
        let to = b.local_addr().expect("addr");
        let payload = [7u8; 1200];
        let t = Transmit {
            destination: to,
            ecn: None,
            contents: &payload,
            segment_size: None,
            src_ip: None,
        };
        a.try_send(&t).expect("send");
        let mut buf = vec![0u8; 65536];
        let mut meta = [RecvMeta::default()];
        let n = std::future::poll_fn(|cx| {
            let mut bufs = [IoSliceMut::new(&mut buf)];
            b.poll_recv(cx, &mut bufs, &mut meta)
        })
        .await
        .expect("recv");
        assert_eq!(n, 1);
        assert_eq!(meta[0].len, payload.len());
        assert_eq!(&buf[..payload.len()], &payload[..]);

        // A read with room to spare marks the socket drained; what comes
        // after it must still wake the reader.
        let mut bufs4 = vec![vec![0u8; 2048]; 4];
        let mut meta4 = [RecvMeta::default(); 4];
        for round in 0..3 {
            for _ in 0..2 {
                a.try_send(&t).expect("send");
            }
            let mut got = 0;
            while got < 2 {
                got += tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    std::future::poll_fn(|cx| {
                        let mut bufs: Vec<IoSliceMut<'_>> =
                            bufs4.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                        b.poll_recv(cx, &mut bufs, &mut meta4)
                    }),
                )
                .await
                .unwrap_or_else(|_| panic!("round {round}: datagram {got} never came"))
                .expect("recv");
            }
            assert_eq!(got, 2, "round {round}");
        }

        // After a send found the buffer full the poller watches a duplicate
        // of the socket for writing (on loopback a send never finds it full,
        // so the flag is set by hand), answers once the kernel says so and
        // stops watching.
        let mut poller = a.clone().create_io_poller();
        a.full.store(true, Ordering::Relaxed);
        writable(&mut poller).await;
        assert!(!a.full.load(Ordering::Relaxed));
        // Writable when nothing is queued: at once.
        writable(&mut poller).await;
    }

    async fn writable(poller: &mut Pin<Box<dyn UdpPoller>>) {
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)),
        )
        .await
        .expect("writable within 5 s")
        .expect("writable");
    }
}
