//! `dmsc-node demo`: a whole mesh on loopback with no setup.
//!
//! A throwaway CA in a temp dir, N nodes in this process (each with its own
//! QUIC overlay, gossip, admin API and an ingress for tenant `demo`, all on
//! port 0), the later ones bootstrapping through the first, and built-in
//! sample agents spread over the nodes. Once the mesh has converged it sends
//! delegations by name, by capability and by intent from different nodes and
//! prints who served each and why, then prints the ingress addresses to try
//! with `curl`, and runs until Ctrl-C (or `--duration`), reporting peer and
//! agent changes.

use std::time::{Duration, Instant};

use mesh::{message_send, send_message_v10, LocalMesh};
use sample_agent::{CardDialect, SampleAgent, SampleConfig, SampleSkill};

pub mod mesh;
pub mod sample_agent;

const REGIONS: [&str; 5] = ["eu", "us", "ap", "sa", "af"];
const TENANT: &str = "demo";

struct Sample {
    name: &'static str,
    description: &'static str,
    tags: &'static [&'static str],
    examples: &'static [&'static str],
    delay_ms: u64,
    dialect: CardDialect,
}

const SAMPLES: [Sample; 5] = [
    Sample {
        name: "billing",
        description: "Process, check and pay invoices",
        tags: &["invoice", "billing", "payments"],
        examples: &["pay invoice 42", "is invoice 7 overdue?"],
        delay_ms: 5,
        dialect: CardDialect::V03,
    },
    Sample {
        name: "translator",
        description: "Translate text between English, French and German",
        tags: &["translation", "french", "german"],
        examples: &["translate good morning to German"],
        delay_ms: 5,
        dialect: CardDialect::V10,
    },
    Sample {
        name: "summarizer-fast",
        description: "Summarize long documents and reports",
        tags: &["summarization", "reports"],
        examples: &["summarize this quarterly report"],
        delay_ms: 5,
        dialect: CardDialect::V03,
    },
    Sample {
        name: "summarizer-slow",
        description: "Summarize long documents and reports",
        tags: &["summarization", "reports"],
        examples: &["summarize this quarterly report"],
        delay_ms: 60,
        dialect: CardDialect::V10,
    },
    Sample {
        name: "weather",
        description: "Weather forecasts for any city",
        tags: &["weather", "forecast"],
        examples: &["what is the weather in Paris tomorrow"],
        delay_ms: 5,
        dialect: CardDialect::V03,
    },
];

fn node_name(i: usize) -> String {
    let name = format!("{}-1", REGIONS[i % REGIONS.len()]);
    if i >= REGIONS.len() {
        format!("{name}-{i}")
    } else {
        name
    }
}

/// Runs the demo until `shutdown` resolves.
pub async fn run(
    nodes: usize,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    anyhow::ensure!((1..=20).contains(&nodes), "--nodes must be within 1..=20");
    let names: Vec<String> = (0..nodes).map(node_name).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    // Intent routing uses the sentence-embedding model when it is
    // installed (scripts/fetch-model.sh), else BM25 alone.
    let model = dmsc_embed::installed_model_dir();
    let mesh = LocalMesh::start(&name_refs, TENANT, |i, raw| {
        raw.intent.model_dir = model.clone();
        raw.region = Some(REGIONS[i % REGIONS.len()].to_string());
        raw.delegation.health_interval_ms = Some(1000);
        raw.delegation.load_interval_ms = Some(200);
        if i == 0 {
            // Remote agents: TLS, identity from an enrolled client certificate.
            raw.ingress.push(crate::config::RawIngress {
                listen: "127.0.0.1:0".into(),
                tls: Some(true),
                auth: Some(vec!["mtls".into()]),
                ..Default::default()
            });
        }
    })
    .await?;
    println!(
        "dmsc demo: {nodes} nodes on loopback, throwaway CA in {}, tenant `{TENANT}`",
        mesh.dir.path().display()
    );
    for (i, app) in mesh.nodes.iter().enumerate() {
        let b = app.bound();
        println!(
            "  {:<6} overlay {}  admin {}  ingress {}",
            names[i], b.overlay, b.admin, b.ingress[0]
        );
    }

    // Sample agents, spread over the nodes.
    let mut agents: Vec<SampleAgent> = Vec::new();
    for (k, s) in SAMPLES.iter().enumerate() {
        let agent = SampleAgent::start(
            "127.0.0.1:0".parse()?,
            SampleConfig {
                name: s.name.to_string(),
                description: s.description.to_string(),
                skills: vec![SampleSkill {
                    id: s.name.to_string(),
                    name: s.description.to_string(),
                    description: s.description.to_string(),
                    tags: s.tags.iter().map(|t| t.to_string()).collect(),
                    examples: s.examples.iter().map(|t| t.to_string()).collect(),
                }],
                delay: Duration::from_millis(s.delay_ms),
                dialect: s.dialect,
            },
        )
        .await?;
        let home = k % nodes;
        mesh.attach(home, &agent.url(), None).await?;
        println!(
            "  agent {TENANT}/{:<16} at {}  home {:<6} tags {}",
            s.name,
            agent.url(),
            names[home],
            s.tags.join(",")
        );
        agents.push(agent);
    }

    let started = Instant::now();
    loop {
        let mut alive = true;
        for app in &mesh.nodes {
            alive &= app.status().await.gossip.alive == nodes - 1;
        }
        if alive && SAMPLES.iter().all(|s| mesh.routable_everywhere(s.name)) {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(20),
            "the mesh did not converge within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "\nconverged: every node sees every other alive and can route to all {} agents after {} ms\n",
        SAMPLES.len(),
        started.elapsed().as_millis()
    );
    match &model {
        Some(dir) => {
            // Cards are embedded in the background; intents wait for it.
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(30)
                && !mesh.nodes.iter().all(|n| {
                    let reg = n.mesh().read();
                    let done = reg.iter().all(|e| !e.has_card() || e.has_vectors());
                    done
                })
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            println!(
                "intent scorer: hybrid (BM25 + sentence embeddings, model {}; cards embedded after {} ms)\n",
                dir.display(),
                started.elapsed().as_millis()
            );
        }
        None => println!(
            "intent scorer: lexical-only (BM25); scripts/fetch-model.sh installs the model for hybrid routing\n"
        ),
    }
    print!("{}", mesh.nodes[0].status().await.render());

    println!("\ndelegations (sent to an ingress the way an agent would):");
    let last = nodes - 1;
    let calls: Vec<(&str, usize, String, String)> = vec![
        (
            "by name",
            last,
            format!("billing.{TENANT}.dmsc"),
            message_send("pay invoice 42"),
        ),
        (
            "by capability",
            0,
            format!("french.cap.{TENANT}.dmsc"),
            send_message_v10("good morning"),
        ),
        (
            "by intent",
            0,
            format!("mesh.{TENANT}.dmsc"),
            message_send("what is the weather in Paris tomorrow?"),
        ),
        (
            "by intent",
            last,
            format!("mesh.{TENANT}.dmsc"),
            send_message_v10("translate 'thank you' to German"),
        ),
    ];
    for (how, from, host, body) in calls {
        delegate_and_print(&mesh, how, from, &names[from], &host, body).await;
    }
    println!(
        "\nload balancing: 3 waves of 12 concurrent requests for capability `summarization`\n\
         (summarizer-slow answers 12x slower; nodes learn agent latency from gossiped load):"
    );
    let host = format!("summarization.cap.{TENANT}.dmsc");
    for wave in 1..=3 {
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        let sends = (0..12).map(|i| {
            mesh.call(
                i % nodes,
                "POST",
                &host,
                "/",
                &[],
                message_send("summarize this quarterly report"),
            )
        });
        for r in futures_util::future::join_all(sends).await {
            let agent = match r {
                Ok((resp, _)) => resp
                    .headers()
                    .get("dmsc-agent")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?")
                    .to_string(),
                Err(e) => format!("failed: {e}"),
            };
            *counts.entry(agent).or_default() += 1;
        }
        let line: Vec<String> = counts.iter().map(|(a, n)| format!("{a}: {n}")).collect();
        println!("  wave {wave}: {}", line.join(", "));
        tokio::time::sleep(Duration::from_millis(700)).await;
    }

    if let Err(e) = security_act(&mesh).await {
        println!("  security walkthrough failed: {e:#}");
    }

    let ingress = mesh.ingress(0);
    println!(
        "\ntry it yourself (ingress of {} for tenant `{TENANT}`):",
        names[0]
    );
    println!(
        "  curl -s -H 'Host: billing.{TENANT}.dmsc' http://{ingress}/ -d '{}'",
        message_send("pay invoice 7")
    );
    println!(
        "  curl -s -x http://{ingress} http://translator.{TENANT}.dmsc/.well-known/agent-card.json"
    );
    println!("  curl -s -H 'Host: mesh.{TENANT}.dmsc' -H 'dmsc-intent: weather in Rome' http://{ingress}/ -d hello -i");
    println!("  dmsc-node status --admin {}", mesh.nodes[0].bound().admin);
    println!("\nrunning; Ctrl-C to stop.\n");

    let watch = async {
        let mut last_view = String::new();
        loop {
            let s = mesh.nodes[0].status().await;
            let mut view = String::new();
            for p in &s.peers {
                view.push_str(&format!("{}={} ", p.name, p.state));
            }
            for a in &s.agents {
                view.push_str(&format!(
                    "{}/{}={}:{} ",
                    a.tenant, a.name, a.health, a.circuit
                ));
            }
            if view != last_view && !last_view.is_empty() {
                println!(
                    "[{:>6}ms] change seen by {}:",
                    started.elapsed().as_millis(),
                    s.node.name
                );
                print!("{}", s.render());
            }
            last_view = view;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    tokio::select! {
        _ = shutdown => {}
        _ = watch => {}
    }
    println!("stopping the demo mesh...");
    mesh.stop().await;
    drop(agents);
    Ok(())
}

/// One POST over a fresh TLS connection to an authenticated ingress.
async fn tls_post(
    addr: std::net::SocketAddr,
    cfg: std::sync::Arc<rustls::ClientConfig>,
    host: &str,
    path: &str,
    body: String,
) -> anyhow::Result<(u16, String, String)> {
    use http_body_util::BodyExt;
    let mut send = mesh::tls_connect(addr, cfg).await?;
    let req = hyper::Request::post(path)
        .header("host", host)
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req)).await??;
    let served_by = resp
        .headers()
        .get("dmsc-node")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((
        status,
        served_by,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

/// The reason a refusal carries (`detail` of the problem, or the JSON-RPC
/// error with its kind: those come over HTTP 200, which alone reads as a
/// success).
fn reason(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    // (Problem details carry an `error` member too: a google.rpc.Status.)
    if let (Some("2.0"), Some(message)) = (v["jsonrpc"].as_str(), v["error"]["message"].as_str()) {
        return format!(
            "JSON-RPC error {} ({}): {message}",
            v["error"]["code"],
            v["error"]["data"]["kind"].as_str().unwrap_or("error")
        );
    }
    v["detail"].as_str().unwrap_or(body).to_string()
}

/// Enrollment, mTLS, refusals, revocation and the audit trail, on node 0's
/// TLS ingress, the way a remote agent and an operator would do them.
async fn security_act(mesh: &LocalMesh) -> anyhow::Result<()> {
    let tls = mesh.nodes[0].bound().ingress[1];
    let ca = &mesh.ca.cert_pem;
    let sec = &mesh.nodes[0].security();
    println!(
        "\nsecurity (TLS ingress {tls} of {}: the caller's certificate decides its tenant):",
        sec.identity().name()
    );
    let (token, _) = sec
        .create_token(TENANT, "payer", Duration::from_secs(600), None)
        .map_err(|r| anyhow::anyhow!(r.reason))?;
    let anon = mesh::tls_client_config(ca, None)?;
    let enroll = serde_json::json!({ "token": token }).to_string();
    let (status, _, body) =
        tls_post(tls, anon.clone(), "localhost", "/v1/enroll", enroll.clone()).await?;
    anyhow::ensure!(status == 200, "enrollment answered {status}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let (chain, key) = (
        v["certificate_chain"].as_str().unwrap_or_default(),
        v["private_key"].as_str().unwrap_or_default(),
    );
    println!(
        "  enrolled with a one-time join token: {} (serial {}, until {})",
        v["spiffe_id"].as_str().unwrap_or("?"),
        v["serial"].as_str().unwrap_or("?"),
        v["not_after"].as_str().unwrap_or("?")
    );
    let agent = mesh::tls_client_config(ca, Some((chain, key)))?;
    let call = message_send("pay invoice 7");
    let (status, node, _) = tls_post(
        tls,
        agent.clone(),
        &format!("billing.{TENANT}.dmsc"),
        "/",
        call.clone(),
    )
    .await?;
    println!("  [mTLS] billing.{TENANT}.dmsc -> {status}, served via {node}");
    let (status, _, body) = tls_post(
        tls,
        anon,
        &format!("billing.{TENANT}.dmsc"),
        "/",
        call.clone(),
    )
    .await?;
    println!("  [no certificate] -> {status}: {}", reason(&body));
    let (status, _, body) =
        tls_post(tls, agent.clone(), "billing.globex.dmsc", "/", call.clone()).await?;
    println!(
        "  [mTLS, other tenant's address] -> {status}: {}",
        reason(&body)
    );
    let (status, _, body) = tls_post(
        tls,
        mesh::tls_client_config(ca, None)?,
        "localhost",
        "/v1/enroll",
        enroll,
    )
    .await?;
    println!("  [join token used again] -> {status}: {}", reason(&body));
    let rev = dmsc_transport::Revocation::sign(
        &mesh.ca,
        v["serial"].as_str().unwrap_or_default(),
        "demo: key compromised",
    )?;
    crate::ops::revoke_apply(
        mesh.nodes[0].bound().admin,
        &mesh.admin_token(0),
        rev.to_json(),
    )
    .await?;
    let (status, _, body) =
        tls_post(tls, agent, &format!("billing.{TENANT}.dmsc"), "/", call).await?;
    println!("  [after `revoke apply`] -> {status}: {}", reason(&body));
    if let Some(a) = &sec.audit {
        a.flush().await?;
        let dir = mesh.node_dir(0).join("data").join("audit");
        let report = dmsc_audit::verify(&dir, &dmsc_audit::VerifyOptions::default())?;
        println!(
            "  audit log of {}: {} entries ({} tenants), chain intact: {}; `dmsc-node audit tail --dir {}`",
            sec.identity().name(),
            report.entries,
            report.tenants.len(),
            report.problem.is_none(),
            dir.display()
        );
    }
    Ok(())
}

async fn delegate_and_print(
    mesh: &LocalMesh,
    how: &str,
    from: usize,
    from_name: &str,
    host: &str,
    body: String,
) {
    let text = crate::proto::a2a::intent_text(body.as_bytes()).unwrap_or_default();
    let start = Instant::now();
    match mesh.call(from, "POST", host, "/", &[], body).await {
        Ok((resp, rbody)) => {
            let h = |n: &str| {
                resp.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_string()
            };
            let answer = serde_json::from_slice::<serde_json::Value>(&rbody)
                .ok()
                .and_then(|v| crate::proto::a2a::reply_text(&v))
                .unwrap_or_else(|| String::from_utf8_lossy(&rbody).chars().take(80).collect());
            println!(
                "  [{how:<13}] {host:<26} from {from_name:<6} -> {} on {} in {:.1} ms, HTTP {}\n      asked: {text:?}\n      answer: {answer:?}\n      why: {}",
                h("dmsc-agent"),
                h("dmsc-node"),
                start.elapsed().as_secs_f64() * 1000.0,
                resp.status().as_u16(),
                h("dmsc-route"),
            );
        }
        Err(e) => println!("  [{how}] {host}: failed: {e}"),
    }
}
