//! Hostile tree bytes: decoding never panics, and whatever decodes
//! re-encodes to exactly the same bytes (the encoding is canonical).
#![no_main]

use libfuzzer_sys::fuzz_target;
use scap::store::Tree;

fuzz_target!(|data: &[u8]| {
    if let Ok(tree) = Tree::decode(data) {
        assert_eq!(tree.encode(), data, "a decoded tree re-encodes to its input");
    }
});
