//! An agent record as the registry keeps it: every string of it in one
//! allocation.
//!
//! Why: a node learns every agent of the mesh by gossip and keeps each one's
//! record for selection by tag, policy and status. Decoded as
//! [`AgentRecord`], a record of two skills with three tags each is about a
//! dozen separate allocations and ~500 bytes of heap; at 100k remote agents
//! that alone was a fifth of the node's memory (BENCHMARKS.md, memory).
//! Packed, the same record is one allocation of ~200 bytes. Reading it is a
//! walk over length-prefixed strings, cheap next to what the readers do with
//! them (status, intent documents, policy checks); selection itself reads
//! the registry's own per-slot data and tag index, never this.
//!
//! Layout of `data`: items in order, each a string as `u16` little-endian
//! length then its UTF-8 bytes, or a count as `u16`: digest; skill count;
//! per skill: id, name, tag count, tags; protocol count; protocols.
//! [`AgentRecord::decode`] already bounds a record to 64 KiB, so no length
//! or count exceeds `u16`; a longer one is cut (never a panic).

use std::fmt;

use crate::card::Dialect;
use crate::record::{AgentRecord, Health, SkillTags};

/// See the module docs.
#[derive(Clone, PartialEq, Eq)]
pub struct PackedRecord {
    data: Box<[u8]>,
    expires_ms: u64,
    health: Health,
    /// The A2A binding and version pairs the card states, one bit each
    /// ([`A2A_PAIRS`]); 0: it states none.
    a2a: u8,
}

/// The A2A bindings and versions a record keeps, by bit (other bindings,
/// such as MQTT, say nothing of A2A versions).
const A2A_BINDINGS: [&str; 3] = ["JSONRPC", "HTTP+JSON", "GRPC"];
const A2A_VERSIONS: [Dialect; 2] = [Dialect::V03, Dialect::V10];

fn a2a_bit(binding: &str, d: Dialect) -> Option<u8> {
    let b = A2A_BINDINGS
        .iter()
        .position(|x| x.eq_ignore_ascii_case(binding))?;
    let v = A2A_VERSIONS.iter().position(|x| *x == d)?;
    Some(1 << (b * A2A_VERSIONS.len() + v))
}

impl PackedRecord {
    pub fn pack(r: &AgentRecord) -> PackedRecord {
        let mut len = 2 + r.digest.len() + 4;
        for s in &r.skills {
            len += 6 + s.id.len() + s.name.len();
            len += s.tags.iter().map(|t| 2 + t.len()).sum::<usize>();
        }
        len += r.protocols.iter().map(|p| 2 + p.len()).sum::<usize>();
        let mut data = Vec::with_capacity(len);
        put_str(&mut data, &r.digest);
        put_count(&mut data, r.skills.len());
        for s in r.skills.iter().take(usize::from(u16::MAX)) {
            put_str(&mut data, &s.id);
            put_str(&mut data, &s.name);
            put_count(&mut data, s.tags.len());
            for t in s.tags.iter().take(usize::from(u16::MAX)) {
                put_str(&mut data, t);
            }
        }
        put_count(&mut data, r.protocols.len());
        for p in r.protocols.iter().take(usize::from(u16::MAX)) {
            put_str(&mut data, p);
        }
        let a2a = r
            .a2a
            .iter()
            .filter_map(|s| {
                let (b, v) = s.rsplit_once(' ')?;
                a2a_bit(b, Dialect::of_version(v)?)
            })
            .fold(0u8, |m, bit| m | bit);
        PackedRecord {
            data: data.into_boxed_slice(),
            expires_ms: r.expires_ms,
            health: r.health,
            a2a,
        }
    }

    /// The record back in its gossiped form.
    pub fn unpack(&self) -> AgentRecord {
        AgentRecord {
            digest: self.digest().to_string(),
            skills: self
                .skills()
                .map(|s| SkillTags {
                    id: s.id.to_string(),
                    name: s.name.to_string(),
                    tags: s.tags().map(str::to_string).collect(),
                })
                .collect(),
            protocols: self.protocols().map(str::to_string).collect(),
            a2a: self
                .a2a_interfaces()
                .map(|(b, d)| format!("{b} {d}"))
                .collect(),
            health: self.health,
            expires_ms: self.expires_ms,
        }
    }

    /// [`AgentCard::digest`](crate::AgentCard::digest) of the agent's card.
    pub fn digest(&self) -> &str {
        Reader(&self.data).str()
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// Registration expiry, unix milliseconds.
    pub fn expires_ms(&self) -> u64 {
        self.expires_ms
    }

    /// The skills, in the record's order.
    pub fn skills(&self) -> Skills<'_> {
        let mut r = Reader(&self.data);
        r.str();
        let left = r.count();
        Skills { r, left }
    }

    /// Every tag of every skill, as the record has them (not deduplicated).
    pub fn tags(&self) -> impl Iterator<Item = &str> {
        self.skills().flat_map(|s| s.tags())
    }

    /// The A2A binding and version pairs the agent's card states (none:
    /// unknown).
    pub fn a2a_interfaces(&self) -> impl Iterator<Item = (&'static str, Dialect)> + '_ {
        A2A_BINDINGS.iter().flat_map(move |b| {
            A2A_VERSIONS
                .iter()
                .filter(move |d| a2a_bit(b, **d).is_some_and(|bit| self.a2a & bit != 0))
                .map(move |d| (*b, *d))
        })
    }

    /// Whether the agent speaks A2A version `d` (in `binding`, if given):
    /// its card states that pair, or states no version for that binding
    /// (or none at all), or the binding is none the record keeps versions
    /// for.
    pub fn speaks(&self, binding: Option<&str>, d: Dialect) -> bool {
        if self.a2a == 0 {
            return true;
        }
        match binding {
            Some(b) => {
                let any_version = A2A_VERSIONS
                    .iter()
                    .filter_map(|v| a2a_bit(b, *v))
                    .fold(0u8, |m, bit| m | bit);
                any_version == 0
                    || self.a2a & any_version == 0
                    || a2a_bit(b, d).is_some_and(|bit| self.a2a & bit != 0)
            }
            None => self.a2a_interfaces().any(|(_, v)| v == d),
        }
    }

    /// Protocol bindings (`JSONRPC`, `GRPC`, `HTTP+JSON`, `MQTT`).
    pub fn protocols(&self) -> Strs<'_> {
        let mut skills = self.skills();
        while skills.next().is_some() {}
        let mut r = skills.r;
        let left = r.count();
        Strs { r, left }
    }
}

impl fmt::Debug for PackedRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.unpack(), f)
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let mut end = s.len().min(usize::from(u16::MAX));
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    put_count(out, end);
    out.extend_from_slice(&s.as_bytes()[..end]);
}

fn put_count(out: &mut Vec<u8>, n: usize) {
    let n = u16::try_from(n).unwrap_or(u16::MAX);
    out.extend_from_slice(&n.to_le_bytes());
}

/// A cursor over `data`. Every read of a well-formed buffer (all of them:
/// only [`PackedRecord::pack`] writes one) succeeds; a short one reads as
/// empty rather than panicking.
#[derive(Clone, Copy)]
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn count(&mut self) -> usize {
        match self.0 {
            [a, b, rest @ ..] => {
                self.0 = rest;
                usize::from(u16::from_le_bytes([*a, *b]))
            }
            _ => {
                self.0 = &[];
                0
            }
        }
    }

    fn str(&mut self) -> &'a str {
        let n = self.count().min(self.0.len());
        let (s, rest) = self.0.split_at(n);
        self.0 = rest;
        std::str::from_utf8(s).unwrap_or_default()
    }
}

/// One skill of a [`PackedRecord`].
#[derive(Clone, Copy)]
pub struct Skill<'a> {
    pub id: &'a str,
    pub name: &'a str,
    tags: Reader<'a>,
    n_tags: usize,
}

impl<'a> Skill<'a> {
    pub fn tags(&self) -> Strs<'a> {
        Strs {
            r: self.tags,
            left: self.n_tags,
        }
    }
}

/// The skills of a [`PackedRecord`].
pub struct Skills<'a> {
    r: Reader<'a>,
    left: usize,
}

impl<'a> Iterator for Skills<'a> {
    type Item = Skill<'a>;

    fn next(&mut self) -> Option<Skill<'a>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let id = self.r.str();
        let name = self.r.str();
        let n_tags = self.r.count();
        let tags = self.r;
        for _ in 0..n_tags {
            self.r.str();
        }
        Some(Skill {
            id,
            name,
            tags,
            n_tags,
        })
    }
}

/// Strings of a [`PackedRecord`] (a skill's tags, the protocols).
pub struct Strs<'a> {
    r: Reader<'a>,
    left: usize,
}

impl<'a> Iterator for Strs<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        Some(self.r.str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> AgentRecord {
        AgentRecord {
            digest: "d".repeat(64),
            skills: vec![
                SkillTags {
                    id: "sum".into(),
                    name: "Summarize".into(),
                    tags: vec!["text".into(), "résumé".into(), "".into()],
                },
                SkillTags {
                    id: "empty".into(),
                    name: String::new(),
                    tags: vec![],
                },
            ],
            protocols: vec!["JSONRPC".into(), "GRPC".into()],
            a2a: vec!["JSONRPC 1.0".into(), "GRPC 0.3".into()],
            health: Health::Unhealthy,
            expires_ms: 42,
        }
    }

    #[test]
    fn round_trips_and_reads_in_place() {
        let r = record();
        let p = PackedRecord::pack(&r);
        assert_eq!(p.unpack(), r);
        assert_eq!(p.digest(), r.digest);
        assert_eq!(p.health(), Health::Unhealthy);
        assert_eq!(p.expires_ms(), 42);
        let ids: Vec<&str> = p.skills().map(|s| s.id).collect();
        assert_eq!(ids, ["sum", "empty"]);
        assert_eq!(p.tags().collect::<Vec<_>>(), ["text", "résumé", ""]);
        assert_eq!(p.protocols().collect::<Vec<_>>(), ["JSONRPC", "GRPC"]);
        assert!(
            p.speaks(Some("JSONRPC"), Dialect::V10) && !p.speaks(Some("jsonrpc"), Dialect::V03)
        );
        assert!(p.speaks(Some("GRPC"), Dialect::V03) && !p.speaks(Some("GRPC"), Dialect::V10));
        assert!(p.speaks(None, Dialect::V03) && p.speaks(Some("MQTT"), Dialect::V03));
        // a binding the card states no version for: unknown, so any
        assert!(p.speaks(Some("HTTP+JSON"), Dialect::V03));
        let empty = AgentRecord {
            digest: String::new(),
            skills: vec![],
            protocols: vec![],
            a2a: Vec::new(),
            health: Health::Unknown,
            expires_ms: 0,
        };
        assert_eq!(PackedRecord::pack(&empty).unpack(), empty);
        // a card that states no version: unknown, so any
        let unknown = PackedRecord::pack(&empty);
        assert!(
            unknown.speaks(Some("HTTP+JSON"), Dialect::V03) && unknown.speaks(None, Dialect::V10)
        );
        // one allocation: the strings' bytes, two bytes per length or count
        let text: usize = 64 + 3 + 9 + 4 + "résumé".len() + 5 + 7 + 4;
        // digest, skill count, 2 skills (id, name, tag count) and 3 tags,
        // protocol count and 2 protocols
        let lengths = 2 * (1 + 1 + 2 * 3 + 3 + 1 + 2);
        assert_eq!(p.data.len(), text + lengths);
    }

    #[test]
    fn an_over_long_string_is_cut_at_a_char_boundary() {
        let mut r = record();
        r.skills[0].name = "é".repeat(40_000); // 80,000 bytes
        let p = PackedRecord::pack(&r);
        let name = p.skills().next().map(|s| s.name).unwrap_or_default();
        assert!(name.len() <= usize::from(u16::MAX) && name.chars().all(|c| c == 'é'));
        assert_eq!(p.protocols().count(), 2, "what follows still reads");
    }
}
