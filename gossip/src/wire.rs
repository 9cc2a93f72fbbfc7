//! Compact digests: chitchat's messages with digest entries a fifth of their size.
//!
//! Why: every SYN and SYN-ACK carries one digest entry per node of the mesh,
//! and chitchat writes each as the node's full id (name, generation, address)
//! plus three fixed 8-byte integers: 40-60 bytes, sent about six times per
//! node per round. At 100 nodes the digests are most of the gossip traffic
//! (BENCHMARKS.md).
//!
//! Peers mostly know the same nodes, so an entry need not name its node:
//! each side keeps the id list of the last digest the other sent it (ids
//! sorted by an 8-byte hash, the list named by a 4-byte tag), and a digest
//! to that peer says, per node of *the peer's* list, present or not (one
//! bit), followed by the values of the present ones (three varints: 4-7
//! bytes). Nodes the peer did not list go with their full id. A node keeps
//! its own last few lists, so a peer's reference to one that changed since
//! still resolves. An entry that cannot be resolved (the list is gone) is
//! dropped, which scuttlebutt reads as "send me all of that node", and the
//! next exchange carries the right list again. chitchat learns of new nodes
//! from digests alone (a delta about a node it has never seen is ignored),
//! which is why unknown nodes always travel in full.
//!
//! This is a transcoder over chitchat's own byte format (pinned 0.11), not a
//! fork: a compact message decodes back to a chitchat message with the same
//! digest. Only SYN and SYN-ACK change; ACK and BAD-CLUSTER have no digest
//! and travel as chitchat writes them. Format, version 1 (numbers are LEB128
//! varints unless sized):
//!
//! ```text
//! 0xD5, type (0 SYN, 1 SYN-ACK), sender's list tag (u32 LE)
//! n, n x [chitchat id, values]                                     nodes in full
//! len of the receiver's list (0: none), and when not 0:
//!   its tag (u32 LE), ceil(len/8) bytes of bits (LSB first), then the
//!   values of every set bit's node, in order
//! then, unchanged from chitchat: SYN: its cluster id; SYN-ACK: its delta
//!
//! values: heartbeat, max_version * 2 + (1 if last_gc_version > 0), and
//!         last_gc_version only when that bit is set (it rarely is)
//! ```
//!
//! chitchat messages start with its magic number (`0x53 0xB0`), so the first
//! byte tells the formats apart. A node sends compact digests only to peers
//! whose gossip says they read them ([`crate::KEY_GOSSIP_WIRE`]).

use std::collections::{HashMap, VecDeque};

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
/// The smallest full entry: an empty name, generation, IPv4 address, two one-byte values.
const MIN_FULL_ENTRY: usize = 2 + 8 + 7 + 2;
/// How many of its own past id lists a node resolves references to.
const OWN_LISTS: usize = 4;

/// Why bytes are not a message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("gossip message truncated")]
    Truncated,
    #[error("gossip message: {0}")]
    Invalid(&'static str),
}

/// An id list: node hashes in ascending order, named by its tag.
#[derive(Debug, Clone, PartialEq, Eq)]
struct List {
    tag: u32,
    hashes: Vec<u64>,
}

impl List {
    fn new(mut hashes: Vec<u64>) -> List {
        hashes.sort_unstable();
        hashes.dedup();
        let mut h = Sha256::new();
        for x in &hashes {
            h.update(x.to_le_bytes());
        }
        let d = h.finalize();
        List {
            tag: u32::from_le_bytes([d[0], d[1], d[2], d[3]]),
            hashes,
        }
    }
}

/// This node's own recent id lists (newest first) and the ids behind them.
#[derive(Debug, Default)]
pub struct KnownIds {
    lists: VecDeque<List>,
    ids: HashMap<u64, Box<[u8]>>,
}

impl KnownIds {
    /// Nodes in this node's latest digest.
    pub fn len(&self) -> usize {
        self.lists.front().map_or(0, |l| l.hashes.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn remember(&mut self, list: List, ids: Vec<(u64, &[u8])>) {
        if self.lists.front().is_some_and(|l| l.tag == list.tag) {
            return;
        }
        self.lists.push_front(list);
        self.lists.truncate(OWN_LISTS);
        for (h, id) in ids {
            self.ids.entry(h).or_insert_with(|| Box::from(id));
        }
        let lists = &self.lists;
        self.ids
            .retain(|h, _| lists.iter().any(|l| l.hashes.binary_search(h).is_ok()));
    }

    fn list(&self, tag: u32, len: usize) -> Option<&List> {
        self.lists
            .iter()
            .find(|l| l.tag == tag && l.hashes.len() == len)
    }
}

/// A peer's id list as its last digest to us gave it: what a digest to it
/// can refer to by position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerList {
    tag: u32,
    len: usize,
    position: HashMap<u64, u32>,
}

impl PeerList {
    fn new(list: &List) -> PeerList {
        PeerList {
            tag: list.tag,
            len: list.hashes.len(),
            position: list
                .hashes
                .iter()
                .enumerate()
                .map(|(i, h)| (*h, i as u32))
                .collect(),
        }
    }
}

/// What a received message says about the sender's id list.
#[derive(Debug, PartialEq, Eq)]
pub enum Listed {
    /// Its digest, all of it understood.
    List(PeerList),
    /// A digest this node could not fully resolve: forget the old list.
    Unknown,
    /// No digest in this message.
    NoDigest,
}

/// The digest entries of a compact message, by how they name their node.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Encoded {
    pub full: usize,
    pub positional: usize,
}

/// The hash a node is known by: the first 8 bytes of the SHA-256 of its id
/// as chitchat encodes it (stable across builds; collisions are out of
/// reach at any mesh size).
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

    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
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

    /// An entry's values: heartbeat, last gc version, max version (see the module doc).
    fn fields(&mut self) -> Result<[u64; 3], WireError> {
        let heartbeat = self.varint()?;
        let versions = self.varint()?;
        let gc = if versions & 1 == 1 { self.varint()? } else { 0 };
        Ok([heartbeat, gc, versions >> 1])
    }

    /// A count of things, refused when the rest of the message cannot hold
    /// them: entries of at least `min` bytes each.
    fn count(&mut self, min: usize) -> Result<usize, WireError> {
        let n = self.varint()?;
        if n > (self.0.len() / min.max(1)) as u64 {
            return Err(WireError::Truncated);
        }
        Ok(n as usize)
    }

    /// A count of bits, refused when the rest of the message cannot hold them.
    fn bit_count(&mut self) -> Result<usize, WireError> {
        let n = self.varint()?;
        if n > self.0.len() as u64 * 8 {
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

fn put_fields(out: &mut Vec<u8>, &[heartbeat, gc, max_version]: &[u64; 3]) {
    put_varint(out, heartbeat);
    // Versions count keys set: 2^63 of them is out of reach.
    put_varint(out, (max_version << 1) | u64::from(gc > 0));
    if gc > 0 {
        put_varint(out, gc);
    }
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

/// Encodes a chitchat message (`msg`, as chitchat serialized it) for a peer.
/// Always records this node's id list from the message's digest (it lists
/// every node this one knows) in `known`. With `peer` (the peer reads
/// compact digests; its last list, if any) a SYN or SYN-ACK goes out
/// compact; otherwise `out` receives `msg` unchanged.
pub fn encode(
    msg: &[u8],
    peer: Option<Option<&PeerList>>,
    known: &mut KnownIds,
    out: &mut Vec<u8>,
) -> Result<Encoded, WireError> {
    out.clear();
    let Some((entries, rest)) = chitchat_digest(msg)? else {
        out.extend_from_slice(msg);
        return Ok(Encoded::default());
    };
    let hashes: Vec<u64> = entries.iter().map(|(id, _)| id_hash(id)).collect();
    let list = List::new(hashes.clone());
    let tag = list.tag;
    known.remember(
        list,
        hashes
            .iter()
            .zip(&entries)
            .map(|(h, (id, _))| (*h, *id))
            .collect(),
    );
    let Some(peer) = peer else {
        out.extend_from_slice(msg);
        return Ok(Encoded::default());
    };
    out.push(COMPACT);
    out.push(msg[3]);
    out.extend_from_slice(&tag.to_le_bytes());
    let at = |h: &u64| peer.and_then(|p| p.position.get(h).copied());
    let full = hashes.iter().filter(|h| at(h).is_none()).count();
    put_varint(out, full as u64);
    for ((id, fields), h) in entries.iter().zip(&hashes) {
        if at(h).is_none() {
            out.extend_from_slice(id);
            put_fields(out, fields);
        }
    }
    match peer {
        Some(p) if full < entries.len() => {
            put_varint(out, p.len as u64);
            out.extend_from_slice(&p.tag.to_le_bytes());
            let mut present: Vec<(u32, &[u64; 3])> = entries
                .iter()
                .zip(&hashes)
                .filter_map(|((_, f), h)| Some((at(h)?, f)))
                .collect();
            present.sort_unstable_by_key(|(i, _)| *i);
            let bits_at = out.len();
            out.resize(bits_at + p.len.div_ceil(8), 0);
            for (i, _) in &present {
                let i = *i as usize;
                out[bits_at + i / 8] |= 1 << (i % 8);
            }
            for (_, f) in present {
                put_fields(out, f);
            }
        }
        _ => put_varint(out, 0),
    }
    out.extend_from_slice(rest);
    Ok(Encoded {
        full,
        positional: entries.len() - full,
    })
}

/// Decodes what a peer sent into chitchat's format, in `out`: compact
/// messages are expanded through `known` (entries that cannot be resolved
/// are dropped), anything else is copied for chitchat to decode (or refuse).
/// Also says what the peer's digest listed: what [`encode`] may refer to.
pub fn decode(bytes: &[u8], known: &KnownIds, out: &mut Vec<u8>) -> Result<Listed, WireError> {
    out.clear();
    if bytes.first() != Some(&COMPACT) {
        out.extend_from_slice(bytes);
        return Ok(match chitchat_digest(bytes) {
            Ok(Some((entries, _))) => Listed::List(PeerList::new(&List::new(
                entries.iter().map(|(id, _)| id_hash(id)).collect(),
            ))),
            Ok(None) => Listed::NoDigest,
            Err(_) => Listed::Unknown,
        });
    }
    let mut r = Reader(&bytes[1..]);
    let kind = r.u8()?;
    if !matches!(kind, SYN | SYN_ACK) {
        return Err(WireError::Invalid("unknown compact message type"));
    }
    let sender_tag = r.u32()?;
    out.extend_from_slice(&CHITCHAT_MAGIC);
    out.push(0); // chitchat protocol version 0
    out.push(kind);
    let count_at = out.len();
    out.extend_from_slice(&[0, 0]);
    let mut listed = Vec::new();
    let mut resolved = true;
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
        let fields = r.fields()?;
        listed.push(id_hash(id));
        put(out, id, fields);
    }
    let len = r.bit_count()?;
    if len > 0 {
        let tag = r.u32()?;
        let bits = r.take(len.div_ceil(8))?;
        let own = known.list(tag, len);
        resolved = own.is_some();
        for i in (0..len).filter(|i| bits[i / 8] & (1 << (i % 8)) != 0) {
            let fields = r.fields()?;
            let Some(h) = own.map(|l| l.hashes[i]) else {
                continue;
            };
            listed.push(h);
            if let Some(id) = known.ids.get(&h) {
                put(out, id, fields);
            }
        }
    }
    let kept = u16::try_from(kept)
        .map_err(|_| WireError::Invalid("more digest entries than chitchat can hold"))?;
    out[count_at..count_at + 2].copy_from_slice(&kept.to_le_bytes());
    out.extend_from_slice(r.0);
    let list = List::new(listed);
    Ok(if resolved && list.tag == sender_tag {
        Listed::List(PeerList::new(&list))
    } else {
        Listed::Unknown
    })
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
                id(
                    "eu-west-1",
                    1_764_000_000_123,
                    "10.0.0.1:7400".parse().expect("address"),
                ),
                [123_456, 0, 42],
            ),
            (
                id(
                    "us-east-2",
                    1_764_000_000_456,
                    "[fd00::2]:7400".parse().expect("address"),
                ),
                [7, 3, 90_000],
            ),
            (
                id("edge-7", 5, "192.168.1.7:1".parse().expect("address")),
                [u64::MAX, u64::MAX, 0],
            ),
        ]
    }

    fn parsed(bytes: &[u8]) -> ChitchatMessage {
        ChitchatMessage::deserialize(&mut &bytes[..]).expect("chitchat reads it")
    }

    /// What `sender` learns of a node's id list from a digest that node sends.
    fn list_of(node: &[(Vec<u8>, [u64; 3])], node_known: &mut KnownIds) -> PeerList {
        let msg = chitchat_msg(SYN, node, &cluster_id("c"));
        encode(&msg, None, node_known, &mut Vec::new()).expect("encodes");
        match decode(&msg, &KnownIds::default(), &mut Vec::new()).expect("decodes") {
            Listed::List(l) => l,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn compact_messages_expand_to_the_same_chitchat_digest() {
        for (kind, tail) in [(SYN, cluster_id("mesh.example")), (SYN_ACK, empty_delta())] {
            let msg = chitchat_msg(kind, &entries(), &tail);
            let mut receiver = KnownIds::default();
            let receiver_list = list_of(&entries(), &mut receiver);
            let mut sender = KnownIds::default();
            // A peer we have a list of gets positions; one we have none of, full ids.
            for (peer, at_most) in [(Some(&receiver_list), msg.len() / 3), (None, msg.len())] {
                let mut wire = Vec::new();
                encode(&msg, Some(peer), &mut sender, &mut wire).expect("encodes");
                assert_eq!(wire[0], COMPACT);
                assert_eq!(sender.len(), 3);
                assert!(wire.len() < at_most, "{} vs {}", wire.len(), msg.len());
                let mut back = Vec::new();
                let listed = decode(&wire, &receiver, &mut back).expect("decodes");
                assert_eq!(parsed(&back), parsed(&msg));
                assert_eq!(
                    listed,
                    Listed::List(receiver_list.clone()),
                    "same nodes, same list"
                );
            }
        }
    }

    #[test]
    fn a_node_the_peer_did_not_list_goes_in_full() {
        let all = entries();
        let msg = chitchat_msg(SYN_ACK, &all, &empty_delta());
        // The receiver's digest lacks the second node.
        let mut receiver = KnownIds::default();
        let receiver_list = list_of(&[all[0].clone(), all[2].clone()], &mut receiver);
        let mut sender = KnownIds::default();
        let mut wire = Vec::new();
        encode(&msg, Some(Some(&receiver_list)), &mut sender, &mut wire).expect("encodes");
        let mut back = Vec::new();
        let listed = decode(&wire, &receiver, &mut back).expect("decodes");
        assert_eq!(
            parsed(&back),
            parsed(&msg),
            "the receiver learns the new node's id"
        );
        // And it now knows the sender's list: the three nodes.
        let Listed::List(sender_list) = listed else {
            panic!("{listed:?}")
        };
        assert_eq!(sender_list.len, 3);
        assert_eq!(sender_list.tag, sender.lists[0].tag);
    }

    #[test]
    fn a_reference_to_a_list_the_receiver_no_longer_has_is_dropped() {
        let all = entries();
        let mut receiver = KnownIds::default();
        let old = list_of(&all[..1], &mut receiver);
        // The receiver's membership changes more often than it keeps lists.
        for n in 0..OWN_LISTS {
            let more: Vec<_> = (0..=n)
                .map(|k| {
                    (
                        id(&format!("x{k}"), 1, "10.9.9.9:1".parse().expect("address")),
                        [1, 0, 1],
                    )
                })
                .chain(all.iter().cloned())
                .collect();
            list_of(&more, &mut receiver);
        }
        let msg = chitchat_msg(SYN, &all, &cluster_id("c"));
        let mut wire = Vec::new();
        encode(&msg, Some(Some(&old)), &mut KnownIds::default(), &mut wire).expect("encodes");
        let mut back = Vec::new();
        let listed = decode(&wire, &receiver, &mut back).expect("decodes");
        assert_eq!(
            listed,
            Listed::Unknown,
            "the sender's list cannot be checked"
        );
        let expect = chitchat_msg(SYN, &all[1..], &cluster_id("c"));
        assert_eq!(
            parsed(&back),
            parsed(&expect),
            "only the nodes sent in full remain"
        );
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
        encode(&ack, Some(None), &mut known, &mut wire).expect("encodes");
        assert_eq!(wire, ack);
        let mut back = Vec::new();
        assert_eq!(
            decode(&ack, &known, &mut back).expect("decodes"),
            Listed::NoDigest
        );

        let syn = chitchat_msg(SYN, &entries(), &cluster_id("c"));
        encode(&syn, None, &mut known, &mut wire).expect("encodes");
        assert_eq!(wire, syn, "a peer without compact support");
        assert_eq!(known.len(), 3, "the ids are learned all the same");
        let listed = decode(&syn, &known, &mut back).expect("decodes");
        assert_eq!(back, syn, "chitchat bytes pass through");
        assert!(
            matches!(listed, Listed::List(l) if l.len == 3),
            "and say what the peer knows"
        );
    }

    #[test]
    fn bad_compact_bytes_are_refused() {
        let known = KnownIds::default();
        let mut out = Vec::new();
        let head = |kind: u8| vec![COMPACT, kind, 0, 0, 0, 0];
        assert_eq!(
            decode(&[COMPACT], &known, &mut out),
            Err(WireError::Truncated)
        );
        assert!(decode(&head(9), &known, &mut out).is_err());
        // Counts larger than the bytes can hold.
        let mut b = head(SYN);
        b.extend_from_slice(&[0xff, 0xff, 0x03]);
        assert_eq!(decode(&b, &known, &mut out), Err(WireError::Truncated));
        let mut b = head(SYN);
        b.extend_from_slice(&[0, 0xff, 0xff, 0x03, 1, 2, 3, 4]);
        assert_eq!(decode(&b, &known, &mut out), Err(WireError::Truncated));
        let mut b = head(SYN);
        b.extend_from_slice(&[
            0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01,
        ]);
        assert!(decode(&b, &known, &mut out).is_err());
    }

    proptest! {
        #[test]
        fn the_compact_decoder_never_panics(
            body in proptest::collection::vec(any::<u8>(), 0..600),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            xor in 1u8..,
        ) {
            let mut receiver = KnownIds::default();
            let list = list_of(&entries()[1..], &mut receiver);
            // Random bytes after the marker.
            let mut bytes = vec![COMPACT];
            bytes.extend_from_slice(&body);
            let mut out = Vec::new();
            if decode(&bytes, &receiver, &mut out).is_ok() {
                let _ = ChitchatMessage::deserialize(&mut &out[..]);
            }
            // A valid message, one byte changed, then cut short.
            let msg = chitchat_msg(SYN_ACK, &entries(), &empty_delta());
            let mut wire = Vec::new();
            encode(&msg, Some(Some(&list)), &mut KnownIds::default(), &mut wire).expect("encodes");
            let at = flip.index(wire.len());
            wire[at] ^= xor;
            wire.truncate(cut.index(wire.len() + 1));
            if decode(&wire, &receiver, &mut out).is_ok() {
                let _ = ChitchatMessage::deserialize(&mut &out[..]);
            }
        }

        #[test]
        fn varints_round_trip(v in any::<u64>()) {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            prop_assert_eq!(Reader(&b).varint().expect("varint"), v);
        }
    }
}
