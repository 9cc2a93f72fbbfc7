//! Tier 4: the real `dmsc-node` binary, several processes on loopback.
//!
//! CA init and node certificates through the CLI, three nodes chained by
//! bootstrap peers, an intruder with a certificate from another CA, kill -9,
//! SIGTERM and restart, with every membership claim read through
//! `dmsc-node status --json` as a user would.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_dmsc-node");

fn cli(args: &[&str]) -> std::process::Output {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run dmsc-node");
    assert!(
        out.status.success(),
        "dmsc-node {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ca_init(dir: &Path) {
    let out = dir.to_str().expect("utf8 path");
    cli(&["ca", "init", "--trust-domain", "mesh.test", "--out", out]);
}

fn issue_node(ca: &Path, name: &str, out: &Path) {
    let (ca, out) = (ca.to_str().expect("utf8"), out.to_str().expect("utf8"));
    cli(&[
        "ca",
        "issue-node",
        "--ca-dir",
        ca,
        "--name",
        name,
        "--out",
        out,
    ]);
}

struct Node {
    name: String,
    child: Child,
    overlay: String,
    admin: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Node {
    fn start(name: &str, config: &Path) -> Node {
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "--config"]).arg(config);
        Node::start_with(name, cmd)
    }

    /// Starts the node with `cmd` (the binary, or a shell that execs it).
    fn start_with(name: &str, mut cmd: Command) -> Node {
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn node");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("dmsc-node ready") {
                    let field = |k: &str| {
                        line.split_whitespace()
                            .find_map(|w| w.strip_prefix(k))
                            .map(str::to_string)
                    };
                    let _ = tx.send((field("overlay="), field("admin=")));
                }
                sink.lock().expect("log").push(line);
            }
        });
        let (overlay, admin) = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| {
                panic!(
                    "{name} did not become ready; log:\n{}",
                    log.lock().expect("log").join("\n")
                )
            });
        Node {
            name: name.into(),
            child,
            overlay: overlay.expect("overlay addr"),
            admin: admin.expect("admin addr"),
            log,
        }
    }

    fn peers(&self) -> Vec<(String, String)> {
        let out = Command::new(BIN)
            .args(["status", "--json", "--admin", &self.admin])
            .output()
            .expect("status");
        if !out.status.success() {
            return vec![];
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
        assert_eq!(v["node"]["name"], self.name.as_str());
        assert_eq!(v["node"]["overlay_addr"], self.overlay.as_str());
        v["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .map(|p| {
                if p["state"] == "alive" && p["connected"] == true {
                    assert_eq!(
                        p["verified"], true,
                        "a connected peer's name is proven by its certificate"
                    );
                }
                (
                    p["name"].as_str().expect("name").to_string(),
                    p["state"].as_str().expect("state").to_string(),
                )
            })
            .collect()
    }

    fn state_of(&self, peer: &str) -> Option<String> {
        self.peers()
            .into_iter()
            .find(|(n, _)| n == peer)
            .map(|(_, s)| s)
    }

    fn log_contains(&self, needle: &str) -> bool {
        self.log
            .lock()
            .expect("log")
            .iter()
            .any(|l| l.contains(needle))
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The failed inbound overlay handshakes series on `/metrics`.
const INBOUND_REFUSED: &str =
    "dmsc_overlay_handshakes_total{direction=\"inbound\",result=\"failed\"} ";

/// The value of the first `/metrics` series of the node at `admin` that
/// starts with `series` (name and labels; 0 if absent).
fn metric(admin: &str, series: &str) -> u64 {
    let addr: std::net::SocketAddr = admin.parse().expect("admin addr");
    let mut s = std::net::TcpStream::connect(addr).expect("admin");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let (status, metrics) = get_on(&mut s, "/metrics");
    assert_eq!(status, 200, "{metrics}");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Polls `cond` every 100 ms until it holds or `limit` passes; returns the time it took.
fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn write_config(dir: &Path, name: &str, creds: &Path, bootstrap: &[&str]) -> PathBuf {
    let boots: Vec<String> = bootstrap.iter().map(|b| format!("\"{b}\"")).collect();
    let text = format!(
        r#"name = "{name}"
region = "r-{name}"
[overlay]
listen = "127.0.0.1:0"
bootstrap = [{}]
[tls]
ca = "{c}/ca.pem"
cert = "{c}/node.pem"
key = "{c}/node.key"
[admin]
listen = "127.0.0.1:0"
"#,
        boots.join(", "),
        c = creds.display()
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn three_processes_form_a_mesh_refuse_an_intruder_and_track_failures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let ca = d.join("ca");
    ca_init(&ca);
    for n in ["n1", "n2", "n3"] {
        issue_node(&ca, n, &d.join(n));
    }
    let n1_config = write_config(d, "n1", &d.join("n1"), &[]);
    let n1 = Node::start("n1", &n1_config);
    let n2 = Node::start("n2", &write_config(d, "n2", &d.join("n2"), &[&n1.overlay]));
    let n3_config = write_config(d, "n3", &d.join("n3"), &[&n2.overlay]);
    // n3 runs on one CPU, as the benchmarks pin nodes: its runtime is the
    // single-threaded one, and everything below holds for it too.
    let mut pinned = Command::new("taskset");
    pinned
        .args(["-c", "0", BIN, "run", "--config"])
        .arg(&n3_config);
    let mut n3 = Node::start_with("n3", pinned);
    assert!(
        n3.log_contains("single-threaded runtime"),
        "n3 under taskset -c 0 should say it runs one thread"
    );

    let t = eventually(
        Duration::from_secs(15),
        "all three see each other alive",
        || {
            [
                (&n1, ["n2", "n3"]),
                (&n2, ["n1", "n3"]),
                (&n3, ["n1", "n2"]),
            ]
            .iter()
            .all(|(node, others)| {
                others
                    .iter()
                    .all(|o| node.state_of(o).as_deref() == Some("alive"))
            })
        },
    );
    eprintln!("3 processes converged in {t:?}");

    // An intruder: valid-looking node certificate, but from another CA.
    let other = d.join("other-ca");
    ca_init(&other);
    issue_node(&other, "rogue", &d.join("rogue"));
    // It even copied the mesh's public ca.pem, so it accepts our nodes:
    // the refusal must come from our side checking its certificate.
    std::fs::copy(ca.join("ca.pem"), d.join("rogue").join("ca.pem")).expect("copy ca");
    let rogue = Node::start(
        "rogue",
        &write_config(d, "rogue", &d.join("rogue"), &[&n1.overlay]),
    );
    eventually(
        Duration::from_secs(10),
        "both sides log the refusal",
        || {
            if std::env::var_os("DMSC_TEST_DEBUG").is_some() {
                eprintln!(
                    "n1: {:?}\nrogue: {:?}",
                    n1.log.lock().expect("l"),
                    rogue.log.lock().expect("l")
                );
            }
            // Both CAs were made for the same trust domain, so they share a
            // name: the refusal says the key differs.
            n1.log_contains("refused overlay peer certificate")
                && n1.log_contains("like the mesh CA, but with another key")
                && rogue.log_contains("cannot reach overlay peer")
        },
    );
    // Before looking for it: n1 has refused the intruder's redials since,
    // and every node has run gossip rounds that would have spread it.
    let refused = || metric(&n1.admin, INBOUND_REFUSED);
    let rounds = || [&n1, &n2, &n3].map(|n| metric(&n.admin, "dmsc_gossip_rounds_total "));
    let (refused_then, rounds_then) = (refused(), rounds());
    eventually(
        Duration::from_secs(30),
        "n1 refuses the intruder twice more, 5 gossip rounds everywhere",
        || {
            let now = rounds();
            refused() >= refused_then + 2 && (0..3).all(|i| now[i] >= rounds_then[i] + 5)
        },
    );
    for n in [&n1, &n2, &n3] {
        assert!(
            n.state_of("rogue").is_none(),
            "{} lists the intruder",
            n.name
        );
    }
    assert!(rogue.peers().is_empty(), "the intruder learned no peers");
    // `check` on n1 reports the refused certificate and why.
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&n1_config)
        .args(["--admin", &n1.admin])
        .output()
        .expect("check");
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("refused a peer's certificate") && said.contains("is not from this mesh"),
        "{said}"
    );
    drop(rogue);

    // kill -9: the others must see n3 dead. The bound is a sanity limit
    // (about 1 s here; detection time is measured in BENCHMARKS.md).
    n3.signal("-KILL");
    let _ = n3.child.wait();
    let t = eventually(Duration::from_secs(30), "n3 dead on n1 and n2", || {
        n1.state_of("n3").as_deref() == Some("dead") && n2.state_of("n3").as_deref() == Some("dead")
    });
    eprintln!("kill -9 detected as dead in {t:?}");
    // Its connection is closed at once (in-flight delegations fail fast
    // instead of waiting for the QUIC idle timeout).
    eventually(
        Duration::from_secs(5),
        "n1 closes its connection to n3",
        || n1.log_contains("closed the connection to a peer declared dead or departed"),
    );

    // SIGTERM: n2 announces leaving.
    n2.signal("-TERM");
    let t = eventually(Duration::from_secs(5), "n2 left on n1", || {
        n1.state_of("n2").as_deref() == Some("left")
    });
    eprintln!("SIGTERM seen as left in {t:?}");
    let mut n2 = n2;
    let status = n2.child.wait().expect("wait n2");
    assert!(status.success(), "SIGTERM drains and exits 0, got {status}");
    assert!(n2.log_contains("announced leaving the mesh"));

    // Restart n3 (new generation, new port). Its old bootstrap peer n2 is
    // gone, so, as an operator would, it lists n1 as well.
    drop(n3);
    let n3_config = write_config(d, "n3", &d.join("n3"), &[&n2.overlay, &n1.overlay]);
    let n3 = Node::start("n3", &n3_config);
    let t = eventually(
        Duration::from_secs(15),
        "restarted n3 alive on n1 and n1 alive on n3",
        || {
            n1.state_of("n3").as_deref() == Some("alive")
                && n3.state_of("n1").as_deref() == Some("alive")
        },
    );
    eprintln!("restarted node alive again in {t:?}");
}

#[test]
fn status_fails_clearly_when_the_node_is_down() {
    // Port 9 (discard) on loopback: nothing listens there.
    let out = Command::new(BIN)
        .args(["status", "--admin", "127.0.0.1:9"])
        .output()
        .expect("status");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the node's admin API at 127.0.0.1:9"),
        "{err}"
    );
}

#[test]
fn an_unreachable_node_is_exit_code_2_for_status_and_the_policy_commands() {
    // README: 2 when the node could not be reached, whatever the command.
    for args in [
        &["status", "--admin", "127.0.0.1:9"][..],
        &["policy", "show", "--admin", "127.0.0.1:9"][..],
    ] {
        let out = Command::new(BIN).args(args).output().expect("run");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
    }
}

#[test]
fn bad_config_exits_64_listing_every_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "name = \"Bad\"\n[overlay]\nlisten = \"nowhere\"\n[admin]\nlisten = \"0.0.0.0\"\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["run", "--validate-only", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in ["name", "overlay.listen", "admin.listen", "tls.ca"] {
        assert!(err.contains(needle), "missing {needle}: {err}");
    }
}

#[test]
fn validate_only_refuses_what_run_refuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let ca = d.join("ca");
    let s = |p: &std::path::Path| p.to_str().expect("utf8").to_string();
    let out = run(&["ca", "init", "--trust-domain", "v.test", "--out", &s(&ca)]);
    assert!(out.status.success(), "{}", text(&out));
    for name in ["a", "b"] {
        let out = run(&[
            "ca",
            "issue-node",
            "--ca-dir",
            &s(&ca),
            "--name",
            name,
            "--out",
            &s(&d.join(name)),
        ]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let config = |name: &str, key_of: &str| {
        let path = d.join(format!("{name}-{key_of}.toml"));
        std::fs::write(
            &path,
            format!(
                "name = \"{name}\"\ndata_dir = \"{data}\"\n[overlay]\nlisten = \"127.0.0.1:0\"\n\
                 [tls]\nca = \"{a}/ca.pem\"\ncert = \"{a}/node.pem\"\nkey = \"{k}/node.key\"\n\
                 [admin]\nlisten = \"127.0.0.1:0\"\n",
                data = d.join("data").display(),
                a = d.join("a").display(),
                k = d.join(key_of).display(),
            ),
        )
        .expect("write");
        path
    };
    let validate = |path: &std::path::Path| {
        Command::new(BIN)
            .args(["run", "--validate-only", "--config"])
            .arg(path)
            .output()
            .expect("run")
    };
    let out = validate(&config("a", "a"));
    assert!(out.status.success(), "{}", text(&out));
    let out = validate(&config("q", "a"));
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        text(&out).contains("config says name = `q` but the certificate"),
        "{}",
        text(&out)
    );
    let out = validate(&config("a", "b"));
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        text(&out).contains("does not belong to the certificate"),
        "{}",
        text(&out)
    );
    assert!(!d.join("data").exists(), "validation wrote nothing");
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run dmsc-node")
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn operator_commands_token_revoke_check_and_audit_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let ca = d.join("ca");
    ca_init(&ca);
    for n in ["n1", "n2"] {
        issue_node(&ca, n, &d.join(n));
        assert!(
            d.join(n).join("issuer.pem").is_file(),
            "issue-node writes the issuing certificate"
        );
    }
    let n1_config = write_config(d, "n1", &d.join("n1"), &[]);
    let n1 = Node::start("n1", &n1_config);
    let n2 = Node::start("n2", &write_config(d, "n2", &d.join("n2"), &[&n1.overlay]));
    eventually(Duration::from_secs(15), "n1 and n2 alive", || {
        n1.state_of("n2").as_deref() == Some("alive")
    });

    // A join token, printed once.
    let admin_token = d.join("n1").join("data").join("admin.token");
    let admin_token = admin_token.to_str().expect("utf8");
    // Without the admin token: refused.
    let out = run(&[
        "token",
        "create",
        "--tenant",
        "acme",
        "--agent",
        "payer",
        "--admin",
        &n1.admin,
        "--admin-token",
        "/nonexistent",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("cannot read the admin token"),
        "{}",
        text(&out)
    );
    let out = run(&[
        "token",
        "create",
        "--tenant",
        "acme",
        "--agent",
        "payer",
        "--admin",
        &n1.admin,
        "--admin-token",
        admin_token,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("dmsc-jt."),
        "{}",
        text(&out)
    );

    // A tenant read token: printed once, then `status` with it shows that
    // tenant's view; `--read-only` is required.
    let out = run(&[
        "admin-token",
        "create",
        "--tenant",
        "acme",
        "--admin",
        &n1.admin,
        "--admin-token",
        admin_token,
    ]);
    assert!(!out.status.success(), "--read-only is required");
    let out = run(&[
        "admin-token",
        "create",
        "--tenant",
        "acme",
        "--read-only",
        "--ttl",
        "1h",
        "--admin",
        &n1.admin,
        "--admin-token",
        admin_token,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let read_token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(read_token.starts_with("dmsc-rt."), "{}", text(&out));
    let read_file = d.join("acme.token");
    std::fs::write(&read_file, &read_token).expect("write token");
    let out = run(&[
        "status",
        "--json",
        "--admin",
        &n1.admin,
        "--admin-token",
        read_file.to_str().expect("utf8"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    assert_eq!(
        v["certificates"]["tokens"],
        serde_json::Value::Null,
        "a tenant sees no join-token counts"
    );
    let out = run(&[
        "admin-token",
        "list",
        "--admin",
        &n1.admin,
        "--admin-token",
        admin_token,
    ]);
    assert!(
        out.status.success() && text(&out).contains("acme"),
        "{}",
        text(&out)
    );
    // The read token cannot mint join tokens.
    let out = run(&[
        "token",
        "create",
        "--tenant",
        "acme",
        "--agent",
        "x",
        "--admin",
        &n1.admin,
        "--admin-token",
        read_file.to_str().expect("utf8"),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("403") && text(&out).contains("read-only"),
        "{}",
        text(&out)
    );

    // check: all good while both run.
    let check = |n1: &Node| {
        run(&[
            "check",
            "--config",
            n1_config.to_str().expect("utf8"),
            "--admin",
            &n1.admin,
        ])
    };
    let out = check(&n1);
    assert!(out.status.success(), "check failed: {}", text(&out));
    assert!(
        text(&out).contains("clock skew with peer `n2`"),
        "{}",
        text(&out)
    );

    // Revoke n2's node certificate through the CLI.
    let rev = d.join("rev.json");
    let n2_cert = d.join("n2").join("node.pem");
    let out = run(&[
        "ca",
        "revoke",
        "--ca-dir",
        ca.to_str().expect("utf8"),
        "--cert",
        n2_cert.to_str().expect("utf8"),
        "--reason",
        "decommissioned",
        "--out",
        rev.to_str().expect("utf8"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = run(&[
        "revoke",
        "apply",
        rev.to_str().expect("utf8"),
        "--admin",
        &n1.admin,
        "--admin-token",
        admin_token,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("closed connections: [\"n2\"]"),
        "{}",
        text(&out)
    );
    let status = run(&["status", "--json", "--admin", &n1.admin]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    assert_eq!(v["certificates"]["revoked"], 1);
    assert!(n1.log_contains("certificate revoked"));

    // Every certificate of n2 by its name, from the CA's ledger: the node
    // certificate (already revoked) and its issuing certificate.
    let revs = d.join("revs.jsonl");
    let revoke_node = |name: &str| {
        run(&[
            "ca",
            "revoke",
            "--ca-dir",
            ca.to_str().expect("utf8"),
            "--node",
            name,
            "--out",
            revs.to_str().expect("utf8"),
        ])
    };
    let out = revoke_node("n2");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("2 revocation(s) of node `n2` (node certificate"),
        "{}",
        text(&out)
    );
    let out = run(&[
        "revoke",
        "apply",
        revs.to_str().expect("utf8"),
        "--admin",
        &n1.admin,
        "--admin-token",
        admin_token,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let applied = text(&out);
    assert!(applied.contains("revoked (already known)"), "{applied}");
    assert!(applied.contains("revoked (new)"), "{applied}");
    let status = run(&["status", "--json", "--admin", &n1.admin]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    assert_eq!(v["certificates"]["revoked"], 2);
    let out = revoke_node("n9");
    assert!(!out.status.success());
    assert!(
        text(&out).contains("lists no unexpired certificate of node `n9`"),
        "{}",
        text(&out)
    );
    drop(n2);

    // Tenant keys: rotate through the local node, then a delete signed to a
    // file and applied with `tenant apply`.
    let ca_s = ca.to_str().expect("utf8");
    let out = run(&[
        "tenant",
        "rotate-key",
        "--ca-dir",
        ca_s,
        "--tenant",
        "acme",
        "--admin",
        &n1.admin,
        "--admin-token",
        admin_token,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("new key"), "{}", text(&out));
    let del = d.join("delete-acme.json");
    let del_s = del.to_str().expect("utf8");
    let out = run(&[
        "tenant", "delete", "--ca-dir", ca_s, "--tenant", "acme", "--out", del_s,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = run(&[
        "tenant",
        "apply",
        del_s,
        "--admin",
        &n1.admin,
        "--admin-token",
        admin_token,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("keys destroyed"), "{}", text(&out));

    // check fails on a world-readable key, naming it.
    let key = d.join("n1").join("node.key");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = check(&n1);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("world-readable"), "{}", text(&out));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");

    // Stop n1 (drains the audit log, signs a final checkpoint), verify it,
    // then tamper with it and verify again.
    n1.signal("-TERM");
    let mut n1 = n1;
    assert!(n1.child.wait().expect("wait").success());
    let audit = d.join("n1").join("data").join("audit");
    let (audit_s, ca_pem) = (
        audit.to_str().expect("utf8").to_string(),
        ca.join("ca.pem").to_str().expect("utf8").to_string(),
    );
    let out = run(&["audit", "verify", "--dir", &audit_s, "--ca", &ca_pem]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("signed checkpoint") && text(&out).contains(" verified"),
        "{}",
        text(&out)
    );
    let data_s = d
        .join("n1")
        .join("data")
        .to_str()
        .expect("utf8")
        .to_string();
    let out = run(&["audit", "tail", "--dir", &audit_s, "--data-dir", &data_s]);
    assert!(
        text(&out).contains("\"kind\":\"revocation\""),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("\"action\":\"delete\""),
        "the tenant key statements are audited: {}",
        text(&out)
    );
    let log = audit.join("audit.jsonl");
    let original = std::fs::read_to_string(&log).expect("log");
    std::fs::write(&log, original.replace("decommissioned", "decommissionee")).expect("tamper");
    let out = run(&["audit", "verify", "--dir", &audit_s, "--ca", &ca_pem]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("TAMPERED"), "{}", text(&out));
}

/// utime + stime of a process, in clock ticks (/proc/<pid>/stat fields 14, 15).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // The command name may hold spaces: fields are counted after its `)`.
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state): utime is field 14, stime 15.
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

fn clock_ticks_per_sec() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// One request on a kept-alive HTTP/1.1 connection: (status, body).
fn get_on(s: &mut std::net::TcpStream, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    write!(s, "GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .expect("content-length");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("body");
    (status, String::from_utf8_lossy(&body).to_string())
}

/// `GET path` on a new connection; `None` if the node does not answer.
fn get(addr: &str, path: &str) -> Option<u16> {
    let addr: std::net::SocketAddr = addr.parse().expect("addr");
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    use std::io::{Read, Write};
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[test]
fn a_connection_flood_past_the_open_files_limit_leaves_the_node_idle_and_it_recovers() {
    const FDS: usize = 256;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    ca_init(&d.join("ca"));
    issue_node(&d.join("ca"), "n1", &d.join("n1"));
    let config = write_config(d, "n1", &d.join("n1"), &[]);
    // An ingress, and a header timeout longer than the test, so the flood
    // holds its connections (it is the accept loop under test, not the timeout).
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str(
        "[limits]\nheader_read_timeout_ms = 120000\n[[ingress]]\nlisten = \"127.0.0.1:0\"\ntenant = \"acme\"\n",
    );
    std::fs::write(&config, text).expect("config");
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        &format!("ulimit -n {FDS} && exec \"$0\" run --config \"$1\""),
    ])
    .arg(BIN)
    .arg(&config);
    let node = Node::start_with("n1", cmd);
    let pid = node.child.id();
    let ingress = {
        let log = node.log.lock().expect("log");
        log.iter()
            .filter(|l| l.contains("ingress listening"))
            .find_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
                    .map(str::to_string)
            })
            .expect("ingress address in the log")
    };
    let ingress: std::net::SocketAddr = ingress.parse().expect("ingress addr");
    // Opened before the flood: the admin port cannot accept during it.
    let admin_addr: std::net::SocketAddr = node.admin.parse().expect("admin addr");
    let mut admin = std::net::TcpStream::connect(admin_addr).expect("admin");
    admin
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    assert_eq!(get_on(&mut admin, "/live").0, 200);

    // The flood: far more connections than the node has descriptors, held.
    let flood_start = Instant::now();
    let mut flood = Vec::new();
    for _ in 0..FDS * 4 {
        // Once the node's descriptors and the listen backlog are full,
        // connects time out: the flood is as big as it gets.
        match std::net::TcpStream::connect_timeout(&ingress, Duration::from_secs(2)) {
            Ok(s) => flood.push(s),
            Err(_) => break,
        }
    }
    assert!(flood.len() > FDS, "only {} connections", flood.len());
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    eventually(
        Duration::from_secs(30),
        "the node runs out of descriptors",
        || fds() >= FDS - 4,
    );
    // CPU over at least 2 s while the flood holds, and until the accept loop
    // has failed twice more within that window (counted on /metrics): a
    // retrying loop burns a whole core here; a pausing one next to nothing.
    let accept_errors = |admin: &mut std::net::TcpStream| {
        let (status, metrics) = get_on(admin, "/metrics");
        assert_eq!(status, 200);
        metrics
            .lines()
            .find(|l| l.starts_with("dmsc_listener_accept_errors_total{") && l.contains("ingress"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no accept error count in:\n{metrics}"))
    };
    let hz = clock_ticks_per_sec();
    let (t0, c0, e0) = (Instant::now(), cpu_ticks(pid), accept_errors(&mut admin));
    let mut errors = e0;
    while t0.elapsed() < Duration::from_secs(2) || errors < e0 + 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the accept loop stopped failing while out of descriptors"
        );
        std::thread::sleep(Duration::from_millis(500));
        errors = accept_errors(&mut admin);
    }
    let (t1, c1) = (Instant::now(), cpu_ticks(pid));
    let share = (c1 - c0) as f64 / hz as f64 / (t1 - t0).as_secs_f64();
    eprintln!(
        "flood of {} connections, node at {} descriptors: {:.1} % of a core over {:?} and {} accept errors",
        flood.len(),
        fds(),
        share * 100.0,
        t1 - t0,
        errors - e0
    );
    assert!(
        share < 0.3,
        "the node used {:.0} % of a core while out of descriptors",
        share * 100.0
    );
    // The failures are logged, rate-limited.
    let held_for = flood_start.elapsed();
    let warnings = node
        .log
        .lock()
        .expect("log")
        .iter()
        .filter(|l| l.contains("accept failed") && l.contains("WARN"))
        .count();
    assert!(warnings >= 1, "no warning logged");
    assert!(
        warnings as u64 <= held_for.as_secs() / 5 + 2,
        "{warnings} warnings in {held_for:?} for {errors} accept errors"
    );
    drop(admin);

    // Flood gone: the node answers again.
    drop(flood);
    let t = eventually(Duration::from_secs(30), "/live answers again", || {
        get(&node.admin, "/live") == Some(200)
    });
    eprintln!("/live answered {t:?} after the flood dropped");
}

#[test]
fn audit_report_counts_one_tenant_from_the_command_line() {
    let dir = tempfile::tempdir().expect("dir");
    let audit = dir.path().join("data").join("audit");
    std::fs::create_dir_all(&audit).expect("mkdir");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let old = now - 3 * 86_400_000;
    let prev = "0".repeat(64);
    let entries = [
        (old, "acme", "delegation", r#"{"outcome":"ok"}"#),
        (now, "acme", "delegation", r#"{"outcome":"ok"}"#),
        (now, "acme", "denied", r#"{"reason":"x","rule":"export"}"#),
        (
            now,
            "acme",
            "rate_limited",
            r#"{"refused":40,"scope":"tenant"}"#,
        ),
        (now, "acme", "policy_applied", r#"{"version":2}"#),
        (now, "globex", "delegation", r#"{"outcome":"ok"}"#),
    ];
    let mut log = String::new();
    for (seq, (ts, tenant, kind, detail)) in entries.iter().enumerate() {
        log.push_str(&format!(
            r#"{{"seq":{seq},"ts":{ts},"node":"n0","tenant":"{tenant}","kind":"{kind}","prev":"{prev}","detail":{detail}}}"#
        ));
        log.push('\n');
    }
    std::fs::write(audit.join("audit.jsonl"), log).expect("write log");
    let data = dir.path().join("data");
    let out = cli(&[
        "audit",
        "report",
        "--tenant",
        "acme",
        "--data-dir",
        data.to_str().expect("utf8"),
        "--since",
        "24h",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["kinds"]["delegation"]["events"], 1, "{v}");
    assert_eq!(v["kinds"]["rate_limited"]["events"], 40, "{v}");
    assert_eq!(v["kinds"]["policy_applied"]["events"], 1, "{v}");
    assert_eq!(v["denials_by_rule"]["export"], 1, "{v}");
    let out = cli(&[
        "audit",
        "report",
        "--tenant",
        "acme",
        "--file",
        audit.join("audit.jsonl").to_str().expect("utf8"),
    ]);
    let t = text(&out);
    assert!(t.contains("tenant   acme"), "{t}");
    assert!(
        t.lines()
            .any(|l| l.starts_with("delegation") && l.contains(" 2")),
        "{t}"
    );
    assert!(!t.contains("globex"), "{t}");
    let bad = run(&["audit", "report", "--tenant", "acme", "--since", "soon"]);
    assert!(!bad.status.success());
    assert!(text(&bad).contains("--since"), "{}", text(&bad));
}

#[test]
fn policy_commands_issue_tenant_sign_apply_show_and_diff() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let ca = d.join("ca");
    ca_init(&ca);
    let ca_s = ca.to_str().expect("utf8");
    let out = run(&["ca", "issue-tenant", "--ca-dir", ca_s, "--tenant", "acme"]);
    assert!(out.status.success(), "{}", text(&out));
    let (cert, key) = (ca.join("tenant-acme.pem"), ca.join("tenant-acme.key"));
    assert!(cert.is_file() && key.is_file(), "{}", text(&out));
    let (cert_s, key_s) = (cert.to_str().expect("utf8"), key.to_str().expect("utf8"));

    // A document with problems: every one listed, nothing signed.
    let bad = d.join("bad.toml");
    std::fs::write(
        &bad,
        "tenant = \"acme\"\nversion = 0\n[[export]]\nto = [\"globex\"]\ndata_tags = [\"nuclear\"]\n",
    )
    .expect("write");
    let out = run(&[
        "policy",
        "sign",
        bad.to_str().expect("utf8"),
        "--ca-dir",
        ca_s,
    ]);
    assert!(!out.status.success());
    let t = text(&out);
    for needle in [
        "version: must be at least 1",
        "exports nothing",
        "unknown data tag `nuclear`",
    ] {
        assert!(t.contains(needle), "`{needle}` missing: {t}");
    }

    // acme's admin key signs acme's document, not globex's.
    let doc = d.join("acme.toml");
    let v1 =
        "tenant = \"acme\"\nversion = 1\n[[export]]\nto = [\"globex\"]\nagents = [\"billing\"]\n";
    std::fs::write(&doc, v1).expect("write");
    let signed = d.join("acme.signed");
    let out = run(&[
        "policy",
        "sign",
        doc.to_str().expect("utf8"),
        "--cert",
        cert_s,
        "--key",
        key_s,
        "--out",
        signed.to_str().expect("utf8"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let globex = d.join("globex.toml");
    std::fs::write(&globex, "tenant = \"globex\"\nversion = 1\n").expect("write");
    let out = run(&[
        "policy",
        "sign",
        globex.to_str().expect("utf8"),
        "--cert",
        cert_s,
        "--key",
        key_s,
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("tenant `acme`"), "{}", text(&out));

    // Applied on one node, it reaches the other by gossip.
    for n in ["n1", "n2"] {
        issue_node(&ca, n, &d.join(n));
    }
    let n1 = Node::start("n1", &write_config(d, "n1", &d.join("n1"), &[]));
    let n2 = Node::start("n2", &write_config(d, "n2", &d.join("n2"), &[&n1.overlay]));
    eventually(Duration::from_secs(15), "n1 and n2 alive", || {
        n1.state_of("n2").as_deref() == Some("alive")
    });
    let token = d.join("n1").join("data").join("admin.token");
    let out = run(&[
        "policy",
        "apply",
        signed.to_str().expect("utf8"),
        "--admin",
        &n1.admin,
        "--admin-token",
        token.to_str().expect("utf8"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("version 1 applied"), "{}", text(&out));
    eventually(Duration::from_secs(15), "n2 enforces acme's policy", || {
        let out = run(&["policy", "show", "acme", "--admin", &n2.admin]);
        out.status.success() && String::from_utf8_lossy(&out.stdout) == v1
    });
    let out = run(&["policy", "show", "--admin", &n2.admin]);
    assert!(
        text(&out).contains("acme") && text(&out).contains("tenant-admin:"),
        "{}",
        text(&out)
    );
    // The table's columns line up: every row's signer starts under SIGNER.
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    let col = table.find("SIGNER").expect("header");
    let digest = table.find("DIGEST").expect("header");
    for row in table.lines().skip(1) {
        assert_eq!(row.find("tenant-admin:"), Some(col), "{table}");
        let d = row.get(digest..).unwrap_or_default();
        assert!(
            d.len() == 16 && d.bytes().all(|b| b.is_ascii_hexdigit()),
            "{table}"
        );
    }
    // diff: the same document is no difference; an edit is shown, exit 1.
    let out = run(&[
        "policy",
        "diff",
        doc.to_str().expect("utf8"),
        "--admin",
        &n2.admin,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    std::fs::write(
        &doc,
        v1.replace("version = 1", "version = 2")
            .replace("billing", "ledger"),
    )
    .expect("write");
    let out = run(&[
        "policy",
        "diff",
        doc.to_str().expect("utf8"),
        "--admin",
        &n2.admin,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = String::from_utf8_lossy(&out.stdout).into_owned();
    for line in [
        "- version = 1",
        "+ version = 2",
        "- agents = [\"billing\"]",
        "+ agents = [\"ledger\"]",
    ] {
        assert!(t.contains(line), "`{line}` missing: {t}");
    }
}
