//! Fuzz the overlay frame decoders with arbitrary peer bytes:
//! `cargo +nightly fuzz run frame_decode` from `fuzz/`.
#![no_main]

use dmsc_transport::frame::{decode_message, FrameDecoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_message(data);
    // Split the same bytes at a data-dependent point to exercise reassembly.
    let cut = data.first().map(|b| *b as usize % (data.len() + 1)).unwrap_or(0);
    let mut d = FrameDecoder::new();
    d.push(&data[..cut]);
    while let Ok(Some(_)) = d.next_frame() {}
    d.push(&data[cut..]);
    while let Ok(Some(_)) = d.next_frame() {}
    let _ = d.finish();
});
