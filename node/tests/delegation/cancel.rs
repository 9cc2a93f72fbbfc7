//! A caller that goes away while its answer streams through two nodes and
//! the agent is silent (SSE with long gaps, a watch, a long poll): the
//! home node learns it from the overlay stream at once (the calling node
//! stops it when its caller's connection goes) and drops the agent's
//! response, which closes the agent's HTTP/1.1 connection. The agent's
//! work ends then, not when it next writes (10 s on). gRPC over HTTP/2 is
//! in `grpc.rs`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::{eventually, mesh_of};

/// An HTTP/1.1 agent whose `/events` sends one event, then waits `GAP`
/// before the next.
struct SseAgent {
    url: String,
    /// Set when an `/events` body is dropped while it waits out the gap.
    dropped: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Drop for SseAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const GAP: Duration = Duration::from_secs(10);

/// Sets the flag when dropped before it is forgotten.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

type AgentBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn events(dropped: Arc<AtomicBool>) -> AgentBody {
    let s = stream::unfold(0u8, move |step| {
        let dropped = dropped.clone();
        async move {
            match step {
                0 => Some((Ok(Frame::data(Bytes::from_static(b"data: one\n\n"))), 1)),
                1 => {
                    let flag = DropFlag(dropped);
                    tokio::time::sleep(GAP).await;
                    std::mem::forget(flag);
                    Some((Ok(Frame::data(Bytes::from_static(b"data: two\n\n"))), 2))
                }
                _ => None,
            }
        }
    });
    StreamBody::new(s).boxed()
}

async fn sse_agent(name: &'static str) -> SseAgent {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let dropped: Arc<AtomicBool> = Arc::default();
    let flag = dropped.clone();
    let card = serde_json::json!({
        "name": name,
        "description": "streams events with long gaps",
        "version": "1",
        "url": format!("http://{addr}/"),
        "capabilities": {"streaming": true},
        "defaultInputModes": ["text/plain"],
        "defaultOutputModes": ["text/event-stream"],
        "skills": [{"id": "watch", "name": "watch", "tags": ["watch"]}],
    })
    .to_string();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (flag, card) = (flag.clone(), card.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let (flag, card) = (flag.clone(), card.clone());
                    async move {
                        let resp = match req.uri().path() {
                            "/events" => hyper::Response::builder()
                                .header("content-type", "text/event-stream")
                                .body(events(flag)),
                            "/.well-known/agent-card.json" => hyper::Response::builder()
                                .header("content-type", "application/json")
                                .body(card.boxed()),
                            _ => hyper::Response::builder().body("ok".to_string().boxed()),
                        };
                        Ok::<_, Infallible>(resp.expect("response"))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    SseAgent {
        url: format!("http://{addr}/"),
        dropped,
        task,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_caller_that_leaves_while_the_agent_is_silent_ends_the_agents_response() {
    let mesh = mesh_of(&["n0", "n1"], |_, _| {}).await;
    let agent = sse_agent("watcher").await;
    mesh.attach(1, &agent.url, None).await.expect("attach");
    eventually(Duration::from_secs(5), "routable", || {
        mesh.routable_everywhere("watcher")
    })
    .await;
    // A plain HTTP/1.1 caller of node 0 (the agent is on node 1).
    let mut caller = tokio::net::TcpStream::connect(mesh.ingress(0))
        .await
        .expect("connect");
    caller
        .write_all(
            b"GET /events HTTP/1.1\r\nhost: watcher.acme.dmsc\r\naccept: text/event-stream\r\n\r\n",
        )
        .await
        .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("data: one") {
        let n = tokio::time::timeout(Duration::from_secs(5), caller.read(&mut buf))
            .await
            .expect("the first event in time")
            .expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&got);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("dmsc-node: n1"), "{head}");
    assert!(!agent.dropped.load(Ordering::SeqCst));
    // The caller goes away.
    drop(caller);
    eventually(
        Duration::from_secs(2),
        "the agent's response is dropped long before its next event (10 s)",
        || agent.dropped.load(Ordering::SeqCst),
    )
    .await;
    let home = mesh.nodes[1].metrics().delegation.inbound.clone();
    eventually(
        Duration::from_secs(2),
        "the home node counts the delegation as cancelled",
        || {
            home.get_or_create(&dmsc_node::metrics::DelegationLabels {
                tenant: "acme".into(),
                outcome: "cancelled".into(),
            })
            .get()
                == 1
        },
    )
    .await;
    mesh.stop().await;
}
