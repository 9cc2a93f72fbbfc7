//! Fuzz the delegation stream decoder (parts, request and response heads)
//! with arbitrary peer bytes: `cargo +nightly fuzz run delegation_parts`.
#![no_main]

use dmsc_node::proto::wire::{decode_request_head, decode_response_head, Part, PartDecoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cut = data.first().map(|b| *b as usize % (data.len() + 1)).unwrap_or(0);
    let mut d = PartDecoder::new();
    for chunk in [&data[..cut], &data[cut..]] {
        d.push(chunk);
        while let Ok(Some(p)) = d.next_part() {
            if let Part::Head(h) = p {
                let _ = decode_request_head(&h);
                let _ = decode_response_head(&h);
            }
        }
    }
    let _ = d.finish();
});
