//! Graceful shutdown: a node told to stop finishes the delegations in
//! flight (up to `[limits] shutdown_grace_ms`) and refuses new ones, so a
//! rolling restart loses no call an agent may already be executing.

use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1 request on an open connection; the response head and body as text.
async fn raw_request(s: &mut tokio::net::TcpStream, host: &str, body: &str) -> String {
    let req = format!(
        "POST / HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 64 * 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("an answer in time")
        .expect("read");
    String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delegation_in_flight_when_its_home_node_stops_gets_the_whole_answer() {
    let mut mesh = mesh3(|i, raw| {
        if i == 1 {
            raw.limits.shutdown_grace_ms = Some(10_000);
        }
    })
    .await;
    let slow = agent_with(
        "slow-a",
        &["slow"],
        "answers slowly",
        Duration::from_secs(2),
        CardDialect::V03,
    )
    .await;
    let other = agent("slow-b", &["slow"], "answers slowly").await;
    attach_routable(&mesh, 1, &slow, "slow-a").await;
    attach_routable(&mesh, 2, &other, "slow-b").await;
    // An idle keep-alive connection to the home node's ingress, opened
    // before the drain: a request on it afterwards is refused with 503.
    let home_ingress = mesh.ingress(1);
    let mut open = tokio::net::TcpStream::connect(home_ingress)
        .await
        .expect("connect");
    let warm = raw_request(&mut open, "slow-b.acme.dmsc", &message_send("warm")).await;
    assert!(warm.starts_with("http/1.1 200"), "{warm}");
    let home = mesh.nodes.remove(1);
    let admin = home.bound().admin;

    let call = mesh.call(
        0,
        "POST",
        "slow-a.acme.dmsc",
        "/",
        &[],
        message_send("finish me"),
    );
    let stop = async {
        eventually(
            Duration::from_secs(5),
            "the call reaches the home node",
            || home.in_flight() > 0,
        )
        .await;
        let t0 = Instant::now();
        let stopping = tokio::spawn(home.stop());
        // Draining: readiness says so, a new connection is refused, a new
        // request on an open one gets 503 with Retry-After.
        let mut ready = String::new();
        for _ in 0..50 {
            let mut s = tokio::net::TcpStream::connect(admin).await.expect("admin");
            s.write_all(b"GET /ready HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
                .await
                .expect("write");
            ready.clear();
            s.read_to_string(&mut ready).await.expect("read");
            if ready.contains("draining") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
        assert!(ready.contains("draining"), "{ready}");
        assert!(
            tokio::net::TcpStream::connect(home_ingress).await.is_err(),
            "a draining node accepts no connections"
        );
        let refused = raw_request(&mut open, "slow-b.acme.dmsc", &message_send("late")).await;
        assert!(refused.starts_with("http/1.1 503"), "{refused}");
        assert!(refused.contains("retry-after: 1"), "{refused}");
        assert!(refused.contains("dmsc-error: overloaded"), "{refused}");
        assert!(refused.contains("shutting down"), "{refused}");
        (stopping, t0)
    };
    let (answer, (stopping, t0)) = tokio::join!(call, stop);
    let (resp, body) = answer.expect("the caller got an answer");
    let text = String::from_utf8_lossy(&body);
    assert_eq!(resp.status(), 200, "{text}");
    assert_eq!(header(&resp, "dmsc-node"), "n1");
    assert!(text.contains("slow-a handled: finish me"), "{text}");
    // New work while the home node drains goes elsewhere: by capability
    // to the other replica.
    let (resp, body) = mesh
        .call(
            0,
            "POST",
            "slow.cap.acme.dmsc",
            "/",
            &[],
            message_send("new"),
        )
        .await
        .expect("call");
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(header(&resp, "dmsc-node"), "n2");
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("the home node stops once drained")
        .expect("stop task");
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(8), "stopped after {took:?}");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delegation_longer_than_the_grace_period_is_cut_and_the_node_stops_in_bounded_time() {
    let mut mesh = mesh_of(&["n0", "n1"], |i, raw| {
        if i == 1 {
            raw.limits.shutdown_grace_ms = Some(700);
        }
    })
    .await;
    let slow = agent_with(
        "slow-a",
        &["slow"],
        "answers slowly",
        Duration::from_secs(4),
        CardDialect::V03,
    )
    .await;
    attach_routable(&mesh, 1, &slow, "slow-a").await;
    let home = mesh.nodes.remove(1);
    let call = mesh.call(
        0,
        "POST",
        "slow-a.acme.dmsc",
        "/",
        &[],
        message_send("too slow"),
    );
    let stop = async {
        eventually(
            Duration::from_secs(5),
            "the call reaches the home node",
            || home.in_flight() > 0,
        )
        .await;
        let t0 = Instant::now();
        home.stop().await;
        t0.elapsed()
    };
    let (answer, took) = tokio::join!(call, stop);
    assert!(
        took >= Duration::from_millis(700),
        "the node waited out its grace period: stopped after {took:?}"
    );
    assert!(
        took < Duration::from_secs(4),
        "bounded: stopped after {took:?}"
    );
    let (resp, body) = answer.expect("the caller got an answer");
    let text = String::from_utf8_lossy(&body);
    assert!(
        !text.contains("slow-a handled"),
        "cut before the agent answered: {} {text}",
        resp.status()
    );
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_the_drain_at_once() {
    let mut mesh = mesh_of(&["n0", "n1"], |_, _| {}).await;
    let slow = agent_with(
        "slow-a",
        &["slow"],
        "answers slowly",
        Duration::from_secs(6),
        CardDialect::V03,
    )
    .await;
    attach_routable(&mesh, 1, &slow, "slow-a").await;
    let home = mesh.nodes.remove(1);
    let call = mesh.call(0, "POST", "slow-a.acme.dmsc", "/", &[], message_send("x"));
    let stop = async {
        eventually(
            Duration::from_secs(5),
            "the call reaches the home node",
            || home.in_flight() > 0,
        )
        .await;
        let t0 = Instant::now();
        // Default grace (25 s); the second signal comes after 300 ms.
        home.stop_with(tokio::time::sleep(Duration::from_millis(300)))
            .await;
        t0.elapsed()
    };
    let (_answer, took) = tokio::join!(call, stop);
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(4), "stopped after {took:?}");
    mesh.stop().await;
}
