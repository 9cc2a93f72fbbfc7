//! Selection cost at 10k and 100k registered agents: by tag (small sets,
//! scanned), by tag (~100-member sets, sampled), by name, and by intent (10k).
//! After criterion's means, prints p50/p99/max of 100k individually timed
//! decisions per case, since the node cares about the tail; then what
//! building one tenant's intent index on demand costs.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion};
use dmsc_registry::{
    AgentId, AgentRecord, Health, LoadReport, NoLocal, Registry, SkillTags, Target,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TENANTS: usize = 100;
const TAGS: usize = 1000;
const WORDS: &[&str] = &[
    "invoice",
    "billing",
    "summary",
    "translation",
    "weather",
    "forecast",
    "ocr",
    "receipt",
    "contract",
    "legal",
    "review",
    "code",
    "search",
    "image",
    "audio",
    "transcription",
    "email",
    "calendar",
    "travel",
    "booking",
    "payment",
    "refund",
    "fraud",
    "risk",
    "report",
    "chart",
    "sql",
    "database",
    "ticket",
    "support",
    "sales",
    "lead",
    "crm",
    "inventory",
    "shipping",
    "customs",
    "tax",
    "payroll",
    "hiring",
    "resume",
    "policy",
    "compliance",
    "audit",
    "security",
    "incident",
    "alert",
    "log",
    "metric",
    "trace",
    "deploy",
];

fn tag(j: usize) -> String {
    // 1000 distinct two-word tags over a 50-word vocabulary
    format!("{}-{}", WORDS[j % 50], WORDS[(j / 50 + j % 7) % 50])
}

struct World {
    reg: Registry,
    /// (tenant number, tag number) pairs that exist, with few members each
    small: Vec<(usize, usize)>,
    /// number of every agent (its tenant is `i % TENANTS`)
    n: usize,
    /// `pool-<k>` tags: every agent has one, ~100 agents per tenant and pool
    pools: usize,
}

fn world(n: usize) -> World {
    let mut rng = StdRng::seed_from_u64(42);
    let mut reg = Registry::new();
    let mut small = Vec::new();
    let pools = (n / TENANTS / 100).max(1);
    for i in 0..n {
        let tenant = format!("tenant-{}", i % TENANTS);
        let name = format!("agent-{i}");
        let picks: Vec<usize> = (0..3).map(|_| rng.gen_range(0..TAGS)).collect();
        let tags: Vec<String> = picks
            .iter()
            .map(|&j| tag(j))
            .chain([format!("pool-{}", (i / TENANTS) % pools)])
            .collect();
        if i % 7 == 0 {
            small.push((i % TENANTS, picks[0]));
        }
        let rec = AgentRecord {
            digest: format!("{i:064x}"),
            skills: vec![SkillTags {
                id: format!("skill-{i}"),
                name: tags[..3].join(" "),
                tags,
            }],
            protocols: vec!["JSONRPC".into()],
            a2a: Vec::new(),
            // 10% unhealthy, spread over tenants and pools
            health: if (i / TENANTS / 10) % 10 == 9 {
                Health::Unhealthy
            } else {
                Health::Healthy
            },
            expires_ms: u64::MAX,
        };
        let id = AgentId::new(tenant, name);
        reg.upsert(&format!("node-{}", i % 30), id.clone(), rec);
        reg.set_load(
            &id,
            LoadReport {
                in_flight: rng.gen_range(0..20),
                queue: rng.gen_range(0..5),
                ewma_ms: rng.gen_range(5.0..200.0),
                error_rate: rng.gen_range(0.0..0.1),
                cpu: 0.5,
            },
        );
    }
    World {
        reg,
        small,
        n,
        pools,
    }
}

#[derive(Clone, Copy)]
enum Case {
    TagSmall,
    TagPool,
    Name,
    Intent,
}

/// The request's strings, rebuilt in place for every decision: in the node
/// they were just parsed from the request and are hot in cache, so the
/// harness should add neither cache misses of its own nor allocations.
struct Scratch {
    tenant: String,
    agent: Target,
    tag: Target,
    intent: Target,
}

impl Scratch {
    fn new() -> Scratch {
        let s = || String::with_capacity(128);
        Scratch {
            tenant: String::with_capacity(32),
            agent: Target::Agent(s()),
            tag: Target::Tag(s()),
            intent: Target::Intent(s()),
        }
    }
}

fn text(t: &mut Target) -> &mut String {
    match t {
        Target::Agent(s) | Target::Tag(s) | Target::Intent(s) => {
            s.clear();
            s
        }
    }
}

/// Length of the answer's text (so nothing is optimised away), and whether
/// an agent was selected.
fn decide(w: &World, case: Case, i: usize, sc: &mut Scratch, rng: &mut StdRng) -> (usize, bool) {
    use std::fmt::Write;
    // spread the queries over the whole registry (no locality)
    let k = i.wrapping_mul(7919);
    let (tenant_no, target) = match case {
        Case::TagSmall => {
            let (t, g) = w.small[k % w.small.len()];
            let _ = write!(
                text(&mut sc.tag),
                "{}-{}",
                WORDS[g % 50],
                WORDS[(g / 50 + g % 7) % 50]
            );
            (t, &sc.tag)
        }
        Case::TagPool => {
            let _ = write!(text(&mut sc.tag), "pool-{}", (k / TENANTS) % w.pools);
            (k % TENANTS, &sc.tag)
        }
        Case::Name => {
            let a = k % w.n;
            let _ = write!(text(&mut sc.agent), "agent-{a}");
            (a % TENANTS, &sc.agent)
        }
        Case::Intent => {
            let _ = write!(
                text(&mut sc.intent),
                "please {} the {} {}",
                WORDS[i % 50],
                WORDS[(i / 3) % 50],
                WORDS[(i / 7) % 50]
            );
            (k % TENANTS, &sc.intent)
        }
    };
    sc.tenant.clear();
    let _ = write!(sc.tenant, "tenant-{tenant_no}");
    match w.reg.select(&sc.tenant, target, &NoLocal, &[], rng) {
        Ok(s) => (s.why.len(), true),
        Err(e) => (e.to_string().len(), false),
    }
}

fn label(case: Case) -> &'static str {
    match case {
        Case::TagSmall => "tag (scanned, ~1-3 members)",
        Case::TagPool => "tag (sampled, ~100 members)",
        Case::Name => "name",
        Case::Intent => "intent",
    }
}

fn cases(n: usize) -> Vec<Case> {
    if n <= 10_000 {
        vec![Case::TagSmall, Case::TagPool, Case::Name, Case::Intent]
    } else {
        vec![Case::TagSmall, Case::TagPool, Case::Name]
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("select");
    for n in [10_000, 100_000] {
        let w = world(n);
        for case in cases(n) {
            let mut rng = StdRng::seed_from_u64(7);
            let mut sc = Scratch::new();
            let mut i = 0usize;
            g.bench_with_input(BenchmarkId::new(label(case), n), &n, |b, _| {
                b.iter(|| {
                    i += 1;
                    black_box(decide(&w, case, i, &mut sc, &mut rng))
                })
            });
        }
    }
    g.finish();
}

fn percentiles() {
    println!(
        "\nper-decision latency, 100k individually timed decisions (Instant overhead included)"
    );
    println!("| agents | target | p50 | p99 | max | selected |");
    println!("|---|---|---|---|---|---|");
    for n in [10_000, 100_000] {
        let w = world(n);
        for case in cases(n) {
            let mut rng = StdRng::seed_from_u64(9);
            let mut sc = Scratch::new();
            for i in 0..10_000 {
                black_box(decide(&w, case, i, &mut sc, &mut rng)); // warm up
            }
            let mut ok = 0usize;
            let mut t: Vec<Duration> = (0..100_000)
                .map(|i| {
                    let s = Instant::now();
                    let r = black_box(decide(&w, case, i, &mut sc, &mut rng));
                    let d = s.elapsed();
                    ok += usize::from(r.1);
                    d
                })
                .collect();
            t.sort();
            let p = |q: f64| t[((t.len() as f64 * q) as usize).min(t.len() - 1)];
            println!(
                "| {n} | {} | {:.2} us | {:.2} us | {:.1} us | {:.1}% |",
                label(case),
                p(0.50).as_secs_f64() * 1e6,
                p(0.99).as_secs_f64() * 1e6,
                t[t.len() - 1].as_secs_f64() * 1e6,
                ok as f64 / 1000.0
            );
        }
    }
}

/// A node builds a tenant's lexical intent index at that tenant's first
/// intent request (`Registry::index_intent_on_demand`): what that costs.
fn on_demand() {
    println!("\nbuilding one tenant's intent index on demand (median of 5 tenants)");
    println!("| agents | agents in the tenant | build |");
    println!("|---|---|---|");
    for n in [10_000, 100_000] {
        let mut w = world(n);
        w.reg.index_intent_on_demand();
        let mut t: Vec<Duration> = (0..5)
            .map(|i| {
                let s = Instant::now();
                w.reg.index_intent(&format!("tenant-{i}"));
                s.elapsed()
            })
            .collect();
        t.sort();
        println!(
            "| {n} | {} | {:.2} ms |",
            n / TENANTS,
            t[2].as_secs_f64() * 1e3
        );
    }
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    percentiles();
    on_demand();
}
