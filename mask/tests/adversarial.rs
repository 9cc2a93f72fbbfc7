//! Adversarial inputs for the detectors' search-and-validate loops: long
//! runs of near-candidates that every validator rejects must still cost
//! time linear in the input (a quadratic loop would take minutes here).

use std::time::{Duration, Instant};

use dmsc_mask::{Counts, Masker, RuleSpec, DETECTORS};

#[test]
fn near_candidates_are_linear() {
    let m = Masker::new(&[RuleSpec {
        name: "all".into(),
        detectors: DETECTORS.iter().map(|d| d.to_string()).collect(),
        patterns: vec![r"(x+x+)+y".into()],
    }])
    .expect("valid");
    let size = 256 * 1024;
    let unit = [
        "1.1.1.1.",
        "a:a:a:",
        "1:2:3:4:5:6:7:8:9:",
        "DE00 0000 ",
        "4111 ",
        "+1 ",
        "a@a@",
        "a@b.c",
        "bearer ",
        "Bearer 0123456789a ",
        "-----BEGIN PRIVATE KEY-----",
        "eyJaaaa.eyJaaaa.",
        "sk-aaaaaaaaaaaaaaaaaaaaaaaaa ",
        "12 34 ",
        "xxxxxxxxxx",
    ];
    for u in unit {
        let s = u.repeat(size / u.len());
        let start = Instant::now();
        let mut c = Counts::new();
        let _ = m.mask_text(&s, &mut c);
        let took = start.elapsed();
        println!("{u:?}: {took:?} ({} masked)", c.total());
        // Unoptimised build on a loaded machine: a linear scan of 256 KiB
        // takes milliseconds to a second; quadratic would take minutes.
        assert!(took < Duration::from_secs(20), "{u:?} took {took:?}");
    }
}
