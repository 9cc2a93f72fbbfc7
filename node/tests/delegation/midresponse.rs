//! A home node lost while its agent's response is on the way back
//! (docs/delegation.md, "Failures"): two agents with the same tag on two
//! home nodes, each answering with a head and a first part of the body and
//! then waiting on a gate. Whichever home node got the request has its
//! overlay shut down mid-response; only then does the gate open.
//!
//! An idempotent request (GET, or any method with `Idempotency-Key`) had
//! nothing handed to the caller yet (the ingress node holds a small
//! response back until it is whole), so it is retried on the other
//! candidate and the caller gets one complete answer. A POST without the
//! key is never sent again. A stream (SSE) is handed over as it comes, so a
//! cut after that reaches the caller as an error, never as a clean end.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dmsc_node::demo::mesh::LocalMesh;
use futures_util::stream;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{eventually, header, mesh3};

/// An HTTP/1.1 agent whose `/work` and `/events` answers stop after their
/// first part until the gate opens.
struct GatedAgent {
    /// Responses whose first part went out.
    started: Arc<AtomicUsize>,
    url: String,
    task: JoinHandle<()>,
}

impl Drop for GatedAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn card(name: &str, addr: SocketAddr) -> String {
    serde_json::json!({
        "name": name,
        "description": "answers slowly",
        "version": "1",
        "url": format!("http://{addr}/"),
        "capabilities": {"streaming": true},
        "defaultInputModes": ["text/plain"],
        "defaultOutputModes": ["text/plain"],
        "skills": [{"id": "slow", "name": "slow", "tags": ["slow"]}],
    })
    .to_string()
}

type AgentBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// The first part at once, the second when the gate is open.
fn gated(
    first: &'static str,
    second: &'static str,
    gate: watch::Receiver<bool>,
    started: Arc<AtomicUsize>,
) -> AgentBody {
    let s = stream::unfold(0u8, move |step| {
        let mut gate = gate.clone();
        let started = started.clone();
        async move {
            match step {
                0 => {
                    started.fetch_add(1, Ordering::SeqCst);
                    Some((Ok(Frame::data(Bytes::from_static(first.as_bytes()))), 1))
                }
                1 => {
                    let _ = gate.wait_for(|open| *open).await;
                    Some((Ok(Frame::data(Bytes::from_static(second.as_bytes()))), 2))
                }
                _ => None,
            }
        }
    });
    StreamBody::new(s).boxed()
}

async fn gated_agent(name: &'static str, gate: watch::Receiver<bool>) -> GatedAgent {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let started: Arc<AtomicUsize> = Arc::default();
    let count = started.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (gate, count) = (gate.clone(), count.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let (gate, count) = (gate.clone(), count.clone());
                    async move {
                        let resp = match req.uri().path() {
                            "/work" => hyper::Response::builder()
                                .header("content-type", "text/plain")
                                .body(gated("part1 ", "part2", gate, count)),
                            "/events" => hyper::Response::builder()
                                .header("content-type", "text/event-stream")
                                .body(gated("data: one\n\n", "data: two\n\n", gate, count)),
                            "/.well-known/agent-card.json" => {
                                hyper::Response::builder().body(card(name, addr).boxed())
                            }
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
    GatedAgent {
        started,
        url: format!("http://{addr}/"),
        task,
    }
}

/// The mesh (n0 ingress; `slow-a` on n1, `slow-b` on n2), the gate, and
/// the two agents.
async fn setup() -> (LocalMesh, watch::Sender<bool>, [GatedAgent; 2]) {
    let mesh = mesh3(|_, _| {}).await;
    let (gate, open) = watch::channel(false);
    let agents = [
        gated_agent("slow-a", open.clone()).await,
        gated_agent("slow-b", open).await,
    ];
    for (i, a) in agents.iter().enumerate() {
        mesh.attach(i + 1, &a.url, None).await.expect("attach");
    }
    eventually(Duration::from_secs(5), "both routable", || {
        mesh.routable_everywhere("slow-a") && mesh.routable_everywhere("slow-b")
    })
    .await;
    (mesh, gate, agents)
}

/// Waits until one agent sent its first part, shuts down the overlay of
/// that agent's home node, then opens the gate. Returns the index (0 or 1)
/// of the agent whose home node was lost.
async fn kill_the_home_mid_response(
    mesh: &LocalMesh,
    gate: &watch::Sender<bool>,
    agents: &[GatedAgent; 2],
) -> usize {
    eventually(Duration::from_secs(5), "an agent started answering", || {
        agents.iter().any(|a| a.started.load(Ordering::SeqCst) > 0)
    })
    .await;
    let victim = if agents[0].started.load(Ordering::SeqCst) > 0 {
        0
    } else {
        1
    };
    mesh.nodes[victim + 1].overlay().shutdown().await;
    let _ = gate.send(true);
    victim
}

/// Sends `method /work` with `headers` to n0 while the home node that got
/// it is lost mid-response: the call's result and the lost agent's index.
async fn lost_mid_response(
    method: &str,
    headers: &[(&str, &str)],
) -> (
    LocalMesh,
    [GatedAgent; 2],
    anyhow::Result<(hyper::Response<()>, Bytes)>,
    usize,
) {
    let (mesh, gate, agents) = setup().await;
    let (result, victim) = tokio::join!(
        mesh.call(0, method, "slow.cap.acme.dmsc", "/work", headers, "job"),
        kill_the_home_mid_response(&mesh, &gate, &agents),
    );
    (mesh, agents, result, victim)
}

fn survivor(victim: usize) -> (usize, String, String) {
    let s = 1 - victim;
    (
        s,
        format!("acme/slow-{}", ["a", "b"][s]),
        format!("n{}", s + 1),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_whose_home_node_dies_mid_response_is_answered_whole_by_another() {
    let (mesh, agents, result, victim) = lost_mid_response("GET", &[]).await;
    let (resp, body) = result.expect("a complete answer, not a cut one");
    let (s, agent, node) = survivor(victim);
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(&body[..], b"part1 part2");
    assert_eq!(header(&resp, "dmsc-agent"), agent);
    assert_eq!(header(&resp, "dmsc-node"), node);
    assert_eq!(agents[s].started.load(Ordering::SeqCst), 1);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_with_an_idempotency_key_is_retried_like_a_get() {
    let (mesh, agents, result, victim) =
        lost_mid_response("POST", &[("idempotency-key", "job-42")]).await;
    let (resp, body) = result.expect("a complete answer, not a cut one");
    let (s, agent, _) = survivor(victim);
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(&body[..], b"part1 part2");
    assert_eq!(header(&resp, "dmsc-agent"), agent);
    assert_eq!(agents[s].started.load(Ordering::SeqCst), 1);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_without_the_key_is_never_sent_again() {
    let (mesh, agents, result, victim) = lost_mid_response("POST", &[]).await;
    // The agent may have acted on it: the caller hears of a failure (a cut
    // body or an error status), never a complete 200, and never a retry.
    if let Ok((resp, body)) = &result {
        assert_ne!(
            (resp.status().as_u16(), &body[..]),
            (200, &b"part1 part2"[..]),
            "{resp:?}"
        );
        assert!(
            resp.status() != 200,
            "a clean 200 with a cut body: {:?}",
            String::from_utf8_lossy(body)
        );
    }
    let (s, _, _) = survivor(victim);
    assert_eq!(
        agents[s].started.load(Ordering::SeqCst),
        0,
        "sent again to the other candidate"
    );
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_after_it_reached_the_caller_ends_in_an_error() {
    let (mesh, gate, agents) = setup().await;
    // A stream is handed over as it comes: the first event arrives while
    // the agent still waits on the gate.
    let resp = mesh
        .send(
            0,
            "GET",
            "slow.cap.acme.dmsc",
            "/events",
            &[],
            dmsc_node::proto::http::empty(),
        )
        .await
        .expect("the head");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("the first event before the gate opens")
        .expect("a frame")
        .expect("not an error");
    assert_eq!(first.into_data().expect("data"), "data: one\n\n");
    let victim = kill_the_home_mid_response(&mesh, &gate, &agents).await;
    // The rest must fail, not end cleanly as if the stream were complete.
    let rest = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .expect("the cut reaches the caller");
    assert!(
        rest.is_err(),
        "a cut stream ended cleanly: {:?}",
        rest.map(|c| c.to_bytes())
    );
    let (s, _, _) = survivor(victim);
    assert_eq!(agents[s].started.load(Ordering::SeqCst), 0, "not retried");
    mesh.stop().await;
}
