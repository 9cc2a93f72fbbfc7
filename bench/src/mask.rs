//! `dmsc-bench mask`: masking throughput (MB/s, 10^6 bytes of input per
//! second) on a realistic ~64 KiB A2A body, one thread.
//!
//! The body is a JSON-RPC `message/send` whose text parts are paragraphs of
//! ordinary prose; one paragraph in four carries a value to mask (an e-mail
//! address, a phone number, a card number, an IBAN, an IP address, an API
//! key, an employee id for the custom pattern). Measured for three shapes:
//! `json` (the body through `mask_json`), `json-clean` (the same size with
//! nothing to mask: the common case, where the input comes back borrowed)
//! and `sse` (the same paragraphs as one `data:` event each, fed to the
//! streaming masker in 4 KiB chunks). The masked output is checked once so a
//! fast but broken masker cannot win.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use dmsc_mask::{Counts, Masker, RuleSpec, DETECTORS};
use serde_json::json;

#[derive(clap::Args, Debug, Clone)]
pub struct MaskArgs {
    /// Seconds of measurement per shape.
    #[arg(long, default_value_t = 3)]
    pub secs: u64,
    /// Approximate body size in KiB.
    #[arg(long, default_value_t = 64)]
    pub kib: usize,
}

const PROSE: &[&str] = &[
    "The quarterly report shows steady growth across all regions, with the northern division ahead of plan by a comfortable margin.",
    "Please review the attached summary before the meeting on Thursday; we will go through the open questions one by one.",
    "Customer feedback has been positive overall, although several users asked for clearer error messages in the onboarding flow.",
    "Die Lieferung wurde am Dienstag verschickt und sollte innerhalb von drei Werktagen eintreffen, sofern keine Verzögerungen auftreten.",
    "Le rapport final sera disponible la semaine prochaine, après la validation par l'équipe juridique et la direction financière.",
    "Latency at the ninety-ninth percentile stayed within budget during the load test, and no errors were observed in the logs.",
];

const SECRETS: &[&str] = &[
    "Contact alice.martin@example.com for the contract details.",
    "Call me back on +44 20 7946 0958 after lunch.",
    "The card on file is 4111 1111 1111 1111, expiring next year.",
    "Wire the deposit to DE89 3704 0044 0532 0130 00 by Friday.",
    "The client connected from 203.0.113.42 and from 2001:db8::8a2e:370:7334.",
    "Use the key AKIAIOSFODNN7EXAMPLE only in the staging account.",
    "Employee EMP-204816 approved the request.",
];

fn paragraphs(kib: usize, with_secrets: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut size = 0;
    let mut i = 0;
    while size < kib * 1024 {
        let mut p = String::new();
        for j in 0..3 {
            p.push_str(PROSE[(i + j) % PROSE.len()]);
            p.push(' ');
        }
        if with_secrets && i % 4 == 0 {
            p.push_str(SECRETS[(i / 4) % SECRETS.len()]);
        } else {
            p.push_str(PROSE[(i + 3) % PROSE.len()]);
        }
        size += p.len() + 40;
        out.push(p);
        i += 1;
    }
    out
}

fn json_body(paras: &[String]) -> anyhow::Result<Vec<u8>> {
    let parts: Vec<_> = paras
        .iter()
        .map(|p| json!({"kind": "text", "text": p}))
        .collect();
    Ok(serde_json::to_vec(&json!({
        "jsonrpc": "2.0",
        "id": "req-7f3a",
        "method": "message/send",
        "params": {
            "message": {
                "role": "user",
                "messageId": "9b1c6a52-3d0e-4f7a-8e21-5c4b0d9f1a77",
                "parts": parts,
                "metadata": {"dmsc.dataTags": ["pii"]},
            },
            "configuration": {"blocking": true, "acceptedOutputModes": ["text/plain"]},
        },
    }))?)
}

fn sse_body(paras: &[String]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    for (i, p) in paras.iter().enumerate() {
        let event = json!({
            "jsonrpc": "2.0",
            "id": "req-7f3a",
            "result": {
                "kind": "artifact-update",
                "taskId": "task-1",
                "artifact": {"artifactId": format!("a-{i}"), "parts": [{"kind": "text", "text": p}]},
            },
        });
        out.extend_from_slice(b"event: message\ndata: ");
        out.extend_from_slice(&serde_json::to_vec(&event)?);
        out.extend_from_slice(b"\n\n");
    }
    Ok(out)
}

fn measure(
    secs: u64,
    bytes: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<(f64, u64)> {
    // Warm up (regex caches, allocator).
    for _ in 0..10 {
        f()?;
    }
    let limit = Duration::from_secs(secs);
    let start = Instant::now();
    let mut iters = 0u64;
    while start.elapsed() < limit {
        f()?;
        iters += 1;
    }
    let mbps = (bytes as f64 * iters as f64) / start.elapsed().as_secs_f64() / 1e6;
    Ok((mbps, iters))
}

pub fn run(args: MaskArgs) -> anyhow::Result<()> {
    let masker = Masker::new(&[
        RuleSpec {
            name: "pii".into(),
            detectors: DETECTORS.iter().map(|d| d.to_string()).collect(),
            patterns: vec![],
        },
        RuleSpec {
            name: "employee-ids".into(),
            detectors: vec![],
            patterns: vec![r"EMP-\d{6}".into()],
        },
    ])
    .map_err(|e| anyhow::anyhow!("bench rules: {e:?}"))?;

    let secret_paras = paragraphs(args.kib, true);
    let json = json_body(&secret_paras)?;
    let clean = json_body(&paragraphs(args.kib, false))?;
    let sse = sse_body(&secret_paras)?;

    // Check once: every planted value masked, clean body untouched.
    let mut counts = Counts::new();
    let out = masker.mask_json(&json, &mut counts).context("json body")?;
    let text = std::str::from_utf8(&out)?;
    for leaked in [
        "alice.martin@",
        "7946 0958",
        "4111 1111",
        "DE89 3704",
        "203.0.113.42",
        "2001:db8::",
        "AKIAIOSF",
        "EMP-204816",
    ] {
        ensure!(!text.contains(leaked), "`{leaked}` survived masking");
    }
    let per_body = counts.total();
    ensure!(
        matches!(
            masker.mask_json(&clean, &mut Counts::new())?,
            std::borrow::Cow::Borrowed(_)
        ),
        "the clean body was changed"
    );

    println!(
        "masking throughput, one thread, {} rules ({} detectors + 1 custom pattern), {}s per shape",
        masker.rules().len(),
        DETECTORS.len(),
        args.secs
    );
    println!("| shape | body | values masked per body | MB/s |");
    println!("|---|---|---|---|");
    let (mbps, _) = measure(args.secs, json.len(), || {
        let mut c = Counts::new();
        masker.mask_json(&json, &mut c)?;
        Ok(())
    })?;
    println!("| json | {} B | {per_body} | {mbps:.0} |", json.len());
    let (mbps, _) = measure(args.secs, clean.len(), || {
        let mut c = Counts::new();
        masker.mask_json(&clean, &mut c)?;
        Ok(())
    })?;
    println!("| json-clean | {} B | 0 | {mbps:.0} |", clean.len());
    let mut sse_count = 0;
    let (mbps, _) = measure(args.secs, sse.len(), || {
        let mut c = Counts::new();
        let mut s = masker.sse(1 << 20);
        for chunk in sse.chunks(4096) {
            s.feed(chunk, &mut c)?;
        }
        s.finish(&mut c)?;
        sse_count = c.total();
        Ok(())
    })?;
    println!(
        "| sse (4 KiB chunks) | {} B | {sse_count} | {mbps:.0} |",
        sse.len()
    );
    Ok(())
}
