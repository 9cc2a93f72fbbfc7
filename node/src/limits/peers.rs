//! What the other nodes published under `usage/<tenant>`, kept from one
//! gossip scan to the next (a scan carries values only for the nodes whose
//! state changed). Live means alive or suspect: a suspect node may well be
//! admitting requests still, and counting it keeps the shares low rather
//! than high. Pure: scans in, sums out.

use std::collections::HashMap;

use dmsc_gossip::{MemberState, NodeScan};

use super::table::Peers;

/// Gossip key prefix of the published demand.
pub const KEY_USAGE_PREFIX: &str = "usage/";

/// The gossip key of `tenant`'s demand on the publishing node.
pub fn usage_key(tenant: &str) -> String {
    format!("{KEY_USAGE_PREFIX}{tenant}")
}

#[derive(Debug, Default)]
struct Node {
    generation: u64,
    version: u64,
    live: bool,
    usage: HashMap<String, f64>,
}

/// The other nodes' published demand.
#[derive(Debug, Default)]
pub struct PeerUsage {
    nodes: HashMap<String, Node>,
}

impl PeerUsage {
    /// What [`dmsc_gossip::Gossip::scan_since`] needs to skip unchanged nodes.
    pub fn cursor(&self) -> HashMap<String, (u64, u64)> {
        self.nodes
            .iter()
            .map(|(n, s)| (n.clone(), (s.generation, s.version)))
            .collect()
    }

    /// Takes in one scan (every known node, values for the changed ones).
    pub fn apply(&mut self, scans: Vec<NodeScan>) {
        let seen: std::collections::HashSet<String> =
            scans.iter().map(|s| s.name.clone()).collect();
        self.nodes.retain(|n, _| seen.contains(n));
        for s in scans {
            let node = self.nodes.entry(s.name).or_default();
            node.live = matches!(s.state, MemberState::Alive | MemberState::Suspect);
            if let Some(values) = s.values {
                node.generation = s.generation;
                node.version = s.version;
                node.usage = values
                    .iter()
                    .filter_map(|(k, v)| {
                        let t = k.strip_prefix(KEY_USAGE_PREFIX)?;
                        Some((t.to_string(), super::share::parse(v)))
                    })
                    .collect();
            }
        }
    }

    /// Live nodes, this one included, and the demand per tenant the other
    /// live nodes published.
    pub fn sums(&self) -> (usize, HashMap<String, Peers>) {
        let mut out: HashMap<String, Peers> = HashMap::new();
        let mut live = 1;
        for n in self.nodes.values().filter(|n| n.live) {
            live += 1;
            for (t, v) in &n.usage {
                let p = out.entry(t.clone()).or_default();
                p.sum += v;
                // A published zero says the node was idle a round ago, not
                // that it is now: during a warm-up it counts as silent.
                if *v > 0.0 {
                    p.count += 1;
                }
            }
        }
        (live, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(
        name: &str,
        version: u64,
        state: MemberState,
        usage: Option<&[(&str, &str)]>,
    ) -> NodeScan {
        NodeScan {
            name: name.to_string(),
            generation: 1,
            state,
            version,
            values: usage.map(|u| {
                u.iter()
                    .map(|(t, v)| (usage_key(t), v.to_string()))
                    .collect()
            }),
            complete: true,
            deleted: Vec::new(),
        }
    }

    #[test]
    fn sums_over_live_nodes_and_keeps_unchanged_ones() {
        let mut p = PeerUsage::default();
        p.apply(vec![
            scan(
                "a",
                3,
                MemberState::Alive,
                Some(&[("acme", "40"), ("beta", "2")]),
            ),
            scan(
                "b",
                7,
                MemberState::Suspect,
                Some(&[("acme", "20"), ("beta", "0")]),
            ),
            scan("c", 1, MemberState::Alive, Some(&[])),
        ]);
        let (live, sums) = p.sums();
        assert_eq!(live, 4);
        assert_eq!(
            sums["acme"],
            Peers {
                sum: 60.0,
                count: 2
            }
        );
        assert_eq!(sums["beta"], Peers { sum: 2.0, count: 1 });
        assert_eq!(p.cursor()["a"], (1, 3));
        // Unchanged a (no values), b dead, c gone from gossip.
        p.apply(vec![
            scan("a", 3, MemberState::Alive, None),
            scan("b", 7, MemberState::Dead, None),
        ]);
        let (live, sums) = p.sums();
        assert_eq!(live, 2);
        assert_eq!(
            sums["acme"],
            Peers {
                sum: 40.0,
                count: 1
            }
        );
    }
}
