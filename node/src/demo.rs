//! `dmsc-node demo`: a whole mesh on loopback with no setup.
//!
//! A throwaway CA in a temp dir, N nodes in this process (each with its own
//! QUIC overlay, gossip and admin API on port 0), the later ones bootstrapping
//! through the first. It prints the mesh as it converges and then whenever a
//! peer changes state, until Ctrl-C (or `--duration`).

use std::time::{Duration, Instant};

use dmsc_transport::pki::{CertificateAuthority, NODE_VALIDITY};

use crate::config::RawConfig;
use crate::App;

const REGIONS: [&str; 5] = ["eu", "us", "ap", "sa", "af"];

/// Runs the demo until `shutdown` resolves.
pub async fn run(
    nodes: usize,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    anyhow::ensure!((1..=20).contains(&nodes), "--nodes must be within 1..=20");
    let dir = tempfile::Builder::new().prefix("dmsc-demo-").tempdir()?;
    let ca = CertificateAuthority::generate("demo.dmsc.local")?;
    ca.save(dir.path())?;
    println!(
        "dmsc demo: {nodes} nodes on loopback, throwaway CA (trust domain demo.dmsc.local) in {}",
        dir.path().display()
    );

    let mut apps: Vec<App> = Vec::new();
    for i in 0..nodes {
        let name = format!("{}-1", REGIONS[i % REGIONS.len()]);
        let name = if i >= REGIONS.len() {
            format!("{name}-{i}")
        } else {
            name
        };
        let node_dir = dir.path().join(&name);
        ca.issue_node(&name, NODE_VALIDITY)?
            .write_node_dir(&node_dir, &ca.cert_pem)?;
        let mut raw =
            RawConfig::loopback(&name, &node_dir, apps.first().map(|a| a.bound().overlay));
        raw.region = Some(REGIONS[i % REGIONS.len()].to_string());
        let app = App::build(raw.validate()?).await?;
        println!(
            "  started {name:<6} overlay {}  admin {}   (try: dmsc-node status --admin {})",
            app.bound().overlay,
            app.bound().admin,
            app.bound().admin
        );
        apps.push(app);
    }
    println!();

    let started = Instant::now();
    let mut converged = false;
    let mut last_view = String::new();
    let watch = async {
        loop {
            let mut view = String::new();
            let mut all_alive = true;
            for app in &apps {
                let s = app.status().await;
                let alive = s.peers.iter().filter(|p| p.state == "alive").count();
                all_alive &= alive == nodes - 1;
                view.push_str(&format!("{}:", s.node.name));
                for p in &s.peers {
                    view.push_str(&format!(" {}={}", p.name, p.state));
                }
                view.push('\n');
            }
            if view != last_view {
                let first = &apps[0];
                println!(
                    "[{:>6}ms] mesh as seen by {}:",
                    started.elapsed().as_millis(),
                    first.status().await.node.name
                );
                println!("{}", first.status().await.render());
                last_view = view;
            }
            if all_alive && !converged {
                converged = true;
                println!(
                    "converged: every node sees the other {} as alive after {}ms. Ctrl-C to stop.\n",
                    nodes - 1,
                    started.elapsed().as_millis()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    tokio::select! {
        _ = shutdown => {}
        _ = watch => {}
    }
    println!("stopping the demo mesh...");
    let mut stopping = tokio::task::JoinSet::new();
    for app in apps {
        stopping.spawn(app.stop());
    }
    while stopping.join_next().await.is_some() {}
    Ok(())
}
