//! The control channel between nodes: the clock and address questions here,
//! the tenant-policy ones in [`super::policy`]. `clock`, which a peer
//! answers with its wall clock so `dmsc-node check` can report skew, and
//! `whoami`, which it answers with the address it sees the asker at, so
//! `dmsc-node netcheck` has a second observer of this host's public address
//! besides a relay.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use dmsc_transport::{BiStream, Channel, Overlay};

/// Answers a peer's control question: `clock`, the node's wall clock in
/// unix milliseconds (for `dmsc-node check`), `whoami`, or one of the
/// tenant-policy questions of [`super::policy`].
pub async fn serve_control(mut s: BiStream, d: std::sync::Arc<crate::forward::Delegator>) {
    let mut q = Vec::new();
    let read = async {
        while q.len() < super::policy::MAX_QUESTION {
            match s.recv.read_chunk(super::policy::MAX_QUESTION).await {
                Ok(Some(b)) => q.extend_from_slice(&b),
                _ => break,
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .is_err()
    {
        s.send.reset(dmsc_transport::overlay::RESET_BUSY);
        return;
    }
    if let Some(tenant) = q.strip_prefix(b"policy ") {
        let tenant = String::from_utf8_lossy(tenant).into_owned();
        super::policy::answer_policy(&mut s, &d, &tenant).await;
        return;
    }
    if let Some(report) = q.strip_prefix(b"denied\n") {
        super::policy::take_report(&s, &d, report);
        let _ = s.send.finish();
        return;
    }
    if q == b"whoami" {
        if s.send
            .write_all(s.from.to_string().as_bytes())
            .await
            .is_ok()
        {
            let _ = s.send.finish();
        }
        return;
    }
    if q != b"clock" {
        s.send.reset(dmsc_transport::overlay::RESET_BUSY);
        return;
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default();
    if s.send.write_all(&now.to_be_bytes()).await.is_ok() {
        let _ = s.send.finish();
    }
}

/// Why a peer's clock could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error(transparent)]
    Stream(#[from] dmsc_transport::TransportError),
    #[error("short clock answer ({0} of 8 bytes)")]
    Short(usize),
}

/// Asks a peer for its clock; returns (peer clock - our clock at the
/// midpoint, round trip), in milliseconds.
pub async fn clock_skew(overlay: &Overlay, addr: SocketAddr) -> Result<(i64, u64), ClockError> {
    let now_ms = || {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default()
    };
    let t0 = now_ms();
    let mut s = overlay.open_stream(addr, Channel::Control).await?;
    s.send.write_all(b"clock").await?;
    s.send.finish()?;
    let mut buf = Vec::new();
    while buf.len() < 8 {
        match s.recv.read_chunk(8).await? {
            Some(b) => buf.extend_from_slice(&b),
            None => break,
        }
    }
    let t1 = now_ms();
    let bytes: [u8; 8] = buf
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or(ClockError::Short(buf.len()))?;
    let theirs = u64::from_be_bytes(bytes) as i64;
    Ok((theirs - (t0 + t1) / 2, (t1 - t0).max(0) as u64))
}

/// Asks a peer which address it sees this node at (`netcheck`).
pub async fn observed_by(overlay: &Overlay, addr: SocketAddr) -> Result<SocketAddr, ClockError> {
    let mut s = overlay.open_stream(addr, Channel::Control).await?;
    s.send.write_all(b"whoami").await?;
    s.send.finish()?;
    let mut buf = Vec::new();
    while buf.len() < 64 {
        match s.recv.read_chunk(64).await? {
            Some(b) => buf.extend_from_slice(&b),
            None => break,
        }
    }
    std::str::from_utf8(&buf)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or(ClockError::Short(buf.len()))
}
