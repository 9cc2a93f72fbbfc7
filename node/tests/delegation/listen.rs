//! Hardened listeners ([`dmsc_node::listen`]) against a real node: slow
//! request heads on ingress and admin are closed after the header timeout
//! while normal requests pass, and a burst beyond the in-flight limit is
//! shed with 503 + `Retry-After` while the node keeps answering.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmsc_node::config::{RawAgent, RawSkill};
use dmsc_node::demo::mesh::LocalMesh;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{agent, eventually};

const HEADER_TIMEOUT: Duration = Duration::from_secs(2);

async fn one_node(tweak: impl Fn(&mut dmsc_node::RawConfig)) -> LocalMesh {
    LocalMesh::start(&["n0"], "acme", |_, raw| {
        raw.delegation.health_interval_ms = Some(200);
        raw.limits.header_read_timeout_ms = Some(HEADER_TIMEOUT.as_millis() as u64);
        tweak(raw)
    })
    .await
    .expect("mesh")
}

/// A client that sends `G`, then one more byte of a request head every
/// `every`, and reports how long after it began connecting the server closed the
/// connection (EOF or reset), or `None` if it was still open after `limit`.
async fn slow_head(
    addr: SocketAddr,
    every: Duration,
    limit: Duration,
    started: Arc<AtomicUsize>,
) -> Option<Duration> {
    // Before the connect: the node's clock for this connection starts later.
    let t0 = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"G").await.expect("first byte");
    started.fetch_add(1, Ordering::SeqCst);
    let (mut rd, mut wr) = s.split();
    let mut rest = b"ET / HTTP/1.1\r\nhost: echo.acme.dmsc\r\nx-slow: "
        .iter()
        .cycle();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut buf = [0u8; 512];
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            n = rd.read(&mut buf) => match n {
                Ok(0) | Err(_) => return Some(t0.elapsed()),
                Ok(_) => panic!("a slow head got an answer: {}", String::from_utf8_lossy(&buf)),
            },
            _ = tick.tick() => {
                let b = rest.next().copied().unwrap_or(b'x');
                if wr.write_all(&[b]).await.is_err() {
                    return Some(t0.elapsed());
                }
            }
            _ = &mut deadline => return None,
        }
    }
}

/// Opens `n` slow-head clients and waits until each has sent its first byte.
async fn slow_heads(addr: SocketAddr, n: usize) -> tokio::task::JoinSet<Option<Duration>> {
    let started = Arc::new(AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        set.spawn(slow_head(
            addr,
            Duration::from_millis(500),
            Duration::from_secs(60),
            started.clone(),
        ));
    }
    eventually(Duration::from_secs(60), "slow clients connected", || {
        started.load(Ordering::SeqCst) == n
    })
    .await;
    set
}

/// Every slow client was closed by the node, none before the header timeout.
async fn all_closed_after_the_header_timeout(mut set: tokio::task::JoinSet<Option<Duration>>) {
    let mut closed = 0;
    while let Some(r) = set.join_next().await {
        let after = r
            .expect("client task")
            .expect("the node never closed a slow connection");
        assert!(after >= HEADER_TIMEOUT, "closed after only {after:?}");
        closed += 1;
    }
    assert!(closed > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_slow_heads_are_closed_and_do_not_stop_normal_requests() {
    let mesh = one_node(|_| {}).await;
    let echo = agent("echo", &["echo"], "Echoes").await;
    mesh.attach(0, &echo.url(), None).await.expect("attach");
    eventually(Duration::from_secs(10), "echo routable", || {
        mesh.routable_everywhere("echo")
    })
    .await;
    let listener = format!("ingress:{}", mesh.ingress(0));
    let metrics = mesh.nodes[0].metrics().listeners.clone();

    let slow = slow_heads(mesh.ingress(0), 500).await;
    eprintln!(
        "500 slow heads sending; the node holds {} ingress connections",
        metrics.open(&listener)
    );
    for i in 0..20 {
        let (resp, body) = mesh
            .call(0, "POST", "echo.acme.dmsc", "/", &[], format!("normal {i}"))
            .await
            .expect("a normal request beside the slow ones");
        assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
        assert_eq!(body, format!("normal {i}"));
    }
    all_closed_after_the_header_timeout(slow).await;
    assert!(
        metrics.timed_out(&listener, "header") >= 500,
        "counted: {}",
        metrics.timed_out(&listener, "header")
    );
    // And the ingress still answers.
    let (resp, _) = mesh
        .call(0, "POST", "echo.acme.dmsc", "/", &[], "after")
        .await
        .expect("after");
    assert_eq!(resp.status(), 200);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_closes_slow_heads_and_silent_connections_too() {
    let mesh = one_node(|_| {}).await;
    let admin = mesh.nodes[0].bound().admin;
    let listener = format!("admin:{admin}");
    let metrics = mesh.nodes[0].metrics().listeners.clone();
    let slow = slow_heads(admin, 20).await;
    // A connection that sends nothing at all.
    let t0 = Instant::now();
    let mut silent = tokio::net::TcpStream::connect(admin)
        .await
        .expect("connect");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(60), silent.read(&mut buf))
        .await
        .expect("the node never closed a silent admin connection");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(t0.elapsed() >= HEADER_TIMEOUT);
    all_closed_after_the_header_timeout(slow).await;
    assert!(metrics.timed_out(&listener, "header") >= 21);
    // A prompt client is served.
    let mut s = tokio::net::TcpStream::connect(admin)
        .await
        .expect("connect");
    s.write_all(b"GET /live HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    assert!(
        out.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    mesh.stop().await;
}

/// An agent that answers health checks at once and holds every `POST` until
/// the test releases it, so "the limit is full" is a fact, not a race.
struct GateAgent {
    addr: SocketAddr,
    arrived: Arc<AtomicUsize>,
    gate: Arc<tokio::sync::Semaphore>,
    _task: tokio::task::JoinHandle<()>,
}

impl GateAgent {
    async fn start() -> GateAgent {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let arrived = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (a, g) = (arrived.clone(), gate.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (a, g) = (a.clone(), g.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (a, g) = (a.clone(), g.clone());
                        async move {
                            if req.method() == hyper::Method::POST {
                                a.fetch_add(1, Ordering::SeqCst);
                                let _ = g.acquire().await.map(|p| p.forget());
                            }
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                dmsc_node::proto::http::full("through"),
                            ))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        GateAgent {
            addr,
            arrived,
            gate,
            _task: task,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_beyond_the_in_flight_limit_is_shed_and_the_node_stays_responsive() {
    const LIMIT: usize = 4;
    let mesh = one_node(|raw| raw.limits.max_in_flight_per_listener = Some(LIMIT)).await;
    let gate = GateAgent::start().await;
    mesh.nodes[0]
        .agents()
        .add(&RawAgent {
            tenant: "acme".into(),
            url: format!("http://{}", gate.addr),
            name: Some("gate".into()),
            skills: Some(vec![RawSkill {
                id: "wait".into(),
                tags: vec!["wait".into()],
                ..Default::default()
            }]),
            ..Default::default()
        })
        .await
        .expect("declared agent");
    eventually(Duration::from_secs(10), "gate routable", || {
        mesh.routable_everywhere("gate")
    })
    .await;
    let listener = format!("ingress:{}", mesh.ingress(0));
    let metrics = mesh.nodes[0].metrics().listeners.clone();
    let mesh = Arc::new(mesh);

    // The limit's worth of requests, held by the agent.
    let mut held = tokio::task::JoinSet::new();
    for i in 0..LIMIT {
        let mesh = mesh.clone();
        held.spawn(async move {
            mesh.call(0, "POST", "gate.acme.dmsc", "/", &[], format!("held {i}"))
                .await
        });
    }
    eventually(Duration::from_secs(20), "the agent holds the limit", || {
        gate.arrived.load(Ordering::SeqCst) == LIMIT
    })
    .await;

    // A burst on top: every one is shed at once, none reaches the agent.
    let burst = futures_util::future::join_all((0..12).map(|i| {
        let mesh = mesh.clone();
        async move {
            mesh.call(0, "POST", "gate.acme.dmsc", "/", &[], format!("burst {i}"))
                .await
                .expect("an answer, not a dropped connection")
        }
    }))
    .await;
    for (resp, body) in &burst {
        assert_eq!(resp.status(), 503, "{}", String::from_utf8_lossy(body));
        assert_eq!(resp.headers()["retry-after"], "1");
        assert_eq!(resp.headers()["content-type"], "application/problem+json");
        assert_eq!(resp.headers()["dmsc-error"], "overloaded");
        let v: serde_json::Value = serde_json::from_slice(body).expect("problem json");
        assert_eq!(v["status"], 503);
    }
    assert_eq!(gate.arrived.load(Ordering::SeqCst), LIMIT);
    assert_eq!(metrics.shed(&listener), 12);

    // Released, the held ones succeed, and the node answers normally right after.
    gate.gate.add_permits(1000);
    while let Some(r) = held.join_next().await {
        let (resp, body) = r.expect("task").expect("held request");
        assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    }
    for i in 0..LIMIT * 2 {
        let (resp, _) = mesh
            .call(0, "POST", "gate.acme.dmsc", "/", &[], format!("after {i}"))
            .await
            .expect("after");
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(metrics.shed(&listener), 12);
    // The count is on /metrics.
    let mut s = tokio::net::TcpStream::connect(mesh.nodes[0].bound().admin)
        .await
        .expect("admin");
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains(&format!(
            "dmsc_listener_requests_shed_total{{listener=\"{listener}\"}} 12"
        )),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_listener_limit_are_closed_at_once_and_counted() {
    // A header timeout longer than the test: any close seen here is a refusal.
    let mesh = LocalMesh::start(&["n0"], "acme", |_, raw| {
        raw.limits.header_read_timeout_ms = Some(120_000);
        raw.limits.max_connections_per_listener = Some(3);
    })
    .await
    .expect("mesh");
    let addr = mesh.ingress(0);
    let listener = format!("ingress:{addr}");
    let metrics = mesh.nodes[0].metrics().listeners.clone();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    eventually(Duration::from_secs(20), "three admitted", || {
        metrics.open(&listener) == 3
    })
    .await;
    let mut fourth = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(30), fourth.read(&mut buf))
        .await
        .expect("the fourth connection was held, not refused");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert_eq!(metrics.refused(&listener), 1);
    assert_eq!(metrics.timed_out(&listener, "header"), 0);
    // A freed slot admits the next client, which is served.
    drop(held.pop());
    eventually(Duration::from_secs(20), "a slot freed", || {
        metrics.open(&listener) == 2
    })
    .await;
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nhost: nobody.acme.dmsc\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    assert!(
        out.starts_with(b"HTTP/1.1 404"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tls_connection_is_closed_after_the_handshake() {
    let mesh = one_node(|raw| {
        raw.ingress.push(dmsc_node::config::RawIngress {
            listen: "127.0.0.1:0".into(),
            tls: Some(true),
            auth: Some(vec!["mtls".into()]),
            ..Default::default()
        })
    })
    .await;
    let addr = mesh.nodes[0].bound().ingress[1];
    let cfg =
        dmsc_node::demo::mesh::tls_client_config(&mesh.ca.cert_pem, None).expect("tls config");
    let t0 = Instant::now();
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").expect("name"),
            tcp,
        )
        .await
        .expect("handshake");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(60), tls.read(&mut buf))
        .await
        .expect("the node never closed an idle TLS connection");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(t0.elapsed() >= HEADER_TIMEOUT, "{:?}", t0.elapsed());
    let metrics = &mesh.nodes[0].metrics().listeners;
    assert_eq!(metrics.timed_out(&format!("ingress:{addr}"), "header"), 1);
    mesh.stop().await;
}
