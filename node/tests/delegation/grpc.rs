//! gRPC through the mesh: a real tonic client talks h2c to node 0's ingress
//! with `:authority` = `greeter.acme.dmsc`; the call crosses QUIC to node 1,
//! which speaks h2c to a real tonic gRPC server declared there (skills in
//! config, no agent card). Replies, streams and statuses — which travel in
//! HTTP/2 trailers — must arrive intact.
//!
//! No protoc: the messages are hand-written prost structs and both ends use
//! tonic's low-level `client::Grpc` / `server::Grpc` with the prost codec.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dmsc_node::config::{RawAgent, RawSkill};
use dmsc_node::demo::mesh::LocalMesh;
use futures_util::stream::{self, Iter};
use hyper::body::Incoming;
use hyper::http::uri::PathAndQuery;
use hyper::service::service_fn;
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::server::{ServerStreamingService, UnaryService};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

const SAY_HELLO: &str = "/greet.Greeter/SayHello";
const SAY_HELLOS: &str = "/greet.Greeter/SayHellos";

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
}

/// `SayHello`: greets, or `NOT_FOUND` for the name "nobody".
struct SayHello;

impl UnaryService<HelloRequest> for SayHello {
    type Response = HelloReply;
    type Future = Ready<Result<tonic::Response<HelloReply>, Status>>;

    fn call(&mut self, request: tonic::Request<HelloRequest>) -> Self::Future {
        let name = request.into_inner().name;
        ready(if name == "nobody" {
            Err(Status::not_found("no such name"))
        } else {
            Ok(tonic::Response::new(HelloReply {
                message: format!("hello, {name}"),
            }))
        })
    }
}

/// `SayHellos`: `count` greetings, then OK or (on request) `RESOURCE_EXHAUSTED`.
struct SayHellos;

type HelloStream = Iter<std::vec::IntoIter<Result<HelloReply, Status>>>;

impl ServerStreamingService<HellosRequest> for SayHellos {
    type Response = HelloReply;
    type ResponseStream = HelloStream;
    type Future = Ready<Result<tonic::Response<HelloStream>, Status>>;

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
        ready(Ok(tonic::Response::new(stream::iter(items))))
    }
}

/// The HTTP versions the gRPC methods were called with, by path.
type Seen = Arc<Mutex<Vec<(String, Version)>>>;

async fn route(req: Request<Incoming>, seen: Seen) -> Response<tonic::body::Body> {
    let path = req.uri().path().to_string();
    match path.as_str() {
        SAY_HELLO => {
            seen.lock()
                .expect("seen lock")
                .push((path.clone(), req.version()));
            tonic::server::Grpc::new(ProstCodec::<HelloReply, HelloRequest>::default())
                .unary(SayHello, req)
                .await
        }
        SAY_HELLOS => {
            seen.lock()
                .expect("seen lock")
                .push((path.clone(), req.version()));
            tonic::server::Grpc::new(ProstCodec::<HelloReply, HellosRequest>::default())
                .server_streaming(SayHellos, req)
                .await
        }
        // Anything else (the node's HTTP/1.1 health check on `/`): 200, empty.
        _ => Response::new(tonic::body::Body::empty()),
    }
}

/// A gRPC server on loopback that speaks HTTP/1.1 too (hyper-util's auto
/// builder), so the node's HTTP/1.1 health check gets an answer.
async fn greeter_server() -> (SocketAddr, Seen, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let seen: Seen = Arc::default();
    let seen2 = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let seen = seen2.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let seen = seen.clone();
                    async move { Ok::<_, Infallible>(route(req, seen).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen, task)
}

fn metadata(md: &tonic::metadata::MetadataMap, key: &str) -> String {
    md.get(key)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

async fn ready_client(client: &mut tonic::client::Grpc<Channel>) {
    client.ready().await.expect("channel ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_errors_and_server_streams_cross_the_mesh_over_h2c() {
    let (addr, seen, server) = greeter_server().await;
    let mesh = LocalMesh::start(&["n0", "n1"], "acme", |i, raw| {
        raw.gossip.interval_ms = Some(100);
        raw.delegation.health_interval_ms = Some(200);
        raw.delegation.load_interval_ms = Some(100);
        if i == 1 {
            raw.agents = vec![RawAgent {
                tenant: "acme".into(),
                url: format!("http://{addr}"),
                name: Some("greeter".into()),
                skills: Some(vec![RawSkill {
                    id: "greet".into(),
                    tags: vec!["greeting".into()],
                    ..Default::default()
                }]),
                ..Default::default()
            }];
        }
    })
    .await
    .expect("mesh");
    let start = Instant::now();
    while !mesh.routable_everywhere("greeter") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "greeter not routable everywhere within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // h2c with prior knowledge to node 0's ingress; `:authority` names the agent.
    let channel = Endpoint::from_shared(format!("http://{}", mesh.ingress(0)))
        .expect("endpoint")
        .origin("http://greeter.acme.dmsc".parse().expect("origin"))
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(20))
        .connect()
        .await
        .expect("connect to ingress");
    let mut client = tonic::client::Grpc::new(channel);
    let unary = PathAndQuery::from_static(SAY_HELLO);
    let streaming = PathAndQuery::from_static(SAY_HELLOS);

    // Unary: the reply, and the mesh's headers in the response metadata
    // (tonic merges the trailers in: `grpc-status: 0` came back through both
    // nodes in the HTTP/2 trailers, after the message).
    ready_client(&mut client).await;
    let reply = client
        .unary(
            tonic::Request::new(HelloRequest { name: "ada".into() }),
            unary.clone(),
            ProstCodec::<HelloRequest, HelloReply>::default(),
        )
        .await
        .expect("unary SayHello through the mesh");
    assert_eq!(reply.get_ref().message, "hello, ada");
    assert_eq!(
        metadata(reply.metadata(), "dmsc-agent"),
        "acme/greeter",
        "{:?}",
        reply.metadata()
    );
    assert_eq!(
        metadata(reply.metadata(), "grpc-status"),
        "0",
        "{:?}",
        reply.metadata()
    );
    assert_eq!(
        metadata(reply.metadata(), "dmsc-node"),
        "n1",
        "{:?}",
        reply.metadata()
    );

    // An error status set by the server arrives intact (tonic answers a
    // failed unary call trailers-only: grpc-status in the one HEADERS frame).
    ready_client(&mut client).await;
    let status = client
        .unary(
            tonic::Request::new(HelloRequest {
                name: "nobody".into(),
            }),
            unary.clone(),
            ProstCodec::<HelloRequest, HelloReply>::default(),
        )
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
    ready_client(&mut client).await;
    let resp = client
        .server_streaming(
            tonic::Request::new(HellosRequest {
                name: "bob".into(),
                count: 5,
                fail_at_end: false,
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
    ready_client(&mut client).await;
    let resp = client
        .server_streaming(
            tonic::Request::new(HellosRequest {
                name: "eve".into(),
                count: 2,
                fail_at_end: true,
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

    // Node 1 spoke HTTP/2 (h2c) to the agent for every gRPC call.
    let seen = seen.lock().expect("seen lock").clone();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(
        seen.iter().all(|(_, v)| *v == Version::HTTP_2),
        "gRPC calls reached the agent as {seen:?}"
    );

    mesh.stop().await;
    server.abort();
}
