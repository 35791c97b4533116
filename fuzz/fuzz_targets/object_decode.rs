//! Hostile object files: reading never panics and never allocates more
//! than the format's 64 MiB bound; only a file whose content hashes to the
//! ID asked for is accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scap::store::object;
use scap::store::{ObjectId, ObjectKind};

fuzz_target!(|data: &[u8]| {
    let id = ObjectId::from_bytes([7; 32]);
    for kind in [ObjectKind::Chunk, ObjectKind::Tree] {
        if let Ok(content) = object::decode(id, kind, data) {
            assert_eq!(kind.hash(&content), id);
        }
        let _ = object::peek(id, data);
        let _ = object::uncompressed(id, data);
    }
});
