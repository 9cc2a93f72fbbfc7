//! Streaming masking of `text/event-stream` bodies.
//!
//! A value can be split across network chunks, so the masker cannot mask
//! chunk by chunk; it buffers one event (up to the blank line that ends
//! it), masks it line by line and hands the whole masked event on. Each
//! `data:` payload is masked as JSON when it parses as JSON (A2A streams
//! carry one JSON-RPC message per `data:` line) and as text otherwise;
//! every other line (comments, `event:`, `id:`) as text.
//!
//! The output is the input with masked values replaced, terminators kept
//! as they were (`\n`, `\r\n` or `\r`), and it does not depend on how the
//! input was chunked: a `\r` at the end of a chunk ends its line at once
//! (an event is not held back waiting for a possible `\n`), and a `\n`
//! that then starts the next chunk is passed through as the rest of that
//! terminator.
//!
//! An event larger than the limit is refused ([`Unmaskable::EventTooLarge`])
//! rather than passed through half-masked; after any error the masker
//! keeps returning it.

use std::borrow::Cow;

use crate::{Counts, Masker, Unmaskable};

/// Masks a `text/event-stream` body fed in arbitrary chunks.
pub struct SseMasker {
    masker: Masker,
    max_event: usize,
    /// The current line, without terminator, not yet complete.
    line: Vec<u8>,
    /// Masked lines of the current event, with their terminators.
    event: Vec<u8>,
    /// Input bytes of the current event so far (complete lines).
    event_in: usize,
    /// Counts of the current event, added to the caller's when it is emitted.
    event_counts: Counts,
    /// The last byte seen was a `\r` that ended a line.
    after_cr: bool,
    /// Stream offset of the first byte of `line`, for error positions.
    line_start: usize,
    first_line: bool,
    failed: Option<Unmaskable>,
}

impl std::fmt::Debug for SseMasker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseMasker")
            .field("max_event", &self.max_event)
            .field("buffered", &(self.event_in + self.line.len()))
            .field("failed", &self.failed)
            .finish()
    }
}

impl SseMasker {
    /// A masker that holds at most `max_event` input bytes of one event.
    pub fn new(masker: Masker, max_event: usize) -> SseMasker {
        SseMasker {
            masker,
            max_event,
            line: Vec::new(),
            event: Vec::new(),
            event_in: 0,
            event_counts: Counts::new(),
            after_cr: false,
            line_start: 0,
            first_line: true,
            failed: None,
        }
    }

    /// Bytes of the current, incomplete event held back.
    pub fn buffered(&self) -> usize {
        self.event_in + self.line.len()
    }

    /// Feed the next chunk; returns the masked events it completed (maybe
    /// none, then an empty vector). Counts of an event are added to
    /// `counts` when the event is returned.
    pub fn feed(&mut self, chunk: &[u8], counts: &mut Counts) -> Result<Vec<u8>, Unmaskable> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = self.feed_inner(chunk, counts);
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }

    fn feed_inner(&mut self, chunk: &[u8], counts: &mut Counts) -> Result<Vec<u8>, Unmaskable> {
        let mut out = Vec::new();
        let mut rest = chunk;
        if std::mem::take(&mut self.after_cr) && rest.first() == Some(&b'\n') {
            // The second half of a `\r\n` whose `\r` ended the last chunk.
            if self.event.is_empty() && self.event_in == 0 {
                out.push(b'\n');
            } else {
                self.event.push(b'\n');
                self.event_in += 1;
            }
            self.line_start += 1;
            rest = &rest[1..];
        }
        while !rest.is_empty() {
            let Some(p) = rest.iter().position(|&c| c == b'\n' || c == b'\r') else {
                self.line.extend_from_slice(rest);
                self.check_size()?;
                break;
            };
            self.line.extend_from_slice(&rest[..p]);
            let term_len = if rest[p] == b'\r' {
                match rest.get(p + 1) {
                    Some(b'\n') => 2,
                    Some(_) => 1,
                    None => {
                        self.after_cr = true;
                        1
                    }
                }
            } else {
                1
            };
            let term = &rest[p..p + term_len];
            self.event_in += term_len;
            self.check_size()?;
            let blank = self.line.is_empty();
            self.end_line(term)?;
            if blank {
                out.append(&mut self.event);
                counts.merge(&self.event_counts);
                self.event_counts.clear();
                self.event_in = 0;
            }
            rest = &rest[p + term_len..];
        }
        Ok(out)
    }

    /// The end of the stream: mask and return whatever is held back (an
    /// event without its closing blank line, a line without terminator).
    pub fn finish(mut self, counts: &mut Counts) -> Result<Vec<u8>, Unmaskable> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if !self.line.is_empty() {
            self.end_line(b"")?;
        }
        counts.merge(&self.event_counts);
        Ok(std::mem::take(&mut self.event))
    }

    fn check_size(&self) -> Result<(), Unmaskable> {
        if self.event_in + self.line.len() > self.max_event {
            return Err(Unmaskable::EventTooLarge {
                limit: self.max_event,
            });
        }
        Ok(())
    }

    /// Mask the complete line in `self.line` and append it and `term` to
    /// the event.
    fn end_line(&mut self, term: &[u8]) -> Result<(), Unmaskable> {
        let line = std::mem::take(&mut self.line);
        self.event_in += line.len();
        let s = std::str::from_utf8(&line).map_err(|e| Unmaskable::InvalidUtf8 {
            at: self.line_start + e.valid_up_to(),
        })?;
        let mut s = s;
        if std::mem::take(&mut self.first_line) {
            if let Some(rest) = s.strip_prefix('\u{feff}') {
                self.event.extend_from_slice("\u{feff}".as_bytes());
                s = rest;
            }
        }
        let counts = &mut self.event_counts;
        if let Some(payload) = s.strip_prefix("data:") {
            self.event.extend_from_slice(b"data:");
            let payload = match payload.strip_prefix(' ') {
                Some(p) => {
                    self.event.push(b' ');
                    p
                }
                None => payload,
            };
            match self.masker.mask_json(payload.as_bytes(), counts) {
                Ok(masked) => self.event.extend_from_slice(&masked),
                Err(_) => self
                    .event
                    .extend_from_slice(self.masker.mask_text(payload, counts).as_bytes()),
            }
        } else {
            match self.masker.mask_text(s, counts) {
                Cow::Borrowed(_) => self.event.extend_from_slice(s.as_bytes()),
                Cow::Owned(m) => self.event.extend_from_slice(m.as_bytes()),
            }
        }
        self.event.extend_from_slice(term);
        self.line_start += line.len() + term.len();
        // Keep the line's allocation for the next line.
        self.line = line;
        self.line.clear();
        Ok(())
    }
}
