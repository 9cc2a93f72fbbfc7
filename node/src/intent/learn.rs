//! Examples learned from callers' choices.
//!
//! When a caller resolves an ask by calling one of the candidates, the text
//! it asked with becomes an extra example of that agent: the next caller
//! with the same need is routed without asking. Both scorers read learned
//! examples like the card's own (BM25 as example text, the model as one
//! more piece).
//!
//! Why it is shaped so: routing must not be poisonable. Only authenticated
//! callers teach (the ingress checks), each at most `per_caller` examples
//! an hour on this node, and an agent keeps at most `per_agent` examples
//! (deduplicated, case-insensitively). Each node gossips what it learned
//! itself, one small record per agent (`learned/<tenant>/<agent>` =
//! `{"add": [...], "del": [...]}`); every node merges all records: the
//! union of additions minus the union of removals. An operator's removal
//! (admin API) is a `del` entry, so it wins on every node even over
//! another node's `add`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Gossip key prefix of learned examples.
pub const KEY_PREFIX: &str = "learned/";

/// Longest learned example kept (characters); longer texts are cut.
pub const MAX_TEXT: usize = 500;
/// Removals remembered per agent.
const MAX_DEL: usize = 256;
/// A record's encoded size at most (a gossip message must hold it).
pub const MAX_RECORD_BYTES: usize = 16 * 1024;

/// Drops the oldest additions, then the oldest removals, until the record
/// encodes within [`MAX_RECORD_BYTES`].
fn fit(r: &mut Record) {
    let size = |r: &Record| serde_json::to_string(r).map_or(usize::MAX, |s| s.len());
    while size(r) > MAX_RECORD_BYTES && !r.add.is_empty() {
        r.add.remove(0);
    }
    while size(r) > MAX_RECORD_BYTES && !r.del.is_empty() {
        r.del.remove(0);
    }
}

/// `learned/<tenant>/<agent>`.
pub fn key(tenant: &str, agent: &str) -> String {
    format!("{KEY_PREFIX}{tenant}/{agent}")
}

fn parse_key(key: &str) -> Option<(String, String)> {
    let (t, a) = key.strip_prefix(KEY_PREFIX)?.split_once('/')?;
    (!t.is_empty() && !a.is_empty()).then(|| (t.to_string(), a.to_string()))
}

/// Whitespace collapsed, cut at [`MAX_TEXT`] characters.
pub fn normalize(text: &str) -> String {
    let mut out = String::new();
    for w in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(w);
    }
    match out.char_indices().nth(MAX_TEXT) {
        Some((i, _)) => out[..i].to_string(),
        None => out,
    }
}

fn same(a: &str, b: &str) -> bool {
    a.to_lowercase() == b.to_lowercase()
}

/// What a removal records: a short hash of the lowercased text, so a
/// removed example's text is neither gossiped nor stored again.
pub fn removal(text: &str) -> String {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(normalize(text).to_lowercase().as_bytes());
    d.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

/// One node's record for one agent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    #[serde(default)]
    pub add: Vec<String>,
    /// [`removal`] hashes of removed examples.
    #[serde(default)]
    pub del: Vec<String>,
}

/// Why an example was not learned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("caller `{0}` reached its limit of learned examples for this hour")]
    CallerCap(String),
    #[error("empty text")]
    Empty,
}

type Agent = (String, String);

/// This node's learned examples and its peers' records.
#[derive(Debug)]
pub struct Learned {
    me: String,
    per_agent: usize,
    per_caller: u32,
    window: Duration,
    own: BTreeMap<Agent, Record>,
    peers: HashMap<String, BTreeMap<Agent, Record>>,
    taught: HashMap<String, VecDeque<Instant>>,
    dirty: BTreeSet<Agent>,
}

impl Learned {
    pub fn new(me: &str, per_agent: usize, per_caller: u32, window: Duration) -> Learned {
        Learned {
            me: me.to_string(),
            per_agent: per_agent.max(1),
            per_caller,
            window,
            own: BTreeMap::new(),
            peers: HashMap::new(),
            taught: HashMap::new(),
            dirty: BTreeSet::new(),
        }
    }

    /// Learns `text` as an example of `tenant/agent`, taught by `caller`.
    /// `Ok(false)`: already known.
    pub fn learn(
        &mut self,
        tenant: &str,
        agent: &str,
        text: &str,
        caller: &str,
        now: Instant,
    ) -> Result<bool, Refused> {
        let text = normalize(text);
        if text.is_empty() {
            return Err(Refused::Empty);
        }
        let k = (tenant.to_string(), agent.to_string());
        // Known, or removed by an operator (a removal sticks: a caller
        // never brings an example back).
        if self.merged_one(&k).iter().any(|t| same(t, &text)) || self.removed(&k, &text) {
            return Ok(false);
        }
        let taught = self.taught.entry(caller.to_string()).or_default();
        while taught
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            taught.pop_front();
        }
        if taught.len() >= self.per_caller as usize {
            return Err(Refused::CallerCap(caller.to_string()));
        }
        taught.push_back(now);
        if self.taught.len() > 100_000 {
            // bounded: forget callers with nothing in the window
            let w = self.window;
            self.taught
                .retain(|_, q| q.back().is_some_and(|t| now.duration_since(*t) < w));
        }
        let r = self.own.entry(k.clone()).or_default();
        r.add.push(text);
        if r.add.len() > self.per_agent {
            r.add.remove(0);
        }
        fit(r);
        self.dirty.insert(k);
        Ok(true)
    }

    /// Removes one example of an agent (or all of them: `None`) on every
    /// node. Returns how many were removed from the merged view.
    pub fn remove(&mut self, tenant: &str, agent: &str, text: Option<&str>) -> usize {
        let k = (tenant.to_string(), agent.to_string());
        let current = self.merged_one(&k);
        let gone: Vec<String> = match text {
            Some(t) => current
                .into_iter()
                .filter(|c| same(c, &normalize(t)))
                .collect(),
            None => current,
        };
        if gone.is_empty() {
            return 0;
        }
        let r = self.own.entry(k.clone()).or_default();
        for g in &gone {
            r.add.retain(|a| !same(a, g));
            let h = removal(g);
            if !r.del.contains(&h) {
                r.del.push(h);
            }
        }
        while r.del.len() > MAX_DEL {
            r.del.remove(0);
        }
        fit(r);
        self.dirty.insert(k);
        gone.len()
    }

    fn removed(&self, k: &Agent, text: &str) -> bool {
        let h = removal(text);
        self.own
            .get(k)
            .into_iter()
            .chain(self.peers.values().filter_map(|p| p.get(k)))
            .any(|r| r.del.contains(&h))
    }

    fn merged_one(&self, k: &Agent) -> Vec<String> {
        let records = self
            .own
            .get(k)
            .into_iter()
            .chain(self.peers.values().filter_map(|p| p.get(k)));
        let mut add: Vec<String> = Vec::new();
        let mut del: Vec<&str> = Vec::new();
        for r in records {
            for a in &r.add {
                if !add.iter().any(|x| same(x, a)) {
                    add.push(a.clone());
                }
            }
            del.extend(r.del.iter().map(String::as_str));
        }
        add.retain(|a| !del.contains(&removal(a).as_str()));
        add.truncate(self.per_agent);
        add
    }

    /// Every agent's learned examples, merged across nodes.
    pub fn merged(&self) -> BTreeMap<Agent, Vec<String>> {
        let keys: BTreeSet<&Agent> = self
            .own
            .keys()
            .chain(self.peers.values().flat_map(|p| p.keys()))
            .collect();
        keys.into_iter()
            .map(|k| (k.clone(), self.merged_one(k)))
            .filter(|(_, v)| !v.is_empty())
            .collect()
    }

    /// Records changed since the last call, as gossip `(key, value)`.
    pub fn take_dirty(&mut self) -> Vec<(String, String)> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty
            .into_iter()
            .filter_map(|k| {
                let r = self.own.get(&k)?;
                let v = serde_json::to_string(r).ok()?;
                Some((key(&k.0, &k.1), v))
            })
            .collect()
    }

    /// A peer's current `learned/` values (all of them); a peer that is
    /// gone is forgotten with [`Learned::forget_peer`].
    pub fn set_peer(&mut self, node: &str, values: &[(String, String)]) {
        if node == self.me {
            return;
        }
        let mut m = BTreeMap::new();
        for (k, v) in values {
            let (Some(agent), Ok(mut r)) = (parse_key(k), serde_json::from_str::<Record>(v)) else {
                continue;
            };
            // a peer's record is bounded like ours
            r.add.truncate(self.per_agent);
            r.add.iter_mut().for_each(|a| *a = normalize(a));
            r.del.truncate(MAX_DEL);
            r.del.retain(|d| d.len() <= 64);
            m.insert(agent, r);
        }
        // A peer's removals become this node's too, so they outlive the
        // peer (a node that leaves takes its own record with it).
        for (agent, r) in &m {
            let mine = self.own.entry(agent.clone()).or_default();
            let mut changed = false;
            for d in &r.del {
                if !mine.del.contains(d) {
                    mine.del.push(d.clone());
                    changed = true;
                }
            }
            if changed {
                mine.add.retain(|a| !r.del.contains(&removal(a)));
                while mine.del.len() > MAX_DEL {
                    mine.del.remove(0);
                }
                fit(mine);
                self.dirty.insert(agent.clone());
            }
        }
        self.own
            .retain(|_, r| !r.add.is_empty() || !r.del.is_empty());
        self.peers.insert(node.to_string(), m);
    }

    pub fn forget_peer(&mut self, node: &str) {
        self.peers.remove(node);
    }

    /// This node's own records (what it learned and removed), to persist.
    pub fn own_json(&self) -> String {
        let list: Vec<serde_json::Value> = self
            .own
            .iter()
            .map(|((t, a), r)| serde_json::json!({"tenant": t, "agent": a, "add": r.add, "del": r.del}))
            .collect();
        serde_json::Value::Array(list).to_string()
    }

    /// Restores this node's own records (at start) and marks them for
    /// gossip. Entries that do not parse are skipped.
    pub fn restore(&mut self, json: &str) -> usize {
        let Ok(serde_json::Value::Array(list)) = serde_json::from_str::<serde_json::Value>(json)
        else {
            return 0;
        };
        let mut n = 0;
        for v in list {
            let (Some(t), Some(a)) = (v["tenant"].as_str(), v["agent"].as_str()) else {
                continue;
            };
            let Ok(mut r) = serde_json::from_value::<Record>(v.clone()) else {
                continue;
            };
            r.add.truncate(self.per_agent);
            r.del.truncate(MAX_DEL);
            fit(&mut r);
            let k = (t.to_string(), a.to_string());
            self.own.insert(k.clone(), r);
            self.dirty.insert(k);
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learn_dedup_caps_and_merge() {
        let now = Instant::now();
        let mut a = Learned::new("a", 3, 2, Duration::from_secs(3600));
        assert_eq!(
            a.learn("acme", "x", "  my  paycheck is short ", "c1", now),
            Ok(true)
        );
        assert_eq!(
            a.learn("acme", "x", "MY PAYCHECK IS SHORT", "c1", now),
            Ok(false)
        );
        assert_eq!(a.learn("acme", "x", "second", "c1", now), Ok(true));
        assert_eq!(
            a.learn("acme", "x", "third", "c1", now),
            Err(Refused::CallerCap("c1".into()))
        );
        // the window passes
        let later = now + Duration::from_secs(3601);
        assert_eq!(a.learn("acme", "x", "third", "c1", later), Ok(true));
        assert_eq!(a.learn("acme", "x", "fourth", "c2", later), Ok(true));
        // per-agent bound: the oldest goes
        let m = a.merged();
        assert_eq!(
            m[&("acme".into(), "x".into())],
            vec!["second", "third", "fourth"]
        );
        assert_eq!(a.learn("acme", "x", " ", "c3", later), Err(Refused::Empty));

        // gossip to b; b merges; a removal on b wins on a too
        let mut b = Learned::new("b", 3, 2, Duration::from_secs(3600));
        let values = a.take_dirty();
        assert_eq!(values.len(), 1);
        assert_eq!(values[0].0, "learned/acme/x");
        assert!(a.take_dirty().is_empty());
        b.set_peer("a", &values);
        assert_eq!(b.merged()[&("acme".into(), "x".into())].len(), 3);
        assert_eq!(b.remove("acme", "x", Some("THIRD")), 1);
        assert_eq!(
            b.merged()[&("acme".into(), "x".into())],
            vec!["second", "fourth"]
        );
        a.set_peer("b", &b.take_dirty());
        assert_eq!(
            a.merged()[&("acme".into(), "x".into())],
            vec!["second", "fourth"]
        );
        // a removed example cannot be taught again
        assert_eq!(a.learn("acme", "x", "third", "c9", later), Ok(false));
        assert_eq!(
            a.merged()[&("acme".into(), "x".into())],
            vec!["second", "fourth"]
        );
        // records stay small enough for one gossip message
        let mut big = Learned::new("big", 1000, 10_000, Duration::from_secs(3600));
        for i in 0..100 {
            let _ = big.learn(
                "acme",
                "y",
                &format!("{i} {}", "\u{1}".repeat(400)),
                "c",
                later,
            );
        }
        let recs = big.take_dirty();
        assert!(recs[0].1.len() <= MAX_RECORD_BYTES, "{}", recs[0].1.len());
        // remove all
        assert_eq!(a.remove("acme", "x", None), 2);
        assert!(a.merged().is_empty());
        // garbage from a peer is ignored
        b.set_peer(
            "z",
            &[
                ("learned/acme".into(), "{}".into()),
                ("learned/a/b".into(), "nope".into()),
            ],
        );
        assert!(b.peers["z"].is_empty());
        // own records survive a restart, removals included
        let mut c = Learned::new("b", 3, 2, Duration::from_secs(3600));
        assert_eq!(c.restore(&b.own_json()), 1);
        c.set_peer("a", &values);
        assert_eq!(
            c.merged()[&("acme".into(), "x".into())],
            vec!["second", "fourth"]
        );
        assert_eq!(
            c.take_dirty().len(),
            1,
            "restored records are gossiped again"
        );
        assert_eq!(c.restore("not json"), 0);
    }

    #[test]
    fn long_text_is_cut() {
        assert_eq!(
            normalize(&"é".repeat(MAX_TEXT + 10)).chars().count(),
            MAX_TEXT
        );
        assert_eq!(normalize("a\n\tb"), "a b");
    }
}
