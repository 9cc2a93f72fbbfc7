//! UDP echo and probe: how the tests check the lab itself.
//!
//! The relay scenarios are only meaningful if the lab's NATs really are
//! what they claim (one mapping for every destination, or a new one per
//! flow), and partitions and UDP blocks really drop. A probe sends from
//! one socket to several echo servers; each answers with the source
//! address it saw, i.e. the NAT mapping.

use crate::{Error, Result};
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

/// Answers every datagram with the sender's address as text. Runs forever.
pub fn echo(listen: SocketAddr) -> Result<()> {
    let sock = UdpSocket::bind(listen).map_err(Error::io(format!("bind {listen}")))?;
    let mut buf = [0u8; 1500];
    loop {
        let (_, from) = sock
            .recv_from(&mut buf)
            .map_err(Error::io("receive a probe"))?;
        // A lost answer is the prober's to notice.
        let _ = sock.send_to(from.to_string().as_bytes(), from);
    }
}

/// From one socket, asks each of `to` what source address it sees;
/// `None` for a server that did not answer within three tries.
pub fn probe(to: &[SocketAddr], timeout: Duration) -> Result<Vec<Option<SocketAddr>>> {
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(Error::io("bind a probe socket"))?;
    sock.set_read_timeout(Some(timeout))
        .map_err(Error::io("set a timeout"))?;
    let mut seen = Vec::new();
    for dst in to {
        let mut answer = None;
        'tries: for _ in 0..3 {
            if sock.send_to(b"probe", dst).is_err() {
                continue;
            }
            let mut buf = [0u8; 128];
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                if from == *dst {
                    answer = String::from_utf8_lossy(&buf[..n]).parse().ok();
                    break 'tries;
                }
            }
        }
        seen.push(answer);
    }
    Ok(seen)
}
