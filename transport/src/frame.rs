//! The overlay wire format: versioned, length-prefixed frames.
//!
//! Every QUIC stream between nodes opens with a 4-byte preamble,
//! `b"DM"`, the wire version, and the [`Channel`] the stream belongs to; then
//! come frames, each a big-endian `u32` length and that many payload bytes.
//! A message stream (gossip) carries exactly one frame and ends; a
//! delegation stream is bidirectional and carries frames both ways until
//! each side finishes.
//!
//! Decoding is sans-I/O: [`decode_message`] takes a whole stream's bytes and
//! [`FrameDecoder`] takes bytes as they arrive; both refuse oversized frames
//! before allocating, so a peer cannot make a node buffer more than
//! [`MAX_FRAME`] per stream. Both are property-tested and fuzzed (`fuzz/`).

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The first two bytes of every overlay stream.
pub const MAGIC: [u8; 2] = *b"DM";
/// Wire version; a node refuses streams of another version with a clear error.
pub const WIRE_VERSION: u8 = 1;
/// Preamble length: magic, version, channel.
pub const PREAMBLE_LEN: usize = 4;
/// Largest frame payload accepted (gossip messages are at most 65,507 bytes).
pub const MAX_FRAME: usize = 1 << 20;

/// What a stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Channel {
    /// One chitchat message per stream.
    Gossip = 1,
    /// One delegation per bidirectional stream: request frames one way,
    /// response frames the other (format owned by the node's `wire` module).
    Delegate = 2,
    /// Small node-to-node questions on a bidirectional stream (the clock
    /// reading `dmsc-node check` compares for skew).
    Control = 3,
    /// A relay session (`relay::frame`) on a bidirectional stream to a relay.
    Relay = 4,
}

impl Channel {
    pub fn from_code(code: u8) -> Option<Channel> {
        match code {
            1 => Some(Channel::Gossip),
            2 => Some(Channel::Delegate),
            3 => Some(Channel::Control),
            4 => Some(Channel::Relay),
            _ => None,
        }
    }
}

/// Why bytes from a peer were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("stream ended inside the preamble ({0} of 4 bytes)")]
    ShortPreamble(usize),
    #[error("bad magic {0:02x?}: the peer does not speak the dmsc overlay protocol")]
    BadMagic([u8; 2]),
    #[error("peer speaks overlay wire version {0}, this node speaks {WIRE_VERSION}")]
    Version(u8),
    #[error("unknown channel {0}")]
    UnknownChannel(u8),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("stream ended inside a frame (have {have} of {want} bytes)")]
    Truncated { have: usize, want: usize },
    #[error("{0} trailing bytes after the message frame")]
    Trailing(usize),
}

/// The preamble that opens a stream on `channel`.
pub fn preamble(channel: Channel) -> [u8; PREAMBLE_LEN] {
    [MAGIC[0], MAGIC[1], WIRE_VERSION, channel as u8]
}

/// Parses a preamble.
pub fn decode_preamble(bytes: &[u8]) -> Result<Channel, FrameError> {
    if bytes.len() < PREAMBLE_LEN {
        return Err(FrameError::ShortPreamble(bytes.len()));
    }
    if bytes[..2] != MAGIC {
        return Err(FrameError::BadMagic([bytes[0], bytes[1]]));
    }
    if bytes[2] != WIRE_VERSION {
        return Err(FrameError::Version(bytes[2]));
    }
    Channel::from_code(bytes[3]).ok_or(FrameError::UnknownChannel(bytes[3]))
}

/// Appends one frame (length prefix and payload) to `out`.
pub fn encode_frame(payload: &[u8], out: &mut BytesMut) -> Result<(), FrameError> {
    if payload.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(payload.len()));
    }
    out.reserve(4 + payload.len());
    out.put_u32(payload.len() as u32);
    out.put_slice(payload);
    Ok(())
}

/// A whole message stream: preamble and one frame.
pub fn encode_message(channel: Channel, payload: &[u8]) -> Result<Bytes, FrameError> {
    let mut out = BytesMut::with_capacity(PREAMBLE_LEN + 4 + payload.len());
    out.put_slice(&preamble(channel));
    encode_frame(payload, &mut out)?;
    Ok(out.freeze())
}

/// Decodes a whole message stream into its channel and payload.
pub fn decode_message(bytes: &[u8]) -> Result<(Channel, &[u8]), FrameError> {
    let channel = decode_preamble(bytes)?;
    let rest = &bytes[PREAMBLE_LEN..];
    if rest.len() < 4 {
        return Err(FrameError::Truncated {
            have: rest.len(),
            want: 4,
        });
    }
    let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let body = &rest[4..];
    if body.len() < len {
        return Err(FrameError::Truncated {
            have: body.len(),
            want: len,
        });
    }
    if body.len() > len {
        return Err(FrameError::Trailing(body.len() - len));
    }
    Ok((channel, body))
}

/// Incremental frame decoder for long-lived streams: feed bytes as they
/// arrive, take frames out as they complete.
///
/// A chunk handed over as `Bytes` ([`Self::push_bytes`], what QUIC streams
/// yield) is kept as it is while frames can be cut from it without copying;
/// only a frame split across chunks is assembled in an owned buffer.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    /// Assembled bytes; never non-empty while `chunk` is.
    buf: BytesMut,
    /// The undecoded rest of the last chunk, when `buf` is empty.
    chunk: Bytes,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.spill();
        self.buf.extend_from_slice(bytes);
    }

    /// No bytes pending (not even part of a frame).
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty() && self.chunk.is_empty()
    }

    /// Like [`Self::push`], without a copy when nothing is pending.
    pub fn push_bytes(&mut self, bytes: Bytes) {
        if self.buf.is_empty() && self.chunk.is_empty() {
            self.chunk = bytes;
        } else {
            self.push(&bytes);
        }
    }

    /// Moves the pending chunk into the owned buffer.
    fn spill(&mut self) {
        if !self.chunk.is_empty() {
            self.buf.extend_from_slice(&self.chunk);
            self.chunk = Bytes::new();
        }
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        if !self.chunk.is_empty() {
            match frame_len(&self.chunk)? {
                Some(len) if self.chunk.len() >= 4 + len => {
                    self.chunk.advance(4);
                    return Ok(Some(self.chunk.split_to(len)));
                }
                _ => {
                    self.spill();
                    return Ok(None);
                }
            }
        }
        let Some(len) = frame_len(&self.buf)? else {
            return Ok(None);
        };
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        self.buf.advance(4);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// Call at end of stream: leftover bytes mean the peer cut a frame short.
    pub fn finish(&self) -> Result<(), FrameError> {
        let rest: &[u8] = if self.chunk.is_empty() {
            &self.buf
        } else {
            &self.chunk
        };
        match rest.len() {
            0 => Ok(()),
            n if n < 4 => Err(FrameError::Truncated { have: n, want: 4 }),
            n => Err(FrameError::Truncated {
                have: n - 4,
                want: u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize,
            }),
        }
    }
}

/// The length in a frame's prefix, `None` before 4 bytes are there.
fn frame_len(b: &[u8]) -> Result<Option<usize>, FrameError> {
    if b.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(Some(len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn message_round_trips(payload in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let wire = encode_message(Channel::Gossip, &payload).expect("encode");
            let (ch, body) = decode_message(&wire).expect("decode");
            prop_assert_eq!(ch, Channel::Gossip);
            prop_assert_eq!(body, &payload[..]);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_message(&bytes);
            let mut d = FrameDecoder::new();
            d.push(&bytes);
            while let Ok(Some(_)) = d.next_frame() {}
            let _ = d.finish();
        }

        #[test]
        fn truncation_is_always_detected(
            payload in proptest::collection::vec(any::<u8>(), 0..256),
            cut in 0usize..260,
        ) {
            let wire = encode_message(Channel::Gossip, &payload).expect("encode");
            let cut = cut.min(wire.len());
            if cut < wire.len() {
                prop_assert!(decode_message(&wire[..cut]).is_err());
            }
        }

        #[test]
        fn decoder_reassembles_any_split(
            frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
            chunk in 1usize..64,
        ) {
            let mut wire = BytesMut::new();
            for f in &frames {
                encode_frame(f, &mut wire).expect("encode");
            }
            let mut d = FrameDecoder::new();
            let mut got = Vec::new();
            for (i, piece) in wire.chunks(chunk).enumerate() {
                // Both ways in: copied slices and zero-copy chunks, mixed.
                if i % 3 == 0 {
                    d.push(piece);
                } else {
                    d.push_bytes(Bytes::copy_from_slice(piece));
                }
                while let Some(f) = d.next_frame().expect("valid") {
                    got.push(f.to_vec());
                }
            }
            d.finish().expect("complete");
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn a_chunk_cut_short_is_reported_at_finish(
            payload in proptest::collection::vec(any::<u8>(), 1..300),
            cut in 1usize..300,
        ) {
            let mut wire = BytesMut::new();
            encode_frame(&payload, &mut wire).expect("encode");
            let cut = cut.min(wire.len() - 1);
            let mut d = FrameDecoder::new();
            d.push_bytes(wire.freeze().slice(..cut));
            prop_assert_eq!(d.next_frame(), Ok(None));
            prop_assert!(d.finish().is_err());
        }
    }

    #[test]
    fn oversized_frames_are_refused_before_buffering() {
        let mut wire = preamble(Channel::Gossip).to_vec();
        wire.extend_from_slice(&(MAX_FRAME as u32 + 1).to_be_bytes());
        assert_eq!(
            decode_message(&wire),
            Err(FrameError::TooLarge(MAX_FRAME + 1))
        );
        let mut d = FrameDecoder::new();
        d.push(&wire[4..]);
        assert_eq!(d.next_frame(), Err(FrameError::TooLarge(MAX_FRAME + 1)));
    }

    #[test]
    fn foreign_and_future_streams_are_named() {
        assert_eq!(decode_preamble(b"GET "), Err(FrameError::BadMagic(*b"GE")));
        assert_eq!(decode_preamble(b"DM\x02\x01"), Err(FrameError::Version(2)));
        assert_eq!(
            decode_preamble(b"DM\x01\x09"),
            Err(FrameError::UnknownChannel(9))
        );
    }
}
