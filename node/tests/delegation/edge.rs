//! Edge agents over MQTT v5 against a real mosquitto broker: an edge agent
//! (rumqttc, written here: `mosquitto_sub` cannot answer requests) registers
//! with its retained card on one node and is called over HTTP from another;
//! it calls an HTTP agent through the mesh; its last will marks it down.

use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use dmsc_node::config::RawMqtt;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;

use super::{agent, attach_routable, eventually, mesh_of};
use dmsc_node::demo::mesh::message_send;

/// A mosquitto on a loopback port of its own, stopped on drop; `None` (the
/// test says why and passes) where mosquitto is not installed, except in CI.
struct Broker {
    child: tokio::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Broker {
    async fn start() -> Option<Broker> {
        let installed = std::process::Command::new("mosquitto")
            .arg("-h")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !installed {
            assert!(
                std::env::var("CI").is_err(),
                "mosquitto is not installed (apt-get install mosquitto); CI must run this test"
            );
            eprintln!("SKIPPED: mosquitto is not installed (apt-get install mosquitto)");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("port")
            .local_addr()
            .expect("addr")
            .port();
        let dir = tempfile::tempdir().expect("dir");
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .expect("conf");
        let child = tokio::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("mosquitto starts");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Some(Broker {
                    child,
                    port,
                    _dir: dir,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("mosquitto did not listen on {port}");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

const CARD: &str = r#"{
  "name": "meter",
  "description": "Reads the electricity meter of a building",
  "version": "1.0.0",
  "url": "mqtt://edge/meter",
  "capabilities": {},
  "defaultInputModes": ["application/json"],
  "defaultOutputModes": ["application/json"],
  "skills": [{"id": "read", "name": "Read meter", "description": "Current consumption in kWh", "tags": ["meter", "energy"]}]
}"#;

/// The edge agent: answers every request with `meter says: <body>` and
/// forwards the answers to its own calls to `answers`.
async fn edge_agent(
    port: u16,
    answers: mpsc::UnboundedSender<(PublishProperties, Bytes)>,
) -> (AsyncClient, tokio::task::JoinHandle<()>) {
    let mut opts = MqttOptions::new("meter", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_last_will(LastWill::new(
        "dmsc/acme/agents/meter/status",
        "offline",
        QoS::AtLeastOnce,
        false,
        None,
    ));
    let (client, mut events) = AsyncClient::new(opts, 64);
    client
        .subscribe("dmsc/acme/agents/meter/req", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    client
        .subscribe("dmsc/acme/edge/meter/answers", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    client
        .publish("dmsc/acme/agents/meter/card", QoS::AtLeastOnce, true, CARD)
        .await
        .expect("card");
    let c = client.clone();
    let task = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let props = p.properties.clone().unwrap_or_default();
                    if &p.topic[..] == b"dmsc/acme/edge/meter/answers" {
                        let _ = answers.send((props, p.payload));
                        continue;
                    }
                    let Some(reply_to) = props.response_topic.clone() else {
                        continue;
                    };
                    let caller = props
                        .user_properties
                        .iter()
                        .find(|(k, _)| k == "dmsc-caller-tenant")
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default();
                    let mut body = format!("meter says ({caller}): ").into_bytes();
                    body.extend_from_slice(&p.payload);
                    let answer = PublishProperties {
                        correlation_data: props.correlation_data.clone(),
                        content_type: Some("text/plain".into()),
                        user_properties: vec![("dmsc-status".into(), "200".into())],
                        ..Default::default()
                    };
                    let _ = c
                        .publish_with_properties(reply_to, QoS::AtLeastOnce, false, body, answer)
                        .await;
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    (client, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_edge_agent_is_called_over_http_and_calls_http_agents_through_the_mesh() {
    let Some(broker) = Broker::start().await else {
        return;
    };
    let port = broker.port;
    // n1 bridges tenant acme on the broker; n0 only has HTTP.
    let mesh = mesh_of(&["n0", "n1"], |i, raw| {
        if i == 1 {
            raw.mqtt = Some(RawMqtt {
                broker: format!("mqtt://127.0.0.1:{port}"),
                tenants: vec!["acme".into()],
                ..Default::default()
            });
        }
    })
    .await;
    let echo = agent("echo", &["echo"], "echoes").await;
    attach_routable(&mesh, 0, &echo, "echo").await;

    let (tx, mut answers) = mpsc::unbounded_channel();
    let (edge, edge_task) = edge_agent(port, tx).await;
    eventually(
        Duration::from_secs(10),
        "the edge agent is routable everywhere",
        || mesh.routable_everywhere("meter"),
    )
    .await;

    // HTTP -> MQTT: called by name from the node without the bridge, and by capability.
    for host in ["meter.acme.dmsc", "energy.cap.acme.dmsc"] {
        let (resp, body) = mesh
            .call(
                0,
                "POST",
                host,
                "/",
                &[("content-type", "application/json")],
                r#"{"q":"now"}"#,
            )
            .await
            .expect("call");
        assert_eq!(
            resp.status(),
            200,
            "{host}: {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(&body[..], br#"meter says (acme): {"q":"now"}"#, "{host}");
        assert_eq!(resp.headers()["dmsc-agent"], "acme/meter");
        assert_eq!(resp.headers()["dmsc-node"], "n1");
    }

    // MQTT -> HTTP: the edge agent calls the HTTP agent on n0 through the mesh.
    let props = PublishProperties {
        response_topic: Some("dmsc/acme/edge/meter/answers".into()),
        correlation_data: Some(Bytes::from_static(b"c-1")),
        content_type: Some("application/json".into()),
        ..Default::default()
    };
    edge.publish_with_properties(
        "dmsc/acme/call/echo.acme.dmsc",
        QoS::AtLeastOnce,
        false,
        message_send("from the edge"),
        props,
    )
    .await
    .expect("call");
    let (props, payload) = tokio::time::timeout(Duration::from_secs(10), answers.recv())
        .await
        .expect("an answer within 10 s")
        .expect("answer");
    assert_eq!(props.correlation_data.as_deref(), Some(&b"c-1"[..]));
    let status = props
        .user_properties
        .iter()
        .find(|(k, _)| k == "dmsc-status")
        .map(|(_, v)| v.as_str());
    assert_eq!(status, Some("200"), "{}", String::from_utf8_lossy(&payload));
    assert!(
        String::from_utf8_lossy(&payload).contains("from the edge"),
        "{}",
        String::from_utf8_lossy(&payload)
    );

    // A call with no response topic is refused, not answered somewhere else.
    edge.publish(
        "dmsc/acme/call/echo.acme.dmsc",
        QoS::AtLeastOnce,
        false,
        "x",
    )
    .await
    .expect("publish");

    // The agent's connection drops: its last will marks it unhealthy, and
    // callers get an error instead of waiting.
    // (Its event loop goes away without a DISCONNECT: the broker publishes
    // the will as soon as the connection closes.)
    edge_task.abort();
    drop(edge);
    let until = std::time::Instant::now() + Duration::from_secs(15);
    let (resp, body) = loop {
        assert!(
            std::time::Instant::now() < until,
            "the last will never took effect"
        );
        let r = mesh
            .call(
                0,
                "POST",
                "meter.acme.dmsc",
                "/",
                &[("dmsc-timeout", "1s")],
                "x",
            )
            .await
            .expect("call");
        if r.0.status() != 200 {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        [503, 504].contains(&resp.status().as_u16()),
        "{}: {}",
        resp.status(),
        String::from_utf8_lossy(&body)
    );
    drop(broker);
}
