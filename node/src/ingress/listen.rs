//! Hardened HTTP listeners: the one accept loop and the one way of serving a
//! connection that the ingress (plain and TLS) and the admin API share.
//!
//! Everything a listener must refuse is bounded here, once, so a new
//! listener cannot forget a limit:
//!
//! - **Accept errors** (descriptor exhaustion above all) pause the loop,
//!   50 ms growing to 1 s while they persist, and log a warning at most
//!   every few seconds with the count of the ones it kept quiet about. A
//!   loop that retries at once turns `EMFILE` into a core at 100 %.
//! - **Connections** take a permit from the listener's and from the
//!   node-wide budget (`[limits] max_connections_per_listener`,
//!   `max_connections`) or are closed at once: refused, counted, never
//!   queued without bound.
//! - **Slow or silent clients**: hyper's HTTP/1 header-read timer (on
//!   hyper's tokio timer) closes a connection whose request head does not
//!   arrive in time, including between keep-alive requests. Hyper knows
//!   nothing of connections that never send a first request (a silent TCP
//!   or TLS client holds the protocol detection forever) or of idle HTTP/2
//!   connections, so a small per-connection watchdog closes those: no
//!   request within the header timeout, or none in flight for the idle
//!   timeout (gracefully: GOAWAY on HTTP/2). It reads request activity from
//!   counters that a guard holds until the response *body* ends, so a long
//!   stream is never mistaken for idleness, and only when its own timer
//!   fires, so requests never wake it.
//! - **Requests in flight** per listener: tower's `ConcurrencyLimit` on a
//!   semaphore shared by the listener's connections, behind `LoadShed`, so
//!   a request over the limit is answered 503 with `Retry-After: 1` at once
//!   instead of waiting (a queue is where overload turns into latency for
//!   everyone). As in tower, a permit is held until the response head.
//! - **Headers and HTTP/2**: request head size and header count, h2 stream
//!   concurrency, header list size, and h2's own rapid-reset guards
//!   (pending-accept and locally-errored reset streams) set explicitly,
//!   with keep-alive pings that close a dead peer's connection.
//!
//! tower-http's timeout layers are not used: a whole-request timeout would
//! cut the streams (SSE, gRPC) that legitimately outlive any fixed bound
//! (the request path has its own deadline, `dmsc-timeout`), and a body
//! timeout would change the request type the handlers see. The timeouts
//! here are about connections, which is hyper's and this module's level.
//!
//! - **Shutdown**: once the node drains ([`crate::drain`]), an ingress
//!   listener stops accepting, and a request that still arrives on an open
//!   connection is answered 503 with `Retry-After: 1` (and, on HTTP/1,
//!   `Connection: close`); the requests already in flight count in the
//!   node's drain until their response bodies end. The admin listener is
//!   exempt: `/ready` and `status` must answer while the node drains.
//!
//! [`Listeners`] holds what all listeners of a node share; [`Server`] is
//! one listener; [`Conn`] is one admitted connection that a listener's own
//! code (the TLS handshake and client-certificate judgement of an ingress)
//! hands its I/O and service to.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::{Service, ServiceBuilder, ServiceExt};
use tracing::{debug, warn, Instrument};

use crate::config::{LimitsConfig, MIN_HEADER_BYTES};
use crate::drain::{Drain, Work};
use crate::metrics::ListenerMetrics;
use crate::proto::http::{full, Body, BoxError};

/// First pause after a failed accept; doubles while accepts keep failing.
pub const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(50);
/// Longest pause between accept attempts.
pub const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);
/// At most one warning per listener and kind of trouble this often.
pub const LOG_EVERY: Duration = Duration::from_secs(5);
/// HTTP/2 keep-alive: a ping this often on a connection with no frames...
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
/// ...and the connection is closed if its answer takes longer than this.
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Streams a client may reset before the server accepted them (CVE-2023-44487
/// "rapid reset"); h2's default, set here so the guard does not depend on it.
const H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Streams the server may reset because of the client's protocol errors
/// before it closes the connection (CVE-2024-27316-style floods); h2's default.
const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
/// hyper's built-in HTTP/1 header count; setting it moves the header
/// array to the heap, so it is only set when the configuration differs.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// Which HTTP versions a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocols {
    /// HTTP/1.1, and HTTP/2 (h2 by ALPN or h2c) detected by its preface.
    Auto,
    /// HTTP/1.1 only (the admin API).
    Http1,
}

/// What every listener of one node shares: the limits, the node-wide
/// connection budget and the metrics.
#[derive(Debug, Clone)]
pub struct Listeners {
    node: Arc<str>,
    limits: LimitsConfig,
    connections: Arc<Semaphore>,
    metrics: ListenerMetrics,
    drain: Option<Arc<Drain>>,
}

impl Listeners {
    /// `node` names this node in the bodies of refusals.
    pub fn new(node: &str, limits: LimitsConfig, metrics: ListenerMetrics) -> Listeners {
        Listeners {
            node: node.into(),
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            metrics,
            drain: None,
        }
    }

    /// Listeners made from now on stop taking requests when `drain` starts
    /// and count theirs in it.
    pub fn with_drain(mut self, drain: Arc<Drain>) -> Listeners {
        self.drain = Some(drain);
        self
    }

    /// A listener that keeps serving while the node drains (the admin API).
    pub fn server_undrained(&self, name: impl Into<String>, protocols: Protocols) -> Server {
        self.make(name.into(), protocols, None)
    }

    /// One listener, called `name` in logs and metrics (`ingress:<addr>`,
    /// `admin:<addr>`), with its own connection and in-flight budgets.
    pub fn server(&self, name: impl Into<String>, protocols: Protocols) -> Server {
        self.make(name.into(), protocols, self.drain.clone())
    }

    fn make(&self, name: String, protocols: Protocols, drain: Option<Arc<Drain>>) -> Server {
        let l = &self.limits;
        Server {
            inner: Arc::new(ServerInner {
                name,
                drain,
                node: self.node.clone(),
                node_connections: self.connections.clone(),
                connections: Arc::new(Semaphore::new(l.max_connections_per_listener)),
                in_flight: Arc::new(Semaphore::new(l.max_in_flight_per_listener)),
                http: http_builder(l, protocols),
                protocols,
                limits: l.clone(),
                metrics: self.metrics.clone(),
            }),
        }
    }
}

/// A request's HTTP/2 header list size as SETTINGS_MAX_HEADER_LIST_SIZE
/// counts it (RFC 9113 6.5.2: name, value and 32 bytes per field), the
/// pseudo-header fields included.
fn header_list_size<B>(req: &Request<B>) -> usize {
    let pseudo = req.method().as_str().len()
        + req.uri().path_and_query().map_or(0, |p| p.as_str().len())
        + req.uri().authority().map_or(0, |a| a.as_str().len())
        + req.uri().scheme_str().map_or(0, str::len)
        + 4 * (":method".len() + 32);
    pseudo
        + req
            .headers()
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum::<usize>()
}

/// hyper's connection settings from the limits.
fn http_builder(l: &LimitsConfig, protocols: Protocols) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // hyper-util's auto builder offers no `max_header_size`; the largest
    // read buffer bounds what an unfinished request head can occupy.
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(l.header_read_timeout)
        .max_buf_size(l.max_header_bytes.max(MIN_HEADER_BYTES));
    if l.max_headers != HYPER_DEFAULT_MAX_HEADERS {
        b.http1().max_headers(l.max_headers);
    }
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(l.h2_max_concurrent_streams)
        // Twice the limit: h2 itself answers a list over its setting with
        // REFUSED_STREAM, which clients read as "safe to retry" and repeat;
        // up to twice the limit the node answers 431 (`headers_too_large`).
        .max_header_list_size(
            u32::try_from(l.max_header_bytes.saturating_mul(2)).unwrap_or(u32::MAX),
        )
        .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESET_STREAMS)
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    match protocols {
        Protocols::Auto => b,
        Protocols::Http1 => b.http1_only(),
    }
}

/// One listener's accept loop and its budgets.
#[derive(Clone)]
pub struct Server {
    inner: Arc<ServerInner>,
}

struct ServerInner {
    name: String,
    /// `None`: serves on while the node drains.
    drain: Option<Arc<Drain>>,
    node: Arc<str>,
    limits: LimitsConfig,
    node_connections: Arc<Semaphore>,
    connections: Arc<Semaphore>,
    in_flight: Arc<Semaphore>,
    http: auto::Builder<TokioExecutor>,
    protocols: Protocols,
    metrics: ListenerMetrics,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("name", &self.inner.name)
            .field("limits", &self.inner.limits)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// The listener's name in logs and metrics.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Accepts connections until the task is dropped. Each admitted
    /// connection runs `on_conn` as a task of this loop's own set, so
    /// stopping the loop stops them; `on_conn` does the listener's own part
    /// (a TLS handshake, say) and calls [`Conn::serve`].
    pub async fn run<F, Fut>(self, listener: TcpListener, on_conn: F)
    where
        F: Fn(TcpStream, SocketAddr, Conn) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let name = self.inner.name.as_str();
        let metrics = &self.inner.metrics;
        let mut conns = JoinSet::new();
        let mut pause = Backoff::default();
        let mut paused_until: Option<Instant> = None;
        let mut accept_log = RateLimited::new(LOG_EVERY);
        let mut refuse_log = RateLimited::new(LOG_EVERY);
        // Dropped when the node drains: new connections are refused by
        // the kernel, the admitted ones are served on.
        let mut listener = Some(listener);
        let drain = self.inner.drain.clone();
        loop {
            tokio::select! {
                _ = async {
                    match &drain {
                        Some(d) => d.started().await,
                        None => std::future::pending().await,
                    }
                }, if listener.is_some() => {
                    debug!(listener = name, "draining: no longer accepting connections");
                    listener = None;
                }
                accepted = async {
                    match &listener {
                        Some(l) => l.accept().await,
                        None => std::future::pending().await,
                    }
                }, if paused_until.is_none() && listener.is_some() => match accepted {
                    Ok((stream, peer)) => {
                        pause.reset();
                        match self.admit(peer) {
                            Ok(conn) => {
                                let _ = stream.set_nodelay(true);
                                conns.spawn(
                                    // The node's span even when the
                                    // (debug) connection span is off.
                                    on_conn(stream, peer, conn)
                                        .instrument(tracing::debug_span!("conn", %peer))
                                        .in_current_span(),
                                );
                            }
                            Err(limit) => {
                                metrics.connections_refused.get_or_create(&label(name)).inc();
                                if let Some(suppressed) = refuse_log.allow(Instant::now()) {
                                    warn!(
                                        listener = name,
                                        %peer,
                                        limit,
                                        suppressed,
                                        "connection limit reached; closing new connections at once ([limits] max_connections*)"
                                    );
                                }
                                drop(stream);
                            }
                        }
                    }
                    Err(e) => {
                        metrics.accept_errors.get_or_create(&label(name)).inc();
                        let wait = pause.next_pause();
                        if let Some(suppressed) = accept_log.allow(Instant::now()) {
                            warn!(
                                listener = name,
                                error = %e,
                                pause_ms = wait.as_millis() as u64,
                                suppressed,
                                "accept failed; pausing the listener (out of file descriptors? see `ulimit -n` and [limits] max_connections)"
                            );
                        }
                        paused_until = Some(Instant::now() + wait);
                    }
                },
                _ = tokio::time::sleep_until(paused_until.unwrap_or_else(Instant::now)), if paused_until.is_some() => {
                    paused_until = None;
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                // Drained and every connection gone: park until the node
                // drops this task.
                else => std::future::pending::<()>().await,
            }
        }
    }

    /// A connection's permits from the listener's and the node's budget, or
    /// the limit that refused it.
    fn admit(&self, peer: SocketAddr) -> Result<Conn, usize> {
        let s = &self.inner;
        let listener = s
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| s.limits.max_connections_per_listener)?;
        let node = s
            .node_connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| s.limits.max_connections)?;
        s.metrics.connections.get_or_create(&label(&s.name)).inc();
        Ok(Conn {
            server: self.clone(),
            peer,
            _permits: [listener, node],
        })
    }
}

fn label(listener: &str) -> crate::metrics::ListenerLabel {
    crate::metrics::ListenerLabel {
        listener: listener.to_string(),
    }
}

/// One admitted connection. It holds its share of the connection budgets
/// until it is dropped or [`Conn::serve`] returns.
pub struct Conn {
    server: Server,
    peer: SocketAddr,
    _permits: [OwnedSemaphorePermit; 2],
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("listener", &self.server.inner.name)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let s = &self.server.inner;
        s.metrics.connections.get_or_create(&label(&s.name)).dec();
    }
}

/// Where a connection is in its life, as the watchdog sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No request yet: the first must arrive within the header timeout.
    FirstRequest,
    /// Requests have come; idle after the idle timeout.
    Open,
    /// Graceful shutdown asked; dropped if it has not ended after a grace.
    Closing,
}

/// What the watchdog read of a connection's activity when its timer fired.
#[derive(Debug, Clone, Copy)]
struct Seen {
    started: Instant,
    requests: u64,
    in_flight: usize,
    /// When the last request ended (or the connection began).
    idle_since: Instant,
}

/// What the watchdog does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Look again then.
    Wait(Instant),
    /// Count an idle close, shut down gracefully, look again then.
    Shutdown(Instant),
    /// Close now, counting `reason` if given.
    Drop(Option<&'static str>),
}

/// The watchdog's decision, without I/O or clocks of its own: it runs only
/// when its timer fires, so requests cost it nothing (no wake-ups), and its
/// boundaries are tested exactly.
fn judge(phase: Phase, now: Instant, seen: Seen, limits: &LimitsConfig) -> (Phase, Verdict) {
    let grace = limits.header_read_timeout;
    match phase {
        Phase::FirstRequest if seen.requests == 0 => {
            let by = seen.started + limits.header_read_timeout;
            if now >= by {
                // Nothing in flight and nothing ever asked: nothing to be graceful about.
                (phase, Verdict::Drop(Some("header")))
            } else {
                (phase, Verdict::Wait(by))
            }
        }
        Phase::FirstRequest | Phase::Open => {
            if seen.in_flight > 0 {
                return (Phase::Open, Verdict::Wait(now + limits.idle_timeout));
            }
            let idle_at = seen.idle_since + limits.idle_timeout;
            if now >= idle_at {
                (Phase::Closing, Verdict::Shutdown(now + grace))
            } else {
                (Phase::Open, Verdict::Wait(idle_at))
            }
        }
        Phase::Closing if seen.in_flight == 0 => (phase, Verdict::Drop(None)),
        Phase::Closing => (phase, Verdict::Wait(now + grace)),
    }
}

/// Whether a `CONNECT` asks for a tunnel this listener opens: to a mesh
/// name (`<agent>.<tenant>.dmsc:<port>`, any port), on a listener that
/// speaks HTTP/2 too (an ingress, not the admin API). Inside, the
/// connection carries the client's own HTTP requests, which name the mesh
/// target themselves and are served like any other: never a byte is relayed
/// anywhere else.
fn tunnel_to_mesh<B>(req: &Request<B>, protocols: Protocols) -> bool {
    req.method() == hyper::Method::CONNECT
        // HTTP/1.1's CONNECT takes the whole connection; HTTP/2's is one
        // stream of many (refused with 405, like any other host)
        && req.version() < hyper::Version::HTTP_2
        && protocols == Protocols::Auto
        && req
            .uri()
            .host()
            .is_some_and(|h| crate::proto::host::parse_host(h).is_ok())
}

/// What answers a connection's requests ([`Conn::serve`]).
pub trait ConnService:
    Service<
        Request<Incoming>,
        Response = Response<Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S> ConnService for S
where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
}

impl Conn {
    /// Serves HTTP on `io` with `service` until the client leaves or a
    /// limit closes the connection. The service sits behind the listener's
    /// in-flight limit and load shedding.
    ///
    /// A proxy client's `CONNECT` to a mesh name (grpcio with `http_proxy`
    /// set, `curl -p`) is answered 200 and the tunnel served as a
    /// connection of its own on the same budget ([`tunnel_to_mesh`]); once,
    /// not a tunnel in a tunnel.
    pub async fn serve<I, S>(self, io: I, service: S)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
        S: ConnService,
    {
        let Some(tunnel) = self.serve_io(io, service.clone(), true).await else {
            return;
        };
        let peer = self.peer;
        match tunnel.await {
            Ok(upgraded) => {
                debug!(%peer, "CONNECT tunnel open");
                self.serve_io(upgraded, service, false).await;
            }
            Err(e) => debug!(%peer, error = %e, "CONNECT tunnel never opened"),
        }
    }

    /// [`Conn::serve`] on one transport: the connection, or the tunnel in
    /// it. Returns the tunnel a `CONNECT` opened (when `tunnels`).
    async fn serve_io<I, S>(
        &self,
        io: I,
        service: S,
        tunnels: bool,
    ) -> Option<hyper::upgrade::OnUpgrade>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
        S: ConnService,
    {
        let s = self.server.inner.clone();
        let tunnel: Arc<std::sync::Mutex<Option<hyper::upgrade::OnUpgrade>>> = Arc::default();
        let activity = Arc::new(Activity::new());
        let limited = ServiceBuilder::new()
            .load_shed()
            .layer(GlobalConcurrencyLimitLayer::with_semaphore(
                s.in_flight.clone(),
            ))
            .service(service);
        let tracked = {
            let (activity, s, tunnel) = (activity.clone(), s.clone(), tunnel.clone());
            tower::service_fn(move |mut req: Request<Incoming>| {
                // Not while draining: that answer is the 503 below.
                let open = (tunnels
                    && tunnel_to_mesh(&req, s.protocols)
                    && !s.drain.as_ref().is_some_and(|d| d.is_draining()))
                .then(|| (hyper::upgrade::on(&mut req), tunnel.clone()));
                let guard = activity.begin();
                let (svc, s) = (limited.clone(), s.clone());
                // Counted in the node's drain as long as the activity guard;
                // `None` inside a drain: refused.
                let work = s
                    .drain
                    .as_ref()
                    .map(|d| (!d.is_draining()).then(|| d.begin()));
                let http1 = req.version() < hyper::Version::HTTP_2;
                let oversize = (!http1)
                    .then(|| header_list_size(&req))
                    .filter(|n| *n > s.limits.max_header_bytes);
                async move {
                    if let Some((open, tunnel)) = open {
                        // 200: the tunnel opens once this answer is out.
                        *tunnel.lock().unwrap_or_else(|p| p.into_inner()) = Some(open);
                        let ok = Response::new(crate::proto::http::empty());
                        return Ok::<_, Infallible>(ok.map(|b| {
                            GuardedBody {
                                inner: b,
                                _guard: guard,
                                _work: None,
                            }
                            .boxed()
                        }));
                    }
                    let (resp, work) = match (work, oversize) {
                        (Some(None), _) => (s.shutting_down(http1), None),
                        (_, Some(size)) => (s.headers_too_large(size), None),
                        // Shed (or, never, a closed semaphore): answered here.
                        (work, None) => (
                            svc.oneshot(req).await.unwrap_or_else(|e| s.refusal(&e)),
                            work.flatten(),
                        ),
                    };
                    // The guard lives as long as the body: idle means no
                    // request *and* no response still streaming.
                    Ok::<_, Infallible>(resp.map(|b| {
                        GuardedBody {
                            inner: b,
                            _guard: guard,
                            _work: work,
                        }
                        .boxed()
                    }))
                }
            })
        };
        let conn = s
            .http
            .serve_connection_with_upgrades(io, TowerToHyperService::new(tracked));
        let mut conn = std::pin::pin!(conn);
        let limits = &s.limits;
        let timed_out = |reason: &str| {
            s.metrics
                .connections_timed_out
                .get_or_create(&crate::metrics::TimeoutLabels {
                    listener: s.name.clone(),
                    reason: reason.to_string(),
                })
                .inc();
        };
        let peer = self.peer;
        let mut phase = Phase::FirstRequest;
        let timer = tokio::time::sleep_until(activity.started + limits.header_read_timeout);
        let mut timer = std::pin::pin!(timer);
        loop {
            tokio::select! {
                ended = conn.as_mut() => {
                    if let Err(e) = ended {
                        if e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout) {
                            timed_out("header");
                            debug!(%peer, "request head not complete within the header timeout; closed");
                        } else {
                            debug!(%peer, error = %e, "connection ended");
                        }
                        return None;
                    }
                    return tunnel.lock().unwrap_or_else(|p| p.into_inner()).take();
                }
                _ = timer.as_mut() => {
                    let (next, verdict) = judge(phase, Instant::now(), activity.seen(), limits);
                    phase = next;
                    match verdict {
                        Verdict::Wait(at) => timer.as_mut().reset(at),
                        Verdict::Shutdown(at) => {
                            timed_out("idle");
                            debug!(%peer, "idle; closing");
                            conn.as_mut().graceful_shutdown();
                            timer.as_mut().reset(at);
                        }
                        Verdict::Drop(reason) => {
                            if let Some(reason) = reason {
                                timed_out(reason);
                            }
                            debug!(%peer, reason, "closing");
                            return None;
                        }
                    }
                }
            }
        }
    }
}

impl ServerInner {
    /// The answer to a request that arrives while the node drains: 503,
    /// `Retry-After: 1`, and on HTTP/1 `Connection: close`, so the client's
    /// next request opens a connection (to another node, behind a balancer).
    fn shutting_down(&self, http1: bool) -> Response<Body> {
        let mut r = self.problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!(
                "node {} is shutting down and takes no new requests; retry (another node)",
                self.node
            ),
        );
        if http1 {
            r.headers_mut()
                .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }

    /// 431 for an HTTP/2 header list over `max_header_bytes` (HTTP/1's
    /// limit is hyper's read buffer, which answers 431 itself).
    fn headers_too_large(&self, size: usize) -> Response<Body> {
        self.problem(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "bad-request",
            format!(
                "the request's header list is {size} bytes; this listener takes at most {} \
                 (`limits.max_header_bytes`)",
                self.limits.max_header_bytes
            ),
        )
    }

    /// The answer to a request the limit refused: 503, `Retry-After: 1`,
    /// problem details.
    fn refusal(&self, e: &BoxError) -> Response<Body> {
        let (status, kind, detail) = if e.is::<tower::load_shed::error::Overloaded>() {
            self.metrics
                .requests_shed
                .get_or_create(&label(&self.name))
                .inc();
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                format!(
                    "{} is answering its limit of {} requests at once; retry in a second",
                    self.name, self.limits.max_in_flight_per_listener
                ),
            )
        } else {
            // The services are infallible; only the limit layers can fail.
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("listener {}: {e}", self.name),
            )
        };
        self.problem(status, kind, detail)
    }

    fn problem(&self, status: StatusCode, kind: &'static str, detail: String) -> Response<Body> {
        let body = serde_json::json!({
            "type": format!("https://dmsc.dev/errors/{kind}"),
            "title": kind,
            "status": status.as_u16(),
            "detail": detail,
            "node": &*self.node,
        });
        let mut r = Response::new(full(body.to_string()));
        *r.status_mut() = status;
        let h = r.headers_mut();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        h.insert("dmsc-error", HeaderValue::from_static(kind));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            h.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let Ok(v) = HeaderValue::from_str(&self.node) {
            h.insert("dmsc-node", v);
        }
        r
    }
}

/// Requests (and their response bodies) on one connection, read by the
/// watchdog when its timer fires.
#[derive(Debug)]
struct Activity {
    started: Instant,
    requests: AtomicU64,
    in_flight: AtomicUsize,
    /// When the last request ended, in ms after `started`.
    last_end_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            started: Instant::now(),
            requests: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
        }
    }

    fn begin(self: &Arc<Self>) -> ActivityGuard {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        ActivityGuard(self.clone())
    }

    fn seen(&self) -> Seen {
        // in_flight first: a reader that sees the last request ended sees its end time.
        let in_flight = self.in_flight.load(Ordering::Acquire);
        Seen {
            started: self.started,
            requests: self.requests.load(Ordering::Relaxed),
            in_flight,
            idle_since: self.started
                + Duration::from_millis(self.last_end_ms.load(Ordering::Relaxed)),
        }
    }
}

/// One request in flight, until its response body is dropped.
#[derive(Debug)]
struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let a = &self.0;
        let ms = Instant::now()
            .saturating_duration_since(a.started)
            .as_millis();
        a.last_end_ms
            .fetch_max(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that holds its request's [`ActivityGuard`] until it is
/// dropped; length and end of stream pass through, so HTTP/1 responses keep
/// their `content-length`.
struct GuardedBody {
    inner: Body,
    _guard: ActivityGuard,
    _work: Option<Work>,
}

impl hyper::body::Body for GuardedBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The pause after each failed accept: doubling from [`ACCEPT_PAUSE_MIN`]
/// to [`ACCEPT_PAUSE_MAX`], back to the start after a success.
#[derive(Debug, Default)]
pub struct Backoff {
    last: Option<Duration>,
}

impl Backoff {
    pub fn next_pause(&mut self) -> Duration {
        let next = match self.last {
            None => ACCEPT_PAUSE_MIN,
            Some(d) => (d * 2).min(ACCEPT_PAUSE_MAX),
        };
        self.last = Some(next);
        next
    }

    pub fn reset(&mut self) {
        self.last = None;
    }
}

/// Lets one log line through per `every`; counts the ones it holds back.
/// Takes the time as a parameter, so its boundaries are tested exactly.
#[derive(Debug)]
pub struct RateLimited {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    pub fn new(every: Duration) -> RateLimited {
        RateLimited {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(lines held back since the last one)` if a line may be logged now.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::Notify;

    #[test]
    fn accept_pauses_double_to_a_second_and_reset() {
        let mut b = Backoff::default();
        let ms: Vec<u128> = (0..7).map(|_| b.next_pause().as_millis()).collect();
        assert_eq!(ms, [50, 100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_pause(), ACCEPT_PAUSE_MIN);
    }

    #[test]
    fn one_line_per_interval_with_the_count_held_back() {
        let t0 = Instant::now();
        let mut r = RateLimited::new(Duration::from_secs(5));
        assert_eq!(r.allow(t0), Some(0));
        assert_eq!(r.allow(t0 + Duration::from_millis(1)), None);
        assert_eq!(r.allow(t0 + Duration::from_millis(4999)), None);
        assert_eq!(r.allow(t0 + Duration::from_millis(5000)), Some(2));
        assert_eq!(r.allow(t0 + Duration::from_millis(9999)), None);
        assert_eq!(r.allow(t0 + Duration::from_millis(10_000)), Some(1));
    }

    #[test]
    fn the_watchdog_decides_at_exact_boundaries() {
        let l = limits();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let seen = |requests, in_flight, idle_since| Seen {
            started: t0,
            requests,
            in_flight,
            idle_since,
        };
        let first = Phase::FirstRequest;
        // No request: wait for the header timeout, then close, counted.
        assert_eq!(
            judge(first, t0 + ms(9_999), seen(0, 0, t0), &l),
            (first, Verdict::Wait(t0 + ms(10_000)))
        );
        assert_eq!(
            judge(first, t0 + ms(10_000), seen(0, 0, t0), &l),
            (first, Verdict::Drop(Some("header")))
        );
        // A request in flight: look again an idle timeout later.
        let now = t0 + ms(10_000);
        assert_eq!(
            judge(first, now, seen(1, 1, t0), &l),
            (Phase::Open, Verdict::Wait(now + ms(60_000)))
        );
        // Idle since t: shut down at t + idle, not a millisecond before.
        let t = t0 + ms(30_000);
        assert_eq!(
            judge(Phase::Open, t + ms(59_999), seen(3, 0, t), &l),
            (Phase::Open, Verdict::Wait(t + ms(60_000)))
        );
        assert_eq!(
            judge(Phase::Open, t + ms(60_000), seen(3, 0, t), &l),
            (Phase::Closing, Verdict::Shutdown(t + ms(70_000)))
        );
        // Closing: dropped once nothing is in flight, else given more grace.
        let late = t + ms(70_000);
        assert_eq!(
            judge(Phase::Closing, late, seen(3, 1, t), &l),
            (Phase::Closing, Verdict::Wait(late + ms(10_000)))
        );
        assert_eq!(
            judge(Phase::Closing, late, seen(3, 0, t), &l),
            (Phase::Closing, Verdict::Drop(None))
        );
    }

    fn limits() -> LimitsConfig {
        LimitsConfig {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_in_flight_per_listener: 1,
            max_connections_per_listener: 2,
            max_connections: 3,
            ..LimitsConfig::default()
        }
    }

    fn peer() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 1))
    }

    async fn ok(_req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        Ok(Response::new(full("ok")))
    }

    /// Serves one in-memory connection; returns the client end and the task.
    fn serve<S>(
        server: &Server,
        service: S,
    ) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<()>)
    where
        S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let (client, served) = tokio::io::duplex(64 * 1024);
        let conn = server.admit(peer()).expect("admitted");
        let task = tokio::spawn(conn.serve(TokioIo::new(served), service));
        (client, task)
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_at_the_header_timeout_not_before() {
        let metrics = ListenerMetrics::default();
        let server = Listeners::new("n", limits(), metrics.clone()).server("t", Protocols::Auto);
        let (_client, mut task) = serve(&server, tower::service_fn(ok));
        let almost = Duration::from_secs(10) - Duration::from_millis(1);
        assert!(
            tokio::time::timeout(almost, &mut task).await.is_err(),
            "closed before the header timeout"
        );
        tokio::time::timeout(Duration::from_millis(2), &mut task)
            .await
            .expect("closed at the header timeout")
            .expect("task");
        assert_eq!(metrics.timed_out("t", "header"), 1);
        assert_eq!(metrics.open("t"), 0, "the connection gave its permit back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_request_head_is_closed_and_a_prompt_one_is_served() {
        let metrics = ListenerMetrics::default();
        let server = Listeners::new("n", limits(), metrics.clone()).server("t", Protocols::Http1);
        let (mut client, task) = serve(&server, tower::service_fn(ok));
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = vec![0u8; 1024];
        let n = client.read(&mut buf).await.expect("read");
        let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(
            head.contains("content-length: 2\r\n"),
            "length kept: {head}"
        );
        // Keep-alive, then one byte of the next head every 4 s: the head
        // timer runs from the end of the last response, not per byte.
        let start = Instant::now();
        let trickle = async {
            for b in b"GET / HTTP/1.1\r\n" {
                tokio::time::sleep(Duration::from_secs(4)).await;
                if client.write_all(&[*b]).await.is_err() {
                    break;
                }
            }
        };
        tokio::select! {
            _ = trickle => panic!("the slow head was never cut"),
            _ = task => {}
        }
        assert!(start.elapsed() >= Duration::from_secs(10));
        assert!(
            start.elapsed() < Duration::from_secs(13),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(metrics.timed_out("t", "header"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_http2_gets_goaway_after_the_idle_timeout_but_a_long_stream_is_not_cut() {
        let metrics = ListenerMetrics::default();
        let server = Listeners::new("n", limits(), metrics.clone()).server("t", Protocols::Auto);
        // A response body that streams for 90 s, longer than the idle timeout.
        let service = tower::service_fn(|req: Request<Incoming>| async move {
            if req.uri().path() == "/stream" {
                let frames = futures_util::stream::unfold(0u32, |i| async move {
                    (i < 9).then_some(())?;
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    Some((
                        Ok::<_, BoxError>(hyper::body::Frame::data(bytes::Bytes::from("x"))),
                        i + 1,
                    ))
                });
                return Ok::<_, Infallible>(Response::new(
                    http_body_util::StreamBody::new(frames).boxed(),
                ));
            }
            Ok(Response::new(full("ok")))
        });
        let (client, task) = serve(&server, service);
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client))
                .await
                .expect("h2 handshake");
        let client_conn = tokio::spawn(conn);
        let req = |path: &str| {
            Request::builder()
                .uri(format!("http://x{path}"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .expect("request")
        };
        let start = Instant::now();
        let resp = send.send_request(req("/stream")).await.expect("response");
        let body = resp.into_body().collect().await.expect("whole stream");
        assert_eq!(body.to_bytes().len(), 9);
        assert!(start.elapsed() >= Duration::from_secs(90));
        assert_eq!(
            metrics.timed_out("t", "idle"),
            0,
            "a streaming body is activity"
        );
        // Now idle: GOAWAY after the idle timeout, and the connection ends.
        let idle_from = Instant::now();
        task.await.expect("server side ended");
        let idle = idle_from.elapsed();
        assert!(idle >= Duration::from_secs(60), "{idle:?}");
        assert!(idle < Duration::from_secs(61), "{idle:?}");
        assert_eq!(metrics.timed_out("t", "idle"), 1);
        let _ = client_conn.await;
    }

    /// An HTTP/2 header list over the limit gets 431 with the reason, not a
    /// refused stream (which clients retry); the connection serves on.
    #[tokio::test]
    async fn an_http2_header_list_over_the_limit_gets_431() {
        let limits = LimitsConfig {
            max_header_bytes: 8192,
            ..limits()
        };
        let server =
            Listeners::new("n", limits, ListenerMetrics::default()).server("t", Protocols::Auto);
        let (client, _task) = serve(&server, tower::service_fn(ok));
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client))
                .await
                .expect("h2 handshake");
        tokio::spawn(conn);
        let req = |value_len: usize| {
            Request::builder()
                .uri("http://x/")
                .header("x-long", "a".repeat(value_len))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .expect("request")
        };
        let resp = send
            .send_request(req(9000))
            .await
            .expect("an answer, not a reset");
        assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains("at most 8192"), "{body}");
        assert!(body.contains("\"status\":431"), "{body}");
        // Within the limit, on the same connection: served.
        let resp = send.send_request(req(7000)).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn over_the_in_flight_limit_requests_get_503_with_retry_after() {
        let metrics = ListenerMetrics::default();
        let server = Listeners::new("n1", limits(), metrics.clone()).server("t", Protocols::Auto);
        let release = Arc::new(Notify::new());
        let service = {
            let release = release.clone();
            tower::service_fn(move |_req: Request<Incoming>| {
                let release = release.clone();
                async move {
                    release.notified().await;
                    Ok::<_, Infallible>(Response::new(full("slow ok")))
                }
            })
        };
        let client = |io| async move {
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            send
        };
        let (a, _ta) = serve(&server, service.clone());
        let (b, _tb) = serve(&server, service.clone());
        let mut a = client(a).await;
        let mut b = client(b).await;
        let get = || {
            Request::builder()
                .uri("/")
                .header("host", "x")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .expect("request")
        };
        let first = tokio::spawn(a.send_request(get()));
        // The limit is 1: once the first holds it, the second is shed.
        tokio::time::timeout(Duration::from_secs(10), async {
            while server.inner.in_flight.available_permits() > 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the first request holds the permit");
        let shed = b.send_request(get()).await.expect("response");
        assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(shed.headers()[RETRY_AFTER], "1");
        assert_eq!(shed.headers()[CONTENT_TYPE], "application/problem+json");
        let body = shed.into_body().collect().await.expect("body").to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["title"], "overloaded");
        assert_eq!(v["node"], "n1");
        assert_eq!(metrics.shed("t"), 1);
        release.notify_one();
        let r = first.await.expect("task").expect("response");
        assert_eq!(r.status(), StatusCode::OK);
        // The permit is back: the next one is served.
        let next = tokio::spawn(b.send_request(get()));
        release.notify_one();
        assert_eq!(next.await.expect("task").expect("resp").status(), 200);
    }

    #[tokio::test]
    async fn connections_over_either_budget_are_refused() {
        let metrics = ListenerMetrics::default();
        let listeners = Listeners::new("n", limits(), metrics.clone());
        let a = listeners.server("a", Protocols::Auto);
        let b = listeners.server("b", Protocols::Auto);
        // Per listener: 2.
        let a1 = a.admit(peer()).expect("a1");
        let _a2 = a.admit(peer()).expect("a2");
        assert_eq!(a.admit(peer()).err(), Some(2));
        // Node-wide: 3, shared with listener b.
        let _b1 = b.admit(peer()).expect("b1");
        assert_eq!(b.admit(peer()).err(), Some(3));
        assert_eq!(metrics.open("a"), 2);
        drop(a1);
        assert_eq!(metrics.open("a"), 1);
        let _b2 = b
            .admit(peer())
            .expect("a freed permit serves the other listener");
    }
}
