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

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn two_hundred_nodes_converge_detect_a_cut_node_and_readmit_it() {
    const N: usize = 200;
    let net = SimNetwork::new(65_507);
    let nodes = cluster(&net, N).await;

    let converge = eventually!(Duration::from_secs(60), all_alive(&nodes, N).await);
    eprintln!("200 nodes: full membership after {converge:?} (simulated)");

    // Cut every link of one node: all others must mark it dead.
    let victim = addr(17);
    net.isolate(victim);
    let detect = eventually!(Duration::from_secs(60), {
        let mut all = true;
        for (i, g) in nodes.iter().enumerate() {
            if i == 17 {
                continue;
            }
            let m = g.members().await;
            let v = m.iter().find(|m| m.name == "n17").expect("known");
            if v.state != MemberState::Dead {
                all = false;
                break;
            }
        }
        all
    });
    eprintln!("isolated node marked dead by all 199 others after {detect:?} (simulated)");
    assert!(
        detect < Duration::from_secs(20),
        "detection took {detect:?}"
    );

    // Heal: it is alive everywhere again, and it sees everyone alive.
    net.heal(victim);
    let back = eventually!(Duration::from_secs(60), all_alive(&nodes, N).await);
    eprintln!("healed node alive everywhere again after {back:?} (simulated)");
    assert!(net.dropped() > 0, "the cut really dropped traffic");
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
    // A 1 KB MTU cannot carry a digest of 40 nodes: the cluster cannot form
    // through the seed, which shows the MTU is enforced rather than ignored.
    let net = SimNetwork::new(1_024);
    let nodes = cluster(&net, 40).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(net.dropped() > 0);
    let seen = nodes[0].members().await.len();
    assert!(seen > 0, "small messages still flow");
}
