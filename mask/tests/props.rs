//! Property tests: a generated secret never survives masking (in text, in
//! JSON string values, in SSE events) and is counted once; text and JSON
//! without a match come back byte-identical; an event stream masks the
//! same however it is split into chunks.

use std::borrow::Cow;
use std::sync::OnceLock;

use dmsc_mask::{Counts, Masker, RuleSpec, DETECTORS};
use proptest::prelude::*;
use serde_json::{json, Value};

/// Text no detector or test pattern can match: no digits, no `@`, `.`,
/// `:`, `-`, no upper case. Includes what JSON must escape.
const FILLER: &str = "[a-z ,!é日\n\"\\\\\t]{0,30}";
/// Between two secrets: at least one letter, so no candidate spans both.
const SEP: &str = " [a-z]{1,4}[a-z ,!é日]{0,10} ";
const CUSTOM: &str = r"CASE-[0-9]{5}";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Email,
    Card,
    Iban,
    Ipv4,
    Custom,
}

impl Kind {
    fn rule(self) -> &'static str {
        match self {
            Kind::Email => "mail",
            Kind::Card => "card",
            Kind::Iban => "bank",
            Kind::Ipv4 => "net",
            Kind::Custom => "case",
        }
    }
}

fn rules() -> Vec<RuleSpec> {
    let r = |name: &str, det: &str| RuleSpec {
        name: name.into(),
        detectors: vec![det.into()],
        patterns: vec![],
    };
    vec![
        r("mail", "email"),
        r("card", "payment_card"),
        r("bank", "iban"),
        r("net", "ipv4"),
        RuleSpec {
            name: "case".into(),
            detectors: vec![],
            patterns: vec![CUSTOM.into()],
        },
    ]
}

/// Compiled once per rule selection: compiling per case would dominate
/// the run time.
fn masker_for(kind: Option<Kind>) -> &'static Masker {
    static MASKERS: OnceLock<Vec<Masker>> = OnceLock::new();
    const KINDS: [Kind; 5] = [
        Kind::Email,
        Kind::Card,
        Kind::Iban,
        Kind::Ipv4,
        Kind::Custom,
    ];
    let maskers = MASKERS.get_or_init(|| {
        let mut v: Vec<Masker> = KINDS
            .iter()
            .map(|k| {
                let chosen: Vec<RuleSpec> =
                    rules().into_iter().filter(|r| r.name == k.rule()).collect();
                Masker::new(&chosen).expect("valid rules")
            })
            .collect();
        v.push(Masker::new(&rules()).expect("valid rules"));
        v
    });
    match kind {
        Some(k) => &maskers[KINDS.iter().position(|x| *x == k).unwrap_or(0)],
        None => &maskers[KINDS.len()],
    }
}

fn all_detectors() -> &'static Masker {
    static M: OnceLock<Masker> = OnceLock::new();
    M.get_or_init(|| {
        Masker::new(&[RuleSpec {
            name: "all".into(),
            detectors: DETECTORS.iter().map(|d| d.to_string()).collect(),
            patterns: vec![CUSTOM.into()],
        }])
        .expect("valid")
    })
}

fn luhn_check_digit(payload: &[u8]) -> u8 {
    // Digits from the right, the check digit's neighbour doubled first.
    let mut sum = 0u32;
    for (i, d) in payload.iter().rev().enumerate() {
        let mut v = u32::from(*d);
        if i % 2 == 0 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    ((10 - sum % 10) % 10) as u8
}

fn group(s: &str, sep: Option<char>, size: usize) -> String {
    let Some(sep) = sep else { return s.to_owned() };
    let chars: Vec<char> = s.chars().collect();
    chars
        .chunks(size)
        .map(|c| c.iter().collect::<String>())
        .collect::<Vec<_>>()
        .join(&sep.to_string())
}

fn card() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec![2u8, 3, 4, 5, 6]),
        13usize..=19,
        prop::collection::vec(0u8..10, 18),
        prop::option::of(prop::sample::select(vec![' ', '-'])),
    )
        .prop_map(|(first, len, rest, sep)| {
            let mut d = vec![first];
            d.extend_from_slice(&rest[..len - 2]);
            d.push(luhn_check_digit(&d));
            let s: String = d.iter().map(|x| char::from(b'0' + x)).collect();
            group(&s, sep, 4)
        })
}

fn iban() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec![
            ("DE", 22),
            ("FR", 27),
            ("NL", 18),
            ("NO", 15),
            ("GB", 22),
        ]),
        prop::collection::vec(0u8..10, 30),
        any::<bool>(),
    )
        .prop_map(|((cc, len), digits, spaced)| {
            let bban: String = digits[..len - 4]
                .iter()
                .map(|x| char::from(b'0' + x))
                .collect();
            let mut rem = 0u32;
            for c in format!("{bban}{cc}00").bytes() {
                rem = if c.is_ascii_digit() {
                    (rem * 10 + u32::from(c - b'0')) % 97
                } else {
                    (rem * 100 + u32::from(c - b'A' + 10)) % 97
                };
            }
            let s = format!("{cc}{:02}{bban}", 98 - rem);
            group(&s, spaced.then_some(' '), 4)
        })
}

fn secret() -> impl Strategy<Value = (Kind, String)> {
    prop_oneof![
        "[a-z0-9]{1,8}(\\.[a-z0-9]{1,5})?@[a-z0-9]{1,8}\\.(com|org|example|de)"
            .prop_map(|s| (Kind::Email, s)),
        card().prop_map(|s| (Kind::Card, s)),
        iban().prop_map(|s| (Kind::Iban, s)),
        (0u8..=255, 0u8..=255, 0u8..=255, 0u8..=255)
            .prop_map(|(a, b, c, d)| (Kind::Ipv4, format!("{a}.{b}.{c}.{d}"))),
        "CASE-[0-9]{5}".prop_map(|s| (Kind::Custom, s)),
    ]
}

/// Filler, then each secret followed by a separator.
fn embed(filler: &str, secrets: &[(Kind, String)], seps: &[String]) -> String {
    let mut s = format!("{filler} ");
    for (i, (_, v)) in secrets.iter().enumerate() {
        s.push_str(v);
        s.push_str(&seps[i % seps.len()]);
    }
    s
}

fn expected(secrets: &[(Kind, String)], kind: Kind) -> u64 {
    secrets.iter().filter(|(k, _)| *k == kind).count() as u64
}

/// Every string in a JSON value (keys and values).
fn strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(o) => o.iter().for_each(|(k, x)| {
            out.push(k.clone());
            strings(x, out)
        }),
        _ => {}
    }
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        // Up to 12 digits: a longer integer can be a card number (13-19
        // digits, Luhn-valid), which is masked like one in a string
        // (`a_card_number_sent_as_a_json_number_is_masked`).
        (-999_999_999_999i64..=999_999_999_999).prop_map(|n| json!(n)),
        (-1e6f64..1e6).prop_map(|n| json!(n)),
        FILLER.prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            // Keys may hold anything, an e-mail address included: keys are not masked.
            prop::collection::btree_map("[a-z]{1,6}|bob@example\\.com", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// One detector at a time: every embedded secret is masked and counted
    /// exactly once.
    #[test]
    fn each_secret_masked_and_counted_in_text(
        kind in prop::sample::select(vec![Kind::Email, Kind::Card, Kind::Iban, Kind::Ipv4, Kind::Custom]),
        filler in FILLER,
        seps in prop::collection::vec(SEP, 1..4),
        pool in prop::collection::vec(secret(), 1..40),
    ) {
        let secrets: Vec<(Kind, String)> = pool.into_iter().filter(|(k, _)| *k == kind).take(5).collect();
        prop_assume!(!secrets.is_empty());
        let text = embed(&filler, &secrets, &seps);
        let m = masker_for(Some(kind));
        let mut c = Counts::new();
        let out = m.mask_text(&text, &mut c);
        for (_, v) in &secrets {
            prop_assert!(!out.contains(v.as_str()), "`{}` survived: {:?}", v, out);
        }
        prop_assert_eq!(c.get(kind.rule()), secrets.len() as u64, "{:?}", out);
        prop_assert_eq!(c.total(), secrets.len() as u64);
    }

    /// All rules at once, secrets of every kind mixed, in text and in a
    /// JSON A2A message: none survives, each rule counts at least its own.
    #[test]
    fn mixed_secrets_never_survive_text_or_json(
        filler in FILLER,
        seps in prop::collection::vec(SEP, 1..4),
        secrets in prop::collection::vec(secret(), 1..8),
    ) {
        let m = masker_for(None);
        let text = embed(&filler, &secrets, &seps);
        let mut c = Counts::new();
        let out = m.mask_text(&text, &mut c);
        for (kind, v) in &secrets {
            prop_assert!(!out.contains(v.as_str()), "`{}` survived: {:?}", v, out);
            prop_assert!(c.get(kind.rule()) >= expected(&secrets, *kind));
        }

        let body = serde_json::to_vec(&json!({
            "jsonrpc": "2.0", "id": 1, "method": "message/send",
            "params": {"message": {"role": "user", "parts": [
                {"kind": "text", "text": text},
                {"kind": "data", "data": {"note": secrets[0].1, "n": 42}},
            ]}},
        })).expect("serialize");
        let mut c = Counts::new();
        let out = m.mask_json(&body, &mut c).expect("valid JSON");
        let parsed: Value = serde_json::from_slice(&out).expect("output is JSON");
        let mut all = Vec::new();
        strings(&parsed, &mut all);
        for (kind, v) in &secrets {
            prop_assert!(!all.iter().any(|s| s.contains(v.as_str())), "`{}` survived in JSON", v);
            prop_assert!(c.get(kind.rule()) >= expected(&secrets, *kind) + u64::from(*kind == secrets[0].0));
        }
        prop_assert_eq!(&parsed["params"]["message"]["parts"][1]["data"]["n"], &json!(42));
    }

    /// Text and JSON without a match come back borrowed and byte-identical,
    /// compact or pretty, whatever the keys hold.
    #[test]
    fn no_match_is_byte_identical(v in json_value(), text in FILLER) {
        let m = masker_for(None);
        let mut c = Counts::new();
        prop_assert!(matches!(m.mask_text(&text, &mut c), Cow::Borrowed(t) if t == text));
        for body in [serde_json::to_vec(&v).expect("ser"), serde_json::to_vec_pretty(&v).expect("ser")] {
            let out = m.mask_json(&body, &mut c).expect("valid JSON");
            prop_assert!(matches!(out, Cow::Borrowed(b) if b == body.as_slice()));
        }
        prop_assert!(c.is_empty());
    }

    /// Whatever the text, masking terminates, and it changes the text
    /// exactly when it counts something.
    #[test]
    fn arbitrary_text_changed_iff_counted(text in any::<String>()) {
        let m = all_detectors();
        let mut c = Counts::new();
        let out = m.mask_text(&text, &mut c);
        prop_assert_eq!(matches!(out, Cow::Owned(_)), c.total() > 0);
    }

    /// An event stream split at every byte boundary masks to the same
    /// bytes and counts as the whole stream, and no secret survives.
    #[test]
    fn sse_split_anywhere_is_the_same(
        events in prop::collection::vec(
            (
                prop::collection::vec(
                    (prop::sample::select(vec!["data: ", "data:", ": ", "event: ", "id: "]),
                     any::<bool>(), FILLER, secret(), FILLER),
                    1..4,
                ),
                prop::sample::select(vec!["\n", "\r\n", "\r"]),
            ),
            1..4,
        ),
        cut in any::<prop::sample::Index>(),
    ) {
        let m = masker_for(None);
        let mut stream = Vec::new();
        let mut secrets = Vec::new();
        for (lines, term) in &events {
            for (field, as_json, a, (_, s), b) in lines {
                let text = format!("{a} {s} {b}");
                let payload = if *as_json && field.starts_with("data") {
                    serde_json::to_string(&json!({"kind": "text", "text": text})).expect("ser")
                } else {
                    text.replace(['\n', '\r'], " ")
                };
                stream.extend_from_slice(field.as_bytes());
                stream.extend_from_slice(payload.as_bytes());
                stream.extend_from_slice(term.as_bytes());
                secrets.push(s.clone());
            }
            stream.extend_from_slice(term.as_bytes());
        }

        let mut whole_counts = Counts::new();
        let mut s = m.sse(1 << 20);
        let mut whole = s.feed(&stream, &mut whole_counts).expect("ok");
        whole.extend(s.finish(&mut whole_counts).expect("ok"));
        let out = String::from_utf8(whole.clone()).expect("utf8");
        for v in &secrets {
            prop_assert!(!out.contains(v.as_str()), "`{}` survived: {:?}", v, out);
        }
        prop_assert!(whole_counts.total() >= secrets.len() as u64);

        for i in 0..=stream.len() {
            let mut c = Counts::new();
            let mut s = m.sse(1 << 20);
            let mut got = s.feed(&stream[..i], &mut c).expect("ok");
            got.extend(s.feed(&stream[i..], &mut c).expect("ok"));
            got.extend(s.finish(&mut c).expect("ok"));
            prop_assert_eq!(&got, &whole, "split at {}", i);
            prop_assert_eq!(&c, &whole_counts);
        }
        // And in many small chunks.
        let step = 1 + cut.index(7);
        let mut c = Counts::new();
        let mut s = m.sse(1 << 20);
        let mut got = Vec::new();
        for chunk in stream.chunks(step) {
            got.extend(s.feed(chunk, &mut c).expect("ok"));
        }
        got.extend(s.finish(&mut c).expect("ok"));
        prop_assert_eq!(&got, &whole);
    }
}

/// Fragments that make valid and nearly valid JSON.
const FRAGMENTS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    " ",
    "\n",
    "\"a\"",
    "\"k\":",
    "\"\\u00e9\"",
    "\"\\ud83d\\ude00\"",
    "\"\\ud800\"",
    "\"\\udc00x\"",
    "\"\\x\"",
    "\"a\\\"b\"",
    "\"bob@example.com\"",
    "\"\t\"",
    "1",
    "-0.5e3",
    "01",
    "1.",
    "-",
    "2E+7",
    "true",
    "nul",
    "null",
    "false",
    "\"+1 415 555 2671\"",
    "\"",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// The masker's scanner accepts exactly what `serde_json` accepts (but
    /// for numbers beyond f64), and masked output is still JSON.
    #[test]
    fn json_scanner_agrees_with_serde_json(parts in prop::collection::vec(prop::sample::select(FRAGMENTS), 0..16)) {
        let body = parts.concat();
        let m = masker_for(None);
        let theirs = serde_json::from_slice::<Value>(body.as_bytes());
        // serde_json refuses numbers outside f64 (`2E+701`); the masker
        // only passes numbers through, as written, so it accepts them.
        prop_assume!(!theirs.as_ref().is_err_and(|e| e.to_string().contains("number out of range")));
        let theirs = theirs.is_ok();
        let ours = m.mask_json(body.as_bytes(), &mut Counts::new());
        prop_assert_eq!(ours.is_ok(), theirs, "{:?}", body);
        if let Ok(out) = ours {
            prop_assert!(serde_json::from_slice::<Value>(&out).is_ok());
        }
    }
}
