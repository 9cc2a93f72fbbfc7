//! The embedded MQTT v5 brokers of a standalone edge node
//! (`[mqtt] embedded = true`): rumqttd, one broker per tenant.
//!
//! Why one per tenant: rumqttd authenticates clients at connect time only
//! and has no topic ACLs, so clients on one broker could read and write any
//! topic. A broker (router) per tenant, each on its own listener, keeps a
//! tenant's topics out of another's reach by construction; the bridge keeps
//! one session with each. A tenant with `[mqtt.credentials.<tenant>]` has
//! its broker ask every client for that username and password (the
//! bridge's own session uses them too); without them its listener must be
//! on loopback (config validation says so).
//!
//! What rumqttd does with v5 request/response, as read in its 0.20 source
//! (docs/notes/rumqttd-spike.md): publish properties (response topic,
//! correlation data, user properties, content type, message expiry) reach
//! subscribers unchanged; retained messages and last wills (with their
//! delay) work; persistent sessions keep QoS 1 messages while a client is
//! away. The bridge uses no shared subscription and no topic aliases on an
//! embedded broker (rumqttd mishandles both in corner cases). A broker
//! lives as long as the process: rumqttd has no way to stop one.
//!
//! The node takes each tenant's address itself and relays every client
//! connection to its broker on a loopback port ([`serve`]): rumqttd leaves
//! Nagle's algorithm on, which costs 44 ms per request/response otherwise.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::config::MqttConfig;

/// Clients of one embedded broker at once (more are turned away).
const MAX_CLIENTS: usize = 10_000;

/// One tenant's embedded broker as the node fronts it: the tenant's
/// address, taken by the node, and the broker's own loopback port.
#[derive(Debug)]
pub struct Front {
    pub tenant: String,
    listener: std::net::TcpListener,
    broker: SocketAddr,
}

/// Starts the broker of every tenant (on a loopback port of its own) and
/// takes each tenant's address; `Err` names a tenant whose address cannot
/// be listened on. Serve each [`Front`] with [`serve`].
pub fn start(at: &BTreeMap<String, SocketAddr>, cfg: &MqttConfig) -> Result<Vec<Front>, String> {
    let mut fronts = Vec::new();
    for (tenant, addr) in at {
        let listener = std::net::TcpListener::bind(addr).map_err(|e| {
            format!("mqtt.listen.{tenant} = {addr}: cannot listen for the embedded broker: {e}")
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("mqtt.listen.{tenant}: {e}"))?;
        // rumqttd binds in a thread of its own and only logs a failure: a
        // port that was free a moment ago is the best this can do.
        let broker = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| {
                format!("mqtt: no loopback port for the embedded broker of {tenant}: {e}")
            })?;
        let auth = cfg
            .per_tenant
            .get(tenant)
            .and_then(|s| s.credentials.clone())
            .map(|(u, p)| HashMap::from([(u, p)]));
        let connections = ConnectionSettings {
            connection_timeout_ms: 5_000,
            // Room for the topic and properties around the largest payload.
            max_payload_size: cfg.max_message + 4096,
            max_inflight_count: 100,
            auth,
            external_auth: None,
            dynamic_filters: true,
        };
        let server = ServerSettings {
            name: format!("dmsc-{tenant}"),
            listen: broker,
            tls: None,
            next_connection_delay_ms: 0,
            connections,
        };
        let config = Config {
            router: RouterConfig {
                max_connections: MAX_CLIENTS + 16,
                max_outgoing_packet_count: 200,
                max_segment_size: (cfg.max_message + 4096).max(1 << 20),
                max_segment_count: 10,
                ..Default::default()
            },
            v5: Some(HashMap::from([("v5".to_string(), server)])),
            ..Default::default()
        };
        let tenant_name = tenant.clone();
        std::thread::Builder::new()
            .name(format!("mqtt-{tenant}"))
            .spawn(move || {
                let mut broker = Broker::new(config);
                if let Err(e) = broker.start() {
                    tracing::error!(tenant = %tenant_name, error = %e, "embedded MQTT broker stopped");
                }
            })
            .map_err(|e| format!("mqtt: cannot start the embedded broker of {tenant}: {e}"))?;
        // Listening once a connection is taken (within a couple of seconds).
        let listening = (0..100).any(|_| {
            if std::net::TcpStream::connect_timeout(&broker, Duration::from_millis(100)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
            false
        });
        if !listening {
            return Err(format!(
                "mqtt: the embedded broker of {tenant} did not start listening on {broker}"
            ));
        }
        info!(%tenant, %addr, auth = cfg.per_tenant.get(tenant).is_some_and(|s| s.credentials.is_some()), "embedded MQTT broker listening");
        fronts.push(Front {
            tenant: tenant.clone(),
            listener,
            broker,
        });
    }
    Ok(fronts)
}

/// Fronts one tenant's broker: every client connection is relayed to the
/// broker's loopback port. Why a relay: rumqttd leaves Nagle's algorithm on
/// for its sockets, and a broker that writes two small packets in a row to
/// a client that delays its ACKs waits ~40 ms each time (measured: 44 ms
/// per request/response, BENCHMARKS.md). The relay sets TCP_NODELAY towards
/// the client and acknowledges the broker's writes at once (TCP_QUICKACK
/// after every read), so nothing waits.
pub async fn serve(front: Front) {
    let listener = match TcpListener::from_std(front.listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(tenant = %front.tenant, error = %e, "embedded MQTT broker: cannot accept");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "embedded MQTT broker: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "embedded MQTT broker: too many clients; connection refused");
            continue;
        };
        let broker = front.broker;
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = relay(client, broker).await {
                debug!(%peer, error = %e, "embedded MQTT client connection ended");
            }
        });
    }
}

async fn relay(client: TcpStream, broker: SocketAddr) -> std::io::Result<()> {
    let inner = TcpStream::connect(broker).await?;
    client.set_nodelay(true)?;
    inner.set_nodelay(true)?;
    let (mut cr, mut cw) = client.into_split();
    let (mut ir, mut iw) = inner.into_split();
    let up = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = cr.read(&mut buf).await?;
            if n == 0 {
                return iw.shutdown().await;
            }
            iw.write_all(&buf[..n]).await?;
        }
    };
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = ir.read(&mut buf).await?;
            // (Linux leaves quick-ACK mode by itself: set it again.)
            let _ = socket2::SockRef::from(ir.as_ref()).set_tcp_quickack(true);
            if n == 0 {
                return cw.shutdown().await;
            }
            cw.write_all(&buf[..n]).await?;
        }
    };
    tokio::try_join!(up, down).map(|_| ())
}
