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

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use tracing::info;

use crate::config::MqttConfig;

/// Starts the broker of every tenant at its address; `Err` names a tenant
/// whose address cannot be listened on.
pub fn start(at: &BTreeMap<String, SocketAddr>, cfg: &MqttConfig) -> Result<(), String> {
    for (tenant, addr) in at {
        // rumqttd binds in a thread of its own and only logs a failure:
        // find out here, with a clear error, whether the address is free.
        std::net::TcpListener::bind(addr).map_err(|e| {
            format!("mqtt.listen.{tenant} = {addr}: cannot listen for the embedded broker: {e}")
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
            listen: *addr,
            tls: None,
            next_connection_delay_ms: 0,
            connections,
        };
        let config = Config {
            router: RouterConfig {
                max_connections: 10_000,
                max_outgoing_packet_count: 200,
                max_segment_size: (cfg.max_message + 4096).max(1 << 20),
                max_segment_count: 10,
                ..Default::default()
            },
            v5: Some(HashMap::from([("v5".to_string(), server)])),
            ..Default::default()
        };
        let name = format!("mqtt-{tenant}");
        let tenant_name = tenant.clone();
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let mut broker = Broker::new(config);
                if let Err(e) = broker.start() {
                    tracing::error!(tenant = %tenant_name, error = %e, "embedded MQTT broker stopped");
                }
            })
            .map_err(|e| format!("mqtt: cannot start the embedded broker of {tenant}: {e}"))?;
        // Listening once a connection is taken (within a couple of seconds).
        let listening = (0..100).any(|_| {
            if std::net::TcpStream::connect_timeout(addr, Duration::from_millis(100)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
            false
        });
        if !listening {
            return Err(format!(
                "mqtt.listen.{tenant} = {addr}: the embedded broker did not start listening"
            ));
        }
        info!(%tenant, %addr, auth = cfg.per_tenant.get(tenant).is_some_and(|s| s.credentials.is_some()), "embedded MQTT broker listening");
    }
    Ok(())
}
