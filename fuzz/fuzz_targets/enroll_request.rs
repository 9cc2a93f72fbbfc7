//! Fuzz the enrollment and renewal body parsers (bodies come from agents
//! that are not enrolled yet, i.e. outside input):
//! `cargo +nightly fuzz run enroll_request`. Neither may panic; a request
//! that parses must respect the limits the parser promises.
#![no_main]

use dmsc_auth::{is_valid_name, parse_enroll, parse_renew};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_enroll(data) {
        assert!(data.len() <= 64 * 1024);
        assert!(!req.token.is_empty());
        assert!(req.tenant.as_deref().is_none_or(is_valid_name));
        assert!(req.agent.as_deref().is_none_or(is_valid_name));
        if let Some(csr) = &req.csr_pem {
            assert!(csr.contains("-----BEGIN CERTIFICATE REQUEST-----"));
        }
    }
    let _ = parse_renew(data);
});
