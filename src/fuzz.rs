//! The properties the fuzz targets check, one function per target: each
//! must hold for any byte sequence (no panic, no unbounded allocation).
//! `fuzz/fuzz_targets/*.rs` call these under libFuzzer; the integration
//! test `fuzz_corpora` replays the corpora kept in `fuzz/corpus/` through
//! them on every `cargo test`, so CI checks every input a fuzzer found
//! interesting without a nightly compiler.

use crate::net::BatchDecoder;
use crate::proto::{ErrorResponse, Outcome, StateResponse};
use crate::store::{ObjectId, ObjectKind, Tree, object};

/// Hostile tree bytes: decoding never panics, and whatever decodes
/// re-encodes to exactly the same bytes (the encoding is canonical).
pub fn tree_decode(data: &[u8]) {
    if let Ok(tree) = Tree::decode(data) {
        assert_eq!(
            tree.encode(),
            data,
            "a decoded tree re-encodes to its input"
        );
    }
}

/// Hostile object files: reading never panics; only a file whose content
/// hashes to the ID asked for is accepted.
pub fn object_decode(data: &[u8]) {
    let id = ObjectId::from_bytes([7; 32]);
    for kind in [ObjectKind::Chunk, ObjectKind::Tree] {
        if let Ok(content) = object::decode(id, kind, data) {
            assert_eq!(kind.hash(&content), id);
        }
        let _ = object::decode_within(id, kind, data, 100);
        let _ = object::peek(id, data);
        let _ = object::uncompressed(id, data);
    }
    // What gc compresses: only an object that is `id`, and it stays that.
    if let Ok(file) = object::compressed(id, data) {
        let (kind, _) = object::peek(id, &file).expect("checked");
        assert!(object::decode(id, kind, &file).is_ok());
    }
}

/// Hostile batch responses, in arbitrary pieces: the decoder never panics
/// and never buffers a frame over its limit.
pub fn batch_decode(data: &[u8]) {
    let split = data.first().map_or(0, |&b| b as usize).min(data.len());
    let mut d = BatchDecoder::default();
    for piece in [&data[..split], &data[split..]] {
        d.push(piece);
        while let Ok(Some(f)) = d.next_frame_within(&|_| 1000) {
            assert!(f.file.is_none_or(|b| b.len() <= 1000));
        }
    }
    let _ = d.finish();
    // The same bytes as a pack (format 3): segments never decompress past
    // their bound, and what they hold goes through the batch decoder.
    let mut segments = crate::net::pack::SegmentReader::default();
    let mut d = BatchDecoder::default();
    for piece in [&data[..split], &data[split..]] {
        segments.push(piece);
        while let Ok(Some(raw)) = segments.next_segment() {
            assert!(raw.len() <= crate::net::pack::MAX_SEGMENT);
            d.push(&raw);
            while let Ok(Some(f)) = d.next_frame_within(&|_| 1000) {
                assert!(f.file.is_none_or(|b| b.len() <= 1000));
            }
        }
    }
}

/// Hostile agent answers: the controller's parsing of every answer type
/// never panics, and what it shows a person is clipped.
pub fn agent_response(data: &[u8]) {
    if let Ok(r) = serde_json::from_slice::<StateResponse>(data) {
        let view = crate::fleet::poll::HostView::of(&r);
        assert!(view.last_error.is_none_or(|e| e.len() <= 504));
    }
    if let Ok(o) = serde_json::from_slice::<Outcome>(data) {
        let _ = o.version.short();
    }
    if let Ok(e) = serde_json::from_slice::<ErrorResponse>(data) {
        assert!(crate::text::clip(&e.error, 1000).len() <= 1004);
    }
}
