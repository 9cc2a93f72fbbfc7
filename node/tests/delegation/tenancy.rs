//! Tenants as first-class: signed policies spread by gossip decide which
//! cross-tenant calls pass (the provider's export and the consumer's import
//! both), through every addressing form, plain and authenticated ingress,
//! to local and remote agents; every denial is audited on both nodes with
//! the rule that refused it. Forged policies are refused and audited.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use dmsc_node::demo::mesh::LocalMesh;
use dmsc_node::demo::sample_agent::SampleAgent;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;

use super::security::{
    attach_for, audit_entries, claims, client_config, es256_key, jwt, tls_call, JwtKey, JWT_AUD,
};
use super::{agent, eventually};

const TENANTS: [&str; 3] = ["acme", "globex", "initech"];

/// One request to a plain ingress; returns status and body.
async fn plain_call(
    addr: SocketAddr,
    host: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method("POST")
        .uri("/")
        .header("host", host)
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(20),
        send.send_request(
            req.body(Full::new(Bytes::from(body.to_string())))
                .expect("request"),
        ),
    )
    .await
    .expect("answer in time")
    .expect("response");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// Two nodes; node 0 has a plain ingress per tenant and a TLS ingress that
/// authenticates JWTs (the tenant comes from the token). Each tenant has an
/// agent on node 0 (`<t>-local`, tag `<t>-l`) and one on node 1
/// (`<t>-remote`, tag `<t>-r`).
struct TenantMesh {
    mesh: LocalMesh,
    plain: Vec<SocketAddr>,
    tls: SocketAddr,
    key: JwtKey,
    _jwks: tempfile::TempDir,
    _agents: Vec<SampleAgent>,
}

async fn tenant_mesh() -> TenantMesh {
    let jwks = tempfile::tempdir().expect("dir");
    let key = es256_key("k1");
    let jwks_path = jwks.path().join("jwks.json");
    std::fs::write(
        &jwks_path,
        serde_json::json!({ "keys": [key.jwk] }).to_string(),
    )
    .expect("jwks");
    let mesh = LocalMesh::start(&["n0", "n1"], "acme", |i, raw| {
        raw.gossip.interval_ms = Some(100);
        raw.delegation.health_interval_ms = Some(200);
        if i == 0 {
            for t in &TENANTS[1..] {
                raw.ingress.push(dmsc_node::config::RawIngress {
                    listen: "127.0.0.1:0".into(),
                    tenant: Some(t.to_string()),
                    ..Default::default()
                });
            }
            super::security::jwt_ingress(raw, &jwks_path);
        }
    })
    .await
    .expect("mesh");
    let mut agents = Vec::new();
    for t in TENANTS {
        for (node, side, tag) in [(0, "local", "l"), (1, "remote", "r")] {
            let a = agent(
                &format!("{t}-{side}"),
                &[&format!("{t}-{tag}")],
                &format!("Handle {t} {side} work"),
            )
            .await;
            attach_for(&mesh, node, t, &a).await;
            agents.push(a);
        }
    }
    eventually(
        Duration::from_secs(10),
        "every agent routable from node 0",
        || {
            TENANTS.iter().all(|t| {
                ["local", "remote"].iter().all(|side| {
                    let id = dmsc_registry::AgentId::new(*t, format!("{t}-{side}"));
                    mesh.nodes[0].mesh().read().get(&id).is_some()
                        && mesh.nodes[1].mesh().read().get(&id).is_some()
                })
            })
        },
    )
    .await;
    let ingress = &mesh.nodes[0].bound().ingress;
    TenantMesh {
        plain: ingress[..3].to_vec(),
        tls: ingress[3],
        mesh,
        key,
        _jwks: jwks,
        _agents: agents,
    }
}

/// Every addressing form of tenant `p`: (label, host, intent header, the
/// home node of whatever it reaches is remote).
fn forms(p: &str) -> Vec<(String, String, Option<String>, bool)> {
    vec![
        (
            "agent-local".into(),
            format!("{p}-local.{p}.dmsc"),
            None,
            false,
        ),
        (
            "agent-remote".into(),
            format!("{p}-remote.{p}.dmsc"),
            None,
            true,
        ),
        (
            "cap-local".into(),
            format!("{p}-l.cap.{p}.dmsc"),
            None,
            false,
        ),
        (
            "cap-remote".into(),
            format!("{p}-r.cap.{p}.dmsc"),
            None,
            true,
        ),
        (
            "intent".into(),
            format!("mesh.{p}.dmsc"),
            Some(format!("handle {p} work")),
            true,
        ),
    ]
}

/// Calls `host` as a caller of tenant `c`, through the plain ingress or the
/// JWT ingress.
async fn call_as(
    m: &TenantMesh,
    c: &str,
    authenticated: bool,
    host: &str,
    intent: &Option<String>,
) -> (StatusCode, String) {
    let body = super::message_send("do the work");
    let mut headers: Vec<(&str, &str)> = Vec::new();
    if let Some(i) = intent {
        headers.push(("dmsc-intent", i));
    }
    if authenticated {
        let token = jwt(&m.key, "k1", claims(c, JWT_AUD, 300));
        let bearer = format!("Bearer {token}");
        headers.push(("authorization", &bearer));
        let (status, _, body) = tls_call(
            m.tls,
            client_config(&m.mesh.ca.cert_pem, None),
            "POST",
            host,
            "/",
            &headers,
            body,
        )
        .await;
        (status, body)
    } else {
        let i = TENANTS.iter().position(|t| *t == c).expect("tenant");
        plain_call(m.plain[i], host, &headers, &body).await
    }
}

fn signed(mesh: &LocalMesh, doc: &str) -> String {
    dmsc_policy::SignedPolicy::sign_operator(&mesh.ca, doc.as_bytes())
        .expect("sign")
        .to_json()
}

async fn post_policy(mesh: &LocalMesh, i: usize, body: String) -> (u16, serde_json::Value) {
    let (status, text) = dmsc_node::admin::status::admin_call(
        mesh.nodes[i].bound().admin,
        hyper::Method::POST,
        "/v1/policies",
        Some(&mesh.admin_token(i)),
        body.into(),
    )
    .await
    .expect("admin call");
    (status, serde_json::from_str(&text).expect("json"))
}

/// Denials audited on node `i` whose target matches and whose caller
/// mentions `caller_part`, with their rules.
async fn denial_rules(mesh: &LocalMesh, i: usize, tenant: &str) -> Vec<String> {
    audit_entries(mesh, i)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "denied" && e["tenant"] == tenant)
        .map(|e| e["detail"]["rule"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_nobody_serves_is_refused_like_any_and_leaves_no_state() {
    let m = tenant_mesh().await;
    let (known, body_known) = call_as(&m, "acme", false, "agent.globex.dmsc", &None).await;
    let (unknown, body) = call_as(&m, "acme", false, "agent.nosuchtenant.dmsc", &None).await;
    assert!(super::forbidden(known, &body_known), "{body_known}");
    assert!(super::forbidden(unknown, &body), "{body}");
    assert!(
        body.contains("tenant `nosuchtenant` has no policy, so it exports nothing"),
        "{body}"
    );
    // Audited as the caller's tenant's denial; no key for the typed name.
    let entries = audit_entries(&m.mesh, 0).await;
    assert!(
        entries.iter().any(|e| e["kind"] == "denied"
            && e["tenant"] == "acme"
            && e.to_string().contains("nosuchtenant")),
        "{entries:#?}"
    );
    assert!(
        !entries.iter().any(|e| e["tenant"] == "nosuchtenant"),
        "{entries:#?}"
    );
    let keys = m.mesh.nodes[0].config().data_dir.join(dmsc_keys::KEYS_DIR);
    assert!(keys.join("globex.json").exists(), "the known tenant's key");
    assert!(!keys.join("nosuchtenant.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_tenant_matrix_needs_export_and_import_and_audits_both_nodes() {
    let m = tenant_mesh().await;
    // Own tenant: always allowed, with or without policies.
    for auth in [false, true] {
        for (label, host, intent, _) in forms("acme") {
            let (status, body) = call_as(&m, "acme", auth, &host, &intent).await;
            assert_eq!(
                status,
                StatusCode::OK,
                "acme -> acme {label} (auth {auth}): {body}"
            );
        }
    }

    // No policies: every cross-tenant call is refused by the provider's
    // side (no export), whatever the form, ingress or home node.
    let mut expected_denials: std::collections::HashMap<(usize, String), usize> =
        Default::default();
    for c in TENANTS {
        for p in TENANTS.iter().filter(|p| **p != c) {
            for auth in [false, true] {
                for (label, host, intent, remote) in forms(p) {
                    let (status, body) = call_as(&m, c, auth, &host, &intent).await;
                    assert!(
                        super::forbidden(status, &body),
                        "{c} -> {p} {label} (auth {auth}) without policies: {body}"
                    );
                    let rule = format!("{p}:export");
                    assert!(body.contains(&rule), "{c} -> {p} {label}: {body}");
                    *expected_denials.entry((0, p.to_string())).or_default() += 1;
                    if remote {
                        *expected_denials.entry((1, p.to_string())).or_default() += 1;
                    }
                }
            }
        }
    }

    // acme exports everything to globex; globex imports all of acme;
    // initech imports acme too, but acme does not export to it.
    let acme = "tenant = \"acme\"\nversion = 1\n[[export]]\nto = [\"globex\"]\nagents = [\"acme-local\", \"acme-remote\"]\ntags = [\"acme-l\", \"acme-r\"]\n";
    let globex = "tenant = \"globex\"\nversion = 1\n[[import]]\nfrom = [\"acme\"]\nagents = [\"*\"]\ntags = [\"*\"]\n";
    let initech = "tenant = \"initech\"\nversion = 1\n[[import]]\nfrom = [\"acme\", \"globex\"]\nagents = [\"*\"]\ntags = [\"*\"]\n";
    for doc in [acme, globex, initech] {
        let (status, v) = post_policy(&m.mesh, 0, signed(&m.mesh, doc)).await;
        assert_eq!(status, 201, "{v}");
    }
    eventually(
        Duration::from_secs(10),
        "policies reach node 1 by gossip",
        || {
            TENANTS
                .iter()
                .all(|t| m.mesh.nodes[1].security().policies.version(t) == 1)
        },
    )
    .await;

    for c in TENANTS {
        for p in TENANTS.iter().filter(|p| **p != c) {
            let allowed = c == "globex" && *p == "acme";
            for auth in [false, true] {
                for (label, host, intent, remote) in forms(p) {
                    let (status, body) = call_as(&m, c, auth, &host, &intent).await;
                    if allowed {
                        assert_eq!(
                            (status, super::refusal_kind(status, &body)),
                            (StatusCode::OK, None),
                            "{c} -> {p} {label} (auth {auth}): {body}"
                        );
                        continue;
                    }
                    assert!(
                        super::forbidden(status, &body),
                        "{c} -> {p} {label} (auth {auth}): {body}"
                    );
                    // acme exports nothing to initech; nobody exports to acme
                    // or from globex/initech.
                    let rule = format!("{p}:export");
                    assert!(body.contains(&rule), "{c} -> {p} {label}: {body}");
                    *expected_denials.entry((0, p.to_string())).or_default() += 1;
                    if remote {
                        *expected_denials.entry((1, p.to_string())).or_default() += 1;
                    }
                }
            }
        }
    }
    // The consumer's side: globex drops its import (version 2); now acme's
    // export alone does not let globex in.
    let globex2 =
        "tenant = \"globex\"\nversion = 2\n[[import]]\nfrom = [\"initech\"]\nagents = [\"*\"]\n";
    let (status, v) = post_policy(&m.mesh, 0, signed(&m.mesh, globex2)).await;
    assert_eq!(status, 201, "{v}");
    eventually(Duration::from_secs(10), "globex v2 on node 1", || {
        m.mesh.nodes[1].security().policies.version("globex") == 2
    })
    .await;
    for auth in [false, true] {
        for (label, host, intent, remote) in forms("acme") {
            let (status, body) = call_as(&m, "globex", auth, &host, &intent).await;
            assert!(
                super::forbidden(status, &body),
                "globex -> acme {label}: {body}"
            );
            assert!(body.contains("globex:import"), "{label}: {body}");
            *expected_denials.entry((0, "acme".into())).or_default() += 1;
            if remote {
                *expected_denials.entry((1, "acme".into())).or_default() += 1;
            }
        }
    }

    // Every denial is on record with its rule: on the calling node, and on
    // the home node of what it addressed when that is another node.
    for ((node, tenant), n) in expected_denials {
        let i = node;
        let want = n;
        let tenant2 = tenant.clone();
        let mesh = &m.mesh;
        let mut got = 0;
        for _ in 0..100 {
            let rules = denial_rules(mesh, i, &tenant2).await;
            assert!(
                rules
                    .iter()
                    .all(|r| r.starts_with(&format!("{tenant2}:")) || r.ends_with(":import")),
                "node {i}, tenant {tenant2}: a denial without its rule: {rules:?}"
            );
            got = rules.len();
            if got >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            got, want,
            "denials of tenant `{tenant}` audited on node {node}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_stale_policies_are_refused_and_audited() {
    let mesh = LocalMesh::start(&["n0"], "acme", |_, raw| {
        raw.gossip.interval_ms = Some(100);
    })
    .await
    .expect("mesh");
    let v2 = "tenant = \"acme\"\nversion = 2\n";
    let (status, v) = post_policy(&mesh, 0, signed(&mesh, v2)).await;
    assert_eq!(status, 201, "{v}");

    // An older version.
    let (status, v) =
        post_policy(&mesh, 0, signed(&mesh, "tenant = \"acme\"\nversion = 1\n")).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (409, Some("older_version")),
        "{v}"
    );

    // A bad signature: the document changed after signing.
    let mut forged: dmsc_policy::SignedPolicy =
        serde_json::from_str(&signed(&mesh, "tenant = \"acme\"\nversion = 3\n")).expect("json");
    use base64::Engine as _;
    forged.doc = base64::engine::general_purpose::STANDARD
        .encode("tenant = \"acme\"\nversion = 3\n[[export]]\nto = [\"*\"]\nagents = [\"*\"]\n");
    let (status, v) = post_policy(&mesh, 0, forged.to_json()).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (403, Some("bad_signature")),
        "{v}"
    );

    // Another tenant's admin key signing acme's document.
    let globex_admin = mesh
        .ca
        .issue_tenant_admin("globex", Duration::from_secs(3600))
        .expect("issue");
    let doc = "tenant = \"acme\"\nversion = 4\n[[export]]\nto = [\"globex\"]\nagents = [\"*\"]\n";
    let key = rcgen::KeyPair::from_pem(&globex_admin.key_pem).expect("key");
    use rcgen::SigningKey as _;
    let mut msg = b"dmsc-policy-v1\0".to_vec();
    msg.extend_from_slice(doc.as_bytes());
    let sig: String = key
        .sign(&msg)
        .expect("sign")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let other_key = dmsc_policy::SignedPolicy {
        v: 1,
        doc: base64::engine::general_purpose::STANDARD.encode(doc),
        signer: Some(globex_admin.cert_pem.clone()),
        sig,
    };
    let (status, v) = post_policy(&mesh, 0, other_key.to_json()).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (403, Some("other_tenant_key")),
        "{v}"
    );

    // acme's own admin key works.
    let acme_admin = mesh
        .ca
        .issue_tenant_admin("acme", Duration::from_secs(3600))
        .expect("issue");
    let own = dmsc_policy::SignedPolicy::sign_tenant_admin(
        &acme_admin.cert_pem,
        &acme_admin.key_pem,
        b"tenant = \"acme\"\nversion = 5\n",
    )
    .expect("sign");
    let (status, v) = post_policy(&mesh, 0, own.to_json()).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(mesh.nodes[0].security().policies.version("acme"), 5);

    // A document with problems: every one reported, nothing applied.
    let bad = signed_unchecked(
        &mesh,
        "tenant = \"acme\"\nversion = 9\n[[export]]\nto = []\ndata_tags = [\"nuclear\"]\n",
    );
    let (status, v) = post_policy(&mesh, 0, bad).await;
    assert_eq!(status, 400, "{v}");
    let problems = v["problems"].as_array().expect("problems");
    assert!(problems.len() >= 3, "{v}");
    assert!(
        v.to_string().contains("known: "),
        "unknown tags list the known ones: {v}"
    );
    assert_eq!(mesh.nodes[0].security().policies.version("acme"), 5);

    // The tenant admin key is stolen and revoked: the policy it signed is
    // no longer in force, and the operator replaces it at any version.
    let serial = dmsc_transport::identity::serial_of(
        &<rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::from_pem_slice(
            acme_admin.cert_pem.as_bytes(),
        )
        .expect("pem"),
    )
    .expect("serial");
    let revocation =
        dmsc_transport::Revocation::sign(&mesh.ca, &serial, "key-compromise").expect("revoke");
    let (status, text) = dmsc_node::admin::status::admin_call(
        mesh.nodes[0].bound().admin,
        hyper::Method::POST,
        "/v1/revocations",
        Some(&mesh.admin_token(0)),
        revocation.to_json().into(),
    )
    .await
    .expect("admin call");
    assert!(status < 300, "{text}");
    assert_eq!(mesh.nodes[0].security().policies.version("acme"), 0);
    let (status, v) =
        post_policy(&mesh, 0, signed(&mesh, "tenant = \"acme\"\nversion = 1\n")).await;
    assert_eq!(status, 201, "{v}");

    let entries = audit_entries(&mesh, 0).await;
    let policy: Vec<_> = entries.iter().filter(|e| e["kind"] == "policy").collect();
    let codes: Vec<&str> = policy
        .iter()
        .filter_map(|e| e["detail"]["code"].as_str())
        .collect();
    for code in [
        "older_version",
        "bad_signature",
        "other_tenant_key",
        "invalid",
    ] {
        assert!(
            codes.contains(&code),
            "`{code}` refusal not audited: {policy:#?}"
        );
    }
    let applied = policy
        .iter()
        .filter(|e| e["detail"]["outcome"] == "applied")
        .count();
    assert_eq!(applied, 3, "{policy:#?}");
    assert!(
        codes.contains(&"signer_revoked"),
        "the dropped policy is audited: {policy:#?}"
    );
}

/// Signs a document without checking it (what a careless or hostile tool
/// could send): the node must still refuse it with every problem.
fn signed_unchecked(mesh: &LocalMesh, doc: &str) -> String {
    use base64::Engine as _;
    let mut msg = b"dmsc-policy-v1\0".to_vec();
    msg.extend_from_slice(doc.as_bytes());
    let sig: String = mesh
        .ca
        .sign(&msg)
        .expect("sign")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    dmsc_policy::SignedPolicy {
        v: 1,
        doc: base64::engine::general_purpose::STANDARD.encode(doc),
        signer: None,
        sig,
    }
    .to_json()
}

/// Two nodes; node 0 has plain ingresses for acme and globex; acme's agent
/// `ledger` lives on node 1. Returns the mesh and the agent (kept alive).
async fn two_tenants() -> (LocalMesh, Vec<SocketAddr>, SampleAgent) {
    let mesh = LocalMesh::start(&["n0", "n1"], "acme", |i, raw| {
        raw.gossip.interval_ms = Some(100);
        raw.delegation.health_interval_ms = Some(200);
        if i == 0 {
            raw.ingress.push(dmsc_node::config::RawIngress {
                listen: "127.0.0.1:0".into(),
                tenant: Some("globex".into()),
                ..Default::default()
            });
        }
    })
    .await
    .expect("mesh");
    let ledger = agent("ledger", &["books"], "Keep the books").await;
    attach_for(&mesh, 1, "acme", &ledger).await;
    eventually(
        Duration::from_secs(10),
        "ledger routable from node 0",
        || {
            let id = dmsc_registry::AgentId::new("acme", "ledger");
            mesh.nodes[0].mesh().read().get(&id).is_some()
        },
    )
    .await;
    let plain = mesh.nodes[0].bound().ingress.clone();
    (mesh, plain, ledger)
}

const ACME_TAGS: &str = r#"tenant = "acme"
version = 1
[[export]]
to = ["globex"]
agents = ["ledger"]
data_tags = ["pii"]
[agents.ledger]
accepts = ["pii", "financial"]
[[mask]]
name = "replies"
detectors = ["email"]
on = "cross-tenant"
responses = true
"#;

const GLOBEX_TAGS: &str = r#"tenant = "globex"
version = 1
[[import]]
from = ["acme"]
agents = ["*"]
data_tags = ["pii"]
[[mask]]
name = "globex-pii"
detectors = ["payment_card"]
patterns = ["GLX-[0-9]{4}"]
on = "cross-tenant"
"#;

fn stream_request(text: &str) -> String {
    serde_json::json!({
        "jsonrpc": "2.0", "id": 2, "method": "message/stream",
        "params": {"message": {"role": "user", "messageId": "m-2",
            "parts": [{"kind": "text", "text": text}]}}
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_tags_and_masking_end_to_end_through_two_nodes() {
    let (mesh, plain, _ledger) = two_tenants().await;
    let (acme_in, globex_in) = (plain[0], plain[1]);
    for doc in [ACME_TAGS, GLOBEX_TAGS] {
        let (status, v) = post_policy(&mesh, 0, signed(&mesh, doc)).await;
        assert_eq!(status, 201, "{v}");
    }
    eventually(Duration::from_secs(10), "policies on node 1", || {
        ["acme", "globex"]
            .iter()
            .all(|t| mesh.nodes[1].security().policies.version(t) == 1)
    })
    .await;
    let host = "ledger.acme.dmsc";

    // 1. A tag the export does not let in: 403 policy_violation with the
    // tag and the rule, from the header or from the A2A metadata.
    let (status, body) = plain_call(
        globex_in,
        host,
        &[("dmsc-data-tags", "phi")],
        &super::message_send("x"),
    )
    .await;
    assert_eq!(
        super::refusal_kind(status, &body).as_deref(),
        Some("policy_violation"),
        "{body}"
    );
    for needle in ["policy_violation", "`phi`", "acme:export[0].data_tags"] {
        assert!(body.contains(needle), "`{needle}` missing: {body}");
    }
    let with_meta = serde_json::json!({
        "jsonrpc": "2.0", "id": 1, "method": "message/send",
        "params": {"metadata": {"dmsc.dataTags": ["phi"]},
            "message": {"role": "user", "messageId": "m", "parts": [{"kind": "text", "text": "x"}]}}
    })
    .to_string();
    let (status, body) = plain_call(globex_in, host, &[], &with_meta).await;
    assert!(super::forbidden(status, &body), "{body}");
    assert!(body.contains("acme:export[0].data_tags"), "{body}");
    // Unknown tag names are refused with the known ones listed.
    let (status, body) = plain_call(
        globex_in,
        host,
        &[("dmsc-data-tags", "nuclear")],
        &super::message_send("x"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("nuclear") && body.contains("pii"), "{body}");
    // Within acme, the agent's own accept list: `secret` may not reach it,
    // by name or through its capability (checked for the agent picked).
    for h in [host, "books.cap.acme.dmsc"] {
        let (status, body) = plain_call(
            acme_in,
            h,
            &[("dmsc-data-tags", "secret")],
            &super::message_send("x"),
        )
        .await;
        assert!(super::forbidden(status, &body), "{h}: {body}");
        assert!(body.contains("acme:agents.ledger.accepts"), "{h}: {body}");
    }
    let (status, body) = plain_call(
        acme_in,
        host,
        &[("dmsc-data-tags", "financial")],
        &super::message_send("x"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // 2. Tags travel through the overlay and the home node checks them
    // itself: a head forged on node 0's overlay connection with a tag the
    // agent may not receive is refused by node 1.
    let overlay = mesh.nodes[0].overlay();
    let mut stream = overlay
        .open_stream(
            mesh.nodes[1].bound().overlay,
            dmsc_transport::Channel::Delegate,
        )
        .await
        .expect("stream");
    let head = dmsc_node::proto::wire::RequestHead {
        version: dmsc_node::proto::wire::DELEGATION_VERSION,
        tenant: "acme".into(),
        caller: "forged".into(),
        agent: "ledger".into(),
        deadline_ms: 5000,
        trace_id: "forged-tags".into(),
        method: "POST".into(),
        path: "/".into(),
        http: 1,
        headers: Default::default(),
        empty_body: true,
        caller_tenant: "globex".into(),
        data_tags: vec!["phi".into()],
    };
    let mut parts = dmsc_node::proto::wire::encode_request_head(head.as_ref())
        .expect("encode")
        .to_vec();
    stream.send.write_chunks(&mut parts).await.expect("write");
    stream.send.finish().expect("finish");
    let mut decoder = dmsc_node::proto::wire::PartDecoder::new();
    let mut failure = None;
    while let Some(chunk) = stream.recv.read_chunk(64 * 1024).await.expect("read") {
        decoder.push(&chunk);
        if let Some(dmsc_node::proto::wire::Part::Head(h)) = decoder.next_part().expect("part") {
            failure = dmsc_node::proto::wire::decode_response_head(&h)
                .expect("head")
                .failure;
            break;
        }
    }
    let failure = failure.expect("a typed failure");
    assert_eq!(failure.kind, "policy_violation", "{failure:?}");
    assert!(
        failure.detail.contains("acme:export[0].data_tags"),
        "{failure:?}"
    );

    // 3. Masking: globex's rules mask the card number and its own pattern
    // in what it sends to acme; acme's rule masks emails in what its agent
    // answers to another tenant. The agent echoes what it received.
    let secret = "card 4111 1111 1111 1111 ref GLX-1234 mail bob@example.com";
    let (status, body) = plain_call(
        globex_in,
        host,
        &[("dmsc-data-tags", "pii")],
        &super::message_send(secret),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for raw in ["4111 1111 1111 1111", "GLX-1234", "bob@example.com"] {
        assert!(!body.contains(raw), "`{raw}` leaked: {body}");
    }
    for mark in [
        "[masked:payment_card]",
        "[masked:globex-pii]",
        "[masked:email]",
    ] {
        assert!(body.contains(mark), "`{mark}` missing: {body}");
    }
    // The same over SSE: every event masked as it streams.
    let (status, body) = plain_call(globex_in, host, &[], &stream_request(secret)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body.matches("data: ").count(), 3, "three events: {body}");
    for raw in ["4111 1111 1111 1111", "GLX-1234", "bob@example.com"] {
        assert!(!body.contains(raw), "`{raw}` leaked in the stream: {body}");
    }
    assert_eq!(body.matches("[masked:email]").count(), 3, "{body}");
    // Within acme nothing is masked (the rules are for what leaves it).
    let (status, body) = plain_call(acme_in, host, &[], &super::message_send(secret)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("bob@example.com"), "{body}");

    // 4. Fail closed: a body globex must mask but cannot parse is refused.
    let (status, body) = {
        let stream = tokio::net::TcpStream::connect(globex_in)
            .await
            .expect("connect");
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("handshake");
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method("POST")
            .uri("/")
            .header("host", host)
            .header("content-type", "application/octet-stream")
            .body(Full::new(Bytes::from_static(&[0, 159, 146, 150])))
            .expect("request");
        let resp = send.send_request(req).await.expect("response");
        let status = resp.status();
        let b = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&b).into_owned())
    };
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{body}");
    assert!(body.contains("globex:mask"), "{body}");

    // The audit log has the counts per rule, never the values, and the
    // refusals with their rules on both nodes.
    let entries = audit_entries(&mesh, 0).await;
    let text = serde_json::to_string(&entries).expect("json");
    for raw in ["4111 1111 1111 1111", "GLX-1234", "bob@example.com"] {
        assert!(!text.contains(raw), "`{raw}` in the audit log");
    }
    let masked: Vec<_> = entries.iter().filter(|e| e["kind"] == "masked").collect();
    let count = |entries: &[serde_json::Value], dir: &str, rule: &str| -> u64 {
        entries
            .iter()
            .filter(|e| e["kind"] == "masked")
            .filter(|e| e["detail"]["direction"] == dir && e["detail"]["outcome"] == "masked")
            .filter_map(|e| e["detail"]["masked"][rule].as_u64())
            .sum()
    };
    // Requests are masked by the calling node, before the overlay;
    // responses by the agent's home node, before the overlay too.
    assert_eq!(count(&entries, "request", "globex-pii"), 4, "{masked:#?}");
    let home = audit_entries(&mesh, 1).await;
    let home_text = serde_json::to_string(&home).expect("json");
    assert!(
        !home_text.contains("4111 1111 1111 1111"),
        "request masked before node 1"
    );
    assert_eq!(count(&home, "response", "replies"), 4, "{home:#?}");
    assert_eq!(
        count(&entries, "response", "replies"),
        0,
        "not masked twice"
    );
    assert!(
        masked.iter().any(|e| e["detail"]["outcome"] == "refused"),
        "{masked:#?}"
    );
    let n1 = denial_rules(&mesh, 1, "acme").await;
    assert!(
        n1.iter().any(|r| r == "acme:export[0].data_tags"),
        "node 1 audits the tag refusals too: {n1:?}"
    );
}

/// The rate limits a tenant's policy states are in force on every node
/// once the policy reaches it by gossip: over the limit, 429 with
/// `Retry-After`; another tenant is not limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policys_rate_limits_apply_on_every_node() {
    let (mesh, _plain, _ledger) = two_tenants().await;
    let doc = "tenant = \"acme\"\nversion = 1\n[limits.caller]\nrps = 2\nburst = 3\n";
    let (status, v) = post_policy(&mesh, 0, signed(&mesh, doc)).await;
    assert_eq!(status, 201, "{v}");
    eventually(Duration::from_secs(10), "the policy reaches node 1", || {
        mesh.nodes[1].security().policies.version("acme") == 1
    })
    .await;
    // Node 1's acme ingress: the caller is the listener; burst 3, then 429.
    let ingress = mesh.nodes[1].bound().ingress[0];
    let mut limited = None;
    for _ in 0..10 {
        let (status, body) =
            plain_call(ingress, "ledger.acme.dmsc", &[], &super::message_send("x")).await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(body);
            break;
        }
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let body = limited.expect("a 429 within 10 calls at 2/s with burst 3");
    assert!(
        body.contains("rate-limited") || body.contains("rate limit"),
        "{body}"
    );
    let resp = mesh
        .call(
            1,
            "POST",
            "ledger.acme.dmsc",
            "/",
            &[],
            super::message_send("x"),
        )
        .await
        .expect("call")
        .0;
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!(retry >= 1, "Retry-After {retry}");
    // globex (node 0's second ingress) has no limits.
    let globex = mesh.nodes[0].bound().ingress[1];
    let doc = "tenant = \"globex\"\nversion = 1\n";
    let (status, v) = post_policy(&mesh, 0, signed(&mesh, doc)).await;
    assert_eq!(status, 201, "{v}");
    for _ in 0..10 {
        let (status, body) = plain_call(globex, "nobody.globex.dmsc", &[], "").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "not limited: {body}");
    }
}

/// Intent routing into another tenant picks among the exported agents only,
/// however many unexported ones match better or equally: a candidate the
/// policy refuses is passed over without spending the retry budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intent_into_another_tenant_reaches_only_exported_agents() {
    let (mesh, plain, _ledger) = two_tenants().await;
    let mut agents = Vec::new();
    for name in ["books-a", "books-b", "books-c", "books-d"] {
        let a = agent(name, &["books"], "Keep the books").await;
        attach_for(&mesh, 1, "acme", &a).await;
        agents.push(a);
    }
    eventually(
        Duration::from_secs(10),
        "agents routable from node 0",
        || {
            ["books-a", "books-b", "books-c", "books-d"]
                .iter()
                .all(|n| {
                    let id = dmsc_registry::AgentId::new("acme", *n);
                    mesh.nodes[0].mesh().read().get(&id).is_some()
                })
        },
    )
    .await;
    let acme =
        "tenant = \"acme\"\nversion = 1\n[[export]]\nto = [\"globex\"]\nagents = [\"books-d\"]\n";
    let globex =
        "tenant = \"globex\"\nversion = 1\n[[import]]\nfrom = [\"acme\"]\nagents = [\"*\"]\n";
    for doc in [acme, globex] {
        let (status, v) = post_policy(&mesh, 0, signed(&mesh, doc)).await;
        assert_eq!(status, 201, "{v}");
    }
    eventually(Duration::from_secs(10), "policies on node 1", || {
        mesh.nodes[1].security().policies.version("globex") == 1
    })
    .await;
    for _ in 0..8 {
        let (status, body) = plain_call(
            plain[1],
            "mesh.acme.dmsc",
            &[("dmsc-intent", "keep the books")],
            &super::message_send("keep the books"),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(
            body.contains("books-d handled"),
            "only the exported agent: {body}"
        );
    }
    // Ask mode offers only what the caller may call: of four equal
    // matches, one is exported, so there is nothing to ask about and no
    // other agent's name reaches the caller.
    let (status, body) = plain_call(
        plain[1],
        "mesh.acme.dmsc",
        &[
            ("dmsc-intent", "keep the books"),
            ("dmsc-intent-mode", "ask"),
        ],
        &super::message_send("keep the books"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("books-d handled"), "{body}");
    assert!(
        !body.contains("books-a") && !body.contains("input-required"),
        "{body}"
    );
    // Within acme the same question is asked, among all four.
    let (status, body) = plain_call(
        plain[0],
        "mesh.acme.dmsc",
        &[
            ("dmsc-intent", "keep the books"),
            ("dmsc-intent-mode", "ask"),
        ],
        &super::message_send("keep the books"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains("input-required") && body.contains("books-a"),
        "{body}"
    );
    // A capability the export does not list stays refused.
    let (status, body) = plain_call(plain[1], "books.cap.acme.dmsc", &[], "").await;
    assert!(super::forbidden(status, &body), "{body}");
    drop(agents);
}

/// An agent's `[[agents]] accepts` (its home node's config) refuses other
/// data tags, for callers on any node; no tenant policy needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_configured_accept_list_is_enforced_by_its_home_node() {
    let (mesh, plain, _ledger) = two_tenants().await;
    let vault = agent("vault", &["secrets"], "Keep secrets").await;
    mesh.nodes[1]
        .agents()
        .add(&dmsc_node::config::RawAgent {
            tenant: "acme".into(),
            url: vault.url(),
            accepts: Some(vec!["public".into()]),
            ..Default::default()
        })
        .await
        .expect("attach");
    eventually(
        Duration::from_secs(10),
        "vault routable from node 0",
        || {
            let id = dmsc_registry::AgentId::new("acme", "vault");
            mesh.nodes[0].mesh().read().get(&id).is_some()
        },
    )
    .await;
    let local_in = mesh.nodes[1].bound().ingress[0];
    for (ingress, node) in [(plain[0], "remote"), (local_in, "local")] {
        let (status, body) = plain_call(
            ingress,
            "vault.acme.dmsc",
            &[("dmsc-data-tags", "pii")],
            &super::message_send("x"),
        )
        .await;
        assert_eq!(
            super::refusal_kind(status, &body).as_deref(),
            Some("policy_violation"),
            "{node}: {body}"
        );
        assert!(
            body.contains("acme:config.agents.vault.accepts"),
            "{node}: {body}"
        );
        let (status, body) = plain_call(
            ingress,
            "vault.acme.dmsc",
            &[("dmsc-data-tags", "public")],
            &super::message_send("x"),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{node}: {body}");
    }
}
