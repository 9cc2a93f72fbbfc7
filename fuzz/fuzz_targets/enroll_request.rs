//! Fuzz the enrollment and renewal body parsers (bodies come from agents
//! that are not enrolled yet, i.e. outside input):
//! `cargo +nightly fuzz run enroll_request`. Neither may panic; a request
//! that parses must respect the limits the parser promises.
#![no_main]

use std::sync::OnceLock;

use dmsc_auth::{is_valid_name, parse_enroll, parse_renew};
use dmsc_transport::pki::{AgentKey, CertificateAuthority, NodeIssuer, NODE_VALIDITY};
use libfuzzer_sys::fuzz_target;

/// One issuing certificate for the whole run: the CSR in a request goes
/// through the same parse-and-sign path the node runs.
fn issuer() -> &'static NodeIssuer {
    static ISSUER: OnceLock<NodeIssuer> = OnceLock::new();
    ISSUER.get_or_init(|| {
        let ca = CertificateAuthority::generate("fuzz.test").expect("ca");
        let creds = ca
            .issue_node_credentials("fuzz", NODE_VALIDITY, &[])
            .expect("creds");
        NodeIssuer::load_pem(&creds.issuer.cert_pem, &creds.issuer.key_pem).expect("issuer")
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_enroll(data) {
        assert!(data.len() <= 64 * 1024);
        assert!(!req.token.is_empty());
        assert!(req.tenant.as_deref().is_none_or(is_valid_name));
        assert!(req.agent.as_deref().is_none_or(is_valid_name));
        if let Some(csr) = &req.csr_pem {
            assert!(csr.contains("-----BEGIN CERTIFICATE REQUEST-----"));
            // Whatever the CSR asks for, the identity is the one given here.
            if let Ok(cert) = issuer().issue_agent(
                "acme",
                "fuzz",
                AgentKey::Csr(csr),
                std::time::Duration::from_secs(3600),
            ) {
                assert!(cert.key_pem.is_none());
                assert_eq!(cert.spiffe.to_string(), "spiffe://fuzz.test/tenant/acme/agent/fuzz");
            }
        }
    }
    let _ = parse_renew(data);
});
