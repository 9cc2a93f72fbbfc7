//! Security at the edge, with real TLS handshakes: enrollment with join
//! tokens, mTLS and JWT authentication at a TLS ingress, revocation spread by
//! gossip, credential rotation without restart, and the audit trail of each
//! decision.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::Bytes;
use dmsc_node::demo::mesh::LocalMesh;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;

use super::{agent, eventually};

const TD_OTHER: &str = "other.test";
pub(super) const JWT_ISS: &str = "https://idp.test";
pub(super) const JWT_AUD: &str = "dmsc";

/// Adds a TLS ingress that authenticates JWTs (issuer [`JWT_ISS`],
/// audience [`JWT_AUD`], keys from `jwks`) to a node's configuration.
pub(super) fn jwt_ingress(raw: &mut dmsc_node::RawConfig, jwks: &std::path::Path) {
    raw.ingress.push(dmsc_node::config::RawIngress {
        listen: "127.0.0.1:0".into(),
        tls: Some(true),
        auth: Some(vec!["jwt".into()]),
        ..Default::default()
    });
    raw.jwt = Some(dmsc_node::config::RawJwt {
        issuers: vec![JWT_ISS.into()],
        audiences: vec![JWT_AUD.into()],
        jwks_file: Some(jwks.to_path_buf()),
        ..Default::default()
    });
}

pub(super) fn client_config(
    ca_pem: &str,
    client: Option<(&str, &str)>,
) -> Arc<rustls::ClientConfig> {
    dmsc_node::demo::mesh::tls_client_config(ca_pem, client).expect("client config")
}

/// One request over a fresh TLS connection; returns status, headers, body.
pub(super) async fn tls_call(
    addr: std::net::SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> (StatusCode, hyper::HeaderMap, String) {
    let mut send = dmsc_node::demo::mesh::tls_connect(addr, cfg)
        .await
        .expect("TLS connection");
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(20),
        send.send_request(req.body(Full::new(body.into())).expect("request")),
    )
    .await
    .expect("answer in time")
    .expect("response");
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

/// Everything audited on node `i` so far, one JSON value per entry.
pub(super) async fn audit_entries(mesh: &LocalMesh, i: usize) -> Vec<serde_json::Value> {
    let sec = &mesh.nodes[i].security();
    sec.audit
        .as_ref()
        .expect("audit on")
        .flush()
        .await
        .expect("flush");
    let dir = mesh.node_dir(i).join("data").join("audit");
    dmsc_audit::tail(&dir, None)
        .expect("tail")
        .map(|l| {
            // Tenant payload is sealed with the tenant's key: open it.
            let mut l = l.expect("line");
            sec.open_audit_line(&mut l);
            serde_json::json!({"tenant": l.tenant, "kind": l.kind, "detail": l.detail})
        })
        .collect()
}

/// Asserts the last auth failure audited on node `i` carries `reason`.
async fn assert_audited(mesh: &LocalMesh, i: usize, kind: &str, needle: &str) {
    let entries = audit_entries(mesh, i).await;
    assert!(
        entries
            .iter()
            .any(|e| e["kind"] == kind && e["detail"].to_string().contains(needle)),
        "no `{kind}` entry containing `{needle}` in the audit log: {entries:#?}"
    );
}

/// Waits (bounded) until the wall clock is past `t`: what the node compares
/// expiry times with.
async fn until_past(t: time::OffsetDateTime) {
    let within = (t - time::OffsetDateTime::now_utc()).unsigned_abs() + Duration::from_secs(5);
    eventually(within, "the clock passes the expiry", || {
        time::OffsetDateTime::now_utc() > t
    })
    .await;
}

/// A JWKS with one P-256 key and the PKCS#8 of its private half.
pub(super) struct JwtKey {
    pkcs8: Vec<u8>,
    pub(super) jwk: serde_json::Value,
}

pub(super) fn es256_key(kid: &str) -> JwtKey {
    use ring::signature::KeyPair;
    let rng = ring::rand::SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("keygen");
    let kp = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("key");
    let point = kp.public_key().as_ref();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    JwtKey {
        pkcs8: pkcs8.as_ref().to_vec(),
        jwk: serde_json::json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        }),
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

pub(super) fn jwt(key: &JwtKey, kid: &str, claims: serde_json::Value) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_der(&key.pkcs8),
    )
    .expect("sign")
}

pub(super) fn claims(tenant: &str, aud: &str, exp_in: i64) -> serde_json::Value {
    serde_json::json!({
        "iss": JWT_ISS, "aud": aud, "sub": "billing-client", "tenant": tenant,
        "exp": now_secs() + exp_in, "nbf": now_secs() - 10, "iat": now_secs() - 10,
    })
}

/// A two-node mesh whose node 0 also has an authenticated TLS ingress
/// (mTLS and JWT), and a sample agent `billing` of tenant `acme` on node 1.
struct SecureMesh {
    mesh: LocalMesh,
    tls_ingress: std::net::SocketAddr,
    jwt_key: JwtKey,
    _jwks_dir: tempfile::TempDir,
    agent: dmsc_node::demo::sample_agent::SampleAgent,
}

async fn secure_mesh() -> SecureMesh {
    let jwks_dir = tempfile::tempdir().expect("dir");
    let jwt_key = es256_key("k1");
    let jwks_path: PathBuf = jwks_dir.path().join("jwks.json");
    std::fs::write(
        &jwks_path,
        serde_json::json!({ "keys": [jwt_key.jwk] }).to_string(),
    )
    .expect("jwks");
    let mesh = LocalMesh::start(&["n0", "n1"], "acme", |i, raw| {
        raw.gossip.interval_ms = Some(100);
        raw.delegation.health_interval_ms = Some(200);
        if i == 0 {
            raw.ingress.push(dmsc_node::config::RawIngress {
                listen: "127.0.0.1:0".into(),
                tls: Some(true),
                auth: Some(vec!["mtls".into(), "jwt".into()]),
                ..Default::default()
            });
            raw.jwt = Some(dmsc_node::config::RawJwt {
                issuers: vec![JWT_ISS.into()],
                audiences: vec![JWT_AUD.into()],
                jwks_file: Some(jwks_path.clone()),
                ..Default::default()
            });
        }
    })
    .await
    .expect("mesh");
    let billing = agent("billing", &["invoice"], "Pay invoices").await;
    mesh.attach(1, &billing.url(), None).await.expect("attach");
    eventually(Duration::from_secs(5), "billing routable", || {
        mesh.routable_everywhere("billing")
    })
    .await;
    let tls_ingress = mesh.nodes[0].bound().ingress[1];
    SecureMesh {
        mesh,
        tls_ingress,
        jwt_key,
        _jwks_dir: jwks_dir,
        agent: billing,
    }
}

fn ca_pem(mesh: &LocalMesh) -> String {
    mesh.ca.cert_pem.clone()
}

async fn enroll(m: &SecureMesh, body: serde_json::Value) -> (StatusCode, hyper::HeaderMap, String) {
    tls_call(
        m.tls_ingress,
        client_config(&ca_pem(&m.mesh), None),
        "POST",
        "localhost",
        "/v1/enroll",
        &[("content-type", "application/json")],
        body.to_string(),
    )
    .await
}

fn token(m: &SecureMesh, tenant: &str, agent: &str, ttl: Duration) -> String {
    m.mesh.nodes[0]
        .security()
        .create_token(tenant, agent, ttl, None)
        .expect("token")
        .0
}

/// Enrolls `agent` of `acme` with a fresh token; returns (chain, key) PEM.
async fn enrolled(m: &SecureMesh, agent: &str) -> (String, String, String) {
    let t = token(m, "acme", agent, Duration::from_secs(600));
    let (status, _, body) = enroll(m, serde_json::json!({ "token": t })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    (
        v["certificate_chain"].as_str().expect("chain").to_string(),
        v["private_key"].as_str().expect("key").to_string(),
        v["serial"].as_str().expect("serial").to_string(),
    )
}

async fn call_billing(
    m: &SecureMesh,
    cfg: Arc<rustls::ClientConfig>,
    headers: &[(&str, &str)],
) -> (StatusCode, hyper::HeaderMap, String) {
    tls_call(
        m.tls_ingress,
        cfg,
        "POST",
        "billing.acme.dmsc",
        "/",
        headers,
        super::message_send("pay invoice 7"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_with_valid_reused_expired_and_other_tenant_tokens() {
    let m = secure_mesh().await;

    // Valid token, node-generated key: a chain for exactly the token's identity.
    let t = token(&m, "acme", "payer", Duration::from_secs(600));
    let (status, _, body) = enroll(&m, serde_json::json!({ "token": t })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        v["spiffe_id"],
        "spiffe://mesh.dmsc.local/tenant/acme/agent/payer"
    );
    let chain = dmsc_transport::identity::certs_from_pem(
        v["certificate_chain"].as_str().expect("chain"),
        Path::new("chain"),
    )
    .expect("pem");
    assert_eq!(chain.len(), 2, "leaf and the node's issuing certificate");
    let info = dmsc_transport::identity::cert_info(&chain[0]).expect("info");
    let left = info
        .not_after
        .duration_since(SystemTime::now())
        .expect("valid");
    assert!(
        left <= Duration::from_secs(24 * 3600) && left > Duration::from_secs(23 * 3600),
        "24 h by default, got {left:?}"
    );
    assert!(v["private_key"].as_str().is_some());
    assert_audited(&m.mesh, 0, "enrollment", &info.serial_hex).await;

    // Reused: refused, and says so.
    let (status, headers, body) = enroll(&m, serde_json::json!({ "token": t })).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("already used"), "{body}");
    assert_eq!(headers["dmsc-auth-error"], "token_used");
    assert_audited(&m.mesh, 0, "auth_failure", "already used").await;

    // Expired: presented once the clock is past its expiry (the node
    // refuses at `now >= expires_at`).
    let (t, info) = m.mesh.nodes[0]
        .security()
        .create_token("acme", "late", Duration::from_secs(1), None)
        .expect("token");
    until_past(info.expires_at).await;
    let (status, _, body) = enroll(&m, serde_json::json!({ "token": t })).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("expired"), "{body}");
    assert_audited(&m.mesh, 0, "auth_failure", "expired").await;

    // A token of tenant acme presented for tenant globex: refused, not consumed.
    let t = token(&m, "acme", "payer2", Duration::from_secs(600));
    let (status, _, body) = enroll(
        &m,
        serde_json::json!({ "token": t, "tenant": "globex", "agent": "payer2" }),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body.contains("is for tenant `acme`, not `globex`"),
        "{body}"
    );
    assert_audited(&m.mesh, 0, "auth_failure", "not `globex`").await;
    // A broken CSR is refused before the token is spent.
    let bad_csr = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n";
    let (status, _, body) = enroll(&m, serde_json::json!({ "token": t, "csr": bad_csr })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // With a CSR this time: the key never leaves the agent, the identity is
    // the token's whatever the CSR asks for.
    let kp = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["evil.example".to_string()]).expect("p");
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params
        .serialize_request(&kp)
        .expect("csr")
        .pem()
        .expect("pem");
    let (status, _, body) = enroll(&m, serde_json::json!({ "token": t, "csr": csr })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert!(v.get("private_key").is_none(), "no key when a CSR was sent");
    assert_eq!(
        v["spiffe_id"],
        "spiffe://mesh.dmsc.local/tenant/acme/agent/payer2"
    );
    // Junk token.
    let (status, _, body) = enroll(&m, serde_json::json!({ "token": "nope" })).await;
    assert!(status.is_client_error(), "{status} {body}");

    // Renewal with the current certificate: a new serial for the same
    // identity, audited with the serial it renewed; without one: 401.
    let (chain, key, serial) = enrolled(&m, "renewer").await;
    let ca = ca_pem(&m.mesh);
    let (status, _, body) = tls_call(
        m.tls_ingress,
        client_config(&ca, Some((&chain, &key))),
        "POST",
        "localhost",
        "/v1/renew",
        &[],
        "{}",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        v["spiffe_id"],
        "spiffe://mesh.dmsc.local/tenant/acme/agent/renewer"
    );
    assert_ne!(v["serial"], serial.as_str());
    let (renewed_chain, renewed_key) = (
        v["certificate_chain"].as_str().expect("chain").to_string(),
        v["private_key"].as_str().expect("key").to_string(),
    );
    let renewed = client_config(&ca, Some((&renewed_chain, &renewed_key)));
    let (status, _, body) = call_billing(&m, renewed.clone(), &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Revoking the certificate that was renewed (say it was stolen and the
    // thief renewed first) revokes the renewal too.
    let rev = dmsc_transport::Revocation::sign(&m.mesh.ca, &serial, "stolen").expect("sign");
    dmsc_node::ops::revoke_apply(
        m.mesh.nodes[0].bound().admin,
        &m.mesh.admin_token(0),
        rev.to_json(),
    )
    .await
    .expect("apply");
    let (status, _, body) = call_billing(&m, renewed, &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("is revoked"), "{body}");
    assert_audited(
        &m.mesh,
        0,
        "enrollment",
        &format!("\"renewal\":\"{serial}\""),
    )
    .await;
    let (status, _, body) = tls_call(
        m.tls_ingress,
        client_config(&ca, None),
        "POST",
        "localhost",
        "/v1/renew",
        &[],
        "{}",
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    m.mesh.stop().await;
}

/// Signs a leaf with node 0's issuing key directly (what a buggy or hostile
/// issuer could produce), with the given SPIFFE ID and validity.
fn leaf_from_issuer(
    dir: &Path,
    spiffe: &str,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> (String, String) {
    let issuer_pem = std::fs::read_to_string(dir.join("issuer.pem")).expect("issuer");
    let issuer_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.join("issuer.key")).expect("key"))
            .expect("key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&issuer_pem, &issuer_key).expect("issuer");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(spiffe.try_into().expect("uri"))];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params.signed_by(&key, &issuer).expect("sign");
    (format!("{}{issuer_pem}", cert.pem()), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_ingress_valid_expired_revoked_wrong_ca_and_other_trust_domain() {
    let m = secure_mesh().await;
    let ca = ca_pem(&m.mesh);

    // Valid: reaches the agent on the other node; the caller is the agent identity.
    let (chain, key, serial) = enrolled(&m, "payer").await;
    let good = client_config(&ca, Some((&chain, &key)));
    let (status, headers, body) =
        call_billing(&m, good.clone(), &[("dmsc-caller", "forged")]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["dmsc-agent"], "acme/billing");
    // The agent (on node 1) hears the verified caller from the node.
    let seen = m.agent.state.last_headers().expect("agent saw the call");
    assert_eq!(
        seen["dmsc-caller"],
        "spiffe://mesh.dmsc.local/tenant/acme/agent/payer"
    );
    assert_eq!(seen["dmsc-caller-tenant"], "acme");
    assert_audited(
        &m.mesh,
        0,
        "delegation",
        "spiffe://mesh.dmsc.local/tenant/acme/agent/payer",
    )
    .await;

    // The serving node keeps its own record of the same delegation.
    assert_audited(&m.mesh, 1, "delegation", "(via node n0)").await;

    // No credentials at all: 401 with what to present.
    let (status, headers, body) = call_billing(&m, client_config(&ca, None), &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("no credentials"), "{body}");
    assert!(headers.contains_key("www-authenticate"));

    // Another tenant's address with a valid certificate: 403, audited as a denial.
    let (status, _, body) = tls_call(
        m.tls_ingress,
        good.clone(),
        "POST",
        "billing.globex.dmsc",
        "/",
        &[],
        "{}",
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_audited(&m.mesh, 0, "denied", "billing.globex.dmsc").await;

    // Expired (signed by the real issuer, validity in the past).
    let now = time::OffsetDateTime::now_utc();
    let dir = m.mesh.node_dir(0);
    let (c, k) = leaf_from_issuer(
        &dir,
        "spiffe://mesh.dmsc.local/tenant/acme/agent/old",
        now - time::Duration::days(3),
        now - time::Duration::days(1),
    );
    let (status, _, body) = call_billing(&m, client_config(&ca, Some((&c, &k))), &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("has expired"), "{body}");
    assert_audited(&m.mesh, 0, "auth_failure", "has expired").await;

    // A certificate that expires while its connection stays open: the next
    // request on that same connection is refused. Its 4 s leave a loaded
    // machine time for the handshake and the first request.
    let expiry = time::OffsetDateTime::now_utc() + time::Duration::seconds(4);
    let (c, k) = leaf_from_issuer(
        &dir,
        "spiffe://mesh.dmsc.local/tenant/acme/agent/brief",
        now - time::Duration::hours(1),
        expiry,
    );
    let mut conn =
        dmsc_node::demo::mesh::tls_connect(m.tls_ingress, client_config(&ca, Some((&c, &k))))
            .await
            .expect("connect");
    let req = || {
        hyper::Request::post("/")
            .header("host", "billing.acme.dmsc")
            .body(Full::new(Bytes::from(super::message_send("hi"))))
            .expect("request")
    };
    let first = conn.send_request(req()).await.expect("first");
    assert_eq!(first.status(), StatusCode::OK);
    first.into_body().collect().await.expect("body");
    until_past(expiry).await;
    let second = conn.send_request(req()).await.expect("second");
    assert_eq!(second.status(), StatusCode::UNAUTHORIZED);
    let body = second.into_body().collect().await.expect("body").to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("has expired"));

    // Other trust domain, chained to our own CA: the SPIFFE check refuses it.
    let (c, k) = leaf_from_issuer(
        &dir,
        &format!("spiffe://{TD_OTHER}/tenant/acme/agent/alien"),
        now - time::Duration::hours(1),
        now + time::Duration::hours(1),
    );
    let (status, _, body) = call_billing(&m, client_config(&ca, Some((&c, &k))), &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("trust domain `other.test`"), "{body}");
    assert_audited(&m.mesh, 0, "auth_failure", "trust domain `other.test`").await;

    // Wrong CA: a complete, valid chain from another mesh's CA.
    let other = dmsc_transport::pki::CertificateAuthority::generate("mesh.dmsc.local").expect("ca");
    let creds = other
        .issue_node_credentials("x", dmsc_transport::pki::NODE_VALIDITY, &[])
        .expect("creds");
    let foreign =
        dmsc_transport::pki::NodeIssuer::load_pem(&creds.issuer.cert_pem, &creds.issuer.key_pem)
            .expect("issuer")
            .issue_agent(
                "acme",
                "payer",
                dmsc_transport::pki::AgentKey::Generate,
                Duration::from_secs(3600),
            )
            .expect("agent");
    let fkey = foreign.key_pem.clone().expect("key");
    let (status, _, body) = call_billing(
        &m,
        client_config(&ca, Some((&foreign.chain_pem, &fkey))),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("is not from this mesh"), "{body}");
    assert_audited(&m.mesh, 0, "auth_failure", "is not from this mesh").await;

    // Revoked: the operator signs, node 0 applies, gossip spreads it. A
    // connection opened before is refused on its next request too.
    let mut open = dmsc_node::demo::mesh::tls_connect(m.tls_ingress, good.clone())
        .await
        .expect("connect");
    let before = open.send_request(req()).await.expect("before");
    assert_eq!(before.status(), StatusCode::OK);
    before.into_body().collect().await.expect("body");
    let rev =
        dmsc_transport::Revocation::sign(&m.mesh.ca, &serial, "key-compromise").expect("sign");
    let v = dmsc_node::ops::revoke_apply(
        m.mesh.nodes[0].bound().admin,
        &m.mesh.admin_token(0),
        rev.to_json(),
    )
    .await
    .expect("apply");
    assert_eq!(v["new"], true);
    let after = open.send_request(req()).await.expect("after");
    assert_eq!(after.status(), StatusCode::UNAUTHORIZED);
    let body = after.into_body().collect().await.expect("body").to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("is revoked"));
    // And a new connection with it is refused as well.
    let (status, headers, body) = call_billing(&m, good, &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("revoked"), "{body}");
    // The same code as on the open connection (it was `cert_refused`).
    assert_eq!(headers["dmsc-auth-error"], "cert_revoked");
    // Both refusals are in the tenant's audit trail: the chain refused at
    // the handshake verified in every other respect, so its tenant is known.
    let revoked_refusals: Vec<_> = audit_entries(&m.mesh, 0)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "auth_failure" && e["detail"].to_string().contains("is revoked"))
        .collect();
    assert_eq!(revoked_refusals.len(), 2, "{revoked_refusals:#?}");
    assert!(
        revoked_refusals.iter().all(|e| e["tenant"] == "acme"),
        "{revoked_refusals:#?}"
    );
    assert_audited(&m.mesh, 0, "revocation", &serial).await;
    eventually(Duration::from_secs(5), "revocation reaches node 1", || {
        m.mesh.nodes[1].security().revoked.get(&serial).is_some()
    })
    .await;
    // And node 1 persisted it (written just after it is in force).
    let path = m.mesh.node_dir(1).join("data").join("revoked.jsonl");
    eventually(
        Duration::from_secs(5),
        "node 1 persisted the revocation",
        || std::fs::read_to_string(&path).is_ok_and(|p| p.contains(&serial)),
    )
    .await;
    m.mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_valid_expired_wrong_audience_wrong_key_and_alg_none() {
    let m = secure_mesh().await;
    let ca = ca_pem(&m.mesh);
    let plain = client_config(&ca, None);
    let bearer = |t: &str| format!("Bearer {t}");

    let ok = jwt(&m.jwt_key, "k1", claims("acme", JWT_AUD, 300));
    let (status, headers, body) =
        call_billing(&m, plain.clone(), &[("authorization", &bearer(&ok))]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["dmsc-agent"], "acme/billing");
    assert_audited(
        &m.mesh,
        0,
        "delegation",
        "jwt:https://idp.test#billing-client",
    )
    .await;
    // The mesh consumed the bearer token: the agent never saw it.
    let st = &m.agent.state;
    assert!(st.served.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    assert_eq!(
        st.saw_authorization
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    // It hears who called from the node: the token's issuer and subject.
    let seen = st.last_headers().expect("agent saw the call");
    assert_eq!(seen["dmsc-caller"], "jwt:https://idp.test#billing-client");
    assert_eq!(seen["dmsc-caller-tenant"], "acme");

    // Each refusal: 401, the reason in the body and in the audit log, and
    // the agent never sees the request.
    let served_before = m.mesh.nodes[0].metrics().delegation.total();
    let other_key = es256_key("k1");
    let header =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(claims("acme", JWT_AUD, 300).to_string());
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            jwt(&m.jwt_key, "k1", claims("acme", JWT_AUD, -3600)),
            "expired",
        ),
        (
            "wrong audience",
            jwt(&m.jwt_key, "k1", claims("acme", "someone-else", 300)),
            "audience `someone-else` is not accepted",
        ),
        (
            "wrong key",
            jwt(&other_key, "k1", claims("acme", JWT_AUD, 300)),
            "signature does not verify",
        ),
        (
            "alg none",
            format!("{header}.{payload}."),
            "algorithm `none` is not accepted",
        ),
    ];
    // No token at all: 401 with a bare challenge (RFC 6750 3.1: no error
    // code for a request that carried no credentials).
    let (status, headers, body) = call_billing(&m, plain.clone(), &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(headers["www-authenticate"], "Bearer");
    for (what, token, reason) in cases {
        let (status, headers, body) =
            call_billing(&m, plain.clone(), &[("authorization", &bearer(&token))]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert!(body.contains(reason), "{what}: `{reason}` not in {body}");
        assert!(
            headers["www-authenticate"]
                .to_str()
                .unwrap_or_default()
                .contains("invalid_token"),
            "{what}"
        );
        assert_audited(&m.mesh, 0, "auth_failure", reason).await;
    }
    assert_eq!(
        m.mesh.nodes[0].metrics().delegation.total(),
        served_before,
        "no refused request was delegated"
    );
    let metrics = m.mesh.nodes[0].metrics_text().await;
    assert!(
        metrics.contains("dmsc_auth_failures_total{method=\"jwt\"} 4"),
        "{metrics}"
    );

    // A valid token of another tenant cannot reach acme's agent.
    let globex = jwt(&m.jwt_key, "k1", claims("globex", JWT_AUD, 300));
    let (status, _, body) = call_billing(&m, plain, &[("authorization", &bearer(&globex))]).await;
    assert_eq!(
        super::refusal_kind(status, &body).as_deref(),
        Some("forbidden"),
        "{body}"
    );
    assert!(body.contains("tenant `globex`"), "{body}");
    m.mesh.stop().await;
}

fn has_peer(mesh: &LocalMesh, i: usize, name: &str) -> bool {
    mesh.nodes[i]
        .overlay()
        .peers()
        .iter()
        .any(|p| p.name == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_certificate_is_refused_by_every_node_and_its_connections_closed() {
    let mesh = LocalMesh::start(&["n0", "n1", "n2"], "acme", |_, raw| {
        raw.gossip.interval_ms = Some(100);
    })
    .await
    .expect("mesh");
    eventually(Duration::from_secs(10), "n2 connected to n0 and n1", || {
        has_peer(&mesh, 0, "n2") && has_peer(&mesh, 1, "n2")
    })
    .await;
    let serial = mesh.nodes[2].security().identity().info.serial_hex.clone();
    let rev =
        dmsc_transport::Revocation::sign(&mesh.ca, &serial, "node decommissioned").expect("sign");
    let t0 = std::time::Instant::now();
    dmsc_node::ops::revoke_apply(
        mesh.nodes[0].bound().admin,
        &mesh.admin_token(0),
        rev.to_json(),
    )
    .await
    .expect("apply");
    // Gossip convergence for 3 nodes at 100 ms takes well under a second;
    // the bound is only a sanity limit (how fast is measured in BENCHMARKS.md).
    eventually(Duration::from_secs(30), "n2 cut off by n0 and n1", || {
        !has_peer(&mesh, 0, "n2")
            && !has_peer(&mesh, 1, "n2")
            && mesh.nodes[1].security().revoked.get(&serial).is_some()
    })
    .await;
    let took = t0.elapsed();
    eprintln!("revoked node cut off mesh-wide in {took:?}");
    // It stays out: n2 keeps redialing (its gossip still knows the others)
    // and every handshake is refused, both ways. Wait until n0 and n1 each
    // refused another handshake since, then look.
    let refused = |i: usize| {
        let s = mesh.nodes[i].overlay().stats();
        s.handshakes_failed_inbound.load(Ordering::Relaxed)
            + s.handshakes_failed_outbound.load(Ordering::Relaxed)
    };
    let (r0, r1) = (refused(0), refused(1));
    eventually(Duration::from_secs(30), "n0 and n1 refuse n2 again", || {
        refused(0) > r0 && refused(1) > r1
    })
    .await;
    assert!(!has_peer(&mesh, 0, "n2") && !has_peer(&mesh, 1, "n2"));
    let n2 = &mesh.nodes[2].overlay();
    assert!(n2.connect(mesh.nodes[1].bound().overlay).await.is_err());
    assert!(mesh.nodes[1]
        .overlay()
        .connect(mesh.nodes[2].bound().overlay)
        .await
        .is_err());
    // n0 and n1 still talk to each other.
    assert!(has_peer(&mesh, 0, "n1") || has_peer(&mesh, 1, "n0"));
    assert_audited(&mesh, 1, "revocation", &serial).await;
    // The revoked node itself, told too, says so in `check`.
    let _ = dmsc_node::ops::revoke_apply(
        mesh.nodes[2].bound().admin,
        &mesh.admin_token(2),
        rev.to_json(),
    )
    .await;
    let findings = dmsc_node::ops::check(
        mesh.nodes[2].config(),
        mesh.nodes[2].bound().admin,
        Duration::from_secs(1),
    )
    .await;
    assert!(
        findings
            .iter()
            .any(|f| !f.ok && f.line.contains("own certificate") && f.line.contains(&serial)),
        "{findings:?}"
    );
    mesh.stop().await;
}

/// Replaces a file atomically (write beside, rename), as an operator's
/// deployment tool or cert-manager would.
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_node_certificate_is_used_without_restart_or_failed_delegations() {
    let mut mesh = LocalMesh::start(&["n0", "n1"], "acme", |_, raw| {
        raw.gossip.interval_ms = Some(100);
        raw.delegation.health_interval_ms = Some(200);
        raw.tls.reload_interval_ms = Some(100);
    })
    .await
    .expect("mesh");
    let billing = agent("billing", &["invoice"], "Pay invoices").await;
    mesh.attach(1, &billing.url(), None).await.expect("attach");
    eventually(Duration::from_secs(5), "billing routable", || {
        mesh.routable_everywhere("billing")
    })
    .await;
    let old = mesh.nodes[1].security().identity().info.serial_hex.clone();
    let link = |mesh: &LocalMesh| {
        mesh.nodes[0]
            .overlay()
            .peers()
            .into_iter()
            .find(|p| p.name == "n1")
            .expect("n0-n1 link")
    };
    // Warm the n0 -> n1 path, then remember that connection.
    let (r, body) = mesh
        .call(
            0,
            "POST",
            "billing.acme.dmsc",
            "/",
            &[],
            super::message_send("warm"),
        )
        .await
        .expect("call");
    assert_eq!(r.status(), 200, "{body:?}");
    let before = link(&mesh);
    assert_eq!(before.serial, old);

    // Delegations run before, while and after node 1's certificate is
    // replaced on disk: the load runs until n1 applied the new one and then
    // some, and the files are replaced once the load is under way.
    let sec = mesh.nodes[1].security();
    let reloads_before = sec.reloads();
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let (mesh_ref, calls_ref) = (&mesh, &calls);
    let load = async move {
        let mut failures = Vec::new();
        let (mut before, mut after) = (0, 0);
        let start = std::time::Instant::now();
        while after < 10 {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "n1 did not reload its credentials under load"
            );
            let reloaded = sec.reloads() > reloads_before;
            match mesh_ref
                .call(
                    0,
                    "POST",
                    "billing.acme.dmsc",
                    "/",
                    &[],
                    super::message_send(&format!("r{}", before + after)),
                )
                .await
            {
                Ok((r, _)) if r.status() == 200 => {}
                Ok((r, b)) => failures.push(format!("{}: {:?}", r.status(), b)),
                Err(e) => failures.push(e.to_string()),
            }
            if reloaded {
                after += 1;
            } else {
                before += 1;
            }
            calls_ref.fetch_add(1, Ordering::Relaxed);
        }
        (failures, before)
    };
    let rotate = async {
        eventually(Duration::from_secs(30), "load under way", || {
            calls.load(Ordering::Relaxed) >= 5
        })
        .await;
        let dir = mesh_ref.node_dir(1);
        let fresh = mesh_ref
            .ca
            .issue_node_credentials(
                "n1",
                dmsc_transport::pki::NODE_VALIDITY,
                &["localhost".into()],
            )
            .expect("issue");
        replace(&dir.join("node.key"), &fresh.node.key_pem);
        replace(&dir.join("node.pem"), &fresh.node.cert_pem);
        fresh
    };
    let ((failures, before_reload), fresh) = tokio::join!(load, rotate);
    assert!(
        failures.is_empty(),
        "delegations failed during rotation: {failures:?}"
    );
    assert!(
        before_reload >= 5,
        "{before_reload} delegations before the reload"
    );
    assert_ne!(sec.identity().info.serial_hex, old, "n1 reloaded");
    let new = sec.identity().info.serial_hex.clone();
    assert!(sec.reloads() >= 1);
    assert!(fresh.node.cert_pem.contains("BEGIN CERTIFICATE"));
    // The existing connection was not dropped...
    let after = link(&mesh);
    assert_eq!(after.since, before.since, "the n0-n1 connection was kept");
    assert_eq!(
        after.serial, old,
        "it still carries the handshake's certificate"
    );
    // A certificate from another CA is not applied (peers would refuse it).
    let rogue = dmsc_transport::pki::CertificateAuthority::generate("mesh.dmsc.local")
        .expect("ca")
        .issue_node("n1", dmsc_transport::pki::NODE_VALIDITY)
        .expect("issue");
    let dir = mesh.node_dir(1);
    let (good_key, good_cert) = (
        std::fs::read_to_string(dir.join("node.key")).expect("key"),
        std::fs::read_to_string(dir.join("node.pem")).expect("cert"),
    );
    let (refused, reloads) = (sec.metrics.reloads_refused.get(), sec.reloads());
    replace(&dir.join("node.key"), &rogue.key_pem);
    replace(&dir.join("node.pem"), &rogue.cert_pem);
    eventually(Duration::from_secs(10), "n1 judged the rogue files", || {
        sec.metrics.reloads_refused.get() > refused
    })
    .await;
    assert_eq!(
        sec.identity().info.serial_hex,
        new,
        "an unusable certificate is not applied"
    );
    assert_eq!(sec.reloads(), reloads, "nothing was reloaded");
    replace(&dir.join("node.key"), &good_key);
    replace(&dir.join("node.pem"), &good_cert);
    // ...and a new connection sees the new certificate.
    let n2 = mesh
        .join("n2", |raw| raw.gossip.interval_ms = Some(100))
        .await
        .expect("join");
    let n1_addr = mesh.nodes[1].bound().overlay;
    assert_eq!(
        mesh.nodes[n2]
            .overlay()
            .connect(n1_addr)
            .await
            .expect("n2 to n1"),
        "n1"
    );
    let seen = mesh.nodes[n2]
        .overlay()
        .peers()
        .into_iter()
        .find(|p| p.name == "n1")
        .expect("n2-n1 link")
        .serial;
    assert_eq!(seen, new, "new connections present the rotated certificate");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_persist_and_reach_a_node_that_was_away_even_after_their_origin_left() {
    let mut mesh = LocalMesh::start(&["n0", "n1", "n2"], "acme", |_, raw| {
        raw.gossip.interval_ms = Some(100);
    })
    .await
    .expect("mesh");
    eventually(Duration::from_secs(10), "all connected", || {
        has_peer(&mesh, 0, "n1") && has_peer(&mesh, 0, "n2")
    })
    .await;
    // n2 goes away; the operator revokes a certificate through n0.
    mesh.nodes.remove(2).stop().await;
    let rev = dmsc_transport::Revocation::sign(&mesh.ca, "5eed", "lost laptop").expect("sign");
    dmsc_node::ops::revoke_apply(
        mesh.nodes[0].bound().admin,
        &mesh.admin_token(0),
        rev.to_json(),
    )
    .await
    .expect("apply");
    eventually(Duration::from_secs(5), "n1 learns it", || {
        mesh.nodes[1].security().revoked.get("5eed").is_some()
    })
    .await;
    // The node that published it leaves too: n1 re-published it.
    mesh.nodes.remove(0).stop().await;
    // n2 comes back (same data directory, new process state).
    let n2 = mesh
        .join("n2", |raw| raw.gossip.interval_ms = Some(100))
        .await
        .expect("rejoin");
    eventually(
        Duration::from_secs(10),
        "the returning node learns it",
        || mesh.nodes[n2].security().revoked.get("5eed").is_some(),
    )
    .await;
    let persisted = mesh.node_dir(n2).join("data").join("revoked.jsonl");
    eventually(Duration::from_secs(5), "persisted on n2", || {
        std::fs::read_to_string(&persisted).is_ok_and(|t| t.contains("5eed"))
    })
    .await;
    // A restart loads it from disk before any gossip.
    mesh.nodes.remove(n2).stop().await;
    let alone = mesh
        .join("n2", |raw| raw.overlay.bootstrap = None)
        .await
        .expect("restart");
    assert!(
        mesh.nodes[alone].security().revoked.get("5eed").is_some(),
        "loaded from revoked.jsonl at start"
    );
    mesh.stop().await;
}

/// Starts one more node, bootstrapping through node 0, whose certificate is
/// scoped to `scope` (`ca issue-node --tenant`; empty: unscoped), with one
/// unauthenticated ingress for `ingress_tenant`; returns its index.
async fn join_node(
    mesh: &mut LocalMesh,
    name: &str,
    scope: &[&str],
    ingress_tenant: &str,
) -> usize {
    let dir = mesh.dir.path().join(name);
    let scope: Vec<String> = scope.iter().map(|t| t.to_string()).collect();
    mesh.ca
        .issue_node_credentials_for(
            name,
            dmsc_transport::pki::NODE_VALIDITY,
            &["localhost".into()],
            &scope,
        )
        .expect("issue")
        .write_dir(&dir, &mesh.ca.cert_pem)
        .expect("write");
    let mut raw = dmsc_node::RawConfig::loopback(name, &dir, Some(mesh.nodes[0].bound().overlay));
    raw.gossip.interval_ms = Some(100);
    raw.delegation.health_interval_ms = Some(200);
    raw.ingress = vec![dmsc_node::config::RawIngress {
        listen: "127.0.0.1:0".into(),
        tenant: Some(ingress_tenant.into()),
        ..Default::default()
    }];
    let app = dmsc_node::App::build(raw.validate().expect("config"))
        .await
        .expect("node");
    mesh.nodes.push(app);
    mesh.nodes.len() - 1
}

/// Attaches `agent` as an agent of `tenant` to node `i`.
pub(super) async fn attach_for(
    mesh: &LocalMesh,
    i: usize,
    tenant: &str,
    agent: &dmsc_node::demo::sample_agent::SampleAgent,
) {
    mesh.nodes[i]
        .agents()
        .add(&dmsc_node::config::RawAgent {
            tenant: tenant.into(),
            url: agent.url(),
            ..Default::default()
        })
        .await
        .expect("attach");
}

fn routable(mesh: &LocalMesh, i: usize, tenant: &str, agent: &str) -> bool {
    let id = dmsc_registry::AgentId {
        tenant: tenant.into(),
        name: agent.into(),
    };
    mesh.nodes[i].mesh().read().get(&id).is_some()
}

/// The audit entries of node `i` of `kind` whose caller is `caller`.
async fn audited_for(
    mesh: &LocalMesh,
    i: usize,
    kind: &str,
    caller: &str,
) -> Vec<serde_json::Value> {
    audit_entries(mesh, i)
        .await
        .into_iter()
        .filter(|e| e["kind"] == kind && e["detail"]["caller"] == caller)
        .collect()
}

/// A node whose certificate is scoped to `acme` but whose ingress serves
/// tenant `other` (misconfigured, or compromised and forging heads on the
/// overlay) cannot reach `other`'s agents: the home node judges the tenant
/// by the calling node's certificate, answers 403 with the reason, delivers
/// nothing, and both nodes audit the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_scoped_node_cannot_act_for_another_tenant_on_the_overlay() {
    let mut mesh = LocalMesh::start(&["home"], "acme", |_, raw| {
        raw.gossip.interval_ms = Some(100);
        raw.delegation.health_interval_ms = Some(200);
    })
    .await
    .expect("mesh");
    let ledger = agent("ledger", &["books"], "Keep the books").await;
    attach_for(&mesh, 0, "other", &ledger).await;
    let rogue = join_node(&mut mesh, "rogue", &["acme"], "other").await;
    eventually(
        Duration::from_secs(10),
        "rogue routes to other/ledger",
        || routable(&mesh, rogue, "other", "ledger"),
    )
    .await;

    // 1. Through the rogue node's ingress: its own check passes (the
    // listener's tenant is `other`), the home node's does not.
    let (resp, body) = mesh
        .call(
            rogue,
            "POST",
            "ledger.other.dmsc",
            "/",
            &[],
            super::message_send("pay"),
        )
        .await
        .expect("call");
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(
        super::refusal_kind(resp.status(), &body).as_deref(),
        Some("forbidden"),
        "{body}"
    );
    assert_eq!(super::header(&resp, "dmsc-error"), "forbidden");
    for needle in ["node `rogue`", "tenants `acme`", "not for tenant `other`"] {
        assert!(body.contains(needle), "`{needle}` missing from: {body}");
    }
    let caller = format!("ingress:{}", mesh.ingress(rogue));
    let home_denied = audited_for(&mesh, 0, "denied", &format!("{caller} (via node rogue)")).await;
    assert_eq!(home_denied.len(), 1, "{home_denied:#?}");
    assert_eq!(home_denied[0]["tenant"], "other");
    assert!(home_denied[0]["detail"]["reason"]
        .to_string()
        .contains("node `rogue` may act only for tenants `acme`"));
    let rogue_denied = audited_for(&mesh, rogue, "denied", &caller).await;
    assert_eq!(rogue_denied.len(), 1, "{rogue_denied:#?}");
    assert!(rogue_denied[0]["detail"]["reason"]
        .to_string()
        .contains("home node `home` refused"));
    let rogue_delegations = audited_for(&mesh, rogue, "delegation", &caller).await;
    assert_eq!(
        rogue_delegations.len(),
        1,
        "one attempt, not retried: {rogue_delegations:#?}"
    );
    assert_eq!(rogue_delegations[0]["detail"]["outcome"], "forbidden");
    assert_eq!(rogue_delegations[0]["detail"]["status"], 403);

    // 2. A head forged directly on the rogue node's overlay connection, in
    // the current wire version (a typed failure comes back) and in version 1
    // (what a node before the bump reads: the refusal rendered as a body);
    // then one for a tenant nobody hosts.
    let current = dmsc_node::proto::wire::DELEGATION_VERSION;
    for (version, tenant) in [(current, "other"), (1, "other"), (current, "made-up")] {
        let overlay = &mesh.nodes[rogue].overlay();
        let mut stream = overlay
            .open_stream(
                mesh.nodes[0].bound().overlay,
                dmsc_transport::Channel::Delegate,
            )
            .await
            .expect("stream");
        let head = dmsc_node::proto::wire::RequestHead {
            version,
            tenant: tenant.into(),
            caller: "spiffe://mesh.dmsc.local/tenant/other/agent/forger".into(),
            agent: "ledger".into(),
            deadline_ms: 5000,
            trace_id: "forged".into(),
            method: "POST".into(),
            path: "/".into(),
            http: 1,
            headers: Default::default(),
            empty_body: true,
            caller_tenant: tenant.into(),
            data_tags: Vec::new(),
        };
        let mut parts = dmsc_node::proto::wire::encode_request_head(head.as_ref())
            .expect("encode")
            .to_vec();
        stream.send.write_chunks(&mut parts).await.expect("write");
        stream.send.finish().expect("finish");
        let mut decoder = dmsc_node::proto::wire::PartDecoder::new();
        let mut parts = Vec::new();
        let read = async {
            while let Some(chunk) = stream.recv.read_chunk(64 * 1024).await.expect("read") {
                decoder.push(&chunk);
                while let Some(p) = decoder.next_part().expect("part") {
                    parts.push(p);
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("answer in time");
        let Some(dmsc_node::proto::wire::Part::Head(h)) = parts.first() else {
            panic!("no response head: {parts:?}");
        };
        let h = dmsc_node::proto::wire::decode_response_head(h).expect("response head");
        assert_eq!((h.version, h.status), (version, 403));
        assert!(!h.delivered, "refused before the agent");
        let reason = "node `rogue` may act only for tenants `acme`";
        if version >= 2 {
            // Typed: kind, reason and deciding node; no body to parse.
            let failure = h.failure.expect("a typed failure");
            assert_eq!(
                (failure.kind.as_str(), failure.node.as_str()),
                ("forbidden", "home")
            );
            assert!(failure.detail.contains(reason), "{failure:?}");
            assert_eq!(parts.len(), 1, "no body after a typed failure: {parts:?}");
        } else {
            assert!(h.failure.is_none());
            let body: Vec<u8> = parts
                .iter()
                .filter_map(|p| match p {
                    dmsc_node::proto::wire::Part::Data(d) => Some(d.to_vec()),
                    _ => None,
                })
                .flatten()
                .collect();
            let body = String::from_utf8_lossy(&body);
            assert!(body.contains(reason), "{body}");
        }
    }
    let forged = audited_for(
        &mesh,
        0,
        "denied",
        "spiffe://mesh.dmsc.local/tenant/other/agent/forger (via node rogue)",
    )
    .await;
    assert_eq!(forged.len(), 3, "one per forged head: {forged:#?}");
    // The inbound counter is labelled by tenant for the agents the node
    // hosts; a made-up tenant name adds no label set.
    let inbound = &mesh.nodes[0].metrics().delegation.inbound;
    let count = |tenant: &str| {
        inbound
            .get(&dmsc_node::metrics::DelegationLabels {
                tenant: tenant.into(),
                outcome: "forbidden".into(),
            })
            .map(|c| c.get())
    };
    assert_eq!(count("other"), Some(3), "step 1 and the two forged heads");
    assert_eq!(count("made-up"), None);
    assert_eq!(count(dmsc_node::metrics::OTHER_TENANT), Some(1));

    assert_eq!(
        ledger
            .state
            .served
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the agent never saw a request"
    );
    mesh.stop().await;
}

/// Scopes take nothing away from the nodes that keep to them: a node scoped
/// to `acme` reaches `acme`'s agents on other nodes, and a node without a
/// scope reaches any tenant's, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_nodes_reach_their_tenants_and_unscoped_nodes_any() {
    let mut mesh = LocalMesh::start(&["home"], "acme", |_, raw| {
        raw.gossip.interval_ms = Some(100);
        raw.delegation.health_interval_ms = Some(200);
    })
    .await
    .expect("mesh");
    let billing = agent("billing", &["invoice"], "Pay invoices").await;
    attach_for(&mesh, 0, "acme", &billing).await;
    let ledger = agent("ledger", &["books"], "Keep the books").await;
    attach_for(&mesh, 0, "other", &ledger).await;
    let member = join_node(&mut mesh, "member", &["acme", "beta"], "acme").await;
    let open = join_node(&mut mesh, "open", &[], "other").await;
    eventually(Duration::from_secs(10), "routable from both", || {
        routable(&mesh, member, "acme", "billing") && routable(&mesh, open, "other", "ledger")
    })
    .await;
    let (resp, body) = mesh
        .call(
            member,
            "POST",
            "billing.acme.dmsc",
            "/",
            &[],
            super::message_send("pay"),
        )
        .await
        .expect("call");
    assert_eq!(resp.status(), StatusCode::OK, "{body:?}");
    assert_eq!(super::header(&resp, "dmsc-node"), "home");
    let (resp, body) = mesh
        .call(
            open,
            "POST",
            "ledger.other.dmsc",
            "/",
            &[],
            super::message_send("book"),
        )
        .await
        .expect("call");
    assert_eq!(resp.status(), StatusCode::OK, "{body:?}");
    assert_eq!(super::header(&resp, "dmsc-node"), "home");
    let served = |a: &dmsc_node::demo::sample_agent::SampleAgent| {
        a.state.served.load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!((served(&billing), served(&ledger)), (1, 1));
    mesh.stop().await;
}

/// A listener that serves several tenants splits its in-flight budget: one
/// tenant holding every slot it may gets its next request shed, while
/// another tenant's request still goes through (without the split, the
/// first tenant would fill the listener and the second would be shed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_holding_its_share_of_a_shared_listener_does_not_shed_another() {
    let jwks_dir = tempfile::tempdir().expect("dir");
    let jwt_key = es256_key("k1");
    let jwks_path: PathBuf = jwks_dir.path().join("jwks.json");
    std::fs::write(
        &jwks_path,
        serde_json::json!({ "keys": [jwt_key.jwk] }).to_string(),
    )
    .expect("jwks");
    let mesh = LocalMesh::start(&["n0"], "acme", |_, raw| {
        raw.limits.max_in_flight_per_listener = Some(4);
        jwt_ingress(raw, &jwks_path);
    })
    .await
    .expect("mesh");
    let slow = super::agent_with(
        "slow",
        &["slow"],
        "slow work",
        Duration::from_secs(2),
        dmsc_node::demo::sample_agent::CardDialect::V03,
    )
    .await;
    let quick = agent("quick", &["quick"], "quick work").await;
    attach_for(&mesh, 0, "acme", &slow).await;
    attach_for(&mesh, 0, "globex", &quick).await;
    eventually(Duration::from_secs(5), "agents routable", || {
        routable(&mesh, 0, "acme", "slow") && routable(&mesh, 0, "globex", "quick")
    })
    .await;
    let addr = mesh.nodes[0].bound().ingress[1];
    let cfg = client_config(&ca_pem(&mesh), None);
    let acme = format!(
        "Bearer {}",
        jwt(&jwt_key, "k1", claims("acme", JWT_AUD, 300))
    );
    let globex = format!(
        "Bearer {}",
        jwt(&jwt_key, "k1", claims("globex", JWT_AUD, 300))
    );
    // Four slow requests of acme at once: alone on the listener it may hold
    // all but the reserve (4 - 1), so one of them is shed.
    let spawned = std::time::Instant::now();
    let mut slow_calls = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (cfg, acme) = (cfg.clone(), acme.clone());
        slow_calls.spawn(async move {
            tls_call(
                addr,
                cfg,
                "POST",
                "slow.acme.dmsc",
                "/",
                &[("authorization", &acme)],
                super::message_send("slow"),
            )
            .await
        });
    }
    let shed = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("dmsc_tenant_shed_total{tenant=\"acme\""))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let start = std::time::Instant::now();
    loop {
        if shed(&mesh.nodes[0].metrics_text().await) == 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "acme's fourth request was not shed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // acme's three are still at the slow agent; globex gets through.
    let (status, _, body) = tls_call(
        addr,
        cfg.clone(),
        "POST",
        "quick.globex.dmsc",
        "/",
        &[("authorization", &globex)],
        super::message_send("quick"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        spawned.elapsed() < Duration::from_secs(2),
        "acme's three were still at the slow agent"
    );
    let mut statuses = Vec::new();
    while let Some(r) = slow_calls.join_next().await {
        let (status, headers, body) = r.expect("task");
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(headers["retry-after"], "1");
            assert!(
                body.contains("share of requests for tenant `acme`"),
                "{body}"
            );
        }
        statuses.push(status.as_u16());
    }
    statuses.sort();
    assert_eq!(statuses, vec![200, 200, 200, 503]);
    mesh.stop().await;
}
