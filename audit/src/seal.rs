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

use serde::Serialize;
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

/// Seals the payload fields of `detail` (an event struct) and returns the
/// line's `detail` as JSON text: its clear fields in the event's field
/// order, then `"sealed"` (or `"withheld"` with the reason). The fields are
/// routed to the clear text or to the payload as they are serialized, so
/// no JSON value tree is built per line. `None` if the kind is not sealed
/// (the caller writes `detail` as it is).
pub(crate) fn seal_detail<D: Serialize + ?Sized>(
    sealer: &dyn Sealer,
    tenant: &str,
    kind: &str,
    context: &str,
    detail: &D,
) -> Option<Vec<u8>> {
    let clear = clear_fields(kind)?;
    let mut split = Split {
        clear_fields: clear,
        clear: Vec::with_capacity(128),
        payload: Vec::with_capacity(256),
    };
    let (mut out, tail) = match detail.serialize(&mut split) {
        Ok(()) if split.payload.is_empty() => (split.clear, None),
        Ok(()) => {
            split.payload.push(b'}');
            let tail = match sealer.seal(tenant, context, &split.payload) {
                Ok(s) => (SEALED_FIELD, s),
                Err(why) => (WITHHELD_FIELD, why),
            };
            (split.clear, Some(tail))
        }
        // Unreachable for the event structs; never fall back to writing
        // the payload in the clear.
        Err(e) => (
            Vec::new(),
            Some((WITHHELD_FIELD, format!("not encodable: {e}"))),
        ),
    };
    if let Some((field, value)) = tail {
        // The sealed value is most of the line: room for it in one step.
        out.reserve(field.len() + value.len() + 8);
        out.push(if out.is_empty() { b'{' } else { b',' });
        push_string(&mut out, field);
        out.push(b':');
        push_string(&mut out, &value);
    }
    if out.is_empty() {
        out.push(b'{');
    }
    out.push(b'}');
    Some(out)
}

fn push_string(out: &mut Vec<u8>, s: &str) {
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// A serializer that accepts one struct and writes each of its fields as
/// JSON into `clear` or `payload` (each an object's opening brace and
/// `"key":value` pairs, without the closing brace).
struct Split {
    clear_fields: &'static [&'static str],
    clear: Vec<u8>,
    payload: Vec<u8>,
}

#[derive(Debug)]
struct SplitError(String);

impl SplitError {
    fn not_a_struct() -> SplitError {
        SplitError("an audit detail must be a struct".into())
    }
}

impl std::fmt::Display for SplitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SplitError {}

impl serde::ser::Error for SplitError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        SplitError(msg.to_string())
    }
}

type Impossible = serde::ser::Impossible<(), SplitError>;

macro_rules! not_a_struct {
    ($($name:ident($($arg:ty),*)),* $(,)?) => {
        $(fn $name(self, $(_: $arg),*) -> Result<(), SplitError> { Err(SplitError::not_a_struct()) })*
    };
}

impl serde::Serializer for &mut Split {
    type Ok = ();
    type Error = SplitError;
    type SerializeSeq = Impossible;
    type SerializeTuple = Impossible;
    type SerializeTupleStruct = Impossible;
    type SerializeTupleVariant = Impossible;
    type SerializeMap = Impossible;
    type SerializeStruct = Self;
    type SerializeStructVariant = Impossible;

    not_a_struct!(
        serialize_bool(bool),
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_u8(u8),
        serialize_u16(u16),
        serialize_u32(u32),
        serialize_u64(u64),
        serialize_f32(f32),
        serialize_f64(f64),
        serialize_char(char),
        serialize_str(&str),
        serialize_bytes(&[u8]),
        serialize_none(),
        serialize_unit(),
        serialize_unit_struct(&'static str),
        serialize_unit_variant(&'static str, u32, &'static str),
    );

    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<(), SplitError> {
        Err(SplitError::not_a_struct())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), SplitError> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<(), SplitError> {
        Err(SplitError::not_a_struct())
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Impossible, SplitError> {
        Err(SplitError::not_a_struct())
    }
    fn serialize_tuple(self, _: usize) -> Result<Impossible, SplitError> {
        Err(SplitError::not_a_struct())
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Impossible, SplitError> {
        Err(SplitError::not_a_struct())
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Impossible, SplitError> {
        Err(SplitError::not_a_struct())
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Impossible, SplitError> {
        Err(SplitError::not_a_struct())
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self, SplitError> {
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Impossible, SplitError> {
        Err(SplitError::not_a_struct())
    }
}

impl serde::ser::SerializeStruct for &mut Split {
    type Ok = ();
    type Error = SplitError;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), SplitError> {
        let out = if self.clear_fields.contains(&key) {
            &mut self.clear
        } else {
            &mut self.payload
        };
        out.push(if out.is_empty() { b'{' } else { b',' });
        push_string(out, key);
        out.push(b':');
        serde_json::to_writer(&mut *out, value).map_err(|e| SplitError(e.to_string()))
    }

    fn end(self) -> Result<(), SplitError> {
        Ok(())
    }
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

    fn event() -> crate::event::Delegation {
        serde_json::from_value(delegation()).expect("a delegation event")
    }

    /// `seal_detail` as JSON, for the assertions.
    fn sealed(sealer: &Fake, kind: &str, context: &str) -> Option<Value> {
        seal_detail(sealer, "acme", kind, context, &event())
            .map(|bytes| serde_json::from_slice(&bytes).expect("detail is JSON"))
    }

    #[test]
    fn only_the_payload_is_sealed_and_it_opens_back_in_place() {
        let ctx = line_context("n1", 7);
        let out = sealed(&Fake { refuse: false }, "delegation", &ctx).expect("sealed");
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
        let out = sealed(&Fake { refuse: true }, "denied", "c").expect("withheld");
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
            assert!(sealed(&Fake { refuse: false }, kind, "c").is_none());
        }
        // A kind this build does not know is sealed except what reports count.
        let out = sealed(&Fake { refuse: false }, "masked", "c").expect("sealed");
        assert!(out.get("outcome").is_some() && out.get("caller").is_none());
    }

    #[test]
    fn a_detail_that_is_not_a_struct_is_withheld_whole() {
        let out = seal_detail(
            &Fake { refuse: false },
            "acme",
            "delegation",
            "c",
            &"caller",
        )
        .expect("withheld");
        let v: Value = serde_json::from_slice(&out).expect("JSON");
        assert_eq!(
            v,
            serde_json::json!({"withheld": "not encodable: an audit detail must be a struct"})
        );
    }

    #[test]
    fn an_event_with_nothing_to_seal_keeps_its_clear_fields() {
        let event = crate::event::Denied {
            caller: String::new(),
            target: String::new(),
            reason: String::new(),
            rule: Some("acme:export".into()),
        };
        // Only `rule` is clear for `denied`; the rest is sealed even when empty.
        let out =
            seal_detail(&Fake { refuse: false }, "acme", "denied", "c", &event).expect("sealed");
        let v: Value = serde_json::from_slice(&out).expect("JSON");
        assert_eq!(v["rule"], "acme:export");
        assert!(
            v["sealed"]
                .as_str()
                .is_some_and(|s| s.contains("\"caller\":\"\"")),
            "{v}"
        );
    }
}
