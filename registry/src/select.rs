//! Selection: which agent gets this delegation?
//!
//! Owns: the candidate set of a [`Target`], the eligibility rule, the
//! power-of-two-choices (P2C) decision and its explanation.
//!
//! - Candidates. `Agent(name)`: that agent of the caller's tenant.
//!   `Tag(tag)`: the tenant's agents with a skill tagged `tag`
//!   (case-insensitive). `Intent(text)`: the tenant's agents whose BM25 score
//!   is at least [`INTENT_RELATIVE`] (half) of the best score, at most
//!   [`INTENT_POOL`]; of those, the [`INTENT_MAX`] best-ranked *eligible*
//!   ones compete, so an unhealthy top match does not hide a healthy runner-up.
//!   Candidates come only from the caller's tenant's indexes: another
//!   tenant's agents are never candidates (tenant isolation).
//! - Eligible: gossip says [`Health::Healthy`](crate::Health::Healthy) (an agent whose health is
//!   `Unknown` has not been probed yet by its home node and is not sent
//!   traffic), this node's circuits for it and for the path to its home
//!   node admit ([`LocalState::admits`]),
//!   and it is not in `exclude` (already tried for this request).
//! - Choice ([`Choice`], default [`Choice::LeastLoaded`]): the eligible
//!   candidate with the lowest [`load_score`] (ties broken at random) of a
//!   scanned set, or of [`SAMPLE_K`] sampled eligible candidates of a large
//!   one. Because the score includes this node's own outstanding requests,
//!   the herd of "always the least loaded" on stale gossip is
//!   self-limiting. [`Choice::PowerOfTwo`] (P2C) takes two eligible
//!   candidates at random and the lower score wins; it must send a request
//!   to a slow agent whenever both draws are slow (3 slow of 10: 6.7 % of
//!   requests). `dmsc-bench balance` over 54 scenarios (10 to 1,000
//!   agents, none or 30 % of them 5x slower, 50-90 % load, gossip every
//!   100 ms to 2 s, 4 nodes): least-loaded had the lower p99 in every one,
//!   geometric mean 1.29x the oracle's p99 against P2C's 2.07x, worst case
//!   3.1x against 12.2x (BENCHMARKS.md); also with 30 nodes. Switching is
//!   one call, [`Registry::set_choice`] (`delegation.selection`).
//!
//! Hot path: tag candidates are a slice of `u32` slots (inline in the index
//! for small tags), each slot's eligibility and load one 64-byte record of
//! a dense array, so a decision touches a few cache lines whatever the
//! registry's size; for sets larger than
//! [`SCAN_LIMIT`] the selector samples random positions until it has two
//! eligible ones (at most [`SAMPLE_TRIES`] tries each) and falls back to a
//! linear scan only when sampling fails. Smaller sets are scanned, which is
//! as fast and gives an exact eligible count. Nothing allocated per decision
//! grows with the candidate count.

use std::borrow::Cow;
use std::fmt::{self, Write as _};

use rand::Rng;

use crate::card::Dialect;
use crate::record::LoadReport;
use crate::semantic::{Scores, Q8};
use crate::{AgentId, Registry};

/// Candidate sets up to this size are scanned (exact eligible count).
pub const SCAN_LIMIT: usize = 32;
/// Random positions tried per pick before falling back to a scan.
pub const SAMPLE_TRIES: usize = 8;
/// Candidates [`Choice::LeastLoaded`] samples from a set too large to scan.
pub const SAMPLE_K: usize = 8;
/// Intent matches must score at least this share of the best score.
pub const INTENT_RELATIVE: f32 = 0.5;
/// At most this many intent matches are considered.
pub const INTENT_POOL: usize = 64;
/// At most this many eligible intent matches compete.
pub const INTENT_MAX: usize = 8;
/// Tenants with more agents than this score only the agents whose card
/// centroid is among this many closest to the query (and every lexical
/// hit) piece by piece.
pub const SEMANTIC_SCAN: usize = 256;
/// Default margin within which another agent's intent score counts as
/// equal to the best one's (a share of the best score).
pub const INTENT_MARGIN: f32 = 0.05;

/// What a delegation is addressed to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// One agent by name.
    Agent(String),
    /// Any agent with a skill of this tag.
    Tag(String),
    /// The agents whose skills best match this text.
    Intent(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Agent(n) => write!(f, "agent `{n}`"),
            Target::Tag(t) => write!(f, "tag `{t}`"),
            Target::Intent(text) => {
                let mut s: String = text.chars().take(60).collect();
                if s.len() < text.len() {
                    s.push_str("...");
                }
                write!(f, "intent \"{s}\"")
            }
        }
    }
}

/// This node's own view of agents: its in-flight requests and its circuits.
pub trait LocalState {
    /// Requests this node has sent to `id` and not yet seen answered.
    fn outstanding(&self, id: &AgentId) -> u32;
    /// Do this node's circuits for `id`, and for the path to its home
    /// node `node`, let a request through?
    fn admits(&self, id: &AgentId, node: &str) -> bool;
}

/// No local state: nothing outstanding, every circuit closed (tests, benches).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLocal;

impl LocalState for NoLocal {
    fn outstanding(&self, _: &AgentId) -> u32 {
        0
    }
    fn admits(&self, _: &AgentId, _: &str) -> bool {
        true
    }
}

/// How [`Registry::select`] chooses among eligible candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Choice {
    /// Power of two choices: two at random, the lower score wins.
    PowerOfTwo,
    /// The lowest score of all eligible candidates when the set is scanned
    /// (at most [`SCAN_LIMIT`] candidates); on larger sets, the lowest of
    /// [`SAMPLE_K`] sampled eligible candidates. The default: it beat P2C
    /// in all 54 scenarios of `dmsc-bench balance` (BENCHMARKS.md).
    #[default]
    LeastLoaded,
}

/// The chosen agent and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub id: AgentId,
    /// Its home node.
    pub node: String,
    /// Size of the candidate set.
    pub candidates: usize,
    /// Eligible candidates. Exact unless `sampled`; then it is the number of
    /// candidates (an upper bound), because counting would mean a scan. For
    /// an intent, the eligible ones among those that competed (at most
    /// [`INTENT_MAX`]).
    pub eligible: usize,
    /// True when the choice came from random sampling of a large set.
    pub sampled: bool,
    /// [`load_score`] of the chosen agent.
    pub score: f64,
    /// The other contender and its score, when there was one (P2C: the
    /// other draw; least-loaded: the runner-up).
    pub other: Option<(AgentId, f64)>,
    /// One sentence for logs and the demo.
    pub why: String,
}

/// Why nothing was selected. Messages are meant for HTTP problem details.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    #[error("tenant `{tenant}` has no agent `{name}`")]
    UnknownAgent { tenant: String, name: String },
    #[error("no agent of tenant `{tenant}` matches {target}")]
    NoMatch { tenant: String, target: String },
    /// Agents match the text, but none serves the request's binding or A2A
    /// version (`binding` says which: "the HTTP+JSON binding", "A2A 1.0").
    #[error("{matched} agent(s) of tenant `{tenant}` match {target}, but none serves {binding}, which this request uses (by their cards' interfaces): send it in a binding and A2A version they serve")]
    NoBinding {
        tenant: String,
        target: String,
        binding: String,
        matched: usize,
    },
    #[error("{target} of tenant `{tenant}`: {candidates} candidate(s), none eligible ({unhealthy} not healthy, {circuit_open} held back by an open circuit on this node (the agent's, or the path's to its home node), {excluded} already tried)")]
    NoneEligible {
        tenant: String,
        target: String,
        candidates: usize,
        unhealthy: usize,
        circuit_open: usize,
        excluded: usize,
    },
}

/// Expected wait at an agent, in milliseconds-ish:
/// `(in_flight + queue + outstanding + 1) * max(ewma_ms, 1) * (1 + 4 * error_rate)`.
///
/// Gossiped load is up to a gossip round old; `outstanding` is this node's
/// own in-flight count, exact and current, so a node that just sent several
/// requests to an agent sees it as busier right away instead of sending it
/// everything until the next round (stale gossip self-corrects). Failing
/// agents look slower, since a failure costs a retry.
pub fn load_score(load: &LoadReport, outstanding: u32) -> f64 {
    let work = f64::from(load.in_flight) + f64::from(load.queue) + f64::from(outstanding) + 1.0;
    let ewma = f64::from(load.ewma_ms).max(1.0);
    let err = f64::from(load.error_rate);
    let err = if err.is_finite() {
        err.clamp(0.0, 1.0)
    } else {
        0.0
    };
    work * ewma * (1.0 + 4.0 * err)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// A free slot (never in an index; defensive).
    Gone,
    Eligible,
    Unhealthy,
    Excluded,
    CircuitOpen,
}

impl Registry {
    /// Eligibility of one slot, reading the dense `hot` record first; the
    /// entry itself is only touched to hand its id to `exclude` and `local`.
    fn verdict(&self, slot: u32, cx: &Ctx<'_>) -> Verdict {
        let Some(h) = self.hot.get(slot as usize).filter(|h| h.live) else {
            return Verdict::Gone;
        };
        if !h.healthy {
            return Verdict::Unhealthy;
        }
        let Some(e) = self.entries.get(slot as usize) else {
            return Verdict::Gone;
        };
        if !cx.exclude.is_empty() && cx.exclude.contains(&e.id) {
            Verdict::Excluded
        } else if !cx.local.admits(&e.id, self.node_of(slot)) {
            Verdict::CircuitOpen
        } else {
            Verdict::Eligible
        }
    }

    /// [`load_score`] of a slot from its hot record and the local count.
    fn score(&self, slot: u32, local: &dyn LocalState) -> f64 {
        match (self.hot.get(slot as usize), self.entries.get(slot as usize)) {
            (Some(h), Some(e)) => load_score(&h.load, local.outstanding(&e.id)),
            _ => f64::INFINITY,
        }
    }
}

#[derive(Default)]
struct Counts {
    eligible: usize,
    unhealthy: usize,
    excluded: usize,
    circuit_open: usize,
}

/// The question being answered, passed down the selection helpers.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    tenant: &'a str,
    target: &'a Target,
    local: &'a dyn LocalState,
    exclude: &'a [AgentId],
}

/// What a request speaks, as far as its node can tell: its A2A protocol
/// binding (`JSONRPC`, `HTTP+JSON`, `GRPC`) and A2A version. An intent is
/// matched only against the agents that serve both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Speaks<'a> {
    pub binding: Option<&'a str>,
    pub a2a: Option<Dialect>,
}

impl Speaks<'_> {
    /// Whether the agent of `record` can take the request.
    pub fn served_by(&self, record: &crate::PackedRecord) -> bool {
        self.binding
            .is_none_or(|b| serves_binding(record.protocols(), b))
            && self.a2a.is_none_or(|d| record.speaks(self.binding, d))
    }

    /// For messages: "the HTTP+JSON binding of A2A 1.0".
    pub fn describe(&self) -> String {
        match (self.binding, self.a2a) {
            (Some(b), Some(d)) => format!("the {b} binding of A2A {d}"),
            (Some(b), None) => format!("the {b} binding"),
            (None, Some(d)) => format!("A2A {d}"),
            (None, None) => "any binding".to_string(),
        }
    }
}

/// True if an agent whose card declares `protocols` serves the A2A
/// protocol binding `binding` (`JSONRPC`, `HTTP+JSON`, `GRPC`; compared
/// without case). A card that declares none serves JSON-RPC, the spec's
/// default.
pub fn serves_binding<'p>(mut protocols: impl Iterator<Item = &'p str>, binding: &str) -> bool {
    let mut any = false;
    let found = protocols.any(|p| {
        any = true;
        p.eq_ignore_ascii_case(binding)
    });
    found || (!any && binding.eq_ignore_ascii_case("JSONRPC"))
}

/// Result of picking up to two eligible slots.
struct Pick {
    a: u32,
    b: Option<u32>,
    eligible: usize,
    sampled: bool,
    /// Chosen by [`Choice::LeastLoaded`] (b is the runner-up).
    least: bool,
}

impl Registry {
    /// Chooses an agent of `tenant` for `target`. See the module docs for
    /// the candidate, eligibility and choice rules.
    pub fn select<R: Rng + ?Sized>(
        &self,
        tenant: &str,
        target: &Target,
        local: &dyn LocalState,
        exclude: &[AgentId],
        rng: &mut R,
    ) -> Result<Selection, SelectError> {
        self.select_with(tenant, target, None, local, exclude, rng)
    }

    /// [`Registry::select`] with the query's embedding for an intent (the
    /// node embeds it before taking the registry's lock); `None`, or a
    /// target that is not an intent: lexical only.
    pub fn select_with<R: Rng + ?Sized>(
        &self,
        tenant: &str,
        target: &Target,
        query: Option<&Q8>,
        local: &dyn LocalState,
        exclude: &[AgentId],
        rng: &mut R,
    ) -> Result<Selection, SelectError> {
        self.select_bound(
            tenant,
            target,
            query,
            Speaks::default(),
            local,
            exclude,
            rng,
        )
    }

    /// [`Registry::select_with`] for a request that [`Speaks`] an A2A
    /// protocol binding (`JSONRPC`, `HTTP+JSON`, ...) and version: an
    /// intent is matched only against the agents that serve both
    /// ([`serves_binding`], [`crate::PackedRecord::speaks`]); an agent
    /// addressed by name or tag is taken at its word.
    #[allow(clippy::too_many_arguments)]
    pub fn select_bound<R: Rng + ?Sized>(
        &self,
        tenant: &str,
        target: &Target,
        query: Option<&Q8>,
        speaks: Speaks<'_>,
        local: &dyn LocalState,
        exclude: &[AgentId],
        rng: &mut R,
    ) -> Result<Selection, SelectError> {
        let cx = Ctx {
            tenant,
            target,
            local,
            exclude,
        };
        let t = self.tenants.get(tenant);
        let no_match = || SelectError::NoMatch {
            tenant: tenant.to_string(),
            target: target.to_string(),
        };
        match target {
            Target::Agent(name) => {
                let slot = t.and_then(|t| t.by_name.get(name, &self.entries));
                let Some(slot) = slot else {
                    return Err(SelectError::UnknownAgent {
                        tenant: tenant.to_string(),
                        name: name.clone(),
                    });
                };
                self.decide(&cx, &[slot], 1, rng)
            }
            Target::Tag(tag) => {
                let key: Cow<str> = if tag.chars().any(char::is_uppercase)
                    || tag.starts_with(char::is_whitespace)
                    || tag.ends_with(char::is_whitespace)
                {
                    Cow::Owned(crate::tag_key(tag))
                } else {
                    Cow::Borrowed(tag.as_str())
                };
                let list = t
                    .zip(self.tags.get(key.as_ref()))
                    .and_then(|(t, tag)| t.by_tag.get(&tag))
                    .map(crate::Members::as_slice)
                    .ok_or_else(no_match)?;
                self.decide(&cx, list, list.len(), rng)
            }
            Target::Intent(text) => {
                let t = t.ok_or_else(no_match)?;
                let mut ranked = self.rank_in(t, text, query);
                if speaks != Speaks::default() {
                    // before the relative cut: the best of those that can
                    // take the request sets the bar
                    let matched = ranked.len();
                    ranked.retain(|s| {
                        self.entries
                            .get(s.slot as usize)
                            .is_some_and(|e| speaks.served_by(&e.record))
                    });
                    if ranked.is_empty() && matched > 0 {
                        // Say so: "no match" would blame the text.
                        return Err(SelectError::NoBinding {
                            tenant: tenant.to_string(),
                            target: target.to_string(),
                            binding: speaks.describe(),
                            matched,
                        });
                    }
                }
                let best = ranked.first().map(|x| x.fused).ok_or_else(no_match)?;
                let relevant: Vec<(u32, f32)> = ranked
                    .iter()
                    .take(INTENT_POOL)
                    .take_while(|s| s.fused >= INTENT_RELATIVE * best)
                    .map(|s| (s.slot, s.fused))
                    .collect();
                let candidates = relevant.len();
                // Rank, then balance: the best-matching eligible agent, and
                // only the agents equivalent to it (replicas: the same card
                // or the same skills, or a score within the margin), share
                // the load; a different specialist is never picked because
                // the best one is busier.
                let eligible: Vec<(u32, f32)> = relevant
                    .iter()
                    .copied()
                    .filter(|&(s, _)| self.verdict(s, &cx) == Verdict::Eligible)
                    .collect();
                let top: Vec<u32> = match eligible.first() {
                    Some(&(lead, lead_score)) => eligible
                        .iter()
                        .filter(|&&(s, score)| {
                            s == lead
                                || score >= (1.0 - self.intent_margin) * lead_score
                                || self.equivalent(lead, s)
                        })
                        .map(|&(s, _)| s)
                        .take(INTENT_MAX)
                        .collect(),
                    // nothing eligible: let `decide` count the reasons
                    None => relevant.iter().map(|&(s, _)| s).collect(),
                };
                let mut sel = self.decide(&cx, &top, candidates, rng)?;
                // `dmsc-route` says why: the top candidates and their scores.
                let hybrid = ranked.iter().any(|s| s.semantic.is_some());
                let scorer = if hybrid { "hybrid" } else { "lexical" };
                let _ = write!(sel.why, "; ranked ({scorer}):");
                for (i, s) in ranked.iter().take(3).enumerate() {
                    let sep = if i == 0 { " " } else { ", " };
                    let _ = write!(sel.why, "{sep}{} {:.2}", self.name_of(s.slot), s.fused);
                }
                // The best's raw scores: the fused ones are relative (the
                // best is about 1.00 however weak the match).
                if let Some(b) = ranked.first() {
                    let _ = write!(sel.why, " (best: BM25 {:.2}", b.lexical);
                    if let Some(m) = b.semantic {
                        let _ = write!(sel.why, ", meaning {m:.2}");
                    }
                    sel.why.push(')');
                }
                if top.len() > 1 {
                    let _ = write!(sel.why, "; {} equivalent", top.len());
                }
                Ok(sel)
            }
        }
    }

    /// The tenant's agents ranked for an intent: BM25 fused with the
    /// semantic scores of agents whose cards are embedded (when `query` is
    /// given). Best first; agents scoring 0 are left out.
    pub fn rank_intent(
        &self,
        tenant: &str,
        text: &str,
        query: Option<&Q8>,
    ) -> Vec<(AgentId, Scores)> {
        let Some(t) = self.tenants.get(tenant) else {
            return Vec::new();
        };
        self.rank_in(t, text, query)
            .into_iter()
            .filter_map(|s| Some((self.slot(s.slot)?.id.clone(), s)))
            .collect()
    }

    fn rank_in(&self, t: &crate::Tenant, text: &str, query: Option<&Q8>) -> Vec<Scores> {
        let lexical = t
            .scorer
            .as_ref()
            .map(|s| s.query(text, INTENT_POOL))
            .unwrap_or_default();
        let score = |q: &Q8, slot: u32| {
            let e = self.slot(slot)?;
            let v = e.card_vectors()?;
            let score = crate::semantic::agent_score(q, v, e.learned_vectors())?;
            Some((slot, score))
        };
        let semantic: Vec<(u32, f32)> = match query {
            None => Vec::new(),
            Some(q) if t.by_name.len() <= SEMANTIC_SCAN => {
                t.by_name.values().filter_map(|&s| score(q, s)).collect()
            }
            Some(q) => {
                // Many agents: one dot product each against the card's
                // centroid picks the few worth scoring piece by piece
                // (plus every lexical hit), so a decision stays in the
                // sub-millisecond range at thousands of agents.
                let mut by_centroid: Vec<(u32, f32)> = t
                    .by_name
                    .values()
                    .filter_map(|&slot| {
                        let c = self.slot(slot)?.card_vectors()?.centroid.as_ref()?;
                        Some((slot, q.dot(c)))
                    })
                    .collect();
                let keep = SEMANTIC_SCAN.min(by_centroid.len());
                if keep > 0 && by_centroid.len() > keep {
                    by_centroid.select_nth_unstable_by(keep - 1, |a, b| b.1.total_cmp(&a.1));
                    by_centroid.truncate(keep);
                }
                let mut slots: Vec<u32> = by_centroid.iter().map(|x| x.0).collect();
                slots.extend(lexical.iter().map(|x| x.0));
                slots.sort_unstable();
                slots.dedup();
                slots.into_iter().filter_map(|s| score(q, s)).collect()
            }
        };
        crate::semantic::fuse(self.fusion, &lexical, &semantic)
    }

    /// True if the agents in slots `a` and `b` offer the same capability:
    /// the same card, or the same set of skill tags.
    fn equivalent(&self, a: u32, b: u32) -> bool {
        let (Some(ea), Some(eb)) = (self.entries.get(a as usize), self.entries.get(b as usize))
        else {
            return false;
        };
        if !ea.record.digest().is_empty() && ea.record.digest() == eb.record.digest() {
            return true;
        }
        fn tags(e: &crate::Entry) -> Vec<&str> {
            let mut t: Vec<&str> = e.record.tags().collect();
            t.sort_unstable();
            t.dedup();
            t
        }
        let ta = tags(ea);
        !ta.is_empty() && ta == tags(eb)
    }

    fn decide<R: Rng + ?Sized>(
        &self,
        cx: &Ctx<'_>,
        slots: &[u32],
        candidates: usize,
        rng: &mut R,
    ) -> Result<Selection, SelectError> {
        let Ctx {
            tenant,
            target,
            local,
            ..
        } = *cx;
        let pick = if slots.len() > SCAN_LIMIT {
            self.sample(cx, slots, rng)
        } else {
            None
        };
        let pick = match pick {
            Some(p) => p,
            None => self.scan(cx, slots, candidates, rng)?,
        };
        // Entries and their strings are the coldest memory a decision
        // touches, so none is read here: the tenant is the caller's (equal
        // by construction), names come inline from the `hot` records
        // eligibility already loaded, node names from the small interned
        // table, and `why` is written once into one buffer.
        let sa = self.score(pick.a, local);
        let (wslot, ws, other) = match pick.b {
            Some(b) => {
                let sb = self.score(b, local);
                if sb < sa {
                    (b, sb, Some((pick.a, sa)))
                } else {
                    (pick.a, sa, Some((b, sb)))
                }
            }
            None => (pick.a, sa, None),
        };
        let win_name = self.name_of(wslot);
        let mut why = String::with_capacity(160);
        // Writing to a String cannot fail.
        let noun = if candidates == 1 {
            "candidate"
        } else {
            "candidates"
        };
        let _ = if pick.sampled {
            write!(why, "{target}: {candidates} {noun}, sampled")
        } else {
            write!(
                why,
                "{target}: {candidates} {noun}, {} eligible",
                pick.eligible
            )
        };
        let rule = if pick.least { "least-loaded" } else { "p2c" };
        let _ = match other {
            Some((o, os)) => write!(
                why,
                "; {rule} chose {tenant}/{win_name} (load {ws:.1}) over {tenant}/{} ({os:.1})",
                self.name_of(o)
            ),
            None => write!(why, "; only {tenant}/{win_name} (load {ws:.1})"),
        };
        let id = |name: &str| AgentId {
            tenant: tenant.to_string(),
            name: name.to_string(),
        };
        Ok(Selection {
            id: id(win_name),
            node: self.node_of(wslot).to_string(),
            candidates,
            eligible: pick.eligible,
            sampled: pick.sampled,
            score: ws,
            other: other.map(|(o, os)| (id(self.name_of(o)), os)),
            why,
        })
    }

    /// Two distinct eligible slots by random probing, or `None` to fall back
    /// to a scan (too few eligible found in [`SAMPLE_TRIES`] tries each).
    fn sample<R: Rng + ?Sized>(&self, cx: &Ctx<'_>, slots: &[u32], rng: &mut R) -> Option<Pick> {
        let ok = |s: u32| self.verdict(s, cx) == Verdict::Eligible;
        let mut probe = |not: Option<usize>| {
            (0..SAMPLE_TRIES).find_map(|_| {
                let i = rng.gen_range(0..slots.len());
                (Some(i) != not && ok(slots[i])).then_some(i)
            })
        };
        let i = probe(None)?;
        let j = probe(Some(i))?;
        if self.choice != Choice::LeastLoaded {
            return Some(Pick {
                a: slots[i],
                b: Some(slots[j]),
                eligible: slots.len(),
                sampled: true,
                least: false,
            });
        }
        // Least-loaded on a large set: the least loaded of SAMPLE_K random
        // eligible candidates (power of k choices; k = 2 is P2C). With a
        // share f of slow agents, all k draws are slow with probability
        // f^k: 9 % for k = 2 and f = 0.3, 0.007 % for k = 8.
        let mut picked = [i, j, 0, 0, 0, 0, 0, 0];
        let mut n = 2;
        for _ in 0..SAMPLE_K * SAMPLE_TRIES {
            if n == SAMPLE_K {
                break;
            }
            let k = rng.gen_range(0..slots.len());
            if !picked[..n].contains(&k) && ok(slots[k]) {
                picked[n] = k;
                n += 1;
            }
        }
        let mut best: Option<(u32, f64)> = None;
        let mut runner: Option<(u32, f64)> = None;
        for &k in &picked[..n] {
            let slot = slots[k];
            let sc = self.score(slot, cx.local);
            match best {
                Some((_, b)) if sc >= b => {
                    if runner.is_none_or(|(_, r)| sc < r) {
                        runner = Some((slot, sc));
                    }
                }
                _ => {
                    runner = best;
                    best = Some((slot, sc));
                }
            }
        }
        let (a, _) = best?;
        Some(Pick {
            a,
            b: runner.map(|r| r.0),
            eligible: slots.len(),
            sampled: true,
            least: true,
        })
    }

    /// Scans every candidate: exact counts, and a uniform random pair of
    /// eligible ones by reservoir sampling (no allocation).
    fn scan<R: Rng + ?Sized>(
        &self,
        cx: &Ctx<'_>,
        slots: &[u32],
        candidates: usize,
        rng: &mut R,
    ) -> Result<Pick, SelectError> {
        let Ctx {
            tenant,
            target,
            local,
            ..
        } = *cx;
        let mut c = Counts::default();
        let (mut a, mut b) = (None, None);
        let least = self.choice == Choice::LeastLoaded;
        // (slot, score) of the best and the runner-up, for `Choice::LeastLoaded`
        let mut best: Option<(u32, f64)> = None;
        let mut runner: Option<(u32, f64)> = None;
        let mut ties = 1u32;
        for &s in slots {
            debug_assert!(
                self.slot(s).is_some_and(|e| e.id.tenant == tenant),
                "index leaked another tenant"
            );
            match self.verdict(s, cx) {
                Verdict::Gone => {}
                Verdict::Unhealthy => c.unhealthy += 1,
                Verdict::Excluded => c.excluded += 1,
                Verdict::CircuitOpen => c.circuit_open += 1,
                Verdict::Eligible if least => {
                    c.eligible += 1;
                    let sc = self.score(s, local);
                    match best {
                        None => best = Some((s, sc)),
                        Some((_, bs)) if sc == bs => {
                            // uniform among equal scores, so idle agents share
                            ties += 1;
                            if rng.gen_range(0..ties) == 0 {
                                runner = best;
                                best = Some((s, sc));
                            } else if runner.is_none_or(|(_, rs)| sc < rs) {
                                runner = Some((s, sc));
                            }
                        }
                        Some((_, bs)) if sc < bs => {
                            ties = 1;
                            runner = best;
                            best = Some((s, sc));
                        }
                        Some(_) => {
                            if runner.is_none_or(|(_, rs)| sc < rs) {
                                runner = Some((s, sc));
                            }
                        }
                    }
                }
                Verdict::Eligible => {
                    c.eligible += 1;
                    match c.eligible {
                        1 => a = Some(s),
                        2 => b = Some(s),
                        k => match rng.gen_range(0..k) {
                            0 => a = Some(s),
                            1 => b = Some(s),
                            _ => {}
                        },
                    }
                }
            }
        }
        if least {
            a = best.map(|x| x.0);
            b = runner.map(|x| x.0);
        }
        match a {
            Some(a) => Ok(Pick {
                a,
                b,
                eligible: c.eligible,
                sampled: false,
                least,
            }),
            None => Err(SelectError::NoneEligible {
                tenant: tenant.to_string(),
                target: target.to_string(),
                candidates,
                unhealthy: c.unhealthy,
                circuit_open: c.circuit_open,
                excluded: c.excluded,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;
    use crate::record::{AgentRecord, Health, SkillTags};

    fn rec(tags: &[&str], health: Health) -> AgentRecord {
        AgentRecord {
            digest: "d".into(),
            skills: vec![SkillTags {
                id: "s".into(),
                name: "skill".into(),
                tags: tags.iter().map(|t| t.to_string()).collect(),
            }],
            protocols: vec![],
            a2a: Vec::new(),
            health,
            expires_ms: 0,
        }
    }

    fn load(in_flight: u32) -> LoadReport {
        LoadReport {
            in_flight,
            ewma_ms: 10.0,
            ..Default::default()
        }
    }

    #[derive(Default)]
    struct Local {
        open: HashSet<AgentId>,
        /// Nodes whose path circuit is open.
        dark: HashSet<String>,
        outstanding: HashMap<AgentId, u32>,
    }

    impl LocalState for Local {
        fn outstanding(&self, id: &AgentId) -> u32 {
            self.outstanding.get(id).copied().unwrap_or(0)
        }
        fn admits(&self, id: &AgentId, node: &str) -> bool {
            !self.open.contains(id) && !self.dark.contains(node)
        }
    }

    fn id(t: &str, n: &str) -> AgentId {
        AgentId::new(t, n)
    }

    #[test]
    fn least_loaded_samples_k_on_large_sets() {
        let mut r = Registry::new();
        assert_eq!(r.choice(), Choice::LeastLoaded, "the default");
        for i in 0..100 {
            let n = format!("a{i}");
            r.upsert("n1", id("acme", &n), rec(&["big"], Health::Healthy));
            // 30 of them busy
            r.set_load(&id("acme", &n), load(if i % 10 < 3 { 50 } else { 0 }));
        }
        let mut rng = StdRng::seed_from_u64(7);
        let mut busy = 0;
        for _ in 0..500 {
            let s = r
                .select("acme", &Target::Tag("big".into()), &NoLocal, &[], &mut rng)
                .expect("select");
            assert!(s.sampled, "{}", s.why);
            assert!(s.why.contains("least-loaded chose"), "{}", s.why);
            let i: usize = s.id.name[1..].parse().expect("n");
            busy += usize::from(i % 10 < 3);
        }
        // P2C would pick a busy one whenever both draws are busy: ~9 %
        assert!(busy <= 1, "{busy} of 500 went to a busy agent");
        r.set_choice(Choice::PowerOfTwo);
        let mut busy = 0;
        for _ in 0..500 {
            let s = r
                .select("acme", &Target::Tag("big".into()), &NoLocal, &[], &mut rng)
                .expect("select");
            let i: usize = s.id.name[1..].parse().expect("n");
            busy += usize::from(i % 10 < 3);
        }
        assert!(busy > 10, "P2C: {busy}");
    }

    #[test]
    fn p2c_prefers_the_less_loaded_and_explains() {
        let mut r = Registry::new();
        r.set_choice(Choice::PowerOfTwo);
        r.upsert("n1", id("acme", "a"), rec(&["billing"], Health::Healthy));
        r.upsert("n2", id("acme", "b"), rec(&["billing"], Health::Healthy));
        r.upsert("n2", id("acme", "c"), rec(&["Billing"], Health::Unhealthy));
        r.set_load(&id("acme", "a"), load(0));
        r.set_load(&id("acme", "b"), load(2));
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..20 {
            let s = r
                .select(
                    "acme",
                    &Target::Tag("BILLING".into()),
                    &NoLocal,
                    &[],
                    &mut rng,
                )
                .expect("selected");
            assert_eq!(s.id, id("acme", "a"));
            assert_eq!(s.node, "n1");
            assert_eq!((s.candidates, s.eligible), (3, 2));
            assert_eq!(s.other, Some((id("acme", "b"), 30.0)));
            assert_eq!(
                s.why,
                "tag `BILLING`: 3 candidates, 2 eligible; p2c chose acme/a (load 10.0) over acme/b (30.0)"
            );
        }
        // local outstanding requests make a idle-looking agent busy
        let mut local = Local::default();
        local.outstanding.insert(id("acme", "a"), 5);
        let s = r
            .select(
                "acme",
                &Target::Tag("billing".into()),
                &local,
                &[],
                &mut rng,
            )
            .expect("selected");
        assert_eq!(s.id, id("acme", "b"));
    }

    /// A node whose path this node's circuit has opened takes none of its
    /// agents out of the registry, but none of them is chosen.
    #[test]
    fn agents_behind_an_open_path_are_not_eligible() {
        let mut r = Registry::new();
        r.upsert("n1", id("acme", "a"), rec(&["x"], Health::Healthy));
        r.upsert("n1", id("acme", "b"), rec(&["x"], Health::Healthy));
        r.upsert("n2", id("acme", "c"), rec(&["x"], Health::Healthy));
        let mut rng = StdRng::seed_from_u64(7);
        let mut local = Local::default();
        local.dark.insert("n1".into());
        for _ in 0..20 {
            let s = r
                .select("acme", &Target::Tag("x".into()), &local, &[], &mut rng)
                .expect("c");
            assert_eq!((s.id, s.node.as_str()), (id("acme", "c"), "n2"));
        }
        local.dark.insert("n2".into());
        let err = r
            .select("acme", &Target::Tag("x".into()), &local, &[], &mut rng)
            .expect_err("every path open");
        assert!(
            matches!(
                err,
                SelectError::NoneEligible {
                    circuit_open: 3,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn exclusion_circuit_and_errors() {
        let mut r = Registry::new();
        r.upsert("n1", id("acme", "a"), rec(&["x"], Health::Healthy));
        r.upsert("n1", id("acme", "b"), rec(&["x"], Health::Healthy));
        r.upsert("n1", id("acme", "c"), rec(&["x"], Health::Unknown));
        let mut rng = StdRng::seed_from_u64(2);
        let mut local = Local::default();
        local.open.insert(id("acme", "a"));
        let s = r
            .select("acme", &Target::Tag("x".into()), &local, &[], &mut rng)
            .expect("b");
        assert_eq!(s.id, id("acme", "b"));
        assert!(s.why.ends_with("only acme/b (load 1.0)"), "{}", s.why);
        let err = r
            .select(
                "acme",
                &Target::Tag("x".into()),
                &local,
                &[id("acme", "b")],
                &mut rng,
            )
            .expect_err("none");
        assert_eq!(
            err,
            SelectError::NoneEligible {
                tenant: "acme".into(),
                target: "tag `x`".into(),
                candidates: 3,
                unhealthy: 1,
                circuit_open: 1,
                excluded: 1
            }
        );
        assert_eq!(err.to_string(), "tag `x` of tenant `acme`: 3 candidate(s), none eligible (1 not healthy, 1 held back by an open circuit on this node (the agent's, or the path's to its home node), 1 already tried)");
        let err = r
            .select("acme", &Target::Tag("y".into()), &NoLocal, &[], &mut rng)
            .expect_err("no tag");
        assert_eq!(err.to_string(), "no agent of tenant `acme` matches tag `y`");
        let err = r
            .select("acme", &Target::Agent("zz".into()), &NoLocal, &[], &mut rng)
            .expect_err("no agent");
        assert_eq!(err.to_string(), "tenant `acme` has no agent `zz`");
        let s = r
            .select("acme", &Target::Agent("b".into()), &NoLocal, &[], &mut rng)
            .expect("by name");
        assert_eq!(s.id, id("acme", "b"));
        let err = r
            .select("acme", &Target::Agent("c".into()), &NoLocal, &[], &mut rng)
            .expect_err("unknown health");
        assert!(matches!(
            err,
            SelectError::NoneEligible { unhealthy: 1, .. }
        ));
    }

    #[test]
    fn tenants_are_isolated() {
        let mut r = Registry::new();
        r.upsert("n1", id("acme", "a"), rec(&["x"], Health::Healthy));
        r.upsert("n1", id("evil", "b"), rec(&["x"], Health::Healthy));
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..50 {
            let s = r
                .select("acme", &Target::Tag("x".into()), &NoLocal, &[], &mut rng)
                .expect("a");
            assert_eq!(s.id, id("acme", "a"));
        }
        for t in [
            Target::Agent("b".into()),
            Target::Agent("evil/b".into()),
            Target::Agent("../evil/b".into()),
        ] {
            assert!(matches!(
                r.select("acme", &t, &NoLocal, &[], &mut rng),
                Err(SelectError::UnknownAgent { .. })
            ));
        }
        assert!(r
            .select("nobody", &Target::Tag("x".into()), &NoLocal, &[], &mut rng)
            .is_err());
    }

    #[test]
    fn p2c_spreads_over_a_large_set_and_avoids_ineligible() {
        let mut r = Registry::new();
        for i in 0..200 {
            let h = if i % 4 == 0 {
                Health::Unhealthy
            } else {
                Health::Healthy
            };
            r.upsert("n", id("t", &format!("a{i:03}")), rec(&["big"], h));
        }
        let mut local = Local::default();
        local.open.insert(id("t", "a001"));
        let mut rng = StdRng::seed_from_u64(4);
        let mut seen = HashSet::new();
        for _ in 0..2000 {
            let s = r
                .select(
                    "t",
                    &Target::Tag("big".into()),
                    &local,
                    &[id("t", "a002")],
                    &mut rng,
                )
                .expect("some");
            assert!(s.sampled);
            let n: usize = s.id.name[1..].parse().expect("num");
            assert!(!n.is_multiple_of(4) && n != 1 && n != 2, "{}", s.id);
            seen.insert(s.id);
        }
        assert!(seen.len() > 100, "{}", seen.len());
        // Only one eligible in a large set: sampling fails, the scan finds it.
        let mut r = Registry::new();
        for i in 0..100 {
            let h = if i == 77 {
                Health::Healthy
            } else {
                Health::Unhealthy
            };
            r.upsert("n", id("t", &format!("a{i}")), rec(&["big"], h));
        }
        let s = r
            .select("t", &Target::Tag("big".into()), &NoLocal, &[], &mut rng)
            .expect("the one");
        assert_eq!(s.id, id("t", "a77"));
        assert!(!s.sampled);
        assert_eq!(s.eligible, 1);
    }

    #[test]
    fn intent_ranks_then_balances_among_equivalent_agents_only() {
        let mut r = Registry::new();
        let mut add = |n: &str, digest: &str, tags: &[&str], name: &str| {
            let mut rr = rec(tags, Health::Healthy);
            rr.digest = digest.into();
            rr.skills[0].name = name.into();
            r.upsert("n", id("acme", n), rr);
        };
        // The specialist for invoices, a replica of it (same card), and
        // another specialist whose card also mentions invoices.
        add(
            "inv",
            "card-inv",
            &["invoice", "billing"],
            "Invoice payment",
        );
        add(
            "inv-replica",
            "card-inv",
            &["invoice", "billing"],
            "Invoice payment",
        );
        add(
            "ledger",
            "card-ledger",
            &["invoice", "archive"],
            "Invoice archive",
        );
        // The specialist and its replica are far busier than the generalist.
        r.set_load(&id("acme", "inv"), load(50));
        r.set_load(&id("acme", "inv-replica"), load(40));
        r.set_load(&id("acme", "ledger"), load(0));
        let mut rng = StdRng::seed_from_u64(9);
        let mut seen = HashSet::new();
        for _ in 0..50 {
            let s = r
                .select(
                    "acme",
                    &Target::Intent("invoice payment".into()),
                    &NoLocal,
                    &[],
                    &mut rng,
                )
                .expect("intent");
            assert_ne!(
                s.id,
                id("acme", "ledger"),
                "a different specialist is not picked because the best is busier: {}",
                s.why
            );
            assert!(s.why.contains("; ranked (lexical): inv"), "{}", s.why);
            assert!(s.why.contains("2 equivalent"), "{}", s.why);
            seen.insert(s.id);
        }
        // Load is balanced between the two replicas: the less loaded wins.
        assert_eq!(seen, HashSet::from([id("acme", "inv-replica")]));
        // A margin of 100 % pools every relevant agent again.
        r.set_intent_margin(1.0);
        let s = r
            .select(
                "acme",
                &Target::Intent("invoice payment".into()),
                &NoLocal,
                &[],
                &mut rng,
            )
            .expect("intent");
        assert!(s.why.contains("3 equivalent"), "{}", s.why);
    }

    #[test]
    fn intent_matches_only_agents_serving_the_binding() {
        let mut r = Registry::new();
        let mut add = |n: &str, tags: &[&str], protocols: &[&str]| {
            let mut rr = rec(tags, Health::Healthy);
            rr.digest = n.into();
            rr.protocols = protocols.iter().map(|p| p.to_string()).collect();
            r.upsert("n", id("acme", n), rr);
        };
        // the best words belong to a REST-only agent
        add("rest", &["ledger", "invoice", "payable"], &["HTTP+JSON"]);
        add("rpc", &["invoice"], &["JSONRPC", "GRPC"]);
        add("old", &["invoice", "ledger"], &[]);
        let mut rng = StdRng::seed_from_u64(1);
        let t = Target::Intent("ledger invoice payable".into());
        let pick = |r: &Registry, b: Option<&str>, rng: &mut StdRng| {
            let speaks = Speaks {
                binding: b,
                a2a: None,
            };
            r.select_bound("acme", &t, None, speaks, &NoLocal, &[], rng)
                .map(|s| s.id.name)
        };
        assert_eq!(pick(&r, None, &mut rng).as_deref(), Ok("rest"));
        assert_eq!(pick(&r, Some("HTTP+JSON"), &mut rng).as_deref(), Ok("rest"));
        // no declared protocols: JSON-RPC, the spec's default
        assert_eq!(pick(&r, Some("JSONRPC"), &mut rng).as_deref(), Ok("old"));
        assert_eq!(pick(&r, Some("grpc"), &mut rng).as_deref(), Ok("rpc"));
        assert!(matches!(
            r.select_bound(
                "acme",
                &t,
                None,
                Speaks {
                    binding: Some("MQTT"),
                    a2a: None
                },
                &NoLocal,
                &[],
                &mut rng
            ),
            Err(SelectError::NoBinding { matched: 3, ref binding, .. }) if binding == "the MQTT binding"
        ));
        assert!(serves_binding([].into_iter(), "JSONRPC"));
        assert!(!serves_binding(["HTTP+JSON"].into_iter(), "JSONRPC"));
    }

    #[test]
    fn intent_matches_only_agents_speaking_the_a2a_version() {
        let mut r = Registry::new();
        let mut add = |n: &str, tags: &[&str], a2a: &[&str]| {
            let mut rr = rec(tags, Health::Healthy);
            rr.digest = n.into();
            rr.a2a = a2a.iter().map(|p| format!("JSONRPC {p}")).collect();
            r.upsert("n", id("acme", n), rr);
        };
        add("old", &["translate", "legacy", "task"], &["0.3"]);
        add("new", &["translate"], &["1.0"]);
        add("both", &["translate", "task"], &["0.3", "1.0"]);
        let mut rng = StdRng::seed_from_u64(1);
        let t = Target::Intent("translate this legacy task".into());
        let pick = |r: &Registry, a2a: Option<Dialect>, rng: &mut StdRng| {
            let speaks = Speaks {
                binding: Some("JSONRPC"),
                a2a,
            };
            r.select_bound("acme", &t, None, speaks, &NoLocal, &[], rng)
                .map(|s| s.id.name)
        };
        assert_eq!(pick(&r, None, &mut rng).as_deref(), Ok("old"));
        assert_eq!(pick(&r, Some(Dialect::V03), &mut rng).as_deref(), Ok("old"));
        assert_eq!(
            pick(&r, Some(Dialect::V10), &mut rng).as_deref(),
            Ok("both")
        );
        // nobody speaks it: said so, with the version
        let mut only_old = Registry::new();
        let mut rr = rec(&["translate"], Health::Healthy);
        rr.a2a = vec!["JSONRPC 0.3".into()];
        only_old.upsert("n", id("acme", "old"), rr);
        let e = only_old
            .select_bound(
                "acme",
                &t,
                None,
                Speaks {
                    binding: Some("JSONRPC"),
                    a2a: Some(Dialect::V10),
                },
                &NoLocal,
                &[],
                &mut rng,
            )
            .expect_err("no 1.0 agent");
        assert!(
            e.to_string().contains("the JSONRPC binding of A2A 1.0"),
            "{e}"
        );
    }

    #[test]
    fn intent_selects_among_relevant_eligible() {
        let mut r = Registry::new();
        let mut add = |n: &str, tags: &[&str], name: &str, h| {
            let mut rr = rec(tags, h);
            rr.skills[0].name = name.into();
            r.upsert("n", id("acme", n), rr);
        };
        add(
            "inv",
            &["invoice", "summarization"],
            "Invoice summary",
            Health::Healthy,
        );
        add(
            "inv2",
            &["invoice", "summarization"],
            "Invoice summary",
            Health::Unhealthy,
        );
        add("wx", &["weather"], "Forecast", Health::Healthy);
        add("tr", &["translation"], "Translate", Health::Healthy);
        let mut rng = StdRng::seed_from_u64(5);
        let s = r
            .select(
                "acme",
                &Target::Intent("summarize this invoice".into()),
                &NoLocal,
                &[],
                &mut rng,
            )
            .expect("intent");
        assert_eq!(s.id, id("acme", "inv"));
        assert_eq!(s.candidates, 2);
        let err = r
            .select(
                "acme",
                &Target::Intent("quantum".into()),
                &NoLocal,
                &[],
                &mut rng,
            )
            .expect_err("no match");
        assert!(matches!(err, SelectError::NoMatch { .. }));
        let err = r
            .select(
                "acme",
                &Target::Intent("invoice".into()),
                &NoLocal,
                &[id("acme", "inv")],
                &mut rng,
            )
            .expect_err("none eligible");
        assert!(
            matches!(
                err,
                SelectError::NoneEligible {
                    candidates: 2,
                    unhealthy: 1,
                    excluded: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(r
            .select(
                "other",
                &Target::Intent("invoice".into()),
                &NoLocal,
                &[],
                &mut rng
            )
            .is_err());
    }

    #[test]
    fn least_loaded_takes_the_minimum_and_shares_ties() {
        let mut r = Registry::new();
        r.set_choice(Choice::LeastLoaded);
        for (n, l) in [("a", 3), ("b", 1), ("c", 2), ("d", 1), ("e", 9)] {
            r.upsert("n", id("t", n), rec(&["x"], Health::Healthy));
            r.set_load(&id("t", n), load(l));
        }
        let mut rng = StdRng::seed_from_u64(6);
        let mut seen = HashSet::new();
        for _ in 0..100 {
            let s = r
                .select("t", &Target::Tag("x".into()), &NoLocal, &[], &mut rng)
                .expect("some");
            assert!(s.id == id("t", "b") || s.id == id("t", "d"), "{}", s.id);
            assert_eq!(s.score, 20.0);
            assert_eq!(
                s.other.as_ref().map(|o| o.1),
                Some(20.0),
                "runner-up is the tie"
            );
            assert!(s.why.contains("least-loaded chose"), "{}", s.why);
            seen.insert(s.id);
        }
        assert_eq!(seen.len(), 2, "ties are shared");
        let mut local = Local::default();
        local.outstanding.insert(id("t", "b"), 3);
        local.outstanding.insert(id("t", "d"), 3);
        local.open.insert(id("t", "c"));
        let s = r
            .select("t", &Target::Tag("x".into()), &local, &[], &mut rng)
            .expect("some");
        assert_eq!(s.id, id("t", "a"));
        assert_eq!((s.score, s.other.map(|o| o.1)), (40.0, Some(50.0)));
    }

    #[test]
    fn score_formula() {
        let l = LoadReport {
            in_flight: 2,
            queue: 1,
            ewma_ms: 20.0,
            error_rate: 0.5,
            cpu: 0.0,
        };
        assert_eq!(load_score(&l, 1), 5.0 * 20.0 * 3.0);
        assert_eq!(load_score(&LoadReport::default(), 0), 1.0);
        let bad = LoadReport {
            ewma_ms: f32::NAN,
            error_rate: f32::NAN,
            ..Default::default()
        };
        assert_eq!(load_score(&bad, 0), 1.0);
    }
}
