//! `dmsc-bench balance`: how well does the registry's selection spread load?
//!
//! A deterministic discrete-event simulation (seeded, virtual time in
//! nanoseconds, no tokio): a pool of agents of which some are slower, each
//! serving up to `--concurrency` requests at once with a FIFO queue beyond;
//! several client nodes receive Poisson arrivals (total rate `--load` times
//! the pool's capacity) and pick an agent per request. Every policy runs on
//! the same arrivals and the same per-request work draws (service time =
//! work x the agent's mean), so differences come from the choices alone.
//!
//! Policies:
//! - `dmsc P2C`: `Registry::select` by tag, as the node calls it, with
//!   `Choice::PowerOfTwo`. Each node has its own registry whose load
//!   reports are refreshed from the agents' true state every `--gossip-ms`
//!   (nodes offset evenly, so views are up to one round stale), plus a
//!   `LocalState` with the node's exact outstanding count per agent.
//! - `dmsc least-loaded`: the same with `Choice::LeastLoaded` (the
//!   default since this comparison: BENCHMARKS.md).
//! - `round-robin`: per node, in turn. `random`: uniform.
//! - `oracle`: knows every agent's true busy and queue counts and mean
//!   service time, and joins the minimum expected response time. Not
//!   realisable in a mesh; the yardstick.
//!
//! Latency is arrival to completion (no network time, which would be the
//! same for every policy).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};

use anyhow::Context;
use dmsc_registry::{
    AgentId, AgentRecord, Choice, Health, LoadReport, LocalState, Registry, SkillTags, Target,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Agents in the pool.
    #[arg(long, default_value_t = 10)]
    pub agents: usize,
    /// How many of them are slow.
    #[arg(long, default_value_t = 3)]
    pub slow: usize,
    /// Mean service time of a fast agent (exponential), ms.
    #[arg(long, default_value_t = 10.0)]
    pub fast_ms: f64,
    /// A slow agent's mean service time is this many times the fast one.
    #[arg(long, default_value_t = 5.0)]
    pub slow_factor: f64,
    /// Requests an agent serves at once; more wait in its FIFO queue.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Client nodes choosing agents.
    #[arg(long, default_value_t = 4)]
    pub nodes: usize,
    /// Offered load as a fraction of the pool's capacity.
    #[arg(long, default_value_t = 0.7)]
    pub load: f64,
    #[arg(long, default_value_t = 200_000)]
    pub requests: usize,
    /// Period of the gossiped load snapshot each node sees.
    #[arg(long, default_value_t = 200)]
    pub gossip_ms: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    Dmsc,
    DmscLeast,
    RoundRobin,
    Random,
    Oracle,
}

impl Policy {
    fn name(self) -> &'static str {
        match self {
            Policy::Dmsc => "dmsc P2C",
            Policy::DmscLeast => "dmsc least-loaded (default)",
            Policy::RoundRobin => "round-robin",
            Policy::Random => "random",
            Policy::Oracle => "oracle",
        }
    }
}

const NS_PER_MS: f64 = 1e6;
const TENANT: &str = "sim";
const TAG: &str = "work";
/// EWMA weight of one new service-time sample.
const ALPHA: f64 = 0.1;

/// The same arrivals for every policy.
struct Workload {
    /// (arrival time ns, node, work as a multiple of the agent's mean), by time.
    requests: Vec<(u64, usize, f64)>,
    means_ms: Vec<f64>,
    rate_per_s: f64,
}

fn workload(a: &Args) -> Workload {
    let mut rng = StdRng::seed_from_u64(a.seed);
    // the slow ones are spread out (0, 3, 6 of 10), not the first few
    let slow: Vec<usize> = (0..a.slow).map(|k| k * a.agents / a.slow.max(1)).collect();
    let means_ms: Vec<f64> = (0..a.agents)
        .map(|i| {
            a.fast_ms
                * if slow.contains(&i) {
                    a.slow_factor
                } else {
                    1.0
                }
        })
        .collect();
    let capacity_per_ms: f64 = means_ms.iter().map(|m| a.concurrency as f64 / m).sum();
    let rate_per_ms = a.load * capacity_per_ms;
    let mut t = 0.0f64;
    let requests = (0..a.requests)
        .map(|_| {
            t += exp1(&mut rng) / rate_per_ms;
            let node = rng.gen_range(0..a.nodes);
            ((t * NS_PER_MS) as u64, node, exp1(&mut rng))
        })
        .collect();
    Workload {
        requests,
        means_ms,
        rate_per_s: rate_per_ms * 1000.0,
    }
}

/// An exponential draw with mean 1.
fn exp1(rng: &mut StdRng) -> f64 {
    let u: f64 = rng.gen_range(f64::EPSILON..1.0);
    -u.ln()
}

struct Agent {
    mean_ms: f64,
    busy: usize,
    queue: VecDeque<usize>,
    ewma_ms: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// Request `req` finished at agent `agent`.
    Done { agent: usize, req: usize },
    /// Node `node` refreshes its gossiped view.
    Gossip { node: usize },
}

/// A node's own in-flight counts, as the node's `LocalState`.
struct NodeLocal<'a> {
    index: &'a HashMap<AgentId, usize>,
    outstanding: &'a [u32],
}

impl LocalState for NodeLocal<'_> {
    fn outstanding(&self, id: &AgentId) -> u32 {
        self.index
            .get(id)
            .and_then(|&i| self.outstanding.get(i))
            .copied()
            .unwrap_or(0)
    }
    fn admits(&self, _: &AgentId, _: &str) -> bool {
        true
    }
}

struct Outcome {
    policy: Policy,
    latencies_ms: Vec<f64>,
}

fn agent_id(i: usize) -> AgentId {
    AgentId::new(TENANT, format!("a{i}"))
}

fn simulate(a: &Args, w: &Workload, policy: Policy) -> anyhow::Result<Outcome> {
    let n = a.agents;
    let mut rng = StdRng::seed_from_u64(a.seed ^ 0x5eed_0000 ^ policy as u64);
    let mut agents: Vec<Agent> = w
        .means_ms
        .iter()
        .map(|&m| Agent {
            mean_ms: m,
            busy: 0,
            queue: VecDeque::new(),
            ewma_ms: 0.0,
        })
        .collect();
    let index: HashMap<AgentId, usize> = (0..n).map(|i| (agent_id(i), i)).collect();
    let mut registries: Vec<Registry> = (0..a.nodes)
        .map(|_| {
            let mut r = Registry::new();
            r.set_choice(if policy == Policy::DmscLeast {
                Choice::LeastLoaded
            } else {
                Choice::PowerOfTwo
            });
            for i in 0..n {
                r.upsert(
                    &format!("agent-host-{i}"),
                    agent_id(i),
                    AgentRecord {
                        digest: String::new(),
                        skills: vec![SkillTags {
                            id: "work".into(),
                            name: "Work".into(),
                            tags: vec![TAG.into()],
                        }],
                        protocols: vec!["JSONRPC".into()],
                        a2a: Vec::new(),
                        health: Health::Healthy,
                        expires_ms: u64::MAX,
                    },
                );
            }
            r
        })
        .collect();
    let mut outstanding = vec![vec![0u32; n]; a.nodes];
    let mut rr: Vec<usize> = (0..a.nodes).collect();
    let mut heap: BinaryHeap<Reverse<(u64, u64, Ev)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let gossip_ns = a.gossip_ms.max(1) * 1_000_000;
    if matches!(policy, Policy::Dmsc | Policy::DmscLeast) {
        for node in 0..a.nodes {
            let offset = gossip_ns * node as u64 / a.nodes as u64;
            heap.push(Reverse((offset, seq, Ev::Gossip { node })));
            seq += 1;
        }
    }
    let mut latencies = Vec::with_capacity(w.requests.len());
    let target = Target::Tag(TAG.into());
    let mut next = 0usize;
    let mut pending = w.requests.len();

    let start = |agents: &mut Vec<Agent>,
                 heap: &mut BinaryHeap<Reverse<(u64, u64, Ev)>>,
                 seq: &mut u64,
                 now: u64,
                 agent: usize,
                 req: usize| {
        let ag = &mut agents[agent];
        ag.busy += 1;
        let service = w.requests[req].2 * ag.mean_ms;
        heap.push(Reverse((
            now + (service * NS_PER_MS) as u64,
            *seq,
            Ev::Done { agent, req },
        )));
        *seq += 1;
    };

    while pending > 0 {
        let arrival = w.requests.get(next).map(|r| r.0);
        let event = heap.peek().map(|Reverse((t, _, _))| *t);
        let take_arrival = match (arrival, event) {
            (Some(ta), Some(te)) => ta <= te,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        if take_arrival {
            let req = next;
            next += 1;
            let (now, node, _) = w.requests[req];
            let agent = match policy {
                Policy::Dmsc | Policy::DmscLeast => {
                    let local = NodeLocal {
                        index: &index,
                        outstanding: &outstanding[node],
                    };
                    let sel = registries[node]
                        .select(TENANT, &target, &local, &[], &mut rng)
                        .context("dmsc selection")?;
                    *index
                        .get(&sel.id)
                        .context("selected agent is in the pool")?
                }
                Policy::RoundRobin => {
                    rr[node] = (rr[node] + 1) % n;
                    rr[node]
                }
                Policy::Random => rng.gen_range(0..n),
                Policy::Oracle => {
                    let c = a.concurrency as f64;
                    let expected = |ag: &Agent| {
                        let ahead = (ag.busy + ag.queue.len() + 1).saturating_sub(a.concurrency);
                        ag.mean_ms * (1.0 + ahead as f64 / c)
                    };
                    (0..n)
                        .min_by(|&x, &y| expected(&agents[x]).total_cmp(&expected(&agents[y])))
                        .unwrap_or(0)
                }
            };
            outstanding[node][agent] += 1;
            if agents[agent].busy < a.concurrency {
                start(&mut agents, &mut heap, &mut seq, now, agent, req);
            } else {
                agents[agent].queue.push_back(req);
            }
            continue;
        }
        let Some(Reverse((now, _, ev))) = heap.pop() else {
            break;
        };
        match ev {
            Ev::Done { agent, req } => {
                let (arrived, node, work) = w.requests[req];
                let ag = &mut agents[agent];
                ag.busy -= 1;
                let service_ms = work * ag.mean_ms;
                ag.ewma_ms = if ag.ewma_ms == 0.0 {
                    service_ms
                } else {
                    ag.ewma_ms + ALPHA * (service_ms - ag.ewma_ms)
                };
                outstanding[node][agent] -= 1;
                latencies.push((now - arrived) as f64 / NS_PER_MS);
                pending -= 1;
                if let Some(q) = agents[agent].queue.pop_front() {
                    start(&mut agents, &mut heap, &mut seq, now, agent, q);
                }
            }
            Ev::Gossip { node } => {
                for (i, ag) in agents.iter().enumerate() {
                    registries[node].set_load(
                        &agent_id(i),
                        LoadReport {
                            in_flight: ag.busy as u32,
                            queue: ag.queue.len() as u32,
                            ewma_ms: ag.ewma_ms as f32,
                            error_rate: 0.0,
                            cpu: 0.0,
                        },
                    );
                }
                if pending > 0 {
                    heap.push(Reverse((now + gossip_ns, seq, Ev::Gossip { node })));
                    seq += 1;
                }
            }
        }
    }
    Ok(Outcome {
        policy,
        latencies_ms: latencies,
    })
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.agents >= 1, "--agents must be at least 1");
    anyhow::ensure!(a.slow <= a.agents, "--slow must not exceed --agents");
    anyhow::ensure!(a.nodes >= 1, "--nodes must be at least 1");
    anyhow::ensure!(a.concurrency >= 1, "--concurrency must be at least 1");
    anyhow::ensure!(
        a.load > 0.0 && a.load < 1.0,
        "--load must be within (0, 1): at or above capacity queues grow without bound"
    );
    anyhow::ensure!(
        a.fast_ms > 0.0 && a.slow_factor > 0.0,
        "service times must be positive"
    );
    let w = workload(&a);
    let mut rows = Vec::new();
    for p in [
        Policy::Dmsc,
        Policy::DmscLeast,
        Policy::RoundRobin,
        Policy::Random,
        Policy::Oracle,
    ] {
        let mut o = simulate(&a, &w, p)?;
        o.latencies_ms.sort_by(f64::total_cmp);
        rows.push(o);
    }
    let oracle_p99 = rows
        .iter()
        .find(|o| o.policy == Policy::Oracle)
        .map_or(f64::NAN, |o| pct(&o.latencies_ms, 0.99));
    println!(
        "balance: {} agents ({} slow at {}x, fast mean {} ms, exponential), concurrency {}, {} nodes, \
         load {:.0}% of capacity ({:.0} req/s), {} requests, gossip every {} ms, seed {}",
        a.agents,
        a.slow,
        a.slow_factor,
        a.fast_ms,
        a.concurrency,
        a.nodes,
        a.load * 100.0,
        w.rate_per_s,
        a.requests,
        a.gossip_ms,
        a.seed
    );
    println!("| policy | completed | mean ms | p50 ms | p99 ms | max ms | p99 / oracle p99 |");
    println!("|---|---|---|---|---|---|---|");
    for o in &rows {
        let l = &o.latencies_ms;
        let mean = l.iter().sum::<f64>() / l.len().max(1) as f64;
        let p99 = pct(l, 0.99);
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |",
            o.policy.name(),
            l.len(),
            mean,
            pct(l, 0.50),
            p99,
            l.last().copied().unwrap_or(f64::NAN),
            p99 / oracle_p99
        );
    }
    let share_per_ms = w.rate_per_s / 1000.0 / a.agents as f64;
    let overloaded = w
        .means_ms
        .iter()
        .filter(|m| share_per_ms > a.concurrency as f64 / **m)
        .count();
    if overloaded > 0 {
        println!(
            "note: an even split sends {:.0} req/s to each agent, more than {overloaded} of the agents can serve; \
             under round-robin and random their queues grow for the whole run, so those rows grow with --requests",
            share_per_ms * 1000.0
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> Args {
        Args {
            agents: 10,
            slow: 3,
            fast_ms: 10.0,
            slow_factor: 5.0,
            concurrency: 4,
            nodes: 4,
            load: 0.7,
            requests: 20_000,
            gossip_ms: 200,
            seed: 7,
        }
    }

    #[test]
    fn deterministic_and_complete() {
        let a = args();
        let w = workload(&a);
        assert_eq!(
            w.means_ms.iter().filter(|m| **m > 10.0).count(),
            3,
            "{:?}",
            w.means_ms
        );
        let x = simulate(&a, &w, Policy::Dmsc).expect("sim");
        let y = simulate(&a, &w, Policy::Dmsc).expect("sim");
        assert_eq!(x.latencies_ms.len(), a.requests);
        assert_eq!(x.latencies_ms, y.latencies_ms);
    }

    #[test]
    fn dmsc_beats_random_and_oracle_beats_all() {
        let a = args();
        let w = workload(&a);
        let p99 = |p| {
            let mut o = simulate(&a, &w, p).expect("sim");
            o.latencies_ms.sort_by(f64::total_cmp);
            pct(&o.latencies_ms, 0.99)
        };
        let (d, r, o) = (p99(Policy::Dmsc), p99(Policy::Random), p99(Policy::Oracle));
        assert!(d < r, "dmsc {d} vs random {r}");
        assert!(o <= d, "oracle {o} vs dmsc {d}");
    }
}
