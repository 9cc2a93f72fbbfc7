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
//! The relay also reads the protocol level of the client's CONNECT: a
//! v3.1.1 or 3.1 client (mosquitto_sub's and most libraries' default) gets
//! a CONNACK refusing its protocol version (return code 1), so it says why
//! (rumqttd's v5 listener would just close the connection). With tenant
//! credentials set, it reads a v5 client's whole CONNECT (up to 64 KiB)
//! and answers a missing or wrong username or password with CONNACK 0x86
//! (bad user name or password), logged as a warning; rumqttd would close
//! the connection without a word. No v3.1.1
//! listener: the request/response contract needs v5's response topic and
//! correlation data, and rumqttd 0.20's v3.1.1 side panics on a v5 publish
//! with properties, which every request from the node is.

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
    /// The username and password the tenant's clients must give, if any.
    credentials: Option<Arc<(String, String)>>,
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
        let credentials = cfg
            .per_tenant
            .get(tenant)
            .and_then(|s| s.credentials.clone());
        let auth = credentials.clone().map(|(u, p)| HashMap::from([(u, p)]));
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
        info!(%tenant, %addr, auth = credentials.is_some(), "embedded MQTT broker listening");
        fronts.push(Front {
            tenant: tenant.clone(),
            listener,
            broker,
            credentials: credentials.map(Arc::new),
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
        let credentials = front.credentials.clone();
        let tenant = front.tenant.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match relay(client, broker, credentials.as_deref()).await {
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    warn!(%tenant, %peer, error = %e, "embedded MQTT broker: client refused");
                }
                Err(e) => debug!(%peer, error = %e, "embedded MQTT client connection ended"),
                Ok(()) => {}
            }
        });
    }
}

/// How long a client has to send the start of its CONNECT.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// The protocol level a CONNECT packet's start declares (3: MQTT 3.1, 4:
/// 3.1.1, 5: v5); `None` while more bytes are needed; `Some(None)` for
/// bytes that are no CONNECT (the v5 listener refuses them).
fn connect_level(buf: &[u8]) -> Option<Option<u8>> {
    let first = *buf.first()?;
    if first != 0x10 {
        return Some(None);
    }
    // Remaining length: 1 to 4 bytes, 7 bits each, high bit = more.
    let mut at = 1;
    loop {
        let b = *buf.get(at)?;
        at += 1;
        if b & 0x80 == 0 {
            break;
        }
        if at == 5 {
            return Some(None);
        }
    }
    let name_len = u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?]) as usize;
    if name_len > 6 {
        return Some(None);
    }
    buf.get(at + 2 + name_len).map(|level| Some(*level))
}

/// MQTT 3.1/3.1.1's CONNACK, return code 1: unacceptable protocol version.
const CONNACK_BAD_VERSION: [u8; 4] = [0x20, 0x02, 0x00, 0x01];

/// MQTT v5's CONNACK, reason 0x86: bad user name or password (no session
/// present, no properties).
const CONNACK_BAD_CREDENTIALS: [u8; 5] = [0x20, 0x03, 0x00, 0x86, 0x00];

/// The largest CONNECT the relay reads whole to check its credentials
/// (one with a larger will message goes to the broker, which checks them
/// itself).
const MAX_CHECKED_CONNECT: usize = 64 * 1024;

/// A CONNECT's fixed header: the packet's whole length, once its
/// remaining-length bytes are all there.
fn packet_len(buf: &[u8]) -> Option<usize> {
    let mut len = 0usize;
    for i in 0..4 {
        let b = *buf.get(1 + i)?;
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(1 + i + 1 + len);
        }
    }
    None
}

/// What a CONNECT logs in with (each `None` if absent).
#[derive(Debug, PartialEq)]
struct Login<'a> {
    user: Option<&'a [u8]>,
    pass: Option<&'a [u8]>,
}

/// The login of a whole MQTT v5 CONNECT packet; `None` if the packet does
/// not parse.
fn v5_credentials(packet: &[u8]) -> Option<Login<'_>> {
    struct Reader<'a>(&'a [u8]);
    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            if self.0.len() < n {
                return None;
            }
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            Some(a)
        }
        fn byte(&mut self) -> Option<u8> {
            self.take(1).map(|b| b[0])
        }
        fn sized(&mut self) -> Option<&'a [u8]> {
            let n = u16::from_be_bytes(self.take(2)?.try_into().ok()?);
            self.take(usize::from(n))
        }
        fn varint(&mut self) -> Option<usize> {
            let mut n = 0usize;
            for i in 0..4 {
                let b = self.byte()?;
                n |= usize::from(b & 0x7f) << (7 * i);
                if b & 0x80 == 0 {
                    return Some(n);
                }
            }
            None
        }
    }
    let mut r = Reader(packet);
    r.byte()?; // the packet type
    r.varint()?; // the remaining length
    r.sized()?; // the protocol name
    if r.byte()? != 5 {
        return None;
    }
    let flags = r.byte()?;
    r.take(2)?; // keep alive
    let props = r.varint()?;
    r.take(props)?;
    r.sized()?; // the client id
    if flags & 0x04 != 0 {
        let will_props = r.varint()?;
        r.take(will_props)?;
        r.sized()?; // the will topic
        r.sized()?; // the will payload
    }
    let user = if flags & 0x80 != 0 {
        Some(r.sized()?)
    } else {
        None
    };
    let pass = if flags & 0x40 != 0 {
        Some(r.sized()?)
    } else {
        None
    };
    Some(Login { user, pass })
}

/// Reads from `client` into `buf` until `enough` says what was read
/// suffices (within [`CONNECT_WAIT`]).
async fn read_until<T>(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
    mut enough: impl FnMut(&[u8]) -> Option<T>,
) -> std::io::Result<T> {
    tokio::time::timeout(CONNECT_WAIT, async {
        loop {
            if let Some(t) = enough(buf) {
                return Ok(t);
            }
            if client.read_buf(buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    })
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

async fn relay(
    mut client: TcpStream,
    broker: SocketAddr,
    credentials: Option<&(String, String)>,
) -> std::io::Result<()> {
    // Read up to the CONNECT's protocol level (at most 14 bytes), keeping
    // what was read for the broker.
    let mut start = Vec::with_capacity(64);
    let level = read_until(&mut client, &mut start, connect_level).await?;
    if let Some(old @ (3 | 4)) = level {
        client.write_all(&CONNACK_BAD_VERSION).await?;
        let _ = client.shutdown().await;
        let version = if old == 4 { "3.1.1" } else { "3.1" };
        return Err(std::io::Error::other(format!(
            "an MQTT {version} client, refused: the embedded broker speaks MQTT v5"
        )));
    }
    // A v5 client with the wrong username or password gets a CONNACK that
    // says so (rumqttd would close the connection without a word), and the
    // node logs it. The broker checks the same credentials again.
    if let (Some((user, pass)), Some(5)) = (credentials, level) {
        let whole = read_until(&mut client, &mut start, |read| match packet_len(read) {
            Some(n) if n > MAX_CHECKED_CONNECT => Some(None),
            Some(n) if read.len() >= n => Some(Some(n)),
            _ => None,
        })
        .await?;
        if let Some(n) = whole {
            let given = v5_credentials(&start[..n]);
            let good = given.as_ref().is_some_and(|l| {
                l.user == Some(user.as_bytes()) && l.pass == Some(pass.as_bytes())
            });
            if given.is_some() && !good {
                client.write_all(&CONNACK_BAD_CREDENTIALS).await?;
                let _ = client.shutdown().await;
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "bad username or password (CONNACK 0x86)",
                ));
            }
        }
    }
    let mut inner = TcpStream::connect(broker).await?;
    client.set_nodelay(true)?;
    inner.set_nodelay(true)?;
    inner.write_all(&start).await?;
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

/// A logging layer that drops rumqttd's router ERROR "no-connection id N
/// is already gone": the router logs it whenever a client sends its
/// DISCONNECT and then closes the socket, as well-behaved clients do (both
/// reach the router as a disconnection, and the second finds the first
/// done), so every normal disconnect looked like a failure in the node's
/// log. Every other message of the router is kept.
#[derive(Debug, Clone, Copy)]
pub struct QuietBrokerRouter;

impl QuietBrokerRouter {
    const TARGET: &'static str = "rumqttd::router::routing";

    fn benign(message: &str) -> bool {
        message.starts_with("no-connection id ") && message.ends_with(" is already gone")
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for QuietBrokerRouter {
    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        if event.metadata().target() != Self::TARGET {
            return true;
        }
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "message" {
                    self.0 = format!("{v:?}");
                }
            }
        }
        let mut m = Message(String::new());
        event.record(&mut m);
        !Self::benign(&m.0)
    }
}

#[cfg(test)]
mod tests {
    use super::{connect_level, packet_len, v5_credentials, Login, QuietBrokerRouter};

    #[test]
    fn the_broker_routers_disconnect_noise_is_dropped_and_nothing_else() {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::prelude::*;
        #[derive(Clone, Default)]
        struct Seen(Arc<Mutex<Vec<String>>>);
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Seen {
            fn on_event(
                &self,
                e: &tracing::Event<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                let mut v = self.0.lock().expect("lock");
                v.push(format!(
                    "{} {}",
                    e.metadata().target(),
                    e.metadata().level()
                ));
            }
        }
        let seen = Seen::default();
        let subscriber = tracing_subscriber::registry()
            .with(QuietBrokerRouter)
            .with(seen.clone());
        tracing::subscriber::with_default(subscriber, || {
            // As rumqttd 0.20 logs them (router/routing.rs).
            tracing::error!(target: "rumqttd::router::routing", "no-connection id {} is already gone", 7);
            tracing::error!(target: "rumqttd::router::routing", "no space for new connection");
            tracing::error!(target: "dmsc_node::edge", "no-connection id {} is already gone", 7);
        });
        let seen = seen.0.lock().expect("lock").clone();
        assert_eq!(
            seen,
            ["rumqttd::router::routing ERROR", "dmsc_node::edge ERROR"],
        );
    }

    fn login<'a>(user: &'a [u8], pass: &'a [u8]) -> Option<Login<'a>> {
        Some(Login {
            user: Some(user),
            pass: Some(pass),
        })
    }

    #[test]
    fn a_v5_connects_credentials_are_read_past_its_will() {
        // mosquitto_sub -V 5 -u alice -P secret, and with a will.
        let plain =
            b"\x10\x1f\x00\x04MQTT\x05\xc2\x00\x3c\x00\x00\x03sub\x00\x05alice\x00\x06secret";
        assert_eq!(packet_len(plain), Some(plain.len()));
        assert_eq!(v5_credentials(plain), login(b"alice", b"secret"));
        let will = b"\x10\x2a\x00\x04MQTT\x05\xc6\x00\x3c\x00\x00\x03sub\x02\x01\x01\x00\x01w\x00\x03bye\x00\x05alice\x00\x06secret";
        assert_eq!(v5_credentials(will), login(b"alice", b"secret"));
        // Without credentials; and cut short, which does not parse.
        let none = b"\x10\x10\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x03sub";
        assert_eq!(
            v5_credentials(none),
            Some(Login {
                user: None,
                pass: None
            })
        );
        assert_eq!(v5_credentials(&plain[..plain.len() - 3]), None);
        assert_eq!(packet_len(&b"\x10\x80"[..]), None);
    }

    #[test]
    fn a_connects_protocol_level_is_read_from_its_first_bytes() {
        // mosquitto_sub's v3.1.1 and v5 CONNECTs, and MQTT 3.1's.
        let v311 = b"\x10\x1a\x00\x04MQTT\x04\x02\x00\x3c";
        let v5 = b"\x10\x1b\x00\x04MQTT\x05\x02\x00\x3c\x00";
        let v31 = b"\x10\x1c\x00\x06MQIsdp\x03\x02";
        assert_eq!(connect_level(v311), Some(Some(4)));
        assert_eq!(connect_level(v5), Some(Some(5)));
        assert_eq!(connect_level(v31), Some(Some(3)));
        // A long CONNECT (remaining length in two bytes).
        assert_eq!(
            connect_level(b"\x10\x80\x01\x00\x04MQTT\x05"),
            Some(Some(5))
        );
        // Not yet: every prefix of a CONNECT asks for more.
        for n in 0..9 {
            assert_eq!(connect_level(&v311[..n]), None, "{n} bytes");
        }
        // Not a CONNECT at all.
        assert_eq!(connect_level(b"GET / HTTP/1.1\r\n"), Some(None));
        assert_eq!(connect_level(b"\x10\xff\xff\xff\xff\x00"), Some(None));
        assert_eq!(connect_level(b"\x10\x10\x00\x40MQTT"), Some(None));
    }
}
