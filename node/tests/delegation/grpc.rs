//! gRPC through the mesh, to a server that speaks only HTTP/2: tonic's
//! default `Server::builder()` with the real `tonic-health` service,
//! declared on node 1 with nothing but tenant, name, url and skills. The
//! node's health checks must find out that it speaks gRPC (its HTTP/1.1
//! probe is answered with an HTTP/2 GOAWAY), follow its serving status, and
//! node 1 must call it over HTTP/2 even for an HTTP/1.1 caller. A real tonic
//! client talks h2c to node 0's ingress with `:authority` =
//! `greeter.acme.dmsc`; the call crosses QUIC to node 1. Replies, the three
//! streaming kinds, statuses in trailers and deadlines must arrive intact.
//!
//! No protoc: the messages are hand-written prost structs, the Greeter is
//! a small hand-written tower `Service` with `NamedService` that hands each
//! method to tonic's low-level `server::Grpc`, and the client is
//! `client::Grpc` with the prost codec.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use dmsc_node::config::{RawAgent, RawSkill};
use dmsc_node::demo::mesh::LocalMesh;
use dmsc_node::forward::local::Protocol;
use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream, StreamExt};
use http_body_util::BodyExt;
use hyper::http::uri::PathAndQuery;
use hyper::{HeaderMap, Version};
use prost::Message;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::server::{
    ClientStreamingService, NamedService, ServerStreamingService, StreamingService, UnaryService,
};
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Status, Streaming};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tonic_prost::ProstCodec;

use super::eventually;

const SAY_HELLO: &str = "/greet.Greeter/SayHello";
const SAY_HELLOS: &str = "/greet.Greeter/SayHellos";
const COLLECT_HELLOS: &str = "/greet.Greeter/CollectHellos";
const CHAT: &str = "/greet.Greeter/Chat";
const AGENT: &str = "greeter";

#[derive(Clone, PartialEq, prost::Message)]
struct HelloRequest {
    #[prost(string, tag = "1")]
    name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct HelloReply {
    #[prost(string, tag = "1")]
    message: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct HellosRequest {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(uint32, tag = "2")]
    count: u32,
    /// End the stream with an error status after the messages.
    #[prost(bool, tag = "3")]
    fail_at_end: bool,
    /// Milliseconds between messages (a watch that is mostly silent);
    /// 0: all at once.
    #[prost(uint32, tag = "4")]
    gap_ms: u32,
}

/// What the server saw: every Greeter call (path, HTTP version, headers)
/// and whether the slow call's handler, or a stream waiting out its gap,
/// was dropped before it finished.
#[derive(Default)]
struct Log {
    calls: Mutex<Vec<(String, Version, HeaderMap)>>,
    slow_dropped: AtomicBool,
    gap_dropped: AtomicBool,
}

impl Log {
    fn calls(&self) -> Vec<(String, Version, HeaderMap)> {
        self.calls.lock().expect("log lock").clone()
    }
}

/// Sets one of the log's flags when the handler is dropped (cancelled)
/// before it ends.
struct DropFlag(Arc<Log>, fn(&Log) -> &AtomicBool);

impl Drop for DropFlag {
    fn drop(&mut self) {
        (self.1)(&self.0).store(true, Ordering::SeqCst);
    }
}

/// `SayHello`: greets; `NOT_FOUND` for "nobody"; "slow" takes a minute.
struct SayHello(Arc<Log>);

impl UnaryService<HelloRequest> for SayHello {
    type Response = HelloReply;
    type Future = BoxFuture<'static, Result<tonic::Response<HelloReply>, Status>>;

    fn call(&mut self, request: tonic::Request<HelloRequest>) -> Self::Future {
        let log = self.0.clone();
        Box::pin(async move {
            let name = request.into_inner().name;
            match name.as_str() {
                "nobody" => Err(Status::not_found("no such name")),
                "nap" => {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    Ok(tonic::Response::new(HelloReply {
                        message: "hello, nap".into(),
                    }))
                }
                "slow" => {
                    let flag = DropFlag(log, |l| &l.slow_dropped);
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    std::mem::forget(flag);
                    Err(Status::internal("the slow call was never cancelled"))
                }
                _ => Ok(tonic::Response::new(HelloReply {
                    message: format!("hello, {name}"),
                })),
            }
        })
    }
}

/// `SayHellos`: `count` greetings, then OK or (on request) `RESOURCE_EXHAUSTED`;
/// with a gap, the first at once and each next one `gap_ms` later.
struct SayHellos(Arc<Log>);

type Replies = BoxStream<'static, Result<HelloReply, Status>>;

impl ServerStreamingService<HellosRequest> for SayHellos {
    type Response = HelloReply;
    type ResponseStream = Replies;
    type Future = Ready<Result<tonic::Response<Replies>, Status>>;

    fn call(&mut self, request: tonic::Request<HellosRequest>) -> Self::Future {
        let r = request.into_inner();
        let mut items: Vec<Result<HelloReply, Status>> = (1..=r.count)
            .map(|i| {
                Ok(HelloReply {
                    message: format!("hello #{i}, {}", r.name),
                })
            })
            .collect();
        if r.fail_at_end {
            items.push(Err(Status::resource_exhausted("out of greetings")));
        }
        if r.gap_ms > 0 {
            let gap = Duration::from_millis(r.gap_ms.into());
            let log = self.0.clone();
            let paced = stream::iter(items).enumerate().then(move |(i, item)| {
                let log = log.clone();
                async move {
                    if i > 0 {
                        // Dropped while silent: the call was cancelled.
                        let flag = DropFlag(log, |l| &l.gap_dropped);
                        tokio::time::sleep(gap).await;
                        std::mem::forget(flag);
                    }
                    item
                }
            });
            return ready(Ok(tonic::Response::new(paced.boxed())));
        }
        ready(Ok(tonic::Response::new(stream::iter(items).boxed())))
    }
}

/// `CollectHellos` (client streaming): one greeting for all the names sent.
struct CollectHellos;

impl ClientStreamingService<HelloRequest> for CollectHellos {
    type Response = HelloReply;
    type Future = BoxFuture<'static, Result<tonic::Response<HelloReply>, Status>>;

    fn call(&mut self, request: tonic::Request<Streaming<HelloRequest>>) -> Self::Future {
        Box::pin(async move {
            let mut names = Vec::new();
            let mut s = request.into_inner();
            while let Some(m) = s.message().await? {
                names.push(m.name);
            }
            Ok(tonic::Response::new(HelloReply {
                message: format!("hello, {}", names.join(" and ")),
            }))
        })
    }
}

/// `Chat` (bidirectional): answers each message as it comes.
struct Chat;

impl StreamingService<HelloRequest> for Chat {
    type Response = HelloReply;
    type ResponseStream = Replies;
    type Future = Ready<Result<tonic::Response<Replies>, Status>>;

    fn call(&mut self, request: tonic::Request<Streaming<HelloRequest>>) -> Self::Future {
        let replies = stream::unfold(Some(request.into_inner()), |s| async move {
            let mut s = s?;
            match s.message().await {
                Ok(Some(m)) => Some((
                    Ok(HelloReply {
                        message: format!("hi {}", m.name),
                    }),
                    Some(s),
                )),
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        });
        ready(Ok(tonic::Response::new(replies.boxed())))
    }
}

/// The Greeter service: routes its four methods to tonic's `server::Grpc`.
#[derive(Clone)]
struct Greeter(Arc<Log>);

impl NamedService for Greeter {
    const NAME: &'static str = "greet.Greeter";
}

impl tower_service::Service<hyper::Request<tonic::body::Body>> for Greeter {
    type Response = hyper::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: hyper::Request<tonic::body::Body>) -> Self::Future {
        let log = self.0.clone();
        Box::pin(async move {
            let path = req.uri().path().to_string();
            log.calls.lock().expect("log lock").push((
                path.clone(),
                req.version(),
                req.headers().clone(),
            ));
            Ok(match path.as_str() {
                SAY_HELLO => {
                    tonic::server::Grpc::new(ProstCodec::<HelloReply, HelloRequest>::default())
                        .unary(SayHello(log), req)
                        .await
                }
                SAY_HELLOS => {
                    tonic::server::Grpc::new(ProstCodec::<HelloReply, HellosRequest>::default())
                        .server_streaming(SayHellos(log), req)
                        .await
                }
                COLLECT_HELLOS => {
                    tonic::server::Grpc::new(ProstCodec::<HelloReply, HelloRequest>::default())
                        .client_streaming(CollectHellos, req)
                        .await
                }
                CHAT => {
                    tonic::server::Grpc::new(ProstCodec::<HelloReply, HelloRequest>::default())
                        .streaming(Chat, req)
                        .await
                }
                _ => Status::unimplemented("no such method").into_http(),
            })
        })
    }
}

/// A tonic server on loopback from the default builder (HTTP/2 only).
pub(super) struct GreeterServer {
    pub(super) addr: SocketAddr,
    log: Arc<Log>,
    /// `None` for a server without the health service.
    health: Option<HealthReporter>,
    /// TCP connections accepted (every probe over HTTP/1.1 is one).
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for GreeterServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(super) async fn greeter_server(with_health: bool) -> GreeterServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let log = Arc::new(Log::default());
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let incoming = stream::unfold(listener, move |l| {
        let counter = counter.clone();
        async move {
            let conn = l.accept().await.map(|(s, _)| {
                counter.fetch_add(1, Ordering::SeqCst);
                s
            });
            Some((conn, l))
        }
    });
    let mut builder = Server::builder();
    let (router, health) = if with_health {
        let (reporter, service) = tonic_health::server::health_reporter();
        let router = builder
            .add_service(service)
            .add_service(Greeter(log.clone()));
        (router, Some(reporter))
    } else {
        (builder.add_service(Greeter(log.clone())), None)
    };
    let task = tokio::spawn(async move {
        router
            .serve_with_incoming(Box::pin(incoming))
            .await
            .expect("greeter server");
    });
    GreeterServer {
        addr,
        log,
        health,
        accepted,
        task,
    }
}

/// The agent as a user declares it: tenant, name, url and skills.
pub(super) fn declared(addr: SocketAddr) -> RawAgent {
    RawAgent {
        tenant: "acme".into(),
        url: format!("http://{addr}"),
        name: Some(AGENT.into()),
        skills: Some(vec![RawSkill {
            id: "greet".into(),
            tags: vec!["greeting".into()],
            ..Default::default()
        }]),
        ..Default::default()
    }
}

/// A mesh of `names` whose last node is home to `agent`.
async fn mesh_with(names: &[&str], agent: RawAgent) -> LocalMesh {
    let home = names.len() - 1;
    LocalMesh::start(names, "acme", |i, raw| {
        raw.gossip.interval_ms = Some(100);
        raw.delegation.health_interval_ms = Some(200);
        raw.delegation.load_interval_ms = Some(100);
        if i == home {
            raw.agents = vec![agent.clone()];
        }
    })
    .await
    .expect("mesh")
}

/// The agent's health as node `i`'s status reports it.
fn health_on(mesh: &LocalMesh, i: usize) -> String {
    mesh.nodes[i]
        .agent_statuses()
        .into_iter()
        .find(|a| a.name == AGENT)
        .map(|a| a.health)
        .unwrap_or_default()
}

/// What the home node `i` knows of the agent's protocol.
fn protocol_on(mesh: &LocalMesh, i: usize) -> Option<Protocol> {
    let id = dmsc_registry::AgentId {
        tenant: "acme".into(),
        name: AGENT.into(),
    };
    mesh.nodes[i]
        .agents()
        .agents
        .get(&id)
        .and_then(|a| a.protocol.current())
}

/// h2c with prior knowledge to node `i`'s ingress; `:authority` names the agent.
async fn client_to(mesh: &LocalMesh, i: usize) -> tonic::client::Grpc<Channel> {
    let channel = Endpoint::from_shared(format!("http://{}", mesh.ingress(i)))
        .expect("endpoint")
        .origin("http://greeter.acme.dmsc".parse().expect("origin"))
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(20))
        .connect()
        .await
        .expect("connect to ingress");
    tonic::client::Grpc::new(channel)
}

fn metadata(md: &tonic::metadata::MetadataMap, key: &str) -> String {
    md.get(key)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

async fn say_hello(
    client: &mut tonic::client::Grpc<Channel>,
    request: tonic::Request<HelloRequest>,
) -> Result<tonic::Response<HelloReply>, Status> {
    client.ready().await.expect("channel ready");
    client
        .unary(
            request,
            PathAndQuery::from_static(SAY_HELLO),
            ProstCodec::<HelloRequest, HelloReply>::default(),
        )
        .await
}

fn hello(name: &str) -> tonic::Request<HelloRequest> {
    tonic::Request::new(HelloRequest { name: name.into() })
}

/// One length-prefixed gRPC message.
fn grpc_frame(m: &impl Message) -> Vec<u8> {
    let msg = m.encode_to_vec();
    let mut v = vec![0];
    v.extend_from_slice(&u32::try_from(msg.len()).expect("small").to_be_bytes());
    v.extend_from_slice(&msg);
    v
}

/// `SayHello(name)` from an HTTP/1.1 caller of node `i` (gRPC framing by
/// hand), with headers HTTP/2 forbids; the reply's message.
async fn say_hello_over_http1(mesh: &LocalMesh, i: usize, name: &str) -> String {
    let resp = mesh
        .send(
            i,
            "POST",
            "greeter.acme.dmsc",
            SAY_HELLO,
            &[
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("connection", "keep-alive, x-hop"),
                ("keep-alive", "timeout=5"),
                ("x-hop", "1"),
            ],
            dmsc_node::proto::http::full(grpc_frame(&HelloRequest { name: name.into() })),
        )
        .await
        .expect("HTTP/1.1 call through the mesh");
    assert_eq!(resp.status(), 200, "{resp:?}");
    assert_eq!(resp.version(), Version::HTTP_11);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let msg = body.get(5..).expect("one gRPC message");
    assert_eq!(
        usize::try_from(u32::from_be_bytes(body[1..5].try_into().expect("4 bytes"))),
        Ok(msg.len()),
        "{body:?}"
    );
    HelloReply::decode(msg).expect("HelloReply").message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_only_grpc_server_is_healthy_and_called_through_two_nodes() {
    let server = greeter_server(true).await;
    let mesh = mesh_with(&["n0", "n1"], declared(server.addr)).await;
    eventually(
        Duration::from_secs(15),
        "node 1 finds out the agent speaks gRPC and node 0 sees it healthy",
        || protocol_on(&mesh, 1) == Some(Protocol::Grpc) && health_on(&mesh, 0) == "healthy",
    )
    .await;
    // The home node's agent table says what it found.
    let on_home = mesh.nodes[1]
        .agent_statuses()
        .into_iter()
        .find(|a| a.name == AGENT)
        .expect("listed");
    assert_eq!(on_home.protocol.as_deref(), Some("grpc"));
    let mut client = client_to(&mesh, 0).await;

    // Unary: the reply, and the mesh's headers in the response metadata
    // (tonic merges the trailers in: `grpc-status: 0` came back through both
    // nodes in the HTTP/2 trailers, after the message).
    let reply = say_hello(&mut client, hello("ada"))
        .await
        .expect("unary SayHello through the mesh");
    assert_eq!(reply.get_ref().message, "hello, ada");
    let md = reply.metadata();
    assert_eq!(metadata(md, "dmsc-agent"), "acme/greeter", "{md:?}");
    assert_eq!(metadata(md, "grpc-status"), "0", "{md:?}");
    assert_eq!(metadata(md, "dmsc-node"), "n1", "{md:?}");

    // An error status set by the server arrives intact (tonic answers a
    // failed unary call trailers-only: grpc-status in the one HEADERS frame).
    let status = say_hello(&mut client, hello("nobody"))
        .await
        .expect_err("SayHello(nobody) must fail");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(status.message(), "no such name", "{status:?}");
    assert_eq!(
        metadata(status.metadata(), "dmsc-agent"),
        "acme/greeter",
        "{status:?}"
    );

    // Server streaming: every message, in order, then OK in the trailers.
    let streaming = PathAndQuery::from_static(SAY_HELLOS);
    client.ready().await.expect("channel ready");
    let resp = client
        .server_streaming(
            tonic::Request::new(HellosRequest {
                name: "bob".into(),
                count: 5,
                fail_at_end: false,
                gap_ms: 0,
            }),
            streaming.clone(),
            ProstCodec::<HellosRequest, HelloReply>::default(),
        )
        .await
        .expect("server streaming SayHellos through the mesh");
    assert_eq!(metadata(resp.metadata(), "dmsc-agent"), "acme/greeter");
    let mut stream = resp.into_inner();
    let mut got = Vec::new();
    while let Some(m) = stream.message().await.expect("stream message") {
        got.push(m.message);
    }
    let want: Vec<String> = (1..=5).map(|i| format!("hello #{i}, bob")).collect();
    assert_eq!(got, want);
    let trailers = stream
        .trailers()
        .await
        .expect("trailers")
        .expect("the stream ends with trailers");
    assert_eq!(metadata(&trailers, "grpc-status"), "0", "{trailers:?}");

    // A stream that ends in an error: the messages first, then the status,
    // which can only travel in the HTTP/2 trailers.
    client.ready().await.expect("channel ready");
    let resp = client
        .server_streaming(
            tonic::Request::new(HellosRequest {
                name: "eve".into(),
                count: 2,
                fail_at_end: true,
                gap_ms: 0,
            }),
            streaming,
            ProstCodec::<HellosRequest, HelloReply>::default(),
        )
        .await
        .expect("server streaming SayHellos (failing) through the mesh");
    let mut stream = resp.into_inner();
    let mut got = Vec::new();
    let status = loop {
        match stream.message().await {
            Ok(Some(m)) => got.push(m.message),
            Ok(None) => panic!("stream ended OK after {got:?}; expected RESOURCE_EXHAUSTED"),
            Err(status) => break status,
        }
    };
    assert_eq!(got, ["hello #1, eve", "hello #2, eve"]);
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(status.message(), "out of greetings", "{status:?}");

    // Client streaming: three messages up, one reply down.
    client.ready().await.expect("channel ready");
    let names = ["ann", "ben", "cy"].map(|n| HelloRequest { name: n.into() });
    let reply = client
        .client_streaming(
            tonic::Request::new(stream::iter(names)),
            PathAndQuery::from_static(COLLECT_HELLOS),
            ProstCodec::<HelloRequest, HelloReply>::default(),
        )
        .await
        .expect("client streaming CollectHellos through the mesh");
    assert_eq!(reply.get_ref().message, "hello, ann and ben and cy");

    // Bidirectional: each answer comes back before the next message is
    // sent, so both directions stream through both nodes.
    let (tx, rx) = tokio::sync::mpsc::channel::<HelloRequest>(1);
    let outbound = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    tx.send(HelloRequest { name: "one".into() })
        .await
        .expect("send");
    client.ready().await.expect("channel ready");
    let resp = client
        .streaming(
            tonic::Request::new(outbound),
            PathAndQuery::from_static(CHAT),
            ProstCodec::<HelloRequest, HelloReply>::default(),
        )
        .await
        .expect("bidi Chat through the mesh");
    let mut inbound = resp.into_inner();
    for name in ["one", "two", "three"] {
        if name != "one" {
            tx.send(HelloRequest { name: name.into() })
                .await
                .expect("send");
        }
        let m = inbound
            .message()
            .await
            .expect("chat reply")
            .expect("a reply before the stream ends");
        assert_eq!(m.message, format!("hi {name}"));
    }
    drop(tx);
    assert!(inbound.message().await.expect("clean end").is_none());
    let trailers = inbound.trailers().await.expect("trailers").expect("some");
    assert_eq!(metadata(&trailers, "grpc-status"), "0", "{trailers:?}");

    // A deadline: the client's grpc-timeout reaches the agent through both
    // nodes, and the call is given up on (by whichever side's timer fires
    // first): the agent's handler is dropped long before its minute is up.
    let mut slow = hello("slow");
    slow.set_timeout(Duration::from_millis(300));
    let status = say_hello(&mut client, slow)
        .await
        .expect_err("the slow call must miss its deadline");
    assert!(
        matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{status:?}"
    );
    eventually(
        Duration::from_secs(30),
        "the agent's slow handler is cancelled",
        || server.log.slow_dropped.load(Ordering::SeqCst),
    )
    .await;

    // Node 1 spoke HTTP/2 (h2c) to the agent for every gRPC call.
    let calls = server.log.calls();
    assert_eq!(calls.len(), 7, "{calls:?}");
    assert!(
        calls.iter().all(|(_, v, _)| *v == Version::HTTP_2),
        "gRPC calls reached the agent as {calls:?}"
    );
    let (_, _, slow_headers) = calls
        .iter()
        .find(|(p, _, h)| p == SAY_HELLO && h.contains_key("grpc-timeout"))
        .expect("the slow call carried its grpc-timeout to the agent");
    assert!(
        slow_headers["grpc-timeout"]
            .to_str()
            .is_ok_and(|v| v.ends_with('m') || v.ends_with('u') || v.ends_with('n')),
        "{slow_headers:?}"
    );

    // An HTTP/1.1 caller reaches the HTTP/2-only agent too: node 1 calls it
    // over HTTP/2, without the headers HTTP/2 forbids.
    let reply = say_hello_over_http1(&mesh, 0, "h1").await;
    assert_eq!(reply, "hello, h1");
    let calls = server.log.calls();
    let (_, version, headers) = calls.last().expect("the HTTP/1.1 call");
    assert_eq!(*version, Version::HTTP_2, "{headers:?}");
    for h in ["connection", "keep-alive", "x-hop"] {
        assert!(
            !headers.contains_key(h),
            "`{h}` reached the agent: {headers:?}"
        );
    }

    // NOT_SERVING: the agent leaves the candidate set (node 1's status says
    // unhealthy; node 0 answers "none available" without trying it).
    let reporter = server.health.as_ref().expect("health service");
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    eventually(
        Duration::from_secs(15),
        "NOT_SERVING shows as unhealthy on both nodes",
        || health_on(&mesh, 1) == "unhealthy" && health_on(&mesh, 0) == "unhealthy",
    )
    .await;
    let before = server.log.calls().len();
    let (resp, _) = mesh
        .call(0, "POST", "greeter.acme.dmsc", SAY_HELLO, &[], "x")
        .await
        .expect("call while NOT_SERVING");
    assert_eq!(resp.status(), 503, "{resp:?}");
    assert_eq!(resp.headers()["dmsc-error"], "none-available", "{resp:?}");
    let status = say_hello(&mut client, hello("ada"))
        .await
        .expect_err("no candidate while NOT_SERVING");
    // A gRPC caller gets the mesh's answer as a gRPC status.
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("none-available"), "{status:?}");
    assert_eq!(
        metadata(status.metadata(), "dmsc-error"),
        "none-available",
        "{status:?}"
    );
    assert_eq!(server.log.calls().len(), before, "the agent was not called");

    // Back to SERVING: it returns.
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    eventually(
        Duration::from_secs(15),
        "SERVING shows as healthy on node 0",
        || health_on(&mesh, 0) == "healthy",
    )
    .await;
    let reply = say_hello(&mut client, hello("again"))
        .await
        .expect("called again once SERVING");
    assert_eq!(reply.get_ref().message, "hello, again");

    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_server_without_the_health_service_is_alive() {
    let server = greeter_server(false).await;
    let mesh = mesh_with(&["n0"], declared(server.addr)).await;
    eventually(
        Duration::from_secs(15),
        "UNIMPLEMENTED health check: alive, and gRPC",
        || protocol_on(&mesh, 0) == Some(Protocol::Grpc) && health_on(&mesh, 0) == "healthy",
    )
    .await;
    let mut client = client_to(&mesh, 0).await;
    let reply = say_hello(&mut client, hello("ada"))
        .await
        .expect("unary SayHello");
    assert_eq!(reply.get_ref().message, "hello, ada");
    mesh.stop().await;
}

/// Plain HTTP requests to a gRPC server (a curl, a monitoring probe) are
/// the caller's mistake: refused with the reason, never charged to the
/// agent, whose gRPC callers are still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_a_grpc_server_is_the_callers_mistake() {
    let server = greeter_server(true).await;
    let mesh = mesh_with(&["n0", "n1"], declared(server.addr)).await;
    eventually(
        Duration::from_secs(15),
        "node 1 finds out the agent speaks gRPC and node 0 sees it healthy",
        || protocol_on(&mesh, 1) == Some(Protocol::Grpc) && health_on(&mesh, 0) == "healthy",
    )
    .await;
    for i in 0..8 {
        let method = if i % 2 == 0 { "GET" } else { "POST" };
        let (resp, body) = mesh
            .call(0, method, "greeter.acme.dmsc", "/", &[], "x")
            .await
            .expect("call");
        let body = String::from_utf8_lossy(&body);
        assert_eq!(resp.status(), 400, "#{i}: {body}");
        assert!(body.contains("is a gRPC server"), "#{i}: {body}");
    }
    let id = dmsc_registry::AgentId::new("acme", AGENT);
    for i in [0, 1] {
        assert_eq!(
            mesh.nodes[i].mesh().circuit_state(&id).to_string(),
            "closed",
            "node {i}"
        );
    }
    let mut client = client_to(&mesh, 0).await;
    let reply = say_hello(&mut client, hello("ada"))
        .await
        .expect("unary SayHello after the plain requests");
    assert_eq!(reply.get_ref().message, "hello, ada");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_protocol_is_the_only_one_probed() {
    // The same HTTP/2-only server pinned to `http1`: never probed over
    // HTTP/2, so it never becomes healthy, round after round.
    let server = greeter_server(true).await;
    let mut agent = declared(server.addr);
    agent.protocol = Some("http1".into());
    let mesh = mesh_with(&["n0"], agent).await;
    eventually(
        Duration::from_secs(30),
        "several HTTP/1.1 health checks",
        || server.accepted.load(Ordering::SeqCst) >= 4,
    )
    .await;
    assert_eq!(health_on(&mesh, 0), "unhealthy");
    assert_eq!(protocol_on(&mesh, 0), Some(Protocol::Http1));
    mesh.stop().await;

    // Pinned to `grpc`, it is healthy at once (no HTTP/1.1 probe first).
    let server = greeter_server(true).await;
    let mut agent = declared(server.addr);
    agent.protocol = Some("grpc".into());
    let mesh = mesh_with(&["n0"], agent).await;
    eventually(Duration::from_secs(15), "pinned gRPC agent healthy", || {
        health_on(&mesh, 0) == "healthy"
    })
    .await;
    assert_eq!(
        server.accepted.load(Ordering::SeqCst),
        1,
        "one HTTP/2 connection, pooled; no HTTP/1.1 probe"
    );
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_added_through_the_admin_api_is_probed_before_its_first_call() {
    // No health round after the start (the interval is a minute): what the
    // node knows of the new agent, it learnt while onboarding it.
    let server = greeter_server(true).await;
    let mesh = LocalMesh::start(&["n0"], "acme", |_, raw| {
        raw.delegation.health_interval_ms = Some(60_000);
    })
    .await
    .expect("mesh");
    let admin = mesh.nodes[0].bound().admin;
    let client = dmsc_node::forward::client::Upstream::new();
    let post = |spec: serde_json::Value| {
        hyper::Request::post(format!("http://{admin}/v1/agents"))
            .header("authorization", format!("Bearer {}", mesh.admin_token(0)))
            .body(dmsc_node::proto::http::full(spec.to_string()))
            .expect("request")
    };
    let spec = serde_json::json!({
        "tenant": "acme",
        "url": format!("http://{}", server.addr),
        "name": AGENT,
        "skills": [{"id": "greet"}],
    });
    let mut bad = spec.clone();
    bad["protocol"] = "http2".into();
    let resp = client.h1.request(post(bad)).await.expect("post");
    assert_eq!(resp.status(), 400);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("must be `grpc`, `h2c`, `http1` or `mqtt`"),
        "{body:?}"
    );

    let resp = client.h1.request(post(spec)).await.expect("post");
    assert_eq!(resp.status(), 201);
    assert_eq!(protocol_on(&mesh, 0), Some(Protocol::Grpc));
    assert_eq!(health_on(&mesh, 0), "healthy");
    // So the first HTTP/1.1 caller already reaches it over HTTP/2.
    assert_eq!(
        say_hello_over_http1(&mesh, 0, "first").await,
        "hello, first"
    );
    mesh.stop().await;
}

/// The A2A card the plain h2c server serves.
fn h2_card(addr: SocketAddr) -> String {
    serde_json::json!({
        "name": "h2-only",
        "description": "an agent that speaks only HTTP/2",
        "version": "1",
        "url": format!("http://{addr}/"),
        "capabilities": {},
        "defaultInputModes": ["text/plain"],
        "defaultOutputModes": ["text/plain"],
        "skills": [{"id": "echo", "name": "echo", "tags": ["echo"]}],
    })
    .to_string()
}

/// A plain HTTP server that speaks only HTTP/2 (h2c), not gRPC: answers
/// the gRPC health method with a 404 page, serves an A2A card, and answers
/// anything else with its path.
async fn plain_h2c_server() -> (
    SocketAddr,
    Arc<Mutex<Vec<(String, Version)>>>,
    JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let seen: Arc<Mutex<Vec<(String, Version)>>> = Arc::default();
    let log = seen.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let path = req.uri().path().to_string();
                    log.lock()
                        .expect("log lock")
                        .push((path.clone(), req.version()));
                    let mut resp = if path == "/.well-known/agent-card.json" {
                        hyper::Response::new(dmsc_node::proto::http::full(h2_card(addr)))
                    } else {
                        hyper::Response::new(dmsc_node::proto::http::full(format!("h2c {path}")))
                    };
                    if path.starts_with("/grpc.") {
                        *resp.status_mut() = hyper::StatusCode::NOT_FOUND;
                    }
                    ready(Ok::<_, Infallible>(resp))
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
            });
        }
    });
    (addr, seen, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_only_server_that_is_not_grpc_is_found_as_h2c() {
    let (addr, seen, server) = plain_h2c_server().await;
    let mesh = mesh_with(&["n0"], declared(addr)).await;
    eventually(
        Duration::from_secs(15),
        "not gRPC (404, no grpc-status), but alive over h2c",
        || protocol_on(&mesh, 0) == Some(Protocol::H2c) && health_on(&mesh, 0) == "healthy",
    )
    .await;
    let (resp, body) = mesh
        .call(0, "GET", "greeter.acme.dmsc", "/hello", &[], "")
        .await
        .expect("HTTP/1.1 call");
    assert_eq!(resp.status(), 200, "{resp:?}");
    assert_eq!(&body[..], b"h2c /hello");
    let seen = seen.lock().expect("log lock").clone();
    assert!(
        seen.iter()
            .any(|(p, _)| p == "/grpc.health.v1.Health/Check")
            && seen.iter().any(|(p, _)| p == "/"),
        "probed with gRPC health, then the health path: {seen:?}"
    );
    assert_eq!(
        seen.last(),
        Some(&("/hello".to_string(), Version::HTTP_2)),
        "{seen:?}"
    );
    mesh.stop().await;
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_only_agent_with_a_card_onboards_with_nothing_but_its_url() {
    let (addr, seen, server) = plain_h2c_server().await;
    let mesh = LocalMesh::start(&["n0"], "acme", |_, _| {})
        .await
        .expect("mesh");
    // No skills, no pin: the card can only come over HTTP/2.
    let id = mesh
        .attach(0, &format!("http://{addr}"), None)
        .await
        .expect("onboarded: the card came over h2c");
    assert_eq!(id, "acme/h2-only");
    let (resp, body) = mesh
        .call(0, "GET", "h2-only.acme.dmsc", "/hello", &[], "")
        .await
        .expect("HTTP/1.1 call");
    assert_eq!(resp.status(), 200, "{resp:?}");
    assert_eq!(&body[..], b"h2c /hello");
    let seen = seen.lock().expect("log lock").clone();
    assert!(
        seen.contains(&("/.well-known/agent-card.json".to_string(), Version::HTTP_2)),
        "{seen:?}"
    );
    mesh.stop().await;
    server.abort();
}

/// An agent that speaks HTTP/1.1 only, as uvicorn or Node's `http` serve,
/// and callers that speak HTTP/2 (curl over TLS negotiates it): the node
/// calls the agent over HTTP/1.1, on the home node and through the overlay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_only_agent_is_reached_by_http2_callers() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen: Arc<Mutex<Vec<(hyper::Method, Version)>>> = Arc::default();
    let log = seen.clone();
    let server = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        async move {
                            log.lock()
                                .expect("log")
                                .push((req.method().clone(), req.version()));
                            let body = req.into_body().collect().await.expect("body").to_bytes();
                            Ok::<_, Infallible>(hyper::Response::new(dmsc_node::proto::http::full(
                                body,
                            )))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    let mesh = mesh_with(&["caller", "home"], declared(addr)).await;
    eventually(
        Duration::from_secs(10),
        "probed as HTTP/1.1 and routable",
        || protocol_on(&mesh, 1) == Some(Protocol::Http1) && mesh.routable_everywhere(AGENT),
    )
    .await;
    for node in [1, 0] {
        let mut send = super::h2c(&mesh, node).await;
        let req = hyper::Request::post(format!("http://{AGENT}.acme.dmsc/tasks"))
            .header("content-type", "application/json")
            .body(dmsc_node::proto::http::full(format!("{{\"from\":{node}}}")))
            .expect("request");
        let resp = send.send_request(req).await.expect("answer");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        assert_eq!(parts.status, 200, "node {node}: {parts:?} {body:?}");
        assert_eq!(parts.version, Version::HTTP_2);
        assert_eq!(&body[..], format!("{{\"from\":{node}}}").as_bytes());
    }
    let posts: Vec<Version> = seen
        .lock()
        .expect("log")
        .iter()
        .filter(|(m, _)| *m == hyper::Method::POST)
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(posts, vec![Version::HTTP_11; 2]);
    mesh.stop().await;
    server.abort();
}

/// grpcio's own client (C-core), which, unlike tonic, refuses a
/// "Trailers-Only" answer whose stream is ended by a separate empty DATA
/// frame: unary calls by name through node 0 to the agent on node 1 (and
/// on node 1 itself), the agent's own error status and message intact.
const GRPCIO_SAY_HELLO: &str = r#"
import sys, grpc
ingress = sys.argv[1]
# dialling the mesh name itself goes through `http_proxy` (a CONNECT tunnel)
opts = [] if ingress.endswith(".dmsc:80") else [("grpc.default_authority", "greeter.acme.dmsc")]
with grpc.insecure_channel(ingress, options=opts) as ch:
    say = ch.unary_unary("/greet.Greeter/SayHello")
    for name in sys.argv[2:]:
        msg = name.encode()
        try:
            reply = say(b"\x0a" + bytes([len(msg)]) + msg, timeout=10)
            print("OK", reply[2:].decode())
        except grpc.RpcError as e:
            print(e.code().name, e.details())
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcio_client_gets_the_agents_status_through_two_nodes() {
    let grpcio = std::process::Command::new("python3")
        .args(["-c", "import grpc"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !grpcio {
        assert!(
            std::env::var("CI").is_err(),
            "CI installs python3's grpcio (.ci/run)"
        );
        eprintln!("SKIPPED: needs python3 with grpcio (pip install grpcio)");
        return;
    }
    let server = greeter_server(true).await;
    let mesh = mesh_with(&["n0", "n1"], declared(server.addr)).await;
    eventually(
        Duration::from_secs(15),
        "the agent is probed as gRPC and healthy on node 0",
        || protocol_on(&mesh, 1) == Some(Protocol::Grpc) && health_on(&mesh, 0) == "healthy",
    )
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let script = dir.path().join("say_hello.py");
    std::fs::write(&script, GRPCIO_SAY_HELLO).expect("write");
    // by the ingress address on both nodes, then by the mesh name with the
    // ingress as `http_proxy` (as a process set up for A2A SDKs has it)
    for (node, proxied) in [(0, false), (1, false), (1, true)] {
        let ingress = mesh.ingress(node).to_string();
        let out = tokio::task::spawn_blocking({
            let script = script.clone();
            move || {
                let mut cmd = std::process::Command::new("python3");
                cmd.arg(&script)
                    .env_remove("no_proxy")
                    .env_remove("NO_PROXY");
                if proxied {
                    cmd.env("http_proxy", format!("http://{ingress}")).args([
                        "greeter.acme.dmsc:80",
                        "ada",
                        "nobody",
                    ]);
                } else {
                    cmd.env_remove("http_proxy")
                        .env_remove("HTTP_PROXY")
                        .args([&ingress, "ada", "nobody"]);
                }
                cmd.output().expect("python3")
            }
        })
        .await
        .expect("join");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            stdout.lines().collect::<Vec<_>>(),
            ["OK hello, ada", "NOT_FOUND no such name"],
            "through node {node} (proxied: {proxied}): {stdout}\n--\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    mesh.stop().await;
}

/// A gRPC client's own deadline (`grpc-timeout`) is the delegation's
/// deadline: a call allowed 10 s outlives the node's 1 s default, across
/// the overlay; one without a deadline gets the default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_is_the_calls_deadline() {
    let server = greeter_server(true).await;
    let mesh = LocalMesh::start(&["n0", "n1"], "acme", |i, raw| {
        raw.gossip.interval_ms = Some(100);
        raw.delegation.health_interval_ms = Some(200);
        raw.delegation.load_interval_ms = Some(100);
        raw.delegation.timeout_ms = Some(1000);
        if i == 1 {
            raw.agents = vec![declared(server.addr)];
        }
    })
    .await
    .expect("mesh");
    eventually(
        Duration::from_secs(15),
        "the agent is probed as gRPC and healthy on node 0",
        || protocol_on(&mesh, 1) == Some(Protocol::Grpc) && health_on(&mesh, 0) == "healthy",
    )
    .await;
    let mut client = client_to(&mesh, 0).await;
    let mut patient = hello("nap");
    patient.set_timeout(Duration::from_secs(10));
    let reply = say_hello(&mut client, patient)
        .await
        .expect("a 1.5 s call within its own 10 s deadline");
    assert_eq!(reply.get_ref().message, "hello, nap");
    let status = say_hello(&mut client, hello("nap"))
        .await
        .expect_err("no deadline of its own: the node's 1 s");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    mesh.stop().await;
}

/// Refusals decided before any delegation (a host that names no mesh
/// target, another tenant's agent) reach a gRPC caller as gRPC statuses,
/// with the mesh's message; a CONNECT (a proxy client asking for a tunnel)
/// is refused as such, not passed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_refusals_reach_grpc_callers_as_grpc_statuses() {
    let server = greeter_server(true).await;
    let mesh = mesh_with(&["n0", "n1"], declared(server.addr)).await;
    let call = |authority: &'static str| {
        let ingress = mesh.ingress(0);
        async move {
            let channel = Endpoint::from_shared(format!("http://{ingress}"))
                .expect("endpoint")
                .origin(authority.parse().expect("origin"))
                .connect()
                .await
                .expect("connect to ingress");
            let mut client = tonic::client::Grpc::new(channel);
            say_hello(&mut client, hello("ada")).await
        }
    };
    let status = call("http://example.com")
        .await
        .expect_err("no mesh target");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("example.com"), "{status:?}");
    let status = call("http://greeter.other.dmsc")
        .await
        .expect_err("another tenant");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("other"), "{status:?}");

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(mesh.ingress(0))
        .await
        .expect("connect");
    // A tunnel is opened to mesh names only (`hygiene::a_connect_tunnel_...`).
    tcp.write_all(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        .await
        .expect("write");
    let mut head = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut head))
        .await
        .expect("an answer")
        .expect("read");
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    mesh.stop().await;
}

/// A caller that cancels a server-streaming call after its first message,
/// while the agent is silent (a watch that sends every 10 s), cancels the
/// agent's handler through two nodes at once, not when the agent next
/// sends: the calling node stops the overlay stream, and the home node,
/// watching for that while it waits on the agent, drops the agent's
/// response (an RST_STREAM to the agent). The home node counts it as
/// cancelled, lets go of the agent at once, and does not blame the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cancelled_while_the_agent_is_silent_cancels_the_agent_through_two_nodes() {
    let server = greeter_server(true).await;
    let mesh = mesh_with(&["n0", "n1"], declared(server.addr)).await;
    eventually(
        Duration::from_secs(15),
        "the agent is probed as gRPC and healthy on node 0",
        || protocol_on(&mesh, 1) == Some(Protocol::Grpc) && health_on(&mesh, 0) == "healthy",
    )
    .await;
    let mut client = client_to(&mesh, 0).await;
    client.ready().await.expect("channel ready");
    let resp = client
        .server_streaming(
            tonic::Request::new(HellosRequest {
                name: "watch".into(),
                count: 3,
                fail_at_end: false,
                gap_ms: 10_000,
            }),
            PathAndQuery::from_static(SAY_HELLOS),
            ProstCodec::<HellosRequest, HelloReply>::default(),
        )
        .await
        .expect("server streaming SayHellos through the mesh");
    assert_eq!(metadata(resp.metadata(), "dmsc-node"), "n1");
    let mut stream = resp.into_inner();
    let first = stream
        .message()
        .await
        .expect("the first message")
        .expect("a message, not the end");
    assert_eq!(first.message, "hello #1, watch");
    assert!(!server.log.gap_dropped.load(Ordering::SeqCst));
    // The caller goes away (tonic resets its HTTP/2 stream).
    drop(stream);
    drop(client);
    eventually(
        Duration::from_secs(2),
        "the agent's handler is cancelled long before its next message (10 s)",
        || server.log.gap_dropped.load(Ordering::SeqCst),
    )
    .await;
    let home = mesh.nodes[1].metrics().delegation.inbound.clone();
    let cancelled = || {
        home.get_or_create(&dmsc_node::metrics::DelegationLabels {
            tenant: "acme".into(),
            outcome: "cancelled".into(),
        })
        .get()
    };
    eventually(
        Duration::from_secs(2),
        "the home node counts the delegation as cancelled",
        || cancelled() == 1,
    )
    .await;
    let on = |i: usize| {
        mesh.nodes[i]
            .agent_statuses()
            .into_iter()
            .find(|a| a.name == AGENT)
            .expect("the agent")
    };
    eventually(
        Duration::from_secs(2),
        "both nodes let go of the agent",
        || on(1).in_flight == 0 && on(0).outstanding == 0,
    )
    .await;
    // The caller's leaving is not the agent's failure.
    let home = on(1);
    assert_eq!(home.error_rate, 0.0, "{home:?}");
    assert_eq!(on(0).circuit, "closed");
    mesh.stop().await;
}
