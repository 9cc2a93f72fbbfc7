//! Relays: ordinary mesh nodes (`[relay] enabled = true`) that forward the
//! overlay's UDP datagrams between nodes that cannot reach each other
//! directly, over sessions that only mesh-authenticated nodes can open.
//!
//! - [`frame`]: the session protocol, sans-I/O;
//! - [`server`]: the relay role: sessions by node, forwarding with per-pair
//!   limits, dial-back probes, metrics, refusals for the audit log;
//! - [`client`]: every node's sessions to the relays it knows, over QUIC
//!   (a stream on the overlay connection to the relay) or, when UDP does
//!   not get through, TCP + TLS 1.3 with the same certificates.
//!
//! A session carries datagrams, never streams: the nodes' own QUIC
//! connection runs end to end inside them, so a relay sees ciphertext only.

pub mod client;
pub mod frame;
pub mod server;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// The reading half of a session's byte stream.
pub type SessionRead = Box<dyn AsyncRead + Send + Unpin>;
/// The writing half of a session's byte stream.
pub type SessionWrite = Box<dyn AsyncWrite + Send + Unpin>;

pub use frame::{Frame, RelayFrameError};
pub use server::{RelayEvent, RelayLimits, RelayServer, RelayStats};

/// Writes a session's queued frames, as many as are waiting (up to 64 KiB)
/// per write, so a busy session costs one write per batch, not per
/// datagram. Ends when the queue closes or a write fails.
/// `queued`, when given, counts the bytes waiting (the sender adds, this
/// subtracts).
pub(crate) fn spawn_writer(
    mut wr: SessionWrite,
    mut rx: mpsc::Receiver<Bytes>,
    queued: Option<std::sync::Arc<std::sync::atomic::AtomicUsize>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut batch = BytesMut::new();
        while let Some(b) = rx.recv().await {
            batch.extend_from_slice(&b);
            while batch.len() < 64 * 1024 {
                match rx.try_recv() {
                    Ok(b) => batch.extend_from_slice(&b),
                    Err(_) => break,
                }
            }
            if let Some(q) = &queued {
                q.fetch_sub(batch.len(), std::sync::atomic::Ordering::Relaxed);
            }
            if wr.write_all(&batch).await.is_err() || wr.flush().await.is_err() {
                break;
            }
            batch.clear();
        }
        let _ = wr.shutdown().await;
    })
}
