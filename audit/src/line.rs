//! The line format: encoding (writer), parsing (verifier, `tail`, fuzzing)
//! and the hash that links each line to the one before it.
//!
//! The writer serializes a borrowed struct so the field order is fixed
//! (`seq, ts, node, tenant, kind, prev, detail`) and no intermediate
//! `serde_json::Value` is built on the hot path. Parsing goes into an owned
//! [`Line`] whose `detail` stays a `Value`: the envelope is all the chain
//! checks need, and a log written by a newer node with a new event kind still
//! verifies; [`Line::body`] decodes `detail` into the typed events on demand.
//! The hash is over the exact bytes in the file, so nothing here has to
//! re-serialize canonically.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::event::{
    Checkpoint, EventKind, Recovery, KIND_AUTH_FAILURE, KIND_CHECKPOINT, KIND_DELEGATION,
    KIND_DENIED, KIND_ENROLLMENT, KIND_MASKED, KIND_ONBOARDING, KIND_POLICY, KIND_RATE_LIMITED,
    KIND_RECOVERY, KIND_REVOCATION, KIND_TENANT_KEY,
};
use crate::AuditError;

/// Lines longer than this are refused by the parser (the writer never comes
/// close: an event is a few hundred bytes, a checkpoint about 1 KiB).
pub const MAX_LINE: usize = 1 << 20;

/// `prev` of the first line: the hex of 32 zero bytes.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One parsed line of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Line {
    pub seq: u64,
    /// Unix milliseconds when the event was recorded.
    pub ts: u64,
    pub node: String,
    pub tenant: Option<String>,
    pub kind: String,
    /// Lowercase hex SHA-256 of the previous line's bytes (no newline).
    pub prev: String,
    pub detail: serde_json::Value,
}

/// The line re-encoded as JSON, for printing (`audit tail`). Not the bytes
/// in the file (`detail` keys come out sorted), so never hash this.
impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match serde_json::to_string(self) {
            Ok(s) => f.write_str(&s),
            // Unreachable for these field types; print something rather
            // than make `to_string()` panic.
            Err(e) => write!(f, "{{\"seq\":{},\"error\":{:?}}}", self.seq, e.to_string()),
        }
    }
}

/// The typed content of a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Event(EventKind),
    Checkpoint(Checkpoint),
    Recovery(Recovery),
}

impl Line {
    /// Decodes `detail` according to `kind`.
    pub fn body(&self) -> Result<Body, AuditError> {
        fn de<T: serde::de::DeserializeOwned>(l: &Line) -> Result<T, AuditError> {
            T::deserialize(&l.detail).map_err(|e| AuditError::Line {
                reason: format!("seq {}: `{}` detail does not match: {e}", l.seq, l.kind),
            })
        }
        Ok(match self.kind.as_str() {
            KIND_DELEGATION => Body::Event(EventKind::Delegation(de(self)?)),
            KIND_DENIED => Body::Event(EventKind::Denied(de(self)?)),
            KIND_POLICY => Body::Event(EventKind::Policy(de(self)?)),
            KIND_MASKED => Body::Event(EventKind::Masked(de(self)?)),
            KIND_AUTH_FAILURE => Body::Event(EventKind::AuthFailure(de(self)?)),
            KIND_ENROLLMENT => Body::Event(EventKind::Enrollment(de(self)?)),
            KIND_REVOCATION => Body::Event(EventKind::Revocation(de(self)?)),
            KIND_TENANT_KEY => Body::Event(EventKind::TenantKey(de(self)?)),
            KIND_RATE_LIMITED => Body::Event(EventKind::RateLimited(de(self)?)),
            KIND_ONBOARDING => Body::Event(EventKind::Onboarding(de(self)?)),
            KIND_CHECKPOINT => Body::Checkpoint(de(self)?),
            KIND_RECOVERY => Body::Recovery(de(self)?),
            other => {
                return Err(AuditError::Line {
                    reason: format!(
                        "seq {}: unknown kind `{other}` (written by a newer dmsc?)",
                        self.seq
                    ),
                })
            }
        })
    }
}

/// Parses one line (with or without its trailing `\n`). Never panics; refuses
/// lines over [`MAX_LINE`], a `prev` that is not 64 lowercase hex digits and
/// a `detail` that is not an object.
pub fn parse_line(bytes: &[u8]) -> Result<Line, AuditError> {
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    if bytes.len() > MAX_LINE {
        return Err(AuditError::Line {
            reason: format!("line is {} bytes, over the {MAX_LINE} limit", bytes.len()),
        });
    }
    let line: Line = serde_json::from_slice(bytes).map_err(|e| AuditError::Line {
        reason: format!("not a JSON audit entry: {e}"),
    })?;
    if !is_hash_hex(&line.prev) {
        return Err(AuditError::Line {
            reason: format!(
                "seq {}: `prev` must be 64 lowercase hex digits, got {:?}",
                line.seq, line.prev
            ),
        });
    }
    if !line.detail.is_object() {
        return Err(AuditError::Line {
            reason: format!("seq {}: `detail` must be a JSON object", line.seq),
        });
    }
    if line.kind.is_empty() {
        return Err(AuditError::Line {
            reason: format!("seq {}: `kind` is empty", line.seq),
        });
    }
    Ok(line)
}

fn is_hash_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Lowercase hex SHA-256 of `bytes` (a line without its newline).
pub fn line_hash(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    push_hex(bytes, &mut s);
    s
}

fn push_hex(bytes: &[u8], out: &mut String) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
}

/// The SHA-256 of a line just encoded, before it becomes the next line's
/// `prev` (written in place of the last one: no string per line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LineDigest([u8; 32]);

impl LineDigest {
    /// Replaces `out` with the digest in lowercase hex (as [`line_hash`]).
    pub(crate) fn write_hex(&self, out: &mut String) {
        out.clear();
        push_hex(&self.0, out);
    }

    #[cfg(test)]
    pub(crate) fn to_hex(self) -> String {
        hex(&self.0)
    }
}

#[derive(Serialize)]
struct LineOut<'a, D: Serialize> {
    seq: u64,
    ts: u64,
    node: &'a str,
    tenant: Option<&'a str>,
    kind: &'a str,
    prev: &'a str,
    detail: D,
}

/// The envelope of a line being written.
pub(crate) struct Envelope<'a> {
    pub seq: u64,
    pub ts: u64,
    pub node: &'a str,
    pub tenant: Option<&'a str>,
    pub kind: &'a str,
    pub prev: &'a str,
}

/// Appends one line plus `\n` to `buf` and returns its hash. On error `buf`
/// is left as it was.
pub(crate) fn encode_line<D: Serialize>(
    buf: &mut Vec<u8>,
    env: &Envelope<'_>,
    detail: D,
) -> Result<LineDigest, serde_json::Error> {
    let start = buf.len();
    if let Err(e) = serde_json::to_writer(&mut *buf, &env.with(detail)) {
        buf.truncate(start);
        return Err(e);
    }
    Ok(finish_line(buf, start))
}

/// As [`encode_line`], with `detail` already JSON text (an object, e.g. a
/// sealed detail): the envelope is serialized with a null detail, its last
/// field, and the `null` replaced.
pub(crate) fn encode_line_json(
    buf: &mut Vec<u8>,
    env: &Envelope<'_>,
    detail: &[u8],
) -> Result<LineDigest, serde_json::Error> {
    let start = buf.len();
    if let Err(e) = serde_json::to_writer(&mut *buf, &env.with(())) {
        buf.truncate(start);
        return Err(e);
    }
    debug_assert!(buf.ends_with(b"\"detail\":null}"));
    buf.truncate(buf.len() - b"null}".len());
    buf.extend_from_slice(detail);
    buf.push(b'}');
    Ok(finish_line(buf, start))
}

/// Hashes the line that starts at `start` and ends it with `\n`.
fn finish_line(buf: &mut Vec<u8>, start: usize) -> LineDigest {
    let hash = LineDigest(Sha256::digest(&buf[start..]).into());
    buf.push(b'\n');
    hash
}

impl<'a> Envelope<'a> {
    fn with<D: Serialize>(&self, detail: D) -> LineOut<'a, D> {
        LineOut {
            seq: self.seq,
            ts: self.ts,
            node: self.node,
            tenant: self.tenant,
            kind: self.kind,
            prev: self.prev,
            detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::*;
    use proptest::prelude::*;

    #[test]
    fn genesis_is_32_zero_bytes() {
        assert_eq!(GENESIS_PREV, hex(&[0u8; 32]));
        assert!(is_hash_hex(GENESIS_PREV));
    }

    #[test]
    fn field_order_is_fixed() {
        let mut buf = Vec::new();
        let env = Envelope {
            seq: 7,
            ts: 1,
            node: "n1",
            tenant: Some("acme"),
            kind: "denied",
            prev: GENESIS_PREV,
        };
        let kind = EventKind::Denied(Denied {
            caller: "a".into(),
            target: "agent:b".into(),
            reason: "policy".into(),
            rule: None,
        });
        let hash = encode_line(&mut buf, &env, crate::event::DetailRef(&kind)).expect("encode");
        let text = String::from_utf8(buf).expect("utf8");
        assert_eq!(
            text,
            format!(
                "{{\"seq\":7,\"ts\":1,\"node\":\"n1\",\"tenant\":\"acme\",\"kind\":\"denied\",\"prev\":\"{GENESIS_PREV}\",\"detail\":{{\"caller\":\"a\",\"target\":\"agent:b\",\"reason\":\"policy\"}}}}\n"
            )
        );
        assert_eq!(hash.to_hex(), line_hash(text.trim_end().as_bytes()));
    }

    #[test]
    fn parse_refuses_bad_envelopes() {
        let ok = format!(
            r#"{{"seq":0,"ts":0,"node":"n","tenant":null,"kind":"x","prev":"{GENESIS_PREV}","detail":{{}}}}"#
        );
        assert!(parse_line(ok.as_bytes()).is_ok());
        let upper = ok.replace("\"0000", "\"AAAA");
        assert!(parse_line(upper.as_bytes()).is_err());
        let detail = ok.replace("\"detail\":{}", "\"detail\":[]");
        assert!(parse_line(detail.as_bytes()).is_err());
        let long = vec![b' '; MAX_LINE + 1];
        assert!(parse_line(&long).is_err());
        assert!(parse_line(b"").is_err());
    }

    fn arb_opt_string() -> impl Strategy<Value = Option<String>> {
        proptest::option::of("(?s).{0,12}")
    }

    fn arb_kind() -> impl Strategy<Value = EventKind> {
        let s = || "(?s).{0,16}";
        prop_oneof![
            (
                s(),
                s(),
                s(),
                arb_opt_string(),
                arb_opt_string(),
                s(),
                proptest::option::of(any::<u16>()),
                any::<u64>(),
                arb_opt_string()
            )
                .prop_map(
                    |(caller, target, route, agent, serving_node, outcome, status, d, trace_id)| {
                        EventKind::Delegation(Delegation {
                            caller,
                            target,
                            route,
                            agent,
                            serving_node,
                            outcome,
                            status,
                            duration_ms: d,
                            trace_id,
                        })
                    }
                ),
            (s(), s(), s(), arb_opt_string()).prop_map(|(caller, target, reason, rule)| {
                EventKind::Denied(Denied {
                    caller,
                    target,
                    reason,
                    rule,
                })
            }),
            (s(), 0u8..3, s(), s(), arb_opt_string()).prop_map(
                |(listener, m, reason, peer, claimed)| EventKind::AuthFailure(AuthFailure {
                    listener,
                    method: [AuthMethod::Mtls, AuthMethod::Jwt, AuthMethod::Token][usize::from(m)],
                    reason,
                    peer,
                    claimed,
                })
            ),
            (s(), s(), any::<u64>(), arb_opt_string()).prop_map(|(agent, serial, na, tok)| {
                EventKind::Enrollment(Enrollment {
                    agent,
                    via: tok
                        .map(EnrollVia::Token)
                        .unwrap_or_else(|| EnrollVia::Renewal(serial.clone())),
                    serial,
                    not_after: na,
                })
            }),
            (s(), s(), s()).prop_map(|(serial, reason, source)| EventKind::Revocation(
                Revocation {
                    serial,
                    reason,
                    source
                }
            )),
            (
                s(),
                s(),
                s(),
                any::<u64>(),
                proptest::option::of(any::<u64>())
            )
                .prop_map(|(caller, target, limit, refused, window_s)| {
                    EventKind::RateLimited(RateLimited {
                        caller,
                        target,
                        scope: "tenant".into(),
                        limit,
                        refused,
                        window_s,
                    })
                }),
        ]
    }

    proptest! {
        #[test]
        fn parse_line_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_line(&bytes);
        }

        #[test]
        fn parse_line_never_panics_on_near_json(
            seq in any::<u64>(),
            junk in "\\PC{0,40}",
            cut in 0usize..200,
        ) {
            let text = format!(
                r#"{{"seq":{seq},"ts":1,"node":"{junk}","tenant":null,"kind":"k","prev":"{GENESIS_PREV}","detail":{{"a":[1,{{"b":null}}]}}}}"#
            );
            let cut = cut.min(text.len());
            let _ = parse_line(&text.as_bytes()[..cut]);
            let _ = parse_line(text.as_bytes());
        }

        #[test]
        fn writer_lines_round_trip(
            seq in any::<u64>(),
            ts in any::<u64>(),
            node in "[a-z0-9-]{1,20}",
            tenant in arb_opt_string(),
            prev_bytes in proptest::array::uniform32(any::<u8>()),
            kind in arb_kind(),
        ) {
            let prev = hex(&prev_bytes);
            let mut buf = Vec::new();
            let env = Envelope { seq, ts, node: &node, tenant: tenant.as_deref(), kind: kind.name(), prev: &prev };
            let hash = encode_line(&mut buf, &env, crate::event::DetailRef(&kind)).expect("encode");
            prop_assert_eq!(buf.iter().filter(|b| **b == b'\n').count(), 1, "one line, newline-terminated");
            let line = parse_line(&buf).expect("writer output parses");
            prop_assert_eq!(line.seq, seq);
            prop_assert_eq!(line.ts, ts);
            prop_assert_eq!(&line.node, &node);
            prop_assert_eq!(&line.tenant, &tenant);
            prop_assert_eq!(line.kind.as_str(), kind.name());
            prop_assert_eq!(&line.prev, &prev);
            prop_assert_eq!(line.body().expect("typed body"), Body::Event(kind));
            prop_assert_eq!(hash.to_hex(), line_hash(&buf[..buf.len() - 1]));
        }
    }
}
