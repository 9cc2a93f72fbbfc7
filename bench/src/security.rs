//! `dmsc-bench handshake` and `dmsc-bench auth-e2e`: what security costs.
//!
//! `handshake` dials new overlay connections (QUIC, mutual TLS 1.3, full
//! handshake: the overlay disables resumption so every handshake checks
//! revocations) one after the other between two nodes on loopback and
//! reports connections per second and the handshake latency distribution.
//!
//! `auth-e2e` runs the delegation path of the previous issue (node b's
//! ingress -> QUIC -> node a -> agent) with authentication off (plain HTTP
//! ingress) and on (TLS ingress with an mTLS client certificate, and TLS
//! with a bearer JWT), side by side in rounds that alternate the order, on
//! pooled keep-alive connections: per path, closed-loop throughput with
//! `concurrency` connections and the latency of each request. Everything
//! runs in this one process on a shared machine: read the ratios.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use dmsc_node::config::{RawAgent, RawIngress, RawJwt, RawSkill};
use dmsc_node::demo::mesh::{tls_client_config, tls_connect, LocalMesh};
use dmsc_transport::pki::{CertificateAuthority, NODE_VALIDITY};
use dmsc_transport::{NodeIdentity, Overlay, OverlayConfig};
use http_body_util::{BodyExt, Full};

#[derive(clap::Args, Debug)]
pub struct HandshakeArgs {
    /// Connections to dial, one after the other.
    #[arg(long, default_value_t = 500)]
    pub count: usize,
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn us(d: Duration) -> String {
    format!("{:.0} us", d.as_secs_f64() * 1e6)
}

pub async fn handshake(args: HandshakeArgs) -> anyhow::Result<()> {
    let ca = CertificateAuthority::generate("bench.test")?;
    let id = |name: &str| -> anyhow::Result<Arc<NodeIdentity>> {
        let c = ca.issue_node(name, NODE_VALIDITY)?;
        Ok(Arc::new(NodeIdentity::from_pem(
            &ca.cert_pem,
            &c.cert_pem,
            &c.key_pem,
        )?))
    };
    let bind = |id: Arc<NodeIdentity>| async move {
        Overlay::bind(OverlayConfig::new("127.0.0.1:0".parse()?, id))
            .await
            .map(|(o, _rx)| o)
            .map_err(anyhow::Error::from)
    };
    let a = bind(id("a")?).await?;
    let b = bind(id("b")?).await?;
    // Warm up (first dial builds caches, the accept task wakes).
    a.connect(b.local_addr()).await?;
    a.close_peer(b.local_addr());
    let mut lat = Vec::with_capacity(args.count);
    let start = Instant::now();
    for _ in 0..args.count {
        let t = Instant::now();
        a.connect(b.local_addr()).await?;
        lat.push(t.elapsed());
        a.close_peer(b.local_addr());
    }
    let total = start.elapsed();
    lat.sort();
    println!("new overlay connections (QUIC + mutual TLS 1.3, ECDSA P-256, full handshake, sequential, loopback)");
    println!("| connections | per second | p50 | p99 |");
    println!("|---:|---:|---:|---:|");
    println!(
        "| {} | {:.0} | {} | {} |",
        args.count,
        args.count as f64 / total.as_secs_f64(),
        us(pct(&lat, 0.5)),
        us(pct(&lat, 0.99))
    );
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct AuthE2eArgs {
    /// Seconds per path per round.
    #[arg(long, default_value_t = 4)]
    pub secs: u64,
    /// Keep-alive connections per path (closed loop).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Write the audit log (one delegation record per node per request).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub audit: bool,
    /// The audit log's fsync policy (`batch`, `interval:<ms>`, `never`).
    #[arg(long, default_value = "batch")]
    pub fsync: String,
    /// Compare tenant policy off vs on instead of the authentication modes:
    /// a tenant with no policy calling its own agent, against a cross-tenant
    /// call that a signed export and import allow, carrying a `pii` data tag
    /// through export, import and agent gates, under (never reached) rate
    /// limits of both tenants. Both plain ingress, same backend.
    #[arg(long)]
    pub policy: bool,
}

#[derive(Clone)]
enum Path {
    Plain,
    Mtls,
    Jwt(String),
    /// Tenant `open` (no policy) calling `backend.open.dmsc`.
    PolicyOff,
    /// Tenant `globex` calling `backend.acme.dmsc` with `dmsc-data-tags: pii`.
    PolicyOn,
}

impl Path {
    fn name(&self) -> &'static str {
        match self {
            Path::Plain => "auth off (plain HTTP ingress)",
            Path::Mtls => "mTLS (TLS 1.3 ingress, client certificate)",
            Path::Jwt(_) => "JWT (TLS 1.3 ingress, bearer ES256)",
            Path::PolicyOff => "policy off (tenant without a policy, own agent)",
            Path::PolicyOn => "policy on (cross-tenant export+import, pii tag, rate limits)",
        }
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn plain_connect(addr: std::net::SocketAddr) -> anyhow::Result<Sender> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    let (send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// One closed-loop run: `conns` connections, each sending requests back to
/// back for `secs`. Returns (requests per second, sorted latencies).
async fn run_path(
    senders: Vec<Sender>,
    path: &Path,
    secs: u64,
) -> anyhow::Result<(f64, Vec<Duration>)> {
    let until = Instant::now() + Duration::from_secs(secs);
    let body = Bytes::from(vec![b'x'; 1024]);
    let mut set = tokio::task::JoinSet::new();
    for mut s in senders {
        let (path, body) = (path.clone(), body.clone());
        set.spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < until {
                let host = match &path {
                    Path::PolicyOff => "backend.open.dmsc",
                    _ => "backend.acme.dmsc",
                };
                let mut req = hyper::Request::post("/")
                    .header("host", host)
                    .header("content-type", "application/octet-stream");
                match &path {
                    Path::Jwt(t) => req = req.header("authorization", format!("Bearer {t}")),
                    Path::PolicyOn => req = req.header("dmsc-data-tags", "pii"),
                    _ => {}
                }
                let req = req.body(Full::new(body.clone()))?;
                let t = Instant::now();
                let resp = s.send_request(req).await?;
                anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
                resp.into_body().collect().await?;
                lat.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(lat)
        });
    }
    let started = Instant::now();
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r??);
    }
    let rps = all.len() as f64 / started.elapsed().as_secs_f64();
    all.sort();
    Ok((rps, all))
}

pub async fn auth_e2e(args: AuthE2eArgs) -> anyhow::Result<()> {
    // The JWT issuer's key and JWKS.
    use ring::signature::KeyPair;
    let rng = ring::rand::SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng)
        .map_err(|e| anyhow::anyhow!("keygen: {e}"))?;
    let kp = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng)
        .map_err(|e| anyhow::anyhow!("key: {e}"))?;
    let point = kp.public_key().as_ref();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks_dir = tempfile::tempdir()?;
    let jwks = jwks_dir.path().join("jwks.json");
    std::fs::write(
        &jwks,
        serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig",
            "x": b64(&point[1..33]), "y": b64(&point[33..65])}]})
        .to_string(),
    )?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("k1".into());
    let token = jsonwebtoken::encode(
        &header,
        &serde_json::json!({"iss": "https://idp.bench", "aud": "dmsc", "sub": "client",
            "tenant": "acme", "exp": now + 3600, "nbf": now - 10}),
        &jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()),
    )?;

    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let backend_addr = backend.local_addr()?;
    let backend_task = tokio::spawn(crate::e2e::backend(backend));
    let url = format!("http://{backend_addr}");
    let jwks2 = jwks.clone();
    let audit = args.audit;
    let fsync = args.fsync.clone();
    let policy = args.policy;
    let mesh = LocalMesh::start(&["a", "b"], "acme", move |i, raw| {
        raw.audit.enabled = Some(audit);
        raw.audit.fsync = Some(fsync.clone());
        if i == 0 {
            // The same backend as an agent of `acme` and of `open`.
            raw.agents = ["acme", "open"]
                .iter()
                .map(|t| RawAgent {
                    tenant: t.to_string(),
                    url: url.clone(),
                    name: Some("backend".into()),
                    skills: Some(vec![RawSkill {
                        id: "echo".into(),
                        tags: vec!["echo".into()],
                        ..Default::default()
                    }]),
                    ..Default::default()
                })
                .collect();
        }
        if i == 1 && policy {
            for t in ["open", "globex"] {
                raw.ingress.push(RawIngress {
                    listen: "127.0.0.1:0".into(),
                    tenant: Some(t.into()),
                    ..Default::default()
                });
            }
        }
        if i == 1 {
            raw.ingress.push(RawIngress {
                listen: "127.0.0.1:0".into(),
                tls: Some(true),
                auth: Some(vec!["mtls".into(), "jwt".into()]),
                ..Default::default()
            });
            raw.jwt = Some(RawJwt {
                issuers: vec!["https://idp.bench".into()],
                audiences: vec!["dmsc".into()],
                jwks_file: Some(jwks2.clone()),
                ..Default::default()
            });
        }
    })
    .await?;
    let start = Instant::now();
    while !mesh.routable_everywhere("backend") {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(20),
            "mesh did not converge"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if args.policy {
        return policy_e2e(&args, mesh, backend_task).await;
    }
    let plain = mesh.ingress(1);
    let tls = mesh.nodes[1].bound().ingress[1];
    let (cert, _) = mesh.nodes[1]
        .security()
        .create_token("acme", "client", Duration::from_secs(600), None)
        .map_err(|r| anyhow::anyhow!("{}", r.reason))?;
    let enrolled = mesh.nodes[1]
        .security()
        .enroll(
            serde_json::json!({ "token": cert }).to_string().as_bytes(),
            "127.0.0.1:1".parse()?,
        )
        .map_err(|r| anyhow::anyhow!("{}", r.reason))?;
    let key = enrolled.private_key.clone().unwrap_or_default();
    let mtls_cfg = tls_client_config(&mesh.ca.cert_pem, Some((&enrolled.certificate_chain, &key)))?;
    let anon_cfg = tls_client_config(&mesh.ca.cert_pem, None)?;

    let paths = [Path::Plain, Path::Mtls, Path::Jwt(token)];
    let mut results: Vec<(f64, Vec<Duration>)> = vec![(0.0, Vec::new()); paths.len()];
    for round in 0..args.rounds {
        let mut order: Vec<usize> = (0..paths.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for &i in &order {
            let mut senders = Vec::new();
            for _ in 0..args.concurrency {
                senders.push(match &paths[i] {
                    Path::Plain => plain_connect(plain).await?,
                    Path::Mtls => tls_connect(tls, mtls_cfg.clone()).await?,
                    Path::Jwt(_) => tls_connect(tls, anon_cfg.clone()).await?,
                    Path::PolicyOff | Path::PolicyOn => unreachable!("--policy runs apart"),
                });
            }
            let (rps, lat) = run_path(senders, &paths[i], args.secs).await?;
            results[i].0 += rps / args.rounds as f64;
            results[i].1.extend(lat);
        }
    }
    println!(
        "delegation through two nodes (ingress on b -> QUIC -> a -> backend), {} keep-alive connections, closed loop, {} s x {} rounds, audit {}",
        args.concurrency,
        args.secs,
        args.rounds,
        if args.audit {
            format!("on (fsync {})", args.fsync)
        } else {
            "off".to_string()
        }
    );
    println!("| path | req/s | vs off | p50 | p99 |");
    println!("|---|---:|---:|---:|---:|");
    let base = results[0].0;
    for (p, (rps, lat)) in paths.iter().zip(results.iter_mut()) {
        lat.sort();
        println!(
            "| {} | {:.0} | {:.2}x | {} | {} |",
            p.name(),
            rps,
            *rps / base,
            us(pct(lat, 0.5)),
            us(pct(lat, 0.99))
        );
    }
    mesh.stop().await;
    backend_task.abort();
    Ok(())
}

/// `auth-e2e --policy`: the same two-node path with tenant policy off and
/// on, alternating in one run.
async fn policy_e2e(
    args: &AuthE2eArgs,
    mesh: LocalMesh,
    backend_task: tokio::task::JoinHandle<()>,
) -> anyhow::Result<()> {
    let ca = &mesh.ca;
    let docs = [
        "tenant = \"acme\"\nversion = 1\n[[export]]\nto = [\"globex\"]\nagents = [\"backend\"]\ndata_tags = [\"pii\"]\n[agents.backend]\naccepts = [\"pii\"]\n[limits.tenant]\nrps = 1000000\nburst = 1000000\n[limits.target]\nconcurrent = 100000\n",
        "tenant = \"globex\"\nversion = 1\n[[import]]\nfrom = [\"acme\"]\nagents = [\"backend\"]\ndata_tags = [\"pii\"]\n[limits.tenant]\nrps = 1000000\nburst = 1000000\n[limits.caller]\nrps = 1000000\nburst = 1000000\n",
    ];
    for doc in docs {
        let signed = dmsc_policy::SignedPolicy::sign_operator(ca, doc.as_bytes())?.to_json();
        mesh.nodes[0]
            .security()
            .apply_policy(signed.as_bytes(), "bench")
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        mesh.nodes[1]
            .security()
            .apply_policy(signed.as_bytes(), "bench")
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let start = Instant::now();
    let open = dmsc_registry::AgentId::new("open", "backend");
    while mesh.nodes[1].mesh().read().get(&open).is_none() {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(20),
            "open/backend not routable"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ingress = mesh.nodes[1].bound().ingress.clone();
    // [acme (the mesh's default), open, globex, the TLS ingress]
    let (open_in, globex_in) = (ingress[1], ingress[2]);
    let paths = [Path::PolicyOff, Path::PolicyOn];
    let mut results: Vec<(Vec<f64>, Vec<Duration>)> = vec![(Vec::new(), Vec::new()); 2];
    for round in 0..args.rounds {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let addr = if i == 0 { open_in } else { globex_in };
            let mut senders = Vec::new();
            for _ in 0..args.concurrency {
                senders.push(plain_connect(addr).await?);
            }
            let (rps, lat) = run_path(senders, &paths[i], args.secs).await?;
            results[i].0.push(rps);
            results[i].1.extend(lat);
        }
    }
    println!(
        "tenant policy off vs on through two nodes (plain ingress on b -> QUIC -> a -> backend), {} keep-alive connections, closed loop, {} s x {} rounds alternating, audit {}",
        args.concurrency,
        args.secs,
        args.rounds,
        if args.audit { "on" } else { "off" }
    );
    println!("| path | req/s per round | median req/s | vs off | p50 | p99 |");
    println!("|---|---|---:|---:|---:|---:|");
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let base = median(&results[0].0);
    for (p, (rps, lat)) in paths.iter().zip(results.iter_mut()) {
        lat.sort();
        let rounds: Vec<String> = rps.iter().map(|r| format!("{r:.0}")).collect();
        println!(
            "| {} | {} | {:.0} | {:.3}x | {} | {} |",
            p.name(),
            rounds.join(", "),
            median(rps),
            median(rps) / base,
            us(pct(lat, 0.5)),
            us(pct(lat, 0.99))
        );
    }
    mesh.stop().await;
    backend_task.abort();
    Ok(())
}
