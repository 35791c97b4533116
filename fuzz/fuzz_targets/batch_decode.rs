//! See scap::fuzz::batch_decode for the property checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| scap::fuzz::batch_decode(data));
