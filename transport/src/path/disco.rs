//! Path discovery messages ("disco", after Tailscale's): the small packets
//! that find and keep a direct UDP path between two nodes whose overlay
//! connection runs through a relay.
//!
//! They share the overlay's UDP socket with QUIC and start with [`MAGIC`],
//! whose first byte has QUIC's fixed bit clear, so they can never be taken
//! for a QUIC packet (and quinn drops them if one ever reached it).
//!
//! - `CallMeMaybe` travels only through a relay (authenticated by the relay
//!   session): "here are my candidate addresses and the token your pings to
//!   me must carry".
//! - `Ping`/`Pong` travel directly. A ping carries a token the receiver
//!   issued, so a ping proves its sender talked to the receiver through the
//!   relay; a pong echoes the ping's transaction id and tells the pinger the
//!   address it was seen from. Pings to a relay carry the relay session's
//!   token: the relay answers with the observed address (a STUN-like probe).
//! - `DialBack` is what a relay sends, from a socket the node never sent to,
//!   when the node asks whether it is reachable from anywhere.
//!
//! The QUIC connection between the two nodes authenticates them end to end;
//! these messages only choose which way its packets go, so a forged one can
//! at worst cost packets, never let anyone read or inject data.

use std::net::SocketAddr;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::relay::frame::{get_addr, put_addr};

/// First bytes of every disco packet.
pub const MAGIC: [u8; 8] = [0x00, b'D', b'M', b'S', b'C', b'd', b's', b'c'];

/// At most this many candidate addresses in one `CallMeMaybe`.
pub const MAX_CANDIDATES: usize = 8;

/// One disco message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disco {
    CallMeMaybe {
        token: [u8; 16],
        candidates: Vec<SocketAddr>,
    },
    Ping {
        tx: [u8; 12],
        token: [u8; 16],
    },
    Pong {
        tx: [u8; 12],
        observed: SocketAddr,
    },
    DialBack {
        nonce: [u8; 16],
    },
}

const T_CMM: u8 = 1;
const T_PING: u8 = 2;
const T_PONG: u8 = 3;
const T_DIALBACK: u8 = 4;

/// True if `bytes` is a disco packet (and not QUIC).
pub fn is_disco(bytes: &[u8]) -> bool {
    bytes.len() > MAGIC.len() && bytes[..MAGIC.len()] == MAGIC
}

impl Disco {
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(64);
        out.put_slice(&MAGIC);
        match self {
            Disco::CallMeMaybe { token, candidates } => {
                out.put_u8(T_CMM);
                out.put_slice(token);
                let n = candidates.len().min(MAX_CANDIDATES);
                out.put_u8(n as u8);
                for c in &candidates[..n] {
                    put_addr(&mut out, *c);
                }
            }
            Disco::Ping { tx, token } => {
                out.put_u8(T_PING);
                out.put_slice(tx);
                out.put_slice(token);
            }
            Disco::Pong { tx, observed } => {
                out.put_u8(T_PONG);
                out.put_slice(tx);
                put_addr(&mut out, *observed);
            }
            Disco::DialBack { nonce } => {
                out.put_u8(T_DIALBACK);
                out.put_slice(nonce);
            }
        }
        out.freeze()
    }

    /// Parses a disco packet; `None` for anything malformed (dropped).
    pub fn parse(bytes: &[u8]) -> Option<Disco> {
        if !is_disco(bytes) {
            return None;
        }
        let mut b = &bytes[MAGIC.len()..];
        let kind = b.get_u8();
        let take = |b: &mut &[u8], out: &mut [u8]| -> Option<()> {
            if b.len() < out.len() {
                return None;
            }
            b.copy_to_slice(out);
            Some(())
        };
        let msg = match kind {
            T_CMM => {
                let mut token = [0u8; 16];
                take(&mut b, &mut token)?;
                if b.is_empty() {
                    return None;
                }
                let n = b.get_u8() as usize;
                if n > MAX_CANDIDATES {
                    return None;
                }
                let mut candidates = Vec::with_capacity(n);
                for _ in 0..n {
                    candidates.push(get_addr(0, &mut b).ok()?);
                }
                Disco::CallMeMaybe { token, candidates }
            }
            T_PING => {
                let mut tx = [0u8; 12];
                let mut token = [0u8; 16];
                take(&mut b, &mut tx)?;
                take(&mut b, &mut token)?;
                Disco::Ping { tx, token }
            }
            T_PONG => {
                let mut tx = [0u8; 12];
                take(&mut b, &mut tx)?;
                Disco::Pong {
                    tx,
                    observed: get_addr(0, &mut b).ok()?,
                }
            }
            T_DIALBACK => {
                let mut nonce = [0u8; 16];
                take(&mut b, &mut nonce)?;
                Disco::DialBack { nonce }
            }
            _ => return None,
        };
        b.is_empty().then_some(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn messages_round_trip_and_are_not_quic() {
        for m in [
            Disco::CallMeMaybe {
                token: [3; 16],
                candidates: vec![
                    "1.2.3.4:5".parse().expect("a"),
                    "[::1]:7".parse().expect("a"),
                ],
            },
            Disco::Ping {
                tx: [1; 12],
                token: [2; 16],
            },
            Disco::Pong {
                tx: [1; 12],
                observed: "9.9.9.9:1234".parse().expect("a"),
            },
            Disco::DialBack { nonce: [5; 16] },
        ] {
            let b = m.to_bytes();
            // QUIC packets always have the fixed bit (0x40) set.
            assert_eq!(b[0] & 0x40, 0);
            assert_eq!(Disco::parse(&b), Some(m));
        }
        assert_eq!(Disco::parse(b"\x40quic short header"), None);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_after_the_magic_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut b = MAGIC.to_vec();
            b.extend(tail);
            let _ = Disco::parse(&b);
        }
    }
}
