//! Crypto-shredding end to end on a two-node mesh: tenant payload in each
//! node's audit log is sealed with that node's key for the tenant; an
//! operator `delete` statement applied through one node's admin API spreads
//! by gossip and makes every node destroy its keys, after which the
//! tenant's audit payload cannot be opened (not even by a fresh reader of
//! the key store on disk), another tenant's still opens, and the audit
//! chains still verify against the mesh CA.

use std::time::Duration;

use dmsc_audit::{Event, SealState};
use dmsc_node::demo::mesh::LocalMesh;

use super::{agent, eventually, mesh_of, message_send};

const SECRETS: [&str; 3] = [
    "acme-secret-caller",
    "agent:acme-secret-target",
    "acme-secret-reason",
];

fn denied(tenant: &str, caller: &str, target: &str, reason: &str) -> Event {
    Event::tenant(
        tenant,
        dmsc_audit::Denied {
            caller: caller.into(),
            target: target.into(),
            reason: reason.into(),
            rule: None,
        },
    )
}

fn audit_dir(mesh: &LocalMesh, i: usize) -> std::path::PathBuf {
    mesh.node_dir(i).join("data").join("audit")
}

async fn flush(mesh: &LocalMesh, i: usize) {
    mesh.nodes[i]
        .security()
        .audit
        .as_ref()
        .expect("audit on")
        .flush()
        .await
        .expect("flush");
}

/// Every line of node `i`'s log opened with `sealer`: (tenant, kind, state, text).
fn opened(
    mesh: &LocalMesh,
    i: usize,
    sealer: &dyn dmsc_audit::Sealer,
) -> Vec<(Option<String>, String, SealState, String)> {
    dmsc_audit::tail(audit_dir(mesh, i), None)
        .expect("tail")
        .map(|l| {
            let mut l = l.expect("line");
            let st = dmsc_audit::open_line(&mut l, Some(sealer));
            (l.tenant.clone(), l.kind.clone(), st, l.to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_delete_statement_shreds_its_audit_payload_on_every_node() {
    let mesh = mesh_of(&["n0", "n1"], |_, _| {}).await;
    let billing = agent("billing", &["invoice"], "Pay invoices").await;
    mesh.attach(1, &billing.url(), None).await.expect("attach");
    eventually(Duration::from_secs(5), "billing routable", || {
        mesh.routable_everywhere("billing")
    })
    .await;
    // A real delegation (audited with tenant acme on n0), plus recorded
    // events with recognisable payload for acme and for another tenant.
    let (resp, body) = mesh
        .call(
            0,
            "POST",
            "billing.acme.dmsc",
            "/",
            &[],
            message_send("pay"),
        )
        .await
        .expect("call");
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    for i in 0..2 {
        let sec = mesh.nodes[i].security();
        sec.record(denied("acme", SECRETS[0], SECRETS[1], SECRETS[2]));
        sec.record(denied(
            "globex",
            "globex-caller",
            "agent:globex-target",
            "globex-reason",
        ));
        flush(&mesh, i).await;
    }

    // At rest: no acme payload in the clear; opened with the key it reads.
    for i in 0..2 {
        let raw = std::fs::read_to_string(audit_dir(&mesh, i).join(dmsc_audit::LOG_FILE))
            .expect("raw log");
        for s in SECRETS.iter().chain(["globex-caller"].iter()) {
            assert!(!raw.contains(s), "node {i}: `{s}` in the clear:\n{raw}");
        }
        let sec = mesh.nodes[i].security();
        let sealer = dmsc_node::security::tenant_keys::AuditSealer(sec.tenant_keys.store.clone());
        let lines = opened(&mesh, i, &sealer);
        let acme_denied: Vec<_> = lines
            .iter()
            .filter(|(t, k, ..)| t.as_deref() == Some("acme") && k == "denied")
            .collect();
        assert_eq!(acme_denied.len(), 1, "node {i}: {lines:#?}");
        assert_eq!(acme_denied[0].2, SealState::Opened);
        assert!(acme_denied[0].3.contains(SECRETS[0]));
    }
    // The delegation on n0: its caller and target sealed, its outcome clear.
    let raw0 =
        std::fs::read_to_string(audit_dir(&mesh, 0).join(dmsc_audit::LOG_FILE)).expect("raw log");
    let delegation = raw0
        .lines()
        .find(|l| l.contains("\"kind\":\"delegation\""))
        .expect("a delegation line on n0");
    assert!(delegation.contains("\"outcome\":\"ok\""), "{delegation}");
    assert!(
        delegation.contains("\"sealed\":\"sealed:v1:acme:"),
        "{delegation}"
    );
    assert!(!delegation.contains("\"caller\""), "{delegation}");

    // The operator deletes acme through n0's admin API.
    let st = dmsc_transport::TenantKeyStatement::sign(&mesh.ca, "acme", "delete").expect("sign");
    let v = dmsc_node::ops::tenant_key_apply(
        mesh.nodes[0].bound().admin,
        &mesh.admin_token(0),
        st.to_json(),
    )
    .await
    .expect("apply");
    assert_eq!(v["new"], true, "{v}");
    assert_eq!(v["keys_destroyed"], 1, "{v}");
    // n1 learns it by gossip and shreds its own key.
    eventually(Duration::from_secs(10), "n1 shreds acme's keys", || {
        mesh.nodes[1]
            .security()
            .tenant_keys
            .store
            .info("acme")
            .is_some_and(|i| i.shredded && i.keys.is_empty())
    })
    .await;
    // The admin API lists key ids and the applied statement, no key material.
    let (status, body) = dmsc_node::admin::status::admin_call(
        mesh.nodes[1].bound().admin,
        hyper::Method::GET,
        "/v1/tenant-keys",
        None,
        bytes::Bytes::new(),
    )
    .await
    .expect("GET /v1/tenant-keys");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let acme = v["tenants"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["tenant"] == "acme"))
        .expect("acme listed");
    assert_eq!(acme["shredded"], true, "{v}");
    assert_eq!(acme["statements"][0]["action"], "delete", "{v}");
    assert!(!body.contains("wrapped"), "{body}");
    // A forged statement is refused by the admin API.
    let rogue =
        dmsc_transport::pki::CertificateAuthority::generate("mesh.dmsc.local").expect("rogue ca");
    let forged =
        dmsc_transport::TenantKeyStatement::sign(&rogue, "globex", "delete").expect("sign");
    assert!(dmsc_node::ops::tenant_key_apply(
        mesh.nodes[0].bound().admin,
        &mesh.admin_token(0),
        forged.to_json(),
    )
    .await
    .is_err());

    let roots = dmsc_audit::VerifyOptions::with_roots_pem(&mesh.ca.cert_pem).expect("roots");
    for i in 0..2 {
        // Events about acme after the delete are not written in the clear.
        mesh.nodes[i]
            .security()
            .record(denied("acme", SECRETS[0], SECRETS[1], SECRETS[2]));
        flush(&mesh, i).await;
        let raw = std::fs::read_to_string(audit_dir(&mesh, i).join(dmsc_audit::LOG_FILE))
            .expect("raw log");
        for s in SECRETS {
            assert!(
                !raw.contains(s),
                "node {i}: `{s}` in the clear after delete"
            );
        }
        // A reader that loads the key store from disk, as `audit tail` does.
        let sealer = dmsc_node::ops::audit_sealer(&mesh.node_dir(i).join("data"))
            .expect("key store")
            .expect("the node has one");
        let lines = opened(&mesh, i, &sealer);
        let mut acme_payload = 0;
        let mut globex_opened = 0;
        let mut delete_audited = false;
        for (tenant, kind, st, text) in &lines {
            match (tenant.as_deref(), kind.as_str()) {
                (Some("acme"), "tenant_key") => {
                    assert!(text.contains("\"action\":\"delete\""), "{text}");
                    delete_audited = true;
                }
                (Some("acme"), _) => {
                    acme_payload += 1;
                    assert!(!text.contains(SECRETS[0]), "node {i}: {text}");
                    match st {
                        SealState::Sealed(why) => {
                            assert!(why.contains("key destroyed"), "node {i}: {why}")
                        }
                        SealState::Withheld(why) => {
                            assert!(why.contains("deleted"), "node {i}: {why}")
                        }
                        other => panic!("node {i}: acme payload readable ({other:?}): {text}"),
                    }
                }
                (Some("globex"), _) => {
                    assert_eq!(*st, SealState::Opened, "node {i}: {text}");
                    assert!(text.contains("globex-caller"));
                    globex_opened += 1;
                }
                _ => {}
            }
        }
        assert!(acme_payload >= 2, "node {i}: {lines:#?}");
        assert_eq!(globex_opened, 1, "node {i}");
        assert!(delete_audited, "node {i}: the delete is audited");
        // The chain still verifies, with no key, against the mesh CA.
        let report = dmsc_audit::verify(audit_dir(&mesh, i), &roots).expect("verify");
        assert!(report.is_clean(), "node {i}: {:?}", report.problem);
    }
    mesh.stop().await;
}
