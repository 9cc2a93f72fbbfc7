//! `dmsc-mask`: masking of personal data and secrets in request and
//! response bodies.
//!
//! # Why
//!
//! A tenant's policy can say that requests leaving the tenant (to another
//! tenant's agent) or the region must not carry e-mail addresses, phone
//! numbers, IBANs, card numbers, IP addresses or credentials. The node
//! cannot ask the agent to behave; it rewrites the body on the way out.
//! This crate is the rewriting, and nothing else: no I/O, no policy
//! lookup, no audit. The node decides *whether* a body must be masked,
//! calls [`Masker::mask_body`] (or feeds an [`SseMasker`] for a stream),
//! and turns an [`Unmaskable`] into 415 / 413 and an audit record.
//!
//! # What is masked
//!
//! A [`Masker`] is compiled once from a tenant's rules ([`RuleSpec`]):
//! each rule has a name, named detectors ([`DETECTORS`]) and custom
//! regexes. Every match is replaced by `[masked:<detector>]` (or
//! `[masked:<rule>]` for a custom pattern), text that no detector matches,
//! so masked output stays masked if it is masked again downstream.
//!
//! - JSON bodies (`application/json`, `*/*+json`): every string *value*
//!   (not object keys), which includes A2A text parts, after JSON escapes
//!   are decoded (so `a\u0040b.example` is found). When nothing matched,
//!   the input comes back byte-identical and unallocated
//!   (`Cow::Borrowed`); when something matched, only the changed string
//!   values are re-encoded and spliced into the original bytes, so
//!   numbers, key order and whitespace stay exactly as they were.
//! - `text/event-stream`: event by event ([`SseMasker`]), each `data:`
//!   payload as JSON when it parses as JSON, else as text; every other
//!   line (comments, `id:`, `event:`) as text.
//! - Other `text/*`: the whole text.
//! - Anything else (binary, compressed, not UTF-8, not parseable) is
//!   [`Unmaskable`]: the caller fails closed unless policy lets it pass.
//!
//! Overlapping matches merge into one replacement, so no fragment of a
//! detected value survives because another detector found a neighbouring
//! one; each rule with a match in the merged span counts one value.
//!
//! # Detectors
//!
//! | name | masks | does not mask |
//! |---|---|---|
//! | `email` | `local@domain.tld`, Unicode letters included | `user@localhost`, `@handle` |
//! | `phone` | `+` and 7 to 15 digits in any common grouping (`+1 (415) 555-2671`, `+33 6 12 34 56 78`, `+14155552671`); national numbers written in 3+ groups (`030 1234 5678`, `415-555-2671`, `(415) 555-2671`, `415.555.2671`) | bare digit runs (`4155552671`: ids, timestamps), dates and timestamps (`2024-01-15 10:30`, `15 01 2024`), digit groups glued into a longer token by `-`, `.`, `/` or `:` (UUIDs, paths), grouped amounts (`10 000 000`), two-group numbers (`555-2671`) |
//! | `iban` | known country, that country's length, mod-97 check; with or without spaces, any case | a wrong check digit or length |
//! | `payment_card` | 13 to 19 digits starting 2 to 6, spaces or dashes anywhere, Luhn-valid | Luhn-invalid numbers, millisecond timestamps |
//! | `ipv4` | dotted quads with octets 0 to 255 | `256.1.1.1`, versions and OIDs with more parts (`1.2.3.4.5`) |
//! | `ipv6` | what `std` parses as IPv6 with 3+ groups or an embedded IPv4 (`2001:db8::1`, `::ffff:192.0.2.1`) | `::1`, `a::b`, `std::io`, clock times, MAC addresses |
//! | `api_key` | AWS `AKIA…`/`ASIA…`, GitHub `ghp_…`/`github_pat_…`, Slack `xox?-…`, `sk-…` (mixed classes), Stripe `sk_live_…`, Google `AIza…`, JWTs `eyJ….eyJ….…`, the token after `Bearer` (the word stays), PEM private key blocks | `sk-learn-…`, `bearer of bad news` |
//!
//! Digits are ASCII digits: other scripts' digits are not detected.
//!
//! JSON integers of 13 digits or more go through the detectors like
//! strings: a card number sent as a number is masked, and the number
//! becomes the masked string (its type changes; leaking it would be worse).
//! Shorter numbers, and any with a fraction or an exponent, are left as
//! written.
//!
//! Not masked: object keys (by design: masking a key could merge two keys),
//! and values split across several strings or events.
//! Base64 payloads (A2A file parts) are scanned as text like any string,
//! so a rare accidental match inside one changes those bytes.
//!
//! # Bounded cost
//!
//! Custom patterns run on the `regex` crate, whose engines (lazy DFA,
//! PikeVM) are linear in the input: there are no backreferences or
//! look-around to backtrack on, so a pathological pattern such as
//! `(a+)+$` takes time linear in the body like any other and cannot
//! stall a request. What a pattern could still cost is memory; patterns are
//! limited to [`MAX_PATTERN_LEN`] bytes and [`PATTERN_SIZE_LIMIT`] bytes of
//! compiled program, and a rule set to [`MAX_RULES`] rules,
//! [`MAX_PATTERNS_PER_RULE`] patterns per rule, [`MAX_PATTERNS`] in all and
//! [`SET_SIZE_LIMIT`] bytes compiled together. All rules and detectors run
//! together as one `RegexSet` first, so a string without any match is
//! scanned once.
//!
//! # Counts, never values
//!
//! [`Counts`] says how many values each rule masked, for the audit record
//! and metrics. The masked values themselves are never returned, stored
//! or logged.

#![forbid(unsafe_code)]

mod detect;
mod json;
mod sse;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use regex::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};

pub use sse::SseMasker;

/// The named detectors a rule can list.
pub const DETECTORS: &[&str] = &[
    "email",
    "phone",
    "iban",
    "payment_card",
    "ipv4",
    "ipv6",
    "api_key",
];

/// Longest custom pattern accepted, in bytes of source.
pub const MAX_PATTERN_LEN: usize = 1024;
/// Compiled size limit of one custom pattern (the `regex` crate's
/// `size_limit`; its lazy DFA cache gets the same).
pub const PATTERN_SIZE_LIMIT: usize = 1 << 20;
/// Most rules in one masker.
pub const MAX_RULES: usize = 64;
/// Most custom patterns in one rule.
pub const MAX_PATTERNS_PER_RULE: usize = 32;
/// Most custom patterns in one masker, all rules together: with
/// [`PATTERN_SIZE_LIMIT`] this bounds a masker's memory.
pub const MAX_PATTERNS: usize = 128;
/// Compiled size limit of all patterns and detectors together (the
/// pre-scan set, where the detectors take about 350 KiB). Each pattern is
/// also compiled alone, so a masker's compiled programs stay under about
/// twice this.
pub const SET_SIZE_LIMIT: usize = 16 << 20;
/// Default largest event [`SseMasker`] buffers before refusing the stream.
pub const DEFAULT_MAX_EVENT: usize = 1 << 20;

/// One masking rule as written in a tenant's policy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RuleSpec {
    /// Unique within the rule set; counts are reported under it. 1 to 64
    /// ASCII letters, digits, `_`, `-` or `.`.
    pub name: String,
    /// Names from [`DETECTORS`].
    pub detectors: Vec<String>,
    /// Custom regexes (`regex` crate syntax).
    pub patterns: Vec<String>,
}

/// A problem in a rule set. [`Masker::new`] reports all of them at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaskError {
    #[error("masking rule name `{rule}` is not valid: use 1 to 64 ASCII letters, digits, `_`, `-` or `.`")]
    BadRuleName { rule: String },
    #[error("masking rule `{rule}` appears more than once: rule names must be unique (masked values are counted per rule)")]
    DuplicateRule { rule: String },
    #[error("masking rule `{rule}` has no detectors and no patterns: list at least one of either")]
    EmptyRule { rule: String },
    #[error("masking rule `{rule}`: unknown detector `{detector}`; known detectors: {known}")]
    UnknownDetector {
        rule: String,
        detector: String,
        known: String,
    },
    #[error("masking rule `{rule}`: pattern {index} is {len} bytes long; the limit is {limit} bytes, split it into several patterns")]
    PatternTooLong {
        rule: String,
        index: usize,
        len: usize,
        limit: usize,
    },
    #[error("masking rule `{rule}`: pattern {index} `{pattern}` is not a valid regular expression: {reason}")]
    BadPattern {
        rule: String,
        index: usize,
        pattern: String,
        reason: String,
    },
    #[error("masking rule `{rule}`: pattern {index} `{pattern}` compiles to more than {limit} bytes; use smaller counted repetitions ({{n,m}}) and fewer Unicode classes, or (?-u) for ASCII-only classes")]
    PatternTooBig {
        rule: String,
        index: usize,
        pattern: String,
        limit: usize,
    },
    #[error("masking rule `{rule}`: pattern {index} `{pattern}` matches the empty string; a masking pattern must match at least one character")]
    EmptyMatch {
        rule: String,
        index: usize,
        pattern: String,
    },
    #[error("masking rule `{rule}` has {count} patterns; the limit is {limit} per rule")]
    TooManyPatterns {
        rule: String,
        count: usize,
        limit: usize,
    },
    #[error("{count} masking rules; the limit is {limit}: merge rules that share a purpose")]
    TooManyRules { count: usize, limit: usize },
    #[error("{count} custom masking patterns in all rules together; the limit is {limit}: combine patterns with `|`")]
    TooManyPatternsInAll { count: usize, limit: usize },
    #[error("the masking rules together compile to more than {limit} bytes; remove or simplify custom patterns")]
    RulesTooBig { limit: usize },
    #[error("masking rule `{rule}`: its replacement `[masked:{rule}]` would itself be found by the `{detector}` detector; rename the rule")]
    NameMatchesDetector { rule: String, detector: String },
}

/// Why a body could not be masked. The caller refuses the request (fail
/// closed) unless policy lets unmaskable bodies pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unmaskable {
    #[error("the body has no content type; a body that must be masked needs application/json, a +json type, text/event-stream or text/*")]
    MissingContentType,
    #[error("content type `{0}` cannot be masked: only application/json, +json types, text/event-stream and text/* can")]
    UnsupportedContentType(String),
    #[error("charset `{0}` cannot be masked: send UTF-8")]
    UnsupportedCharset(String),
    #[error("content encoding `{0}` cannot be masked: send the body uncompressed (identity)")]
    Encoded(String),
    #[error("the body is not valid UTF-8 (byte {at})")]
    InvalidUtf8 { at: usize },
    #[error("the body is not valid JSON (byte {at}): {what}")]
    InvalidJson { at: usize, what: &'static str },
    #[error("an event-stream event is longer than {limit} bytes, the most the masker buffers")]
    EventTooLarge { limit: usize },
}

impl Unmaskable {
    /// The HTTP status to refuse with: 413 when the problem is size, 415
    /// for everything the masker cannot read.
    pub fn http_status(&self) -> u16 {
        match self {
            Unmaskable::EventTooLarge { .. } => 413,
            _ => 415,
        }
    }
}

/// How many values each rule masked (rule name → count). Never the values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts(BTreeMap<String, u64>);

impl Counts {
    pub fn new() -> Counts {
        Counts::default()
    }

    /// Values masked by `rule` (0 if none).
    pub fn get(&self, rule: &str) -> u64 {
        self.0.get(rule).copied().unwrap_or(0)
    }

    /// Values masked by all rules.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `(rule, count)` in rule-name order, only rules that masked something.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }

    pub fn as_map(&self) -> &BTreeMap<String, u64> {
        &self.0
    }

    pub fn into_map(self) -> BTreeMap<String, u64> {
        self.0
    }

    /// Add `other`'s counts to these.
    pub fn merge(&mut self, other: &Counts) {
        for (k, v) in other.iter() {
            self.add(k, v);
        }
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }

    fn add(&mut self, rule: &str, n: u64) {
        match self.0.get_mut(rule) {
            Some(c) => *c += n,
            None => {
                self.0.insert(rule.to_owned(), n);
            }
        }
    }
}

enum Find {
    Detector(&'static detect::Detector),
    Custom(Regex),
}

struct Matcher {
    find: Find,
    /// `[masked:<detector or rule>]`.
    label: String,
    /// Indexes into `Inner::rules` of the rules this matcher counts for.
    rules: Vec<usize>,
}

struct Inner {
    rules: Vec<String>,
    matchers: Vec<Matcher>,
    /// Every matcher's pattern, same order: one pass decides which
    /// matchers need to run at all.
    set: RegexSet,
}

/// A compiled rule set. Cheap to clone (shared), `Send + Sync`.
#[derive(Clone)]
pub struct Masker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Masker")
            .field("rules", &self.inner.rules)
            .field("matchers", &self.inner.matchers.len())
            .finish()
    }
}

#[derive(Debug, Clone, Copy)]
struct Hit {
    start: usize,
    end: usize,
    matcher: usize,
}

/// How a body will be masked, from its content type ([`classify`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// `application/json` or a `+json` type: string values.
    Json,
    /// `text/event-stream`: event by event; stream it through an [`SseMasker`].
    EventStream,
    /// Other `text/*`: the whole text.
    Text,
}

/// Decide from the headers alone whether and how a body can be masked,
/// before reading it: the caller streams [`BodyKind::EventStream`]
/// through an [`SseMasker`] and buffers the others (up to its limit) for
/// [`Masker::mask_body`]. Refuses other types, charsets other than UTF-8
/// and any content encoding other than `identity`.
pub fn classify(
    content_type: Option<&str>,
    content_encoding: Option<&str>,
) -> Result<BodyKind, Unmaskable> {
    if let Some(enc) = content_encoding {
        let enc = enc.trim();
        if !enc.is_empty() && !enc.eq_ignore_ascii_case("identity") {
            return Err(Unmaskable::Encoded(enc.to_owned()));
        }
    }
    body_kind(content_type)
}

fn valid_rule_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
}

impl Masker {
    /// Compile `rules`. Every problem is reported, not just the first.
    /// An empty rule set is valid and masks nothing.
    pub fn new(rules: &[RuleSpec]) -> Result<Masker, Vec<MaskError>> {
        let mut errors = Vec::new();
        if rules.len() > MAX_RULES {
            errors.push(MaskError::TooManyRules {
                count: rules.len(),
                limit: MAX_RULES,
            });
        }
        let total_patterns: usize = rules.iter().map(|r| r.patterns.len()).sum();
        if total_patterns > MAX_PATTERNS {
            errors.push(MaskError::TooManyPatternsInAll {
                count: total_patterns,
                limit: MAX_PATTERNS,
            });
        }
        let detectors = detect::detectors();
        let mut names: Vec<String> = Vec::new();
        // Detector matchers are shared between rules that list the same
        // detector: the value is masked once and counted for each rule.
        let mut detector_matchers: Vec<Matcher> = Vec::new();
        let mut custom: Vec<Matcher> = Vec::new();
        let mut set_patterns: Vec<String> = Vec::new();
        let mut attempted = 0usize;
        for (ri, rule) in rules.iter().enumerate() {
            let name = &rule.name;
            if !valid_rule_name(name) {
                errors.push(MaskError::BadRuleName { rule: name.clone() });
            } else {
                let label = format!("[masked:{name}]");
                if let Some(d) = detectors.iter().find(|d| d.regex.is_match(&label)) {
                    errors.push(MaskError::NameMatchesDetector {
                        rule: name.clone(),
                        detector: d.name.to_owned(),
                    });
                }
            }
            if names.contains(name) {
                errors.push(MaskError::DuplicateRule { rule: name.clone() });
            }
            names.push(name.clone());
            if rule.detectors.is_empty() && rule.patterns.is_empty() {
                errors.push(MaskError::EmptyRule { rule: name.clone() });
            }
            for det in &rule.detectors {
                let Some(d) = detectors.iter().find(|d| d.name == det.as_str()) else {
                    errors.push(MaskError::UnknownDetector {
                        rule: name.clone(),
                        detector: det.clone(),
                        known: DETECTORS.join(", "),
                    });
                    continue;
                };
                match detector_matchers
                    .iter_mut()
                    .find(|m| matches!(m.find, Find::Detector(x) if x.name == d.name))
                {
                    Some(m) if !m.rules.contains(&ri) => m.rules.push(ri),
                    Some(_) => {}
                    None => detector_matchers.push(Matcher {
                        find: Find::Detector(d),
                        label: format!("[masked:{}]", d.name),
                        rules: vec![ri],
                    }),
                }
            }
            if rule.patterns.len() > MAX_PATTERNS_PER_RULE {
                errors.push(MaskError::TooManyPatterns {
                    rule: name.clone(),
                    count: rule.patterns.len(),
                    limit: MAX_PATTERNS_PER_RULE,
                });
                continue;
            }
            for (index, pattern) in rule.patterns.iter().enumerate() {
                // Over the total, compiling the rest would only cost time
                // (a 256 KiB policy holds thousands of patterns); the
                // count error above already refuses the set.
                attempted += 1;
                if attempted > MAX_PATTERNS {
                    break;
                }
                match compile_custom(name, index, pattern) {
                    Ok(regex) => {
                        set_patterns.push(pattern.clone());
                        custom.push(Matcher {
                            find: Find::Custom(regex),
                            label: format!("[masked:{name}]"),
                            rules: vec![ri],
                        });
                    }
                    Err(e) => errors.push(e),
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        // Detectors first, in tie-break order (the order of `detectors()`).
        detector_matchers.sort_by_key(|m| match m.find {
            Find::Detector(d) => detectors
                .iter()
                .position(|x| std::ptr::eq(x, d))
                .unwrap_or(usize::MAX),
            Find::Custom(_) => usize::MAX,
        });
        let mut all: Vec<String> = detector_matchers
            .iter()
            .filter_map(|m| match m.find {
                Find::Detector(d) => detect::pattern_of(d.name).map(str::to_owned),
                Find::Custom(_) => None,
            })
            .collect();
        all.extend(set_patterns);
        let mut matchers = detector_matchers;
        matchers.extend(custom);
        let set = RegexSetBuilder::new(&all)
            .size_limit(SET_SIZE_LIMIT)
            .dfa_size_limit(4 << 20)
            .build()
            .map_err(|_| {
                vec![MaskError::RulesTooBig {
                    limit: SET_SIZE_LIMIT,
                }]
            })?;
        Ok(Masker {
            inner: Arc::new(Inner {
                rules: names,
                matchers,
                set,
            }),
        })
    }

    /// The rule names, in the order given.
    pub fn rules(&self) -> &[String] {
        &self.inner.rules
    }

    /// `true` when the masker has no rules (masks nothing).
    pub fn is_empty(&self) -> bool {
        self.inner.matchers.is_empty()
    }

    fn hits(&self, s: &str, out: &mut Vec<Hit>) {
        let inner = &*self.inner;
        if inner.matchers.is_empty() || !inner.set.is_match(s) {
            return;
        }
        for idx in inner.set.matches(s).iter() {
            let m = &inner.matchers[idx];
            match &m.find {
                Find::Custom(re) => {
                    out.extend(re.find_iter(s).filter(|x| !x.is_empty()).map(|x| Hit {
                        start: x.start(),
                        end: x.end(),
                        matcher: idx,
                    }))
                }
                Find::Detector(d) => {
                    let mut at = 0;
                    while at <= s.len() {
                        let Some(x) = d.regex.find_at(s, at) else {
                            break;
                        };
                        let verdict = match d.validate {
                            Some(v) => v(s, x.start(), x.end()),
                            None => detect::Verdict::Accept(x.start(), x.end()),
                        };
                        match verdict {
                            detect::Verdict::Accept(start, end) if end > start => {
                                out.push(Hit {
                                    start,
                                    end,
                                    matcher: idx,
                                });
                                at = end;
                            }
                            detect::Verdict::Accept(_, end) => at = end.max(x.start() + 1),
                            // Always make progress, whatever the validator says.
                            detect::Verdict::Reject(next) => at = next.max(x.start() + 1),
                        }
                        while at < s.len() && !s.is_char_boundary(at) {
                            at += 1;
                        }
                    }
                }
            }
        }
    }

    /// Mask `s`. Borrowed (unchanged, unallocated) when nothing matched.
    pub fn mask_text<'a>(&self, s: &'a str, counts: &mut Counts) -> Cow<'a, str> {
        let mut hits = Vec::new();
        self.hits(s, &mut hits);
        if hits.is_empty() {
            return Cow::Borrowed(s);
        }
        hits.sort_unstable_by_key(|h| (h.start, std::cmp::Reverse(h.end), h.matcher));
        let matchers = &self.inner.matchers;
        let mut out = String::with_capacity(s.len());
        let mut last = 0;
        let mut i = 0;
        let mut rules: Vec<usize> = Vec::new();
        while i < hits.len() {
            let first = hits[i];
            let mut end = first.end;
            rules.clear();
            let mut j = i;
            // Overlapping hits merge: one replacement, one count per rule.
            while j < hits.len() && (j == i || hits[j].start < end) {
                end = end.max(hits[j].end);
                for &r in &matchers[hits[j].matcher].rules {
                    if !rules.contains(&r) {
                        rules.push(r);
                    }
                }
                j += 1;
            }
            out.push_str(&s[last..first.start]);
            out.push_str(&matchers[first.matcher].label);
            for &r in &rules {
                counts.add(&self.inner.rules[r], 1);
            }
            last = end;
            i = j;
        }
        out.push_str(&s[last..]);
        Cow::Owned(out)
    }

    /// Mask every string value of a JSON document (object keys are left
    /// alone). Byte-identical and borrowed when nothing matched; otherwise
    /// only the changed string values are rewritten. Counts are added only
    /// when the whole document parsed.
    pub fn mask_json<'a>(
        &self,
        body: &'a [u8],
        counts: &mut Counts,
    ) -> Result<Cow<'a, [u8]>, Unmaskable> {
        json::mask(self, body, counts)
    }

    /// Mask a whole body by its content type: JSON (`application/json`,
    /// `*/*+json`), `text/event-stream` (event by event), other `text/*`.
    /// Anything else, a content encoding other than `identity`, a charset
    /// other than UTF-8, or a body that does not parse is [`Unmaskable`].
    /// An empty body is returned as is whatever its type.
    pub fn mask_body<'a>(
        &self,
        content_type: Option<&str>,
        content_encoding: Option<&str>,
        body: &'a [u8],
        counts: &mut Counts,
    ) -> Result<Cow<'a, [u8]>, Unmaskable> {
        if body.is_empty() {
            return Ok(Cow::Borrowed(body));
        }
        match classify(content_type, content_encoding)? {
            BodyKind::Json => self.mask_json(body, counts),
            BodyKind::Text => {
                let s = std::str::from_utf8(body).map_err(|e| Unmaskable::InvalidUtf8 {
                    at: e.valid_up_to(),
                })?;
                Ok(match self.mask_text(s, counts) {
                    Cow::Borrowed(_) => Cow::Borrowed(body),
                    Cow::Owned(s) => Cow::Owned(s.into_bytes()),
                })
            }
            BodyKind::EventStream => {
                let mut local = Counts::new();
                let mut sse = SseMasker::new(self.clone(), usize::MAX);
                let mut out = sse.feed(body, &mut local)?;
                out.extend_from_slice(&sse.finish(&mut local)?);
                counts.merge(&local);
                Ok(if out == body {
                    Cow::Borrowed(body)
                } else {
                    Cow::Owned(out)
                })
            }
        }
    }

    /// A streaming masker for a `text/event-stream` body that holds at most
    /// `max_event` bytes of one event.
    pub fn sse(&self, max_event: usize) -> SseMasker {
        SseMasker::new(self.clone(), max_event)
    }
}

fn body_kind(content_type: Option<&str>) -> Result<BodyKind, Unmaskable> {
    let ct = content_type.ok_or(Unmaskable::MissingContentType)?;
    let mut parts = ct.split(';');
    let essence = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
    for p in parts {
        if let Some((k, v)) = p.split_once('=') {
            let v = v.trim().trim_matches('"');
            if k.trim().eq_ignore_ascii_case("charset")
                && !["utf-8", "utf8", "us-ascii"]
                    .iter()
                    .any(|ok| v.eq_ignore_ascii_case(ok))
            {
                return Err(Unmaskable::UnsupportedCharset(v.to_owned()));
            }
        }
    }
    let (ty, sub) = essence
        .split_once('/')
        .ok_or_else(|| Unmaskable::UnsupportedContentType(ct.to_owned()))?;
    match (ty, sub) {
        ("application", "json") => Ok(BodyKind::Json),
        (_, sub) if sub.ends_with("+json") && !ty.is_empty() => Ok(BodyKind::Json),
        ("text", "event-stream") => Ok(BodyKind::EventStream),
        ("text", sub) if !sub.is_empty() => Ok(BodyKind::Text),
        _ => Err(Unmaskable::UnsupportedContentType(ct.to_owned())),
    }
}

fn compile_custom(rule: &str, index: usize, pattern: &str) -> Result<Regex, MaskError> {
    if pattern.len() > MAX_PATTERN_LEN {
        return Err(MaskError::PatternTooLong {
            rule: rule.to_owned(),
            index,
            len: pattern.len(),
            limit: MAX_PATTERN_LEN,
        });
    }
    let regex = RegexBuilder::new(pattern)
        .size_limit(PATTERN_SIZE_LIMIT)
        .dfa_size_limit(PATTERN_SIZE_LIMIT)
        .build()
        .map_err(|e| match e {
            regex::Error::CompiledTooBig(limit) => MaskError::PatternTooBig {
                rule: rule.to_owned(),
                index,
                pattern: pattern.to_owned(),
                limit,
            },
            other => MaskError::BadPattern {
                rule: rule.to_owned(),
                index,
                pattern: pattern.to_owned(),
                reason: other.to_string(),
            },
        })?;
    if regex.is_match("") {
        return Err(MaskError::EmptyMatch {
            rule: rule.to_owned(),
            index,
            pattern: pattern.to_owned(),
        });
    }
    Ok(regex)
}

#[cfg(test)]
mod tests;
