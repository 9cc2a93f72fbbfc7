//! Fuzz the audit log line parser (`dmsc-node audit verify` and `audit
//! tail` read files an attacker may have edited): `cargo +nightly fuzz run
//! audit_line`. A line that parses must decode or refuse its typed body
//! without panicking, and its printed form must parse back to the same
//! envelope.
#![no_main]

use dmsc_audit::{line_hash, parse_line};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = line_hash(data);
    if let Ok(line) = parse_line(data) {
        let _ = line.body();
        let printed = line.to_string();
        match parse_line(printed.as_bytes()) {
            Ok(again) => assert!(
                (
                    again.seq,
                    again.ts,
                    &again.node,
                    &again.tenant,
                    &again.kind,
                    &again.prev
                ) == (
                    line.seq,
                    line.ts,
                    &line.node,
                    &line.tenant,
                    &line.kind,
                    &line.prev
                ),
                "a printed line must parse back to the same envelope"
            ),
            // Re-encoding (escapes, number formats) can push a line near the
            // limit over it; nothing else may make it unparsable.
            Err(_) => assert!(printed.len() > dmsc_audit::MAX_LINE),
        }
    }
});
