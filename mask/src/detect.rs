//! The named detectors: a candidate regex each, plus a validator where the
//! shape alone would mask too much (Luhn for cards, mod-97 and the country
//! length for IBANs, octet ranges for IPv4, a real parse for IPv6, digit
//! counts and date shapes for phones, character mix for `sk-` keys).
//!
//! The regexes only propose candidates; the validator accepts a (possibly
//! narrower) span or rejects it and says where to look next. Rejecting
//! with a resume point rather than always "one character later" is what
//! keeps an invalid 16-digit number from being re-found as a phone number
//! inside itself, while a valid card right after an invalid group of
//! digits is still found.
//!
//! Word boundaries are ASCII (`(?-u:\b)`) on purpose: the lazy DFA cannot
//! evaluate Unicode word boundaries on non-ASCII text and would fall back
//! to a slower engine; every boundary here sits next to an ASCII digit or
//! letter anyway.

use std::net::Ipv6Addr;
use std::str::FromStr as _;
use std::sync::OnceLock;

use regex::Regex;

/// What a validator decided about one candidate match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Mask `start..end` (inside the candidate).
    Accept(usize, usize),
    /// Not a value; search again from this byte offset (a char boundary).
    Reject(usize),
}

/// `haystack, candidate start, candidate end`.
pub(crate) type Validator = fn(&str, usize, usize) -> Verdict;

pub(crate) struct Detector {
    pub name: &'static str,
    pub regex: Regex,
    pub validate: Option<Validator>,
}

/// The detectors in the order they win ties (same start, same length):
/// the more specific shape names the replacement.
const SPECS: &[(&str, &str, Option<Validator>)] = &[
    ("api_key", API_KEY, Some(validate_api_key)),
    ("email", EMAIL, None),
    ("iban", IBAN, Some(validate_iban)),
    ("payment_card", CARD, Some(validate_card)),
    ("ipv6", IPV6, Some(validate_ipv6)),
    ("ipv4", IPV4, Some(validate_ipv4)),
    ("phone", PHONE, Some(validate_phone)),
];

const EMAIL: &str = r"[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}";

// International numbers start with `+`; national ones need separators
// (three groups or more, or a parenthesised area code), so a bare run of
// digits (an id, a timestamp, an amount) is never a phone number.
const PHONE: &str = r"(?x)
    (?:
        \+[1-9][0-9]{0,3}[\ .-]?(?:\([0-9]{1,4}\)[\ .-]?)?[0-9]{1,5}(?:[\ .-]?[0-9]{1,5}){0,5}
      | \([0-9]{2,5}\)[\ .-]?[0-9]{2,5}(?:[\ -][0-9]{2,5}){0,3}
      | (?-u:\b)[0-9]{2,5}[\ -][0-9]{2,5}(?:[\ -][0-9]{2,5}){1,3}
      | (?-u:\b)[0-9]{3}\.[0-9]{3}\.[0-9]{4}
    )(?-u:\b)";

const IBAN: &str = r"(?-u:\b)[A-Za-z]{2}[0-9]{2}(?:\ ?[A-Za-z0-9]){11,30}(?-u:\b)";

// Issuer prefixes 2 to 6 (Mastercard 2-series, Amex/JCB/Diners, Visa,
// Mastercard/Maestro, Discover/UnionPay): millisecond timestamps (1…) and
// most ids do not start there, and the Luhn check removes 9 in 10 of the rest.
const CARD: &str = r"(?-u:\b)[2-6][0-9]{3}(?:[\ -]?[0-9]){9,15}(?-u:\b)";

const IPV4: &str = r"(?-u:\b)(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?-u:\b)";

const IPV6: &str = r"(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3}|[0-9A-Fa-f]{0,4})";

const API_KEY: &str = r"(?x)
    (?-u:\b)(?:
        (?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}
      | gh[pousr]_[A-Za-z0-9]{36,}
      | github_pat_[A-Za-z0-9_]{22,}
      | xox[abposr]-[A-Za-z0-9-]{10,}
      | xapp-[A-Za-z0-9-]{10,}
      | sk-[A-Za-z0-9_-]{20,}
      | [sr]k_(?:live|test)_[A-Za-z0-9]{10,}
      | AIza[0-9A-Za-z_-]{35}
      | eyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*
      | [Bb][Ee][Aa][Rr][Ee][Rr][\ \t]+[A-Za-z0-9._~+/-]{8,}=*
    )
  | -----BEGIN[A-Z\ ]*PRIVATE\ KEY-----(?s:.)*?-----END[A-Z\ ]*PRIVATE\ KEY-----";

/// The compiled detectors, built once per process: every `Masker` shares
/// them (a `Regex` clone shares its program and cache pool).
pub(crate) fn detectors() -> &'static [Detector] {
    static DETECTORS: OnceLock<Vec<Detector>> = OnceLock::new();
    DETECTORS.get_or_init(|| {
        SPECS
            .iter()
            .map(|&(name, pattern, validate)| Detector {
                name,
                // The patterns are constants covered by the unit tests;
                // a failure here is a bug in this file, not bad input.
                #[allow(clippy::expect_used)]
                regex: Regex::new(pattern).expect("built-in detector pattern compiles"),
                validate,
            })
            .collect()
    })
}

/// The source of each built-in detector pattern, for the combined
/// pre-scan set.
pub(crate) fn pattern_of(name: &str) -> Option<&'static str> {
    SPECS.iter().find(|s| s.0 == name).map(|s| s.1)
}

fn next_char(s: &str, i: usize) -> usize {
    let mut j = i + 1;
    while j < s.len() && !s.is_char_boundary(j) {
        j += 1;
    }
    j.min(s.len())
}

fn luhn(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(*d);
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

/// Longest Luhn-valid prefix of 13 to 19 digits that ends at the end of
/// the candidate or just before a separator (so `4111 1111 1111 1111 12`
/// masks the card and leaves `12`).
fn validate_card(s: &str, start: usize, end: usize) -> Verdict {
    let cand = &s.as_bytes()[start..end];
    let mut digits = Vec::with_capacity(19);
    // (byte offset of the end, digit count) of every prefix ending at a group end.
    let mut ends = Vec::new();
    for (i, &c) in cand.iter().enumerate() {
        if c.is_ascii_digit() {
            digits.push(c - b'0');
            if i + 1 == cand.len() || !cand[i + 1].is_ascii_digit() {
                ends.push((i + 1, digits.len()));
            }
        }
    }
    for &(e, n) in ends.iter().rev() {
        if (13..=19).contains(&n) && luhn(&digits[..n]) {
            return Verdict::Accept(start, start + e);
        }
    }
    // Try again from the next group: an invalid number may run into a card.
    match cand.iter().position(|c| !c.is_ascii_digit()) {
        Some(p) => Verdict::Reject(start + p + 1),
        None => Verdict::Reject(end),
    }
}

/// IBAN lengths per country (SWIFT IBAN registry).
const IBAN_LENGTHS: &[(&str, usize)] = &[
    ("AD", 24),
    ("AE", 23),
    ("AL", 28),
    ("AT", 20),
    ("AZ", 28),
    ("BA", 20),
    ("BE", 16),
    ("BG", 22),
    ("BH", 22),
    ("BI", 27),
    ("BR", 29),
    ("BY", 28),
    ("CH", 21),
    ("CR", 22),
    ("CY", 28),
    ("CZ", 24),
    ("DE", 22),
    ("DJ", 27),
    ("DK", 18),
    ("DO", 28),
    ("EE", 20),
    ("EG", 29),
    ("ES", 24),
    ("FI", 18),
    ("FK", 18),
    ("FO", 18),
    ("FR", 27),
    ("GB", 22),
    ("GE", 22),
    ("GI", 23),
    ("GL", 18),
    ("GR", 27),
    ("GT", 28),
    ("HR", 21),
    ("HU", 28),
    ("IE", 22),
    ("IL", 23),
    ("IQ", 23),
    ("IS", 26),
    ("IT", 27),
    ("JO", 30),
    ("KW", 30),
    ("KZ", 20),
    ("LB", 28),
    ("LC", 32),
    ("LI", 21),
    ("LT", 20),
    ("LU", 20),
    ("LV", 21),
    ("LY", 25),
    ("MC", 27),
    ("MD", 24),
    ("ME", 22),
    ("MK", 19),
    ("MN", 20),
    ("MR", 27),
    ("MT", 31),
    ("MU", 30),
    ("NI", 28),
    ("NL", 18),
    ("NO", 15),
    ("OM", 23),
    ("PK", 24),
    ("PL", 28),
    ("PS", 29),
    ("PT", 25),
    ("QA", 29),
    ("RO", 24),
    ("RS", 22),
    ("RU", 33),
    ("SA", 24),
    ("SC", 31),
    ("SD", 18),
    ("SE", 24),
    ("SI", 19),
    ("SK", 24),
    ("SM", 27),
    ("SO", 23),
    ("ST", 25),
    ("SV", 28),
    ("TL", 23),
    ("TN", 24),
    ("TR", 26),
    ("UA", 29),
    ("VA", 22),
    ("VG", 24),
    ("XK", 20),
    ("YE", 30),
];

/// `true` when `compact` (no spaces) is a well-formed IBAN: a known
/// country, that country's length, and the ISO 7064 mod-97 check.
pub(crate) fn iban_ok(compact: &[u8]) -> bool {
    if compact.len() < 4 || !compact.iter().all(u8::is_ascii_alphanumeric) {
        return false;
    }
    let cc = [
        compact[0].to_ascii_uppercase(),
        compact[1].to_ascii_uppercase(),
    ];
    let Some(&(_, len)) = IBAN_LENGTHS.iter().find(|(c, _)| c.as_bytes() == cc) else {
        return false;
    };
    if compact.len() != len {
        return false;
    }
    let mut rem = 0u32;
    for &c in compact[4..].iter().chain(&compact[..4]) {
        let c = c.to_ascii_uppercase();
        if c.is_ascii_digit() {
            rem = (rem * 10 + u32::from(c - b'0')) % 97;
        } else {
            rem = (rem * 100 + u32::from(c - b'A' + 10)) % 97;
        }
    }
    rem == 1
}

fn validate_iban(s: &str, start: usize, end: usize) -> Verdict {
    let cand = &s.as_bytes()[start..end];
    // Prefixes ending at the end or before a space, longest first.
    let mut cut = cand.len();
    loop {
        let compact: Vec<u8> = cand[..cut].iter().copied().filter(|&c| c != b' ').collect();
        if iban_ok(&compact) {
            return Verdict::Accept(start, start + cut);
        }
        match cand[..cut].iter().rposition(|&c| c == b' ') {
            Some(p) if p >= 15 => cut = p,
            _ => return Verdict::Reject(next_char(s, start)),
        }
    }
}

fn validate_ipv4(s: &str, start: usize, end: usize) -> Verdict {
    let b = s.as_bytes();
    // Part of a longer dotted sequence (a version, an OID): not an address.
    let dotted_before = start >= 2 && b[start - 1] == b'.' && b[start - 2].is_ascii_digit();
    let dotted_after = b.get(end) == Some(&b'.') && b.get(end + 1).is_some_and(u8::is_ascii_digit);
    let octets_ok = s[start..end]
        .split('.')
        .all(|o| o.parse::<u16>().is_ok_and(|v| v <= 255));
    if octets_ok && !dotted_before && !dotted_after {
        Verdict::Accept(start, end)
    } else {
        Verdict::Reject(next_char(s, start))
    }
}

fn validate_ipv6(s: &str, start: usize, end: usize) -> Verdict {
    let b = s.as_bytes();
    let glued =
        |c: Option<&u8>| c.is_some_and(|&c| c == b':' || c == b'_' || c.is_ascii_alphanumeric());
    let before = if start == 0 { None } else { b.get(start - 1) };
    let cand = &s[start..end];
    // `std::io`, `a::b` and clock times are not addresses: require a real
    // parse, nothing glued on either side, and three groups or an
    // embedded IPv4 address.
    let groups = cand.split(':').filter(|g| !g.is_empty()).count();
    if !glued(before)
        && !glued(b.get(end))
        && (groups >= 3 || cand.contains('.'))
        && Ipv6Addr::from_str(cand).is_ok()
    {
        Verdict::Accept(start, end)
    } else {
        Verdict::Reject(next_char(s, start))
    }
}

fn validate_phone(s: &str, start: usize, end: usize) -> Verdict {
    let cand = &s[start..end];
    let digits = cand.bytes().filter(u8::is_ascii_digit).count();
    if !(7..=15).contains(&digits) {
        // Too long to be a phone number (a card, an account): skip all of it.
        return Verdict::Reject(end);
    }
    // Glued to more of a token by `-`, `.`, `/` or `:` (a UUID, a
    // timestamp `2024-01-15 10:30`, a path): part of something else.
    let b = s.as_bytes();
    let joiner = |c: Option<&u8>| matches!(c, Some(b'-' | b'.' | b'/' | b':'));
    let glued_before =
        start >= 2 && joiner(b.get(start - 1)) && b[start - 2].is_ascii_alphanumeric();
    let glued_after = joiner(b.get(end)) && b.get(end + 1).is_some_and(u8::is_ascii_alphanumeric);
    if glued_before || glued_after {
        return Verdict::Reject(end);
    }
    let groups: Vec<usize> = cand
        .split(|c: char| !c.is_ascii_digit())
        .filter(|g| !g.is_empty())
        .map(str::len)
        .collect();
    if !cand.starts_with('+') {
        // Dates (2024-01-15, 15 01 2024, also followed by a time) and
        // grouped amounts (10 000 000).
        let date = matches!(groups.as_slice(), [4, 2, 2, ..] | [2, 2, 4, ..]);
        let thousands = groups.len() >= 3
            && groups[0] <= 3
            && !cand.starts_with('0')
            && !cand.starts_with('(')
            && groups[1..].iter().all(|&g| g == 3);
        if date || thousands {
            return Verdict::Reject(end);
        }
    }
    Verdict::Accept(start, end)
}

fn validate_api_key(s: &str, start: usize, end: usize) -> Verdict {
    let cand = &s[start..end];
    let classes = |t: &str| {
        u8::from(t.bytes().any(|c| c.is_ascii_lowercase()))
            + u8::from(t.bytes().any(|c| c.is_ascii_uppercase()))
            + u8::from(t.bytes().any(|c| c.is_ascii_digit()))
    };
    if cand
        .get(..6)
        .is_some_and(|w| w.eq_ignore_ascii_case("bearer"))
    {
        // Mask the credential, keep the scheme word; prose ("bearer of
        // bad news") has no digit in the next word.
        let tok_start = start + 6 + cand[6..].len() - cand[6..].trim_start().len();
        let tok = &s[tok_start..end];
        if tok.len() >= 12 && tok.bytes().any(|c| c.is_ascii_digit()) {
            return Verdict::Accept(tok_start, end);
        }
        return Verdict::Reject(tok_start);
    }
    if let Some(body) = cand.strip_prefix("sk-") {
        // `sk-learn-is-a-library-name`: real keys mix character classes.
        if classes(body) < 2 {
            return Verdict::Reject(end);
        }
    }
    Verdict::Accept(start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_detector_compiles() {
        assert_eq!(detectors().len(), SPECS.len());
        for d in detectors() {
            assert!(crate::DETECTORS.contains(&d.name), "{}", d.name);
        }
        assert_eq!(crate::DETECTORS.len(), SPECS.len());
    }

    #[test]
    fn luhn_known_values() {
        let d = |s: &str| s.bytes().map(|c| c - b'0').collect::<Vec<_>>();
        assert!(luhn(&d("4111111111111111")));
        assert!(luhn(&d("378282246310005")));
        assert!(!luhn(&d("4111111111111112")));
    }

    #[test]
    fn iban_check() {
        assert!(iban_ok(b"DE89370400440532013000"));
        assert!(iban_ok(b"GB82WEST12345698765432"));
        assert!(iban_ok(b"gb82west12345698765432"));
        assert!(!iban_ok(b"DE89370400440532013001"));
        // Right checksum arithmetic is not enough: the length must match the country.
        assert!(!iban_ok(b"DE8937040044053201300"));
        assert!(!iban_ok(b"ZZ89370400440532013000"));
    }
}
