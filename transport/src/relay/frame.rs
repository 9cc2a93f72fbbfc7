//! The relay protocol's frames, sans-I/O.
//!
//! A relay session is a reliable byte stream between a node and a relay: a
//! bidirectional QUIC stream on the node's overlay connection to the relay,
//! or a TCP + TLS 1.3 connection when UDP does not get through. Both carry
//! the same frames: a type byte, a big-endian `u16` body length, the body.
//! Datagrams travel in `Send` (node to relay, with the address the sender
//! uses for the destination) and `Recv` (relay to node, with the address the
//! receiver knows the sender by); their payloads are the nodes' own QUIC
//! packets, so the relay moves ciphertext it cannot read or forge.
//!
//! [`Decoder`] refuses unknown types, short or oversized bodies and bad
//! addresses before allocating; a malformed frame ends only that session.
//! It is property-tested here and fuzzed (`fuzz/fuzz_targets/relay_frame.rs`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Frame header: type and body length.
pub const HEADER_LEN: usize = 3;
/// Largest body (a UDP datagram plus an address fits).
pub const MAX_BODY: usize = u16::MAX as usize;

/// One relay protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Node to relay, first frame: the overlay address this node is known
    /// by (its advertised address; the relay checks the claim). An
    /// unspecified address marks a probe (`netcheck`): welcomed, measured,
    /// never registered for delivery.
    Hello {
        advertised: SocketAddr,
    },
    /// Relay to node, answer to `Hello`: the node's address as the relay
    /// sees it (QUIC sessions only; a TCP source port says nothing about
    /// UDP) and a token the node's UDP probes to this relay must carry.
    Welcome {
        observed: Option<SocketAddr>,
        token: [u8; 16],
    },
    /// Node to relay: deliver `payload` to the node known as `dst`.
    Send {
        dst: SocketAddr,
        payload: Bytes,
    },
    /// Relay to node: `payload` from the node whose address is `src`.
    Recv {
        src: SocketAddr,
        payload: Bytes,
    },
    /// Relay to node: no session of this relay answers for `dst`.
    Unknown {
        dst: SocketAddr,
    },
    /// Either way: liveness and RTT.
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// Node to relay: send a probe carrying `nonce` to my observed address
    /// from a socket I never sent to (am I reachable from anywhere?).
    DialBack {
        nonce: [u8; 16],
    },
    /// Relay to node, before it closes the session: why.
    Refused {
        reason: String,
    },
}

const T_HELLO: u8 = 1;
const T_WELCOME: u8 = 2;
const T_SEND: u8 = 3;
const T_RECV: u8 = 4;
const T_UNKNOWN: u8 = 5;
const T_PING: u8 = 6;
const T_PONG: u8 = 7;
const T_DIALBACK: u8 = 8;
const T_REFUSED: u8 = 9;

/// Why bytes from a relay peer were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayFrameError {
    #[error("unknown relay frame type {0}")]
    UnknownType(u8),
    #[error("relay frame type {kind} with a malformed body: {why}")]
    Malformed { kind: u8, why: &'static str },
    #[error("relay frame body of {0} bytes exceeds {MAX_BODY}")]
    TooLarge(usize),
}

fn malformed(kind: u8, why: &'static str) -> RelayFrameError {
    RelayFrameError::Malformed { kind, why }
}

/// Appends the wire form of an address: family (4 or 6), IP, port.
pub fn put_addr(out: &mut BytesMut, addr: SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.put_u8(4);
            out.put_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.put_u8(6);
            out.put_slice(&ip.octets());
        }
    }
    out.put_u16(addr.port());
}

/// Reads an address written by [`put_addr`].
pub fn get_addr(kind: u8, body: &mut &[u8]) -> Result<SocketAddr, RelayFrameError> {
    if body.is_empty() {
        return Err(malformed(kind, "missing address"));
    }
    let ip = match body.get_u8() {
        4 if body.len() >= 6 => {
            let mut o = [0u8; 4];
            body.copy_to_slice(&mut o);
            IpAddr::V4(Ipv4Addr::from(o))
        }
        6 if body.len() >= 18 => {
            let mut o = [0u8; 16];
            body.copy_to_slice(&mut o);
            IpAddr::V6(Ipv6Addr::from(o))
        }
        4 | 6 => return Err(malformed(kind, "truncated address")),
        _ => return Err(malformed(kind, "bad address family")),
    };
    Ok(SocketAddr::new(ip, body.get_u16()))
}

impl Frame {
    /// Appends the frame to `out`; an oversized payload is an error, never
    /// a truncated frame.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), RelayFrameError> {
        // Header first with a placeholder length, body straight after it:
        // one buffer, no copy of the datagram through a scratch body.
        let start = out.len();
        out.put_slice(&[0; HEADER_LEN]);

        let kind = match self {
            Frame::Hello { advertised } => {
                put_addr(out, *advertised);
                T_HELLO
            }
            Frame::Welcome { observed, token } => {
                out.put_slice(token);
                if let Some(o) = observed {
                    put_addr(out, *o);
                }
                T_WELCOME
            }
            Frame::Send { dst, payload } => {
                put_addr(out, *dst);
                out.put_slice(payload);
                T_SEND
            }
            Frame::Recv { src, payload } => {
                put_addr(out, *src);
                out.put_slice(payload);
                T_RECV
            }
            Frame::Unknown { dst } => {
                put_addr(out, *dst);
                T_UNKNOWN
            }
            Frame::Ping { nonce } => {
                out.put_u64(*nonce);
                T_PING
            }
            Frame::Pong { nonce } => {
                out.put_u64(*nonce);
                T_PONG
            }
            Frame::DialBack { nonce } => {
                out.put_slice(nonce);
                T_DIALBACK
            }
            Frame::Refused { reason } => {
                out.put_slice(reason.as_bytes());
                T_REFUSED
            }
        };
        let len = out.len() - start - HEADER_LEN;
        if len > MAX_BODY {
            out.truncate(start);
            return Err(RelayFrameError::TooLarge(len));
        }
        out[start] = kind;
        out[start + 1..start + HEADER_LEN].copy_from_slice(&(len as u16).to_be_bytes());
        Ok(())
    }

    /// A `Send` frame for a datagram still in the caller's buffer: the
    /// socket's hot path, encoded with one allocation and one copy.
    pub fn send_bytes(dst: SocketAddr, payload: &[u8]) -> Result<Bytes, RelayFrameError> {
        if payload.is_empty() {
            return Err(malformed(T_SEND, "empty datagram"));
        }
        let mut addr = BytesMut::with_capacity(19);
        put_addr(&mut addr, dst);
        let len = addr.len() + payload.len();
        if len > MAX_BODY {
            return Err(RelayFrameError::TooLarge(len));
        }
        let mut out = BytesMut::with_capacity(HEADER_LEN + len);
        out.put_u8(T_SEND);
        out.put_u16(len as u16);
        out.put_slice(&addr);
        out.put_slice(payload);
        Ok(out.freeze())
    }

    /// The frame as bytes.
    pub fn to_bytes(&self) -> Result<Bytes, RelayFrameError> {
        let mut out = BytesMut::new();
        self.encode(&mut out)?;
        Ok(out.freeze())
    }

    /// Parses one frame's body.
    pub fn decode(kind: u8, body: Bytes) -> Result<Frame, RelayFrameError> {
        let mut b: &[u8] = &body;
        let frame = match kind {
            T_HELLO => Frame::Hello {
                advertised: get_addr(kind, &mut b)?,
            },
            T_WELCOME => {
                if b.len() < 16 {
                    return Err(malformed(kind, "short token"));
                }
                let mut token = [0u8; 16];
                b.copy_to_slice(&mut token);
                let observed = if b.is_empty() {
                    None
                } else {
                    Some(get_addr(kind, &mut b)?)
                };
                Frame::Welcome { observed, token }
            }
            T_SEND | T_RECV => {
                let addr = get_addr(kind, &mut b)?;
                let payload = body.slice(body.len() - b.len()..);
                b = &[];
                if payload.is_empty() {
                    return Err(malformed(kind, "empty datagram"));
                }
                if kind == T_SEND {
                    Frame::Send { dst: addr, payload }
                } else {
                    Frame::Recv { src: addr, payload }
                }
            }
            T_UNKNOWN => Frame::Unknown {
                dst: get_addr(kind, &mut b)?,
            },
            T_PING | T_PONG => {
                if b.len() < 8 {
                    return Err(malformed(kind, "short nonce"));
                }
                let nonce = b.get_u64();
                if kind == T_PING {
                    Frame::Ping { nonce }
                } else {
                    Frame::Pong { nonce }
                }
            }
            T_DIALBACK => {
                if b.len() < 16 {
                    return Err(malformed(kind, "short nonce"));
                }
                let mut nonce = [0u8; 16];
                b.copy_to_slice(&mut nonce);
                Frame::DialBack { nonce }
            }
            T_REFUSED => {
                let reason = std::str::from_utf8(b)
                    .map_err(|_| malformed(kind, "reason is not UTF-8"))?
                    .to_string();
                b = &[];
                Frame::Refused { reason }
            }
            other => return Err(RelayFrameError::UnknownType(other)),
        };
        if !b.is_empty() {
            return Err(malformed(kind, "trailing bytes"));
        }
        Ok(frame)
    }
}

/// Incremental decoder: push bytes as they arrive, take whole frames.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, `None` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, RelayFrameError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let kind = self.buf[0];
        if !(T_HELLO..=T_REFUSED).contains(&kind) {
            return Err(RelayFrameError::UnknownType(kind));
        }
        let len = u16::from_be_bytes([self.buf[1], self.buf[2]]) as usize;
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        self.buf.advance(HEADER_LEN);
        let body = self.buf.split_to(len).freeze();
        Frame::decode(kind, body).map(Some)
    }

    /// Bytes received but not yet a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Frame> {
        let v4: SocketAddr = "10.1.2.3:7400".parse().expect("addr");
        let v6: SocketAddr = "[fd00::1]:9".parse().expect("addr");
        vec![
            Frame::Hello { advertised: v4 },
            Frame::Welcome {
                observed: Some(v6),
                token: [7; 16],
            },
            Frame::Welcome {
                observed: None,
                token: [1; 16],
            },
            Frame::Send {
                dst: v6,
                payload: Bytes::from_static(b"quic packet"),
            },
            Frame::Recv {
                src: v4,
                payload: Bytes::from(vec![0u8; 1500]),
            },
            Frame::Unknown { dst: v4 },
            Frame::Ping { nonce: 42 },
            Frame::Pong { nonce: u64::MAX },
            Frame::DialBack { nonce: [9; 16] },
            Frame::Refused {
                reason: "revoked".into(),
            },
        ]
    }

    #[test]
    fn every_frame_round_trips_byte_by_byte() {
        let mut wire = BytesMut::new();
        for f in samples() {
            f.encode(&mut wire).expect("encode");
        }
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for b in wire.iter() {
            d.push(&[*b]);
            while let Some(f) = d.next_frame().expect("decode") {
                got.push(f);
            }
        }
        assert_eq!(got, samples());
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        for bad in [
            &[0u8, 0, 0][..],
            &[T_HELLO, 0, 1, 5],
            &[T_HELLO, 0, 3, 4, 1, 2],
            &[T_SEND, 0, 7, 4, 1, 2, 3, 4, 0, 1],
            &[T_PING, 0, 2, 1, 2],
            &[T_UNKNOWN, 0, 8, 4, 1, 2, 3, 4, 0, 1, 9],
            &[77, 0, 0],
        ] {
            let mut d = Decoder::new();
            d.push(bad);
            assert!(d.next_frame().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_hot_path_datagram_encoder_matches_the_frame() {
        let dst: SocketAddr = "240.1.2.3:7400".parse().expect("addr");
        let p = b"quic packet";
        assert_eq!(
            Frame::send_bytes(dst, p).expect("encode"),
            Frame::Send {
                dst,
                payload: Bytes::from_static(p)
            }
            .to_bytes()
            .expect("encode")
        );
    }

    #[test]
    fn an_oversized_datagram_is_refused_at_encoding() {
        let f = Frame::Send {
            dst: "1.2.3.4:5".parse().expect("addr"),
            payload: Bytes::from(vec![0u8; MAX_BODY]),
        };
        assert!(matches!(
            f.encode(&mut BytesMut::new()),
            Err(RelayFrameError::TooLarge(_))
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut d = Decoder::new();
            d.push(&bytes);
            while let Ok(Some(_)) = d.next_frame() {}
        }

        #[test]
        fn datagrams_round_trip(payload in proptest::collection::vec(any::<u8>(), 1..2000), port in 1u16..) {
            let f = Frame::Send { dst: SocketAddr::from(([127, 0, 0, 1], port)), payload: Bytes::from(payload) };
            let mut d = Decoder::new();
            d.push(&f.to_bytes().expect("encode"));
            prop_assert_eq!(d.next_frame().expect("decode"), Some(f));
        }
    }
}
