//! Simulated clusters: hundreds of real chitchat instances over the
//! in-memory network, under a paused tokio clock (time advances only when
//! every node is idle, so runs are fast and do not depend on machine load).

use std::net::SocketAddr;
use std::time::Duration;

use dmsc_gossip::sim::SimNetwork;
use dmsc_gossip::{Gossip, GossipConfig, MemberState};

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 7400))
}

async fn cluster(net: &SimNetwork, n: usize) -> Vec<Gossip> {
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let t = net.attach(addr(i));
        let mut cfg = GossipConfig::new(&format!("n{i}"), addr(i), "sim");
        cfg.generation = 1;
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
    // By now the control key has reached all 199 connected nodes, and the
    // cut node kept gossiping; yet nothing crossed the cut either way.
    assert!(
        nodes[V].rounds() > victim_rounds + 10,
        "the cut node kept running gossip rounds"
    );
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
    // the seed hears everyone, nobody hears the whole cluster back.
    const N: usize = 40;
    let net = SimNetwork::new(1_024);
    let nodes = cluster(&net, N).await;
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
    let nodes = cluster(&net, N).await;
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
