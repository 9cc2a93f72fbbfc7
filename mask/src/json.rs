//! JSON masking by splicing: a validating scanner (RFC 8259) walks the
//! document once, hands every string value (not keys) and every integer of
//! 13 digits or more (a card number sent as a JSON number) to the
//! masker, and records where each changed value sits in the original bytes
//! (a masked number becomes the masked string). Only those spans are
//! rewritten, so everything else (other numbers as written, key order,
//! whitespace, escapes in untouched strings) stays byte-identical, and a
//! document with no match is returned borrowed.
//!
//! The scanner uses an explicit stack (no recursion, so deep nesting
//! cannot overflow the thread's stack) limited to [`MAX_DEPTH`] levels,
//! one more than `serde_json` accepts. A string value with an unpaired
//! UTF-16 surrogate escape cannot be decoded to text and so cannot be
//! masked: the document is refused, like one that does not parse.

use std::borrow::Cow;

use crate::{Counts, Masker, Unmaskable};

/// Integers at least this long (the shortest payment card) are scanned too;
/// a number with a fraction or an exponent is never a card number.
const MIN_NUMBER_TO_SCAN: usize = 13;

/// Deepest nesting of arrays and objects accepted.
pub(crate) const MAX_DEPTH: usize = 128;

pub(crate) fn mask<'a>(
    masker: &Masker,
    body: &'a [u8],
    counts: &mut Counts,
) -> Result<Cow<'a, [u8]>, Unmaskable> {
    let text = std::str::from_utf8(body).map_err(|e| Unmaskable::InvalidUtf8 {
        at: e.valid_up_to(),
    })?;
    let mut local = Counts::new();
    let mut splices: Vec<(usize, usize, String)> = Vec::new();
    let mut scanner = Scanner {
        s: text,
        b: body,
        i: 0,
    };
    scanner.run(|start, end, value| {
        if let Cow::Owned(masked) = masker.mask_text(&value, &mut local) {
            splices.push((start, end, masked));
        }
    })?;
    counts.merge(&local);
    if splices.is_empty() {
        return Ok(Cow::Borrowed(body));
    }
    let extra: usize = splices.iter().map(|s| s.2.len() + 2).sum();
    let mut out = Vec::with_capacity(body.len() + extra);
    let mut last = 0;
    for (start, end, masked) in &splices {
        out.extend_from_slice(&body[last..*start]);
        encode_string(&mut out, masked);
        last = *end;
    }
    out.extend_from_slice(&body[last..]);
    Ok(Cow::Owned(out))
}

/// Append `s` as a JSON string literal, escaping only what JSON requires
/// (quote, backslash, control characters); everything else is written as
/// UTF-8.
pub(crate) fn encode_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let b = s.as_bytes();
    let mut last = 0;
    for (i, &c) in b.iter().enumerate() {
        let esc: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&b[last..i]);
        if esc.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(c >> 4)]);
            out.push(HEX[usize::from(c & 0xf)]);
        } else {
            out.extend_from_slice(esc);
        }
        last = i + 1;
    }
    out.extend_from_slice(&b[last..]);
    out.push(b'"');
}

struct Scanner<'a> {
    s: &'a str,
    b: &'a [u8],
    i: usize,
}

impl<'a> Scanner<'a> {
    fn err(&self, what: &'static str) -> Unmaskable {
        Unmaskable::InvalidJson { at: self.i, what }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    /// Walk one document; call `on_value(start, end, decoded)` for every
    /// string value, `start..end` including its quotes.
    fn run(
        &mut self,
        mut on_value: impl FnMut(usize, usize, Cow<'a, str>),
    ) -> Result<(), Unmaskable> {
        // `true` for an object, `false` for an array.
        let mut stack: Vec<bool> = Vec::new();
        'value: loop {
            self.ws();
            match self.peek() {
                Some(b'{') => {
                    if stack.len() >= MAX_DEPTH {
                        return Err(self.err("nested too deeply"));
                    }
                    self.i += 1;
                    self.ws();
                    if self.peek() == Some(b'}') {
                        self.i += 1;
                    } else {
                        stack.push(true);
                        self.key()?;
                        continue 'value;
                    }
                }
                Some(b'[') => {
                    if stack.len() >= MAX_DEPTH {
                        return Err(self.err("nested too deeply"));
                    }
                    self.i += 1;
                    self.ws();
                    if self.peek() == Some(b']') {
                        self.i += 1;
                    } else {
                        stack.push(false);
                        continue 'value;
                    }
                }
                Some(b'"') => {
                    let start = self.i;
                    let v = self.string()?;
                    on_value(start, self.i, v);
                }
                Some(b't') => self.literal(b"true")?,
                Some(b'f') => self.literal(b"false")?,
                Some(b'n') => self.literal(b"null")?,
                Some(b'-' | b'0'..=b'9') => {
                    let start = self.i;
                    self.number()?;
                    // A card number can travel as a JSON number: a long
                    // integer goes through the detectors like a string
                    // (and, masked, becomes the masked string). The digits
                    // of a float (`-4037.5113237635087`) are not one.
                    let n = &self.b[start..self.i];
                    if n.len() >= MIN_NUMBER_TO_SCAN
                        && !n.iter().any(|c| matches!(c, b'.' | b'e' | b'E'))
                    {
                        on_value(start, self.i, Cow::Borrowed(&self.s[start..self.i]));
                    }
                }
                Some(_) => return Err(self.err("expected a value")),
                None => return Err(self.err("unexpected end, expected a value")),
            }
            // After a value: close containers until one continues.
            loop {
                self.ws();
                let Some(&object) = stack.last() else {
                    return if self.i == self.b.len() {
                        Ok(())
                    } else {
                        Err(self.err("trailing characters after the document"))
                    };
                };
                match self.peek() {
                    Some(b',') => {
                        self.i += 1;
                        if object {
                            self.key()?;
                        }
                        continue 'value;
                    }
                    Some(b'}') if object => {
                        self.i += 1;
                        stack.pop();
                    }
                    Some(b']') if !object => {
                        self.i += 1;
                        stack.pop();
                    }
                    _ if object => return Err(self.err("expected `,` or `}`")),
                    _ => return Err(self.err("expected `,` or `]`")),
                }
            }
        }
    }

    /// An object key and its colon.
    fn key(&mut self) -> Result<(), Unmaskable> {
        self.ws();
        if self.peek() != Some(b'"') {
            return Err(self.err("expected a string key"));
        }
        self.string()?;
        self.ws();
        if self.peek() != Some(b':') {
            return Err(self.err("expected `:`"));
        }
        self.i += 1;
        Ok(())
    }

    fn literal(&mut self, lit: &[u8]) -> Result<(), Unmaskable> {
        if self.b[self.i..].starts_with(lit) {
            self.i += lit.len();
            Ok(())
        } else {
            Err(self.err("invalid literal"))
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Result<(), Unmaskable> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.err("invalid number")),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return Err(self.err("invalid number: no digit after `.`"));
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return Err(self.err("invalid number: no digit in the exponent"));
            }
        }
        Ok(())
    }

    /// A string at `"`; leaves `i` after the closing quote. Borrowed when
    /// it has no escapes.
    fn string(&mut self) -> Result<Cow<'a, str>, Unmaskable> {
        self.i += 1;
        let start = self.i;
        loop {
            match self.peek() {
                None => return Err(self.err("unterminated string")),
                Some(b'"') => {
                    let s = &self.s[start..self.i];
                    self.i += 1;
                    return Ok(Cow::Borrowed(s));
                }
                Some(b'\\') => break,
                Some(0..=0x1f) => return Err(self.err("control character in a string")),
                Some(_) => self.i += 1,
            }
        }
        let mut out = String::with_capacity(self.i - start + 16);
        out.push_str(&self.s[start..self.i]);
        loop {
            match self.peek() {
                None => return Err(self.err("unterminated string")),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(Cow::Owned(out));
                }
                Some(b'\\') => {
                    self.i += 1;
                    let c = match self.peek() {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => {
                            self.i += 1;
                            let hi = self.hex4()?;
                            let code = match hi {
                                0xd800..=0xdbff => {
                                    if !self.b[self.i..].starts_with(b"\\u") {
                                        return Err(self.err("unpaired surrogate escape"));
                                    }
                                    self.i += 2;
                                    let lo = self.hex4()?;
                                    if !(0xdc00..=0xdfff).contains(&lo) {
                                        return Err(self.err("unpaired surrogate escape"));
                                    }
                                    0x10000
                                        + ((u32::from(hi) - 0xd800) << 10)
                                        + (u32::from(lo) - 0xdc00)
                                }
                                0xdc00..=0xdfff => {
                                    return Err(self.err("unpaired surrogate escape"))
                                }
                                _ => u32::from(hi),
                            };
                            let c =
                                char::from_u32(code).ok_or_else(|| self.err("invalid escape"))?;
                            out.push(c);
                            continue;
                        }
                        _ => return Err(self.err("invalid escape")),
                    };
                    out.push(c);
                    self.i += 1;
                }
                Some(0..=0x1f) => return Err(self.err("control character in a string")),
                Some(_) => {
                    let run = self.i;
                    while let Some(c) = self.peek() {
                        if c == b'"' || c == b'\\' || c < 0x20 {
                            break;
                        }
                        self.i += 1;
                    }
                    // Stops only at ASCII bytes: a char boundary.
                    out.push_str(&self.s[run..self.i]);
                }
            }
        }
    }

    fn hex4(&mut self) -> Result<u16, Unmaskable> {
        let Some(h) = self.b.get(self.i..self.i + 4) else {
            return Err(self.err("truncated \\u escape"));
        };
        let mut v = 0u16;
        for &c in h {
            let d = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                b'A'..=b'F' => c - b'A' + 10,
                _ => return Err(self.err("invalid \\u escape")),
            };
            v = v * 16 + u16::from(d);
        }
        self.i += 4;
        Ok(v)
    }
}
