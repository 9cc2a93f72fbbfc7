//! Compact digests: chitchat's messages with digest entries a third of their size.
//!
//! Why: every SYN and SYN-ACK carries one digest entry per node of the mesh,
//! and chitchat writes each as the node's full id (name, generation, address)
//! plus three fixed 8-byte integers: 40-60 bytes, sent about six times per
//! node per round. At 100 nodes the digests are nearly all of the gossip
//! traffic (BENCHMARKS.md). Here an entry names a node by an 8-byte hash of
//! its id, with three varints: 12-15 bytes.
//!
//! A hash is only useful to a receiver that knows the id behind it, and
//! chitchat learns of new nodes from digests alone (a delta about a node it
//! has never seen is ignored). So a sender hashes only the ids the peer
//! itself listed in the last digest it sent us, and writes the others in
//! full; the receiver maps hashes back through the ids of its own latest
//! digest. An entry it still cannot map (it forgot that node since) is
//! dropped, which scuttlebutt reads as "send me all of that node", and the
//! peer's next digest to it carries the id in full again.
//!
//! This is a transcoder over chitchat's own byte format (pinned 0.11), not a
//! fork: a compact message decodes back to the exact chitchat message. Only
//! SYN and SYN-ACK change; ACK and BAD-CLUSTER have no digest and travel as
//! chitchat writes them. Format, version 1:
//!
//! ```text
//! 0xD5  type (0 SYN, 1 SYN-ACK)
//! varint n, n x [chitchat id, heartbeat, last_gc_version, max_version]   ids in full
//! varint m, m x [hash u64 LE, heartbeat, last_gc_version, max_version]   ids the peer knows
//! then, unchanged from chitchat: SYN: its cluster id; SYN-ACK: its delta
//! ```
//!
//! (numbers as LEB128 varints). chitchat messages start with its magic
//! number (`0x53 0xB0`), so the first byte tells the formats apart. A node
//! sends compact digests only to peers whose gossip says they read them
//! ([`crate::KEY_GOSSIP_WIRE`]).

use std::collections::{HashMap, HashSet};

use sha2::{Digest as _, Sha256};

/// First byte of a compact message.
pub const COMPACT: u8 = 0xD5;
/// The compact format's version, published as [`crate::KEY_GOSSIP_WIRE`].
pub const VERSION: &str = "1";

const CHITCHAT_HEADER: usize = 4; // magic u16, protocol version, message type
/// chitchat's magic number, 45,139, as it writes it (little-endian).
const CHITCHAT_MAGIC: [u8; 2] = 45_139u16.to_le_bytes();
const SYN: u8 = 0;
const SYN_ACK: u8 = 1;
/// The smallest hashed entry: the hash and three one-byte varints.
const MIN_HASHED_ENTRY: usize = 11;
/// The smallest full entry: an empty name, generation, IPv4 address, three varints.
const MIN_FULL_ENTRY: usize = 2 + 8 + 7 + 3;

/// Why bytes are not a message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("gossip message truncated")]
    Truncated,
    #[error("gossip message: {0}")]
    Invalid(&'static str),
}

/// The node ids this node knows, by hash (the ids of its latest digest).
#[derive(Debug, Default)]
pub struct KnownIds {
    by_hash: HashMap<u64, Box<[u8]>>,
}

impl KnownIds {
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

/// The nodes a peer listed in its last digest, by hash: those it can be sent hashes of.
pub type PeerKnows = HashSet<u64>;

/// The hash a compact entry names a node by: the first 8 bytes of the
/// SHA-256 of its id as chitchat encodes it (stable across builds, and
/// collisions are out of reach at any mesh size).
fn id_hash(id: &[u8]) -> u64 {
    let d = Sha256::digest(id);
    let mut h = [0u8; 8];
    h.copy_from_slice(&d[..8]);
    u64::from_le_bytes(h)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    fn varint(&mut self) -> Result<u64, WireError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(WireError::Invalid("varint longer than 64 bits"))
    }

    /// A count of entries at least `min` bytes each, refused when the rest
    /// of the message cannot hold them.
    fn count(&mut self, min: usize) -> Result<usize, WireError> {
        let n = self.varint()?;
        if n > (self.0.len() / min) as u64 {
            return Err(WireError::Truncated);
        }
        Ok(n as usize)
    }

    /// One chitchat id: name (u16 length + bytes), generation, socket address.
    fn chitchat_id(&mut self) -> Result<&'a [u8], WireError> {
        let start = self.0;
        let name = usize::from(self.u16()?);
        self.take(name)?;
        self.take(8)?;
        let ip = match self.u8()? {
            4 => 4,
            6 => 16,
            _ => return Err(WireError::Invalid("bad address family in a node id")),
        };
        self.take(ip + 2)?;
        Ok(&start[..start.len() - self.0.len()])
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The digest entries of a chitchat SYN or SYN-ACK (`None`: another message),
/// each as (id bytes, heartbeat, last gc version, max version), and the rest
/// of the message after the digest.
type Entries<'a> = (Vec<(&'a [u8], [u64; 3])>, &'a [u8]);

fn chitchat_digest(msg: &[u8]) -> Result<Option<Entries<'_>>, WireError> {
    if msg.len() < CHITCHAT_HEADER || !matches!(msg[3], SYN | SYN_ACK) {
        return Ok(None);
    }
    let mut r = Reader(&msg[CHITCHAT_HEADER..]);
    let n = r.u16()?;
    let mut entries = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let id = r.chitchat_id()?;
        entries.push((id, [r.u64()?, r.u64()?, r.u64()?]));
    }
    Ok(Some((entries, r.0)))
}

fn put_fields(out: &mut Vec<u8>, fields: &[u64; 3]) {
    for &f in fields {
        put_varint(out, f);
    }
}

/// Encodes a chitchat message (`msg`, as chitchat serialized it) for a peer.
/// Always refreshes `known` from the message's digest (it lists every node
/// this one knows). With `peer` (what the peer knows: it reads compact
/// digests) a SYN or SYN-ACK goes out compact; otherwise `out` receives
/// `msg` unchanged.
pub fn encode(
    msg: &[u8],
    peer: Option<&PeerKnows>,
    known: &mut KnownIds,
    out: &mut Vec<u8>,
) -> Result<(), WireError> {
    out.clear();
    let Some((entries, rest)) = chitchat_digest(msg)? else {
        out.extend_from_slice(msg);
        return Ok(());
    };
    let hashes: Vec<u64> = entries.iter().map(|(id, _)| id_hash(id)).collect();
    known.by_hash = entries
        .iter()
        .zip(&hashes)
        .map(|((id, _), h)| (*h, Box::from(*id)))
        .collect();
    let Some(peer) = peer else {
        out.extend_from_slice(msg);
        return Ok(());
    };
    out.push(COMPACT);
    out.push(msg[3]);
    let full = hashes.iter().filter(|h| !peer.contains(h)).count();
    put_varint(out, full as u64);
    for ((id, fields), h) in entries.iter().zip(&hashes) {
        if !peer.contains(h) {
            out.extend_from_slice(id);
            put_fields(out, fields);
        }
    }
    put_varint(out, (entries.len() - full) as u64);
    for ((_, fields), h) in entries.iter().zip(&hashes) {
        if peer.contains(h) {
            out.extend_from_slice(&h.to_le_bytes());
            put_fields(out, fields);
        }
    }
    out.extend_from_slice(rest);
    Ok(())
}

/// Decodes what a peer sent into chitchat's format, in `out`: compact
/// messages are expanded through `known` (hashed entries naming nodes this
/// one does not know are dropped), anything else is copied for chitchat to
/// decode (or refuse). Returns the nodes the peer's digest listed, when the
/// message has one: what [`encode`] may send it hashes of.
pub fn decode(
    bytes: &[u8],
    known: &KnownIds,
    out: &mut Vec<u8>,
) -> Result<Option<PeerKnows>, WireError> {
    out.clear();
    if bytes.first() != Some(&COMPACT) {
        out.extend_from_slice(bytes);
        return Ok(chitchat_digest(bytes)
            .ok()
            .flatten()
            .map(|(entries, _)| entries.iter().map(|(id, _)| id_hash(id)).collect()));
    }
    let mut r = Reader(&bytes[1..]);
    let kind = r.u8()?;
    if !matches!(kind, SYN | SYN_ACK) {
        return Err(WireError::Invalid("unknown compact message type"));
    }
    out.extend_from_slice(&CHITCHAT_MAGIC);
    out.push(0); // chitchat protocol version 0
    out.push(kind);
    let count_at = out.len();
    out.extend_from_slice(&[0, 0]);
    let mut listed = PeerKnows::new();
    let mut kept = 0usize;
    let mut put = |out: &mut Vec<u8>, id: &[u8], fields: [u64; 3]| {
        kept += 1;
        out.extend_from_slice(id);
        for f in fields {
            out.extend_from_slice(&f.to_le_bytes());
        }
    };
    for _ in 0..r.count(MIN_FULL_ENTRY)? {
        let id = r.chitchat_id()?;
        let fields = [r.varint()?, r.varint()?, r.varint()?];
        listed.insert(id_hash(id));
        put(out, id, fields);
    }
    for _ in 0..r.count(MIN_HASHED_ENTRY)? {
        let hash = r.u64()?;
        let fields = [r.varint()?, r.varint()?, r.varint()?];
        listed.insert(hash);
        if let Some(id) = known.by_hash.get(&hash) {
            put(out, id, fields);
        }
    }
    let kept = u16::try_from(kept)
        .map_err(|_| WireError::Invalid("more digest entries than chitchat can hold"))?;
    out[count_at..count_at + 2].copy_from_slice(&kept.to_le_bytes());
    out.extend_from_slice(r.0);
    Ok(Some(listed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chitchat::{ChitchatMessage, Deserializable};
    use proptest::prelude::*;
    use std::net::SocketAddr;

    fn id(name: &str, generation: u64, addr: SocketAddr) -> Vec<u8> {
        let mut b = (name.len() as u16).to_le_bytes().to_vec();
        b.extend_from_slice(name.as_bytes());
        b.extend_from_slice(&generation.to_le_bytes());
        match addr.ip() {
            std::net::IpAddr::V4(ip) => {
                b.push(4);
                b.extend_from_slice(&ip.octets());
            }
            std::net::IpAddr::V6(ip) => {
                b.push(6);
                b.extend_from_slice(&ip.octets());
            }
        }
        b.extend_from_slice(&addr.port().to_le_bytes());
        b
    }

    /// A chitchat message as chitchat writes it: header, digest, then `tail`
    /// (a SYN's cluster id, a SYN-ACK's delta).
    fn chitchat_msg(kind: u8, entries: &[(Vec<u8>, [u64; 3])], tail: &[u8]) -> Vec<u8> {
        let mut b = CHITCHAT_MAGIC.to_vec();
        b.push(0);
        b.push(kind);
        b.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        for (id, fields) in entries {
            b.extend_from_slice(id);
            for f in fields {
                b.extend_from_slice(&f.to_le_bytes());
            }
        }
        b.extend_from_slice(tail);
        b
    }

    fn cluster_id(name: &str) -> Vec<u8> {
        let mut b = (name.len() as u16).to_le_bytes().to_vec();
        b.extend_from_slice(name.as_bytes());
        b
    }

    /// An empty chitchat delta (its op stream with no blocks).
    fn empty_delta() -> Vec<u8> {
        let mut b = Vec::new();
        chitchat::Serializable::serialize(
            &ChitchatMessage::Ack {
                delta: Default::default(),
            },
            &mut b,
        );
        b[CHITCHAT_HEADER..].to_vec()
    }

    fn entries() -> Vec<(Vec<u8>, [u64; 3])> {
        vec![
            (
                id("eu-west-1", 1_764_000_000_123, "10.0.0.1:7400".parse().unwrap()),
                [123_456, 0, 42],
            ),
            (
                id("us-east-2", 1_764_000_000_456, "[fd00::2]:7400".parse().unwrap()),
                [7, 3, 90_000],
            ),
            (
                id("edge-7", 5, "192.168.1.7:1".parse().unwrap()),
                [u64::MAX, u64::MAX, 0],
            ),
        ]
    }

    fn parsed(bytes: &[u8]) -> ChitchatMessage {
        ChitchatMessage::deserialize(&mut &bytes[..]).expect("chitchat reads it")
    }

    fn hashes(entries: &[(Vec<u8>, [u64; 3])]) -> PeerKnows {
        entries.iter().map(|(id, _)| id_hash(id)).collect()
    }

    #[test]
    fn compact_messages_expand_to_the_exact_chitchat_bytes() {
        for (kind, tail) in [(SYN, cluster_id("mesh.example")), (SYN_ACK, empty_delta())] {
            let msg = chitchat_msg(kind, &entries(), &tail);
            let mut known = KnownIds::default();
            // A peer that knows every node gets hashes; one that knows none, full ids.
            for (peer, at_most) in [(hashes(&entries()), msg.len() / 2), (PeerKnows::new(), msg.len())] {
                let mut wire = Vec::new();
                encode(&msg, Some(&peer), &mut known, &mut wire).unwrap();
                assert_eq!(wire[0], COMPACT);
                assert_eq!(known.len(), 3);
                assert!(wire.len() < at_most, "{} vs {}", wire.len(), msg.len());
                let mut back = Vec::new();
                let listed = decode(&wire, &known, &mut back).unwrap();
                assert_eq!(back, msg);
                assert_eq!(listed, Some(hashes(&entries())));
                ChitchatMessage::deserialize(&mut &back[..]).expect("chitchat reads it");
            }
        }
    }

    #[test]
    fn a_node_the_peer_does_not_know_goes_in_full_and_an_unmappable_hash_is_dropped() {
        let all = entries();
        let msg = chitchat_msg(SYN, &all, &cluster_id("c"));
        // The receiver's own digest lacks the second node.
        let own = chitchat_msg(SYN, &[all[0].clone(), all[2].clone()], &cluster_id("c"));
        let mut receiver = KnownIds::default();
        encode(&own, None, &mut receiver, &mut Vec::new()).unwrap();

        // The sender knows what the receiver listed: the new node goes in full.
        let mut sender = KnownIds::default();
        let mut wire = Vec::new();
        let listed = hashes(&[all[0].clone(), all[2].clone()]);
        encode(&msg, Some(&listed), &mut sender, &mut wire).unwrap();
        let mut back = Vec::new();
        decode(&wire, &receiver, &mut back).unwrap();
        // Full entries come first: the same digest, in another order.
        assert_eq!(parsed(&back), parsed(&msg), "the receiver learns the new node's id");

        // A stale view of the receiver (it forgot the node): that entry is dropped.
        encode(&msg, Some(&hashes(&all)), &mut sender, &mut wire).unwrap();
        decode(&wire, &receiver, &mut back).unwrap();
        assert_eq!(back, own, "the entry the receiver cannot name is gone");
    }

    #[test]
    fn messages_without_a_digest_and_legacy_peers_get_chitchat_bytes() {
        let ack = {
            let mut b = CHITCHAT_MAGIC.to_vec();
            b.extend_from_slice(&[0, 2]);
            b.extend_from_slice(&empty_delta());
            b
        };
        let mut known = KnownIds::default();
        let mut wire = Vec::new();
        encode(&ack, Some(&PeerKnows::new()), &mut known, &mut wire).unwrap();
        assert_eq!(wire, ack);
        let mut back = Vec::new();
        assert_eq!(decode(&ack, &known, &mut back).unwrap(), None, "no digest");

        let syn = chitchat_msg(SYN, &entries(), &cluster_id("c"));
        encode(&syn, None, &mut known, &mut wire).unwrap();
        assert_eq!(wire, syn, "a peer without compact support");
        assert_eq!(known.len(), 3, "the ids are learned all the same");
        let listed = decode(&syn, &known, &mut back).unwrap();
        assert_eq!(back, syn, "chitchat bytes pass through");
        assert_eq!(listed, Some(hashes(&entries())), "and say what the peer knows");
    }

    #[test]
    fn bad_compact_bytes_are_refused() {
        let known = KnownIds::default();
        let mut out = Vec::new();
        assert_eq!(decode(&[COMPACT], &known, &mut out), Err(WireError::Truncated));
        assert!(decode(&[COMPACT, 9, 0, 0], &known, &mut out).is_err());
        // Counts larger than the bytes can hold.
        assert_eq!(
            decode(&[COMPACT, SYN, 0xff, 0xff, 0x03], &known, &mut out),
            Err(WireError::Truncated)
        );
        assert_eq!(
            decode(&[COMPACT, SYN, 0, 0xff, 0xff, 0x03], &known, &mut out),
            Err(WireError::Truncated)
        );
        let overlong = [COMPACT, SYN, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01];
        assert!(decode(&overlong, &known, &mut out).is_err());
    }

    proptest! {
        #[test]
        fn the_compact_decoder_never_panics(body in proptest::collection::vec(any::<u8>(), 0..600)) {
            let msg = chitchat_msg(SYN, &entries(), &cluster_id("c"));
            let mut known = KnownIds::default();
            encode(&msg, None, &mut known, &mut Vec::new()).unwrap();
            let mut bytes = vec![COMPACT];
            bytes.extend_from_slice(&body);
            let mut out = Vec::new();
            if decode(&bytes, &known, &mut out).is_ok() {
                let _ = ChitchatMessage::deserialize(&mut &out[..]);
            }
        }

        #[test]
        fn varints_round_trip(v in any::<u64>()) {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            prop_assert_eq!(Reader(&b).varint().unwrap(), v);
        }
    }
}
