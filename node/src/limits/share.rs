//! A node's share of a tenant's mesh-wide limit, from the demand each node
//! publishes in gossip (`usage/<tenant>`). Pure arithmetic on values.
//!
//! Each node takes `fraction = max(floor, mine / total)` of the tenant's
//! rate, burst and concurrency, where `mine` is this node's own (fresh)
//! demand and `total` adds every other live node's published demand. The
//! floor, `FLOOR_SLACK / live nodes`, lets an idle node admit its first
//! requests at once; summed over all nodes the floors add at most
//! `FLOOR_SLACK` (0.2) to the proportional parts, which sum to 1: when the
//! nodes' views agree, the mesh admits at most 1.2x the limit (plus the
//! shared burst). Views disagree for about a gossip round after demand
//! moves; the excess of that moment is what the slack of the 10 s bound
//! absorbs.
//!
//! A node that has just started seeing a tenant's traffic does not yet know
//! whether the other nodes do too (their values may still be on the way),
//! so for a warm-up of three gossip rounds it counts each live node that published nothing as
//! having its own demand: a spray that starts on every node at once is
//! split evenly from the first request instead of every node taking the
//! whole limit until gossip catches up; a node that published zero (idle
//! a round ago) counts as silent too. After the warm-up, no value means no
//! demand. A node coming out of an idle spell counts its own fresh demand,
//! not the zero it published (that would hold it at the floor, refusing a
//! burst with a wait of seconds, until its next round), and while its
//! share is provisional a refusal's `Retry-After` is at most the warm-up
//! left.

use std::time::Duration;

/// The share of the limit the floors may add up to across the mesh.
pub const FLOOR_SLACK: f64 = 0.2;
/// How long a node that starts seeing a tenant assumes silent peers have
/// its demand, unless the node sets it from its gossip interval (three
/// rounds, [`super::warmup`]).
pub const WARMUP: Duration = Duration::from_secs(3);

/// What a node knows when it computes its share.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct View {
    /// This node's own demand (requests a second, admitted and refused).
    pub mine: f64,
    /// The sum of the demands other live nodes published.
    pub others: f64,
    /// Live nodes in the mesh, this one included (at least 1).
    pub live: usize,
    /// Other live nodes that published a demand above zero for this
    /// tenant (a published zero is an idle spell's, stale once traffic
    /// starts: counted as silent).
    pub published: usize,
    /// Whether this node is within its warm-up for this tenant.
    pub warming: bool,
}

/// The fraction of the tenant's limit this node enforces, in `(0, 1]`.
pub fn fraction(v: View) -> f64 {
    let live = v.live.max(1);
    if live == 1 {
        return 1.0;
    }
    let floor = FLOOR_SLACK / live as f64;
    let silent = (live - 1).saturating_sub(v.published);
    let assumed = if v.warming {
        silent as f64 * v.mine
    } else {
        0.0
    };
    let total = v.mine + v.others.max(0.0) + assumed;
    if v.mine <= 0.0 || total <= 0.0 {
        return floor;
    }
    (v.mine / total).clamp(floor, 1.0)
}

/// A limit's local values for a fraction: rate, bucket size, and
/// concurrency (each at least what admits one request).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Local {
    pub per_sec: f64,
    pub burst: f64,
    pub concurrent: Option<u32>,
}

/// The part of `(per_sec, burst, concurrent)` a node enforces at `f`.
pub fn local(per_sec: f64, burst: u32, concurrent: Option<u32>, f: f64) -> Local {
    Local {
        per_sec: per_sec * f,
        burst: (f64::from(burst) * f).max(1.0),
        concurrent: concurrent.map(|c| ((f64::from(c) * f).ceil() as u32).clamp(1, c.max(1))),
    }
}

/// Whether a newly measured demand differs enough from the published one
/// to publish it again: from or to zero, or by more than a fifth (and
/// more than half a request a second). Keeps gossip quiet under steady load.
pub fn worth_publishing(published: Option<f64>, now: f64) -> bool {
    match published {
        None => now > 0.0,
        Some(p) if (p == 0.0) != (now == 0.0) => true,
        Some(p) => {
            let diff = (now - p).abs();
            diff > 0.5 && diff > p.abs() * 0.2
        }
    }
}

/// The value published: two significant digits (small, and steady under
/// noise), e.g. `1234.5` -> `1200`, `3.24` -> `3.2`, `0.04` -> `0`.
pub fn rounded(rate: f64) -> String {
    if rate.is_nan() || rate < 0.05 || !rate.is_finite() {
        return "0".to_string();
    }
    let digits = rate.log10().floor() as i32;
    let scale = 10f64.powi(digits - 1);
    let r = (rate / scale).round() * scale;
    if r >= 10.0 {
        format!("{}", r.round() as u64)
    } else {
        let s = format!("{r:.1}");
        s.trim_end_matches(".0").to_string()
    }
}

/// A published value read back; anything unreadable counts as no demand.
pub fn parse(value: &str) -> f64 {
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(mine: f64, others: f64, live: usize, published: usize) -> View {
        View {
            mine,
            others,
            live,
            published,
            warming: false,
        }
    }

    #[test]
    fn a_lone_node_enforces_the_whole_limit() {
        assert_eq!(fraction(view(0.0, 0.0, 1, 0)), 1.0);
        assert_eq!(fraction(view(50.0, 0.0, 1, 0)), 1.0);
    }

    #[test]
    fn shares_follow_demand() {
        assert_eq!(fraction(view(30.0, 10.0, 2, 1)), 0.75);
        assert_eq!(fraction(view(10.0, 30.0, 2, 1)), 0.25);
        // Alone with demand after the warm-up: the whole limit.
        assert_eq!(fraction(view(10.0, 0.0, 3, 0)), 1.0);
    }

    #[test]
    fn an_idle_node_gets_the_floor_and_floors_keep_the_bound() {
        let f = fraction(view(0.0, 100.0, 4, 3));
        assert_eq!(f, FLOOR_SLACK / 4.0);
        // A node with a sliver of the demand still gets the floor.
        assert_eq!(fraction(view(0.1, 1000.0, 4, 3)), 0.05);
        // Consistent views: the fractions sum to at most 1 + FLOOR_SLACK.
        let demands = [0.0, 0.1, 5.0, 500.0, 0.0];
        let sum: f64 = (0..demands.len())
            .map(|i| {
                let others: f64 = demands.iter().sum::<f64>() - demands[i];
                fraction(view(demands[i], others, demands.len(), demands.len() - 1))
            })
            .sum();
        assert!(sum <= 1.0 + FLOOR_SLACK + 1e-9, "{sum}");
        assert!(sum >= 1.0, "{sum}");
    }

    #[test]
    fn during_warm_up_silent_peers_count_as_busy_as_this_node() {
        let mut v = view(90.0, 0.0, 3, 0);
        v.warming = true;
        assert_eq!(fraction(v), 1.0 / 3.0);
        // One peer published: the other silent one is still assumed busy.
        let mut v = view(90.0, 0.0, 3, 1);
        v.warming = true;
        assert_eq!(fraction(v), 0.5);
    }

    #[test]
    fn local_values_scale_with_the_fraction_and_admit_one() {
        let l = local(100.0, 20, Some(10), 0.25);
        assert_eq!(l.per_sec, 25.0);
        assert_eq!(l.burst, 5.0);
        assert_eq!(l.concurrent, Some(3));
        let l = local(100.0, 2, Some(1), 0.05);
        assert_eq!(l.burst, 1.0);
        assert_eq!(l.concurrent, Some(1));
    }

    #[test]
    fn publishing_only_on_a_meaningful_change() {
        assert!(!worth_publishing(None, 0.0));
        assert!(worth_publishing(None, 0.1));
        assert!(worth_publishing(Some(10.0), 0.0));
        assert!(!worth_publishing(Some(100.0), 119.0));
        assert!(worth_publishing(Some(100.0), 121.0));
        assert!(
            !worth_publishing(Some(1.0), 1.4),
            "under half a request a second"
        );
    }

    #[test]
    fn published_values_are_short() {
        assert_eq!(rounded(1234.5), "1200");
        assert_eq!(rounded(3.24), "3.2");
        assert_eq!(rounded(47.0), "47");
        assert_eq!(rounded(9.96), "10");
        assert_eq!(rounded(0.04), "0");
        assert_eq!(rounded(f64::NAN), "0");
        assert_eq!(parse("1200"), 1200.0);
        assert_eq!(parse("-3"), 0.0);
        assert_eq!(parse("x"), 0.0);
    }
}
