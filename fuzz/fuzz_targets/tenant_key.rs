//! Fuzz what tenant keys read from outside: tenant key statements (from
//! gossip, any peer may publish one, and from the admin API), the gossip
//! value that carries them, and sealed-value tokens (from audit lines on
//! disk). `cargo +nightly fuzz run tenant_key`. Nothing may panic, nothing
//! a fuzzer makes up may verify against the test CA, and no made-up token
//! may open with a real key.
#![no_main]

use std::sync::OnceLock;

use dmsc_transport::pki::CertificateAuthority;
use dmsc_transport::TenantKeyStatement;
use libfuzzer_sys::fuzz_target;
use rustls::pki_types::CertificateDer;

fn roots() -> &'static Vec<CertificateDer<'static>> {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let ca = CertificateAuthority::generate("fuzz.test").expect("ca");
        dmsc_transport::identity::certs_from_pem(&ca.cert_pem, std::path::Path::new("ca"))
            .expect("roots")
    })
}

fn keys() -> &'static dmsc_keys::KeyStore {
    static KEYS: OnceLock<(tempfile::TempDir, dmsc_keys::KeyStore)> = OnceLock::new();
    &KEYS
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("dir");
            let ks = dmsc_keys::KeyStore::load(dir.path()).expect("key store");
            ks.seal("acme", "fuzz", b"x").expect("a key for acme");
            (dir, ks)
        })
        .1
}

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = TenantKeyStatement::parse(data) {
        assert!(data.len() <= dmsc_transport::tenant_key::MAX_TENANT_KEY_STATEMENT_BYTES);
        assert!(s.verify(roots()).is_err(), "a made-up statement verified");
        let again = TenantKeyStatement::parse(s.to_json().as_bytes()).expect("round trip");
        assert_eq!(again, s);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        for s in dmsc_node::security::tenant_keys::parse_gossip_value(text) {
            assert!(s.verify(roots()).is_err(), "a made-up statement verified");
        }
        if let Ok(t) = dmsc_keys::Token::parse(text) {
            assert_eq!(dmsc_keys::Token::parse(&t.encode()).expect("round trip"), t);
        }
        assert!(keys().open("fuzz", text).is_err(), "a made-up token opened");
    }
});
