//! Tenant rate limits across a real three-node mesh: a spray over every
//! node is held to the tenant's mesh-wide limit, refusals are 429 with
//! `Retry-After`, and a target's limit holds on its home node.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmsc_node::demo::mesh::{message_send, LocalMesh};
use dmsc_node::limits::{Limit, Rate, TenantLimits};

use super::{agent, attach_routable, header, mesh3};

fn rate(per_sec: f64, burst: u32) -> Limit {
    Limit {
        rate: Some(Rate { per_sec, burst }),
        concurrent: None,
    }
}

fn set_everywhere(mesh: &LocalMesh, limits: &TenantLimits) {
    for n in &mesh.nodes {
        n.limiter().set("acme", Some(limits.clone()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spray_over_three_nodes_is_held_to_the_mesh_wide_limit() {
    let mesh = Arc::new(
        mesh3(|_, raw| {
            raw.audit.enabled = Some(true);
        })
        .await,
    );
    let echo = agent("echo", &["echo"], "echoes").await;
    attach_routable(&mesh, 0, &echo, "echo").await;
    const LIMIT: f64 = 20.0;
    const BURST: u32 = 10;
    set_everywhere(
        &mesh,
        &TenantLimits {
            tenant: rate(LIMIT, BURST),
            ..Default::default()
        },
    );
    // Two callers per node, each up to 200 requests a second: 60x the limit.
    let window = Duration::from_secs(3);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for node in 0..3 {
        for _ in 0..2 {
            let mesh = mesh.clone();
            tasks.spawn(async move {
                let (mut ok, mut limited, mut retry_after) = (0u64, 0u64, None);
                let mut tick = tokio::time::interval(Duration::from_millis(5));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                while start.elapsed() < window {
                    tick.tick().await;
                    let (resp, body) = mesh
                        .call(node, "POST", "echo.acme.dmsc", "/", &[], message_send("hi"))
                        .await
                        .expect("call");
                    match resp.status().as_u16() {
                        200 => ok += 1,
                        429 => {
                            limited += 1;
                            assert_eq!(header(&resp, "dmsc-error"), "rate-limited");
                            let text = String::from_utf8_lossy(&body).to_string();
                            assert!(text.contains("tenant `acme`"), "{text}");
                            retry_after = Some(header(&resp, "retry-after"));
                        }
                        s => panic!("unexpected {s}: {}", String::from_utf8_lossy(&body)),
                    }
                }
                (ok, limited, retry_after)
            });
        }
    }
    let (mut ok, mut limited) = (0, 0);
    let mut retry_after = None;
    while let Some(r) = tasks.join_next().await {
        let (o, l, ra) = r.expect("task");
        ok += o;
        limited += l;
        retry_after = retry_after.or(ra);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let bound = 1.2 * LIMIT * elapsed + f64::from(BURST);
    eprintln!("admitted {ok}, refused {limited} in {elapsed:.2}s (bound {bound:.0})");
    assert!((ok as f64) <= bound, "admitted {ok} > {bound:.0}");
    // The limit admits, too: at least half of it got through.
    assert!((ok as f64) >= 0.5 * LIMIT * elapsed, "admitted only {ok}");
    assert!(
        limited > 10 * ok,
        "the spray was well over the limit: {limited}"
    );
    assert_eq!(echo.state.served.load(Ordering::Relaxed), ok);
    let ra: u64 = retry_after
        .expect("a 429")
        .parse()
        .expect("Retry-After is whole seconds");
    assert!(ra >= 1);
    let counted: u64 = {
        let mut n = 0;
        for node in &mesh.nodes {
            let text = node.metrics_text().await;
            n += text
                .lines()
                .find(|l| {
                    l.starts_with("dmsc_rate_limited_total{tenant=\"acme\",scope=\"tenant\"}")
                })
                .and_then(|l| l.split_whitespace().last())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
        n
    };
    assert_eq!(counted, limited, "every refusal counted");
    // Audited, sampled: at most the first few per node in the window.
    let mut audited = 0;
    for (i, node) in mesh.nodes.iter().enumerate() {
        let audit = node.security().audit.as_ref().expect("audit on");
        audit.flush().await.expect("flush");
        let dir = mesh.node_dir(i).join("data").join("audit");
        let n = dmsc_audit::tail(&dir, None)
            .expect("tail")
            .filter(|l| l.as_ref().is_ok_and(|l| l.kind == "rate_limited"))
            .count();
        assert!(
            n <= dmsc_node::limits::AUDIT_PER_WINDOW as usize,
            "node {i}: {n} entries"
        );
        audited += n;
    }
    assert!(
        audited >= 3,
        "each node audited its first refusals: {audited}"
    );
    let mesh = Arc::into_inner(mesh).expect("sole owner");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_targets_limit_holds_on_its_home_node_for_every_caller() {
    let mesh = mesh3(|_, _| {}).await;
    let slow = agent("slow", &["slow"], "slow work").await;
    attach_routable(&mesh, 0, &slow, "slow").await;
    let mut limits = TenantLimits::default();
    limits.targets.insert("slow".into(), rate(0.5, 2));
    set_everywhere(&mesh, &limits);
    // Two admitted (the burst), from two different nodes; the third, from
    // the third node, is refused by the home node n0.
    for node in [1, 2] {
        let (resp, body) = mesh
            .call(node, "POST", "slow.acme.dmsc", "/", &[], message_send("x"))
            .await
            .expect("call");
        assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    }
    let (resp, body) = mesh
        .call(0, "POST", "slow.acme.dmsc", "/", &[], message_send("x"))
        .await
        .expect("call");
    let text = String::from_utf8_lossy(&body).to_string();
    assert_eq!(resp.status(), 429, "{text}");
    assert_eq!(header(&resp, "retry-after"), "2", "{text}");
    // A JSON-RPC caller gets a JSON-RPC error.
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json-rpc");
    assert_eq!(v["error"]["data"]["kind"], "rate-limited", "{v}");
    // Remote: the refusal crosses the overlay, the wait comes from the
    // calling node's copy of the limits.
    let (resp, body) = mesh
        .call(1, "POST", "slow.acme.dmsc", "/", &[], message_send("x"))
        .await
        .expect("call");
    assert_eq!(resp.status(), 429, "{}", String::from_utf8_lossy(&body));
    assert_eq!(header(&resp, "retry-after"), "2");
    assert_eq!(slow.state.served.load(Ordering::Relaxed), 2);
    // Without limits, nothing is refused.
    for n in &mesh.nodes {
        n.limiter().set("acme", None);
    }
    let (resp, _) = mesh
        .call(1, "POST", "slow.acme.dmsc", "/", &[], message_send("x"))
        .await
        .expect("call");
    assert_eq!(resp.status(), 200);
    mesh.stop().await;
}
