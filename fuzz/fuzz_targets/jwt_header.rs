//! Fuzz bearer JWT parsing and validation (tokens come from any caller on the
//! ingress, i.e. outside input): `cargo +nightly fuzz run jwt_header`.
//! `parse_header` must never panic, and neither may the full validation
//! policy against a fixed key set holding one key of each supported type
//! (that covers every algorithm / key-family pairing the header can ask for).
//! Nothing here is signed with those keys, so nothing may be accepted.
#![no_main]

use std::sync::OnceLock;

use dmsc_auth::{parse_header, Jwks, JwksSource, JwtConfig, JwtPolicy};
use libfuzzer_sys::fuzz_target;

const JWKS: &str = include_str!("../../auth/tests/fixtures/public-jwks.json");

fn fixed() -> &'static (JwtPolicy, Jwks) {
    static FIXED: OnceLock<(JwtPolicy, Jwks)> = OnceLock::new();
    FIXED.get_or_init(|| {
        let cfg = JwtConfig::new(
            vec!["https://idp.test".into()],
            vec!["dmsc".into()],
            JwksSource::File("unused".into()),
        );
        let policy = JwtPolicy::new(&cfg).expect("fixed policy is valid");
        let jwks = Jwks::from_json(JWKS.as_bytes()).expect("fixture JWKS parses");
        (policy, jwks)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let header = parse_header(token);
    let (policy, jwks) = fixed();
    let verdict = policy.verify(jwks, token, time::OffsetDateTime::now_utc());
    assert!(
        verdict.is_err(),
        "an unsigned input was accepted: {token:?}"
    );
    // The policy runs the same parser first: what the header parser refuses
    // the policy refuses, for the same reason.
    if let Err(e) = header {
        assert_eq!(e.code(), "jwt_malformed");
        assert_eq!(verdict.err().map(|v| v.code()), Some("jwt_malformed"));
    }
});
