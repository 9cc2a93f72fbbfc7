//! Fuzz the revocation statement parser and signature check: statements
//! arrive from gossip (any peer may publish one) and from the admin API.
//! `cargo +nightly fuzz run revocation`. Nothing may panic, and nothing a
//! fuzzer makes up may verify against the test CA.
#![no_main]

use std::sync::OnceLock;

use dmsc_transport::pki::CertificateAuthority;
use dmsc_transport::Revocation;
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

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Revocation::parse(data) {
        assert!(data.len() <= dmsc_transport::revoke::MAX_REVOCATION_BYTES);
        assert!(r.verify(roots()).is_err(), "a made-up statement verified");
        let again = Revocation::parse(r.to_json().as_bytes()).expect("round trip");
        assert_eq!(again, r);
    }
});
