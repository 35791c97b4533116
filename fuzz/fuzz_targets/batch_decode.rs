//! Hostile batch responses, in arbitrary pieces: the decoder never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scap::net::BatchDecoder;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |&b| b as usize).min(data.len());
    let mut d = BatchDecoder::default();
    for piece in [&data[..split], &data[split..]] {
        d.push(piece);
        while let Ok(Some(_)) = d.next_frame() {}
    }
    let _ = d.finish();
});
