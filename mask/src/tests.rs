//! Unit tests: each detector with positives and near misses, rule-set
//! validation, JSON splicing, body dispatch, SSE framing.

use super::*;

fn rule(name: &str, detectors: &[&str], patterns: &[&str]) -> RuleSpec {
    RuleSpec {
        name: name.to_owned(),
        detectors: detectors.iter().map(|s| s.to_string()).collect(),
        patterns: patterns.iter().map(|s| s.to_string()).collect(),
    }
}

fn only(detector: &str) -> Masker {
    Masker::new(&[rule("r", &[detector], &[])]).expect("valid rule")
}

fn all() -> Masker {
    Masker::new(&[rule("pii", DETECTORS, &[])]).expect("valid rule")
}

/// Mask with one detector; return the output and the count.
fn run(detector: &str, s: &str) -> (String, u64) {
    let mut c = Counts::new();
    let out = only(detector).mask_text(s, &mut c).into_owned();
    (out, c.get("r"))
}

fn masked(detector: &str, s: &str, value: &str) {
    let (out, n) = run(detector, s);
    assert!(
        !out.contains(value),
        "{detector}: `{value}` survived in `{out}`"
    );
    assert!(
        out.contains(&format!("[masked:{detector}]")),
        "{detector}: no replacement in `{out}`"
    );
    assert!(n >= 1, "{detector}: not counted in `{out}`");
}

fn untouched(detector: &str, s: &str) {
    let mut c = Counts::new();
    let out = only(detector).mask_text(s, &mut c);
    assert!(
        matches!(out, Cow::Borrowed(_)),
        "{detector}: `{s}` was masked to `{out}`"
    );
    assert!(c.is_empty());
}

#[test]
fn email() {
    for e in [
        "alice@example.com",
        "a.b+tag@mail.example.co.uk",
        "x_y-z%1@sub-domain.example.io",
        "jürgen@beispiel.de",
    ] {
        masked("email", &format!("write to {e}, thanks"), e);
    }
    assert_eq!(
        run("email", "mail alice@example.com.").0,
        "mail [masked:email]."
    );
    for s in [
        "alice at example dot com",
        "@handle",
        "a@b",
        "user@localhost",
        "1@2.34",
    ] {
        untouched("email", s);
    }
}

#[test]
fn phone() {
    for p in [
        "+1 415 555 2671",
        "+14155552671",
        "+44 20 7946 0958",
        "+33 6 12 34 56 78",
        "+49-30-1234567",
        "+1 (415) 555-2671",
        "(415) 555-2671",
        "415-555-2671",
        "415.555.2671",
        "030 1234 5678",
        "06 12 34 56 78",
    ] {
        masked("phone", &format!("call {p} today"), p);
    }
    for s in [
        "order 4155552671",
        "2024-01-15",
        "15 01 2024",
        "on 2024-01-15 at 10:30",
        "10 000 000 euros",
        "123 456 789",
        "room 12 34",
        "555-2671",
        "at 2024-01-15 10:30:00 UTC",
        "at 2024/01/15 10:30",
        "15-01-2024 10 30",
        "id 12345678-1234-1234-1234-123456789012",
        "/v1/items/1234-5678-9012/parts",
        "+123",
        "version 1.2.3",
        "4111 1111 1111 1111 1111",
    ] {
        untouched("phone", s);
    }
}

#[test]
fn iban() {
    for i in [
        "DE89370400440532013000",
        "DE89 3704 0044 0532 0130 00",
        "GB82 WEST 1234 5698 7654 32",
        "gb82west12345698765432",
        "NO9386011117947",
    ] {
        masked("iban", &format!("pay to {i} by Friday"), i);
    }
    // Trailing group that is not part of it: mask the IBAN, keep the rest.
    assert_eq!(
        run("iban", "DE89 3704 0044 0532 0130 00 12").0,
        "[masked:iban] 12"
    );
    for s in [
        "DE89370400440532013001",   // check digits wrong
        "DE8937040044053201300",    // one character short for DE
        "ZZ89370400440532013000",   // no such country
        "XX00 0000 0000 0000 0000", // shape only
    ] {
        untouched("iban", s);
    }
}

#[test]
fn payment_card() {
    for c in [
        "4111111111111111",
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "5555555555554444",
        "378282246310005",
        "3782 822463 10005",
        "6011111111111117",
        "4222222222222",
    ] {
        masked("payment_card", &format!("card {c} exp 12/29"), c);
    }
    // An invalid group of digits just before a valid card.
    let (out, n) = run("payment_card", "ref 1234 4111 1111 1111 1111 ok");
    assert_eq!(out, "ref 1234 [masked:payment_card] ok");
    assert_eq!(n, 1);
    for s in [
        "4111111111111112",        // Luhn-invalid
        "4111 1111 1111 1112",     // Luhn-invalid, grouped
        "1733350000000",           // a millisecond timestamp
        "41111111111111111111111", // too long
        "411111111111",            // too short
    ] {
        untouched("payment_card", s);
    }
}

#[test]
fn ipv4() {
    for a in ["192.168.1.10", "10.0.0.1", "255.255.255.255", "8.8.8.8"] {
        masked("ipv4", &format!("from {a}:443 ok"), a);
    }
    for s in [
        "256.1.1.1",
        "1.2.3",
        "version 1.2.3.4.5",
        "oid 1.3.6.1.4.1",
        "999.999.999.999",
    ] {
        untouched("ipv4", s);
    }
}

#[test]
fn ipv6() {
    for a in [
        "2001:db8::1",
        "2001:0db8:85a3:0000:0000:8a2e:0370:7334",
        "fe80::1ff:fe23:4567:890a",
        "::ffff:192.0.2.128",
    ] {
        masked("ipv6", &format!("peer {a} connected"), a);
    }
    for s in [
        "std::net::Ipv6Addr",
        "a::b",
        "at 12:30:45",
        "mac 00:1a:2b:3c:4d:5e",
        "2001:db8:::1",
        "::1",
    ] {
        untouched("ipv6", s);
    }
}

#[test]
fn api_key() {
    for k in [
        "AKIAIOSFODNN7EXAMPLE",
        "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
        "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEF",
        "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
        "sk-proj-AbCdEf0123456789GhIjKlMnOpQr",
        "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
        "AIzaSyA-1234567890abcdefghijklmnopqrstu",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    ] {
        masked("api_key", &format!("token={k} end"), k);
    }
    // The scheme word stays, the credential goes.
    let (out, _) = run("api_key", "Authorization: Bearer 7f3a9c0e1b2d4f6a8c0e");
    assert_eq!(out, "Authorization: Bearer [masked:api_key]");
    let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----";
    masked("api_key", &format!("key:\n{pem}\n"), "MIIEowIBAAKCAQEA");
    for s in [
        "the bearer of bad news",
        "Bearer authentication",
        "sk-learn-is-a-python-library",
        "task-force-assignments-list-abc",
        "AKIA1234",
        "ghp_short",
        "eyJhbGciOi alone",
    ] {
        untouched("api_key", s);
    }
}

#[test]
fn replacements_never_match_a_detector() {
    let m = all();
    for d in DETECTORS {
        let mut c = Counts::new();
        let label = format!("[masked:{d}]");
        assert!(
            matches!(m.mask_text(&label, &mut c), Cow::Borrowed(_)),
            "{label}"
        );
    }
}

#[test]
fn custom_patterns_and_counts_per_rule() {
    let m = Masker::new(&[
        rule("ids", &[], &[r"EMP-\d{6}", r"(?i)project\s+falcon"]),
        rule("contact", &["email", "phone"], &[]),
    ])
    .expect("valid");
    let mut c = Counts::new();
    let out = m.mask_text(
        "EMP-123456 and emp-654321 on Project  Falcon; mail bob@example.org or +1 415 555 2671",
        &mut c,
    );
    assert_eq!(
        out,
        "[masked:ids] and emp-654321 on [masked:ids]; mail [masked:email] or [masked:phone]"
    );
    assert_eq!(c.get("ids"), 2);
    assert_eq!(c.get("contact"), 2);
    assert_eq!(c.total(), 4);
}

#[test]
fn overlapping_hits_merge_and_count_once_per_rule() {
    let m =
        Masker::new(&[rule("pii", &["email"], &[]), rule("acme", &[], &["acme"])]).expect("valid");
    let mut c = Counts::new();
    let out = m.mask_text("x bob@acme.com y", &mut c);
    assert_eq!(out, "x [masked:email] y");
    assert_eq!((c.get("pii"), c.get("acme")), (1, 1));
    // The same detector in two rules: masked once, counted for both.
    let m = Masker::new(&[rule("a", &["email"], &[]), rule("b", &["email"], &[])]).expect("valid");
    let mut c = Counts::new();
    assert_eq!(m.mask_text("bob@acme.com", &mut c), "[masked:email]");
    assert_eq!((c.get("a"), c.get("b")), (1, 1));
}

#[test]
fn every_rule_problem_reported_at_once() {
    let errs = Masker::new(&[
        rule("ok", &["email"], &[]),
        rule("ok", &["emial"], &[]),
        rule("empty", &[], &[]),
        rule("bad re", &[], &["(unclosed"]),
        rule("big", &[], &[r"\w{500}\w{500}"]),
        rule("long", &[], &[&"a".repeat(MAX_PATTERN_LEN + 1)]),
        rule("nothing", &[], &["x*"]),
        rule("4111111111111111", &["email"], &[]),
    ])
    .expect_err("invalid");
    let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    let has = |needle: &str| text.iter().any(|t| t.contains(needle));
    assert!(has("`ok` appears more than once"), "{text:#?}");
    assert!(has("unknown detector `emial`; known detectors: email, phone, iban, payment_card, ipv4, ipv6, api_key"), "{text:#?}");
    assert!(has("`empty` has no detectors and no patterns"), "{text:#?}");
    assert!(has("`bad re` is not valid"), "{text:#?}");
    assert!(
        has("masking rule `bad re`: pattern 0 `(unclosed` is not a valid regular expression"),
        "{text:#?}"
    );
    assert!(
        has("`big`: pattern 0") && has("compiles to more than"),
        "{text:#?}"
    );
    assert!(has("`long`: pattern 0 is 1025 bytes long"), "{text:#?}");
    assert!(has("matches the empty string"), "{text:#?}");
    assert!(
        has("would itself be found by the `payment_card` detector"),
        "{text:#?}"
    );
    assert_eq!(errs.len(), 9, "{text:#?}");
}

#[test]
fn a_pathological_pattern_is_linear() {
    // Exponential for a backtracking engine; linear here.
    let m = Masker::new(&[rule("p", &[], &[r"(a+)+$"])]).expect("valid");
    let s = format!("{}!", "a".repeat(100_000));
    let start = std::time::Instant::now();
    let mut c = Counts::new();
    let _ = m.mask_text(&s, &mut c);
    assert!(start.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn empty_masker_masks_nothing_but_validates_json() {
    let m = Masker::new(&[]).expect("valid");
    let mut c = Counts::new();
    assert!(matches!(
        m.mask_json(br#"{"a":"bob@example.com"}"#, &mut c),
        Ok(Cow::Borrowed(_))
    ));
    assert!(m.mask_json(b"{", &mut c).is_err());
}

#[test]
fn json_splices_only_changed_values() {
    let m = all();
    let body = br#"{ "email" : "bob@example.com",  "n": 1.50e3, "keep":"caf\u00e9",
  "parts": [ {"kind":"text", "text": "call +1 415 555 2671 now"} ], "alice@example.com": null }"#;
    let mut c = Counts::new();
    let out = m.mask_json(body, &mut c).expect("valid json");
    let want = br#"{ "email" : "[masked:email]",  "n": 1.50e3, "keep":"caf\u00e9",
  "parts": [ {"kind":"text", "text": "call [masked:phone] now"} ], "alice@example.com": null }"#;
    assert_eq!(
        std::str::from_utf8(&out).expect("utf8"),
        std::str::from_utf8(want).expect("utf8")
    );
    assert_eq!(c.get("pii"), 2);
}

#[test]
fn a_card_number_sent_as_a_json_number_is_masked() {
    let m = all();
    let body = br#"{"card": 4111111111111111, "n": 12345, "ts": 1733400000000, "id": 4111111111111112, "x": 5.5e-3, "f": -4037.5113237635087, "bare": [2000000000008]}"#;
    let mut c = Counts::new();
    let out = m.mask_json(body, &mut c).expect("valid json");
    let want = br#"{"card": "[masked:payment_card]", "n": 12345, "ts": 1733400000000, "id": 4111111111111112, "x": 5.5e-3, "f": -4037.5113237635087, "bare": ["[masked:payment_card]"]}"#;
    assert_eq!(
        std::str::from_utf8(&out).expect("utf8"),
        std::str::from_utf8(want).expect("utf8")
    );
    assert_eq!(c.get("pii"), 2);
    // A whole document that is one number (an SSE `data:` line).
    let out = m.mask_json(b"2000000000008", &mut c).expect("valid json");
    assert_eq!(&out[..], br#""[masked:payment_card]""#);
}

#[test]
fn json_escapes_are_decoded_before_matching_and_reencoded() {
    let m = all();
    let mut c = Counts::new();
    let out = m
        .mask_json(br#"["mail a\u0040b.example.com\n\"x\"\ttab"]"#, &mut c)
        .expect("valid");
    assert_eq!(&*out, br#"["mail [masked:email]\n\"x\"\ttab"]"#);
    let v: serde_json::Value = serde_json::from_slice(&out).expect("still JSON");
    assert_eq!(v[0], "mail [masked:email]\n\"x\"\ttab");
}

#[test]
fn json_without_match_is_borrowed() {
    let m = all();
    let body = br#"{"jsonrpc":"2.0","id":7,"method":"message/send","params":{"message":{"parts":[{"kind":"text","text":"hello \u00e9 world"}]}}}"#;
    let mut c = Counts::new();
    let out = m.mask_json(body, &mut c).expect("valid");
    assert!(matches!(out, Cow::Borrowed(b) if b == body));
    assert!(c.is_empty());
}

#[test]
fn invalid_json_is_unmaskable_and_counts_nothing() {
    let m = all();
    for bad in [
        &br#"{"a":"bob@example.com""#[..],
        br#"{"a":"bob@example.com",}"#,
        br#"["\ud800"]"#,
        br#"[01]"#,
        br#"[1.]"#,
        br#"{"a" 1}"#,
        b"[\"a\x01\"]",
        br#"[] []"#,
        br#"[tru]"#,
        b"",
    ] {
        let mut c = Counts::new();
        let r = m.mask_json(bad, &mut c);
        assert!(
            matches!(r, Err(Unmaskable::InvalidJson { .. })),
            "{:?} -> {r:?}",
            String::from_utf8_lossy(bad)
        );
        assert!(c.is_empty());
    }
    let deep = format!(
        "{}{}",
        "[".repeat(json::MAX_DEPTH + 1),
        "]".repeat(json::MAX_DEPTH + 1)
    );
    assert!(m.mask_json(deep.as_bytes(), &mut Counts::new()).is_err());
    let ok = format!(
        "{}{}",
        "[".repeat(json::MAX_DEPTH),
        "]".repeat(json::MAX_DEPTH)
    );
    assert!(m.mask_json(ok.as_bytes(), &mut Counts::new()).is_ok());
    assert!(matches!(
        m.mask_json(b"[\"\xff\"]", &mut Counts::new()),
        Err(Unmaskable::InvalidUtf8 { at: 2 })
    ));
}

#[test]
fn body_dispatch_by_content_type() {
    let m = all();
    let json = br#"{"text":"bob@example.com"}"#;
    let mut c = Counts::new();
    for ct in [
        "application/json",
        "Application/JSON; charset=utf-8",
        "application/vnd.a2a+json",
    ] {
        let out = m.mask_body(Some(ct), None, json, &mut c).expect(ct);
        assert_eq!(&*out, br#"{"text":"[masked:email]"}"#, "{ct}");
    }
    let out = m
        .mask_body(
            Some("text/plain"),
            Some("identity"),
            b"bob@example.com",
            &mut c,
        )
        .expect("text");
    assert_eq!(&*out, b"[masked:email]");
    let out = m
        .mask_body(
            Some("text/event-stream"),
            None,
            b"event: m\ndata: {\"t\":\"bob@example.com\"}\n\n",
            &mut c,
        )
        .expect("sse");
    assert_eq!(&*out, b"event: m\ndata: {\"t\":\"[masked:email]\"}\n\n");
    assert_eq!(c.get("pii"), 5);

    let refuse = |ct: Option<&str>, ce: Option<&str>, body: &[u8]| {
        let e = m
            .mask_body(ct, ce, body, &mut Counts::new())
            .expect_err("unmaskable");
        (e.http_status(), e)
    };
    assert!(matches!(
        refuse(None, None, json),
        (415, Unmaskable::MissingContentType)
    ));
    assert!(matches!(
        refuse(Some("application/octet-stream"), None, json),
        (415, Unmaskable::UnsupportedContentType(_))
    ));
    assert!(matches!(
        refuse(Some("application/json"), Some("gzip"), json),
        (415, Unmaskable::Encoded(e)) if e == "gzip"
    ));
    assert!(matches!(
        refuse(Some("text/plain; charset=iso-8859-1"), None, b"x"),
        (415, Unmaskable::UnsupportedCharset(_))
    ));
    assert!(matches!(
        refuse(Some("text/plain"), None, b"ok \xe9"),
        (415, Unmaskable::InvalidUtf8 { at: 3 })
    ));
    assert!(matches!(
        refuse(Some("application/json"), None, b"{nope"),
        (415, Unmaskable::InvalidJson { .. })
    ));
    // Nothing to mask in an empty body, whatever it claims to be.
    assert!(m
        .mask_body(Some("application/octet-stream"), Some("br"), b"", &mut c)
        .is_ok());
}

#[test]
fn sse_events_are_emitted_whole_and_masked() {
    let m = all();
    let mut s = m.sse(1024);
    let mut c = Counts::new();
    assert_eq!(s.feed(b"data: {\"t\":\"bob@exa", &mut c).expect("ok"), b"");
    assert!(c.is_empty(), "counted before the event was emitted");
    assert_eq!(s.feed(b"mple.com\"}\n", &mut c).expect("ok"), b"");
    let out = s.feed(b"\n: comment 10.0.0.1\r\n", &mut c).expect("ok");
    assert_eq!(out, b"data: {\"t\":\"[masked:email]\"}\n\n");
    assert_eq!(c.get("pii"), 1);
    let out = s
        .feed(b"data: plain +1 415 555 2671\r\n\r\n", &mut c)
        .expect("ok");
    assert_eq!(
        out,
        b": comment [masked:ipv4]\r\ndata: plain [masked:phone]\r\n\r\n"
    );
    assert_eq!(c.get("pii"), 3);
    assert_eq!(
        s.feed(b"data: tail bob@example.com", &mut c).expect("ok"),
        b""
    );
    assert_eq!(s.finish(&mut c).expect("ok"), b"data: tail [masked:email]");
    assert_eq!(c.get("pii"), 4);
}

#[test]
fn sse_event_over_the_limit_is_refused_and_stays_refused() {
    let m = all();
    let mut s = m.sse(64);
    let mut c = Counts::new();
    assert!(s.feed(b"data: small\n\n", &mut c).is_ok());
    let e = s.feed(&[b'a'; 65], &mut c).expect_err("too large");
    assert_eq!(e, Unmaskable::EventTooLarge { limit: 64 });
    assert_eq!(e.http_status(), 413);
    assert!(s.feed(b"\n\n", &mut c).is_err());
    // Many lines that together exceed it.
    let mut s = m.sse(64);
    for _ in 0..6 {
        let r = s.feed(b"data: 0123456789\n", &mut c);
        if r.is_err() {
            return;
        }
    }
    panic!("a 102-byte event passed a 64-byte limit");
}

#[test]
fn sse_invalid_utf8_is_refused() {
    let m = all();
    let mut s = m.sse(1024);
    let e = s
        .feed(b"data: ok\n\ndata: \xff\n\n", &mut Counts::new())
        .expect_err("invalid");
    assert_eq!(e, Unmaskable::InvalidUtf8 { at: 16 });
}

#[test]
fn masker_is_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<Masker>();
    check::<SseMasker>();
}

#[test]
fn classify_before_reading_the_body() {
    assert_eq!(
        classify(Some("text/event-stream"), None),
        Ok(BodyKind::EventStream)
    );
    assert_eq!(
        classify(Some("application/problem+json"), Some(" identity ")),
        Ok(BodyKind::Json)
    );
    assert_eq!(
        classify(Some("text/markdown; charset=UTF-8"), None),
        Ok(BodyKind::Text)
    );
    assert_eq!(
        classify(Some("text/event-stream"), Some("gzip")),
        Err(Unmaskable::Encoded("gzip".into()))
    );
    assert!(classify(Some("image/png"), None).is_err());
    assert!(classify(Some("json"), None).is_err());
    assert!(classify(Some("/+json"), None).is_err());
}

#[test]
fn realistic_patterns_fit_the_limits_and_sets_are_bounded() {
    let m = Masker::new(&[rule(
        "corp",
        &[],
        &[
            r"(?i)\b[a-z0-9._%+-]+@acme\.com\b",
            r"\bEMP-\d{6}\b",
            r"(?i)project\s+(falcon|eagle)",
            r"\b[A-Z]{2}\d{6}[A-Z]\b",
            r"\w{1,16}@internal",
        ],
    )])
    .expect("ordinary patterns compile");
    let mut c = Counts::new();
    assert_eq!(
        m.mask_text("Bob@ACME.com on project eagle", &mut c),
        "[masked:corp] on [masked:corp]"
    );
    let many: Vec<RuleSpec> = (0..5)
        .map(|i| {
            let pats: Vec<String> = (0..30)
                .map(|j| match i * 30 + j {
                    140 => "(broken".to_owned(),
                    _ => format!("x{i}y{j}z"),
                })
                .collect();
            RuleSpec {
                name: format!("r{i}"),
                detectors: vec![],
                patterns: pats,
            }
        })
        .collect();
    let errs = Masker::new(&many).expect_err("150 patterns");
    // Pattern 140 is broken too, but past the total nothing is compiled.
    assert_eq!(
        errs,
        vec![MaskError::TooManyPatternsInAll {
            count: 150,
            limit: MAX_PATTERNS
        }]
    );
}

#[test]
fn rules_too_big_together_are_refused() {
    // Each fits alone (about 650 KB); together they exceed the set limit.
    let pats: Vec<String> = (0..30).map(|i| format!(r"\w{{1,12}}@x{i}")).collect();
    let refs: Vec<&str> = pats.iter().map(String::as_str).collect();
    let errs = Masker::new(&[rule("big", &[], &refs)]).expect_err("too big together");
    assert_eq!(
        errs,
        vec![MaskError::RulesTooBig {
            limit: SET_SIZE_LIMIT
        }]
    );
}
