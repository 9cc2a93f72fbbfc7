//! The interception programs in the real kernel (root only; CI is root):
//! a cgroup this test creates, a fake node listener and a real "agent"
//! listener on loopback, and unmodified clients (curl, python3) moved into
//! the cgroup. Checks: connects from the cgroup to a selected destination
//! or to the virtual range reach the listener, which learns the original
//! destination, the cgroup and the uid; the client's getpeername shows the
//! original; a process outside the cgroup reaches the agent directly; after
//! `unbind` (and after the interceptor is dropped) nothing is redirected.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddrV4, TcpListener};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use dmsc_ebpf::cgroup::{is_root, Scratch};
use dmsc_ebpf::{Cgroup, Interceptor, Orig};

/// A loopback server answering every connection with `body`. For each
/// peer it reports `(peer, on_accept(peer))`, `on_accept` running right
/// after the accept, before the answer (as the node takes an original).
fn server<T: Send + 'static>(
    body: &'static str,
    on_accept: impl Fn(SocketAddrV4) -> T + Send + 'static,
) -> (SocketAddrV4, mpsc::Receiver<(SocketAddrV4, T)>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let std::net::SocketAddr::V4(addr) = l.local_addr().expect("addr") else {
        panic!("v4");
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            if let Ok(std::net::SocketAddr::V4(p)) = c.peer_addr() {
                let _ = tx.send((p, on_accept(p)));
            }
            let _ = c.set_read_timeout(Some(Duration::from_millis(500)));
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf);
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (addr, rx)
}

fn tool(name: &str) -> bool {
    Command::new(name).arg("--version").output().is_ok()
}

#[test]
fn connects_from_a_bound_cgroup_reach_the_listener_with_their_original_destination() {
    if !is_root() || !dmsc_ebpf::built() || !tool("curl") {
        assert!(
            std::env::var("CI").is_err(),
            "CI runs this as root, with clang at build time and curl installed"
        );
        eprintln!("SKIPPED: needs root, a build with clang, and curl");
        return;
    }
    let (agent, _agent_peers) = server("agent", |_| ());
    let ic = Arc::new(Mutex::new(Interceptor::load().expect("load the programs")));
    let taking = Arc::new(AtomicBool::new(true));
    // The fake node takes each connection's original right after accepting
    // it, as the node does (unless `taking` is off).
    let (node, node_origs) = {
        let (ic, taking) = (Arc::downgrade(&ic), taking.clone());
        server("node", move |p| match ic.upgrade() {
            Some(ic) if taking.load(Ordering::SeqCst) => {
                ic.lock().expect("lock").take_orig(p).expect("map")
            }
            _ => None,
        })
    };
    let cg = Scratch::new("redirect").expect("a test cgroup");
    let lock = || ic.lock().expect("lock");
    lock().bind(&cg.group, 7, node, &[]).expect("bind");
    lock().add_dest(agent, 3).expect("dest");
    // The virtual range, on loopback so that nothing leaves the host even
    // if the redirect failed.
    lock()
        .add_vip_range("127.77.0.0".parse().expect("ip"), 16)
        .expect("vips");

    let take = |what: &str| -> Orig {
        let (_, orig) = node_origs
            .recv_timeout(Duration::from_secs(5))
            .expect("the listener got a connection");
        orig.unwrap_or_else(|| panic!("{what}: no original destination for the peer"))
    };

    // curl in the cgroup to the agent's address: the node answers.
    let url = format!("http://{agent}/x");
    assert_eq!(cg.stdout(&format!("curl -s -m 5 {url}")), "node");
    let o = take("curl");
    assert_eq!(
        (o.dst, o.binding, o.cgroup, o.uid),
        (agent, 7, cg.group.id, 0)
    );
    // Taken: a second lookup finds nothing.
    assert!(lock()
        .take_orig(SocketAddrV4::new([127, 0, 0, 1].into(), 1))
        .expect("map")
        .is_none());
    // The same URL from outside the cgroup: the agent answers.
    let direct = Command::new("curl")
        .args(["-s", "-m", "5", &url])
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&direct.stdout), "agent");

    // A virtual address, any port, from python3: redirected, and the
    // client's getpeername shows the address it dialled.
    let py = "import socket; s=socket.create_connection(('127.77.1.2', 80), timeout=5); \
              p=s.getpeername(); print(p[0], p[1]); s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); s.recv(100); s.close()";
    let seen = cg.stdout(&format!("python3 -c \"{py}\""));
    assert_eq!(seen.trim(), "127.77.1.2 80");
    let o = take("python3");
    assert_eq!(o.dst, "127.77.1.2:80".parse().expect("addr"));
    let stats = lock().stats().expect("stats");
    assert!(stats.redirected >= 2 && stats.established >= 2, "{stats:?}");

    // A client that goes away (reset) before the node took its original:
    // the entry goes with its socket, so whoever binds that local address
    // next cannot dial the listener and pass for the binding.
    taking.store(false, Ordering::SeqCst);
    let py = "import socket, struct; s=socket.create_connection(('127.77.1.3', 80), timeout=5); \
              a=s.getsockname(); print(a[0], a[1]); \
              s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0)); s.close()";
    let local = cg.stdout(&format!("python3 -c \"{py}\""));
    let peer: SocketAddrV4 = local
        .trim()
        .replace(' ', ":")
        .parse()
        .expect("the client's address");
    assert!(
        lock().take_orig(peer).expect("map").is_none(),
        "a closed client's original is gone"
    );
    // (The node may or may not have seen that connection: forget it.)
    std::thread::sleep(Duration::from_millis(200));
    while node_origs.try_recv().is_ok() {}
    taking.store(true, Ordering::SeqCst);

    // Unbound: the cgroup's connects go where they were going.
    assert!(lock().unbind(&cg.group).expect("unbind"));
    assert_eq!(cg.stdout(&format!("curl -s -m 5 {url}")), "agent");
    // Bound again, then the interceptor dropped (as when the node exits):
    // nothing stays attached.
    lock().bind(&cg.group, 7, node, &[]).expect("bind again");
    assert_eq!(cg.stdout(&format!("curl -s -m 5 {url}")), "node");
    let _ = take("curl, bound again");
    drop(ic);
    assert_eq!(cg.stdout(&format!("curl -s -m 5 {url}")), "agent");
}

#[test]
fn a_cgroup_that_does_not_exist_is_a_clear_error() {
    let e = Cgroup::resolve("dmsc-no-such-group/x").expect_err("missing");
    let text = e.to_string();
    assert!(
        text.contains("dmsc-no-such-group/x") && text.contains("cgroup2 is mounted at"),
        "{text}"
    );
}
