//! `dmsc-bench intent`: how often routing by intent picks the right agent.
//!
//! Reads labelled sets (`bench/intent/*.json`: a tenant's A2A cards and
//! queries, each with the agent a careful reader would pick and a style:
//! `near`, `paraphrase` or `indirect`), registers the cards in a
//! [`Registry`] exactly as the node does (record from the card, card text,
//! and, with a model, the embedded card pieces), and ranks every query.
//! Reports top-1 overall and per style for each scorer (lexical alone,
//! semantic alone, and hybrid at the configured fusion), ask-mode
//! precision and ask share, and decision latency (embedding the query plus
//! ranking; ranking alone for a repeated, cached query).
//!
//! The sets are the project's own development sets: they guide changes to
//! the scorer as a whole and are never tuned query by query; the gate is a
//! held-out set kept outside the project.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context as _};
use dmsc_registry::semantic::{card_texts, Ask};
use dmsc_registry::{AgentCard, AgentId, AgentRecord, CardVectors, Fusion, Health, Registry, Q8};
use serde::Deserialize;

#[derive(clap::Args, Debug, Clone)]
pub struct IntentArgs {
    /// Labelled sets (JSON); default: every file in bench/intent/.
    #[arg(long = "set")]
    pub sets: Vec<PathBuf>,
    /// Model directory (default: the installed one, see scripts/fetch-model.sh).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Keep the model's weights as exported (f32) instead of int8 (what the node does).
    #[arg(long)]
    pub f32: bool,
    /// Semantic weights to report besides lexical alone (1 = semantic alone).
    #[arg(long, value_delimiter = ',', default_value = "1,0.7")]
    pub weights: Vec<f32>,
    /// Print the queries the hybrid scorer (first weight below 1) gets wrong.
    #[arg(long)]
    pub misses: bool,
    /// Write every embedding and lexical ranking to this file (JSON lines),
    /// for offline analysis of scorers.
    #[arg(long)]
    pub dump: Option<PathBuf>,
    /// Also register this many agents (the sets' cards under new names,
    /// each with its own copy of the vectors) and report RSS and ranking
    /// latency at that size.
    #[arg(long, default_value_t = 0)]
    pub agents: usize,
    /// Which card pieces are embedded: `default` (what the node does:
    /// `dmsc_registry::semantic::card_texts`), or an experiment:
    /// `contextual` (each example prefixed with its skill's name),
    /// `no-examples`, `examples-only`.
    #[arg(long, default_value = "default")]
    pub pieces: String,
}

/// The pieces embedded for a card under an experiment (see `--pieces`).
fn pieces_of(card: &AgentCard, variant: &str) -> Vec<(dmsc_registry::Piece, String)> {
    use dmsc_registry::Piece;
    let base = card_texts(card);
    match variant {
        "contextual" => base
            .into_iter()
            .map(|(p, t)| match p {
                Piece::Example(i) => {
                    let skill = card
                        .skills
                        .get(usize::from(i))
                        .map(|s| s.name.as_str())
                        .unwrap_or("");
                    (p, format!("{skill}: {t}"))
                }
                _ => (p, t),
            })
            .collect(),
        "no-examples" => base
            .into_iter()
            .filter(|(p, _)| !matches!(p, Piece::Example(_)))
            .collect(),
        "examples-only" => base
            .into_iter()
            .filter(|(p, _)| matches!(p, Piece::Example(_)))
            .collect(),
        _ => base,
    }
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[derive(Deserialize)]
struct Set {
    name: String,
    tenant: String,
    agents: Vec<serde_json::Value>,
    queries: Vec<Query>,
}

#[derive(Deserialize)]
struct Query {
    text: String,
    agent: String,
    style: String,
}

const STYLES: [&str; 3] = ["near", "paraphrase", "indirect"];

#[derive(Default, Clone)]
struct Tally {
    total: [usize; 3],
    right: [usize; 3],
    /// Ask mode: routed (not asked) and right among those.
    routed: usize,
    routed_right: usize,
    asked: usize,
    /// Asked, and the right agent is among the candidates offered.
    asked_has_right: usize,
}

impl Tally {
    fn add(&mut self, style: usize, right: bool) {
        self.total[style] += 1;
        self.right[style] += usize::from(right);
    }
    fn pct(r: usize, t: usize) -> String {
        if t == 0 {
            "-".into()
        } else {
            format!("{:.1}", 100.0 * r as f64 / t as f64)
        }
    }
    fn row(&self, label: &str) -> String {
        let (r, t): (usize, usize) = (self.right.iter().sum(), self.total.iter().sum());
        format!(
            "| {label} | {} | {} | {} | {} | {} | {} | {} |",
            Self::pct(r, t),
            Self::pct(self.right[0], self.total[0]),
            Self::pct(self.right[1], self.total[1]),
            Self::pct(self.right[2], self.total[2]),
            Self::pct(self.routed_right, self.routed),
            Self::pct(self.asked, t),
            Self::pct(self.asked_has_right, self.asked),
        )
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

pub fn run(args: IntentArgs) -> anyhow::Result<()> {
    let sets = if args.sets.is_empty() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("intent");
        let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_context(|| format!("{}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        v.sort();
        v
    } else {
        args.sets.clone()
    };
    if sets.is_empty() {
        bail!("no sets");
    }
    let rss_start = rss_kb();
    let model_dir = args.model.clone().or_else(dmsc_embed::installed_model_dir);
    let model = match &model_dir {
        Some(d) => {
            let t = Instant::now();
            let precision = if args.f32 {
                dmsc_embed::Precision::F32
            } else {
                dmsc_embed::Precision::Int8
            };
            let m = dmsc_embed::Model::load_with(d, precision)?;
            eprintln!("model {} loaded in {:?}", d.display(), t.elapsed());
            Some(m)
        }
        None => {
            eprintln!("no model installed (scripts/fetch-model.sh): lexical only");
            None
        }
    };
    let rss_model = rss_kb();
    let mut weights = vec![0.0f32];
    // (tenant, card, vectors) of every card, for the scale run
    let mut seen: Vec<(String, AgentCard, Option<CardVectors>)> = Vec::new();
    if model.is_some() {
        weights.extend(args.weights.iter().copied().filter(|w| *w > 0.0));
    }
    let mut overall: Vec<Tally> = vec![Tally::default(); weights.len()];
    let mut embed_ms = Vec::new();
    let mut rank_us = Vec::new();
    println!("| set / scorer | top-1 % | near | paraphrase | indirect | ask: precision of routes | ask: share asked | ask: right one offered |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut dump = match &args.dump {
        Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p)?)),
        None => None,
    };
    for path in &sets {
        let set: Set = serde_json::from_slice(&std::fs::read(path)?)
            .with_context(|| format!("{}", path.display()))?;
        let mut reg = Registry::new();
        for raw in &set.agents {
            let card = AgentCard::parse(raw.to_string().as_bytes())
                .map_err(|e| anyhow::anyhow!("{}: card: {e}", set.name))?;
            let id = AgentId::new(set.tenant.clone(), card.name.clone());
            let record = AgentRecord::from_card(&card, Health::Healthy, u64::MAX);
            let digest = record.digest.clone();
            reg.upsert("n1", id.clone(), record);
            reg.set_card(&id, &card);
            if let Some(m) = &model {
                let mut pieces = Vec::new();
                for (piece, text) in pieces_of(&card, args.pieces.as_str()) {
                    let v = m.embed(&text)?.vector;
                    if let Some(d) = dump.as_mut() {
                        use std::io::Write as _;
                        let j = serde_json::json!({"set": set.name, "agent": card.name,
                            "piece": format!("{piece:?}"), "text": text, "v": v});
                        writeln!(d, "{j}")?;
                    }
                    pieces.push((piece, v));
                }
                let v = CardVectors::new(pieces);
                seen.push((set.tenant.clone(), card.clone(), Some(v.clone())));
                reg.set_vectors(&id, &digest, Arc::new(v));
            } else {
                seen.push((set.tenant.clone(), card.clone(), None));
            }
        }
        let mut tallies: Vec<Tally> = vec![Tally::default(); weights.len()];
        for q in &set.queries {
            let Some(style) = STYLES.iter().position(|s| *s == q.style) else {
                bail!("{}: unknown style {}", set.name, q.style);
            };
            let t = Instant::now();
            let qv = match &model {
                Some(m) => Some(Q8::from_f32(&m.embed(&q.text)?.vector)),
                None => None,
            };
            let embedded = t.elapsed();
            if let (Some(d), Some(m)) = (dump.as_mut(), &model) {
                use std::io::Write as _;
                reg.set_fusion(Fusion {
                    semantic_weight: 0.0,
                    ..Fusion::default()
                });
                let lex: Vec<(String, f32)> = reg
                    .rank_intent(&set.tenant, &q.text, None)
                    .into_iter()
                    .map(|(id, s)| (id.name, s.lexical))
                    .collect();
                let clauses: Vec<Vec<f32>> = q
                    .text
                    .split(['.', ',', ';', '!', '?', ':'])
                    .filter(|c| c.split_whitespace().count() >= 2)
                    .map(|c| m.embed(c).map(|e| e.vector))
                    .collect::<Result<_, _>>()?;
                let j = serde_json::json!({"set": set.name, "query": q.text, "want": q.agent,
                    "style": q.style, "v": m.embed(&q.text)?.vector, "lex": lex, "clauses": clauses});
                writeln!(d, "{j}")?;
            }
            for (i, &w) in weights.iter().enumerate() {
                reg.set_fusion(Fusion {
                    semantic_weight: w,
                    ..Fusion::default()
                });
                let t = Instant::now();
                let ranked = reg.rank_intent(&set.tenant, &q.text, qv.as_ref());
                let ranking = t.elapsed();
                if i == weights.len() - 1 {
                    embed_ms.push((embedded + ranking).as_secs_f64() * 1e3);
                    rank_us.push(ranking.as_secs_f64() * 1e6);
                }
                let top = ranked.first().map(|(id, _)| id.name.as_str());
                let right = top == Some(q.agent.as_str());
                let tally = &mut tallies[i];
                tally.add(style, right);
                match Ask::decide(&ranked.iter().map(|(_, s)| *s).collect::<Vec<_>>()) {
                    Ask::Route => {
                        tally.routed += 1;
                        tally.routed_right += usize::from(right);
                    }
                    Ask::Ask(n) => {
                        tally.asked += 1;
                        let offered = ranked.iter().take(n).any(|(id, _)| id.name == q.agent);
                        tally.asked_has_right += usize::from(offered);
                    }
                }
                if args.misses && !right && i == 1.min(weights.len() - 1) {
                    let top3: Vec<String> = ranked
                        .iter()
                        .take(3)
                        .map(|(id, s)| format!("{} {:.2}", id.name, s.fused))
                        .collect();
                    eprintln!(
                        "miss [{}] {:?} -> want {}, got {}",
                        q.style,
                        q.text,
                        q.agent,
                        top3.join(", ")
                    );
                }
            }
        }
        for (i, t) in tallies.iter().enumerate() {
            println!(
                "{}",
                t.row(&format!("{} / {}", set.name, label(weights[i])))
            );
            let o = &mut overall[i];
            for s in 0..3 {
                o.total[s] += t.total[s];
                o.right[s] += t.right[s];
            }
            o.routed += t.routed;
            o.routed_right += t.routed_right;
            o.asked += t.asked;
            o.asked_has_right += t.asked_has_right;
        }
    }
    if let (Some(d), Some(m)) = (dump.as_mut(), &model) {
        use std::io::Write as _;
        // every word of every set, for word-level experiments
        let mut words = std::collections::BTreeSet::new();
        for path in &sets {
            let text = std::fs::read_to_string(path)?;
            let v: serde_json::Value = serde_json::from_str(&text)?;
            let mut stack = vec![&v];
            while let Some(x) = stack.pop() {
                match x {
                    serde_json::Value::String(s) => {
                        for w in s.split(|c: char| !c.is_alphanumeric()) {
                            if w.len() > 1 {
                                words.insert(w.to_lowercase());
                            }
                        }
                    }
                    serde_json::Value::Array(a) => stack.extend(a.iter()),
                    serde_json::Value::Object(o) => stack.extend(o.values()),
                    _ => {}
                }
            }
        }
        for w in words {
            let j = serde_json::json!({"word": w, "v": m.embed(&w)?.vector});
            writeln!(d, "{j}")?;
        }
    }
    for (i, t) in overall.iter().enumerate() {
        println!("{}", t.row(&format!("**all** / {}", label(weights[i]))));
    }
    if args.agents > 0 && !seen.is_empty() {
        scale(&args, &seen, model.as_ref(), rss_start, rss_model)?;
    }
    if model.is_some() {
        println!(
            "\ndecision (embed query + rank, uncached): p50 {:.1} ms, p99 {:.1} ms; rank alone (a cached query): p50 {:.0} us, p99 {:.0} us",
            percentile(&mut embed_ms.clone(), 0.5),
            percentile(&mut embed_ms, 0.99),
            percentile(&mut rank_us.clone(), 0.5),
            percentile(&mut rank_us, 0.99),
        );
    }
    Ok(())
}

fn label(w: f32) -> String {
    if w == 0.0 {
        "lexical".into()
    } else if w >= 1.0 {
        "semantic".into()
    } else {
        format!("hybrid w={w}")
    }
}

/// Registers `args.agents` agents and reports RSS and ranking latency.
fn scale(
    args: &IntentArgs,
    seen: &[(String, AgentCard, Option<CardVectors>)],
    model: Option<&dmsc_embed::Model>,
    rss_start: u64,
    rss_model: u64,
) -> anyhow::Result<()> {
    let mut reg = Registry::new();
    let before = rss_kb();
    for i in 0..args.agents {
        let (tenant, card, vectors) = &seen[i % seen.len()];
        let mut card = card.clone();
        card.name = format!("{}-{i}", card.name);
        let id = AgentId::new(tenant.clone(), card.name.clone());
        let record = AgentRecord::from_card(&card, Health::Healthy, u64::MAX);
        let digest = record.digest.clone();
        reg.upsert("n1", id.clone(), record);
        reg.set_card(&id, &card);
        if let Some(v) = vectors {
            // a copy per agent: distinct cards do not share vectors
            reg.set_vectors(&id, &digest, Arc::new(v.clone()));
        }
    }
    let after = rss_kb();
    let tenant = &seen[0].0;
    let q = "my paycheck was smaller than it should be this month";
    let qv = match model {
        Some(m) => Some(Q8::from_f32(&m.embed(q)?.vector)),
        None => None,
    };
    let mut us = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let r = reg.rank_intent(tenant, q, qv.as_ref());
        us.push(t.elapsed().as_secs_f64() * 1e6);
        std::hint::black_box(r);
    }
    let n = args.agents;
    let per_tenant = n * seen.iter().filter(|s| &s.0 == tenant).count() / seen.len();
    println!(
        "\nscale: RSS {:.1} MB at start, {:.1} MB with the model (+{:.1}), {:.1} MB with {n} agents (+{:.1} for the agents, cards and vectors); ranking one query over {per_tenant} agents of one tenant: p50 {:.0} us, p99 {:.0} us",
        rss_start as f64 / 1024.0,
        rss_model as f64 / 1024.0,
        (rss_model.saturating_sub(rss_start)) as f64 / 1024.0,
        after as f64 / 1024.0,
        (after.saturating_sub(before)) as f64 / 1024.0,
        percentile(&mut us.clone(), 0.5),
        percentile(&mut us, 0.99),
    );
    Ok(())
}
