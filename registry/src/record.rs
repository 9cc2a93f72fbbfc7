//! What one node gossips about each agent it hosts, and the keys it is gossiped under.
//!
//! Owns: the `agent/<tenant>/<name>` value ([`AgentRecord`]: card digest,
//! skill ids/names/tags, protocols, health, registration expiry), the
//! `load/<tenant>/<name>` value ([`LoadReport`]), their encodings (compact
//! JSON for the record, a short list of numbers for load), and the key
//! builders and parsers.
//!
//! Why it is shaped so: gossip values must stay small (DESIGN.md, "what is
//! gossiped"): the full card is fetched on demand from the home node and
//! cached by digest, so the record carries only what selection by tag needs
//! and the digest that says whether a cached card is current. Load is a
//! separate key because it changes every gossip round while the record
//! changes only when the agent does. Record field names stay readable
//! (`digest`, `expires_ms`): the record is a few hundred bytes either way,
//! and a human reading gossip state in `status --json` should not need a
//! decoder ring. Load reports are different: they are most of what a busy
//! mesh gossips (BENCHMARKS.md, gossip), so they travel as
//! `in_flight,queue,ewma_ms,error_rate,cpu` (`3,0,4.1`: trailing zeros
//! left out, latency to two significant digits, rates to hundredths; 5-15
//! bytes instead of ~70 as JSON), and a change below that precision is no
//! change. The JSON form older nodes publish is still read.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::card::{is_slug, AgentCard};

/// Largest encoded record or load report [`AgentRecord::decode`] and
/// [`LoadReport::decode`] accept. Far above a real record (an agent with 50
/// skills of 10 tags each is ~10 KiB); it bounds what a peer can make us parse.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// Why a gossiped value could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecordError {
    #[error("gossip value is not a valid {what}: {reason}")]
    Json { what: &'static str, reason: String },
    #[error("gossip value of {len} bytes is over the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
}

/// Skill summary carried in gossip: enough to select by tag and to show in status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkillTags {
    pub id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// Health of an agent as its home node last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Healthy,
    Unhealthy,
    /// Not probed yet. Not eligible for selection (see `select`).
    #[default]
    Unknown,
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
            Health::Unknown => "unknown",
        })
    }
}

/// Value of the gossip key `agent/<tenant>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// [`AgentCard::digest`] of the card the home node serves (URLs rewritten).
    pub digest: String,
    #[serde(default)]
    pub skills: Vec<SkillTags>,
    /// Protocol bindings (`JSONRPC`, `GRPC`, `HTTP+JSON`, `MQTT`).
    #[serde(default)]
    pub protocols: Vec<String>,
    /// The A2A binding and version of each endpoint, as the card states
    /// them (`"JSONRPC 1.0"`, `"HTTP+JSON 0.3"`:
    /// [`AgentCard::a2a_interfaces`]); empty when it states none (unknown),
    /// and in records of nodes that predate the field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub a2a: Vec<String>,
    #[serde(default)]
    pub health: Health,
    /// Registration expiry, unix milliseconds; the home node renews it.
    pub expires_ms: u64,
}

impl AgentRecord {
    /// The record for a card as the home node serves it (`card` should
    /// already have its URLs rewritten, so the digest matches what peers fetch).
    pub fn from_card(card: &AgentCard, health: Health, expires_ms: u64) -> AgentRecord {
        AgentRecord {
            digest: card.digest(),
            skills: card.skill_tags(),
            protocols: card.protocols(),
            a2a: a2a_strings(card),
            health,
            expires_ms,
        }
    }

    /// Compact JSON.
    pub fn encode(&self) -> String {
        // A struct of strings, vectors and integers always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn decode(s: &str) -> Result<AgentRecord, RecordError> {
        check_len(s)?;
        let mut r: AgentRecord = serde_json::from_str(s).map_err(|e| RecordError::Json {
            what: "agent record",
            reason: e.to_string(),
        })?;
        // Kept for every remote agent: no growth slack (serde's vectors
        // start at four elements; a record has two skills of three tags).
        r.skills.shrink_to_fit();
        for k in &mut r.skills {
            k.tags.shrink_to_fit();
        }
        r.protocols.shrink_to_fit();
        Ok(r)
    }
}

/// [`AgentRecord::a2a`] of a card.
pub fn a2a_strings(card: &AgentCard) -> Vec<String> {
    card.a2a_interfaces()
        .iter()
        .map(|(b, d)| format!("{b} {d}"))
        .collect()
}

/// Value of the gossip key `load/<tenant>/<name>`, refreshed about every gossip round.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LoadReport {
    /// Requests the agent is serving now (all callers, as its home node counts them).
    pub in_flight: u32,
    /// Requests waiting at the home node for a free slot of the agent.
    pub queue: u32,
    /// EWMA of the agent's service latency (time to answer), milliseconds.
    pub ewma_ms: f32,
    /// Share of recent requests that failed, 0..=1.
    pub error_rate: f32,
    /// CPU use of the agent (or its node) 0..=1, informational.
    pub cpu: f32,
}

/// `x` to `digits` significant digits, as the shortest decimal text.
fn significant(x: f32, digits: i32) -> String {
    if !x.is_finite() || x <= 0.0 {
        return "0".into();
    }
    let x = f64::from(x);
    let decimals = digits - 1 - x.log10().floor() as i32;
    if decimals > 0 {
        let s = format!("{x:.*}", decimals as usize);
        let s = s.trim_end_matches('0').trim_end_matches('.');
        if s.is_empty() {
            "0".into()
        } else {
            s.to_string()
        }
    } else {
        let unit = 10f64.powi(-decimals);
        format!("{:.0}", (x / unit).round() * unit)
    }
}

/// `x` in 0..=1 to hundredths.
fn hundredths(x: f32) -> String {
    if !x.is_finite() || x <= 0.0 {
        return "0".into();
    }
    let s = format!("{:.2}", x.min(1.0));
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() {
        "0".into()
    } else {
        s.to_string()
    }
}

impl LoadReport {
    /// `in_flight,queue,ewma_ms,error_rate,cpu`, trailing zeros left out
    /// (see the module doc); the same report at the precision it travels at
    /// encodes the same, so callers compare encodings to see a change.
    pub fn encode(&self) -> String {
        let mut fields = [
            self.in_flight.to_string(),
            self.queue.to_string(),
            significant(self.ewma_ms, 2),
            hundredths(self.error_rate),
            hundredths(self.cpu),
        ]
        .to_vec();
        while fields.len() > 1 && fields.last().is_some_and(|f| f == "0") {
            fields.pop();
        }
        fields.join(",")
    }

    /// Reads [`encode`](Self::encode)'s form, or the JSON object older
    /// nodes publish.
    pub fn decode(s: &str) -> Result<LoadReport, RecordError> {
        check_len(s)?;
        let bad = |reason: String| RecordError::Json {
            what: "load report",
            reason,
        };
        if s.trim_start().starts_with('{') {
            return serde_json::from_str(s).map_err(|e| bad(e.to_string()));
        }
        let fields: Vec<&str> = s.split(',').collect();
        if fields.len() > 5 {
            return Err(bad(format!("{} fields, at most 5", fields.len())));
        }
        let count = |i: usize| -> Result<u32, RecordError> {
            fields.get(i).map_or(Ok(0), |f| {
                f.parse()
                    .map_err(|_| bad(format!("field {} is not a count: `{f}`", i + 1)))
            })
        };
        let number = |i: usize| -> Result<f32, RecordError> {
            fields.get(i).map_or(Ok(0.0), |f| match f.parse::<f32>() {
                Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
                _ => Err(bad(format!("field {} is not a number >= 0: `{f}`", i + 1))),
            })
        };
        Ok(LoadReport {
            in_flight: count(0)?,
            queue: count(1)?,
            ewma_ms: number(2)?,
            error_rate: number(3)?,
            cpu: number(4)?,
        })
    }
}

fn check_len(s: &str) -> Result<(), RecordError> {
    if s.len() > MAX_VALUE_BYTES {
        Err(RecordError::TooLarge {
            len: s.len(),
            max: MAX_VALUE_BYTES,
        })
    } else {
        Ok(())
    }
}

/// `agent/<tenant>/<name>`.
pub fn agent_key(tenant: &str, name: &str) -> String {
    format!("agent/{tenant}/{name}")
}

/// `load/<tenant>/<name>`.
pub fn load_key(tenant: &str, name: &str) -> String {
    format!("load/{tenant}/{name}")
}

/// `(tenant, name)` of an `agent/...` key; `None` unless both parts are slugs.
pub fn parse_agent_key(key: &str) -> Option<(String, String)> {
    parse_key(key, "agent/")
}

/// `(tenant, name)` of a `load/...` key; `None` unless both parts are slugs.
pub fn parse_load_key(key: &str) -> Option<(String, String)> {
    parse_key(key, "load/")
}

fn parse_key(key: &str, prefix: &str) -> Option<(String, String)> {
    // Slugs only: a peer cannot smuggle `a/b` or `../` into a tenant or name.
    let (tenant, name) = key.strip_prefix(prefix)?.split_once('/')?;
    (is_slug(tenant) && is_slug(name)).then(|| (tenant.to_string(), name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert_eq!(agent_key("acme", "billing"), "agent/acme/billing");
        assert_eq!(load_key("acme", "billing"), "load/acme/billing");
        assert_eq!(
            parse_agent_key("agent/acme/billing"),
            Some(("acme".into(), "billing".into()))
        );
        assert_eq!(
            parse_load_key("load/acme/billing"),
            Some(("acme".into(), "billing".into()))
        );
        assert_eq!(parse_agent_key("load/acme/billing"), None);
        assert_eq!(parse_agent_key("agent/acme/bill/ing"), None);
        assert_eq!(parse_agent_key("agent/acme/"), None);
        assert_eq!(parse_agent_key("agent//x"), None);
        assert_eq!(parse_agent_key("agent/Acme/x"), None);
        assert_eq!(parse_agent_key("agent/acme"), None);
    }

    #[test]
    fn record_round_trip_and_size() {
        let r = AgentRecord {
            digest: "ab".repeat(32),
            skills: vec![SkillTags {
                id: "sum".into(),
                name: "Summarize".into(),
                tags: vec!["invoice".into(), "summarization".into()],
            }],
            protocols: vec!["JSONRPC".into()],
            a2a: Vec::new(),
            health: Health::Healthy,
            expires_ms: 1_700_000_000_000,
        };
        let s = r.encode();
        assert!(s.contains("\"health\":\"healthy\""), "{s}");
        assert!(s.len() < 250, "{} bytes: {s}", s.len());
        assert_eq!(AgentRecord::decode(&s), Ok(r));
        assert!(AgentRecord::decode("{").is_err());
        let big = format!("\"{}\"", "x".repeat(MAX_VALUE_BYTES));
        assert!(matches!(
            AgentRecord::decode(&big),
            Err(RecordError::TooLarge { .. })
        ));
    }

    #[test]
    fn load_round_trip() {
        let l = LoadReport {
            in_flight: 3,
            queue: 1,
            ewma_ms: 12.5,
            error_rate: 0.25,
            cpu: 0.5,
        };
        assert_eq!(l.encode(), "3,1,13,0.25,0.5");
        let back = LoadReport::decode(&l.encode()).expect("decodes");
        assert_eq!((back.in_flight, back.queue, back.ewma_ms), (3, 1, 13.0));
        assert_eq!((back.error_rate, back.cpu), (0.25, 0.5));
        // At the precision it travels at, a report encodes to itself.
        assert_eq!(back.encode(), l.encode());
        assert_eq!(LoadReport::default().in_flight, 0);
        assert_eq!(LoadReport::default().encode(), "0");
        assert_eq!(LoadReport::decode("0"), Ok(LoadReport::default()));
        let err = LoadReport::decode("{\"in_flight\":-1}").expect_err("negative");
        assert!(err.to_string().contains("load report"), "{err}");
        // What older nodes publish is still read.
        let json = r#"{"in_flight":2,"queue":0,"ewma_ms":4.5,"error_rate":0.0,"cpu":0.0}"#;
        assert_eq!(LoadReport::decode(json).expect("decodes").in_flight, 2);
        for bad in [
            "x",
            "1,2,3,4,5,6",
            "-1",
            "1,1,-2",
            "1,1,NaN",
            "1,,2",
            "1,1,inf",
        ] {
            assert!(LoadReport::decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn load_values_are_short_and_round_to_what_matters() {
        let l = |in_flight, ewma_ms, error_rate| LoadReport {
            in_flight,
            queue: 0,
            ewma_ms,
            error_rate,
            cpu: 0.0,
        };
        assert_eq!(l(3, 4.1234, 0.0).encode(), "3,0,4.1");
        assert_eq!(l(0, 0.0123, 0.0).encode(), "0,0,0.012");
        assert_eq!(l(12, 127.4, 0.031).encode(), "12,0,130,0.03");
        assert_eq!(l(1, 98_765.0, 1.5).encode(), "1,0,99000,1");
        assert_eq!(l(1, 9.96, 0.0).encode(), "1,0,10");
        assert_eq!(l(1, 0.0, 0.004).encode(), "1");
        // A latency change under the second significant digit is no change.
        assert_eq!(l(3, 4.12, 0.0).encode(), l(3, 4.14, 0.0).encode());
        assert_ne!(l(3, 4.12, 0.0).encode(), l(3, 4.2, 0.0).encode());
        let json_len = serde_json::to_string(&l(12, 127.4, 0.031))
            .expect("json")
            .len();
        assert!(json_len > 60 && l(12, 127.4, 0.031).encode().len() < 15);
    }
}
