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

/// curl from this process (outside any test cgroup), silent, 5 s at most.
fn curl_plain(args: &[&str]) -> std::process::Output {
    Command::new("curl")
        .args(["-s", "-m", "5"])
        .args(args)
        .output()
        .expect("curl")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port()
}

/// One DNS question to `at`, the raw answer.
fn dns_ask(at: std::net::SocketAddr, name: &str, qtype: u16) -> Vec<u8> {
    let q = dmsc_node::intercept::dns::query(0xabcd, name, qtype);
    let u = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    u.set_read_timeout(Some(std::time::Duration::from_secs(3)))
        .expect("timeout");
    u.send_to(&q, at).expect("send");
    let mut buf = [0u8; 512];
    let n = u.recv(&mut buf).expect("a DNS answer");
    buf[..n].to_vec()
}

/// The address of an A answer (its last four bytes).
fn answer_v4(a: &[u8]) -> std::net::Ipv4Addr {
    let n = a.len();
    std::net::Ipv4Addr::new(a[n - 4], a[n - 3], a[n - 2], a[n - 1])
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
                    cgroup: Some(rel.clone()),
                    tenant: "acme".into(),
                    agent: Some("caller".into()),
                    ..Default::default()
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
                ..Default::default()
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
    let ask = |name: &str, qtype: u16| dns_ask(dns_addr, name, qtype);
    let a = ask("echo.acme.dmsc", 1);
    assert_eq!((a[0], a[1], a[3] & 0x0f, a[7]), (0xab, 0xcd, 0, 1), "{a:?}");
    let vip = answer_v4(&a);
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
    assert!(!curl_plain(&[&format!("http://{dialled}/")])
        .status
        .success());
    // Dialling the listener itself from outside: no original destination,
    // closed without an answer, and counted.
    let sneak = curl_plain(&["-H", "Host: echo.acme.dmsc", &format!("http://{listen}/")]);
    assert!(sneak.stdout.is_empty());
    let st = mesh.nodes[0].status().await.intercept.expect("intercept");
    assert!(
        st.redirected >= 2 && st.http >= 1 && st.passthrough >= 1 && st.unmatched >= 1,
        "{st:?}"
    );
    mesh.stop().await;
}

fn nft_ruleset() -> String {
    let out = Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .expect("nft");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The host's ruleset without the tables of the other tests' nodes (they
/// run at the same time; `dmsc_<node>` for each node name) but with
/// `node`'s own.
fn ruleset_but_other_nodes(node: &str) -> String {
    let ours = format!("table inet dmsc_{node} {{");
    let mut out = String::new();
    let mut skipping = false;
    for line in nft_ruleset().lines() {
        if line.starts_with("table ") {
            skipping = line.starts_with("table inet dmsc_") && line != ours;
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
        if line == "}" {
            skipping = false;
        }
    }
    out
}

/// What `cmd` prints, run by `sh` as user 1001 (no such account is needed).
fn as_uid_1001(cmd: &str) -> String {
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            "1001",
            "--regid",
            "1001",
            "--clear-groups",
            "sh",
            "-c",
            cmd,
        ])
        .output()
        .expect("setpriv");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The nftables fallback, as the eBPF path is tested above but with eBPF
/// off (`mode = "nftables"`), and bindings made and undone while the node
/// runs, through the admin API `dmsc-node intercept` calls: a user id and a
/// cgroup; nobody else can use a binding's port; disabling restores the
/// ruleset exactly; a table a crashed run left is removed at start, and the
/// node's table at stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nftables_fallback_intercepts_a_user_and_a_cgroup_bound_at_run_time() {
    let tools = ["nft", "curl", "setpriv"]
        .iter()
        .all(|t| Command::new(t).arg("--version").output().is_ok());
    if !dmsc_ebpf::cgroup::is_root() || !tools {
        assert!(
            std::env::var("CI").is_err(),
            "CI runs this as root with nftables, curl and util-linux installed"
        );
        eprintln!("SKIPPED: needs root, nft, curl and setpriv");
        return;
    }
    let cg = dmsc_ebpf::cgroup::Scratch::new("nft").expect("a test cgroup");
    // A table of a crashed earlier run of node x0.
    let stale = "table inet dmsc_x0 {\n chain left { type nat hook output priority -100; policy accept; }\n}\n";
    dmsc_node::intercept::nft::apply(stale).expect("a stale table");
    assert!(nft_ruleset().contains("table inet dmsc_x0"));
    let dialled = format!("127.0.0.1:{}", free_port());
    let dns_addr = {
        let u = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        u.local_addr().expect("addr")
    };
    let d2 = dialled.clone();
    let mesh = mesh_of(&["x0", "x1"], move |i, raw| {
        if i == 0 {
            raw.intercept = Some(RawIntercept {
                mode: Some("nftables".into()),
                listen: Some(format!("127.0.0.1:{}", free_port())),
                vip_range: Some("127.78.0.0/16".into()),
                dns: Some(dns_addr.to_string()),
                map: vec![RawInterceptMap {
                    addr: d2.clone(),
                    name: "echo.acme.dmsc".into(),
                }],
                ..Default::default()
            });
        }
    })
    .await;
    assert!(
        !nft_ruleset().contains("chain left"),
        "the crashed run's table is removed at start"
    );
    let before = ruleset_but_other_nodes("x0");
    let echo = agent("echo", &["echo"], "echoes").await;
    attach_routable(&mesh, 1, &echo, "echo").await;
    let st = mesh.nodes[0].status().await.intercept.expect("intercept");
    assert_eq!(st.mechanism, "nftables");
    assert_eq!(
        st.fallback.as_deref(),
        Some("intercept.mode = \"nftables\"")
    );
    assert!(st.bound.is_empty());

    let admin = mesh.nodes[0].bound().admin;
    let token = mesh.admin_token(0);
    let call = |method: hyper::Method, path: &str, body: Option<serde_json::Value>| {
        let (token, path) = (token.clone(), path.to_string());
        async move { dmsc_node::ops::intercept_call(admin, Some(&token), method, &path, body).await }
    };
    let bound = call(
        hyper::Method::POST,
        "/v1/intercept",
        Some(serde_json::json!({"uid": 1001, "tenant": "acme", "agent": "u1001"})),
    )
    .await
    .expect("enable uid 1001");
    assert_eq!(bound["bound"]["mechanism"], "nftables", "{bound}");
    let port: u16 = bound["bound"]["listen"]
        .as_str()
        .and_then(|l| l.rsplit(':').next()?.parse().ok())
        .expect("the binding's port");
    // Binding it again the same way changes nothing; differently is refused.
    call(
        hyper::Method::POST,
        "/v1/intercept",
        Some(serde_json::json!({"uid": 1001, "tenant": "acme", "agent": "u1001"})),
    )
    .await
    .expect("idempotent");
    let twice = call(
        hyper::Method::POST,
        "/v1/intercept",
        Some(serde_json::json!({"uid": 1001, "tenant": "globex"})),
    )
    .await
    .expect_err("rebinding to another tenant");
    assert!(twice.to_string().contains("already bound"), "{twice}");
    let missing = call(
        hyper::Method::POST,
        "/v1/intercept",
        Some(serde_json::json!({"cgroup": "dmsc-no-such-group", "tenant": "acme"})),
    )
    .await
    .expect_err("a cgroup that does not exist");
    assert!(
        missing.to_string().contains("dmsc-no-such-group"),
        "{missing}"
    );

    let body = message_send("hello from uid 1001");
    let curl = |url: &str| {
        format!("curl -s -i -m 10 -H 'content-type: application/json' --data '{body}' {url}")
    };
    // The user's unmodified curl, to the address and to the name.
    let out = as_uid_1001(&curl(&format!("http://{dialled}/")));
    assert!(
        out.to_ascii_lowercase().starts_with("http/1.1 200"),
        "{out}"
    );
    assert!(
        out.to_ascii_lowercase().contains("dmsc-agent: acme/echo"),
        "{out}"
    );
    assert!(out.contains("hello from uid 1001"), "{out}");
    let vip = answer_v4(&dns_ask(dns_addr, "echo.acme.dmsc", 1));
    let out = as_uid_1001(&curl(&format!(
        "--resolve echo.acme.dmsc:80:{vip} http://echo.acme.dmsc/"
    )));
    assert!(out.contains("hello from uid 1001"), "by name: {out}");
    let entries = super::security::audit_entries(&mesh, 0).await;
    assert!(
        entries
            .iter()
            .any(|e| e["tenant"] == "acme"
                && e["detail"].to_string().contains("intercept:acme/u1001")),
        "no audit entry names the binding: {entries:#?}"
    );
    // Root is not intercepted (nothing listens at the address), and
    // cannot use the binding's port to pose as it.
    assert!(!curl_plain(&[&format!("http://{dialled}/")])
        .status
        .success());
    let sneak = curl_plain(&[
        "-H",
        "Host: echo.acme.dmsc",
        &format!("http://127.0.0.1:{port}/"),
    ]);
    assert_eq!(
        sneak.status.code(),
        Some(7),
        "reset by the guard: {sneak:?}"
    );

    // Another table that redirects local connections is named, as a
    // warning, once ours is written again.
    dmsc_node::intercept::nft::apply(
        "table ip dmsc_test_proxy {\n chain out { type nat hook output priority -150; policy accept; meta skuid 4242 tcp dport 3128 redirect to :3129\n }\n}\n",
    )
    .expect("a competing table");
    // A cgroup, by nftables' socket cgroupv2 match.
    call(
        hyper::Method::POST,
        "/v1/intercept",
        Some(serde_json::json!({
            "cgroup": cg.rel, "tenant": "acme", "agent": "cg",
            "ports": [dialled.rsplit(':').next().and_then(|p| p.parse::<u16>().ok())],
        })),
    )
    .await
    .expect("enable the cgroup, for the dialled port only");
    let out = cg.stdout(&curl(&format!("http://{dialled}/")));
    assert!(
        out.contains("hello from uid 1001"),
        "from the cgroup: {out}"
    );
    // This process (uid 0, in another cgroup: here the cgroup2 root, where
    // a level match cannot even be evaluated) cannot use the cgroup
    // binding's port either.
    let listed = call(hyper::Method::GET, "/v1/intercept", None)
        .await
        .expect("list");
    let cg_port = listed["bindings"]
        .as_array()
        .and_then(|b| {
            b.iter()
                .find(|b| b["who"].as_str().is_some_and(|w| w.starts_with("cgroup")))
        })
        .and_then(|b| {
            b["listen"]
                .as_str()?
                .rsplit(':')
                .next()?
                .parse::<u16>()
                .ok()
        })
        .expect("the cgroup binding's port");
    let sneak = curl_plain(&[&format!("http://127.0.0.1:{cg_port}/")]);
    assert_eq!(
        sneak.status.code(),
        Some(7),
        "reset by the guard: {sneak:?}"
    );
    // Port 80 of the name's virtual address is not one of its ports.
    let out = cg
        .run(&curl(&format!(
            "--resolve echo.acme.dmsc:80:{vip} http://echo.acme.dmsc/"
        )))
        .expect("curl");
    assert_eq!(out.status.code(), Some(7), "not intercepted: {out:?}");
    let listed = call(hyper::Method::GET, "/v1/intercept", None)
        .await
        .expect("list");
    assert_eq!(
        listed["bindings"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );
    // (Other tests' nodes may have tables of their own right now.)
    assert!(
        listed["competing_tables"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t == "ip dmsc_test_proxy")),
        "{listed}"
    );
    dmsc_node::intercept::nft::apply(&dmsc_node::intercept::nft::remove_script_of(
        "ip",
        "dmsc_test_proxy",
    ))
    .expect("removed");

    // Disabled: the user's connections go direct again (refused).
    call(hyper::Method::DELETE, "/v1/intercept?uid=1001", None)
        .await
        .expect("disable uid");
    let out = as_uid_1001(&curl(&format!("http://{dialled}/")));
    assert!(out.is_empty(), "not intercepted any more: {out}");
    let out = cg.stdout(&curl(&format!("http://{dialled}/")));
    assert!(out.contains("hello"), "the cgroup still is: {out}");
    let none = call(hyper::Method::DELETE, "/v1/intercept?uid=1001", None)
        .await
        .expect_err("not bound");
    assert!(none.to_string().contains("not bound"), "{none}");
    call(hyper::Method::DELETE, "/v1/intercept?all", None)
        .await
        .expect("disable all");
    assert_eq!(
        ruleset_but_other_nodes("x0"),
        before,
        "the ruleset is as it was"
    );

    // Bound again, then the node stops: its table goes with it.
    call(
        hyper::Method::POST,
        "/v1/intercept",
        Some(serde_json::json!({"uid": 1001, "tenant": "acme"})),
    )
    .await
    .expect("enable again");
    assert!(nft_ruleset().contains("table inet dmsc_x0"));
    mesh.stop().await;
    assert_eq!(
        ruleset_but_other_nodes("x0"),
        before,
        "the node's table is gone at stop"
    );
}

/// A network namespace with no route out, joined to the host by a veth
/// pair (host side `10.203.<k>.1/30`), and a resolv.conf for it that
/// points at the host side (`ip netns exec` mounts it over
/// /etc/resolv.conf); removed when dropped.
struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
}

impl Netns {
    fn new(k: u8) -> Netns {
        let id = std::process::id();
        let ns = Netns {
            name: format!("dmsc-{id}-icpt{k}"),
            host_if: format!("d{id}h{k}"),
            host_ip: format!("10.203.{k}.1"),
        };
        let peer = format!("d{id}n{k}");
        let run = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&["netns", "add", &ns.name]);
        run(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ]);
        run(&["link", "set", &peer, "netns", &ns.name]);
        run(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_if,
        ]);
        run(&["link", "set", &ns.host_if, "up"]);
        let inner = format!("10.203.{k}.2/30");
        run(&["-n", &ns.name, "addr", "add", &inner, "dev", &peer]);
        run(&["-n", &ns.name, "link", "set", &peer, "up"]);
        run(&["-n", &ns.name, "link", "set", "lo", "up"]);
        let etc = format!("/etc/netns/{}", ns.name);
        std::fs::create_dir_all(&etc).expect("/etc/netns");
        std::fs::write(
            format!("{etc}/resolv.conf"),
            format!("nameserver {}\n", ns.host_ip),
        )
        .expect("resolv.conf");
        ns
    }

    /// Its nftables ruleset and IPv4 routes, as text (IPv6 link-local
    /// routes come and go by themselves while the link settles).
    fn state(&self) -> String {
        let show = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("ip");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        show(&["netns", "exec", &self.name, "nft", "list", "ruleset"])
            + &show(&["-4", "-n", &self.name, "route", "show", "table", "all"])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}

/// Posts the body in `argv[1]` to each URL after it; one line per URL.
const REQUESTS_CLIENT: &str = r#"
import sys, requests
for url in sys.argv[2:]:
    r = requests.post(url, data=sys.argv[1], headers={"content-type": "application/json"}, timeout=10)
    print(r.status_code, r.headers.get("dmsc-agent"), "netns hello" in r.text)
"#;

/// A gRPC health check to each target; one line per target: the reply's
/// bytes (0801: SERVING) and the agent that answered.
const GRPCIO_CLIENT: &str = r#"
import sys, grpc
for target in sys.argv[1:]:
    with grpc.insecure_channel(target) as ch:
        check = ch.unary_unary("/grpc.health.v1.Health/Check")
        reply, call = check.with_call(b"", timeout=10)
        print(reply.hex(), dict(call.initial_metadata()).get("dmsc-agent"))
"#;

/// An unmodified agent in a network namespace of its own (no route out)
/// calls mesh agents the way it would call anything: curl, Python
/// requests and a grpcio client, by `.dmsc` name (resolved through the
/// namespace's resolv.conf by the node's DNS) and by an intercepted
/// `IP:PORT`. With eBPF the binding is the agent's cgroup (a process of
/// the namespace outside it is untouched); with nftables (eBPF off) it is
/// the namespace itself, by rules inside it. `intercept disable` leaves
/// nothing behind (no program on the group; the namespace's ruleset and
/// routes as they were) and connects go direct again; bound again for one
/// port, only that port is intercepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmodified_agent_in_a_namespace_calls_mesh_agents_by_name_with_curl_requests_and_grpcio(
) {
    namespace_case(false).await
}

/// The same with `mode = "nftables"` and the namespace as the binding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nftables_fallback_intercepts_a_whole_namespace_for_curl_requests_and_grpcio() {
    namespace_case(true).await
}

async fn namespace_case(nft: bool) {
    let tools = Command::new("curl").arg("--version").output().is_ok()
        && Command::new("nft").arg("--version").output().is_ok()
        && Command::new("python3")
            .args(["-c", "import requests, grpc"])
            .output()
            .is_ok_and(|o| o.status.success());
    if !dmsc_ebpf::cgroup::is_root() || !(nft || dmsc_ebpf::built()) || !tools {
        assert!(
            std::env::var("CI").is_err(),
            "CI runs this as root, with clang at build time, nft, curl and python3 with requests and grpcio"
        );
        eprintln!("SKIPPED: needs root, a build with clang (eBPF), nft, curl, and python3 with requests and grpcio");
        return;
    }
    let ns = Netns::new(u8::from(nft));
    let cg = dmsc_ebpf::cgroup::Scratch::new(if nft { "netns-nft" } else { "netns" })
        .expect("a test cgroup");
    let before = ns.state();
    let greeter = super::grpc::greeter_server(true).await;
    let (rel, nsname) = (cg.rel.clone(), ns.name.clone());
    let greeter_decl = super::grpc::declared(greeter.addr);
    let listen = format!("{}:{}", ns.host_ip, free_port());
    let dns = format!("{}:53", ns.host_ip);
    let names = if nft { ["nn0", "nn1"] } else { ["ns0", "ns1"] };
    let binding = move || RawInterceptBinding {
        cgroup: (!nft).then(|| rel.clone()),
        netns: nft.then(|| nsname.clone()),
        tenant: "acme".into(),
        agent: Some("boxed".into()),
        ..Default::default()
    };
    let which = if nft {
        format!("netns={}", ns.name)
    } else {
        format!("cgroup={}", cg.rel)
    };
    let mut again = serde_json::json!({"tenant": "acme", "agent": "boxed", "ports": [50051]});
    if nft {
        again["netns"] = ns.name.clone().into();
    } else {
        again["cgroup"] = cg.rel.clone().into();
    }
    let mesh = mesh_of(&names, move |i, raw| {
        if i == 0 {
            raw.intercept = Some(RawIntercept {
                mode: nft.then(|| "nftables".into()),
                // Reachable from the namespace: the host side of its veth.
                listen: Some(listen.clone()),
                dns: Some(dns.clone()),
                bindings: vec![binding()],
                // TEST-NET-1: no route from the namespace, nothing there.
                map: vec![
                    RawInterceptMap {
                        addr: "192.0.2.10:8080".into(),
                        name: "echo.acme.dmsc".into(),
                    },
                    RawInterceptMap {
                        addr: "192.0.2.11:50051".into(),
                        name: "greeter.acme.dmsc".into(),
                    },
                ],
                ..Default::default()
            });
        } else {
            raw.agents = vec![greeter_decl.clone()];
        }
    })
    .await;
    let st = mesh.nodes[0].status().await.intercept.expect("intercept");
    assert_eq!(
        st.mechanism,
        if nft { "nftables" } else { "ebpf" },
        "{st:?}"
    );
    let echo = agent("echo", &["echo"], "echoes").await;
    attach_routable(&mesh, 1, &echo, "echo").await;
    super::eventually(
        std::time::Duration::from_secs(10),
        "greeter routable",
        || mesh.routable_everywhere("greeter"),
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let requests_py = dir.path().join("requests_client.py");
    std::fs::write(&requests_py, REQUESTS_CLIENT).expect("write");
    let grpc_py = dir.path().join("grpc_client.py");
    std::fs::write(&grpc_py, GRPCIO_CLIENT).expect("write");
    // In the cgroup, then in the namespace: standard output and error.
    let inside = |cmd: &str| {
        let out = cg
            .run(&format!("ip netns exec {} {cmd}", ns.name))
            .expect("run in the namespace");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let err = String::from_utf8_lossy(&out.stderr);
        (text, err.into_owned(), out.status.code())
    };

    let body = message_send("netns hello");
    for url in ["http://echo.acme.dmsc/", "http://192.0.2.10:8080/"] {
        let (out, _, _) = inside(&format!(
            "curl -s -i -m 10 -H 'content-type: application/json' --data '{body}' {url}"
        ));
        assert!(
            out.to_ascii_lowercase().starts_with("http/1.1 200"),
            "curl {url}: {out}"
        );
        assert!(out.contains("netns hello"), "curl {url}: {out}");
    }
    let (out, err, _) = inside(&format!(
        "python3 {} '{body}' http://echo.acme.dmsc/ http://192.0.2.10:8080/",
        requests_py.display()
    ));
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["200 acme/echo True", "200 acme/echo True"],
        "requests: {out}\n--\n{err}"
    );
    let grpc = |targets: &str| {
        inside(&format!(
            "env GRPC_DNS_RESOLVER=native python3 {} {targets}",
            grpc_py.display()
        ))
    };
    let (out, err, _) = grpc("greeter.acme.dmsc:50051 192.0.2.11:50051");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["0801 acme/greeter", "0801 acme/greeter"],
        "grpcio: {out}\n--\n{err}"
    );
    let attached = || {
        Command::new("bpftool")
            .args(["cgroup", "show", &cg.group.path.display().to_string()])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let bpftool = if nft {
        None
    } else {
        // In the namespace but not in the cgroup: not intercepted.
        let outside = Command::new("ip")
            .args(["netns", "exec", &ns.name, "curl", "-s", "-m", "5"])
            .arg("http://192.0.2.10:8080/")
            .output()
            .expect("curl");
        assert_eq!(outside.status.code(), Some(7), "no route: {outside:?}");
        let shown = attached();
        match &shown {
            Some(s) => assert!(s.contains("dmsc_connect4"), "{s}"),
            None => assert!(std::env::var("CI").is_err(), "CI installs bpftool"),
        }
        shown
    };
    // Disabled: nothing left behind, connects go where they were going
    // (nowhere, from this namespace).
    dmsc_node::ops::intercept_call(
        mesh.nodes[0].bound().admin,
        Some(&mesh.admin_token(0)),
        hyper::Method::DELETE,
        &format!("/v1/intercept?{which}"),
        None,
    )
    .await
    .expect("disable");
    let (_, _, code) = inside("curl -s -m 5 http://192.0.2.10:8080/");
    assert_eq!(code, Some(7), "not redirected");
    if bpftool.is_some() {
        let shown = attached().unwrap_or_default();
        assert!(
            shown.trim().is_empty(),
            "programs left on the group: {shown}"
        );
    }
    assert_eq!(ns.state(), before, "the namespace as it was");
    // Bound again for one destination port: gRPC's is intercepted, 8080
    // is not.
    let bound = dmsc_node::ops::intercept_call(
        mesh.nodes[0].bound().admin,
        Some(&mesh.admin_token(0)),
        hyper::Method::POST,
        "/v1/intercept",
        Some(again),
    )
    .await
    .expect("enable with a port");
    assert_eq!(
        bound["bound"]["ports"],
        serde_json::json!([50051]),
        "{bound}"
    );
    let (out, err, _) = grpc("192.0.2.11:50051");
    assert_eq!(out.trim(), "0801 acme/greeter", "grpcio: {out}\n--\n{err}");
    let (out, _, code) = inside("curl -s -m 3 http://192.0.2.10:8080/");
    assert!(
        out.is_empty() && code != Some(0),
        "not one of the ports: {code:?} {out}"
    );
    mesh.stop().await;
    assert_eq!(ns.state(), before, "the namespace as it was, after stop");
    drop(greeter);
}

/// The card a sample agent started by [`agent`] serves (what it hands the
/// metadata endpoint).
fn card_of(
    a: &dmsc_node::demo::sample_agent::SampleAgent,
    name: &str,
    description: &str,
) -> serde_json::Value {
    let cfg = super::sample_config(name, &[name], description);
    dmsc_node::demo::sample_agent::card(&cfg, a.addr)
}

/// Zero-trust onboarding: an agent process with nothing but curl and a
/// join token bound to its cgroup (or its uid) registers its card at the
/// node's metadata endpoint (the unix socket; the link-local HTTP
/// address). The kernel, not the request, says who calls: a process of
/// another cgroup is refused and the token stays usable; once onboarded the
/// agent is routable from the other node, its cgroup is intercepted, and
/// every attempt is audited. At stop the socket and the address are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_process_onboards_through_the_metadata_endpoint_and_a_wrong_cgroup_is_refused() {
    let tools = ["curl", "setpriv", "nft", "ip"].iter().all(|t| {
        Command::new(t).arg("-V").output().is_ok()
            || Command::new(t).arg("--version").output().is_ok()
    });
    if !dmsc_ebpf::cgroup::is_root() || !dmsc_ebpf::built() || !tools {
        assert!(
            std::env::var("CI").is_err(),
            "CI runs this as root, with clang at build time, curl, setpriv, nft and ip"
        );
        eprintln!("SKIPPED: needs root, a build with clang (eBPF), curl, setpriv, nft and ip");
        return;
    }
    let good = dmsc_ebpf::cgroup::Scratch::new("ob-good").expect("cgroup");
    let bad = dmsc_ebpf::cgroup::Scratch::new("ob-bad").expect("cgroup");
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("meta.sock");
    let meta_addr: std::net::SocketAddr = format!("169.254.77.77:{}", free_port())
        .parse()
        .expect("addr");
    let had_address = Command::new("ip")
        .args(["addr", "show", "dev", "lo"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("169.254.77.77"))
        .unwrap_or(false);
    let s2 = sock.display().to_string();
    let mesh = mesh_of(&["ob0", "ob1"], move |i, raw| {
        if i == 0 {
            raw.intercept = Some(RawIntercept {
                listen: Some(format!("127.0.0.1:{}", free_port())),
                vip_range: Some("127.79.0.0/16".into()),
                metadata_socket: Some(s2.clone()),
                metadata_listen: Some(meta_addr.to_string()),
                ..Default::default()
            });
        }
    })
    .await;
    let billing = agent("billing", &["billing"], "pays invoices").await;
    let reports = agent("reports", &["reports"], "writes reports").await;
    let billing_card = card_of(&billing, "billing", "pays invoices");
    let reports_card = card_of(&reports, "reports", "writes reports");
    let admin = mesh.nodes[0].bound().admin;
    let root = mesh.admin_token(0);
    let token_for = |agent: &'static str, cgroup: Option<String>, uid: Option<u32>| {
        let root = root.clone();
        async move {
            let v = dmsc_node::ops::token_create(
                admin,
                &root,
                dmsc_node::ops::TokenAsk {
                    tenant: "acme",
                    agent,
                    ttl: std::time::Duration::from_secs(600),
                    cgroup: cgroup.as_deref(),
                    uid,
                    netns: None,
                },
            )
            .await
            .expect("token");
            v["token"].as_str().expect("token").to_string()
        }
    };
    let token = token_for("billing", Some(good.rel.clone()), None).await;
    let ask = serde_json::json!({"token": token, "card": billing_card});
    let body_file = dir.path().join("onboard.json");
    std::fs::write(&body_file, ask.to_string()).expect("write");
    let onboard = format!(
        "curl -s -m 10 --unix-socket {} -H 'content-type: application/json' --data @{} http://meta/v1/onboard",
        sock.display(),
        body_file.display()
    );

    // Another cgroup with the same token: refused, the token not spent.
    let refused: serde_json::Value =
        serde_json::from_str(&bad.stdout(&onboard)).expect("a JSON answer");
    assert_eq!(refused["code"], "token_holder_mismatch", "{refused}");
    // Its own cgroup: onboarded.
    let ok: serde_json::Value =
        serde_json::from_str(&good.stdout(&onboard)).expect("a JSON answer");
    assert_eq!(ok["dns"], "billing.acme.dmsc", "{ok}");
    assert_eq!(ok["intercept"], "ebpf", "{ok}");
    let again: serde_json::Value =
        serde_json::from_str(&good.stdout(&onboard)).expect("a JSON answer");
    assert!(
        again["code"] == "token_used" || again["code"] == "duplicate",
        "{again}"
    );
    // Routable from the other node, by name.
    super::eventually(
        std::time::Duration::from_secs(10),
        "billing routable",
        || mesh.routable_everywhere("billing"),
    )
    .await;
    let (resp, body) = mesh
        .call(
            1,
            "POST",
            "billing.acme.dmsc",
            "/",
            &[("content-type", "application/json")],
            message_send("pay this"),
        )
        .await
        .expect("call");
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    // Its cgroup is intercepted as that agent now.
    let listed = dmsc_node::ops::intercept_call(
        admin,
        Some(&root),
        hyper::Method::GET,
        "/v1/intercept",
        None,
    )
    .await
    .expect("list");
    let bindings = listed["bindings"].as_array().cloned().unwrap_or_default();
    assert!(
        bindings
            .iter()
            .any(|b| b["who"] == format!("cgroup /{}", good.rel) && b["agent"] == "billing"),
        "{listed}"
    );

    // Over HTTP on the link-local address, bound to a uid (nftables).
    let token = token_for("reports", None, Some(1001)).await;
    let ask = serde_json::json!({"token": token, "card": reports_card});
    let body_file = dir.path().join("onboard-http.json");
    std::fs::write(&body_file, ask.to_string()).expect("write");
    std::fs::set_permissions(
        &body_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .expect("chmod");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let http = format!(
        "curl -s -m 10 -H 'content-type: application/json' --data @{} http://{meta_addr}/v1/onboard",
        body_file.display()
    );
    let refused: serde_json::Value = serde_json::from_str(&bad.stdout(&http)).expect("JSON");
    assert_eq!(
        refused["code"], "token_holder_mismatch",
        "root is not uid 1001: {refused}"
    );
    let ok: serde_json::Value = serde_json::from_str(&as_uid_1001(&http)).expect("JSON");
    assert_eq!(ok["dns"], "reports.acme.dmsc", "{ok}");
    assert_eq!(ok["intercept"], "nftables", "{ok}");

    // Audited with what the kernel said.
    let entries = super::security::audit_entries(&mesh, 0).await;
    let onboardings: Vec<_> = entries
        .iter()
        .filter(|e| e["kind"] == "onboarding")
        .collect();
    assert!(
        onboardings.iter().any(|e| e["detail"]["outcome"] == "ok"
            && e["detail"]["cgroup"] == format!("/{}", good.rel)
            && e["detail"]["via"] == "unix"),
        "{onboardings:#?}"
    );
    assert!(
        onboardings
            .iter()
            .any(|e| e["detail"]["cgroup"] == format!("/{}", bad.rel)
                && e["detail"]["outcome"]
                    .as_str()
                    .is_some_and(|o| o.contains("bound to"))),
        "{onboardings:#?}"
    );
    assert!(
        onboardings.iter().any(|e| e["detail"]["uid"] == 1001
            && e["detail"]["via"] == "http"
            && e["detail"]["outcome"] == "ok"),
        "{onboardings:#?}"
    );
    mesh.stop().await;
    assert!(!sock.exists(), "the socket is removed at stop");
    let lo = Command::new("ip")
        .args(["addr", "show", "dev", "lo"])
        .output()
        .expect("ip");
    assert_eq!(
        String::from_utf8_lossy(&lo.stdout).contains("169.254.77.77"),
        had_address,
        "the address is taken away at stop"
    );
}

/// A node without `[intercept]` starts interception, with the defaults, at
/// the first `intercept enable`; until then it shows none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_an_intercept_section_starts_interception_at_the_first_enable() {
    let tools = ["nft", "setpriv"]
        .iter()
        .all(|t| Command::new(t).arg("--version").output().is_ok());
    if !dmsc_ebpf::cgroup::is_root() || !tools {
        assert!(
            std::env::var("CI").is_err(),
            "CI runs this as root with nftables and util-linux installed"
        );
        eprintln!("SKIPPED: needs root, nft and setpriv");
        return;
    }
    let mesh = mesh_of(&["lz0"], |_, _| {}).await;
    let admin = mesh.nodes[0].bound().admin;
    let token = mesh.admin_token(0);
    assert!(mesh.nodes[0].status().await.intercept.is_none());
    let listed = dmsc_node::ops::intercept_call(
        admin,
        Some(&token),
        hyper::Method::GET,
        "/v1/intercept",
        None,
    )
    .await
    .expect("list");
    assert_eq!(listed["started"], false, "{listed}");
    dmsc_node::ops::intercept_call(
        admin,
        Some(&token),
        hyper::Method::DELETE,
        "/v1/intercept?all",
        None,
    )
    .await
    .expect("nothing to disable is fine");
    let bound = dmsc_node::ops::intercept_call(
        admin,
        Some(&token),
        hyper::Method::POST,
        "/v1/intercept",
        Some(serde_json::json!({"uid": 1001, "tenant": "acme"})),
    )
    .await
    .expect("enable");
    assert_eq!(bound["bound"]["mechanism"], "nftables", "{bound}");
    assert!(nft_ruleset().contains("table inet dmsc_lz0"));
    let st = mesh.nodes[0].status().await.intercept.expect("started now");
    assert_eq!(st.bound.len(), 1, "{st:?}");
    mesh.stop().await;
    assert!(
        !nft_ruleset().contains("table inet dmsc_lz0"),
        "gone at stop"
    );
}
