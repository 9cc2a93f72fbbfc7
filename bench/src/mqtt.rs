//! MQTT request/response through the mesh against the same request/response
//! directly on the broker (issue 15's benchmark).
//!
//! A real mosquitto on a loopback port (started here), a two-node mesh
//! whose node `b` bridges tenant `bench`, and one MQTT v5 edge agent
//! (`meter`, rumqttc) that answers every request with its body. Paths:
//!
//! - `direct`: an MQTT client publishes to the agent's request topic with a
//!   response topic and correlation data; the agent answers there;
//! - `mqtt-mesh`: the same client calls `meter.bench.dmsc` through the mesh
//!   (`dmsc/bench/call/…` -> node b -> the agent -> node b -> the client);
//! - `http-2-nodes`: an HTTP client calls `meter.bench.dmsc` at node a's
//!   ingress (a -> QUIC -> b -> MQTT -> the agent and back).
//!
//! Latency: closed loop, one request at a time. Throughput: `--concurrency`
//! requests in flight for the same count.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dmsc_node::config::RawMqtt;
use dmsc_node::demo::mesh::LocalMesh;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::oneshot;

#[derive(clap::Args)]
pub struct MqttArgs {
    /// Requests per path and measurement.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Requests in flight for the throughput figure.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Request body size in bytes.
    #[arg(long, default_value_t = 256)]
    body: usize,
    /// Run mosquitto with its defaults (TCP_NODELAY off on the broker's
    /// side: each message it forwards can wait ~40 ms for a delayed ACK).
    /// Default: `set_tcp_nodelay true`, as low-latency brokers are run.
    #[arg(long)]
    broker_defaults: bool,
    /// Use node b's embedded broker (`[mqtt] embedded = true`, rumqttd)
    /// instead of mosquitto: clients and the agent connect to it.
    #[arg(long)]
    embedded: bool,
}

const ANSWERS: &str = "dmsc/bench/edge/client/answers";
const CARD: &str = r#"{"name":"meter","description":"bench edge agent","version":"1","url":"mqtt://edge/meter","capabilities":{},"defaultInputModes":["application/json"],"defaultOutputModes":["application/json"],"skills":[{"id":"read","name":"read","description":"echo","tags":["meter"]}]}"#;

type Pending = Arc<Mutex<HashMap<Bytes, oneshot::Sender<()>>>>;

/// The request side: one MQTT client whose answers are matched by
/// correlation data.
struct Requester {
    client: AsyncClient,
    pending: Pending,
}

impl Requester {
    async fn request(&self, topic: &str, body: Bytes) -> anyhow::Result<()> {
        let id = Bytes::from(format!("{:032x}", rand::random::<u128>()));
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), tx);
        let props = PublishProperties {
            response_topic: Some(ANSWERS.into()),
            correlation_data: Some(id),
            content_type: Some("application/json".into()),
            ..Default::default()
        };
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, body, props)
            .await?;
        tokio::time::timeout(Duration::from_secs(10), rx).await??;
        Ok(())
    }
}

async fn start_broker(
    dir: &tempfile::TempDir,
    defaults: bool,
) -> anyhow::Result<(tokio::process::Child, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_inflight_messages 0\nmax_queued_messages 100000\n{}",
            if defaults { "" } else { "set_tcp_nodelay true\n" }
        ),
    )?;
    let child = tokio::process::Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start mosquitto (apt-get install mosquitto): {e}"))?;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok((child, port));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("mosquitto did not listen on {port}")
}

/// The edge agent: answers every request with its body.
fn edge_agent(port: u16) -> tokio::task::JoinHandle<()> {
    let mut opts = MqttOptions::new("meter", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_network_options(nodelay());
    let (client, mut events) = AsyncClient::new(opts, 1024);
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client
                        .subscribe("dmsc/bench/agents/meter/req", QoS::AtLeastOnce)
                        .await;
                    let _ = client
                        .publish("dmsc/bench/agents/meter/card", QoS::AtLeastOnce, true, CARD)
                        .await;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let props = p.properties.unwrap_or_default();
                    let Some(to) = props.response_topic else {
                        continue;
                    };
                    let answer = PublishProperties {
                        correlation_data: props.correlation_data,
                        content_type: Some("application/json".into()),
                        ..Default::default()
                    };
                    let _ = client
                        .publish_with_properties(to, QoS::AtLeastOnce, false, p.payload, answer)
                        .await;
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
}

fn requester(port: u16) -> (Requester, tokio::task::JoinHandle<()>) {
    let mut opts = MqttOptions::new("bench-client", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_network_options(nodelay());
    let (client, mut events) = AsyncClient::new(opts, 1024);
    let pending: Pending = Arc::default();
    let p2 = pending.clone();
    let c = client.clone();
    let task = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = c.subscribe(ANSWERS, QoS::AtLeastOnce).await;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Some(id) = p.properties.and_then(|pr| pr.correlation_data) else {
                        continue;
                    };
                    if let Some(tx) = p2.lock().unwrap_or_else(|p| p.into_inner()).remove(&id) {
                        let _ = tx.send(());
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    (Requester { client, pending }, task)
}

/// TCP_NODELAY on: small messages, and Nagle's algorithm against delayed
/// ACKs costs ~40 ms per message.
fn nodelay() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n
}

struct Figures {
    p50_ms: f64,
    p99_ms: f64,
    rps: f64,
}

async fn measure<F, Fut>(requests: usize, concurrency: usize, call: F) -> anyhow::Result<Figures>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    // Warm-up, then latency one at a time.
    for _ in 0..50 {
        call().await?;
    }
    let mut lat = Vec::with_capacity(requests);
    for _ in 0..requests {
        let t = Instant::now();
        call().await?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    let pct = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    // Throughput: `concurrency` workers share the same count.
    let start = Instant::now();
    let per = requests / concurrency.max(1);
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let call = call.clone();
        workers.push(tokio::spawn(async move {
            for _ in 0..per {
                call().await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for w in workers {
        w.await??;
    }
    let rps = (per * concurrency.max(1)) as f64 / start.elapsed().as_secs_f64();
    Ok(Figures {
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        rps,
    })
}

pub async fn run(args: MqttArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (_broker, port) = if args.embedded {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        (None, port)
    } else {
        let (b, port) = start_broker(&dir, args.broker_defaults).await?;
        (Some(b), port)
    };
    let embedded = args.embedded;
    let mesh = LocalMesh::start(&["a", "b"], "bench", |i, raw| {
        if i == 1 {
            raw.mqtt = Some(if embedded {
                RawMqtt {
                    embedded: true,
                    tenants: vec!["bench".into()],
                    listen: [("bench".to_string(), format!("127.0.0.1:{port}"))].into(),
                    ..Default::default()
                }
            } else {
                RawMqtt {
                    broker: format!("mqtt://127.0.0.1:{port}"),
                    tenants: vec!["bench".into()],
                    ..Default::default()
                }
            });
        }
    })
    .await?;
    println!(
        "broker: {}",
        if embedded {
            "node b's embedded broker (rumqttd)"
        } else {
            "mosquitto"
        }
    );
    let agent = edge_agent(port);
    let start = Instant::now();
    while !mesh.routable_everywhere("meter") {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(20),
            "the edge agent never became routable"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (req, req_task) = requester(port);
    let req = Arc::new(req);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = Bytes::from(format!(
        "{{\"pad\":\"{}\"}}",
        "x".repeat(args.body.saturating_sub(10))
    ));

    println!(
        "| path | p50 | p99 | req/s at {} in flight |",
        args.concurrency
    );
    println!("|---|---|---|---|");
    let row = |name: &str, f: &Figures| {
        println!(
            "| {name} | {:.3} ms | {:.3} ms | {:.0} |",
            f.p50_ms, f.p99_ms, f.rps
        )
    };
    let (r, b) = (req.clone(), body.clone());
    let direct = measure(args.requests, args.concurrency, move || {
        let (r, b) = (r.clone(), b.clone());
        async move { r.request("dmsc/bench/agents/meter/req", b).await }
    })
    .await?;
    row("direct on the broker (MQTT -> agent -> MQTT)", &direct);
    let (r, b) = (req.clone(), body.clone());
    let via = measure(args.requests, args.concurrency, move || {
        let (r, b) = (r.clone(), b.clone());
        async move { r.request("dmsc/bench/call/meter.bench.dmsc", b).await }
    })
    .await?;
    row("through the mesh (MQTT -> node -> MQTT agent)", &via);
    let mesh = Arc::new(mesh);
    let (m, b) = (mesh.clone(), body.clone());
    let http = measure(args.requests, args.concurrency, move || {
        let (m, b) = (m.clone(), b.clone());
        async move {
            let (resp, _) = m.call(0, "POST", "meter.bench.dmsc", "/", &[], b).await?;
            anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
            Ok(())
        }
    })
    .await?;
    row("HTTP at node a -> QUIC -> node b -> MQTT agent", &http);
    println!();
    println!(
        "added by the mesh over direct MQTT: p50 {:+.3} ms, p99 {:+.3} ms; throughput {:.2}x",
        via.p50_ms - direct.p50_ms,
        via.p99_ms - direct.p99_ms,
        via.rps / direct.rps
    );
    agent.abort();
    req_task.abort();
    if let Ok(m) = Arc::try_unwrap(mesh) {
        m.stop().await;
    }
    Ok(())
}
