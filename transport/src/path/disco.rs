//! Path discovery messages ("disco", after Tailscale's): the small packets
//! that find and keep a direct UDP path between two nodes whose overlay
//! connection runs through a relay.
//!
//! They share the overlay's UDP socket with QUIC and start with [`MAGIC`],
//! whose first byte has QUIC's fixed bit clear, so they can never be taken
//! for a QUIC packet (and quinn drops them if one ever reached it).
//!
//! Between two nodes every message is authenticated end to end: an
//! HMAC-SHA256 keyed with material exported from the pair's own QUIC +
//! mutual TLS 1.3 connection ([`pair_key`]). A relay forwards `CallMeMaybe`
//! but cannot forge or alter it, and nobody off the pair can forge a ping or
//! a pong, so no one but the two ends can choose the path of their packets.
//!
//! - `CallMeMaybe` travels through a relay: "here are my candidate
//!   addresses";
//! - `Ping`/`Pong` travel directly; a ping names the sender's advertised
//!   address (which tells the receiver which pair key to check with) and a
//!   timestamp (old pings are refused), a pong echoes the transaction id
//!   and tells the pinger the address it was seen from;
//! - `RelayPing`/`RelayPong`: the STUN-like probe of a relay, carrying the
//!   token of the node's relay session (is UDP getting out, and from which
//!   address);
//! - `DialBack` is what a relay sends, from a socket the node never sent to,
//!   when the node asks whether it is reachable from anywhere.

use std::net::SocketAddr;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ring::hmac;

use crate::relay::frame::{get_addr, put_addr};

/// First bytes of every disco packet.
pub const MAGIC: [u8; 8] = [0x00, b'D', b'M', b'S', b'C', b'd', b's', b'c'];

/// At most this many candidate addresses in one `CallMeMaybe`.
pub const MAX_CANDIDATES: usize = 8;

/// TLS exporter label of the pair key (RFC 5705 / RFC 8446 section 7.5).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-dmsc-disco-v1";

/// Length of the MAC on pair messages.
pub const MAC_LEN: usize = 32;

/// One disco message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disco {
    CallMeMaybe {
        candidates: Vec<SocketAddr>,
        mac: [u8; MAC_LEN],
    },
    Ping {
        tx: [u8; 12],
        /// The sender's advertised overlay address.
        sender: SocketAddr,
        /// Sender's clock, unix milliseconds.
        ts_ms: u64,
        mac: [u8; MAC_LEN],
    },
    Pong {
        tx: [u8; 12],
        observed: SocketAddr,
        mac: [u8; MAC_LEN],
    },
    RelayPing {
        tx: [u8; 12],
        token: [u8; 16],
    },
    RelayPong {
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
const T_RELAY_PING: u8 = 5;
const T_RELAY_PONG: u8 = 6;

/// True if `bytes` is a disco packet (and not QUIC).
pub fn is_disco(bytes: &[u8]) -> bool {
    bytes.len() > MAGIC.len() && bytes[..MAGIC.len()] == MAGIC
}

/// The key two nodes share for their disco messages, from their connection.
#[derive(Clone)]
pub struct PairKey(hmac::Key);

impl std::fmt::Debug for PairKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PairKey(..)")
    }
}

/// Builds a pair key from exported keying material.
pub fn pair_key(material: &[u8; 32]) -> PairKey {
    PairKey(hmac::Key::new(hmac::HMAC_SHA256, material))
}

impl PairKey {
    fn tag(&self, parts: &[&[u8]]) -> [u8; MAC_LEN] {
        let mut ctx = hmac::Context::with_key(&self.0);
        for p in parts {
            ctx.update(p);
        }
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }

    fn check(&self, parts: &[&[u8]], mac: &[u8; MAC_LEN]) -> bool {
        let mut data = Vec::new();
        for p in parts {
            data.extend_from_slice(p);
        }
        hmac::verify(&self.0, &data, mac).is_ok()
    }
}

fn addrs_bytes(addrs: &[SocketAddr]) -> Vec<u8> {
    let mut b = BytesMut::new();
    for a in addrs {
        put_addr(&mut b, *a);
    }
    b.to_vec()
}

fn addr_bytes(a: SocketAddr) -> Vec<u8> {
    addrs_bytes(&[a])
}

impl Disco {
    pub fn call_me_maybe(key: &PairKey, candidates: Vec<SocketAddr>) -> Disco {
        let mut candidates = candidates;
        candidates.truncate(MAX_CANDIDATES);
        let mac = key.tag(&[b"cmm", &addrs_bytes(&candidates)]);
        Disco::CallMeMaybe { candidates, mac }
    }

    pub fn ping(key: &PairKey, tx: [u8; 12], sender: SocketAddr, ts_ms: u64) -> Disco {
        let mac = key.tag(&[b"ping", &tx, &addr_bytes(sender), &ts_ms.to_be_bytes()]);
        Disco::Ping {
            tx,
            sender,
            ts_ms,
            mac,
        }
    }

    pub fn pong(key: &PairKey, tx: [u8; 12], observed: SocketAddr) -> Disco {
        let mac = key.tag(&[b"pong", &tx, &addr_bytes(observed)]);
        Disco::Pong { tx, observed, mac }
    }

    /// True if this pair message carries a valid MAC under `key`; false for
    /// every other message.
    pub fn verify(&self, key: &PairKey) -> bool {
        match self {
            Disco::CallMeMaybe { candidates, mac } => {
                key.check(&[b"cmm", &addrs_bytes(candidates)], mac)
            }
            Disco::Ping {
                tx,
                sender,
                ts_ms,
                mac,
            } => key.check(
                &[b"ping", tx, &addr_bytes(*sender), &ts_ms.to_be_bytes()],
                mac,
            ),
            Disco::Pong { tx, observed, mac } => {
                key.check(&[b"pong", tx, &addr_bytes(*observed)], mac)
            }
            _ => false,
        }
    }

    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(96);
        out.put_slice(&MAGIC);
        match self {
            Disco::CallMeMaybe { candidates, mac } => {
                out.put_u8(T_CMM);
                let n = candidates.len().min(MAX_CANDIDATES);
                out.put_u8(n as u8);
                for c in &candidates[..n] {
                    put_addr(&mut out, *c);
                }
                out.put_slice(mac);
            }
            Disco::Ping {
                tx,
                sender,
                ts_ms,
                mac,
            } => {
                out.put_u8(T_PING);
                out.put_slice(tx);
                put_addr(&mut out, *sender);
                out.put_u64(*ts_ms);
                out.put_slice(mac);
            }
            Disco::Pong { tx, observed, mac } => {
                out.put_u8(T_PONG);
                out.put_slice(tx);
                put_addr(&mut out, *observed);
                out.put_slice(mac);
            }
            Disco::RelayPing { tx, token } => {
                out.put_u8(T_RELAY_PING);
                out.put_slice(tx);
                out.put_slice(token);
            }
            Disco::RelayPong { tx, observed } => {
                out.put_u8(T_RELAY_PONG);
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
        fn take<const N: usize>(b: &mut &[u8]) -> Option<[u8; N]> {
            if b.len() < N {
                return None;
            }
            let mut out = [0u8; N];
            b.copy_to_slice(&mut out);
            Some(out)
        }
        let msg = match kind {
            T_CMM => {
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
                Disco::CallMeMaybe {
                    candidates,
                    mac: take(&mut b)?,
                }
            }
            T_PING => {
                let tx = take(&mut b)?;
                let sender = get_addr(0, &mut b).ok()?;
                let ts = take::<8>(&mut b)?;
                Disco::Ping {
                    tx,
                    sender,
                    ts_ms: u64::from_be_bytes(ts),
                    mac: take(&mut b)?,
                }
            }
            T_PONG => {
                let tx = take(&mut b)?;
                let observed = get_addr(0, &mut b).ok()?;
                Disco::Pong {
                    tx,
                    observed,
                    mac: take(&mut b)?,
                }
            }
            T_RELAY_PING => Disco::RelayPing {
                tx: take(&mut b)?,
                token: take(&mut b)?,
            },
            T_RELAY_PONG => {
                let tx = take(&mut b)?;
                Disco::RelayPong {
                    tx,
                    observed: get_addr(0, &mut b).ok()?,
                }
            }
            T_DIALBACK => Disco::DialBack {
                nonce: take(&mut b)?,
            },
            _ => return None,
        };
        b.is_empty().then_some(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn messages_round_trip_and_are_not_quic() {
        let key = pair_key(&[7; 32]);
        for m in [
            Disco::call_me_maybe(&key, vec![addr("1.2.3.4:5"), addr("[::1]:7")]),
            Disco::ping(&key, [1; 12], addr("240.1.2.3:9"), 42),
            Disco::pong(&key, [1; 12], addr("9.9.9.9:1234")),
            Disco::RelayPing {
                tx: [3; 12],
                token: [4; 16],
            },
            Disco::RelayPong {
                tx: [3; 12],
                observed: addr("9.9.9.9:1"),
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

    #[test]
    fn pair_messages_verify_only_under_the_pair_key_and_unaltered() {
        let key = pair_key(&[7; 32]);
        let other = pair_key(&[8; 32]);
        let cmm = Disco::call_me_maybe(&key, vec![addr("1.2.3.4:5")]);
        assert!(cmm.verify(&key));
        assert!(
            !cmm.verify(&other),
            "a relay without the pair key cannot forge it"
        );
        let Disco::CallMeMaybe { mac, .. } = cmm else {
            unreachable!()
        };
        let altered = Disco::CallMeMaybe {
            candidates: vec![addr("6.6.6.6:5")],
            mac,
        };
        assert!(!altered.verify(&key), "candidates cannot be swapped");
        let ping = Disco::ping(&key, [1; 12], addr("240.0.0.1:1"), 5);
        assert!(ping.verify(&key));
        let Disco::Ping {
            tx, sender, mac, ..
        } = ping
        else {
            unreachable!()
        };
        let replayed_later = Disco::Ping {
            tx,
            sender,
            ts_ms: 6,
            mac,
        };
        assert!(!replayed_later.verify(&key), "the timestamp is covered");
        assert!(Disco::pong(&key, [1; 12], addr("1.1.1.1:1")).verify(&key));
        assert!(!Disco::DialBack { nonce: [0; 16] }.verify(&key));
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
