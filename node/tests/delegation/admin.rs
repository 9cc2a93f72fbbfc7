//! Admin reads per tenant: the node admin token sees every tenant, a tenant
//! read token sees its own agents and audit entries and can change nothing,
//! and `[admin] open_reads = false` leaves callers without a token node
//! health only.

use std::net::SocketAddr;
use std::time::Duration;

use dmsc_node::admin::status::admin_call;
use hyper::Method;

use super::{agent, eventually, mesh_of};

async fn call(admin: SocketAddr, method: Method, path: &str, token: Option<&str>) -> (u16, String) {
    admin_call(admin, method, path, token, bytes::Bytes::new())
        .await
        .expect("admin API answers")
}

async fn get_json(admin: SocketAddr, path: &str, token: Option<&str>) -> serde_json::Value {
    let (status, body) = call(admin, Method::GET, path, token).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).expect("json")
}

fn tenants_of(agents: &serde_json::Value) -> Vec<String> {
    let mut t: Vec<String> = agents
        .as_array()
        .expect("agents array")
        .iter()
        .map(|a| a["tenant"].as_str().unwrap_or("?").to_string())
        .collect();
    t.sort();
    t.dedup();
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_read_token_sees_its_tenant_only_and_changes_nothing() {
    let mesh = mesh_of(&["n0", "n1"], |_, _| {}).await;
    let admin = mesh.nodes[0].bound().admin;
    let root = mesh.admin_token(0);
    // acme's agent on n0, globex's on n1.
    let a = agent("helper", &["help"], "helps").await;
    let g = agent("rival", &["help"], "helps too").await;
    mesh.attach(0, &a.url(), None).await.expect("attach acme");
    let spec = dmsc_node::config::RawAgent {
        tenant: "globex".into(),
        url: g.url(),
        name: None,
        ..Default::default()
    };
    mesh.nodes[1]
        .agents()
        .add(&spec)
        .await
        .expect("attach globex");
    let globex = dmsc_registry::AgentId::new("globex", "rival");
    eventually(Duration::from_secs(5), "n0 knows both agents", || {
        mesh.routable_everywhere("helper") && mesh.nodes[0].mesh().read().get(&globex).is_some()
    })
    .await;
    let sec = mesh.nodes[0].security();
    for tenant in ["acme", "globex"] {
        sec.record(dmsc_audit::Event::tenant(
            tenant,
            dmsc_audit::Denied {
                caller: format!("{tenant}/x"),
                target: "agent:y".into(),
                reason: "test".into(),
                rule: None,
            },
        ));
    }

    // A read token for acme, made through the admin API with the admin token.
    let made = dmsc_node::ops::admin_token_create(admin, &root, "acme", None)
        .await
        .expect("token");
    let acme = made["token"].as_str().expect("token").to_string();
    let stored = std::fs::read_to_string(
        mesh.nodes[0]
            .config()
            .data_dir
            .join(dmsc_node::security::read_tokens::READ_TOKENS_FILE),
    )
    .expect("store");
    assert!(!stored.contains(&acme), "only a hash is stored");

    // The admin token and (open reads, the default) no token: every tenant.
    for token in [Some(root.as_str()), None] {
        let status = get_json(admin, "/v1/status", token).await;
        assert_eq!(tenants_of(&status["agents"]), ["acme", "globex"]);
        let agents = get_json(admin, "/v1/agents", token).await;
        assert_eq!(tenants_of(&agents["agents"]), ["acme", "globex"]);
    }
    // The tenant token: acme only; n1 is home to globex only, so it is not listed.
    let status = get_json(admin, "/v1/status", Some(&acme)).await;
    assert_eq!(tenants_of(&status["agents"]), ["acme"]);
    assert!(
        status["peers"].as_array().expect("peers").is_empty(),
        "{}",
        status["peers"]
    );
    assert!(!status.to_string().contains("globex"), "{status}");
    let agents = get_json(admin, "/v1/agents", Some(&acme)).await;
    assert_eq!(tenants_of(&agents["agents"]), ["acme"]);
    // The client `dmsc-node status --admin-token` uses.
    let report = dmsc_node::admin::status::fetch_with(admin, Some(&acme))
        .await
        .expect("status");
    assert!(report.agents.iter().all(|a| a.tenant == "acme"));

    // Audit: acme's entries only; asking for globex's is refused.
    eventually(Duration::from_secs(5), "both entries written", || {
        dmsc_audit::tail(
            &mesh.nodes[0].config().audit.as_ref().expect("audit").dir,
            None,
        )
        .map(|t| {
            t.filter_map(Result::ok)
                .filter(|l| l.kind == "denied")
                .count()
                == 2
        })
        .unwrap_or(false)
    })
    .await;
    let audit = get_json(admin, "/v1/audit?since=1h&limit=50", Some(&acme)).await;
    let entries = audit["entries"].as_array().expect("entries");
    assert!(!entries.is_empty(), "{audit}");
    assert!(entries.iter().all(|e| e["tenant"] == "acme"), "{audit}");
    let (status, body) = call(admin, Method::GET, "/v1/audit?tenant=globex", Some(&acme)).await;
    assert_eq!(status, 403, "{body}");
    let audit = get_json(admin, "/v1/audit?tenant=globex", Some(&root)).await;
    let entries = audit["entries"].as_array().expect("entries");
    assert!(
        !entries.is_empty() && entries.iter().all(|e| e["tenant"] == "globex"),
        "{audit}"
    );
    // Policies: each tenant's own only.
    for doc in [
        "tenant = \"acme\"\nversion = 1\n",
        "tenant = \"globex\"\nversion = 1\n",
    ] {
        let signed =
            dmsc_policy::SignedPolicy::sign_operator(&mesh.ca, doc.as_bytes()).expect("sign");
        sec.apply_policy(signed.to_json().as_bytes(), "test")
            .expect("apply");
    }
    let all = get_json(admin, "/v1/policies", Some(&root)).await;
    assert_eq!(tenants_of(&all["policies"]), ["acme", "globex"]);
    let mine = get_json(admin, "/v1/policies", Some(&acme)).await;
    assert_eq!(tenants_of(&mine["policies"]), ["acme"]);
    get_json(admin, "/v1/policies/acme", Some(&acme)).await;
    let (status, body) = call(admin, Method::GET, "/v1/policies/globex", Some(&acme)).await;
    assert_eq!(status, 403, "{body}");
    // What spans tenants is the admin's.
    for path in ["/metrics", "/v1/revocations", "/v1/admin-tokens"] {
        let (status, body) = call(admin, Method::GET, path, Some(&acme)).await;
        assert_eq!(status, 403, "{path}: {body}");
    }

    // A read token never changes anything: 403 with the reason.
    let onboard = serde_json::json!({"tenant": "acme", "url": a.url(), "name": "again"});
    let (status, body) = admin_call(
        admin,
        Method::POST,
        "/v1/agents",
        Some(&acme),
        onboard.to_string().into(),
    )
    .await
    .expect("post");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("read-only token of tenant `acme`"), "{body}");
    let (status, _) = call(admin, Method::DELETE, "/v1/agents/acme/helper", Some(&acme)).await;
    assert_eq!(status, 403);
    let again = dmsc_node::ops::admin_token_create(admin, &acme, "acme", None).await;
    assert!(
        matches!(
            again,
            Err(dmsc_node::admin::status::StatusError::Http { status: 403, .. })
        ),
        "{again:?}"
    );
    // A wrong token is a 401, even where no token is needed.
    let (status, _) = call(
        admin,
        Method::GET,
        "/v1/status",
        Some("dmsc-rt.0011223344556677.00"),
    )
    .await;
    assert_eq!(status, 401);

    // Revoked: the token stops working at once.
    let id = made["id"].as_str().expect("id");
    dmsc_node::ops::admin_token_revoke(admin, &root, id)
        .await
        .expect("revoke");
    let (status, body) = call(admin, Method::GET, "/v1/agents", Some(&acme)).await;
    assert_eq!(status, 401, "{body}");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_reads_leave_node_health_only_without_a_token() {
    let mesh = mesh_of(&["n0"], |_, raw| raw.admin.open_reads = Some(false)).await;
    let admin = mesh.nodes[0].bound().admin;
    for path in ["/live", "/ready", "/v1/check"] {
        let (status, body) = call(admin, Method::GET, path, None).await;
        assert!(
            status == 200 || (path == "/ready" && status == 503),
            "{path}: {status} {body}"
        );
    }
    for path in [
        "/v1/status",
        "/v1/agents",
        "/v1/audit",
        "/metrics",
        "/v1/revocations",
    ] {
        let (status, body) = call(admin, Method::GET, path, None).await;
        assert_eq!(status, 401, "{path}: {body}");
        assert!(body.contains("open_reads = false"), "{body}");
    }
    let err = dmsc_node::admin::status::fetch(admin)
        .await
        .expect_err("needs a token");
    assert!(err.to_string().contains("401"), "{err}");
    let root = mesh.admin_token(0);
    let acme =
        dmsc_node::ops::admin_token_create(admin, &root, "acme", Some(Duration::from_secs(60)))
            .await
            .expect("token");
    assert!(acme["expires_at"].as_u64().is_some());
    let acme = acme["token"].as_str().expect("token");
    get_json(admin, "/v1/status", Some(acme)).await;
    get_json(admin, "/v1/status", Some(&root)).await;
    let (status, body) = call(admin, Method::GET, "/metrics", Some(&root)).await;
    assert_eq!(status, 200, "{body}");
    mesh.stop().await;
}

/// A node that knows a relay but holds no session with it says so in
/// `status`: a node cut off from its relays otherwise looks "direct", with
/// nothing wrong shown (found in network namespaces behind a NAT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_warns_when_no_relay_it_knows_has_a_session() {
    let mesh = mesh_of(&["n0", "n1"], |i, raw| {
        if i == 0 {
            // Nothing listens there.
            raw.overlay.relays = Some(vec!["127.0.0.1:9".into()]);
        }
    })
    .await;
    let token = mesh.admin_token(0);
    let s = get_json(mesh.nodes[0].bound().admin, "/v1/status", Some(&token)).await;
    let warning = s["paths"]["warning"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        warning.contains("no session with any relay it knows (127.0.0.1:9)"),
        "{}",
        s["paths"]
    );
    let token = mesh.admin_token(1);
    let s = get_json(mesh.nodes[1].bound().admin, "/v1/status", Some(&token)).await;
    assert!(s["paths"].get("warning").is_none(), "{}", s["paths"]);
    mesh.stop().await;
}
