//! The compliance report: counts of what a node did for one tenant, read
//! from its audit log (`dmsc-node audit report --tenant T`).
//!
//! Counting is a pure function over parsed [`Line`]s ([`count`]), so it is
//! tested on synthetic logs and works on any source of lines. It reads only
//! what stays in the clear in every entry — the envelope (`kind`, `ts`,
//! `tenant`) and a few documented `detail` fields — and so it keeps working
//! when event kinds are added (each is counted under its `kind` string with
//! no code change) and when a tenant's payload fields are sealed.
//!
//! # What is read from `detail`
//!
//! * `outcome` (string): counted per kind (`ok`, `agent-error`, ...); an
//!   entry without one counts under `-`.
//! * `refused` or `count` (whole number ≥ 1): the entry stands for that many
//!   events (sampled aggregates under a flood, e.g. `rate_limited`); else 1.
//! * `rule` (string), else `code` (string): the rule that refused, for
//!   `denied` entries and any kind whose name ends in `_denied` (requests
//!   refused; a refused policy document is not a denial and shows under its
//!   own kind); counted per rule (`(no rule recorded)` when absent).
//! * `masked`: values masked, by rule — an object `{"<rule>": n}` or a list
//!   of `{"rule": "<rule>", "count": n}`; on any kind.
//! * `sealed` or `withheld` (present): the tenant payload of the entry is
//!   sealed with the tenant's key (or was not written). The entry still
//!   counts by kind, time, tenant and whatever fields the writer kept in the
//!   clear (`outcome`, a denial's `rule`, ...); a denial whose rule was
//!   sealed counts under `(sealed)`; the entry counts in [`Report::sealed`].
//!   For masked and aggregate counts to survive sealing, the writer must
//!   keep `masked`, `refused` and `count` in the clear.
//!
//! Entries without a tenant (node-wide events: revocations, failed
//! handshakes before any identity) are counted apart, in
//! [`Report::node_wide`]; the log's own `checkpoint` and `recovery` lines
//! are not events and are skipped.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::event::{KIND_CHECKPOINT, KIND_DENIED, KIND_RECOVERY};
use crate::line::Line;

/// A rule name for an entry that names none.
pub const NO_RULE: &str = "(no rule recorded)";
/// The rule of an entry whose payload is sealed.
pub const SEALED: &str = "(sealed)";
/// The outcome of an entry that records none.
pub const NO_OUTCOME: &str = "-";

/// Counts of one event kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindCount {
    /// Log entries of this kind.
    pub entries: u64,
    /// Events they stand for (an aggregate entry stands for many).
    pub events: u64,
    /// Events by `detail.outcome`.
    pub outcomes: BTreeMap<String, u64>,
}

/// What [`count`] found for one tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub tenant: String,
    /// Unix ms: entries before it were not counted.
    pub since_ms: Option<u64>,
    /// Unix ms of the first and last entry counted.
    pub first_ts: Option<u64>,
    pub last_ts: Option<u64>,
    /// The tenant's entries, by kind.
    pub kinds: BTreeMap<String, KindCount>,
    /// Refusals by the rule that refused.
    pub denials_by_rule: BTreeMap<String, u64>,
    /// Values masked, by masking rule.
    pub masked_by_rule: BTreeMap<String, u64>,
    /// The tenant's entries whose payload was sealed.
    pub sealed: u64,
    /// Entries with no tenant, by kind (the same period).
    pub node_wide: BTreeMap<String, KindCount>,
    /// Lines that could not be parsed (the reader counts them; a log that
    /// does not verify is `dmsc-node audit verify`'s business).
    pub unreadable: u64,
}

impl Report {
    /// Events of `kind` for the tenant (0 when none).
    pub fn events(&self, kind: &str) -> u64 {
        self.kinds.get(kind).map_or(0, |k| k.events)
    }
}

fn weight(detail: &serde_json::Value) -> u64 {
    ["refused", "count"]
        .iter()
        .find_map(|k| detail.get(*k).and_then(serde_json::Value::as_u64))
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}

fn is_refusal(kind: &str) -> bool {
    kind == KIND_DENIED || kind.ends_with("_denied")
}

fn add(map: &mut BTreeMap<String, u64>, key: &str, n: u64) {
    *map.entry(key.to_string()).or_default() += n;
}

/// Masked counts of one entry: `{"rule": n}` or `[{"rule", "count"}]`.
fn masked(detail: &serde_json::Value) -> Vec<(String, u64)> {
    match detail.get("masked") {
        Some(serde_json::Value::Object(m)) => m
            .iter()
            .filter_map(|(rule, n)| Some((rule.clone(), n.as_u64()?)))
            .collect(),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .filter_map(|e| {
                Some((
                    e.get("rule")?.as_str()?.to_string(),
                    e.get("count")?.as_u64()?,
                ))
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Counts the entries of `tenant` at or after `since_ms` (unix ms).
pub fn count<'a>(
    lines: impl IntoIterator<Item = &'a Line>,
    tenant: &str,
    since_ms: Option<u64>,
) -> Report {
    let mut r = Report::new(tenant, since_ms);
    for line in lines {
        r.add(line);
    }
    r
}

impl Report {
    /// An empty report of `tenant`, counting entries at or after `since_ms`.
    pub fn new(tenant: &str, since_ms: Option<u64>) -> Report {
        Report {
            tenant: tenant.to_string(),
            since_ms,
            ..Report::default()
        }
    }

    /// Counts one line (streaming: a long log is never held in memory).
    pub fn add(&mut self, line: &Line) {
        let r = self;
        let tenant = r.tenant.as_str();
        if line.kind == KIND_CHECKPOINT || line.kind == KIND_RECOVERY {
            return;
        }
        if r.since_ms.is_some_and(|s| line.ts < s) {
            return;
        }
        let d = &line.detail;
        let n = weight(d);
        let outcome = d
            .get("outcome")
            .and_then(serde_json::Value::as_str)
            .unwrap_or(NO_OUTCOME);
        let bucket = match line.tenant.as_deref() {
            None => &mut r.node_wide,
            Some(t) if t == tenant => &mut r.kinds,
            Some(_) => return,
        };
        let k = bucket.entry(line.kind.clone()).or_default();
        k.entries += 1;
        k.events += n;
        add(&mut k.outcomes, outcome, n);
        if line.tenant.is_none() {
            return;
        }
        r.first_ts = Some(r.first_ts.map_or(line.ts, |f| f.min(line.ts)));
        r.last_ts = Some(r.last_ts.map_or(line.ts, |l| l.max(line.ts)));
        let sealed = ["sealed", "withheld"]
            .iter()
            .any(|f| d.get(*f).is_some_and(|v| !v.is_null()));
        if sealed {
            r.sealed += 1;
        }
        if is_refusal(&line.kind) {
            let named = ["rule", "code"]
                .iter()
                .find_map(|f| d.get(*f).and_then(serde_json::Value::as_str))
                .filter(|s| !s.is_empty());
            let rule = match (named, sealed) {
                (Some(rule), _) => rule,
                (None, true) => SEALED,
                (None, false) => NO_RULE,
            };
            add(&mut r.denials_by_rule, rule, n);
        }
        for (rule, m) in masked(d) {
            add(&mut r.masked_by_rule, &rule, m);
        }
    }
}

/// Left-aligned columns two spaces apart; numbers right-aligned.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            let numeric = i > 0 && c.bytes().all(|b| b.is_ascii_digit()) && !c.is_empty();
            if i > 0 {
                l.push_str("  ");
            }
            if numeric {
                l.push_str(&format!("{c:>w$}"));
            } else if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}"));
            }
        }
        l.truncate(l.trim_end().len());
        l.push('\n');
        l
    };
    let mut out = line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

/// One row per kind: events, entries, then the outcomes (most first;
/// left out when no entry of the kind records one).
fn kind_rows(kinds: &BTreeMap<String, KindCount>) -> Vec<Vec<String>> {
    kinds
        .iter()
        .map(|(kind, k)| {
            let mut outcomes: Vec<(&String, &u64)> = k.outcomes.iter().collect();
            outcomes.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let by_outcome = if outcomes.iter().all(|(o, _)| *o == NO_OUTCOME) {
                String::new()
            } else {
                outcomes
                    .iter()
                    .map(|(o, n)| format!("{o} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            vec![
                kind.clone(),
                k.events.to_string(),
                k.entries.to_string(),
                by_outcome,
            ]
        })
        .collect()
}

impl Report {
    /// The text `dmsc-node audit report` prints: aligned tables. `fmt_ts`
    /// renders a unix-ms time (the binary formats RFC 3339).
    pub fn render(&self, fmt_ts: impl Fn(u64) -> String) -> String {
        let mut out = format!("tenant   {}\n", self.tenant);
        out.push_str(&format!(
            "period   {} .. {}{}\n",
            self.first_ts.map(&fmt_ts).unwrap_or_else(|| "-".into()),
            self.last_ts.map(&fmt_ts).unwrap_or_else(|| "-".into()),
            self.since_ms
                .map(|s| format!(" (entries since {})", fmt_ts(s)))
                .unwrap_or_default()
        ));
        let entries: u64 = self.kinds.values().map(|k| k.entries).sum();
        out.push_str(&format!(
            "entries  {entries} ({} with a sealed payload){}\n\n",
            self.sealed,
            if self.unreadable > 0 {
                format!("; {} unreadable line(s) skipped", self.unreadable)
            } else {
                String::new()
            }
        ));
        if self.kinds.is_empty() {
            out.push_str("no entries for this tenant\n");
        } else {
            out.push_str(&table(
                &["EVENT", "EVENTS", "ENTRIES", "BY OUTCOME"],
                &kind_rows(&self.kinds),
            ));
        }
        for (title, header, map) in [
            (
                "denials by rule",
                ["RULE", "DENIALS"],
                &self.denials_by_rule,
            ),
            (
                "masked values by rule",
                ["RULE", "MASKED"],
                &self.masked_by_rule,
            ),
        ] {
            if !map.is_empty() {
                out.push_str(&format!("\n{title}\n"));
                let rows: Vec<Vec<String>> = map
                    .iter()
                    .map(|(k, n)| vec![k.clone(), n.to_string()])
                    .collect();
                out.push_str(&table(&header, &rows));
            }
        }
        if !self.node_wide.is_empty() {
            out.push_str("\nnode-wide entries (no tenant) in the same log\n");
            out.push_str(&table(
                &["EVENT", "EVENTS", "ENTRIES", "BY OUTCOME"],
                &kind_rows(&self.node_wide),
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn line(
        seq: u64,
        ts: u64,
        tenant: Option<&str>,
        kind: &str,
        detail: serde_json::Value,
    ) -> Line {
        Line {
            seq,
            ts,
            node: "n0".into(),
            tenant: tenant.map(str::to_string),
            kind: kind.into(),
            prev: crate::GENESIS_PREV.into(),
            detail,
        }
    }

    /// A log with every kind the report knows, one it does not, sealed
    /// payloads, aggregates, another tenant and node-wide entries.
    fn log() -> Vec<Line> {
        let d = |outcome: &str| json!({"caller": "c", "target": "agent:x", "outcome": outcome});
        vec![
            line(0, 1_000, Some("acme"), "delegation", d("ok")),
            line(1, 2_000, Some("acme"), "delegation", d("ok")),
            line(2, 3_000, Some("acme"), "delegation", d("agent-error")),
            line(3, 3_500, Some("globex"), "delegation", d("ok")),
            line(
                4,
                4_000,
                Some("acme"),
                "denied",
                json!({"caller": "c", "target": "t", "reason": "x", "rule": "export:billing"}),
            ),
            line(
                5,
                4_100,
                Some("acme"),
                "denied",
                json!({"caller": "c", "target": "t", "reason": "cross-tenant"}),
            ),
            line(
                6,
                4_200,
                Some("acme"),
                "denied",
                json!({"sealed": "sealed:v1:abc", "outcome": "denied"}),
            ),
            line(
                18,
                4_300,
                Some("acme"),
                "denied",
                json!({"sealed": "sealed:v1:def", "rule": "acme:export"}),
            ),
            line(
                7,
                5_000,
                Some("acme"),
                "rate_limited",
                json!({"caller": "c", "target": "t", "scope": "tenant", "limit": "10/s", "refused": 1}),
            ),
            line(
                8,
                5_100,
                Some("acme"),
                "rate_limited",
                json!({"caller": "", "target": "", "scope": "tenant", "limit": "10/s", "refused": 250, "window_s": 10}),
            ),
            line(
                9,
                6_000,
                Some("acme"),
                "delegation",
                json!({"outcome": "ok", "masked": {"email": 3, "iban": 1}}),
            ),
            line(
                10,
                6_100,
                Some("acme"),
                "masked",
                json!({"masked": [{"rule": "email", "count": 2}]}),
            ),
            line(
                11,
                7_000,
                Some("acme"),
                "enrollment",
                json!({"agent": "a", "serial": "01", "not_after": 9, "via": {"token": "id"}}),
            ),
            line(
                12,
                7_100,
                Some("acme"),
                "policy_applied",
                json!({"version": 3, "outcome": "applied"}),
            ),
            line(
                13,
                7_200,
                Some("acme"),
                "policy_refused",
                json!({"version": 2, "rule": "older_version"}),
            ),
            line(
                14,
                7_300,
                Some("acme"),
                "auth_failure",
                json!({"listener": "l", "method": "jwt", "reason": "expired", "peer": "p"}),
            ),
            line(
                15,
                7_400,
                Some("acme"),
                "tenant_key_rotated",
                json!({"key_id": "k2"}),
            ),
            line(
                16,
                7_500,
                None,
                "revocation",
                json!({"serial": "02", "reason": "r", "source": "admin"}),
            ),
            line(
                17,
                7_600,
                None,
                "checkpoint",
                json!({"head": "h", "seq": 17, "cert": "c", "sig": "s"}),
            ),
        ]
    }

    #[test]
    fn counts_by_kind_outcome_rule_and_mask_for_one_tenant() {
        let log = log();
        let r = count(&log, "acme", None);
        let del = &r.kinds["delegation"];
        assert_eq!((del.entries, del.events), (4, 4), "globex's is not counted");
        assert_eq!(del.outcomes["ok"], 3);
        assert_eq!(del.outcomes["agent-error"], 1);
        assert_eq!(r.events("denied"), 4);
        assert_eq!(
            r.denials_by_rule,
            BTreeMap::from([
                ("export:billing".to_string(), 1),
                ("acme:export".to_string(), 1),
                (NO_RULE.to_string(), 1),
                (SEALED.to_string(), 1),
            ]),
            "a rule kept in the clear counts even when the rest is sealed"
        );
        let rl = &r.kinds["rate_limited"];
        assert_eq!(
            (rl.entries, rl.events),
            (2, 251),
            "an aggregate stands for its count"
        );
        assert_eq!(r.masked_by_rule["email"], 5);
        assert_eq!(r.masked_by_rule["iban"], 1);
        assert_eq!(r.events("enrollment"), 1);
        assert_eq!(r.events("auth_failure"), 1);
        // Kinds this code has never heard of are counted under their name.
        assert_eq!(r.events("policy_applied"), 1);
        assert_eq!(r.kinds["policy_applied"].outcomes["applied"], 1);
        assert_eq!(r.events("tenant_key_rotated"), 1);
        assert_eq!(r.kinds["tenant_key_rotated"].outcomes[NO_OUTCOME], 1);
        assert_eq!(r.sealed, 2);
        assert_eq!(
            r.kinds["denied"].outcomes["denied"], 1,
            "outcome stays in the clear"
        );
        assert_eq!(r.events("revocation"), 0);
        assert_eq!(r.node_wide["revocation"].events, 1);
        assert!(!r.node_wide.contains_key("checkpoint"));
        assert_eq!((r.first_ts, r.last_ts), (Some(1_000), Some(7_400)));
    }

    #[test]
    fn since_drops_older_entries_and_another_tenant_sees_only_its_own() {
        let log = log();
        let r = count(&log, "acme", Some(5_000));
        assert_eq!(r.events("delegation"), 1);
        assert_eq!(r.events("denied"), 0);
        assert_eq!(r.first_ts, Some(5_000));
        let g = count(&log, "globex", None);
        assert_eq!(g.kinds.len(), 1);
        assert_eq!(g.events("delegation"), 1);
        assert!(g.denials_by_rule.is_empty() && g.masked_by_rule.is_empty());
        let none = count(&log, "initech", None);
        assert!(none.kinds.is_empty());
        assert!(none
            .render(|t| t.to_string())
            .contains("no entries for this tenant"));
    }

    #[test]
    fn the_text_is_an_aligned_table_and_the_json_round_trips() {
        let log = log();
        let r = count(&log, "acme", None);
        let text = r.render(|t| format!("t{t}"));
        assert!(text.contains("tenant   acme\n"), "{text}");
        let header = text
            .lines()
            .find(|l| l.starts_with("EVENT"))
            .expect("table header");
        let col = header.find("EVENTS").expect("EVENTS column");
        let row = text
            .lines()
            .find(|l| l.starts_with("rate_limited"))
            .expect("rate_limited row");
        // The count ends where the header's EVENTS ends (right-aligned).
        assert_eq!(&row[col..col + 6], "   251", "{text}");
        assert!(text.contains("denials by rule"), "{text}");
        assert!(text.contains("export:billing"), "{text}");
        assert!(text.contains("masked values by rule"), "{text}");
        assert!(text.contains("node-wide entries"), "{text}");
        let back: Report =
            serde_json::from_str(&serde_json::to_string(&r).expect("json")).expect("parse");
        assert_eq!(back, r);
    }
}
