//! The QUIC overlay: one mutual-TLS 1.3 connection per peer, reused.
//!
//! A node binds one UDP socket and uses it both to accept and to dial, so the
//! address a peer sees our connections come from is the address we listen
//! on; that is what lets gossip (which addresses peers by `SocketAddr`) reply
//! on the connection a message arrived on instead of dialing back.
//!
//! Shape:
//! - `send(addr, channel, bytes)` never blocks: it queues the message for a
//!   per-peer sender task, which dials on demand (with exponential backoff
//!   after a failure) and writes each message on its own unidirectional
//!   stream. A slow or dead peer therefore never stalls the gossip loop, and
//!   a full queue drops (gossip is loss-tolerant; drops are counted).
//! - every connection, accepted or dialed, gets a reader task that turns
//!   incoming streams into [`Inbound`] messages tagged with the peer's name
//!   as read from its verified certificate.
//! - if both sides dial at once, the connection initiated by the node with
//!   the smaller name wins on both sides (the rule is symmetric, so both
//!   keep the same one) and the other is closed.
//!
//! - delegations use bidirectional streams: [`Overlay::open_stream`] opens
//!   one on the pooled connection (a new stream is cheap; a new connection
//!   or handshake per request is not), and the peer's reader hands streams
//!   it accepts, after checking the preamble, to the handler the node set
//!   with [`Overlay::serve_streams`] (run in the task that read the
//!   preamble: no queue and no second task per delegation), or else to
//!   [`Overlay::incoming_streams`].
//!   The wrappers [`StreamSend`]/[`StreamRecv`] keep quinn out of callers.
//!   Each stream carries the peer's name and tenant scope, read once per
//!   connection from the certificate the handshake verified, so the node's
//!   policy judges the peer by its certificate, never by what it says.
//!
//! All tasks live in one `JoinSet` owned by the overlay: dropping the last
//! [`Overlay`] handle or calling [`Overlay::shutdown`] stops them.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use crate::frame::{self, Channel};
use crate::identity::{cert_info, NodeIdentity};
use crate::path::{self, Impair, PathInfo, PathSocket, Paths, Reachability, Transport};
use crate::relay::client::{self as relay_client, RelayAddr, TcpTls};
use crate::relay::{RelayEvent, RelayLimits, RelayServer};
use crate::revoke::RevocationSet;
use crate::{tls, TransportError};

/// Close code for a connection that lost the simultaneous-dial tie-break.
const CLOSE_DUPLICATE: u32 = 1;
/// Close code when the node shuts down.
const CLOSE_SHUTDOWN: u32 = 2;
/// Close code when a node dialed itself (its own address among bootstrap peers).
const CLOSE_SELF: u32 = 3;
/// Close code when membership declared the peer dead or departed.
const CLOSE_PEER_GONE: u32 = 4;
/// Close code when a certificate of the peer's chain was revoked.
const CLOSE_REVOKED: u32 = 5;
/// Close code of a probe connection once its handshake is confirmed.
const CLOSE_PROBE: u32 = 6;
/// Messages queued per peer before further ones are dropped.
const PEER_QUEUE: usize = 256;
/// A per-peer sender task exits after this long with nothing to send.
const SENDER_IDLE: Duration = Duration::from_secs(60);
/// Bound on reading one incoming message stream.
const STREAM_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Accepted bidirectional streams waiting for the node to take them.
const STREAM_QUEUE: usize = 1024;
/// Stream reset code: the receiving node has no room for another stream.
pub const RESET_BUSY: u32 = 1;
/// Stream reset code: the sender gave up (deadline, caller went away).
pub const RESET_CANCELLED: u32 = 2;

/// Overlay settings. Durations have production defaults in [`OverlayConfig::new`].
#[derive(Debug, Clone)]
pub struct OverlayConfig {
    pub listen: SocketAddr,
    pub identity: Arc<NodeIdentity>,
    /// QUIC PING interval on idle connections (keeps NAT bindings and RTT fresh).
    pub keep_alive: Duration,
    /// A connection silent for this long is closed.
    pub idle_timeout: Duration,
    /// Bound on one dial including the TLS handshake.
    pub connect_timeout: Duration,
    /// Ceiling of the redial backoff after failures.
    pub max_backoff: Duration,
    /// Revocations every handshake (both directions) is checked against.
    pub revoked: Arc<RevocationSet>,
    /// Where refused peer certificates are noted (for `dmsc-node check`).
    pub refusals: Arc<tls::RefusalLog>,
    /// Loss and delay on outgoing UDP (chaos tests; `DMSC_IMPAIR`).
    pub impair: Option<Impair>,
    /// Try to move relayed peers to a direct path (hole punching).
    pub direct_upgrade: bool,
    /// Largest UDP payload the overlay sends and accepts: the ceiling of
    /// QUIC's path MTU discovery, which finds what each path carries
    /// between 1200 bytes and this (see [`DEFAULT_MAX_UDP_PAYLOAD`]).
    pub max_udp_payload: u16,
}

/// The default ceiling of path MTU discovery: a 9000-byte (jumbo) IPv6
/// packet's UDP payload. Paths that carry less (a 1500-byte Ethernet or
/// tunnel MTU) are found by discovery, which starts at 1200 bytes and only
/// probes above what is known to work; paths that carry more (data-center
/// jumbo frames, loopback) let a busy connection pack several delegations
/// into one packet instead of one each, as TCP does with its segment size.
pub const DEFAULT_MAX_UDP_PAYLOAD: u16 = 8952;
/// Bounds of `max_udp_payload` (QUIC's minimum; the largest UDP payload).
pub const MAX_UDP_PAYLOAD_RANGE: std::ops::RangeInclusive<u16> = 1200..=65527;

impl OverlayConfig {
    pub fn new(listen: SocketAddr, identity: Arc<NodeIdentity>) -> Self {
        OverlayConfig {
            listen,
            identity,
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            max_backoff: Duration::from_secs(5),
            revoked: Arc::new(RevocationSet::new()),
            refusals: Arc::default(),
            impair: None,
            direct_upgrade: true,
            max_udp_payload: DEFAULT_MAX_UDP_PAYLOAD,
        }
    }
}

/// A message that arrived from a verified peer.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// The peer's overlay address (the address to reply to).
    pub from: SocketAddr,
    /// The peer's node name, from its verified SPIFFE ID.
    pub peer: Arc<str>,
    pub channel: Channel,
    pub payload: Bytes,
}

/// The tenants a peer's certificate limits it to (`urn:dmsc:tenant:<t>` URI
/// SANs of its verified node certificate); `None`: unscoped, any tenant.
pub type TenantScope = Option<Arc<[String]>>;

/// A bidirectional stream with a verified peer, preamble already handled.
#[derive(Debug)]
pub struct BiStream {
    /// The peer's node name, from its verified SPIFFE ID.
    pub peer: Arc<str>,
    /// The peer's tenant scope, from the same verified certificate.
    pub scope: TenantScope,
    pub from: SocketAddr,
    pub channel: Channel,
    pub send: StreamSend,
    pub recv: StreamRecv,
}

/// Sending half of a [`BiStream`].
#[derive(Debug)]
pub struct StreamSend {
    inner: quinn::SendStream,
    done: bool,
}

/// Dropped without [`StreamSend::finish`]: the stream is *reset*, so the
/// peer sees an error, never a clean end (quinn would finish it, and a body
/// cut short by a failure would look complete).
impl Drop for StreamSend {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.inner.reset(VarInt::from_u32(RESET_CANCELLED));
        }
    }
}

/// Receiving half of a [`BiStream`].
#[derive(Debug)]
pub struct StreamRecv(quinn::RecvStream);

impl StreamSend {
    fn new(inner: quinn::SendStream) -> StreamSend {
        StreamSend { inner, done: false }
    }

    pub async fn write_all(&mut self, bytes: &[u8]) -> Result<(), TransportError> {
        self.inner
            .write_all(bytes)
            .await
            .map_err(|e| TransportError::Stream(e.to_string()))
    }

    /// Writes several buffers without copying them together.
    pub async fn write_chunks(&mut self, chunks: &mut [Bytes]) -> Result<(), TransportError> {
        self.inner
            .write_all_chunks(chunks)
            .await
            .map_err(|e| TransportError::Stream(e.to_string()))
    }

    /// Ends the stream cleanly (the peer reads end-of-stream).
    pub fn finish(&mut self) -> Result<(), TransportError> {
        self.done = true;
        self.inner
            .finish()
            .map_err(|e| TransportError::Stream(e.to_string()))
    }

    /// Abandons the stream; the peer's reads fail with `code`.
    pub fn reset(&mut self, code: u32) {
        self.done = true;
        let _ = self.inner.reset(VarInt::from_u32(code));
    }

    /// Resolves when the peer stops reading (it gave up on this stream:
    /// STOP_SENDING, or its connection is gone), or once a finished
    /// stream's data is all acknowledged. The future borrows nothing, so
    /// one can be held across writes to the same stream; it does nothing
    /// until polled.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let stopped = self.inner.stopped();
        async move {
            let _ = stopped.await;
        }
    }
}

impl StreamRecv {
    /// The next chunk of at most `max` bytes; `None` at a clean end of stream.
    pub async fn read_chunk(&mut self, max: usize) -> Result<Option<Bytes>, TransportError> {
        match self.0.read_chunk(max, true).await {
            Ok(Some(c)) => Ok(Some(c.bytes)),
            Ok(None) => Ok(None),
            Err(quinn::ReadError::ConnectionLost(e)) => {
                Err(TransportError::ConnectionLost(e.to_string()))
            }
            Err(e) => Err(TransportError::Stream(e.to_string())),
        }
    }

    /// Tells the peer to stop sending on this stream.
    pub fn stop(&mut self, code: u32) {
        let _ = self.0.stop(VarInt::from_u32(code));
    }
}

impl tokio::io::AsyncRead for StreamRecv {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for StreamSend {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner)
            .poll_write(cx, buf)
            .map_err(std::io::Error::other)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.done = true;
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Counters the node exports as metrics.
#[derive(Debug, Default)]
pub struct OverlayStats {
    pub handshakes_ok_inbound: AtomicU64,
    pub handshakes_ok_outbound: AtomicU64,
    pub handshakes_failed_inbound: AtomicU64,
    pub handshakes_failed_outbound: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub messages_sent: AtomicU64,
    pub messages_received: AtomicU64,
    pub messages_dropped: AtomicU64,
    pub streams_refused: AtomicU64,
    pub streams_opened: AtomicU64,
    pub streams_accepted: AtomicU64,
    /// Probe connections (`dmsc-node check`) this node welcomed and let go
    /// without pooling; counted once the probe is closed or timed out.
    pub probes_answered: AtomicU64,
}

fn bump(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

/// One live peer connection, as shown by `status`.
#[derive(Debug, Clone)]
pub struct PeerLink {
    pub name: String,
    pub addr: SocketAddr,
    pub rtt: Duration,
    /// True if this node dialed the connection.
    pub outbound: bool,
    pub since: Instant,
    /// Serial of the certificate the peer presented on this connection.
    pub serial: String,
    /// How its packets travel now: direct or through a relay, over UDP or TCP.
    pub path: PathInfo,
    /// The largest UDP payload the connection sends now (path MTU
    /// discovery's finding, up to `max_udp_payload`).
    pub mtu: u16,
}

struct Conn {
    conn: Connection,
    peer: Arc<str>,
    /// The peer's mapped address (what it is known by when relayed).
    mapped: SocketAddr,
    scope: TenantScope,
    outbound: bool,
    since: Instant,
    serial: Arc<str>,
}

struct Inner {
    endpoint: Endpoint,
    local_addr: SocketAddr,
    name: String,
    cfg: OverlayConfig,
    /// Swapped by [`Overlay::reload_identity`]; each dial clones the current one.
    client: Mutex<quinn::ClientConfig>,
    /// The same credentials with the probe ALPN ([`Overlay::probe`]).
    probe_client: Mutex<quinn::ClientConfig>,
    /// The client config with MTU discovery off ([`transport_config`]):
    /// for dialing relays and relayed peers, and every dial of a node
    /// behind a NAT.
    fixed_mtu_client: Mutex<quinn::ClientConfig>,
    /// The server config with MTU discovery off: a relay's for every
    /// connection; otherwise for relayed peers and a node behind a NAT.
    fixed_mtu_server: Mutex<quinn::ServerConfig>,
    transports: Transports,
    conns: Mutex<HashMap<SocketAddr, Conn>>,
    /// Addresses whose dial the peer refused as a duplicate, with the
    /// peer's name: it keeps a connection of its own with us, filed here
    /// under another address (e.g. its mapped one, when it reached us
    /// through a relay), which [`pooled`] then uses for this address.
    aliases: Mutex<HashMap<SocketAddr, Arc<str>>>,
    senders: Mutex<HashMap<SocketAddr, mpsc::Sender<Bytes>>>,
    stats: Arc<OverlayStats>,
    inbound: mpsc::Sender<Inbound>,
    streams: mpsc::Sender<BiStream>,
    streams_rx: Mutex<Option<mpsc::Receiver<BiStream>>>,
    /// Serves accepted streams in place of the queue, once set.
    handler: std::sync::OnceLock<StreamHandler>,
    tasks: Mutex<JoinSet<()>>,
    /// Which way each packet goes (shared with the endpoint's socket).
    paths: Arc<Paths>,
    /// The relay role, once started.
    relay: Mutex<Option<Arc<RelayServer>>>,
    /// Relays a session task runs for.
    relays: Mutex<HashSet<RelayAddr>>,
    /// Those of them learned from gossip (dropped when gossip drops them).
    learned: Mutex<HashSet<RelayAddr>>,
    /// Overlay addresses of configured relays (kept whatever gossip says).
    configured: Mutex<HashSet<SocketAddr>>,
    /// TLS for TCP relay sessions (client side), swapped on reload.
    tcp_tls: TcpTls,
    /// TLS for the TCP relay listener (relay role), swapped on reload.
    tcp_server_tls: Arc<Mutex<Arc<rustls::ServerConfig>>>,
}

/// A handle that does not keep the overlay alive (its own tasks hold it).
#[derive(Clone)]
pub(crate) struct WeakOverlay(Weak<Inner>);

impl WeakOverlay {
    pub(crate) fn upgrade(&self) -> Option<Overlay> {
        self.0.upgrade().map(|inner| Overlay { inner })
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.endpoint
            .close(VarInt::from_u32(CLOSE_SHUTDOWN), b"shutdown");
    }
}

/// Handle to the overlay. Cheap to clone; the last clone dropped stops it.
#[derive(Clone)]
pub struct Overlay {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("name", &self.inner.name)
            .field("local_addr", &self.inner.local_addr)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these short, non-reentrant locks leaves
    // the maps consistent (every critical section is a single map operation),
    // so poisoning carries no information: take the guard.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The QUIC transport settings. `discover_mtu = false` keeps packets at
/// QUIC's 1200-byte minimum, for connections whose path can change under
/// them without quinn knowing:
/// - to and from relays, whose sessions carry other nodes' traffic: a path
///   MTU that shrinks leaves large packets lost until quinn's black-hole
///   detection gives up on them (after several loss bursts), while a relay
///   session counts as dead after 3.5 s of silence;
/// - with relayed peers (mapped addresses), and all of a node behind a NAT
///   (which reaches its peers through a relay until a hole is punched):
///   discovery through a relay finds the largest size there is (the relay
///   carries any), and the direct path found later may carry much less,
///   which quinn, not told of the switch, would find out only by losses.
fn transport_config(cfg: &OverlayConfig, discover_mtu: bool) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(cfg.keep_alive));
    t.max_idle_timeout(cfg.idle_timeout.try_into().ok());
    t.max_concurrent_uni_streams(VarInt::from_u32(1024));
    t.max_concurrent_bidi_streams(VarInt::from_u32(4096));
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(VarInt::from_u32(8));
    t.ack_frequency_config(Some(ack));
    if discover_mtu {
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(clamp_payload(cfg.max_udp_payload));
        t.mtu_discovery_config(Some(mtu));
    } else {
        t.mtu_discovery_config(None);
    }
    Arc::new(t)
}

fn clamp_payload(v: u16) -> u16 {
    v.clamp(*MAX_UDP_PAYLOAD_RANGE.start(), *MAX_UDP_PAYLOAD_RANGE.end())
}

/// The QUIC settings in use: MTU discovery on, and off ([`transport_config`]).
struct Transports {
    discovering: Arc<quinn::TransportConfig>,
    fixed: Arc<quinn::TransportConfig>,
}

impl Transports {
    fn new(cfg: &OverlayConfig) -> Transports {
        Transports {
            discovering: transport_config(cfg, true),
            fixed: transport_config(cfg, false),
        }
    }
}

/// The server and client configs, with MTU discovery and with it off
/// ([`transport_config`]), and the probe client config.
struct QuicConfigs {
    server: quinn::ServerConfig,
    fixed_mtu_server: quinn::ServerConfig,
    client: quinn::ClientConfig,
    probe: quinn::ClientConfig,
    fixed_mtu_client: quinn::ClientConfig,
}

fn quic_configs(
    identity: &NodeIdentity,
    cfg: &OverlayConfig,
    transports: &Transports,
) -> Result<QuicConfigs, TransportError> {
    let transport = &transports.discovering;
    let guard = tls::PeerGuard {
        revoked: cfg.revoked.clone(),
        refusals: cfg.refusals.clone(),
    };
    let server_tls = QuicServerConfig::try_from(tls::server_config(identity, &guard)?)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_tls));
    let mut fixed_mtu_server = server.clone();
    server.transport_config(transport.clone());
    fixed_mtu_server.transport_config(transports.fixed.clone());
    let client_tls = Arc::new(QuicClientConfig::try_from(tls::client_config(
        identity, &guard,
    )?)?);
    let mut client = quinn::ClientConfig::new(client_tls.clone());
    client.transport_config(transport.clone());
    let mut fixed_mtu_client = quinn::ClientConfig::new(client_tls);
    fixed_mtu_client.transport_config(transports.fixed.clone());
    let mut probe_tls = tls::client_config(identity, &guard)?;
    probe_tls.alpn_protocols = vec![tls::ALPN_PROBE.to_vec()];
    let mut probe = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(probe_tls)?));
    probe.transport_config(transport.clone());
    Ok(QuicConfigs {
        server,
        fixed_mtu_server,
        client,
        probe,
        fixed_mtu_client,
    })
}

impl Overlay {
    /// Binds the overlay and starts accepting. Returns the handle and the
    /// stream of inbound messages (which the node dispatches by channel).
    pub async fn bind(
        cfg: OverlayConfig,
    ) -> Result<(Overlay, mpsc::Receiver<Inbound>), TransportError> {
        let identity = cfg.identity.clone();
        let transports = Transports::new(&cfg);
        let QuicConfigs {
            server,
            fixed_mtu_server,
            client,
            probe: probe_client,
            fixed_mtu_client,
        } = quic_configs(&identity, &cfg, &transports)?;
        let (tcp_client, tcp_server) = relay_tls(&identity, &cfg)?;
        let bind_err = |source| TransportError::Bind {
            addr: cfg.listen,
            source,
        };
        let (paths, (disco_rx, relayed_disco_rx)) = Paths::new(identity.name(), cfg.direct_upgrade);
        let udp = std::net::UdpSocket::bind(cfg.listen).map_err(bind_err)?;
        let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
        // Not `runtime.wrap_udp_socket`: that one is watched for writing too,
        // which costs a wake-up per datagram sent (path/udp.rs).
        let udp: Arc<dyn quinn::AsyncUdpSocket> =
            Arc::new(crate::path::OverlayUdp::new(udp).map_err(bind_err)?);
        let payload = clamp_payload(cfg.max_udp_payload);
        let socket = PathSocket::new(udp, paths.clone(), cfg.impair, payload).map_err(bind_err)?;
        let endpoint = Endpoint::new_with_abstract_socket(
            endpoint_config(&identity, payload),
            Some(server),
            Arc::new(socket),
            runtime,
        )
        .map_err(bind_err)?;
        let local_addr = endpoint
            .local_addr()
            .map_err(|source| TransportError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let (inbound, rx) = mpsc::channel(1024);
        let (streams, streams_rx) = mpsc::channel(STREAM_QUEUE);
        let inner = Arc::new(Inner {
            endpoint: endpoint.clone(),
            local_addr,
            name: identity.name().to_string(),
            cfg,
            client: Mutex::new(client),
            probe_client: Mutex::new(probe_client),
            fixed_mtu_client: Mutex::new(fixed_mtu_client),
            fixed_mtu_server: Mutex::new(fixed_mtu_server),
            transports,
            conns: Mutex::new(HashMap::new()),
            aliases: Mutex::new(HashMap::new()),
            senders: Mutex::new(HashMap::new()),
            stats: Arc::new(OverlayStats::default()),
            inbound,
            streams,
            streams_rx: Mutex::new(Some(streams_rx)),
            handler: std::sync::OnceLock::new(),
            tasks: Mutex::new(JoinSet::new()),
            paths: paths.clone(),
            relay: Mutex::new(None),
            relays: Mutex::new(HashSet::new()),
            learned: Mutex::new(HashSet::new()),
            configured: Mutex::new(HashSet::new()),
            tcp_tls: Arc::new(Mutex::new(tcp_client)),
            tcp_server_tls: Arc::new(Mutex::new(tcp_server)),
        });
        // Disco messages are MAC'd with a key exported from the pair's own
        // connection: only the two ends can steer its packets.
        let weak_keys = Arc::downgrade(&inner);
        paths.set_key_source(Arc::new(move |addr| {
            let inner = weak_keys.upgrade()?;
            let conn = pooled(&inner, addr)?;
            let mut material = [0u8; 32];
            conn.export_keying_material(&mut material, path::disco::EXPORTER_LABEL, b"")
                .ok()?;
            Some(path::disco::pair_key(&material))
        }));
        let engine = path::spawn_engine(paths, disco_rx, relayed_disco_rx);
        spawn(&inner, async move {
            let _ = engine.await;
        });
        let weak = Arc::downgrade(&inner);
        let span = tracing::info_span!("overlay", node = %inner.name);
        spawn(&inner, accept_loop(endpoint, weak).instrument(span));
        info!(node = %inner.name, addr = %local_addr, "overlay listening (QUIC, mutual TLS 1.3)");
        Ok((Overlay { inner }, rx))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// This node's name, from its own certificate.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn stats(&self) -> Arc<OverlayStats> {
        self.inner.stats.clone()
    }

    /// Queues `payload` for `to` on `channel`. Never blocks; a message that
    /// cannot be queued or delivered is dropped and counted.
    pub fn send(
        &self,
        to: SocketAddr,
        channel: Channel,
        payload: &[u8],
    ) -> Result<(), TransportError> {
        if to == self.inner.local_addr {
            return Ok(());
        }
        let msg = frame::encode_message(channel, payload)?;
        let mut senders = lock(&self.inner.senders);
        let tx = senders
            .entry(to)
            .or_insert_with(|| start_sender(&self.inner, to));
        match tx.try_send(msg) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                bump(&self.inner.stats.messages_dropped, 1);
            }
            Err(mpsc::error::TrySendError::Closed(msg)) => {
                // The sender went idle and exited between our lookup and now.
                let tx = start_sender(&self.inner, to);
                let _ = tx.try_send(msg);
                senders.insert(to, tx);
            }
        }
        Ok(())
    }

    /// Opens a bidirectional stream on `channel` to the peer at `to`, on the
    /// pooled connection (dialing if there is none), and writes the preamble.
    pub async fn open_stream(
        &self,
        to: SocketAddr,
        channel: Channel,
    ) -> Result<BiStream, TransportError> {
        if to == self.inner.local_addr {
            return Err(TransportError::Connect {
                addr: to,
                reason: "the peer is this node itself".into(),
            });
        }
        let conn = connection_to(&self.inner, to).await?;
        // The pool knows the verified name and scope; parsing the
        // certificate again per stream would cost more than the stream itself.
        let pooled = lock(&self.inner.conns)
            .values()
            .find(|c| c.conn.stable_id() == conn.stable_id())
            .map(|c| (c.peer.clone(), c.scope.clone()));
        let (peer, scope) = match pooled {
            Some(p) => p,
            None => {
                let v = verified_peer(&conn);
                (
                    v.as_ref().map(|v| v.name.clone()).unwrap_or_default(),
                    v.and_then(|v| v.scope),
                )
            }
        };
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| TransportError::Stream(e.to_string()))?;
        let mut send = StreamSend::new(send);
        send.write_all(&frame::preamble(channel)).await?;
        bump(&self.inner.stats.streams_opened, 1);
        Ok(BiStream {
            peer,
            scope,
            from: to,
            channel,
            send,
            recv: StreamRecv(recv),
        })
    }

    /// The bidirectional streams peers open to this node. Returns the
    /// receiver once; the node's dispatcher owns it.
    pub fn incoming_streams(&self) -> Option<mpsc::Receiver<BiStream>> {
        lock(&self.inner.streams_rx).take()
    }

    /// Serves every bidirectional stream peers open from now on with
    /// `handler`, in the task that accepted it (instead of queueing it for
    /// [`Self::incoming_streams`]): one task per stream, no channel hop.
    /// Set once; `false` if a handler was already set.
    pub fn serve_streams(&self, handler: StreamHandler) -> bool {
        self.inner.handler.set(handler).is_ok()
    }

    /// Closes the connection to `addr`, if any: streams in flight on it
    /// fail at once instead of waiting for the idle timeout. The node calls
    /// this when membership declares the peer dead or departed; a later send
    /// dials again.
    pub fn close_peer(&self, addr: SocketAddr) -> bool {
        let removed = lock(&self.inner.conns).remove(&addr);
        match removed {
            Some(c) => {
                c.conn
                    .close(VarInt::from_u32(CLOSE_PEER_GONE), b"peer declared gone");
                info!(peer = %c.peer, addr = %addr, "closed the connection to a peer declared dead or departed");
                true
            }
            None => false,
        }
    }

    /// Switches to new credentials (a renewed node certificate, a CA bundle
    /// with a second root): handshakes from now on, in both directions, use
    /// them; live connections stay up. The node name must not change.
    pub fn reload_identity(&self, identity: &NodeIdentity) -> Result<(), TransportError> {
        if identity.name() != self.inner.name {
            return Err(TransportError::Identity(format!(
                "the new certificate names node `{}`, this node is `{}`; a node cannot change its name while running",
                identity.name(),
                self.inner.name
            )));
        }
        let configs = quic_configs(identity, &self.inner.cfg, &self.inner.transports)?;
        let (tcp_client, tcp_server) = relay_tls(identity, &self.inner.cfg)?;
        *lock(&self.inner.fixed_mtu_server) = configs.fixed_mtu_server.clone();
        // (After the store: a relay starting now takes the new one.)
        let relay = lock(&self.inner.relay).is_some();
        self.inner.endpoint.set_server_config(Some(if relay {
            configs.fixed_mtu_server
        } else {
            configs.server
        }));
        *lock(&self.inner.client) = configs.client;
        *lock(&self.inner.probe_client) = configs.probe;
        *lock(&self.inner.fixed_mtu_client) = configs.fixed_mtu_client;
        *lock(&self.inner.tcp_tls) = tcp_client;
        *lock(&self.inner.tcp_server_tls) = tcp_server;
        info!(node = %self.inner.name, serial = %identity.info.serial_hex, "overlay now presents the reloaded certificate");
        Ok(())
    }

    /// Closes every live connection whose peer presented a chain with a
    /// revoked certificate; returns the peers closed. Handshakes already
    /// refuse such chains; this ends the connections made before.
    pub fn close_revoked(&self) -> Vec<String> {
        let revoked = &self.inner.cfg.revoked;
        if revoked.is_empty() {
            return Vec::new();
        }
        let mut closed = Vec::new();
        let mut conns = lock(&self.inner.conns);
        conns.retain(|addr, c| {
            let Some(r) = peer_chain(&c.conn).and_then(|chain| revoked.revoked_in(chain.iter()))
            else {
                return true;
            };
            c.conn
                .close(VarInt::from_u32(CLOSE_REVOKED), b"certificate revoked");
            warn!(peer = %c.peer, addr = %addr, serial = %r.serial, reason = %r.reason, "closed the connection of a peer whose certificate was revoked");
            closed.push(c.peer.to_string());
            false
        });
        drop(conns);
        for name in self.inner.paths.close_revoked(revoked) {
            warn!(relay = %name, "closed the relay session to a relay whose certificate was revoked");
        }
        let relay = lock(&self.inner.relay).clone();
        if let Some(relay) = relay {
            for name in relay.close_revoked(revoked) {
                warn!(peer = %name, "closed the relay session of a node whose certificate was revoked");
                if !closed.contains(&name) {
                    closed.push(name);
                }
            }
        }
        closed
    }

    /// Peer certificates refused recently, with the reasons.
    pub fn refusals(&self, window: Duration) -> Vec<(std::time::SystemTime, String)> {
        self.inner.cfg.refusals.since(window)
    }

    /// The revocation set the overlay's verifiers consult.
    pub fn revocations(&self) -> Arc<RevocationSet> {
        self.inner.cfg.revoked.clone()
    }

    /// The live connections, one per peer.
    pub fn peers(&self) -> Vec<PeerLink> {
        lock(&self.inner.conns)
            .iter()
            .filter(|(_, c)| c.conn.close_reason().is_none())
            .map(|(addr, c)| PeerLink {
                name: c.peer.to_string(),
                addr: *addr,
                rtt: c.conn.rtt(),
                outbound: c.outbound,
                since: c.since,
                serial: c.serial.to_string(),
                path: self.inner.paths.describe(*addr),
                mtu: c.conn.stats().path.current_mtu,
            })
            .collect()
    }

    /// RTT of the connection to `addr`, if one is up.
    pub fn rtt(&self, addr: SocketAddr) -> Option<Duration> {
        lock(&self.inner.conns)
            .get(&addr)
            .filter(|c| c.conn.close_reason().is_none())
            .map(|c| c.conn.rtt())
    }

    /// Dials `addr` now (or returns the pooled connection) and reports the
    /// peer's verified name. Used by `check` and tests; gossip uses `send`.
    pub async fn connect(&self, addr: SocketAddr) -> Result<String, TransportError> {
        let c = connection_to(&self.inner, addr).await?;
        Ok(peer_name(&c).unwrap_or_default())
    }

    /// Dials `addr` on a fresh connection (never the pooled one), waits for
    /// the handshake to be confirmed, closes it, and reports the peer's
    /// verified name: a check that the peer accepts this node's *current*
    /// certificate (`dmsc-node check`).
    pub async fn probe(&self, addr: SocketAddr) -> Result<String, TransportError> {
        let conn = dial(&self.inner, addr, true).await?;
        bump(&self.inner.stats.handshakes_ok_outbound, 1);
        let name = peer_name(&conn).unwrap_or_default();
        conn.close(VarInt::from_u32(CLOSE_PROBE), b"probe");
        Ok(name)
    }

    /// Closes every connection and stops all tasks, waiting briefly so peers
    /// receive the close frames.
    pub async fn shutdown(&self) {
        // Relay sessions end with the endpoint: wanted no more, they stop
        // without a warning and without trying again (over TCP) first.
        lock(&self.inner.relays).clear();
        self.inner
            .endpoint
            .close(VarInt::from_u32(CLOSE_SHUTDOWN), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.inner.endpoint.wait_idle()).await;
        lock(&self.inner.tasks).abort_all();
    }
}

/// The endpoint's stateless-reset key and connection-ID key, derived from
/// the node's private key: a node restarted with the same key recognises
/// the connection IDs its predecessor issued and can reset the connections
/// it left in peers' pools (RFC 9000, 10.3), so a peer drops such a
/// connection at its next packet instead of holding delegations on it until
/// the idle timeout.
fn endpoint_config(identity: &NodeIdentity, max_udp_payload: u16) -> quinn::EndpointConfig {
    let derive = |label: &[u8]| {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(label);
        ctx.update(identity.key.secret_der());
        ctx.finish()
    };
    let reset = derive(b"dmsc quic stateless reset v1");
    let cid = derive(b"dmsc quic connection id v1");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cid.as_ref()[..8]);
    let cid_key = u64::from_be_bytes(cid_key);
    let mut cfg = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        reset.as_ref(),
    )));
    cfg.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    // What peers may send us: as much as we send (and quinn's default,
    // 1472, at the least, for peers that keep it).
    cfg.max_udp_payload_size(max_udp_payload.max(1472))
        .expect("clamped to quinn's bounds");
    cfg
}

/// TLS for TCP relay sessions: the overlay's mutual TLS 1.3 with the relay
/// ALPN (same certificates, verifiers and revocations).
fn relay_tls(
    identity: &NodeIdentity,
    cfg: &OverlayConfig,
) -> Result<(Arc<rustls::ClientConfig>, Arc<rustls::ServerConfig>), TransportError> {
    let guard = tls::PeerGuard {
        revoked: cfg.revoked.clone(),
        refusals: cfg.refusals.clone(),
    };
    let mut client = tls::client_config(identity, &guard)?;
    client.alpn_protocols = vec![tls::ALPN_RELAY.to_vec()];
    let mut server = tls::server_config(identity, &guard)?;
    server.alpn_protocols = vec![tls::ALPN_RELAY.to_vec()];
    Ok((Arc::new(client), Arc::new(server)))
}

/// Reachability as decided at start: the address to advertise and why.
#[derive(Debug, Clone)]
pub struct Established {
    pub advertised: SocketAddr,
    /// True: peers reach this node through a relay (`advertised` is its
    /// mapped address).
    pub relayed: bool,
    pub reason: String,
}

/// How long [`Overlay::establish`] waits for a first relay session: long
/// enough for a QUIC attempt to time out and a TCP + TLS session to come up
/// over a slow path (a node whose UDP is dropped).
const FIRST_SESSION_WAIT: Duration = Duration::from_secs(8);
/// How long it waits for a relay's dial-back probe.
const DIAL_BACK_WAIT: Duration = Duration::from_millis(1500);
/// TCP relay sessions a relay serves at once.
const MAX_TCP_SESSIONS: usize = 4096;
/// TCP relay handshakes in progress at once, in all and per source address.
const MAX_TCP_HANDSHAKES: usize = 256;
const MAX_TCP_HANDSHAKES_PER_IP: usize = 16;

impl Overlay {
    pub(crate) fn downgrade(&self) -> WeakOverlay {
        WeakOverlay(Arc::downgrade(&self.inner))
    }

    /// The path layer: routes, relay sessions, direct upgrades.
    pub fn paths(&self) -> Arc<Paths> {
        self.inner.paths.clone()
    }

    /// The relay role, if started.
    pub fn relay(&self) -> Option<Arc<RelayServer>> {
        lock(&self.inner.relay).clone()
    }

    /// Makes this node a relay: relay sessions over QUIC streams on the
    /// overlay, and over TCP + TLS 1.3 on `tcp_listen`. Returns the server,
    /// its refusals for the audit log and the TCP address bound.
    pub async fn start_relay(
        &self,
        tcp_listen: SocketAddr,
        limits: RelayLimits,
    ) -> Result<(Arc<RelayServer>, mpsc::Receiver<RelayEvent>, SocketAddr), TransportError> {
        let (server, events) = RelayServer::new(
            &self.inner.name,
            self.inner.paths.clone(),
            limits,
            self.inner.cfg.revoked.clone(),
        );
        let listener = tokio::net::TcpListener::bind(tcp_listen)
            .await
            .map_err(|source| TransportError::Bind {
                addr: tcp_listen,
                source,
            })?;
        let bound = listener
            .local_addr()
            .map_err(|source| TransportError::Bind {
                addr: tcp_listen,
                source,
            })?;
        *lock(&self.inner.relay) = Some(server.clone());
        // Connections accepted from now on keep QUIC's minimum packet size
        // ([`transport_config`]): a relay's sessions carry others' traffic.
        let fixed_mtu_server = lock(&self.inner.fixed_mtu_server).clone();
        self.inner
            .endpoint
            .set_server_config(Some(fixed_mtu_server));
        let span = tracing::info_span!("relay", node = %self.inner.name);
        spawn(
            &self.inner,
            tcp_accept_loop(listener, server.clone(), self.inner.tcp_server_tls.clone())
                .instrument(span),
        );
        info!(node = %self.inner.name, tcp = %bound, udp = %self.inner.local_addr, "relay role on: sessions over QUIC and TCP + TLS 1.3, mesh nodes only");
        Ok((server, events, bound))
    }

    /// Keeps a session to `relay` from now on, whatever gossip says later
    /// (a configured relay; no-op if one is kept, or if `relay` is this
    /// node).
    pub fn add_relay(&self, relay: RelayAddr) {
        lock(&self.inner.configured).insert(relay.overlay);
        self.keep_relay(relay);
    }

    fn keep_relay(&self, relay: RelayAddr) {
        if relay.overlay == self.inner.local_addr || relay.overlay == self.inner.paths.me() {
            return;
        }
        {
            let mut relays = lock(&self.inner.relays);
            if relays.contains(&relay) {
                return;
            }
            // One session per relay: a newer TCP address (its gossip
            // record) replaces the one assumed from the config.
            relays.retain(|r| r.overlay != relay.overlay);
            relays.insert(relay);
        }
        self.inner.paths.add_relay_addr(relay.overlay);
        self.inner.paths.activate();
        let span =
            tracing::info_span!("relay-session", node = %self.inner.name, relay = %relay.overlay);
        spawn(
            &self.inner,
            relay_client::keep_session(
                self.downgrade(),
                self.inner.paths.clone(),
                relay,
                self.inner.tcp_tls.clone(),
            )
            .instrument(span),
        );
    }

    pub(crate) fn tcp_tls(&self) -> TcpTls {
        self.inner.tcp_tls.clone()
    }

    /// The relays sessions are kept to.
    pub fn relays(&self) -> Vec<RelayAddr> {
        lock(&self.inner.relays).iter().copied().collect()
    }

    /// True while a session to `relay` is wanted.
    pub(crate) fn wants_relay(&self, relay: RelayAddr) -> bool {
        lock(&self.inner.relays).contains(&relay)
    }

    /// The relays gossip knows now: sessions start to new ones, and stop
    /// to learned ones gossip no longer lists (configured ones stay).
    pub fn set_learned_relays(&self, now: Vec<RelayAddr>) {
        let gone: Vec<RelayAddr> = {
            let mut learned = lock(&self.inner.learned);
            let gone = learned
                .iter()
                .filter(|r| !now.contains(r))
                .copied()
                .collect();
            *learned = now.iter().copied().collect();
            gone
        };
        let configured = lock(&self.inner.configured).clone();
        for r in gone
            .into_iter()
            .filter(|r| !configured.contains(&r.overlay))
        {
            lock(&self.inner.relays).remove(&r);
            info!(relay = %r.overlay, "relay gone from gossip: its session stops");
        }
        for r in now {
            self.keep_relay(r);
        }
    }

    /// Decides whether peers can dial this node at `direct` or must go
    /// through a relay, and sets the address relay sessions announce.
    /// `Auto` asks the relays to dial back the address they see.
    pub async fn establish(&self, reach: Reachability, direct: SocketAddr) -> Established {
        let paths = &self.inner.paths;
        let mapped = path::mapped_addr(&self.inner.name);
        let has_relays = !lock(&self.inner.relays).is_empty();
        let decided = |relayed: bool, reason: String| {
            let advertised = if relayed { mapped } else { direct };
            paths.set_me(advertised, relayed);
            paths.set_decided(&reason);
            Established {
                advertised,
                relayed,
                reason,
            }
        };
        if !has_relays {
            return match reach {
                Reachability::Relayed => decided(
                    true,
                    "reachability = relayed, but no relay is configured yet: peers reach this node once a relay is learned".into(),
                ),
                _ => decided(false, "no relay configured: reachable directly".into()),
            };
        }
        let waited = Instant::now();
        while paths.sessions().is_empty() && waited.elapsed() < FIRST_SESSION_WAIT {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        match reach {
            Reachability::Direct => decided(false, "reachability = direct".into()),
            Reachability::Relayed => decided(true, "reachability = relayed".into()),
            Reachability::Auto => {
                let sessions = paths.sessions();
                if sessions.is_empty() {
                    return decided(
                        false,
                        format!("no relay answered within {FIRST_SESSION_WAIT:?}: assuming this node is reachable directly"),
                    );
                }
                let quic: Vec<_> = sessions
                    .iter()
                    .filter(|s| s.transport == Transport::Quic)
                    .collect();
                if quic.is_empty() {
                    return decided(
                        true,
                        "UDP does not get through (relay sessions over TCP only): reachable through relays".into(),
                    );
                }
                let nonce: [u8; 16] = rand::random();
                paths.expect_dial_back(nonce);
                for s in &quic {
                    relay_client::request_dial_back(s, nonce);
                }
                let waited = Instant::now();
                let seen_at: Vec<SocketAddr> = quic.iter().filter_map(|s| s.observed).collect();
                while waited.elapsed() < DIAL_BACK_WAIT {
                    if paths.dial_back_seen() {
                        // Reachable, but at the address the relays see: if
                        // that is not the one peers would dial, it is not.
                        if !seen_at.is_empty() && !seen_at.contains(&path::canonical(direct)) {
                            return decided(
                                true,
                                format!("a relay reached this node at {}, not at {direct} (the address it would advertise): reachable through relays", seen_at.iter().map(|o| o.to_string()).collect::<Vec<_>>().join(", ")),
                            );
                        }
                        return decided(
                            false,
                            "a relay's dial-back from an unsolicited address arrived: reachable directly".into(),
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                decided(
                    true,
                    format!("no relay could dial back the address it sees ({}): behind NAT or a firewall, reachable through relays", quic.iter().filter_map(|s| s.observed).map(|o| o.to_string()).collect::<Vec<_>>().join(", ")),
                )
            }
        }
    }

    /// Records the relays the peer at `addr` advertises (from gossip).
    pub fn set_peer_via(&self, addr: SocketAddr, via: Vec<Arc<str>>) {
        self.inner.paths.set_via(addr, via);
    }

    /// Opens a relay session to `relay` over `transport` once, measures it
    /// and closes it (`dmsc-node netcheck`).
    pub async fn try_relay(&self, relay: RelayAddr, transport: Transport) -> relay_client::Attempt {
        relay_client::try_once(self, relay, transport).await
    }
}

async fn tcp_accept_loop(
    listener: tokio::net::TcpListener,
    server: Arc<RelayServer>,
    tls: Arc<Mutex<Arc<rustls::ServerConfig>>>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_TCP_SESSIONS));
    // Handshakes in progress, apart from established sessions and per
    // source address, so unauthenticated connections cannot hold the slots
    // of mesh nodes.
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_TCP_HANDSHAKES));
    let per_ip: Arc<Mutex<HashMap<std::net::IpAddr, usize>>> = Arc::default();
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                debug!(error = %e, "relay TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(shaking) = handshakes.clone().try_acquire_owned() else {
            debug!(peer = %from, "relay TCP handshakes at their limit; refusing");
            continue;
        };
        {
            let mut per = lock(&per_ip);
            let n = per.entry(from.ip()).or_insert(0);
            if *n >= MAX_TCP_HANDSHAKES_PER_IP {
                debug!(peer = %from, "too many relay TCP handshakes from this address; refusing");
                continue;
            }
            *n += 1;
        }
        let cfg = lock(&tls).clone();
        let server = server.clone();
        let slots = slots.clone();
        let per_ip = per_ip.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
            let result = tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await;
            drop(shaking);
            {
                let mut per = lock(&per_ip);
                if let Some(n) = per.get_mut(&from.ip()) {
                    *n -= 1;
                    if *n == 0 {
                        per.remove(&from.ip());
                    }
                }
            }
            let Ok(_permit) = slots.try_acquire_owned() else {
                debug!(peer = %from, "relay TCP sessions at their limit; refusing");
                return;
            };
            let stream = match result {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    warn!(peer = %from, error = %e, "refused a TCP relay session (TLS)");
                    server.refused_handshake(from, &e.to_string());
                    return;
                }
                Err(_) => {
                    debug!(peer = %from, "TCP relay handshake timed out");
                    return;
                }
            };
            let chain: Vec<CertificateDer<'static>> = stream
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default();
            let Some(name) = chain
                .first()
                .and_then(|c| cert_info(c).ok())
                .and_then(|i| i.spiffe.node_name().map(str::to_string))
            else {
                warn!(peer = %from, "refused a TCP relay session: no node identity");
                return;
            };
            let (rd, wr) = tokio::io::split(stream);
            server
                .serve(
                    (Box::new(rd), Box::new(wr)),
                    name.into(),
                    None,
                    Transport::Tcp,
                    Some(chain),
                )
                .await;
        });
    }
}

/// What [`Overlay::serve_streams`] runs for each accepted stream.
pub type StreamHandler = Arc<
    dyn Fn(BiStream) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

fn spawn<F>(inner: &Inner, fut: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let mut tasks = lock(&inner.tasks);
    while tasks.try_join_next().is_some() {}
    tasks.spawn(fut);
}

fn start_sender(inner: &Arc<Inner>, to: SocketAddr) -> mpsc::Sender<Bytes> {
    let (tx, rx) = mpsc::channel(PEER_QUEUE);
    let span = tracing::debug_span!("peer-sender", node = %inner.name, peer = %to);
    spawn(
        inner,
        sender_loop(Arc::downgrade(inner), to, rx).instrument(span),
    );
    tx
}

/// Whether a connection with `peer` keeps QUIC's minimum packet size
/// ([`transport_config`]): a relay, a relayed peer (a mapped address), or
/// any peer of a node behind a NAT. (A relay accepts every connection so.)
fn keeps_min_mtu(inner: &Inner, peer: SocketAddr) -> bool {
    inner.paths.is_relay_addr(peer) || path::is_mapped(peer) || inner.paths.relayed_mode()
}

async fn accept_loop(endpoint: Endpoint, weak: Weak<Inner>) {
    while let Some(incoming) = endpoint.accept().await {
        let Some(inner) = weak.upgrade() else { return };
        let remote = incoming.remote_address();
        let weak = weak.clone();
        let stats = inner.stats.clone();
        let connecting = if keeps_min_mtu(&inner, remote) {
            incoming.accept_with(Arc::new(lock(&inner.fixed_mtu_server).clone()))
        } else {
            incoming.accept()
        };
        spawn(&inner, async move {
            let accepted = match connecting {
                Ok(c) => c.await,
                Err(e) => Err(e),
            };
            match accepted {
                Ok(conn) if is_probe(&conn) => {
                    // The handshake was the whole point (the dialer waits
                    // for the welcome); never pool a probe.
                    bump(&stats.handshakes_ok_inbound, 1);
                    welcome(&conn).await;
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                    bump(&stats.probes_answered, 1);
                }
                Ok(conn) => {
                    bump(&stats.handshakes_ok_inbound, 1);
                    // First, before anything else can use the connection.
                    welcome(&conn).await;
                    if let Some(inner) = weak.upgrade() {
                        adopt(&inner, conn, false);
                    }
                }
                Err(e) => {
                    bump(&stats.handshakes_failed_inbound, 1);
                    warn!(peer = %remote, error = %e, "refused inbound overlay connection");
                }
            }
        });
    }
}

fn is_probe(conn: &Connection) -> bool {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .is_some_and(|p| p == tls::ALPN_PROBE)
}

/// The certificate chain the peer presented (and the verifier accepted).
fn peer_chain(conn: &Connection) -> Option<Vec<CertificateDer<'static>>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()
        .map(|c| *c)
}

fn peer_name(conn: &Connection) -> Option<String> {
    verified_peer(conn).map(|v| v.name.to_string())
}

/// What a connection's verified peer certificate says about the peer.
struct VerifiedPeer {
    name: Arc<str>,
    scope: TenantScope,
    serial: Arc<str>,
}

/// Reads the peer's leaf certificate once: its node name (the verifier
/// already required exactly one node SPIFFE ID), tenant scope and serial.
fn verified_peer(conn: &Connection) -> Option<VerifiedPeer> {
    let certs = peer_chain(conn)?;
    let info = cert_info(certs.first()?).ok()?;
    Some(VerifiedPeer {
        name: info.spiffe.node_name()?.into(),
        scope: info.tenants.map(Into::into),
        serial: info.serial_hex.into(),
    })
}

/// Registers a verified connection in the pool and starts its reader. Returns
/// the connection that the pool keeps for that address.
fn adopt(inner: &Arc<Inner>, conn: Connection, outbound: bool) -> Option<Connection> {
    let remote = conn.remote_address();
    // The TLS verifier already required a node SPIFFE ID; this cannot fail
    // for a connection that completed the handshake, but refuse if it does.
    let Some(VerifiedPeer {
        name: peer,
        scope,
        serial,
    }) = verified_peer(&conn)
    else {
        conn.close(VarInt::from_u32(CLOSE_SELF), b"no node identity");
        return None;
    };
    if *peer == *inner.name {
        debug!(addr = %remote, "dialed ourselves; closing");
        conn.close(VarInt::from_u32(CLOSE_SELF), b"self");
        return None;
    }
    let initiator = |out: bool| -> &str {
        if out {
            &inner.name
        } else {
            &peer
        }
    };
    let kept = {
        let mut conns = lock(&inner.conns);
        // Checked under the pool lock: a revocation that lands between the
        // handshake and this point is either seen here or, if it lands
        // after, finds the connection in the pool (close_revoked takes the
        // same lock after inserting the revocation).
        if let Some(r) = peer_chain(&conn).and_then(|c| inner.cfg.revoked.revoked_in(c.iter())) {
            drop(conns);
            warn!(peer = %peer, serial = %r.serial, "refusing a connection whose certificate was revoked during the handshake");
            conn.close(VarInt::from_u32(CLOSE_REVOKED), b"certificate revoked");
            return None;
        }
        match conns.get(&remote) {
            Some(old)
                if old.conn.close_reason().is_none()
                    && old.conn.stable_id() != conn.stable_id() =>
            {
                // Two live connections to one peer: keep the one initiated by
                // the smaller node name, on both sides. Same initiator: it
                // only dials when it has no live connection of its own, so
                // the old one is dead on its side (closed, or not yet seen
                // closed here): keep the new one.
                // A relayed node keeps its own connection to a relay: its
                // relay session rides on it, and the relay's dial (to our
                // mapped address) arrived through that very session. The
                // relay sees no duplicate (it keys the two apart), so the
                // choice stays consistent.
                let keep_new = if inner.paths.relayed_mode() && inner.paths.is_relay_addr(remote) {
                    outbound || !old.outbound
                } else {
                    initiator(outbound) <= initiator(old.outbound)
                };
                if keep_new {
                    let old = conns.insert(
                        remote,
                        Conn {
                            conn: conn.clone(),
                            peer: peer.clone(),
                            mapped: path::mapped_addr(&peer),
                            scope: scope.clone(),
                            outbound,
                            since: Instant::now(),
                            serial: serial.clone(),
                        },
                    );
                    if let Some(old) = old {
                        old.conn
                            .close(VarInt::from_u32(CLOSE_DUPLICATE), b"duplicate");
                    }
                    conn.clone()
                } else {
                    conn.close(VarInt::from_u32(CLOSE_DUPLICATE), b"duplicate");
                    return Some(old.conn.clone());
                }
            }
            _ => {
                conns.insert(
                    remote,
                    Conn {
                        conn: conn.clone(),
                        peer: peer.clone(),
                        mapped: path::mapped_addr(&peer),
                        scope: scope.clone(),
                        outbound,
                        since: Instant::now(),
                        serial: serial.clone(),
                    },
                );
                conn.clone()
            }
        }
    };
    info!(peer = %peer, addr = %remote, direction = if outbound { "out" } else { "in" }, "overlay peer connected");
    let span = tracing::info_span!("overlay-conn", node = %inner.name, peer = %peer);
    spawn(
        inner,
        bi_loop(Arc::downgrade(inner), conn.clone(), peer.clone(), scope).instrument(span.clone()),
    );
    spawn(
        inner,
        reader_loop(Arc::downgrade(inner), conn, peer).instrument(span),
    );
    Some(kept)
}

async fn reader_loop(weak: Weak<Inner>, conn: Connection, peer: Arc<str>) {
    let Some((stats, inbound)) = weak.upgrade().map(|i| (i.stats.clone(), i.inbound.clone()))
    else {
        return;
    };
    let from = conn.remote_address();
    loop {
        let mut stream = match conn.accept_uni().await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "overlay connection ended");
                break;
            }
        };
        let read = tokio::time::timeout(
            STREAM_READ_TIMEOUT,
            stream.read_to_end(frame::PREAMBLE_LEN + 4 + frame::MAX_FRAME),
        )
        .await;
        let bytes = match read {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                bump(&stats.streams_refused, 1);
                debug!(error = %e, "dropping unreadable overlay stream");
                continue;
            }
            Err(_) => {
                bump(&stats.streams_refused, 1);
                let _ = stream.stop(VarInt::from_u32(0));
                debug!("dropping overlay stream that stalled");
                continue;
            }
        };
        bump(&stats.bytes_received, bytes.len() as u64);
        match frame::decode_message(&bytes) {
            Ok((channel, payload)) => {
                bump(&stats.messages_received, 1);
                let msg = Inbound {
                    from,
                    peer: peer.clone(),
                    channel,
                    payload: Bytes::copy_from_slice(payload),
                };
                if inbound.try_send(msg).is_err() {
                    bump(&stats.messages_dropped, 1);
                }
            }
            Err(e) => {
                bump(&stats.streams_refused, 1);
                warn!(error = %e, "refused malformed overlay stream");
            }
        }
    }
    if let Some(inner) = weak.upgrade() {
        let mut conns = lock(&inner.conns);
        if conns
            .get(&from)
            .is_some_and(|c| c.conn.stable_id() == conn.stable_id())
        {
            conns.remove(&from);
            info!(peer = %peer, addr = %from, reason = ?conn.close_reason(), "overlay peer disconnected");
        }
        drop(conns);
        // The peer refused our dial as a duplicate after we pooled it.
        note_duplicate(&inner, from, &conn);
    }
}

/// Accepts a connection's bidirectional (delegation) streams. A loop of its
/// own, so a slow one-way (gossip) stream never delays a delegation.
async fn bi_loop(weak: Weak<Inner>, conn: Connection, peer: Arc<str>, scope: TenantScope) {
    let from = conn.remote_address();
    while let Ok((send, recv)) = conn.accept_bi().await {
        let Some(inner) = weak.upgrade() else { return };
        bump(&inner.stats.streams_accepted, 1);
        let task = take_stream(
            weak.clone(),
            (peer.clone(), scope.clone()),
            from,
            send,
            recv,
        );
        spawn(&inner, task);
    }
}

/// Reads the preamble of an accepted bidirectional stream and hands the
/// stream to the node. Runs in its own task so a peer that opens a stream
/// and says nothing never holds up the connection's reader.
async fn take_stream(
    weak: Weak<Inner>,
    (peer, scope): (Arc<str>, TenantScope),
    from: SocketAddr,
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let mut pre = [0u8; frame::PREAMBLE_LEN];
    let read = tokio::time::timeout(STREAM_READ_TIMEOUT, recv.read_exact(&mut pre)).await;
    let Some(inner) = weak.upgrade() else { return };
    let channel = match read {
        Ok(Ok(())) => frame::decode_preamble(&pre),
        Ok(Err(e)) => {
            debug!(peer = %peer, error = %e, "overlay stream ended before its preamble");
            return;
        }
        Err(_) => Err(frame::FrameError::ShortPreamble(0)),
    };
    let mut send = StreamSend::new(send);
    let mut recv = StreamRecv(recv);
    let channel = match channel {
        Ok(c) => c,
        Err(e) => {
            bump(&inner.stats.streams_refused, 1);
            warn!(peer = %peer, error = %e, "refused overlay stream");
            send.reset(RESET_BUSY);
            recv.stop(RESET_BUSY);
            return;
        }
    };
    if channel == Channel::Relay {
        let relay = lock(&inner.relay).clone();
        // The session may outlive this overlay handle's users: hold no
        // strong reference to the overlay while serving it.
        let refused = inner.stats.clone();
        drop(inner);
        match relay {
            Some(relay) => {
                let io: (crate::relay::SessionRead, crate::relay::SessionWrite) =
                    (Box::new(recv), Box::new(send));
                relay
                    .serve(io, peer, Some(from), Transport::Quic, None)
                    .await;
            }
            None => {
                bump(&refused.streams_refused, 1);
                debug!(peer = %peer, "refused a relay session: this node is not a relay");
                send.reset(RESET_BUSY);
                recv.stop(RESET_BUSY);
            }
        }
        return;
    }
    let stream = BiStream {
        peer,
        scope,
        from,
        channel,
        send,
        recv,
    };
    if let Some(handler) = inner.handler.get().cloned() {
        // The stream may outlive this overlay handle's users.
        drop(inner);
        handler(stream).await;
        return;
    }
    if let Err(e) = inner.streams.try_send(stream) {
        bump(&inner.stats.streams_refused, 1);
        let mut stream = e.into_inner();
        debug!(peer = %stream.peer, "no room for another overlay stream; resetting");
        stream.send.reset(RESET_BUSY);
        stream.recv.stop(RESET_BUSY);
    }
}

/// The pooled connection to `addr`, dialing if there is none.
async fn connection_to(inner: &Arc<Inner>, addr: SocketAddr) -> Result<Connection, TransportError> {
    if let Some(c) = pooled(inner, addr) {
        return Ok(c);
    }
    let conn = match dial(inner, addr, false).await {
        Ok(c) => c,
        // Refused as a duplicate of a connection the peer keeps with us
        // (`note_duplicate`): that one serves this address.
        Err(e) => return pooled(inner, addr).ok_or(e),
    };
    bump(&inner.stats.handshakes_ok_outbound, 1);
    adopt(inner, conn, true).ok_or_else(|| TransportError::Connect {
        addr,
        reason: "the peer is this node itself".into(),
    })
}

/// Dials `addr` with the current client config and waits until the peer
/// has accepted our certificate. Counts failed handshakes; the caller
/// counts a success once it keeps the connection.
/// The live pooled connection for `addr`. A mapped address (a relayed
/// node's) also finds a connection that node made to us directly, and an
/// address whose dial the peer refused as a duplicate finds the connection
/// the peer kept (`aliases`), so a pair keeps one connection whichever way
/// it was opened.
fn pooled(inner: &Inner, addr: SocketAddr) -> Option<Connection> {
    let conns = lock(&inner.conns);
    if let Some(c) = conns.get(&addr).filter(|c| c.conn.close_reason().is_none()) {
        return Some(c.conn.clone());
    }
    let alias = lock(&inner.aliases).get(&addr).cloned();
    if let Some(peer) = alias {
        let kept = conns
            .values()
            .filter(|c| c.peer == peer && c.conn.close_reason().is_none())
            .max_by_key(|c| c.since)
            .map(|c| c.conn.clone());
        if kept.is_some() {
            return kept;
        }
        // Gone too: dial this address again.
        lock(&inner.aliases).remove(&addr);
    }
    if !path::is_mapped(addr) {
        return None;
    }
    // The newest: an older one may be a restarted node's last connection.
    let addr = path::canonical(addr);
    conns
        .values()
        .filter(|c| c.conn.close_reason().is_none() && c.mapped == addr)
        .max_by_key(|c| c.since)
        .map(|c| c.conn.clone())
}

async fn dial(inner: &Inner, addr: SocketAddr, probe: bool) -> Result<Connection, TransportError> {
    let failed = |reason: String| {
        bump(&inner.stats.handshakes_failed_outbound, 1);
        TransportError::Connect { addr, reason }
    };
    let client = if probe {
        lock(&inner.probe_client).clone()
    } else if keeps_min_mtu(inner, addr) {
        lock(&inner.fixed_mtu_client).clone()
    } else {
        lock(&inner.client).clone()
    };
    let connecting = inner
        .endpoint
        .connect_with(client, addr, "dmsc-node")
        .map_err(|e| TransportError::Connect {
            addr,
            reason: e.to_string(),
        })?;
    let conn = match tokio::time::timeout(inner.cfg.connect_timeout, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(failed(e.to_string())),
        Err(_) => {
            return Err(failed(format!(
                "no answer within {:?}",
                inner.cfg.connect_timeout
            )))
        }
    };
    // In TLS 1.3 the client finishes its handshake before the server has
    // judged the client certificate, so a dial "succeeds" even when the peer
    // is about to refuse us. Wait for the handshake to be *confirmed* (the
    // server's HANDSHAKE_DONE frame, RFC 9001 4.1.2), or for the refusal.
    if let Err(e) = confirmed(&conn, inner.cfg.connect_timeout).await {
        note_duplicate(inner, addr, &conn);
        return Err(failed(e));
    }
    Ok(conn)
}

/// When the peer closed `conn` (ours, to `addr`) as a duplicate and keeps
/// another live connection with us under another address, notes that one
/// for `addr` ([`Inner::aliases`]): dialing `addr` again would be refused
/// the same way, forever.
fn note_duplicate(inner: &Inner, addr: SocketAddr, conn: &Connection) {
    let refused_as_duplicate = matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code == VarInt::from_u32(CLOSE_DUPLICATE)
    );
    if !refused_as_duplicate {
        return;
    }
    let Some(peer) = verified_peer(conn).map(|v| v.name) else {
        return;
    };
    let kept_elsewhere = lock(&inner.conns)
        .iter()
        .any(|(a, c)| *a != addr && c.peer == peer && c.conn.close_reason().is_none());
    if kept_elsewhere {
        debug!(peer = %peer, %addr, "the peer keeps another connection with us; using it for this address");
        lock(&inner.aliases).insert(addr, peer);
    }
}

/// The accepting side's first stream on a connection: an empty `Control`
/// stream. It can only be sent once the handshake is complete on this side,
/// i.e. once the dialer's certificate was accepted, so it tells the dialer
/// so without it polling for the HANDSHAKE_DONE frame.
async fn welcome(conn: &Connection) {
    if let Ok(mut s) = conn.open_uni().await {
        let _ = s.write_all(&frame::preamble(Channel::Control)).await;
        let _ = s.finish();
    }
}

/// Resolves once the accepting side welcomed us (it accepted our
/// certificate); errs if it closed the connection instead (e.g. it refused
/// our certificate) or never answered. In TLS 1.3 the dialer's handshake
/// completes before the peer has judged the dialer's certificate, so the
/// completed handshake alone proves nothing.
async fn confirmed(conn: &Connection, within: Duration) -> Result<(), String> {
    let wait = async {
        tokio::select! {
            s = conn.accept_uni() => {
                let mut s = s.map_err(|e| format!("peer refused this node: {e}"))?;
                match s.read_to_end(frame::PREAMBLE_LEN).await {
                    Ok(b) if frame::decode_preamble(&b) == Ok(Channel::Control) => Ok(()),
                    Ok(_) => Err("the peer's first stream is not a welcome (another dmsc version?)".to_string()),
                    Err(e) => Err(format!("peer refused this node: {e}")),
                }
            }
            e = conn.closed() => Err(format!("peer refused this node: {e}")),
        }
    };
    tokio::time::timeout(within, wait)
        .await
        .unwrap_or_else(|_| Err(format!("handshake not confirmed within {within:?}")))
}

async fn sender_loop(weak: Weak<Inner>, to: SocketAddr, mut rx: mpsc::Receiver<Bytes>) {
    let mut backoff = Duration::ZERO;
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut failures = 0u32;
    while let Ok(Some(msg)) = tokio::time::timeout(SENDER_IDLE, rx.recv()).await {
        let Some(inner) = weak.upgrade() else { return };
        if retry_at.is_some_and(|t| tokio::time::Instant::now() < t) {
            bump(&inner.stats.messages_dropped, 1);
            continue;
        }
        let conn = match connection_to(&inner, to).await {
            Ok(c) => {
                if failures > 0 {
                    info!(peer = %to, after_failures = failures, "overlay peer reachable again");
                }
                failures = 0;
                backoff = Duration::ZERO;
                retry_at = None;
                c
            }
            Err(e) => {
                bump(&inner.stats.messages_dropped, 1);
                failures += 1;
                backoff = (backoff * 2)
                    .max(Duration::from_millis(100))
                    .min(inner.cfg.max_backoff);
                retry_at = Some(tokio::time::Instant::now() + backoff);
                // First failure (and then every tenth) at warn: a refused or
                // vanished peer is worth one clear line, not one per gossip round.
                if failures == 1 || failures.is_multiple_of(10) {
                    warn!(peer = %to, failures, retry_in = ?backoff, error = %e, "cannot reach overlay peer");
                } else {
                    debug!(peer = %to, failures, error = %e, "cannot reach overlay peer");
                }
                continue;
            }
        };
        let stats = inner.stats.clone();
        drop(inner);
        match write_message(&conn, &msg).await {
            Ok(()) => {
                bump(&stats.messages_sent, 1);
                bump(&stats.bytes_sent, msg.len() as u64);
            }
            Err(e) => {
                bump(&stats.messages_dropped, 1);
                debug!(peer = %to, error = %e, "overlay send failed");
            }
        }
    }
    rx.close();
    if let Some(inner) = weak.upgrade() {
        let mut senders = lock(&inner.senders);
        if senders.get(&to).is_some_and(|tx| tx.is_closed()) {
            senders.remove(&to);
        }
    }
}

async fn write_message(conn: &Connection, msg: &[u8]) -> Result<(), TransportError> {
    let mut s = conn
        .open_uni()
        .await
        .map_err(|e| TransportError::Stream(e.to_string()))?;
    s.write_all(msg)
        .await
        .map_err(|e| TransportError::Stream(e.to_string()))?;
    s.finish()
        .map_err(|e| TransportError::Stream(e.to_string()))
}
