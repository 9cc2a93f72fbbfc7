//! The enrollment and renewal request formats (JSON bodies from agents).
//!
//! An agent enrolls with a join token, optionally sending a CSR (then its
//! private key never leaves it) and the tenant/agent it believes the token is
//! for (then a mismatch is refused without consuming the token). This module
//! only parses and bounds the bodies; it checks that a CSR is one PEM block
//! labelled `CERTIFICATE REQUEST` and leaves the DER and its signature to the
//! node's PKI code, which already parses X.509.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::AuthError;

/// Largest enrollment or renewal body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// Longest `token` value accepted (a join token is 68 characters).
const MAX_TOKEN_FIELD: usize = 1024;

const CSR_LABEL: &str = "CERTIFICATE REQUEST";

/// `POST /enroll` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollRequest {
    /// The join token, `dmsc-jt.<id>.<secret>` (checked by the token store).
    pub token: String,
    /// A PEM `CERTIFICATE REQUEST`; absent means the node generates the key.
    pub csr_pem: Option<String>,
    /// The tenant the caller expects the token to be for.
    pub tenant: Option<String>,
    /// The agent the caller expects the token to be for.
    pub agent: Option<String>,
}

/// `POST /renew` body (the caller is authenticated by its current certificate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewRequest {
    /// A PEM `CERTIFICATE REQUEST`; absent means the node generates the key.
    pub csr_pem: Option<String>,
}

/// Answer to a successful enrollment or renewal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollResponse {
    /// `spiffe://<trust-domain>/tenant/<tenant>/agent/<agent>` (as issued by the node).
    pub spiffe_id: String,
    /// PEM certificates, leaf first.
    pub certificate_chain: String,
    /// PEM private key; present only when the node generated the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    /// PEM bundle of the CA certificates to trust.
    pub ca: String,
    /// Serial number of the leaf (hex).
    pub serial: String,
    /// Expiry of the leaf.
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnroll {
    token: Option<String>,
    csr: Option<String>,
    tenant: Option<String>,
    agent: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRenew {
    csr: Option<String>,
}

fn invalid(why: impl Into<String>) -> AuthError {
    AuthError::EnrollInvalid(why.into())
}

fn check_size(body: &[u8]) -> Result<(), AuthError> {
    if body.len() > MAX_BODY {
        return Err(AuthError::EnrollTooLarge {
            len: body.len(),
            max: MAX_BODY,
        });
    }
    Ok(())
}

fn json_error(e: serde_json::Error) -> AuthError {
    // serde's messages already name the field ("unknown field `x`, expected
    // one of ..."); drop the position for syntax-free problems.
    let msg = e.to_string();
    let msg = match e.classify() {
        serde_json::error::Category::Data => msg
            .rsplit_once(" at line ")
            .map_or(msg.as_str(), |(m, _)| m)
            .to_owned(),
        _ => format!("body is not a JSON object: {msg}"),
    };
    invalid(msg)
}

fn check_name(field: &str, value: Option<String>) -> Result<Option<String>, AuthError> {
    match value {
        Some(v) if !crate::is_valid_name(&v) => Err(invalid(format!(
            "field `{field}` is not a valid name: `{}`",
            crate::jwt::shown(&v)
        ))),
        v => Ok(v),
    }
}

/// Checks that `pem` is exactly one PEM block labelled `CERTIFICATE REQUEST`
/// with a non-empty base64 body; surrounding whitespace is allowed.
fn check_csr(pem: &str) -> Result<(), AuthError> {
    let not_csr = |why: &str| invalid(format!("`csr` is not a PEM {CSR_LABEL}: {why}"));
    let begin = format!("-----BEGIN {CSR_LABEL}-----");
    let end = format!("-----END {CSR_LABEL}-----");
    let text = pem.trim();
    let body = text
        .strip_prefix(begin.as_str())
        .ok_or_else(|| match text.lines().next() {
            Some(l) if l.starts_with("-----BEGIN ") => {
                not_csr(&format!("it is `{}`", crate::jwt::shown(l)))
            }
            _ => not_csr(&format!("it does not start with `{begin}`")),
        })?
        .strip_suffix(end.as_str())
        .ok_or_else(|| not_csr(&format!("it does not end with `{end}`")))?;
    if body.contains("-----") {
        return Err(not_csr("it holds more than one PEM block"));
    }
    let b64: String = body.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    match STANDARD.decode(b64) {
        Ok(der) if !der.is_empty() => Ok(()),
        Ok(_) => Err(not_csr("the block is empty")),
        Err(_) => Err(not_csr("the block is not base64")),
    }
}

/// Parses an enrollment body:
/// `{"token": "...", "csr": "-----BEGIN CERTIFICATE REQUEST-----...", "tenant": "...", "agent": "..."}`.
/// `token` is required; unknown fields are refused.
pub fn parse_enroll(body: &[u8]) -> Result<EnrollRequest, AuthError> {
    check_size(body)?;
    let raw: RawEnroll = serde_json::from_slice(body).map_err(json_error)?;
    let token = raw.token.ok_or_else(|| invalid("field `token` missing"))?;
    if token.is_empty() {
        return Err(invalid("field `token` is empty"));
    }
    if token.len() > MAX_TOKEN_FIELD {
        return Err(invalid(format!(
            "field `token` is longer than {MAX_TOKEN_FIELD} bytes"
        )));
    }
    if let Some(csr) = &raw.csr {
        check_csr(csr)?;
    }
    Ok(EnrollRequest {
        token,
        csr_pem: raw.csr,
        tenant: check_name("tenant", raw.tenant)?,
        agent: check_name("agent", raw.agent)?,
    })
}

/// Parses a renewal body: `{"csr": "..."}` or `{}`.
pub fn parse_renew(body: &[u8]) -> Result<RenewRequest, AuthError> {
    check_size(body)?;
    let raw: RawRenew = serde_json::from_slice(body).map_err(json_error)?;
    if let Some(csr) = &raw.csr {
        check_csr(csr)?;
    }
    Ok(RenewRequest { csr_pem: raw.csr })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CSR: &str = "-----BEGIN CERTIFICATE REQUEST-----\nMIIBAzCBqgIBADAPMQ0wCwYDVQQDDARib3Qx\nAAAA\n-----END CERTIFICATE REQUEST-----\n";

    fn body(v: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&v).expect("json")
    }

    #[test]
    fn good() {
        let r = parse_enroll(&body(serde_json::json!({
            "token": "dmsc-jt.x.y", "csr": CSR, "tenant": "acme", "agent": "bot-1"
        })))
        .expect("parse");
        assert_eq!(r.token, "dmsc-jt.x.y");
        assert_eq!(r.csr_pem.as_deref(), Some(CSR));
        assert_eq!(r.tenant.as_deref(), Some("acme"));
        assert_eq!(r.agent.as_deref(), Some("bot-1"));
        let r = parse_enroll(br#"{"token":"t"}"#).expect("minimal");
        assert_eq!((r.csr_pem, r.tenant, r.agent), (None, None, None));
    }

    #[test]
    fn missing_token() {
        let e = parse_enroll(br#"{"csr":null}"#).expect_err("missing");
        assert_eq!(
            e.reason(),
            "invalid enrollment request: field `token` missing"
        );
        assert_eq!(e.code(), "enroll_invalid");
        assert!(parse_enroll(br#"{"token":""}"#).is_err());
    }

    #[test]
    fn bad_csr() {
        let cert = CSR.replace("CERTIFICATE REQUEST", "CERTIFICATE");
        let e =
            parse_enroll(&body(serde_json::json!({"token": "t", "csr": cert}))).expect_err("cert");
        assert!(
            e.reason().contains(
                "`csr` is not a PEM CERTIFICATE REQUEST: it is `-----BEGIN CERTIFICATE-----`"
            ),
            "{e}"
        );
        for bad in [
            "MIIB",
            "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n",
            "-----BEGIN CERTIFICATE REQUEST-----\n-----END CERTIFICATE REQUEST-----",
            "-----BEGIN CERTIFICATE REQUEST-----\n!!!\n-----END CERTIFICATE REQUEST-----",
            &format!("{CSR}{CSR}"),
        ] {
            let e =
                parse_enroll(&body(serde_json::json!({"token": "t", "csr": bad}))).expect_err(bad);
            assert!(
                e.reason()
                    .contains("`csr` is not a PEM CERTIFICATE REQUEST"),
                "{e}"
            );
        }
    }

    #[test]
    fn oversized() {
        let big = format!(r#"{{"token":"{}"}}"#, "a".repeat(MAX_BODY));
        let e = parse_enroll(big.as_bytes()).expect_err("big");
        assert_eq!(e.code(), "enroll_too_large");
        assert!(parse_renew(big.as_bytes()).is_err());
        let e = parse_enroll(format!(r#"{{"token":"{}"}}"#, "a".repeat(2000)).as_bytes())
            .expect_err("long token");
        assert!(e.reason().contains("longer than"), "{e}");
    }

    #[test]
    fn unknown_field_and_bad_json() {
        let e = parse_enroll(br#"{"token":"t","extra":1}"#).expect_err("unknown");
        assert!(e.reason().contains("unknown field `extra`"), "{e}");
        assert!(!e.reason().contains("line"), "{e}");
        let e = parse_enroll(b"{").expect_err("json");
        assert!(e.reason().contains("not a JSON object"), "{e}");
        assert!(parse_enroll(b"[]").is_err());
        assert!(parse_enroll(br#"{"token":1}"#).is_err());
    }

    #[test]
    fn bad_names() {
        let e = parse_enroll(br#"{"token":"t","tenant":"Acme"}"#).expect_err("tenant");
        assert!(
            e.reason().contains("field `tenant` is not a valid name"),
            "{e}"
        );
    }

    #[test]
    fn renew() {
        assert_eq!(parse_renew(b"{}").expect("empty").csr_pem, None);
        let r = parse_renew(&body(serde_json::json!({"csr": CSR}))).expect("csr");
        assert_eq!(r.csr_pem.as_deref(), Some(CSR));
        assert!(parse_renew(br#"{"csr":"x"}"#).is_err());
        assert!(parse_renew(br#"{"token":"x"}"#).is_err());
    }

    #[test]
    fn response_shape() {
        let r = EnrollResponse {
            spiffe_id: "spiffe://dmsc/tenant/acme/agent/bot".into(),
            certificate_chain: "leaf".into(),
            private_key: None,
            ca: "ca".into(),
            serial: "01ab".into(),
            not_after: OffsetDateTime::from_unix_timestamp(0).expect("t"),
        };
        let v: serde_json::Value =
            serde_json::from_slice(&serde_json::to_vec(&r).expect("ser")).expect("json");
        assert_eq!(v["not_after"], "1970-01-01T00:00:00Z");
        assert!(v.get("private_key").is_none());
        let keys: Vec<&str> = v
            .as_object()
            .expect("obj")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "ca",
                "certificate_chain",
                "not_after",
                "serial",
                "spiffe_id"
            ]
        );
        let back: EnrollResponse = serde_json::from_value(v).expect("de");
        assert_eq!(back, r);
    }

    proptest! {
        #[test]
        fn parse_enroll_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_enroll(&data);
            let _ = parse_renew(&data);
        }

        #[test]
        fn parse_enroll_never_panics_on_near_json(
            token in ".{0,40}", csr in ".{0,200}", extra in proptest::option::of("[a-z]{1,8}")
        ) {
            let mut v = serde_json::json!({"token": token, "csr": csr});
            if let Some(k) = extra {
                v[k] = serde_json::Value::from(1);
            }
            let _ = parse_enroll(&body(v));
        }

        #[test]
        fn valid_csr_blocks_parse(der in proptest::collection::vec(any::<u8>(), 1..300)) {
            let b64 = STANDARD.encode(&der);
            let lines: Vec<String> = b64.as_bytes().chunks(64)
                .map(|c| String::from_utf8_lossy(c).into_owned()).collect();
            let pem = format!("-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n", lines.join("\n"));
            prop_assert!(check_csr(&pem).is_ok());
        }
    }
}
