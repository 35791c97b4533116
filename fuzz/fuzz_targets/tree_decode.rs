//! See scap::fuzz::tree_decode for the property checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| scap::fuzz::tree_decode(data));
