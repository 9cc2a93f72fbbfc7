//! Transparent interception with the real kernel hook (root, a build with
//! clang, curl; CI has all three): an unmodified client (curl) in a cgroup
//! the test creates calls an agent's address; node 0 intercepts the connect,
//! names the address from `[[intercept.map]]` and delegates to the agent on
//! node 1. Loopback only: the intercepted address has nothing listening,
//! so a connect that escaped interception is refused, not sent anywhere.

use std::process::Command;

use dmsc_node::config::{RawIntercept, RawInterceptBinding, RawInterceptMap};
use dmsc_node::demo::mesh::message_send;

use super::{agent, attach_routable, mesh_of};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmodified_client_in_a_bound_cgroup_reaches_a_mesh_agent_by_its_address() {
    let curl = Command::new("curl").arg("--version").output().is_ok();
    if !dmsc_ebpf::cgroup::is_root() || !dmsc_ebpf::built() || !curl {
        assert!(
            std::env::var("CI").is_err(),
            "CI runs this as root, with clang at build time and curl installed"
        );
        eprintln!("SKIPPED: needs root, a build with clang (eBPF), and curl");
        return;
    }
    let cg = dmsc_ebpf::cgroup::Scratch::new("icpt").expect("a test cgroup");
    let listen = format!("127.0.0.1:{}", free_port());
    // The address the client dials: nothing listens there.
    let dialled = format!("127.0.0.1:{}", free_port());
    // A plain TCP service (not HTTP) on another mapped address: it echoes
    // a line back.
    let raw_service = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let raw_addr = raw_service.local_addr().expect("addr");
    std::thread::spawn(move || {
        use std::io::{BufRead as _, Write as _};
        for s in raw_service.incoming().flatten() {
            let mut line = String::new();
            let mut r = std::io::BufReader::new(s.try_clone().expect("clone"));
            if r.read_line(&mut line).is_ok() {
                let _ = (&s).write_all(format!("echo: {line}").as_bytes());
            }
        }
    });
    let dns_addr = {
        let u = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        u.local_addr().expect("addr")
    };
    let (l2, d2, rel) = (listen.clone(), dialled.clone(), cg.rel.clone());
    let raw_s = raw_addr.to_string();
    let mesh = mesh_of(&["n0", "n1"], move |i, raw| {
        if i == 0 {
            raw.intercept = Some(RawIntercept {
                listen: Some(l2.clone()),
                // On loopback: a redirect that failed would not leave the host.
                vip_range: Some("127.77.0.0/16".into()),
                dns: Some(dns_addr.to_string()),
                bindings: vec![RawInterceptBinding {
                    cgroup: rel.clone(),
                    tenant: "acme".into(),
                    agent: Some("caller".into()),
                }],
                map: vec![
                    RawInterceptMap {
                        addr: d2.clone(),
                        name: "echo.acme.dmsc".into(),
                    },
                    RawInterceptMap {
                        addr: raw_s.clone(),
                        name: "echo.acme.dmsc".into(),
                    },
                ],
            });
        }
    })
    .await;
    let echo = agent("echo", &["echo"], "echoes").await;
    attach_routable(&mesh, 1, &echo, "echo").await;
    let st = mesh.nodes[0].status().await.intercept.expect("intercept");
    assert_eq!(
        (st.mechanism.as_str(), st.reason.as_deref()),
        ("ebpf", None)
    );

    // curl in the cgroup, to the address: answered by the echo agent on
    // node 1, through the mesh.
    let body = message_send("intercepted hello");
    let cmd = format!(
        "curl -s -i -m 10 -H 'content-type: application/json' --data '{body}' http://{dialled}/"
    );
    let out = cg.stdout(&cmd);
    let lower = out.to_ascii_lowercase();
    assert!(lower.starts_with("http/1.1 200"), "{out}");
    assert!(lower.contains("dmsc-agent: acme/echo"), "{out}");
    assert!(lower.contains("dmsc-node: n1"), "{out}");
    assert!(out.contains("intercepted hello"), "{out}");
    // Audited with the binding as the caller, in its tenant.
    let entries = super::security::audit_entries(&mesh, 0).await;
    assert!(
        entries
            .iter()
            .any(|e| e["tenant"] == "acme"
                && e["detail"].to_string().contains("intercept:acme/caller")),
        "no audit entry names the binding: {entries:#?}"
    );

    // `.dmsc` names: the node's DNS answers a virtual address, and a
    // connection to it (any port) is named back from it.
    let ask = |name: &str, qtype: u16| -> Vec<u8> {
        let q = dmsc_node::intercept::dns::query(0xabcd, name, qtype);
        let u = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        u.set_read_timeout(Some(std::time::Duration::from_secs(3)))
            .expect("timeout");
        u.send_to(&q, dns_addr).expect("send");
        let mut buf = [0u8; 512];
        let n = u.recv(&mut buf).expect("a DNS answer");
        buf[..n].to_vec()
    };
    let a = ask("echo.acme.dmsc", 1);
    assert_eq!((a[0], a[1], a[3] & 0x0f, a[7]), (0xab, 0xcd, 0, 1), "{a:?}");
    let vip = std::net::Ipv4Addr::new(
        a[a.len() - 4],
        a[a.len() - 3],
        a[a.len() - 2],
        a[a.len() - 1],
    );
    assert_eq!(vip.octets()[..2], [127, 77], "{vip}");
    assert_eq!(ask("echo.acme.dmsc", 1), a, "stable");
    let aaaa = ask("echo.acme.dmsc", 28);
    assert_eq!(
        (aaaa[3] & 0x0f, aaaa[7]),
        (0, 0),
        "AAAA: no records, not NXDOMAIN"
    );
    let nx = ask("not-a-mesh-name.dmsc", 1);
    assert_eq!(nx[3] & 0x0f, 3, "NXDOMAIN");
    // By name (curl resolves it to the virtual address) and by the bare
    // address (the Host names no mesh target: the address names it).
    for url in [
        format!("--resolve echo.acme.dmsc:80:{vip} http://echo.acme.dmsc/"),
        format!("http://{vip}:8080/"),
    ] {
        let out = cg.stdout(&format!(
            "curl -s -i -m 10 -H 'content-type: application/json' --data '{body}' {url}"
        ));
        assert!(
            out.to_ascii_lowercase().starts_with("http/1.1 200"),
            "{url}: {out}"
        );
        assert!(out.contains("intercepted hello"), "{url}: {out}");
    }

    // A protocol that is not HTTP (SSH's greeting here) to an intercepted
    // address passes through to that address untouched.
    let py = format!(
        "import socket; s=socket.create_connection(('127.0.0.1', {}), timeout=5); \
         s.sendall(b'SSH-2.0-probe\\n'); print(s.recv(100).decode().strip())",
        raw_addr.port()
    );
    assert_eq!(
        cg.stdout(&format!("python3 -c \"{py}\"")).trim(),
        "echo: SSH-2.0-probe"
    );

    // The same from outside the cgroup: not intercepted (refused: nothing
    // listens there).
    let direct = Command::new("curl")
        .args(["-s", "-m", "5", &format!("http://{dialled}/")])
        .output()
        .expect("curl");
    assert!(!direct.status.success());
    // Dialling the listener itself from outside: no original destination,
    // closed without an answer, and counted.
    let sneak = Command::new("curl")
        .args([
            "-s",
            "-m",
            "5",
            "-H",
            "Host: echo.acme.dmsc",
            &format!("http://{listen}/"),
        ])
        .output()
        .expect("curl");
    assert!(sneak.stdout.is_empty());
    let st = mesh.nodes[0].status().await.intercept.expect("intercept");
    assert!(
        st.redirected >= 2 && st.http >= 1 && st.passthrough >= 1 && st.unmatched >= 1,
        "{st:?}"
    );
    mesh.stop().await;
}
