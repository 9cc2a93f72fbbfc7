//! Fuzz the masker (`cargo +nightly fuzz run mask`): request and response
//! bodies come from outside. The first byte picks what to drive: the JSON
//! scanner, text masking, the SSE masker split at a fuzzed point, or the
//! content-type dispatch. Nothing may panic, and:
//! - JSON: unchanged output is the input; changed output is still JSON;
//!   everything `serde_json` accepts, the masker accepts;
//! - text: the output changes exactly when something was counted;
//! - SSE: splitting the stream anywhere gives the same bytes and counts.
#![no_main]

use std::borrow::Cow;
use std::sync::OnceLock;

use dmsc_mask::{Counts, Masker, RuleSpec, DETECTORS};
use libfuzzer_sys::fuzz_target;

fn masker() -> &'static Masker {
    static M: OnceLock<Masker> = OnceLock::new();
    M.get_or_init(|| {
        Masker::new(&[
            RuleSpec {
                name: "pii".into(),
                detectors: DETECTORS.iter().map(|d| d.to_string()).collect(),
                patterns: vec![],
            },
            RuleSpec {
                name: "custom".into(),
                detectors: vec![],
                patterns: vec![r"(?i)secret-\w+".into(), r"[0-9a-f]{8}".into()],
            },
        ])
        .expect("fuzz rules are valid")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let m = masker();
    let mut counts = Counts::new();
    match mode % 4 {
        0 => {
            let serde_ok = serde_json::from_slice::<serde_json::Value>(rest).is_ok();
            match m.mask_json(rest, &mut counts) {
                Ok(Cow::Borrowed(b)) => {
                    assert_eq!(b, rest);
                    assert!(counts.is_empty());
                }
                Ok(Cow::Owned(out)) => {
                    assert!(counts.total() > 0);
                    assert!(m.mask_json(&out, &mut Counts::new()).is_ok(), "masked output must parse");
                    if serde_ok {
                        assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok());
                    }
                }
                Err(_) => {
                    assert!(!serde_ok, "serde_json accepts what the masker refused");
                    assert!(counts.is_empty(), "a refused body counts nothing");
                }
            }
        }
        1 => {
            if let Ok(s) = std::str::from_utf8(rest) {
                let out = m.mask_text(s, &mut counts);
                assert_eq!(matches!(out, Cow::Owned(_)), counts.total() > 0);
            }
        }
        2 => {
            let Some((&cut, stream)) = rest.split_first() else {
                return;
            };
            let cut = usize::from(cut).min(stream.len());
            let whole = {
                let mut s = m.sse(4096);
                s.feed(stream, &mut counts)
                    .and_then(|mut o| {
                        o.extend(s.finish(&mut counts)?);
                        Ok(o)
                    })
            };
            let mut c2 = Counts::new();
            let split = {
                let mut s = m.sse(4096);
                s.feed(&stream[..cut], &mut c2).and_then(|mut o| {
                    o.extend(s.feed(&stream[cut..], &mut c2)?);
                    o.extend(s.finish(&mut c2)?);
                    Ok(o)
                })
            };
            match (whole, split) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a, b);
                    assert_eq!(counts, c2);
                }
                (Err(_), Err(_)) => {}
                (a, b) => panic!("split changed the outcome: {a:?} vs {b:?}"),
            }
        }
        _ => {
            let types = [
                "application/json",
                "text/event-stream",
                "text/plain",
                "application/x+json; charset=utf-8",
            ];
            let ct = types[usize::from(mode / 4) % types.len()];
            let _ = m.mask_body(Some(ct), None, rest, &mut counts);
        }
    }
});
