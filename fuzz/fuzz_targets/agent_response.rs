//! See scap::fuzz::agent_response for the property checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| scap::fuzz::agent_response(data));
