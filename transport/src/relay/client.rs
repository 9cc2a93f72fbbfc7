//! A node's sessions to the relays it knows: one task per relay that keeps
//! a session up, over QUIC while UDP gets through and over TCP + TLS 1.3
//! when it does not, and moves back to QUIC once a UDP probe to a relay is
//! answered again. A session says hello with the node's advertised
//! address (again whenever it changes), pings every second, and counts as
//! dead after 3.5 s of silence, which is what moves a node to its other
//! relay when one dies.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::frame::{Decoder, Frame};
use super::{SessionRead, SessionWrite};
use crate::frame::Channel;
use crate::identity::cert_info;
use crate::overlay::WeakOverlay;
use crate::path::{lock, Paths, Session, Transport};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const WELCOME_TIMEOUT: Duration = Duration::from_secs(5);
const PING_EVERY: Duration = Duration::from_secs(1);
/// A session silent this long is dead.
const DEAD_AFTER: Duration = Duration::from_millis(3500);
const QUEUE: usize = 4096;
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// `Hello` is said again every this many pings.
const HELLO_AGAIN_TICKS: u64 = 10;

/// Where a relay listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RelayAddr {
    /// Its overlay (UDP) address.
    pub overlay: SocketAddr,
    /// Its TCP + TLS relay listener.
    pub tcp: SocketAddr,
}

/// What one session attempt produced, for `netcheck`.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub transport: Transport,
    pub ok: bool,
    pub rtt: Option<Duration>,
    pub detail: String,
}

/// TLS settings for TCP sessions; swapped on certificate reload.
pub type TcpTls = Arc<Mutex<Arc<rustls::ClientConfig>>>;

/// Keeps a session to `relay` up until the overlay goes away.
pub(crate) async fn keep_session(
    overlay: WeakOverlay,
    paths: Arc<Paths>,
    relay: RelayAddr,
    tls: TcpTls,
) {
    let mut backoff = Duration::from_millis(250);
    let mut failures = 0u32;
    loop {
        match overlay.upgrade() {
            Some(o) if o.wants_relay(relay) => {}
            _ => return,
        }
        let started = Instant::now();
        let result = match open(&overlay, &paths, relay, &tls).await {
            // Listed as its own relay (a shared config): nothing to keep.
            Ok(opened) if *opened.name == *paths.name => {
                info!(relay = %relay.overlay, "this relay address is this node itself; no session to keep");
                return;
            }
            Ok(opened) => run(&overlay, &paths, relay, opened).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(why) => {
                debug!(relay = %relay.overlay, reason = %why, "relay session ended");
            }
            // The overlay shut down (a node stopping, `netcheck` done) or
            // let go of this relay: the session's end is no failure.
            Err(_) if !overlay.upgrade().is_some_and(|o| o.wants_relay(relay)) => return,
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(20) {
                    warn!(relay = %relay.overlay, failures, error = %e, "no relay session");
                } else {
                    debug!(relay = %relay.overlay, error = %e, "no relay session");
                }
            }
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(250);
            failures = 0;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A session stream just opened, not yet greeted.
pub(crate) struct Opened {
    io: (SessionRead, SessionWrite),
    /// The relay's node name, from its verified certificate.
    name: Arc<str>,
    transport: Transport,
    /// The relay's chain (TCP), for revocation.
    chain: Option<Vec<rustls::pki_types::CertificateDer<'static>>>,
}

/// QUIC first unless UDP is known blocked; TCP otherwise.
async fn open(
    overlay: &WeakOverlay,
    paths: &Paths,
    relay: RelayAddr,
    tls: &TcpTls,
) -> Result<Opened, String> {
    let mut why = String::new();
    if !paths.udp_blocked() {
        match open_quic(overlay, relay.overlay).await {
            Ok(o) => {
                paths.note_quic_ok();
                return Ok(o);
            }
            Err(e) => {
                paths.note_quic_failed();
                why = format!("QUIC: {e}; ");
            }
        }
    }
    match open_tcp(relay.tcp, tls).await {
        Ok(o) => Ok(o),
        Err(e) => Err(format!("{why}TCP: {e}")),
    }
}

pub(crate) async fn open_quic(overlay: &WeakOverlay, addr: SocketAddr) -> Result<Opened, String> {
    let o = overlay.upgrade().ok_or("overlay shut down")?;
    let bi = tokio::time::timeout(CONNECT_TIMEOUT, o.open_stream(addr, Channel::Relay))
        .await
        .map_err(|_| format!("no answer within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    let rd: SessionRead = Box::new(bi.recv);
    let wr: SessionWrite = Box::new(bi.send);
    Ok(Opened {
        io: (rd, wr),
        name: bi.peer.clone(),
        transport: Transport::Quic,
        chain: None,
    })
}

pub(crate) async fn open_tcp(addr: SocketAddr, tls: &TcpTls) -> Result<Opened, String> {
    let cfg = lock(tls).clone();
    let connect = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from("dmsc-node").map_err(|e| e.to_string())?;
        tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))
    };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| format!("no answer within {CONNECT_TIMEOUT:?}"))??;
    let chain: Vec<rustls::pki_types::CertificateDer<'static>> = stream
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let peer = chain
        .first()
        .and_then(|c| cert_info(c).ok())
        .and_then(|i| i.spiffe.node_name().map(str::to_string))
        .ok_or("the relay presented no node identity")?;
    let (rd, wr) = tokio::io::split(stream);
    Ok(Opened {
        io: (Box::new(rd), Box::new(wr)),
        name: peer.into(),
        transport: Transport::Tcp,
        chain: Some(chain),
    })
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1)
}

/// Runs one session; `Ok(reason)` when it ended for a reason that is not a
/// failure (moving back to QUIC), `Err` otherwise.
async fn run(
    overlay: &WeakOverlay,
    paths: &Arc<Paths>,
    relay: RelayAddr,
    opened: Opened,
) -> Result<String, String> {
    let Opened {
        io: (mut rd, mut wr),
        name,
        transport,
        chain,
    } = opened;
    let mut me = paths.me();
    let hello = Frame::Hello { advertised: me }
        .to_bytes()
        .map_err(|e| e.to_string())?;
    wr.write_all(&hello).await.map_err(|e| e.to_string())?;
    wr.flush().await.map_err(|e| e.to_string())?;
    let mut dec = Decoder::new();
    let mut buf = vec![0u8; 32 * 1024];
    let (token, observed) = tokio::time::timeout(WELCOME_TIMEOUT, async {
        loop {
            if let Some(f) = dec.next_frame().map_err(|e| e.to_string())? {
                match f {
                    Frame::Welcome { observed, token } => return Ok((token, observed)),
                    Frame::Refused { reason } => return Err(format!("refused: {reason}")),
                    _ => continue,
                }
            }
            let n = rd.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed before welcome".to_string());
            }
            dec.push(&buf[..n]);
        }
    })
    .await
    .map_err(|_| "no welcome".to_string())??;
    let (tx, rx) = mpsc::channel::<Bytes>(QUEUE);
    let rtt_us = Arc::new(AtomicU64::new(0));
    let close = Arc::new(tokio::sync::Notify::new());
    let id = paths.add_session(Session {
        close: close.clone(),
        chain: chain.map(Arc::new),
        id: 0,
        relay: name.clone(),
        relay_addr: relay.overlay,
        transport,
        observed,
        token,
        since: Instant::now(),
        rtt_us: rtt_us.clone(),
        tx: tx.clone(),
    });
    info!(relay = %name, addr = %relay.overlay, transport = transport.as_str(), observed = ?observed, "relay session up");
    let writer = super::spawn_writer(wr, rx, None);
    let mut tick = tokio::time::interval(PING_EVERY);
    let mut ticks = 0u64;
    let mut last_rx = Instant::now();
    let send = |f: Frame| {
        if let Ok(b) = f.to_bytes() {
            let _ = tx.try_send(b);
        }
    };
    let result: Result<String, String> = 'session: loop {
        // Frames already buffered first.
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => {
                    last_rx = Instant::now();
                    match f {
                        Frame::Recv { src, payload } => paths.on_relayed(src, payload),
                        Frame::Unknown { dst } => paths.mark_unknown(dst, id),
                        Frame::Pong { nonce } => {
                            rtt_us.store(now_us().saturating_sub(nonce).max(1), Ordering::Relaxed)
                        }
                        Frame::Ping { nonce } => send(Frame::Pong { nonce }),
                        Frame::Refused { reason } => {
                            break 'session Err(format!("refused: {reason}"))
                        }
                        _ => {}
                    }
                }
                Ok(None) => break,
                Err(e) => break 'session Err(format!("malformed frame from the relay: {e}")),
            }
        }
        tokio::select! {
            _ = close.notified() => break 'session Err("the relay's certificate was revoked".into()),
            r = rd.read(&mut buf) => match r {
                Ok(0) => break 'session Err("closed by the relay".into()),
                Ok(n) => dec.push(&buf[..n]),
                Err(e) => break 'session Err(format!("read: {e}")),
            },
            _ = tick.tick() => {
                if last_rx.elapsed() > DEAD_AFTER {
                    break 'session Err(format!("silent for {:?}", last_rx.elapsed()));
                }
                send(Frame::Ping { nonce: now_us() });
                ticks += 1;
                let now_me = paths.me();
                // Again every 10 s too: a claim the relay could not check
                // yet (its gossip did not know this node) is checked again.
                if now_me != me || ticks.is_multiple_of(HELLO_AGAIN_TICKS) {
                    me = now_me;
                    send(Frame::Hello { advertised: me });
                }
                if !overlay.upgrade().is_some_and(|o| o.wants_relay(relay)) {
                    break 'session Ok("this relay is no longer wanted".into());
                }
                if transport == Transport::Tcp && paths.udp_usable() {
                    break 'session Ok("UDP gets through again: moving this session to QUIC".into());
                }
            }
        }
    };
    paths.remove_session(id);
    drop(tx);
    writer.abort();
    match &result {
        Ok(why) => info!(relay = %name, reason = %why, "relay session closed"),
        Err(e) => info!(relay = %name, error = %e, "relay session lost"),
    }
    result
}

/// Asks the relay behind `session` to dial back this node's observed
/// address; the caller watches for the probe.
pub(crate) fn request_dial_back(session: &Session, nonce: [u8; 16]) -> bool {
    Frame::DialBack { nonce }
        .to_bytes()
        .is_ok_and(|b| session.tx.try_send(b).is_ok())
}

/// One session over `transport`, measured (hello to welcome, one ping) and
/// closed: what `netcheck` reports per relay.
pub(crate) async fn try_once(
    overlay: &crate::overlay::Overlay,
    relay: RelayAddr,
    transport: Transport,
) -> Attempt {
    let tls = overlay.tcp_tls();
    let started = Instant::now();
    let opened = match transport {
        Transport::Quic => open_quic(&overlay.downgrade(), relay.overlay).await,
        Transport::Tcp => open_tcp(relay.tcp, &tls).await,
    };
    let fail = |detail: String| Attempt {
        transport,
        ok: false,
        rtt: None,
        detail,
    };
    let Opened {
        io: (mut rd, mut wr),
        name,
        ..
    } = match opened {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    let exchange = async {
        let mut out = BytesMut::new();
        Frame::Hello {
            advertised: overlay.paths().me(),
        }
        .encode(&mut out)
        .map_err(|e| e.to_string())?;
        let pinged = Instant::now();
        Frame::Ping { nonce: 1 }
            .encode(&mut out)
            .map_err(|e| e.to_string())?;
        wr.write_all(&out).await.map_err(|e| e.to_string())?;
        wr.flush().await.map_err(|e| e.to_string())?;
        let mut dec = Decoder::new();
        let mut buf = vec![0u8; 4096];
        let mut observed = None;
        loop {
            while let Some(f) = dec.next_frame().map_err(|e| e.to_string())? {
                match f {
                    Frame::Welcome { observed: o, .. } => observed = o,
                    Frame::Pong { .. } => return Ok((pinged.elapsed(), observed)),
                    Frame::Refused { reason } => return Err(format!("refused: {reason}")),
                    _ => {}
                }
            }
            let n = rd.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed by the relay".to_string());
            }
            dec.push(&buf[..n]);
        }
    };
    let r = tokio::time::timeout(WELCOME_TIMEOUT, exchange).await;
    let _ = wr.shutdown().await;
    match r {
        Ok(Ok((rtt, observed))) => Attempt {
            transport,
            ok: true,
            rtt: Some(rtt),
            detail: match observed {
                Some(o) => format!(
                    "relay `{name}` sees this node at {o}; set up in {:?}",
                    started.elapsed()
                ),
                None => format!("relay `{name}`; set up in {:?}", started.elapsed()),
            },
        },
        Ok(Err(e)) => fail(e),
        Err(_) => fail(format!("no answer within {WELCOME_TIMEOUT:?}")),
    }
}
