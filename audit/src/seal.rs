//! Sealing the tenant payload of audit lines with the tenant's key.
//!
//! A tenant's callers, targets and reasons are tenant data at rest; once the
//! tenant is deleted (its keys crypto-shredded) they must become unreadable,
//! yet the hash chain must still verify and compliance reports must still
//! count events. So the writer seals, per line, the fields of an event that
//! carry tenant payload into one value (`"sealed":"sealed:v1:…"`) and keeps
//! the envelope (`tenant`, `kind`, `ts`, …) and the fields reports need
//! ([`clear_fields`]: outcome, status, …) in the clear. The chain hashes
//! the line as written, sealed text included, so `audit verify` needs no
//! keys. The sealed value is bound to the line (`audit:<node>:<seq>`), so it
//! cannot be moved to another line.
//!
//! This crate knows nothing of key stores: the node implements [`Sealer`]
//! (with `dmsc-keys`). Sealing runs in the writer task, one AEAD per line,
//! not on the request path. A seal that fails (the tenant's keys were
//! deleted) withholds the fields (`"withheld":"<why>"`) rather than writing
//! them in the clear.

use serde_json::{Map, Value};

/// Seals and opens tenant payload for the audit log.
pub trait Sealer: Send + Sync + std::fmt::Debug {
    /// Seals `plaintext` for `tenant`, bound to `context`; `Err` says why it
    /// cannot (the fields are then withheld).
    fn seal(&self, tenant: &str, context: &str, plaintext: &[u8]) -> Result<String, String>;
    /// Opens a value from [`Self::seal`]; `Err` says why not (e.g. "key
    /// destroyed: tenant deleted", "no key on this node").
    fn open(&self, context: &str, sealed: &str) -> Result<Vec<u8>, String>;
}

/// The detail field holding the sealed payload.
pub const SEALED_FIELD: &str = "sealed";
/// The detail field saying why payload fields were not written.
pub const WITHHELD_FIELD: &str = "withheld";
/// Added by [`open_line`] when the payload cannot be opened: why.
pub const UNREADABLE_FIELD: &str = "unreadable";

/// The fields of an event kind that stay in the clear in a sealed line;
/// every other field of `detail` is sealed. `None`: the kind carries no
/// tenant payload (operator facts: revocations, policy changes, key
/// statements) and is not sealed at all.
pub fn clear_fields(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        crate::event::KIND_DELEGATION => {
            Some(&["outcome", "status", "duration_ms", "serving_node"])
        }
        crate::event::KIND_DENIED => Some(&["rule"]),
        crate::event::KIND_AUTH_FAILURE => Some(&["listener", "method"]),
        crate::event::KIND_ENROLLMENT => Some(&["not_after"]),
        crate::event::KIND_REVOCATION
        | crate::event::KIND_POLICY
        | crate::event::KIND_TENANT_KEY
        | crate::event::KIND_CHECKPOINT
        | crate::event::KIND_RECOVERY => None,
        // Kinds added later are sealed except for what compliance reports
        // count (`dmsc-node audit report`): outcomes, rules, masked-value
        // counts per rule, and the size of an aggregate entry.
        _ => Some(&[
            "outcome", "status", "rule", "scope", "masked", "refused", "count",
        ]),
    }
}

/// The audit context a line's sealed value is bound to.
pub fn line_context(node: &str, seq: u64) -> String {
    format!("audit:{node}:{seq}")
}

/// Splits `detail` into clear fields and a sealed rest. `None` if nothing
/// is to be sealed (the caller writes `detail` as it is).
pub(crate) fn seal_detail(
    sealer: &dyn Sealer,
    tenant: &str,
    kind: &str,
    context: &str,
    detail: Value,
) -> Option<Value> {
    let clear = clear_fields(kind)?;
    let Value::Object(map) = detail else {
        return None;
    };
    let (keep, payload): (Map<String, Value>, Map<String, Value>) = map
        .into_iter()
        .partition(|(k, _)| clear.contains(&k.as_str()));
    let mut out = keep;
    if payload.is_empty() {
        return Some(Value::Object(out));
    }
    // A map of JSON values always serializes.
    let bytes = serde_json::to_vec(&payload).unwrap_or_default();
    match sealer.seal(tenant, context, &bytes) {
        Ok(s) => {
            out.insert(SEALED_FIELD.into(), Value::String(s));
        }
        Err(why) => {
            out.insert(WITHHELD_FIELD.into(), Value::String(why));
        }
    }
    Some(Value::Object(out))
}

/// How a line's payload reads after [`open_line`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SealState {
    /// The line had nothing sealed.
    Clear,
    /// The sealed fields were opened and put back into `detail`.
    Opened,
    /// The sealed fields could not be opened; `detail` keeps the sealed
    /// value and gains `"unreadable": why`.
    Sealed(String),
    /// The writer could not seal them and did not write them.
    Withheld(String),
}

/// Opens the sealed payload of `line` in place, if `sealer` can: the
/// opened fields go back into `detail` (so [`crate::Line::body`] decodes
/// the typed event) and `sealed` is removed. For display only: the line's
/// hash is over the file's bytes, never over this.
pub fn open_line(line: &mut crate::Line, sealer: Option<&dyn Sealer>) -> SealState {
    let Value::Object(map) = &mut line.detail else {
        return SealState::Clear;
    };
    if let Some(Value::String(why)) = map.get(WITHHELD_FIELD) {
        return SealState::Withheld(why.clone());
    }
    let Some(Value::String(token)) = map.get(SEALED_FIELD) else {
        return SealState::Clear;
    };
    let context = line_context(&line.node, line.seq);
    let opened = match sealer {
        None => Err("no tenant keys given (run on the node, with its data dir)".to_string()),
        Some(s) => s.open(&context, token).and_then(|bytes| {
            serde_json::from_slice::<Map<String, Value>>(&bytes)
                .map_err(|e| format!("the opened payload is not a JSON object: {e}"))
        }),
    };
    match opened {
        Ok(fields) => {
            map.remove(SEALED_FIELD);
            map.extend(fields);
            SealState::Opened
        }
        Err(why) => {
            map.insert(UNREADABLE_FIELD.into(), Value::String(why.clone()));
            SealState::Sealed(why)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reversible, keyless stand-in: "sealed" = `t:<tenant>:<ctx>:<json>`.
    #[derive(Debug)]
    struct Fake {
        refuse: bool,
    }

    impl Sealer for Fake {
        fn seal(&self, tenant: &str, context: &str, p: &[u8]) -> Result<String, String> {
            if self.refuse {
                return Err("tenant deleted".into());
            }
            Ok(format!(
                "t:{tenant}:{context}:{}",
                String::from_utf8_lossy(p)
            ))
        }
        fn open(&self, context: &str, sealed: &str) -> Result<Vec<u8>, String> {
            let rest = sealed
                .strip_prefix("t:acme:")
                .and_then(|r| r.strip_prefix(context))
                .and_then(|r| r.strip_prefix(':'))
                .ok_or("wrong context")?;
            Ok(rest.as_bytes().to_vec())
        }
    }

    fn delegation() -> Value {
        serde_json::json!({"caller":"c","target":"t","route":"r","agent":null,
            "serving_node":"n2","outcome":"ok","status":200,"duration_ms":3,"trace_id":"x"})
    }

    #[test]
    fn only_the_payload_is_sealed_and_it_opens_back_in_place() {
        let ctx = line_context("n1", 7);
        let out = seal_detail(
            &Fake { refuse: false },
            "acme",
            "delegation",
            &ctx,
            delegation(),
        )
        .expect("sealed");
        let map = out.as_object().expect("object");
        let mut keys: Vec<&str> = map.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["duration_ms", "outcome", "sealed", "serving_node", "status"]
        );
        let mut line = crate::Line {
            seq: 7,
            ts: 0,
            node: "n1".into(),
            tenant: Some("acme".into()),
            kind: "delegation".into(),
            prev: crate::GENESIS_PREV.into(),
            detail: out.clone(),
        };
        assert_eq!(
            open_line(&mut line, Some(&Fake { refuse: false })),
            SealState::Opened
        );
        assert_eq!(line.detail, delegation());
        // Bound to its line: the same value on seq 8 does not open.
        let mut moved = crate::Line {
            seq: 8,
            detail: out,
            ..line.clone()
        };
        assert!(matches!(
            open_line(&mut moved, Some(&Fake { refuse: false })),
            SealState::Sealed(_)
        ));
        assert!(moved.detail.get(UNREADABLE_FIELD).is_some());
    }

    #[test]
    fn a_refused_seal_withholds_and_operator_kinds_stay_clear() {
        let out = seal_detail(&Fake { refuse: true }, "acme", "denied", "c", delegation())
            .expect("withheld");
        let text = out.to_string();
        assert!(!text.contains("\"caller\""), "{text}");
        assert!(text.contains("\"withheld\":\"tenant deleted\""), "{text}");
        for kind in [
            "revocation",
            "policy",
            "tenant_key",
            "checkpoint",
            "recovery",
        ] {
            assert!(clear_fields(kind).is_none(), "{kind}");
            assert!(
                seal_detail(&Fake { refuse: false }, "acme", kind, "c", delegation()).is_none()
            );
        }
        // A kind this build does not know is sealed except what reports count.
        let out = seal_detail(&Fake { refuse: false }, "acme", "masked", "c", delegation())
            .expect("sealed");
        assert!(out.get("outcome").is_some() && out.get("caller").is_none());
    }
}
