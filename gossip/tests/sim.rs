//! Simulated clusters: hundreds of real chitchat instances over the
//! in-memory network, under a paused tokio clock (time advances only when
//! every node is idle, so runs are fast and do not depend on machine load).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dmsc_gossip::sim::SimNetwork;
use dmsc_gossip::{Gossip, GossipConfig, MemberState};

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 7400))
}

async fn cluster(net: &SimNetwork, n: usize) -> Vec<Gossip> {
    cluster_with(net, n, |_| true).await
}

/// A cluster where node `i` sends and reads compact digests if `compact(i)`.
async fn cluster_with(net: &SimNetwork, n: usize, compact: impl Fn(usize) -> bool) -> Vec<Gossip> {
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let t = net.attach(addr(i));
        let mut cfg = GossipConfig::new(&format!("n{i}"), addr(i), "sim");
        cfg.generation = 1;
        cfg.compact_digests = compact(i);
        cfg.seeds = vec![addr(0).to_string()];
        nodes.push(Gossip::start(cfg, &t, vec![]).await.expect("start"));
    }
    nodes
}

/// Every node sees every other one alive.
async fn all_alive(nodes: &[Gossip], n: usize) -> bool {
    for g in nodes {
        let m = g.members().await;
        if m.iter().filter(|m| m.state == MemberState::Alive).count() != n - 1 {
            return false;
        }
    }
    true
}

/// Polls `cond` every 100 ms of simulated time, up to `limit`; returns the time taken.
macro_rules! eventually {
    ($limit:expr, $cond:expr) => {{
        let start = tokio::time::Instant::now();
        loop {
            if $cond {
                break start.elapsed();
            }
            assert!(
                start.elapsed() < $limit,
                "condition not met within {:?}: {}",
                $limit,
                stringify!($cond)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }};
}

/// The state `g` shows for the node called `name`, if it knows it.
async fn state_of(g: &Gossip, name: &str) -> Option<MemberState> {
    g.members()
        .await
        .into_iter()
        .find(|m| m.name == name)
        .map(|m| m.state)
}

/// True if `g` holds `node`'s value `value` for `key`.
async fn holds(g: &Gossip, key: &str, node: &str, value: &str) -> bool {
    g.values_of(key)
        .await
        .iter()
        .any(|(n, v)| n == node && v == value)
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn two_hundred_nodes_converge_detect_a_cut_node_and_readmit_it() {
    const N: usize = 200;
    const V: usize = 17;
    const CONTROL: usize = 42;
    let net = SimNetwork::new(65_507);
    let nodes = cluster(&net, N).await;
    let others = || (0..N).filter(|&i| i != V);

    let converge = eventually!(Duration::from_secs(60), all_alive(&nodes, N).await);
    eprintln!("200 nodes: full membership after {converge:?} (simulated)");

    // Cut every link of one node, then change a key on it and on a node on
    // the connected side: the partition must show on both sides.
    let victim = addr(V);
    net.isolate(victim);
    let victim_delivered = net.bytes_sent(victim);
    let victim_rounds = nodes[V].rounds();
    nodes[V].set("probe", "while-cut").await;
    nodes[CONTROL].set("probe", "control").await;
    let detect = eventually!(Duration::from_secs(60), {
        let mut all = true;
        for i in others() {
            if state_of(&nodes[i], "n17").await != Some(MemberState::Dead)
                || !holds(&nodes[i], "probe", "n42", "control").await
            {
                all = false;
                break;
            }
        }
        all
    });
    eprintln!("isolated node marked dead by all 199 others after {detect:?} (simulated)");
    // Simulated time on a paused clock: deterministic, not machine load.
    assert!(
        detect < Duration::from_secs(20),
        "detection took {detect:?}"
    );
    // The cut node, for its part, sees every other node die.
    let blind = eventually!(Duration::from_secs(60), {
        let m = nodes[V].members().await;
        m.len() == N - 1 && m.iter().all(|m| m.state == MemberState::Dead)
    });
    eprintln!("the isolated node saw all 199 others dead after {blind:?} more (simulated)");
    // By now the control key has reached all 199 connected nodes. The cut
    // node keeps gossiping (detection can take as few as 10 rounds, so wait
    // for more than that); yet nothing crosses the cut either way.
    eventually!(Duration::from_secs(60), {
        nodes[V].rounds() > victim_rounds + 10
    });
    assert_eq!(
        net.bytes_sent(victim),
        victim_delivered,
        "no message of the cut node was delivered"
    );
    for i in others() {
        assert!(
            !holds(&nodes[i], "probe", "n17", "while-cut").await,
            "n{i} learned a key the cut node set after the cut"
        );
    }
    assert!(
        !holds(&nodes[V], "probe", "n42", "control").await,
        "the cut node learned a key set on the other side"
    );

    // Heal: it is alive everywhere again, sees everyone alive, and the
    // keys set during the cut cross in both directions.
    net.heal(victim);
    let back = eventually!(Duration::from_secs(60), {
        let mut all =
            all_alive(&nodes, N).await && holds(&nodes[V], "probe", "n42", "control").await;
        for i in others() {
            if !all {
                break;
            }
            all = holds(&nodes[i], "probe", "n17", "while-cut").await;
        }
        all
    });
    eprintln!("healed node alive and its key everywhere after {back:?} (simulated)");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_key_set_on_one_node_reaches_all_and_leave_is_seen_as_left() {
    let net = SimNetwork::new(65_507);
    let nodes = cluster(&net, 20).await;
    nodes[3].set("agent/acme/billing", "v1").await;
    eventually!(Duration::from_secs(30), {
        let mut all = true;
        for g in &nodes {
            let vals = g.values_of("agent/acme/billing").await;
            if !vals.iter().any(|(n, v)| n == "n3" && v == "v1") {
                all = false;
                break;
            }
        }
        all
    });
    nodes[5].leave().await;
    eventually!(Duration::from_secs(30), {
        let mut all = true;
        for (i, g) in nodes.iter().enumerate() {
            if i == 5 {
                continue;
            }
            let m = g.members().await;
            if m.iter().find(|m| m.name == "n5").map(|m| m.state) != Some(MemberState::Left) {
                all = false;
                break;
            }
        }
        all
    });
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn oversized_messages_are_dropped_by_the_mtu() {
    // A 1 KB MTU carries a node's first SYN (its digest names only itself)
    // but not the seed's replies once its digest names a few dozen nodes:
    // the seed hears everyone, nobody hears the whole cluster back. (With
    // chitchat's own digests: compact ones name 40 nodes in under 1 KB.)
    const N: usize = 40;
    let net = SimNetwork::new(1_024);
    let nodes = cluster_with(&net, N, |_| false).await;
    // Enough rounds that 40 nodes converge several times over without the
    // MTU (checked below on the same cluster with a large MTU).
    eventually!(
        Duration::from_secs(60),
        nodes.iter().all(|g| g.rounds() >= 50)
    );
    assert!(
        net.dropped_over_mtu() > 0,
        "oversized messages were dropped"
    );
    assert_eq!(
        net.dropped(),
        net.dropped_over_mtu(),
        "nothing but oversized messages was dropped"
    );
    let mut seen = Vec::with_capacity(N);
    for g in &nodes {
        seen.push(g.members().await.len());
    }
    eprintln!("members seen per node under a 1 KB MTU: {seen:?}");
    assert_eq!(seen[0], N - 1, "small SYNs reach the seed: {seen:?}");
    assert!(
        seen[1..].iter().all(|&s| s < N - 1),
        "no node learned the whole cluster through oversized replies: {seen:?}"
    );
    assert!(
        seen[1..].iter().any(|&s| s > 1),
        "while the seed's digest was small, its replies got through: {seen:?}"
    );

    // Control: the same cluster under a large MTU forms in fewer rounds.
    let net = SimNetwork::new(65_507);
    let nodes = cluster_with(&net, N, |_| false).await;
    eventually!(
        Duration::from_secs(60),
        nodes.iter().all(|g| g.rounds() >= 50)
    );
    assert!(
        all_alive(&nodes, N).await,
        "without the MTU the cluster forms"
    );
    assert_eq!(net.dropped(), 0);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn nodes_with_and_without_compact_digests_form_one_cluster_and_compact_ones_send_less() {
    // Half the nodes (the seed among them) speak only chitchat's encoding,
    // as during a rolling upgrade: everyone converges, keys cross both ways,
    // and a node that reads compact digests sends fewer bytes per digest.
    const N: usize = 60;
    let net = SimNetwork::new(65_507);
    let nodes = cluster_with(&net, N, |i| i % 2 == 1).await;
    eventually!(Duration::from_secs(60), all_alive(&nodes, N).await);
    nodes[7].set("probe", "from-compact").await;
    nodes[8].set("probe", "from-legacy").await;
    eventually!(Duration::from_secs(30), {
        let mut all = true;
        for g in &nodes {
            if !holds(g, "probe", "n7", "from-compact").await
                || !holds(g, "probe", "n8", "from-legacy").await
            {
                all = false;
                break;
            }
        }
        all
    });
    // Steady state: SYN bytes per gossip round, by kind of node.
    let before: Vec<(u64, u64)> = nodes.iter().map(syn_bytes_and_count).collect();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let mut per_syn = [(0u64, 0u64); 2];
    for (i, g) in nodes.iter().enumerate() {
        let (b, n) = syn_bytes_and_count(g);
        per_syn[i % 2].0 += b - before[i].0;
        per_syn[i % 2].1 += n - before[i].1;
    }
    let legacy = per_syn[0].0 as f64 / per_syn[0].1 as f64;
    let compact = per_syn[1].0 as f64 / per_syn[1].1 as f64;
    eprintln!("SYN bytes per round at {N} nodes: chitchat {legacy:.0}, compact (to a mixed cluster) {compact:.0}");
    for (i, g) in nodes.iter().enumerate() {
        let sent = g.stats().compact_sent.load(Ordering::Relaxed);
        assert_eq!(sent > 0, i % 2 == 1, "n{i} sent {sent} compact messages");
        assert_eq!(
            g.stats().invalid_messages.load(Ordering::Relaxed),
            0,
            "n{i}"
        );
    }
    // Half of a compact node's peers read compact digests: its SYNs average
    // well under chitchat's.
    assert!(
        compact < legacy * 0.8,
        "compact {compact:.0} vs chitchat {legacy:.0}"
    );
}

fn syn_bytes_and_count(g: &Gossip) -> (u64, u64) {
    let s = g.stats();
    (s.syn_bytes_sent.load(Ordering::Relaxed), g.rounds())
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn scan_changes_carries_only_what_changed_and_everything_after_tombstones_are_collected() {
    let net = SimNetwork::new(65_507);
    let mut nodes = Vec::new();
    for i in 0..2 {
        let t = net.attach(addr(i));
        let mut cfg = GossipConfig::new(&format!("n{i}"), addr(i), "sim");
        cfg.generation = 1;
        cfg.seeds = vec![addr(0).to_string()];
        // Tombstones are collected after this grace (and dead nodes forgotten).
        cfg.dead_grace = Duration::from_secs(20);
        nodes.push(Gossip::start(cfg, &t, vec![]).await.expect("start"));
    }
    for k in ["a", "b", "c"] {
        nodes[1].set(&format!("agent/{k}"), "1").await;
    }
    nodes[1].set("other", "x").await;
    let have = std::collections::HashMap::new();
    eventually!(Duration::from_secs(30), {
        let s = nodes[0].scan_changes("agent/", &have).await;
        s.first()
            .and_then(|n| n.values.as_ref())
            .is_some_and(|v| v.len() == 3)
    });
    let first = nodes[0].scan_changes("agent/", &have).await;
    let n1 = first.first().expect("n1");
    assert!(n1.complete);
    let cursor: std::collections::HashMap<_, _> =
        [("n1".to_string(), (n1.generation, n1.version))].into();
    // Nothing changed: no values.
    let same = nodes[0].scan_changes("agent/", &cursor).await;
    assert!(same[0].values.is_none());
    // One key changed, one deleted, one outside the prefix changed.
    nodes[1].set("agent/b", "2").await;
    nodes[1].delete("agent/c").await;
    nodes[1].set("other", "y").await;
    eventually!(
        Duration::from_secs(30),
        holds(&nodes[0], "other", "n1", "y").await
    );
    let delta = nodes[0].scan_changes("agent/", &cursor).await;
    assert!(!delta[0].complete);
    assert_eq!(
        delta[0].values.as_deref(),
        Some(&[("agent/b".to_string(), "2".to_string())][..])
    );
    assert_eq!(delta[0].deleted, vec!["agent/c".to_string()]);
    // `scan_since` still answers with every key.
    let full = nodes[0].scan_since("agent/", &cursor).await;
    assert!(full[0].complete);
    assert_eq!(full[0].values.as_ref().map(Vec::len), Some(2));
    // Once the tombstone is collected a delta would miss the deletion:
    // the answer is the whole state again.
    tokio::time::sleep(Duration::from_secs(40)).await;
    nodes[1].set("agent/a", "3").await;
    eventually!(Duration::from_secs(30), {
        let s = nodes[0].scan_changes("agent/", &cursor).await;
        s[0].values
            .as_ref()
            .is_some_and(|v| v.contains(&("agent/a".to_string(), "3".to_string())))
    });
    let after = nodes[0].scan_changes("agent/", &cursor).await;
    assert!(
        after[0].complete,
        "tombstones newer than the cursor were collected"
    );
    assert_eq!(after[0].values.as_ref().map(Vec::len), Some(2));
}
