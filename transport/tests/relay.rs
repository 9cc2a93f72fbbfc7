//! Relays on loopback with real QUIC, TCP and TLS: a relayed node reached
//! through a relay that sees only ciphertext, the same connection moving to
//! a direct path, a node whose UDP is dropped joining over TCP, and a relay
//! that refuses a node claiming someone else's address.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmsc_transport::path::mapped_addr;
use dmsc_transport::pki::{CertificateAuthority, NODE_VALIDITY};
use dmsc_transport::relay::RelayLimits;
use dmsc_transport::{
    Channel, Impair, Inbound, NodeIdentity, Overlay, OverlayConfig, Reachability, RelayAddr,
};
use tokio::sync::mpsc::Receiver;

fn identity(ca: &CertificateAuthority, name: &str) -> Arc<NodeIdentity> {
    let c = ca.issue_node(name, NODE_VALIDITY).expect("issue");
    Arc::new(NodeIdentity::from_pem(&ca.cert_pem, &c.cert_pem, &c.key_pem).expect("identity"))
}

struct Node {
    o: Overlay,
    rx: Receiver<Inbound>,
    adv: SocketAddr,
}

async fn node(
    ca: &CertificateAuthority,
    name: &str,
    relays: &[RelayAddr],
    reach: Reachability,
    tweak: impl FnOnce(&mut OverlayConfig),
) -> Node {
    let mut cfg = OverlayConfig::new("127.0.0.1:0".parse().expect("addr"), identity(ca, name));
    cfg.connect_timeout = Duration::from_secs(2);
    tweak(&mut cfg);
    let (o, rx) = Overlay::bind(cfg).await.expect("bind");
    for r in relays {
        o.add_relay(*r);
    }
    let est = o.establish(reach, o.local_addr()).await;
    Node {
        adv: est.advertised,
        o,
        rx,
    }
}

async fn relay(ca: &CertificateAuthority) -> (Node, RelayAddr) {
    let n = node(ca, "relay", &[], Reachability::Direct, |_| {}).await;
    let (_, _, tcp) =
        n.o.start_relay("127.0.0.1:0".parse().expect("addr"), RelayLimits::default())
            .await
            .expect("relay");
    let addr = RelayAddr {
        overlay: n.o.local_addr(),
        tcp,
    };
    (n, addr)
}

async fn recv(rx: &mut Receiver<Inbound>, what: &str) -> Inbound {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within 10 s"))
        .expect("open")
}

async fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const SECRET: &[u8] = b"PLAINTEXT-CANARY-7f3a9c-the-relay-must-never-see-this";

#[tokio::test]
async fn a_relayed_node_is_reached_through_a_relay_that_sees_only_ciphertext() {
    let ca = CertificateAuthority::generate("mesh.test").expect("ca");
    let (r, raddr) = relay(&ca).await;
    let server = r.o.relay().expect("relay role");
    let mut captured = server.capture();
    let no_upgrade = |c: &mut OverlayConfig| c.direct_upgrade = false;
    let mut n = node(&ca, "n", &[raddr], Reachability::Relayed, no_upgrade).await;
    let mut a = node(&ca, "a", &[raddr], Reachability::Auto, no_upgrade).await;
    assert_eq!(
        n.adv,
        mapped_addr("n"),
        "a relayed node advertises its mapped address"
    );
    assert_eq!(
        a.adv,
        a.o.local_addr(),
        "loopback answers the dial-back: direct"
    );
    // Each says why, for `status`.
    let why = a.o.paths().decided().unwrap_or_default();
    assert!(
        why.contains("dial-back") && why.contains("reachable directly"),
        "{why}"
    );
    assert!(n.o.paths().decided().is_some_and(|w| !w.is_empty()));
    wait_until("n registered at the relay", Duration::from_secs(5), || {
        server.knows(mapped_addr("n"))
    })
    .await;

    // a -> n by n's mapped address: only the relay can carry it.
    let mut body = Vec::new();
    for _ in 0..200 {
        body.extend_from_slice(SECRET);
    }
    a.o.send(n.adv, Channel::Gossip, &body).expect("send");
    let m = recv(&mut n.rx, "a's message at n").await;
    assert_eq!(
        &*m.peer, "a",
        "end-to-end mutual TLS: the name is a's certificate"
    );
    assert_eq!(&m.payload[..], &body[..]);
    assert_eq!(m.from, a.adv, "n sees a at a's advertised address");
    n.o.send(m.from, Channel::Gossip, SECRET).expect("reply");
    let r2 = recv(&mut a.rx, "n's reply at a").await;
    assert_eq!(&*r2.peer, "n");
    assert_eq!(&r2.payload[..], SECRET);

    // A stream too (delegations use these).
    let mut s =
        a.o.open_stream(n.adv, Channel::Delegate)
            .await
            .expect("stream");
    s.send.write_all(SECRET).await.expect("write");
    s.send.finish().expect("finish");

    let link =
        a.o.peers()
            .into_iter()
            .find(|p| p.name == "n")
            .expect("a-n link");
    assert_eq!(link.path.path, "relayed");
    assert_eq!(link.path.via.as_deref(), Some("relay"));
    assert_eq!(link.path.transport, "quic");
    assert!(server.stats.datagrams.load(Ordering::Relaxed) > 0);

    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut seen = 0usize;
    let mut all = Vec::new();
    while let Ok(p) = captured.try_recv() {
        seen += p.len();
        all.extend_from_slice(&p);
    }
    assert!(
        seen > body.len(),
        "the relay carried the message ({seen} bytes)"
    );
    assert!(
        !all.windows(16).any(|w| w == &SECRET[..16]),
        "plaintext found in the bytes the relay handled"
    );
    for x in [&a.o, &n.o, &r.o] {
        x.shutdown().await;
    }
}

#[tokio::test]
async fn the_same_connection_moves_to_a_direct_path_once_hole_punching_succeeds() {
    let ca = CertificateAuthority::generate("mesh.test").expect("ca");
    let (r, raddr) = relay(&ca).await;
    let mut n = node(&ca, "n", &[raddr], Reachability::Relayed, |_| {}).await;
    let mut a = node(&ca, "a", &[raddr], Reachability::Direct, |_| {}).await;
    let server = r.o.relay().expect("relay");
    wait_until("n registered", Duration::from_secs(5), || {
        server.knows(mapped_addr("n"))
    })
    .await;
    a.o.send(n.adv, Channel::Gossip, b"first").expect("send");
    let m = recv(&mut n.rx, "first").await;
    let relayed = server.stats.datagrams.load(Ordering::Relaxed);
    assert!(relayed > 0, "the first exchange went through the relay");
    wait_until("a sees n on a direct path", Duration::from_secs(10), || {
        a.o.peers()
            .iter()
            .any(|p| p.name == "n" && p.path.path == "direct")
    })
    .await;
    let handshakes = a.o.stats().handshakes_ok_outbound.load(Ordering::Relaxed);
    // Traffic now flows without the relay, on the same connection.
    let before = server.stats.datagrams.load(Ordering::Relaxed);
    for i in 0..20 {
        a.o.send(n.adv, Channel::Gossip, format!("m{i}").as_bytes())
            .expect("send");
        recv(&mut n.rx, "after upgrade").await;
    }
    n.o.send(m.from, Channel::Gossip, b"back").expect("send");
    recv(&mut a.rx, "reply after upgrade").await;
    let after = server.stats.datagrams.load(Ordering::Relaxed);
    assert!(
        after - before < 10,
        "after the upgrade the relay carried {} datagrams",
        after - before
    );
    assert_eq!(
        a.o.stats().handshakes_ok_outbound.load(Ordering::Relaxed),
        handshakes,
        "no new connection: the path changed under the same one"
    );
    let upgrades = n.o.paths().stats.direct_upgrades.load(Ordering::Relaxed)
        + a.o.paths().stats.direct_upgrades.load(Ordering::Relaxed);
    assert!(upgrades >= 1, "counted as a direct upgrade");
    for x in [&a.o, &n.o, &r.o] {
        x.shutdown().await;
    }
}

#[tokio::test]
async fn a_node_whose_udp_is_dropped_joins_over_tcp() {
    let ca = CertificateAuthority::generate("mesh.test").expect("ca");
    let (r, raddr) = relay(&ca).await;
    let blocked = |c: &mut OverlayConfig| {
        c.impair = Some(Impair {
            loss: 1.0,
            delay: Duration::ZERO,
        })
    };
    let mut b = node(&ca, "b", &[raddr], Reachability::Auto, blocked).await;
    let mut a = node(&ca, "a", &[raddr], Reachability::Auto, |_| {}).await;
    assert_eq!(b.adv, mapped_addr("b"), "no UDP: relayed");
    assert!(b.o.paths().udp_blocked());
    let s = b.o.paths().sessions();
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].transport.as_str(), "tcp");

    a.o.send(b.adv, Channel::Gossip, b"over tcp").expect("send");
    let m = recv(&mut b.rx, "a's message at b").await;
    assert_eq!(&*m.peer, "a");
    b.o.send(m.from, Channel::Gossip, b"and back")
        .expect("send");
    let back = recv(&mut a.rx, "b's reply").await;
    assert_eq!(&back.payload[..], b"and back");
    // b -> the relay node itself also rides the TCP session.
    b.o.send(raddr.overlay, Channel::Gossip, b"to the relay")
        .expect("send");
    let mut rrx = r.rx;
    let at_relay = recv(&mut rrx, "b's message at the relay node").await;
    assert_eq!(&*at_relay.peer, "b");
    let link =
        b.o.peers()
            .into_iter()
            .find(|p| p.name == "a")
            .expect("b-a link");
    assert_eq!((link.path.path, link.path.transport), ("relayed", "tcp"));
    for x in [&a.o, &b.o, &r.o] {
        x.shutdown().await;
    }
}

#[tokio::test]
async fn a_relay_admits_no_one_outside_the_mesh() {
    let ca = CertificateAuthority::generate("mesh.test").expect("ca");
    let (r, raddr) = relay(&ca).await;
    let server = r.o.relay().expect("relay");
    // A node of another CA, with its UDP dropped so it tries TCP as well.
    let intruder_ca = CertificateAuthority::generate("mesh.test").expect("ca");
    let blocked = |c: &mut OverlayConfig| {
        c.impair = Some(Impair {
            loss: 1.0,
            delay: Duration::ZERO,
        })
    };
    let x = node(&intruder_ca, "x", &[raddr], Reachability::Auto, blocked).await;
    assert!(
        x.o.paths().sessions().is_empty(),
        "no session for a non-member"
    );
    assert!(!server.knows(mapped_addr("x")));
    assert!(
        server.stats.refused_handshake.load(Ordering::Relaxed) >= 1,
        "the TCP attempt was refused at the handshake"
    );
    assert_eq!(server.stats.sessions.load(Ordering::Relaxed), 0);
    x.o.shutdown().await;
    r.o.shutdown().await;
}
