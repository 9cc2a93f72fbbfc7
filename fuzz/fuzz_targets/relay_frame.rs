//! Fuzz the relay session decoder and the disco packet parser (bytes from
//! any mesh node, or any UDP sender for disco): `cargo +nightly fuzz run
//! relay_frame`. Decoding never panics; a frame that decodes re-encodes to
//! bytes that decode to the same frame.
#![no_main]

use dmsc_transport::path::disco::Disco;
use dmsc_transport::relay::frame::Decoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Disco::parse(data);
    let mut d = Decoder::new();
    d.push(data);
    while let Ok(Some(f)) = d.next_frame() {
        let bytes = f.to_bytes().expect("a decoded frame re-encodes");
        let mut again = Decoder::new();
        again.push(&bytes);
        assert_eq!(again.next_frame().ok().flatten(), Some(f));
    }
});
