//! Crypto-shredding at the audit + key store level: a tenant's audit
//! payload is sealed with its key as written, opens while the key exists,
//! becomes unreadable once the key is destroyed, and the chain (with signed
//! checkpoints) verifies before and after without any key.

use std::path::Path;
use std::sync::Arc;

use dmsc_audit::*;
use dmsc_keys::{KeyAction, KeyError, KeyStore};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};

const NODE: &str = "eu-1";

/// The node's adapter, in small: the audit crate's `Sealer` over a key store.
#[derive(Debug)]
struct Keys(Arc<KeyStore>);

impl Sealer for Keys {
    fn seal(&self, tenant: &str, context: &str, plaintext: &[u8]) -> Result<String, String> {
        self.0
            .seal(tenant, context, plaintext)
            .map_err(|e| e.to_string())
    }
    fn open(&self, context: &str, sealed: &str) -> Result<Vec<u8>, String> {
        self.0.open(context, sealed).map_err(|e| match e {
            KeyError::Shredded { .. } => format!("key destroyed: {e}"),
            other => other.to_string(),
        })
    }
}

fn signer_and_root() -> (Signer, Vec<u8>) {
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, "test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("node key");
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, NODE);
    params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://test.dmsc/node/{NODE}")
            .try_into()
            .expect("uri"),
    )];
    let cert = params.signed_by(&key, &issuer).expect("node cert");
    (
        Signer::from_pem(&key.serialize_pem(), &cert.pem()).expect("signer"),
        ca_cert.der().to_vec(),
    )
}

fn delegation(tenant: &str, caller: &str, target: &str) -> Event {
    Event::tenant(
        tenant,
        Delegation {
            caller: caller.into(),
            target: target.into(),
            route: "only candidate".into(),
            agent: Some(format!("{target}-agent")),
            serving_node: Some("us-2".into()),
            outcome: "ok".into(),
            status: Some(200),
            duration_ms: 3,
            trace_id: Some("trace-123".into()),
        },
    )
}

/// Every line, opened where the sealer can: (tenant, state, line).
fn tail_all(dir: &Path, sealer: &dyn Sealer) -> Vec<(Option<String>, SealState, Line)> {
    tail(dir, None)
        .expect("tail")
        .map(|l| {
            let mut l = l.expect("line");
            let st = open_line(&mut l, Some(sealer));
            (l.tenant.clone(), st, l)
        })
        .collect()
}

#[tokio::test]
async fn deleting_a_tenants_keys_shreds_its_audit_payload_and_the_chain_still_verifies() {
    let data = tempfile::tempdir().expect("data dir");
    let keys = Arc::new(KeyStore::load(data.path()).expect("keys"));
    let sealer: Arc<dyn Sealer> = Arc::new(Keys(keys.clone()));
    let dir = data.path().join("audit");
    let (signer, root) = signer_and_root();
    let mut cfg = AuditConfig::new(&dir, NODE);
    cfg.checkpoint_every = 3;
    cfg.sealer = Some(sealer.clone());
    let (h, task) = AuditLog::open(cfg, Some(signer)).expect("open");
    h.record(delegation(
        "acme",
        "acme-secret-caller",
        "acme-hidden-target",
    ))
    .await
    .expect("record");
    h.record(delegation("globex", "globex-caller", "globex-target"))
        .await
        .expect("record");
    h.record(Event::tenant(
        "acme",
        Denied {
            caller: "acme-secret-caller".into(),
            target: "agent:acme-denied-target".into(),
            reason: "acme-private-reason".into(),
            rule: None,
        },
    ))
    .await
    .expect("record");
    h.record(Event::global(Revocation {
        serial: "abcd".into(),
        reason: "retired".into(),
        source: "admin".into(),
    }))
    .await
    .expect("record");
    h.flush().await.expect("flush");

    // The raw file holds no tenant payload in the clear, but keeps what
    // reports need.
    let raw = std::fs::read_to_string(dir.join(LOG_FILE)).expect("raw");
    for secret in [
        "acme-secret-caller",
        "acme-hidden-target",
        "acme-denied-target",
        "acme-private-reason",
        "globex-caller",
        "trace-123",
    ] {
        assert!(!raw.contains(secret), "`{secret}` is in the clear:\n{raw}");
    }
    assert!(raw.contains("\"outcome\":\"ok\""), "{raw}");
    assert!(raw.contains("\"sealed\":\"sealed:v1:acme:1:"), "{raw}");
    assert!(
        raw.contains("\"serial\":\"abcd\""),
        "operator events stay clear"
    );
    let opts = VerifyOptions {
        roots: vec![root.clone()],
    };
    let before = verify(&dir, &opts).expect("verify");
    assert!(before.is_clean(), "{:?}", before.problem);

    // With the key, tail opens everything back into typed events.
    let lines = tail_all(&dir, sealer.as_ref());
    let acme: Vec<_> = lines
        .iter()
        .filter(|(t, ..)| t.as_deref() == Some("acme"))
        .collect();
    assert_eq!(acme.len(), 2);
    for (_, st, l) in &acme {
        assert_eq!(*st, SealState::Opened);
        match l.body().expect("typed body") {
            Body::Event(EventKind::Delegation(d)) => {
                assert_eq!(d.caller, "acme-secret-caller");
                assert_eq!(d.target, "acme-hidden-target");
                assert_eq!(d.outcome, "ok");
                assert_eq!(d.trace_id.as_deref(), Some("trace-123"));
            }
            Body::Event(EventKind::Denied(d)) => {
                assert_eq!(d.reason, "acme-private-reason");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    // The operator deletes acme: its key is destroyed.
    assert_eq!(
        keys.apply("acme", KeyAction::Delete, 1).expect("delete"),
        dmsc_keys::Applied::Shredded {
            keys: 1,
            new_key: None
        }
    );
    // Events about acme after the delete are not written in the clear.
    h.record(delegation("acme", "acme-after-delete", "x"))
        .await
        .expect("record");
    h.flush().await.expect("flush");
    task.shutdown().await.expect("shutdown");
    let raw = std::fs::read_to_string(dir.join(LOG_FILE)).expect("raw");
    assert!(!raw.contains("acme-after-delete"));

    let lines = tail_all(&dir, sealer.as_ref());
    let mut acme_seen = 0;
    let mut globex_opened = 0;
    for (tenant, st, l) in &lines {
        match tenant.as_deref() {
            Some("acme") => {
                acme_seen += 1;
                let text = l.to_string();
                assert!(!text.contains("acme-secret-caller"), "{text}");
                match st {
                    SealState::Sealed(why) => {
                        assert!(why.contains("key destroyed"), "{why}");
                        assert!(text.contains("\"unreadable\""), "{text}");
                    }
                    SealState::Withheld(why) => assert!(why.contains("deleted"), "{why}"),
                    other => panic!("acme line should be unreadable, is {other:?}: {text}"),
                }
            }
            Some("globex") => {
                assert_eq!(*st, SealState::Opened);
                assert!(l.to_string().contains("globex-caller"));
                globex_opened += 1;
            }
            _ => {}
        }
    }
    assert_eq!(acme_seen, 3);
    assert_eq!(globex_opened, 1);
    // The chain, checkpoints included, still verifies with no key at all.
    let after = verify(&dir, &opts).expect("verify");
    assert!(after.is_clean(), "{:?}", after.problem);
    assert!(after.checkpoints >= 2, "{after:?}");
    assert!(after.tenants.contains("acme"));

    // And even a reader holding a fresh copy of the key store cannot open
    // them: the destruction is on disk, not only in memory.
    let reloaded = Keys(Arc::new(KeyStore::load(data.path()).expect("reload")));
    for (_, _, l) in tail_all(&dir, &reloaded) {
        if l.tenant.as_deref() == Some("acme") {
            assert!(!l.to_string().contains("acme-secret-caller"));
        }
    }
}

#[tokio::test]
async fn a_sealed_payload_cannot_be_moved_to_another_line() {
    let data = tempfile::tempdir().expect("data dir");
    let keys = Arc::new(KeyStore::load(data.path()).expect("keys"));
    let sealer: Arc<dyn Sealer> = Arc::new(Keys(keys));
    let dir = data.path().join("audit");
    let mut cfg = AuditConfig::new(&dir, NODE);
    cfg.sealer = Some(sealer.clone());
    let (h, task) = AuditLog::open(cfg, None).expect("open");
    h.record(delegation("acme", "first", "t"))
        .await
        .expect("record");
    h.record(delegation("acme", "second", "t"))
        .await
        .expect("record");
    task.shutdown().await.expect("shutdown");
    let mut lines: Vec<Line> = tail(&dir, None)
        .expect("tail")
        .map(|l| l.expect("line"))
        .filter(|l| l.tenant.is_some())
        .collect();
    assert_eq!(lines.len(), 2);
    let first_token = lines[0].detail["sealed"].clone();
    lines[1].detail["sealed"] = first_token;
    match open_line(&mut lines[1], Some(sealer.as_ref())) {
        SealState::Sealed(why) => assert!(why.contains("does not open"), "{why}"),
        other => panic!("a moved sealed value must not open, got {other:?}"),
    }
    assert_eq!(
        open_line(&mut lines[0], Some(sealer.as_ref())),
        SealState::Opened
    );
    // Without keys, tail still shows the line, saying why it is sealed.
    let mut l = tail(&dir, None)
        .expect("tail")
        .map(|l| l.expect("line"))
        .find(|l| l.tenant.is_some())
        .expect("a tenant line");
    assert!(matches!(open_line(&mut l, None), SealState::Sealed(_)));
}
