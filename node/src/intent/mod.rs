//! Routing by intent on this node: the model, the embeddings, asking when
//! unsure, and learning from the answers.
//!
//! Why it is here and shaped so: the registry ranks (BM25 fused with
//! semantic scores, `dmsc_registry::semantic`) but never runs a model; the
//! model's forward pass costs milliseconds of CPU, so it never runs under
//! the registry's lock or on an async worker. This module owns the
//! model-running side:
//!
//! - the query: embedded once per request on the blocking pool
//!   ([`Intent::embed_query`]), before selection takes its read lock, and
//!   cached per tenant (a repeated query costs a hash lookup);
//! - the cards: the embedding loop ([`Intent::run`]) finds registered
//!   agents of the tenants in scope whose card is known but not embedded,
//!   embeds each card digest once (replicas share the vectors), and hands
//!   the vectors to the registry under a short write lock;
//! - the scope: only tenants this node routes intent for (configured, or
//!   its listeners' and agents' tenants, or any tenant it was asked an
//!   intent for), so a node does not embed the whole mesh;
//! - asks ([`ask`]) and learned examples ([`learn`]).
//!
//! Without a model (`[intent] model_dir` unset) everything here is a no-op
//! but asks and learning: routing is lexical, and the node says so at start
//! and in `status`.

pub mod ask;
pub mod card;
pub mod followup;
pub mod learn;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dmsc_registry::semantic::card_texts;
use dmsc_registry::{AgentId, CardVectors, Q8};
use tokio::sync::{Notify, Semaphore};

use crate::config::IntentConfig;
use crate::route::MeshView;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Queries cached per tenant (two generations of this many: the older
/// generation is dropped when the newer fills).
const QUERY_CACHE: usize = 2048;
/// Card digests whose vectors are kept for replicas and re-registrations.
const CARD_CACHE: usize = 100_000;
/// Model passes at once (the machine's cores are shared with forwarding).
const MODEL_PERMITS: usize = 2;

/// A query's embedding.
#[derive(Debug, Clone)]
pub struct QueryVector {
    pub vector: Arc<Q8>,
    /// The text was cut to the model's window.
    pub truncated: bool,
}

/// Two-generation cache: lookups in both, inserts into the young one.
#[derive(Default)]
struct Generations<V> {
    young: HashMap<String, V>,
    old: HashMap<String, V>,
    cap: usize,
}

impl<V: Clone> Generations<V> {
    fn new(cap: usize) -> Self {
        Generations {
            young: HashMap::new(),
            old: HashMap::new(),
            cap,
        }
    }
    fn get(&self, k: &str) -> Option<V> {
        self.young.get(k).or_else(|| self.old.get(k)).cloned()
    }
    fn insert(&mut self, k: String, v: V) {
        if self.young.len() >= self.cap {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(k, v);
    }
}

/// Routing by intent on this node. One per node.
pub struct Intent {
    model: Option<Arc<dmsc_embed::Model>>,
    pub cfg: IntentConfig,
    /// Tenants configured or served by this node's listeners and agents.
    fixed: Option<HashSet<String>>,
    served: Mutex<HashSet<String>>,
    /// Tenants this node was asked an intent for.
    routed: Mutex<HashSet<String>>,
    queries: Mutex<HashMap<String, Generations<QueryVector>>>,
    cards: Mutex<Generations<Arc<CardVectors>>>,
    /// Learned example text -> vector.
    examples: Mutex<Generations<Q8>>,
    wake: Notify,
    /// Model passes at once; a permit moves into the blocking task, so a
    /// caller that goes away does not free it before the pass ends.
    permits: Arc<Semaphore>,
    pub asks: Mutex<ask::Pending>,
    pub learned: Mutex<learn::Learned>,
    /// Which agent has which task of intent-routed work, and asks waiting
    /// for a reply in their task ([`followup`]).
    pub followups: Mutex<followup::Followups>,
    /// Where this node's learned records are kept across restarts.
    store: Option<std::path::PathBuf>,
    unsaved: std::sync::atomic::AtomicBool,
    /// Card digests whose embedding failed, and when (retried after a minute).
    failed: Mutex<HashMap<String, std::time::Instant>>,
}

impl std::fmt::Debug for Intent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intent")
            .field("scorer", &self.scorer())
            .finish()
    }
}

impl Intent {
    /// Loads the configured model (a missing or corrupt one is an error
    /// naming the file).
    pub fn load(
        me: &str,
        cfg: IntentConfig,
        data_dir: &std::path::Path,
    ) -> Result<Intent, dmsc_embed::Error> {
        let model = match &cfg.model_dir {
            Some(dir) => {
                let started = std::time::Instant::now();
                let m = dmsc_embed::Model::load(dir)?;
                tracing::info!(
                    model_dir = %dir.display(),
                    architecture = m.architecture(),
                    dim = m.dim(),
                    load_ms = started.elapsed().as_millis() as u64,
                    "intent routing: hybrid (BM25 + sentence embeddings)"
                );
                Some(Arc::new(m))
            }
            None => {
                tracing::info!(
                    "intent routing: lexical-only (no [intent] model_dir; scripts/fetch-model.sh installs a model)"
                );
                None
            }
        };
        let mut intent = Intent::with_model(me, cfg, model);
        intent.persist_in(data_dir.join("intent-learned.json"));
        Ok(intent)
    }

    /// Keeps this node's learned records in `path` (restored now, written
    /// on every change).
    pub fn persist_in(&mut self, path: std::path::PathBuf) {
        if let Ok(json) = std::fs::read_to_string(&path) {
            let n = lock(&self.learned).restore(&json);
            if n == 0 && !json.trim().is_empty() && json.trim() != "[]" {
                // keep it for the operator; a save would overwrite it
                let aside = path.with_extension("json.corrupt");
                let _ = std::fs::rename(&path, &aside);
                tracing::warn!(path = %path.display(), moved_to = %aside.display(), "learned intent examples unreadable; moved aside");
            } else {
                tracing::info!(path = %path.display(), records = n, "learned intent examples restored");
            }
        }
        self.store = Some(path);
    }

    /// Marks this node's learned records for saving (the learned loop
    /// writes them, off the request path, one writer).
    pub fn save_learned(&self) {
        self.unsaved
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Writes the records if they changed: mode 0600 (learned texts come
    /// from callers), atomically.
    fn flush_learned(&self) {
        if !self
            .unsaved
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let Some(path) = &self.store else {
            return;
        };
        let json = lock(&self.learned).own_json();
        if let Err(e) = dmsc_auth::token::write_private_atomic(path, json.as_bytes()) {
            tracing::warn!(path = %path.display(), error = %e, "cannot save learned intent examples");
            self.save_learned();
        }
    }

    /// With an already loaded model (shared by the nodes of a demo or test).
    pub fn with_model(
        me: &str,
        cfg: IntentConfig,
        model: Option<Arc<dmsc_embed::Model>>,
    ) -> Intent {
        let fixed = cfg.tenants.as_ref().map(|t| t.iter().cloned().collect());
        let learned = learn::Learned::new(
            me,
            cfg.learn_per_agent,
            cfg.learn_per_caller,
            Duration::from_secs(3600),
        );
        Intent {
            model,
            fixed,
            served: Mutex::new(HashSet::new()),
            routed: Mutex::new(HashSet::new()),
            queries: Mutex::new(HashMap::new()),
            cards: Mutex::new(Generations::new(CARD_CACHE)),
            examples: Mutex::new(Generations::new(CARD_CACHE)),
            wake: Notify::new(),
            permits: Arc::new(Semaphore::new(MODEL_PERMITS)),
            asks: Mutex::new(ask::Pending::new(cfg.learn_window)),
            learned: Mutex::new(learned),
            followups: Mutex::new(followup::Followups::default()),
            store: None,
            unsaved: std::sync::atomic::AtomicBool::new(false),
            failed: Mutex::new(HashMap::new()),
            cfg,
        }
    }

    /// `hybrid` with a model, `lexical-only` without.
    pub fn scorer(&self) -> &'static str {
        if self.model.is_some() {
            "hybrid"
        } else {
            "lexical-only"
        }
    }

    /// The model directory, when there is a model.
    pub fn model_dir(&self) -> Option<String> {
        self.model.as_ref().map(|m| m.dir().display().to_string())
    }

    /// A tenant this node serves (a listener's or an agent's).
    pub fn serve_tenant(&self, tenant: &str) {
        if lock(&self.served).insert(tenant.to_string()) {
            self.wake.notify_one();
        }
    }

    /// Tenants whose cards are embedded (for `status`).
    pub fn tenants(&self) -> Vec<String> {
        let mut t: Vec<String> = match &self.fixed {
            Some(f) => f.iter().cloned().collect(),
            None => lock(&self.served)
                .iter()
                .chain(lock(&self.routed).iter())
                .cloned()
                .collect(),
        };
        t.sort();
        t.dedup();
        t
    }

    /// The query's embedding, from the tenant's cache or the model (on the
    /// blocking pool). `None` without a model, or if the model failed.
    pub async fn embed_query(&self, tenant: &str, text: &str) -> Option<QueryVector> {
        let model = self.model.clone()?;
        match &self.fixed {
            // not a tenant this node embeds cards for: no use
            Some(f) if !f.contains(tenant) => return None,
            Some(_) => {}
            None => {
                if lock(&self.routed).insert(tenant.to_string()) {
                    // the first intent for this tenant: embed its cards from now on
                    self.wake.notify_one();
                }
            }
        }
        // The model never reads past MAX_INPUT_BYTES: neither does the cache key.
        let mut end = text.len().min(dmsc_embed::MAX_INPUT_BYTES);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let key = &text[..end];
        if let Some(q) = lock(&self.queries).get(tenant).and_then(|c| c.get(key)) {
            return Some(q);
        }
        // Two passes at once; a request that cannot get one soon is ranked
        // on its words rather than queued behind a flood of new texts.
        let permit = tokio::time::timeout(
            Duration::from_millis(500),
            self.permits.clone().acquire_owned(),
        )
        .await
        .ok()?
        .ok()?;
        let owned = text.to_string();
        let e = tokio::task::spawn_blocking(move || {
            let e = model.embed(&owned);
            drop(permit);
            e
        })
        .await
        .ok()?
        .map_err(|e| tracing::warn!(error = %e, "embedding a query failed; lexical only"))
        .ok()?;
        let q = QueryVector {
            vector: Arc::new(Q8::from_f32(&e.vector)),
            truncated: e.truncated,
        };
        lock(&self.queries)
            .entry(tenant.to_string())
            .or_insert_with(|| Generations::new(QUERY_CACHE))
            .insert(key.to_string(), q.clone());
        Some(q)
    }

    /// Wakes the embedding loop (a card or learned example arrived).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The embedding loop: cards and learned examples of the tenants in
    /// scope that have no vectors yet get them. Ends only when the task is
    /// aborted with the node.
    pub async fn run(self: Arc<Self>, mesh: Arc<MeshView>) {
        let Some(model) = self.model.clone() else {
            // The node's tasks run for its lifetime (one ending stops the
            // node): without a model there is nothing to do, forever.
            return std::future::pending().await;
        };
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                // new cards are picked up within this (no hook in the
                // registry's many update paths; a pass over 100k entries
                // is a few milliseconds under the read lock)
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            self.embed_missing(&model, &mesh).await;
        }
    }

    async fn embed_missing(&self, model: &Arc<dmsc_embed::Model>, mesh: &MeshView) {
        // What is missing, under a short read lock.
        let mut cards: HashMap<String, Vec<AgentId>> = HashMap::new();
        let mut learned: Vec<String> = Vec::new();
        let scope: HashSet<String> = self.tenants().into_iter().collect();
        if scope.is_empty() {
            return;
        }
        {
            let reg = mesh.read();
            for e in reg.iter() {
                if !scope.contains(&e.id.tenant) {
                    continue;
                }
                if e.has_card() && !e.has_vectors() {
                    cards
                        .entry(e.record.digest().to_string())
                        .or_default()
                        .push(e.id.clone());
                }
                learned.extend(e.learned_unembedded().map(str::to_string));
            }
        }
        for (digest, ids) in cards {
            let cached = lock(&self.cards).get(&digest);
            let recently_failed = lock(&self.failed)
                .get(&digest)
                .is_some_and(|t| t.elapsed() < Duration::from_secs(60));
            if cached.is_none() && recently_failed {
                continue;
            }
            let vectors = match cached {
                Some(v) => v,
                None => {
                    let Some(card) = mesh.card(&digest) else {
                        continue;
                    };
                    let m = model.clone();
                    let Ok(permit) = self.permits.clone().acquire_owned().await else {
                        return;
                    };
                    let made = tokio::task::spawn_blocking(move || {
                        let _permit = permit;
                        let mut pieces = Vec::new();
                        for (piece, text) in card_texts(&card) {
                            pieces.push((piece, m.embed(&text)?.vector));
                        }
                        Ok::<_, dmsc_embed::Error>(CardVectors::new(pieces))
                    })
                    .await;
                    match made {
                        Ok(Ok(v)) => {
                            let v = Arc::new(v);
                            lock(&self.cards).insert(digest.clone(), v.clone());
                            v
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(digest = %digest, error = %e, "embedding a card failed; its agents stay lexical (retried in a minute)");
                            let mut f = lock(&self.failed);
                            if f.len() > 10_000 {
                                f.retain(|_, t| t.elapsed() < Duration::from_secs(60));
                            }
                            f.insert(digest.clone(), std::time::Instant::now());
                            continue;
                        }
                        Err(_) => continue,
                    }
                }
            };
            let mut reg = mesh.write();
            for id in ids {
                reg.set_vectors(&id, &digest, vectors.clone());
            }
        }
        learned.sort();
        learned.dedup();
        let mut fresh = false;
        for text in learned {
            if lock(&self.examples).get(&text).is_some() {
                fresh = true;
                continue;
            }
            let m = model.clone();
            let Ok(permit) = self.permits.clone().acquire_owned().await else {
                return;
            };
            let t = text.clone();
            let embedded = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                m.embed(&t)
            })
            .await;
            if let Ok(Ok(e)) = embedded {
                lock(&self.examples).insert(text, Q8::from_f32(&e.vector));
                fresh = true;
            }
        }
        if fresh {
            self.apply_learned(mesh);
        }
    }

    /// Puts the merged learned examples (this node's and its peers') into
    /// the registry, with their vectors where embedded.
    pub fn apply_learned(&self, mesh: &MeshView) {
        let merged = lock(&self.learned).merged();
        // The common case, nothing learned anywhere: no write lock.
        if merged.is_empty() && !mesh.read().iter().any(|e| e.learned().next().is_some()) {
            return;
        }
        let examples = lock(&self.examples);
        let mut reg = mesh.write();
        let ids: Vec<AgentId> = reg
            .iter()
            .filter(|e| e.learned().next().is_some())
            .map(|e| e.id.clone())
            .collect();
        for id in ids {
            if !merged.contains_key(&(id.tenant.clone(), id.name.clone())) {
                reg.set_learned(&id, Vec::new());
            }
        }
        for ((tenant, agent), texts) in merged {
            let with = texts
                .into_iter()
                .map(|t| {
                    let v = examples.get(&t);
                    (t, v)
                })
                .collect();
            reg.set_learned(&AgentId::new(tenant, agent), with);
        }
    }
}

/// What the ingress does for intent before delegating: embed the query,
/// ask when unsure (ask mode), learn from a call that resolves an ask.
/// `Err` is the ask, to send as the response.
pub async fn prepare(
    intent: &Intent,
    mesh: &MeshView,
    step: Step<'_>,
) -> Result<Prepared, hyper::Response<crate::proto::http::Body>> {
    let Step {
        tenant,
        caller,
        caller_tenant,
        authenticated,
        target,
        body,
        mode,
        choice,
        allowed,
        path,
        header_text,
        speaks,
    } = step;
    match target {
        dmsc_registry::Target::Intent(text) => {
            mesh.ensure_intent(tenant);
            let q = intent.embed_query(tenant, text).await;
            let ask = match mode.map(str::trim) {
                Some(m) if m.eq_ignore_ascii_case("ask") => true,
                Some(m) if m.eq_ignore_ascii_case("best") => false,
                _ => intent.cfg.ask,
            };
            if !ask {
                return Ok(Prepared {
                    query: q,
                    lesson: None,
                });
            }
            let candidates = {
                let reg = mesh.read();
                let ranked: Vec<(AgentId, dmsc_registry::Scores, String)> = reg
                    .rank_intent(tenant, text, q.as_ref().map(|q| &*q.vector))
                    .into_iter()
                    .filter_map(|(id, s)| {
                        let e = reg.get(&id)?;
                        // Only what the caller may call: healthy, and
                        // allowed by both tenants' policies (a cross-tenant
                        // caller never sees agents not exported to it).
                        let tags = crate::route::agent_tags(&reg, &id);
                        (e.record.health() == dmsc_registry::Health::Healthy
                            && speaks.served_by(&e.record)
                            && allowed(&id.name, &tags))
                        .then(|| (id, s, e.record.digest().to_string()))
                    })
                    .collect();
                let scores: Vec<dmsc_registry::Scores> = ranked.iter().map(|x| x.1).collect();
                match intent.cfg.ask_rule.decide(&scores) {
                    dmsc_registry::semantic::Ask::Route => {
                        return Ok(Prepared {
                            query: q,
                            lesson: None,
                        })
                    }
                    dmsc_registry::semantic::Ask::Ask(n) => ranked
                        .into_iter()
                        .take(n)
                        .map(|(id, s, digest)| (id, s.fused, digest))
                        .collect::<Vec<_>>(),
                }
            };
            let candidates: Vec<ask::Candidate> = candidates
                .into_iter()
                .map(|(id, score, digest)| ask::Candidate {
                    description: mesh
                        .card(&digest)
                        .and_then(|c| c.description.clone())
                        .unwrap_or_default(),
                    url: format!("http://{}.{}.dmsc/", id.name, id.tenant),
                    name: id.name,
                    score,
                })
                .collect();
            let names: Vec<String> = candidates.iter().map(|c| c.name.clone()).collect();
            let offered = names.clone();
            // Only an ask that can teach is remembered: an authenticated
            // caller of the tenant itself.
            let id = if authenticated && caller_tenant == tenant {
                lock(&intent.asks).remember(
                    tenant,
                    caller,
                    &learn::normalize(text),
                    names,
                    std::time::Instant::now(),
                )
            } else {
                ask::new_id()
            };
            // Any caller may answer in the ask's task: its request goes on
            // to the agent it names ([`followup`]).
            lock(&intent.followups).remember_ask(
                &followup::Scope::new(tenant, caller_tenant, caller),
                followup::AskRecord {
                    id: id.clone(),
                    text: if text.len() <= followup::MAX_ASK_TEXT {
                        text.clone()
                    } else {
                        String::new()
                    },
                    candidates: offered,
                },
                std::time::Instant::now(),
            );
            tracing::info!(tenant = %tenant, caller = %caller, ask = %id, candidates = candidates.len(), "intent unsure: asked the caller to choose");
            Err(ask::render(body, path, &id, text, &candidates))
        }
        // A call by name may resolve an ask: its text is learned once the
        // call succeeds ([`Intent::learn`]). Only a caller of the agent's
        // own tenant that proved who it is teaches that tenant's routing.
        dmsc_registry::Target::Agent(agent)
            if authenticated
                && caller_tenant == tenant
                && lock(&intent.asks).has(tenant, caller) =>
        {
            // the text an intent would be routed by: header, else body
            let text = header_text
                .map(str::to_string)
                .or_else(|| body.and_then(crate::proto::a2a::intent_text))
                .map(|t| learn::normalize(&t));
            let now = std::time::Instant::now();
            let lesson = lock(&intent.asks)
                .resolve(tenant, caller, agent, choice, text.as_deref(), now)
                .map(|text| Lesson {
                    tenant: tenant.to_string(),
                    agent: agent.clone(),
                    caller: caller.to_string(),
                    text,
                });
            Ok(Prepared {
                query: None,
                lesson,
            })
        }
        _ => Ok(Prepared::default()),
    }
}

/// What [`prepare`] found.
#[derive(Debug, Default)]
pub struct Prepared {
    /// The query's embedding, for an intent.
    pub query: Option<QueryVector>,
    /// A resolved ask, to learn if the call succeeds.
    pub lesson: Option<Lesson>,
}

/// An example to learn: `text` for `tenant/agent`, taught by `caller`.
#[derive(Debug, Clone)]
pub struct Lesson {
    pub tenant: String,
    pub agent: String,
    pub caller: String,
    pub text: String,
}

impl Intent {
    /// Learns a lesson (the call that resolved the ask succeeded).
    pub fn learn(&self, lesson: Lesson, mesh: &MeshView) {
        let Lesson {
            tenant,
            agent,
            caller,
            text,
        } = lesson;
        let r = lock(&self.learned).learn(
            &tenant,
            &agent,
            &text,
            &format!("{tenant}/{caller}"),
            std::time::Instant::now(),
        );
        match r {
            Ok(true) => {
                tracing::info!(tenant = %tenant, agent = %agent, caller = %caller, "learned an example from the caller's choice");
                self.save_learned();
                self.apply_learned(mesh);
                self.wake();
            }
            Ok(false) => {}
            Err(e) => tracing::info!(tenant = %tenant, agent = %agent, error = %e, "not learned"),
        }
    }
}

/// The request, as [`prepare`] needs it.
#[derive(Clone, Copy)]
pub struct Step<'a> {
    pub tenant: &'a str,
    pub caller: &'a str,
    pub caller_tenant: &'a str,
    /// The caller proved an identity (mTLS or JWT): only such callers teach.
    pub authenticated: bool,
    pub target: &'a dmsc_registry::Target,
    /// The buffered request body, if it was buffered.
    pub body: Option<&'a [u8]>,
    /// `dmsc-intent-mode`.
    pub mode: Option<&'a str>,
    /// `dmsc-intent-choice`.
    pub choice: Option<&'a str>,
    /// May the caller call this agent (name, skill tags) under the tenants'
    /// policies? Candidates of an ask are filtered with it.
    pub allowed: &'a (dyn Fn(&str, &[String]) -> bool + Sync),
    /// The request's path (an HTTP+JSON `/message:stream` gets an event stream).
    pub path: &'a str,
    /// `dmsc-intent`.
    pub header_text: Option<&'a str>,
    /// The request's A2A binding and version: only agents serving both
    /// are offered.
    pub speaks: dmsc_registry::Speaks<'a>,
}

/// Publishes this node's learned records and merges its peers' (every
/// gossip interval). Ends when the task is aborted with the node.
pub async fn learned_loop(
    intent: Arc<Intent>,
    mesh: Arc<MeshView>,
    gossip: Arc<dmsc_gossip::Gossip>,
    every: Duration,
) {
    let mut cursor: HashMap<String, (u64, u64)> = HashMap::new();
    let mut ticks: u64 = 0;
    loop {
        tokio::time::sleep(every).await;
        let dirty = lock(&intent.learned).take_dirty();
        if !dirty.is_empty() {
            intent.save_learned();
        }
        for (k, v) in dirty {
            gossip.set(&k, &v).await;
        }
        intent.flush_learned();
        let scan = gossip.scan_since(learn::KEY_PREFIX, &cursor).await;
        let mut changed = false;
        let mut alive = HashSet::new();
        for n in scan {
            let live = matches!(
                n.state,
                dmsc_gossip::MemberState::Alive | dmsc_gossip::MemberState::Suspect
            );
            if live {
                alive.insert(n.name.clone());
            }
            if let Some(values) = n.values.as_ref().filter(|_| live) {
                lock(&intent.learned).set_peer(&n.name, values);
                cursor.insert(n.name.clone(), (n.generation, n.version));
                changed = true;
            }
        }
        let gone: Vec<String> = cursor
            .keys()
            .filter(|n| !alive.contains(*n))
            .cloned()
            .collect();
        for n in gone {
            cursor.remove(&n);
            lock(&intent.learned).forget_peer(&n);
            changed = true;
        }
        if changed {
            intent.wake();
            intent.apply_learned(&mesh);
        } else if ticks.is_multiple_of(25) {
            // now and then, for agents that registered since
            intent.apply_learned(&mesh);
        }
        ticks += 1;
    }
}
