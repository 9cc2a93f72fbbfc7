//! dmsc-registry: the capability registry of one node.
//!
//! Owns: the agents this node knows about (its own and those gossiped by
//! peers), indexed by tenant, name and skill tag; the intent index; and the
//! selection among matching agents. Submodules own the pieces:
//! [`card`] (A2A agent cards, both dialects, lossless), [`record`] (what is
//! gossiped per agent and its keys), [`intent`] (BM25 intent matching behind
//! a [`intent::Scorer`] trait), [`select`] (eligibility and
//! power-of-two-choices), [`circuit`] (per-agent circuit breaker state).
//!
//! Why it is shaped so: it is pure (no I/O, no tokio). The node feeds it
//! records, load reports and fetched cards from gossip, and asks it
//! questions; so it can be property-tested and benchmarked alone
//! (DESIGN.md, "Workspace"). Every index is per tenant: a tenant's queries
//! are answered from that tenant's indexes only, so no agent of another
//! tenant can ever be a candidate, and one tenant's corpus does not shift
//! another's intent scores.
//!
//! Layout, for the selection hot path (p99 a few microseconds at 100k
//! agents, where every cache miss costs ~200 ns): entries live in a slot
//! arena; indexes hold slot numbers (small tag sets inline in the hash
//! table); what selection reads per candidate (live, healthy, load, home
//! node number, the name inline) is a separate dense array of 64-byte
//! records, so checking a candidate is one cache line and the chosen
//! agent's entry and strings are never dereferenced. Tags and node names
//! are interned (reference-counted, so gossip cannot grow them without bound).
//!
//! Memory, since a node holds every agent of the mesh (~1.2 KB of node
//! memory per remote agent at 100k, BENCHMARKS.md): a record is kept packed
//! ([`packed`]); an agent is found through its tenant's name table, whose
//! keys are the entries' own names (no second copy of any id); what only
//! intent routing reads is boxed and absent for most agents; and a node can
//! keep lexical intent indexes only for the tenants it routes intent for
//! ([`Registry::index_intent_on_demand`]).

#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::fx::FxBuild;

pub mod card;
pub mod circuit;
mod fx;
pub mod intent;
pub mod packed;
pub mod record;
pub mod select;
pub mod semantic;

pub use card::{slug, AgentCard, CardError, Dialect, FieldProblem, Interface, Skill};
pub use circuit::{Circuit, CircuitConfig, CircuitState};
pub use intent::{Bm25, Document, FieldKind, Scorer};
pub use packed::PackedRecord;
pub use record::{
    agent_key, load_key, parse_agent_key, parse_load_key, AgentRecord, Health, LoadReport,
    RecordError, SkillTags,
};
pub use select::{
    serves_binding, Choice, LocalState, NoLocal, SelectError, Selection, Speaks, Target,
};
pub use semantic::{CardVectors, Fusion, Piece, Scores, Q8};

/// `tenant/name` of an agent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AgentId {
    pub tenant: String,
    pub name: String,
}

impl AgentId {
    pub fn new(tenant: impl Into<String>, name: impl Into<String>) -> AgentId {
        AgentId {
            tenant: tenant.into(),
            name: name.into(),
        }
    }

    /// Parses `tenant/name` (exactly one `/`, both parts non-empty).
    pub fn parse(s: &str) -> Option<AgentId> {
        let (t, n) = s.split_once('/')?;
        (!t.is_empty() && !n.is_empty() && !n.contains('/')).then(|| AgentId::new(t, n))
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.name)
    }
}

/// What the registry knows about one agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub id: AgentId,
    /// Home node (the gossip node that owns the agent's keys), shared by
    /// all its agents.
    pub node: Arc<str>,
    pub record: PackedRecord,
    /// What only intent routing reads, boxed: most remote agents of a large
    /// mesh belong to tenants this node does not route intent for, and
    /// have none of it.
    cold: Option<Box<Cold>>,
}

/// The intent side of an [`Entry`].
#[derive(Debug, Clone, PartialEq, Default)]
struct Cold {
    /// Card text (descriptions, examples) indexed for intent, when the card
    /// with `record.digest` has been fetched.
    card_text: Option<Vec<(FieldKind, String)>>,
    /// The card's embedded pieces (same digest), when the node embeds this
    /// tenant's cards; shared by every agent with that card.
    vectors: Option<std::sync::Arc<CardVectors>>,
    /// Examples learned from callers' choices (text, and its vector when
    /// embedded); both scorers read them like the card's examples.
    learned: Vec<(String, Option<Q8>)>,
}

impl Entry {
    fn placeholder() -> Entry {
        Entry {
            id: AgentId::new(String::new(), String::new()),
            node: Arc::from(""),
            record: PackedRecord::pack(&AgentRecord {
                digest: String::new(),
                skills: Vec::new(),
                protocols: Vec::new(),
                a2a: Vec::new(),
                health: Health::Unknown,
                expires_ms: 0,
            }),
            cold: None,
        }
    }

    /// Has the card matching the current record digest been added?
    pub fn has_card(&self) -> bool {
        self.cold.as_ref().is_some_and(|c| c.card_text.is_some())
    }

    /// Distinct skill tags, lowercased: the keys this entry is indexed under.
    fn tag_keys(&self) -> Vec<String> {
        let mut tags: Vec<String> = self
            .record
            .tags()
            .map(tag_key)
            .filter(|t| !t.is_empty())
            .collect();
        tags.sort();
        tags.dedup();
        tags
    }

    /// Is the card of this agent embedded?
    pub fn has_vectors(&self) -> bool {
        self.cold.as_ref().is_some_and(|c| c.vectors.is_some())
    }

    /// Learned examples not embedded yet.
    pub fn learned_unembedded(&self) -> impl Iterator<Item = &str> {
        self.learned_pairs()
            .filter(|(_, v)| v.is_none())
            .map(|(t, _)| t.as_str())
    }

    /// Vectors of the examples learned for this agent.
    pub(crate) fn learned_vectors(&self) -> impl Iterator<Item = &Q8> {
        self.learned_pairs().filter_map(|(_, v)| v.as_ref())
    }

    /// Examples learned for this agent from callers' choices.
    pub fn learned(&self) -> impl Iterator<Item = &str> {
        self.learned_pairs().map(|(t, _)| t.as_str())
    }

    fn learned_pairs(&self) -> impl Iterator<Item = &(String, Option<Q8>)> {
        self.cold.iter().flat_map(|c| c.learned.iter())
    }

    /// The embedded pieces of its card, when embedded.
    pub(crate) fn card_vectors(&self) -> Option<&std::sync::Arc<CardVectors>> {
        self.cold.as_ref()?.vectors.as_ref()
    }

    fn cold_mut(&mut self) -> &mut Cold {
        self.cold.get_or_insert_with(Box::default)
    }

    fn document(&self) -> Document {
        let mut d = Document::default();
        for s in self.record.skills() {
            d.push(FieldKind::SkillName, s.name);
            d.push(FieldKind::SkillId, s.id);
            for t in s.tags() {
                d.push(FieldKind::Tag, t);
            }
        }
        if let Some(text) = self.cold.as_ref().and_then(|c| c.card_text.as_ref()) {
            d.fields.extend(text.iter().cloned());
        }
        for (t, _) in self.learned_pairs() {
            d.push(FieldKind::Example, t.as_str());
        }
        d
    }
}

/// Per-slot selection data (see `Registry::hot`).
#[derive(Debug, Clone, Copy, Default)]
#[repr(align(64))]
pub(crate) struct Hot {
    pub(crate) live: bool,
    pub(crate) healthy: bool,
    /// Interned home node.
    pub(crate) node: u32,
    pub(crate) load: LoadReport,
    /// The agent's name, inline: the winner's name is then read from the
    /// record eligibility already loaded instead of from its own allocation.
    pub(crate) name: InlineName,
}

/// A name of up to [`InlineName::CAP`] bytes stored without allocation
/// (agent names are slugs, at most 63 bytes, most far shorter; longer ones
/// are read from the entry). The capacity makes [`Hot`] exactly one
/// 64-byte cache line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InlineName {
    len: u8,
    bytes: [u8; InlineName::CAP],
}

impl Default for InlineName {
    fn default() -> Self {
        InlineName {
            len: 0,
            bytes: [0; InlineName::CAP],
        }
    }
}

impl InlineName {
    const CAP: usize = 37;

    fn new(s: &str) -> InlineName {
        let mut n = InlineName::default();
        if let (Some(dst), Ok(len)) = (n.bytes.get_mut(..s.len()), u8::try_from(s.len())) {
            dst.copy_from_slice(s.as_bytes());
            n.len = len;
        }
        n
    }

    /// The name, or `None` when it was too long to inline (or empty).
    pub(crate) fn get(&self) -> Option<&str> {
        let b = self.bytes.get(..usize::from(self.len))?;
        if b.is_empty() {
            return None;
        }
        std::str::from_utf8(b).ok()
    }
}

/// The slots of one tag in one tenant. Most tags have a handful of agents:
/// those are stored inline in the index's hash table, saving the pointer
/// chase (a cache miss) to a separate allocation on every selection.
#[derive(Debug, Clone)]
pub(crate) enum Members {
    Inline {
        len: u8,
        slots: [u32; Members::INLINE],
    },
    Heap(Vec<u32>),
}

impl Default for Members {
    fn default() -> Self {
        Members::Inline {
            len: 0,
            slots: [0; Members::INLINE],
        }
    }
}

impl Members {
    const INLINE: usize = 5;

    pub(crate) fn as_slice(&self) -> &[u32] {
        match self {
            Members::Inline { len, slots } => slots.get(..usize::from(*len)).unwrap_or(&[]),
            Members::Heap(v) => v,
        }
    }

    fn push(&mut self, slot: u32) {
        match self {
            Members::Inline { len, slots } => match slots.get_mut(usize::from(*len)) {
                Some(free) => {
                    *free = slot;
                    *len += 1;
                }
                None => {
                    let mut v = slots.to_vec();
                    v.push(slot);
                    *self = Members::Heap(v);
                }
            },
            Members::Heap(v) => v.push(slot),
        }
    }

    /// Removes `slot` (order not kept). Linear in the tag's size; records
    /// change rarely (load updates do not re-index), so this is off the hot path.
    fn remove(&mut self, slot: u32) {
        match self {
            Members::Inline { len, slots } => {
                let n = usize::from(*len);
                if let Some(pos) = slots.iter().take(n).position(|&s| s == slot) {
                    slots.swap(pos, n - 1);
                    *len -= 1;
                }
            }
            Members::Heap(v) => {
                if let Some(pos) = v.iter().position(|&s| s == slot) {
                    v.swap_remove(pos);
                }
            }
        }
    }
}

/// Strings to dense numbers, reference-counted so numbers of strings no
/// longer used are recycled (gossip cannot grow it without bound).
#[derive(Debug, Default)]
pub(crate) struct Interner {
    ids: HashMap<String, (u32, u32)>,
    names: Vec<Arc<str>>,
    free: Vec<u32>,
}

impl Interner {
    pub(crate) fn get(&self, s: &str) -> Option<u32> {
        self.ids.get(s).map(|x| x.0)
    }

    pub(crate) fn name(&self, id: u32) -> &str {
        self.names.get(id as usize).map_or("", |n| n)
    }

    /// The string of `id`, shared.
    pub(crate) fn shared(&self, id: u32) -> Arc<str> {
        self.names
            .get(id as usize)
            .cloned()
            .unwrap_or_else(|| Arc::from(""))
    }

    /// The number of `s`, counting one more user.
    fn acquire(&mut self, s: &str) -> u32 {
        if let Some((id, refs)) = self.ids.get_mut(s) {
            *refs += 1;
            return *id;
        }
        let id = match self.free.pop() {
            Some(id) => {
                if let Some(n) = self.names.get_mut(id as usize) {
                    *n = Arc::from(s);
                }
                id
            }
            None => {
                self.names.push(Arc::from(s));
                u32::try_from(self.names.len() - 1).unwrap_or(u32::MAX)
            }
        };
        self.ids.insert(s.to_string(), (id, 1));
        id
    }

    /// One user of `s` fewer; forgets `s` with its last user.
    fn release(&mut self, s: &str) {
        if let Some((id, refs)) = self.ids.get_mut(s) {
            *refs -= 1;
            if *refs == 0 {
                let id = *id;
                self.ids.remove(s);
                if let Some(n) = self.names.get_mut(id as usize) {
                    *n = Arc::from("");
                }
                self.free.push(id);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.ids.len()
    }
}

/// Room for one more element, growing by an eighth rather than doubling:
/// the slot vectors hold every agent of the mesh, and doubling would leave
/// up to half of a large one unused. Amortized constant time all the same.
fn grow<T>(v: &mut Vec<T>) {
    if v.len() == v.capacity() {
        v.reserve_exact((v.capacity() / 8).max(64));
    }
}

/// Tags are matched case-insensitively and without surrounding space.
pub(crate) fn tag_key(tag: &str) -> String {
    tag.trim().to_lowercase()
}

/// A tenant's agents by name: slots in a hash table whose keys are the
/// entries' own names (a map keyed by `String` would keep a second copy of
/// every remote agent's name). Hashed with std's DoS-resistant hasher:
/// names come from the mesh.
#[derive(Default)]
pub(crate) struct Names {
    slots: hashbrown::HashTable<u32>,
    hasher: std::collections::hash_map::RandomState,
}

impl Names {
    fn hash(&self, name: &str) -> u64 {
        std::hash::BuildHasher::hash_one(&self.hasher, name)
    }

    /// The slot of `name`; `entries` are the registry's.
    pub(crate) fn get(&self, name: &str, entries: &[Entry]) -> Option<u32> {
        let is = |&s: &u32| entries.get(s as usize).is_some_and(|e| e.id.name == name);
        self.slots.find(self.hash(name), is).copied()
    }

    /// Adds `slot` under its entry's name (replacing a slot of that name).
    fn insert(&mut self, slot: u32, entries: &[Entry]) {
        let Some(name) = entries.get(slot as usize).map(|e| e.id.name.as_str()) else {
            return;
        };
        self.remove(name, entries);
        let hasher = &self.hasher;
        let rehash = |&s: &u32| {
            let n = entries.get(s as usize).map_or("", |e| e.id.name.as_str());
            std::hash::BuildHasher::hash_one(hasher, n)
        };
        self.slots
            .insert_unique(std::hash::BuildHasher::hash_one(hasher, name), slot, rehash);
    }

    fn remove(&mut self, name: &str, entries: &[Entry]) {
        let is = |&s: &u32| entries.get(s as usize).is_some_and(|e| e.id.name == name);
        if let Ok(found) = self.slots.find_entry(self.hash(name), is) {
            found.remove();
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &u32> {
        self.slots.iter()
    }
}

/// A tenant's lexical intent index built aside
/// ([`Registry::build_intent_index`]).
pub struct IntentIndex {
    tenant: String,
    changed: u64,
    scorer: Box<dyn Scorer>,
}

/// Indexes of one tenant.
pub(crate) struct Tenant {
    pub(crate) by_name: Names,
    /// Interned lowercased tag -> slots of agents with a skill so tagged (each once).
    pub(crate) by_tag: HashMap<u32, Members, FxBuild>,
    /// The lexical intent index; `None` for a tenant outside the intent
    /// scope (see [`Registry::index_intent_on_demand`]).
    pub(crate) scorer: Option<Box<dyn Scorer>>,
    /// [`Registry::stamp`] of this tenant's last change of an intent
    /// document (an agent in or out, a card, learned examples).
    changed: u64,
}

type ScorerFactory = Box<dyn Fn() -> Box<dyn Scorer> + Send + Sync>;

/// The registry: entries plus per-tenant indexes. See the crate docs.
pub struct Registry {
    /// Entries by slot. A free slot holds an empty placeholder (no heap)
    /// and `hot[slot].live` is false.
    pub(crate) entries: Vec<Entry>,
    /// Per slot, what selection reads for every candidate: small, dense and
    /// pointer-free, so checking a candidate costs one cache line, not a
    /// walk through the entry's strings.
    pub(crate) hot: Vec<Hot>,
    free: Vec<u32>,
    /// Live entries (an agent is found by its tenant's `by_name`).
    live: usize,
    pub(crate) tenants: HashMap<String, Tenant>,
    /// Lowercased tags, interned across tenants (per-tenant indexes hold numbers).
    pub(crate) tags: Interner,
    /// Home node names, interned: few nodes, many agents, so a selection
    /// reads the chosen node's name from a small, cache-warm table.
    nodes: Interner,
    new_scorer: ScorerFactory,
    pub(crate) choice: Choice,
    /// Intent scores within this share of the best count as equal (load is
    /// balanced among them); see [`Registry::set_intent_margin`].
    pub(crate) intent_margin: f32,
    pub(crate) fusion: Fusion,
    /// Tenants whose lexical intent index is kept: `None` is every tenant
    /// (the default); see [`Registry::index_intent_on_demand`].
    intent_scope: Option<HashSet<String>>,
    /// Bumped by every change of a tenant's intent documents (see
    /// [`Tenant::changed`]): an index built aside is installed only if its
    /// tenant did not change meanwhile.
    stamp: u64,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("agents", &self.live)
            .field("tenants", &self.tenants.len())
            .finish()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl Registry {
    /// A registry matching intents with [`Bm25`].
    pub fn new() -> Registry {
        Registry::with_scorer(|| Box::new(Bm25::default()))
    }

    /// A registry whose tenants each get a scorer from `factory`.
    pub fn with_scorer(factory: impl Fn() -> Box<dyn Scorer> + Send + Sync + 'static) -> Registry {
        Registry {
            entries: Vec::new(),
            hot: Vec::new(),
            free: Vec::new(),
            live: 0,
            tenants: HashMap::new(),
            tags: Interner::default(),
            nodes: Interner::default(),
            new_scorer: Box::new(factory),
            choice: Choice::default(),
            intent_margin: select::INTENT_MARGIN,
            fusion: Fusion::default(),
            intent_scope: None,
            stamp: 0,
        }
    }

    /// Keeps lexical intent indexes only for the tenants named with
    /// [`Registry::index_intent`] from now on, and drops the others. A node
    /// learns every agent of the mesh by gossip but routes intent only for
    /// the tenants of its own callers: an index of every tenant's card
    /// words would cost it about 450 bytes per remote agent (BENCHMARKS.md,
    /// memory) for tenants it never asks about.
    pub fn index_intent_on_demand(&mut self) {
        let scope = self.intent_scope.get_or_insert_with(HashSet::new);
        for (name, t) in &mut self.tenants {
            if !scope.contains(name) {
                t.scorer = None;
            }
        }
    }

    /// Is `tenant`'s lexical intent index kept (so intent selection for it
    /// ranks by words)?
    pub fn intent_indexed(&self, tenant: &str) -> bool {
        self.intent_scope
            .as_ref()
            .is_none_or(|s| s.contains(tenant))
    }

    /// Keeps `tenant`'s lexical intent index from now on, building it from
    /// the tenant's agents now if it was not kept (linear in their number:
    /// about 11 ms for a tenant of 1,000 agents, BENCHMARKS.md). To build a
    /// large one without holding selection up, see
    /// [`Registry::build_intent_index`].
    pub fn index_intent(&mut self, tenant: &str) {
        let Some(scope) = &mut self.intent_scope else {
            return;
        };
        if !scope.insert(tenant.to_string()) {
            return;
        }
        let scorer = self.tenants.get(tenant).map(|t| self.scorer_of(t));
        if let (Some(t), Some(scorer)) = (self.tenants.get_mut(tenant), scorer) {
            t.scorer = Some(scorer);
        }
    }

    /// `tenant`'s lexical intent index, built from its agents without
    /// changing the registry (so under a read lock, while selection goes
    /// on), for [`Registry::install_intent_index`]. `None` when the tenant
    /// is indexed already or has no agents here.
    pub fn build_intent_index(&self, tenant: &str) -> Option<IntentIndex> {
        if self.intent_indexed(tenant) {
            return None;
        }
        let t = self.tenants.get(tenant)?;
        Some(IntentIndex {
            tenant: tenant.to_string(),
            changed: t.changed,
            scorer: self.scorer_of(t),
        })
    }

    /// Keeps the tenant of `built` indexed from now on, with `built` if the
    /// tenant did not change since it was built, else with an index built
    /// now.
    pub fn install_intent_index(&mut self, built: IntentIndex) {
        let current = self
            .tenants
            .get(&built.tenant)
            .is_some_and(|t| t.changed == built.changed);
        let Some(scope) = &mut self.intent_scope else {
            return;
        };
        if !current || scope.contains(&built.tenant) {
            self.index_intent(&built.tenant);
            return;
        }
        scope.insert(built.tenant.clone());
        if let Some(t) = self.tenants.get_mut(&built.tenant) {
            t.scorer = Some(built.scorer);
        }
    }

    fn scorer_of(&self, t: &Tenant) -> Box<dyn Scorer> {
        let mut scorer = (self.new_scorer)();
        for &slot in t.by_name.values() {
            if let Some(e) = self.slot(slot) {
                scorer.index(slot, &e.document());
            }
        }
        scorer
    }

    /// How `select` chooses among eligible candidates (default P2C).
    pub fn set_choice(&mut self, choice: Choice) {
        self.choice = choice;
    }

    /// Intent routing ranks, then balances: load is shared only among the
    /// best-matching agent and those equivalent to it (the same card or
    /// skills, or an intent score within `margin` of the best, as a share:
    /// 0.05 = 5 %). Clamped to 0..=1.
    pub fn set_intent_margin(&mut self, margin: f32) {
        self.intent_margin = if margin.is_nan() {
            0.0
        } else {
            margin.clamp(0.0, 1.0)
        };
    }

    pub fn choice(&self) -> Choice {
        self.choice
    }

    /// Adds or replaces an agent's record (and home node). Its load report is
    /// kept; its card text is kept only if the digest did not change.
    pub fn upsert(&mut self, node: &str, id: AgentId, record: AgentRecord) {
        if let Some(slot) = self.slot_of(&id) {
            self.unindex(slot);
            let mut moved = None;
            if let Some(e) = self.slot_mut(slot) {
                if e.record.digest() != record.digest {
                    if let Some(c) = &mut e.cold {
                        c.card_text = None;
                        c.vectors = None;
                        if c.learned.is_empty() {
                            e.cold = None;
                        }
                    }
                }
                e.record = PackedRecord::pack(&record);
                if *e.node != *node {
                    moved = Some(e.node.clone());
                }
            }
            if let Some(old) = moved {
                self.nodes.release(&old);
                let n = self.nodes.acquire(node);
                let shared = self.nodes.shared(n);
                if let Some(e) = self.slot_mut(slot) {
                    e.node = shared;
                }
                if let Some(h) = self.hot.get_mut(slot as usize) {
                    h.node = n;
                }
            }
            if let Some(h) = self.hot.get_mut(slot as usize) {
                h.healthy = record.health == Health::Healthy;
            }
            self.index(slot);
            return;
        }
        let hot = Hot {
            live: true,
            healthy: record.health == Health::Healthy,
            node: self.nodes.acquire(node),
            load: LoadReport::default(),
            name: InlineName::new(&id.name),
        };
        let entry = Entry {
            id,
            node: self.nodes.shared(hot.node),
            record: PackedRecord::pack(&record),
            cold: None,
        };
        let slot = match self.free.pop() {
            Some(s) => {
                self.entries[s as usize] = entry;
                self.hot[s as usize] = hot;
                s
            }
            None => {
                // More than 4 billion agents on one node is not a use case;
                // saturating only keeps this panic-free.
                let s = u32::try_from(self.entries.len()).unwrap_or(u32::MAX);
                grow(&mut self.entries);
                grow(&mut self.hot);
                self.entries.push(entry);
                self.hot.push(hot);
                s
            }
        };
        self.live += 1;
        self.index(slot);
    }

    /// Updates an agent's load report; no-op for an unknown agent.
    pub fn set_load(&mut self, id: &AgentId, load: LoadReport) {
        if let Some(slot) = self.slot_of(id) {
            if let Some(h) = self.hot.get_mut(slot as usize) {
                h.load = load;
            }
        }
    }

    /// An agent's last load report (default until one arrived).
    pub fn load(&self, id: &AgentId) -> Option<LoadReport> {
        let slot = self.slot_of(id)?;
        self.hot
            .get(slot as usize)
            .filter(|h| h.live)
            .map(|h| h.load)
    }

    /// Adds the card's text (card description, skill descriptions and
    /// examples) to the agent's intent document. Ignored, returning false,
    /// when the agent is unknown or `card.digest()` differs from the
    /// record's digest (a stale or forged card).
    pub fn set_card(&mut self, id: &AgentId, card: &AgentCard) -> bool {
        let Some(slot) = self.slot_of(id) else {
            return false;
        };
        let digest = card.digest();
        let Some(e) = self.slot_mut(slot) else {
            return false;
        };
        if e.record.digest() != digest {
            return false;
        }
        let mut text = Vec::new();
        if let Some(d) = &card.description {
            text.push((FieldKind::CardDescription, d.clone()));
        }
        for s in &card.skills {
            if let Some(d) = &s.description {
                text.push((FieldKind::SkillDescription, d.clone()));
            }
            for ex in s.examples.iter().flatten() {
                text.push((FieldKind::Example, ex.clone()));
            }
        }
        e.cold_mut().card_text = Some(text);
        let doc = e.document();
        self.reindex(&id.tenant, slot, &doc);
        true
    }

    /// Sets the embedded pieces of the agent's card. Ignored, returning
    /// false, when the agent is unknown or its record has another digest
    /// (the card changed while it was being embedded).
    pub fn set_vectors(
        &mut self,
        id: &AgentId,
        digest: &str,
        vectors: std::sync::Arc<CardVectors>,
    ) -> bool {
        let Some(slot) = self.slot_of(id) else {
            return false;
        };
        match self.slot_mut(slot) {
            Some(e) if e.record.digest() == digest => {
                e.cold_mut().vectors = Some(vectors);
                true
            }
            _ => false,
        }
    }

    /// Replaces the examples learned for an agent (text and, when the node
    /// embeds its tenant, vector); re-indexes its intent document. False
    /// when the agent is unknown.
    pub fn set_learned(&mut self, id: &AgentId, learned: Vec<(String, Option<Q8>)>) -> bool {
        let Some(slot) = self.slot_of(id) else {
            return false;
        };
        let Some(e) = self.slot_mut(slot) else {
            return false;
        };
        if e.learned_pairs().eq(learned.iter()) {
            return true;
        }
        e.cold_mut().learned = learned;
        let doc = e.document();
        self.reindex(&id.tenant, slot, &doc);
        true
    }

    /// The agent's embedded card, if set.
    pub fn vectors(&self, id: &AgentId) -> Option<&std::sync::Arc<CardVectors>> {
        self.get(id)?.card_vectors()
    }

    /// How intent scores are fused (see [`semantic`]).
    pub fn set_fusion(&mut self, fusion: Fusion) {
        self.fusion = fusion;
    }

    pub fn has_card(&self, id: &AgentId) -> bool {
        self.get(id).is_some_and(Entry::has_card)
    }

    pub fn remove(&mut self, id: &AgentId) -> Option<Entry> {
        let slot = self.slot_of(id)?;
        self.unindex(slot);
        self.live -= 1;
        let entry = self
            .slot_mut(slot)
            .map(|e| std::mem::replace(e, Entry::placeholder()));
        if let Some(e) = &entry {
            self.nodes.release(&e.node);
        }
        if let Some(h) = self.hot.get_mut(slot as usize) {
            *h = Hot::default();
        }
        self.free.push(slot);
        if let Some(t) = self.tenants.get(&id.tenant) {
            if t.by_name.is_empty() {
                self.tenants.remove(&id.tenant);
            }
        }
        entry
    }

    /// Removes every agent homed on `node` (the node died or left).
    pub fn remove_node(&mut self, node: &str) -> Vec<AgentId> {
        let gone: Vec<AgentId> = self
            .iter()
            .filter(|e| *e.node == *node)
            .map(|e| e.id.clone())
            .collect();
        for id in &gone {
            self.remove(id);
        }
        gone
    }

    /// Removes every agent whose registration expired before `now_unix_ms`.
    pub fn expire(&mut self, now_unix_ms: u64) -> Vec<AgentId> {
        let gone: Vec<AgentId> = self
            .iter()
            .filter(|e| e.record.expires_ms() < now_unix_ms)
            .map(|e| e.id.clone())
            .collect();
        for id in &gone {
            self.remove(id);
        }
        gone
    }

    pub fn get(&self, id: &AgentId) -> Option<&Entry> {
        self.slot_of(id).and_then(|s| self.slot(s))
    }

    /// The slot of an agent: found through its tenant's name index (no
    /// second map of every id: each would copy both strings of every
    /// remote agent).
    fn slot_of(&self, id: &AgentId) -> Option<u32> {
        self.tenants
            .get(&id.tenant)?
            .by_name
            .get(&id.name, &self.entries)
    }

    /// All entries, in no particular order (sort for display).
    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.hot
            .iter()
            .zip(&self.entries)
            .filter(|(h, _)| h.live)
            .map(|(_, e)| e)
    }

    /// Entries of one tenant, in no particular order.
    pub fn tenant_entries<'a>(&'a self, tenant: &'a str) -> impl Iterator<Item = &'a Entry> {
        self.tenants
            .get(tenant)
            .into_iter()
            .flat_map(|t| t.by_name.values())
            .filter_map(|&s| self.slot(s))
    }

    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Agents of `tenant` ranked by intent score for `text`, best first
    /// (health and load are not considered; this is for status and debugging).
    pub fn match_intent(&self, tenant: &str, text: &str, limit: usize) -> Vec<(AgentId, f32)> {
        let Some(t) = self.tenants.get(tenant) else {
            return Vec::new();
        };
        t.scorer
            .as_ref()
            .map(|s| s.query(text, limit))
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(s, score)| self.slot(s).map(|e| (e.id.clone(), score)))
            .collect()
    }

    /// Name of the agent in a slot, from the inline copy when there is one.
    pub(crate) fn name_of(&self, slot: u32) -> &str {
        match self.hot.get(slot as usize).and_then(|h| h.name.get()) {
            Some(n) => n,
            None => self.slot(slot).map_or("", |e| e.id.name.as_str()),
        }
    }

    /// Home node name of a slot, from the interned table.
    pub(crate) fn node_of(&self, slot: u32) -> &str {
        self.hot
            .get(slot as usize)
            .map_or("", |h| self.nodes.name(h.node))
    }

    /// Slots of `tenant`'s agents tagged `tag` (lowercase), for tests.
    #[cfg(test)]
    pub(crate) fn tag_members(&self, tenant: &str, tag: &str) -> Option<&[u32]> {
        let id = self.tags.get(tag)?;
        self.tenants
            .get(tenant)?
            .by_tag
            .get(&id)
            .map(Members::as_slice)
    }

    pub(crate) fn slot(&self, slot: u32) -> Option<&Entry> {
        let live = self.hot.get(slot as usize).is_some_and(|h| h.live);
        live.then(|| self.entries.get(slot as usize)).flatten()
    }

    fn slot_mut(&mut self, slot: u32) -> Option<&mut Entry> {
        let live = self.hot.get(slot as usize).is_some_and(|h| h.live);
        live.then(|| self.entries.get_mut(slot as usize)).flatten()
    }

    /// The intent document of `slot` (of `tenant`) changed.
    fn reindex(&mut self, tenant: &str, slot: u32, doc: &Document) {
        self.stamp += 1;
        if let Some(t) = self.tenants.get_mut(tenant) {
            t.changed = self.stamp;
            if let Some(s) = &mut t.scorer {
                s.index(slot, doc);
            }
        }
    }

    fn index(&mut self, slot: u32) {
        if !self.hot.get(slot as usize).is_some_and(|h| h.live) {
            return;
        }
        let Some(e) = self.entries.get(slot as usize) else {
            return;
        };
        let scoped = self
            .intent_scope
            .as_ref()
            .is_none_or(|s| s.contains(&e.id.tenant));
        let tenant = self
            .tenants
            .entry(e.id.tenant.clone())
            .or_insert_with(|| Tenant {
                by_name: Names::default(),
                by_tag: HashMap::default(),
                scorer: scoped.then(|| (self.new_scorer)()),
                changed: 0,
            });
        self.stamp += 1;
        tenant.changed = self.stamp;
        tenant.by_name.insert(slot, &self.entries);
        for tag in e.tag_keys() {
            let tag = self.tags.acquire(&tag);
            tenant.by_tag.entry(tag).or_default().push(slot);
        }
        if let Some(s) = &mut tenant.scorer {
            s.index(slot, &e.document());
        }
    }

    fn unindex(&mut self, slot: u32) {
        if !self.hot.get(slot as usize).is_some_and(|h| h.live) {
            return;
        }
        let Some(e) = self.entries.get(slot as usize) else {
            return;
        };
        let Some(tenant) = self.tenants.get_mut(&e.id.tenant) else {
            return;
        };
        self.stamp += 1;
        tenant.changed = self.stamp;
        tenant.by_name.remove(&e.id.name, &self.entries);
        for name in e.tag_keys() {
            let Some(tag) = self.tags.get(&name) else {
                continue;
            };
            if let Some(list) = tenant.by_tag.get_mut(&tag) {
                list.remove(slot);
                if list.as_slice().is_empty() {
                    tenant.by_tag.remove(&tag);
                }
            }
            self.tags.release(&name);
        }
        if let Some(s) = &mut tenant.scorer {
            s.remove(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn record(tags: &[&str], health: Health) -> AgentRecord {
        AgentRecord {
            digest: "d".into(),
            skills: vec![SkillTags {
                id: "s".into(),
                name: "Skill".into(),
                tags: tags.iter().map(|t| t.to_string()).collect(),
            }],
            protocols: vec!["JSONRPC".into()],
            a2a: Vec::new(),
            health,
            expires_ms: 1_000,
        }
    }

    #[test]
    fn upsert_replace_remove() {
        let mut r = Registry::new();
        let a = AgentId::new("acme", "a");
        r.upsert(
            "n1",
            a.clone(),
            record(&["Billing", "billing "], Health::Healthy),
        );
        assert_eq!(r.len(), 1);
        assert_eq!(r.tag_members("acme", "billing"), Some(&[0][..]));
        let load = LoadReport {
            in_flight: 4,
            ..Default::default()
        };
        r.set_load(&a, load);
        r.set_load(&AgentId::new("acme", "nobody"), load);
        r.upsert("n2", a.clone(), record(&["ocr"], Health::Healthy));
        let e = r.get(&a).expect("present");
        assert_eq!(&*e.node, "n2");
        assert_eq!(
            r.load(&a).map(|l| l.in_flight),
            Some(4),
            "load survives a record update"
        );
        assert_eq!(r.tag_members("acme", "billing"), None);
        assert_eq!(r.tag_members("acme", "ocr"), Some(&[0][..]));
        assert_eq!(r.node_of(0), "n2");
        assert_eq!(
            (r.tags.len(), r.nodes.len()),
            (1, 1),
            "unused names are forgotten"
        );
        assert!(r.remove(&a).is_some());
        assert!(r.is_empty());
        assert!(r.tenants.is_empty());
        assert_eq!((r.tags.len(), r.nodes.len()), (0, 0));
        assert!(r.remove(&a).is_none());
        // slot reuse
        r.upsert(
            "n1",
            AgentId::new("t", "b"),
            record(&["x"], Health::Healthy),
        );
        assert_eq!(r.entries.len(), 1);
        assert!(r.hot[0].live && r.hot[0].healthy);
    }

    #[test]
    fn iteration_remove_node_expire() {
        let mut r = Registry::new();
        for (t, n, node) in [
            ("b", "z", "n1"),
            ("a", "y", "n2"),
            ("a", "x", "n1"),
            ("b", "a", "n2"),
        ] {
            let mut rec = record(&["t"], Health::Healthy);
            rec.expires_ms = if n == "y" { 10 } else { 100 };
            r.upsert(node, AgentId::new(t, n), rec);
        }
        let mut all: Vec<String> = r.iter().map(|e| e.id.to_string()).collect();
        all.sort();
        assert_eq!(all, vec!["a/x", "a/y", "b/a", "b/z"]);
        let mut a: Vec<String> = r.tenant_entries("a").map(|e| e.id.name.clone()).collect();
        a.sort();
        assert_eq!(a, vec!["x", "y"]);
        assert_eq!(r.expire(50), vec![AgentId::new("a", "y")]);
        assert!(r.get(&AgentId::new("a", "y")).is_none());
        let mut gone = r.remove_node("n1");
        gone.sort();
        assert_eq!(gone, vec![AgentId::new("a", "x"), AgentId::new("b", "z")]);
        assert_eq!(r.tenant_entries("b").count(), 1);
        assert_eq!(r.len(), 1);
        assert_eq!(r.expire(101).len(), 1);
        assert!(r.is_empty());
    }

    #[test]
    fn intent_indexes_on_demand_only_for_tenants_in_scope() {
        let add = |r: &mut Registry, t: &str, n: &str| {
            r.upsert(
                "n1",
                AgentId::new(t, n),
                record(&["invoices"], Health::Healthy),
            )
        };
        let hits = |r: &Registry, t: &str| r.match_intent(t, "invoices", 5).len();
        let mut r = Registry::new();
        add(&mut r, "acme", "a");
        add(&mut r, "beta", "b");
        assert_eq!(hits(&r, "acme"), 1, "eager by default");
        r.index_intent_on_demand();
        assert!(!r.intent_indexed("acme") && !r.intent_indexed("beta"));
        assert!(
            r.match_intent("acme", "invoices", 5).is_empty(),
            "index dropped"
        );
        // tag selection does not depend on it
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
        let by_tag = r.select(
            "acme",
            &Target::Tag("invoices".into()),
            &NoLocal,
            &[],
            &mut rng,
        );
        assert_eq!(by_tag.map(|s| s.id.name).ok().as_deref(), Some("a"));
        r.index_intent("acme");
        assert!(r.intent_indexed("acme") && !r.intent_indexed("beta"));
        assert_eq!(hits(&r, "acme"), 1, "built from the agents");
        add(&mut r, "acme", "c");
        assert_eq!(hits(&r, "acme"), 2, "kept up to date");
        assert!(r.match_intent("beta", "invoices", 5).is_empty());
        // built aside (under a read lock) and installed: as if built in place,
        // also when the tenant changed in between (then rebuilt)
        let built = r.build_intent_index("beta").expect("beta has agents");
        assert!(r.build_intent_index("acme").is_none(), "indexed already");
        assert!(r.build_intent_index("nobody").is_none(), "no agents");
        r.install_intent_index(built);
        assert!(r.intent_indexed("beta"));
        assert_eq!(hits(&r, "beta"), 1);
        add(&mut r, "gamma", "g1");
        let built = r.build_intent_index("gamma").expect("gamma has agents");
        add(&mut r, "gamma", "g2");
        r.install_intent_index(built);
        assert_eq!(hits(&r, "gamma"), 2, "the agent added meanwhile is in");
        // a tenant that empties and comes back stays in scope
        r.remove(&AgentId::new("acme", "a"));
        r.remove(&AgentId::new("acme", "c"));
        add(&mut r, "acme", "d");
        assert_eq!(r.match_intent("acme", "invoices", 5).len(), 1);
    }

    #[test]
    fn card_enriches_intent_only_with_matching_digest() {
        let card = AgentCard::parse(
            br#"{"name":"Doc","url":"http://h/","description":"Turns scanned paper into text",
                 "skills":[{"id":"ocr","name":"OCR","examples":["read this receipt"]}]}"#,
        )
        .expect("card");
        let mut r = Registry::new();
        let id = AgentId::new("acme", "doc");
        let mut rec = AgentRecord::from_card(&card, Health::Healthy, 100);
        r.upsert("n1", id.clone(), rec.clone());
        assert!(r.match_intent("acme", "receipt", 5).is_empty());
        assert!(r.match_intent("acme", "ocr", 5).len() == 1);
        let mut other = card.clone();
        other.name = "Changed".into();
        assert!(!r.set_card(&id, &other), "digest mismatch is ignored");
        assert!(!r.has_card(&id));
        assert!(r.set_card(&id, &card));
        assert!(r.has_card(&id));
        assert_eq!(r.match_intent("acme", "receipt", 5)[0].0, id);
        assert_eq!(r.match_intent("acme", "scanned paper", 5)[0].0, id);
        // other tenants do not see it
        assert!(r.match_intent("other", "receipt", 5).is_empty());
        // same digest: card text kept; new digest: dropped
        r.upsert("n1", id.clone(), rec.clone());
        assert!(r.has_card(&id));
        rec.digest = "new".into();
        r.upsert("n1", id.clone(), rec);
        assert!(!r.has_card(&id));
        assert!(r.match_intent("acme", "receipt", 5).is_empty());
    }

    #[test]
    fn members_inline_then_heap() {
        let mut m = Members::default();
        assert!(m.as_slice().is_empty());
        for i in 0..5 {
            m.push(i);
        }
        assert!(matches!(m, Members::Inline { .. }));
        m.remove(1);
        m.remove(9);
        let mut got = m.as_slice().to_vec();
        got.sort();
        assert_eq!(got, vec![0, 2, 3, 4]);
        m.push(5);
        m.push(6);
        let mut got = m.as_slice().to_vec();
        got.sort();
        assert_eq!(got, vec![0, 2, 3, 4, 5, 6]);
        assert!(matches!(m, Members::Heap(_)));
        for i in [0, 2, 3, 4, 5, 6] {
            m.remove(i);
        }
        assert!(m.as_slice().is_empty());
    }

    #[test]
    fn inline_names() {
        assert_eq!(InlineName::new("agent-7").get(), Some("agent-7"));
        assert_eq!(
            InlineName::new(&"x".repeat(37)).get().map(str::len),
            Some(37)
        );
        assert_eq!(InlineName::new(&"x".repeat(38)).get(), None);
        assert_eq!(std::mem::size_of::<Hot>(), 64, "one cache line");
        assert_eq!(InlineName::new("").get(), None);
        let mut r = Registry::new();
        let long = "n".repeat(100);
        r.upsert(
            "n1",
            AgentId::new("t", long.clone()),
            record(&["x"], Health::Healthy),
        );
        r.upsert(
            "n1",
            AgentId::new("t", "short"),
            record(&["x"], Health::Healthy),
        );
        assert_eq!(r.name_of(0), long);
        assert_eq!(r.name_of(1), "short");
    }

    #[test]
    fn registry_is_shareable_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Registry>();
    }

    #[test]
    fn agent_id_text() {
        let id = AgentId::new("acme", "billing");
        assert_eq!(id.to_string(), "acme/billing");
        assert_eq!(AgentId::parse("acme/billing"), Some(id));
        assert_eq!(AgentId::parse("acme"), None);
        assert_eq!(AgentId::parse("a/b/c"), None);
        assert_eq!(AgentId::parse("/b"), None);
    }
}
