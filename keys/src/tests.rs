use super::*;
use std::os::unix::fs::PermissionsExt as _;

fn store() -> (tempfile::TempDir, KeyStore) {
    let dir = tempfile::tempdir().expect("dir");
    let ks = KeyStore::load(dir.path()).expect("open");
    (dir, ks)
}

#[test]
fn seal_open_round_trip_and_kek_is_private() {
    let (dir, ks) = store();
    let kek = dir.path().join(KEYS_DIR).join(KEK_FILE);
    let meta = std::fs::metadata(&kek).expect("kek exists");
    assert_eq!(meta.len(), 32);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let s = ks.seal("acme", "ctx", b"hello caller").expect("seal");
    assert!(s.starts_with("sealed:v1:acme:1:"), "{s}");
    assert!(!s.contains("hello"));
    assert_eq!(ks.open("ctx", &s).expect("open"), b"hello caller");
    // Two seals of the same text differ (random nonces).
    assert_ne!(
        ks.seal("acme", "ctx", b"x").ok(),
        ks.seal("acme", "ctx", b"x").ok()
    );
    let info = ks.info("acme").expect("info");
    assert_eq!(info.keys, vec![1]);
    assert!(!info.shredded);
    let file = std::fs::metadata(dir.path().join(KEYS_DIR).join("acme.json")).expect("file");
    assert_eq!(file.permissions().mode() & 0o777, 0o600);
}

#[test]
fn sealed_values_cannot_move_between_tenants_or_contexts() {
    let (_d, ks) = store();
    let a = ks.seal("acme", "audit:n1:3", b"secret").expect("seal");
    ks.seal("globex", "x", b"make globex key 1").expect("seal");
    assert!(matches!(
        ks.open("audit:n1:4", &a),
        Err(KeyError::Tampered { .. })
    ));
    let moved = a.replacen("sealed:v1:acme:", "sealed:v1:globex:", 1);
    assert!(matches!(
        ks.open("audit:n1:3", &moved),
        Err(KeyError::Tampered { .. })
    ));
    // A flipped ciphertext byte.
    let mut tok = Token::parse(&a).expect("parse");
    let last = tok.sealed.len() - 1;
    tok.sealed[last] ^= 1;
    assert!(matches!(
        ks.open("audit:n1:3", &tok.encode()),
        Err(KeyError::Tampered { .. })
    ));
    assert!(matches!(
        ks.open("c", "plain text"),
        Err(KeyError::Malformed(_))
    ));
    assert!(matches!(
        ks.seal("../etc", "c", b"x"),
        Err(KeyError::BadTenant { .. })
    ));
}

#[test]
fn rotation_keeps_old_data_readable_and_seals_with_the_new_key() {
    let dir = tempfile::tempdir().expect("dir");
    let ks = KeyStore::load(dir.path()).expect("open");
    let old = ks.seal("acme", "c", b"old").expect("seal");
    assert_eq!(ks.rotate("acme").expect("rotate"), 2);
    let new = ks.seal("acme", "c", b"new").expect("seal");
    assert!(new.starts_with("sealed:v1:acme:2:"), "{new}");
    assert_eq!(ks.open("c", &old).expect("old opens"), b"old");
    assert_eq!(ks.open("c", &new).expect("new opens"), b"new");
    drop(ks);
    // Survives a restart: keys unwrap with the persisted KEK.
    let ks = KeyStore::load(dir.path()).expect("reopen");
    assert_eq!(ks.open("c", &old).expect("old opens"), b"old");
    assert_eq!(ks.open("c", &new).expect("new opens"), b"new");
    assert_eq!(ks.info("acme").expect("info").keys, vec![1, 2]);
}

#[test]
fn shredding_destroys_one_tenant_only_and_refuses_new_seals_until_rotate() {
    let dir = tempfile::tempdir().expect("dir");
    let ks = KeyStore::load(dir.path()).expect("open");
    let a1 = ks.seal("acme", "c", b"a1").expect("seal");
    ks.rotate("acme").expect("rotate");
    let a2 = ks.seal("acme", "c", b"a2").expect("seal");
    let g = ks.seal("globex", "c", b"g").expect("seal");
    let path = dir.path().join(KEYS_DIR).join("acme.json");
    let before = std::fs::read_to_string(&path).expect("read");
    assert_eq!(ks.shred("acme").expect("shred"), 2);
    for t in [&a1, &a2] {
        match ks.open("c", t) {
            Err(KeyError::Shredded { tenant, .. }) => assert_eq!(tenant, "acme"),
            other => panic!("expected Shredded, got {other:?}"),
        }
    }
    assert_eq!(ks.open("c", &g).expect("globex unaffected"), b"g");
    assert!(matches!(
        ks.seal("acme", "c", b"more"),
        Err(KeyError::SealRefused { .. })
    ));
    // No wrapped key survives in the file.
    let after = std::fs::read_to_string(&path).expect("read");
    let wrapped: Vec<&str> = before
        .lines()
        .filter(|l| l.contains("\"wrapped\""))
        .collect();
    assert_eq!(wrapped.len(), 2);
    for w in wrapped {
        assert!(!after.contains(w.trim()), "wrapped key left behind");
    }
    assert!(!after.contains("wrapped"));
    drop(ks);
    // Still shredded after a restart, and the error still says why.
    let ks = KeyStore::load(dir.path()).expect("reopen");
    assert!(matches!(ks.open("c", &a1), Err(KeyError::Shredded { .. })));
    assert!(matches!(
        ks.seal("acme", "c", b"x"),
        Err(KeyError::SealRefused { .. })
    ));
    // A rotate starts a new generation; ids are not reused.
    assert_eq!(ks.rotate("acme").expect("rotate"), 3);
    let a3 = ks.seal("acme", "c", b"a3").expect("seal after rotate");
    assert_eq!(ks.open("c", &a3).expect("open"), b"a3");
    assert!(matches!(ks.open("c", &a2), Err(KeyError::Shredded { .. })));
    assert!(!ks.info("acme").expect("info").shredded);
}

#[test]
fn unknown_keys_say_no_key_not_shredded() {
    let (_d1, a) = store();
    let (_d2, b) = store();
    let s = a.seal("acme", "c", b"x").expect("seal");
    assert!(matches!(b.open("c", &s), Err(KeyError::NoKey { .. })));
    b.seal("acme", "c", b"y").expect("b's own key 1");
    // Same tenant and id, another node's key: does not open.
    assert!(matches!(b.open("c", &s), Err(KeyError::Tampered { .. })));
}

#[test]
fn statements_apply_once_in_order() {
    let dir = tempfile::tempdir().expect("dir");
    let ks = KeyStore::load(dir.path()).expect("open");
    let s = ks.seal("acme", "c", b"x").expect("seal");
    assert_eq!(
        ks.apply("acme", KeyAction::RotateKey, 10).expect("apply"),
        Applied::Rotated { key_id: 2 }
    );
    assert_eq!(
        ks.apply("acme", KeyAction::RotateKey, 10).expect("apply"),
        Applied::AlreadyApplied { applied_seq: 10 }
    );
    assert_eq!(
        ks.apply("acme", KeyAction::RotateKey, 9).expect("older"),
        Applied::AlreadyApplied { applied_seq: 10 }
    );
    assert_eq!(ks.open("c", &s).expect("still readable"), b"x");
    drop(ks);
    let ks = KeyStore::load(dir.path()).expect("reopen");
    assert_eq!(
        ks.apply("acme", KeyAction::RotateKey, 10).expect("apply"),
        Applied::AlreadyApplied { applied_seq: 10 },
        "the applied sequence survives a restart"
    );
    assert_eq!(
        ks.apply("acme", KeyAction::Delete, 11).expect("delete"),
        Applied::Shredded {
            keys: 2,
            new_key: None
        }
    );
    // A delete for a tenant this node never had keys for leaves a tombstone.
    assert_eq!(
        ks.apply("initech", KeyAction::Delete, 1).expect("delete"),
        Applied::Shredded {
            keys: 0,
            new_key: None
        }
    );
    assert!(matches!(
        ks.seal("initech", "c", b"x"),
        Err(KeyError::SealRefused { .. })
    ));
    let list: Vec<String> = ks.list().into_iter().map(|i| i.tenant).collect();
    assert_eq!(list, vec!["acme".to_string(), "initech".to_string()]);
}

#[test]
fn a_late_delete_shreds_then_makes_the_newer_rotates_generation_and_replays_change_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let ks = KeyStore::load(dir.path()).expect("open");
    let old = ks.seal("acme", "c", b"old").expect("seal");
    // This node hears rotate 6 before delete 5.
    assert_eq!(
        ks.apply("acme", KeyAction::RotateKey, 6).expect("rotate"),
        Applied::Rotated { key_id: 2 }
    );
    assert_eq!(
        ks.apply("acme", KeyAction::Delete, 5).expect("late delete"),
        Applied::Shredded {
            keys: 2,
            new_key: Some(3)
        }
    );
    assert!(matches!(ks.open("c", &old), Err(KeyError::Shredded { .. })));
    let new = ks
        .seal("acme", "c", b"new")
        .expect("the new generation seals");
    drop(ks);
    // Replaying both after a restart (as a node does with its persisted
    // statements) changes nothing: the new generation survives.
    let ks = KeyStore::load(dir.path()).expect("reopen");
    for (action, seq) in [(KeyAction::Delete, 5), (KeyAction::RotateKey, 6)] {
        assert!(matches!(
            ks.apply("acme", action, seq).expect("replay"),
            Applied::AlreadyApplied { .. }
        ));
    }
    assert_eq!(ks.open("c", &new).expect("still opens"), b"new");
    // In order (delete 7, then rotate 8) on the same store.
    assert_eq!(
        ks.apply("acme", KeyAction::Delete, 7).expect("delete"),
        Applied::Shredded {
            keys: 1,
            new_key: None
        }
    );
    assert_eq!(
        ks.apply("acme", KeyAction::RotateKey, 8).expect("rotate"),
        Applied::Rotated { key_id: 4 }
    );
    drop(ks);
    let ks = KeyStore::load(dir.path()).expect("reopen");
    for (action, seq) in [(KeyAction::Delete, 7), (KeyAction::RotateKey, 8)] {
        assert!(matches!(
            ks.apply("acme", action, seq).expect("replay"),
            Applied::AlreadyApplied { .. }
        ));
    }
    assert_eq!(ks.info("acme").expect("info").keys, vec![4]);
}

#[test]
fn a_delete_cut_short_after_zeroing_is_finished_at_load() {
    let dir = tempfile::tempdir().expect("dir");
    let ks = KeyStore::load(dir.path()).expect("open");
    let s = ks.seal("acme", "c", b"x").expect("seal");
    drop(ks);
    // Simulate the crash: the tombstone is complete in the temp file, the
    // old file zeroed, the rename not done.
    let path = dir.path().join(KEYS_DIR).join("acme.json");
    let len = std::fs::metadata(&path).expect("meta").len() as usize;
    let ks = KeyStore::load(dir.path()).expect("open");
    ks.shred("acme").expect("shred");
    drop(ks);
    let tombstone = std::fs::read(&path).expect("tombstone");
    std::fs::write(fsutil::tmp_path(&path), &tombstone).expect("tmp");
    std::fs::write(&path, vec![0u8; len]).expect("zeroed");
    let ks = KeyStore::load(dir.path()).expect("loads, finishing the delete");
    assert!(matches!(ks.open("c", &s), Err(KeyError::Shredded { .. })));
    assert!(!fsutil::tmp_path(&path).exists());
    drop(ks);
    // Zeros with nothing beside them: refused, not silently empty.
    std::fs::write(&path, vec![0u8; 10]).expect("zeroed");
    assert!(matches!(
        KeyStore::load(dir.path()),
        Err(KeyError::Corrupt { .. })
    ));
}

#[test]
fn a_replaced_kek_is_reported_not_ignored() {
    let dir = tempfile::tempdir().expect("dir");
    let ks = KeyStore::load(dir.path()).expect("open");
    ks.seal("acme", "c", b"x").expect("seal");
    drop(ks);
    let kek = dir.path().join(KEYS_DIR).join(KEK_FILE);
    std::fs::write(&kek, [7u8; 32]).expect("replace kek");
    let err = KeyStore::load(dir.path()).expect_err("wrong kek");
    assert!(err.to_string().contains("does not unwrap"), "{err}");
    std::fs::write(&kek, [7u8; 5]).expect("short kek");
    assert!(matches!(
        KeyStore::load(dir.path()),
        Err(KeyError::Corrupt { .. })
    ));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    #[test]
    fn any_plaintext_round_trips(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), ctx in "\\PC{0,20}") {
        let (_d, ks) = store();
        let s = ks.seal("t1", &ctx, &data).expect("seal");
        proptest::prop_assert_eq!(ks.open(&ctx, &s).expect("open"), data);
    }
}

#[test]
fn nonces_are_never_reused_across_pool_refills() {
    let (_dir, ks) = store();
    // Several refills of the pool: every seal has its own nonce.
    let n = 3 * NONCE_POOL / NONCE_LEN + 7;
    let mut seen = std::collections::HashSet::new();
    for i in 0..n {
        let s = ks.seal("acme", "ctx", b"x").expect("seal");
        let tok = token::Token::parse(&s).expect("parse");
        let nonce: [u8; NONCE_LEN] = tok.sealed[..NONCE_LEN].try_into().expect("nonce");
        assert_ne!(nonce, [0; NONCE_LEN], "seal {i}");
        assert!(seen.insert(nonce), "nonce reused at seal {i}");
        assert_eq!(ks.open("ctx", &s).expect("open"), b"x");
    }
}
