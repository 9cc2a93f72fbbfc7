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
use std::sync::mpsc;
use std::time::Duration;

use dmsc_ebpf::cgroup::{is_root, Scratch};
use dmsc_ebpf::{Cgroup, Interceptor, Orig};

/// A loopback server answering every connection with `body`, reporting each
/// peer address on `peers`.
fn server(body: &'static str) -> (SocketAddrV4, mpsc::Receiver<SocketAddrV4>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let std::net::SocketAddr::V4(addr) = l.local_addr().expect("addr") else {
        panic!("v4");
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            if let Ok(std::net::SocketAddr::V4(p)) = c.peer_addr() {
                let _ = tx.send(p);
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
    let (agent, _agent_peers) = server("agent");
    let (node, node_peers) = server("node");
    let cg = Scratch::new("redirect").expect("a test cgroup");
    let mut ic = Interceptor::load().expect("load the programs");
    ic.bind(&cg.group, 7, node).expect("bind");
    ic.add_dest(agent, 3).expect("dest");
    // The virtual range, on loopback so that nothing leaves the host even
    // if the redirect failed.
    ic.add_vip_range("127.77.0.0".parse().expect("ip"), 16)
        .expect("vips");

    let take = |ic: &mut Interceptor, peers: &mpsc::Receiver<SocketAddrV4>| -> Orig {
        let peer = peers
            .recv_timeout(Duration::from_secs(5))
            .expect("the listener got a connection");
        ic.take_orig(peer)
            .expect("map")
            .expect("an original destination for the peer")
    };

    // curl in the cgroup to the agent's address: the node answers.
    let url = format!("http://{agent}/x");
    assert_eq!(cg.stdout(&format!("curl -s -m 5 {url}")), "node");
    let o = take(&mut ic, &node_peers);
    assert_eq!(
        (o.dst, o.binding, o.cgroup, o.uid),
        (agent, 7, cg.group.id, 0)
    );
    // Taken: a second lookup finds nothing.
    assert!(ic
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
              p=s.getpeername(); print(p[0], p[1]); s.close()";
    let seen = cg.stdout(&format!("python3 -c \"{py}\""));
    assert_eq!(seen.trim(), "127.77.1.2 80");
    let o = take(&mut ic, &node_peers);
    assert_eq!(o.dst, "127.77.1.2:80".parse().expect("addr"));
    let stats = ic.stats().expect("stats");
    assert!(stats.redirected >= 2 && stats.established >= 2, "{stats:?}");

    // Unbound: the cgroup's connects go where they were going.
    assert!(ic.unbind(&cg.group).expect("unbind"));
    assert_eq!(cg.stdout(&format!("curl -s -m 5 {url}")), "agent");
    // Bound again, then the interceptor dropped (as when the node exits):
    // nothing stays attached.
    ic.bind(&cg.group, 7, node).expect("bind again");
    assert_eq!(cg.stdout(&format!("curl -s -m 5 {url}")), "node");
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
