//! Replays every input in `fuzz/corpus/<target>/` through the property its
//! fuzz target checks (`scap::fuzz`): what a fuzzer once found interesting
//! is checked on every `cargo test`, with no nightly compiler.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (the corpus is kept in the repository)",
                dir.display()
            )
        })
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        entries.len() >= 10,
        "{}: a corpus of {} inputs",
        dir.display(),
        entries.len()
    );
    for p in entries {
        let data = std::fs::read(&p).unwrap();
        check(&data);
    }
}

#[test]
fn tree_decode() {
    replay("tree_decode", scap::fuzz::tree_decode);
}

#[test]
fn object_decode() {
    replay("object_decode", scap::fuzz::object_decode);
}

#[test]
fn batch_decode() {
    replay("batch_decode", scap::fuzz::batch_decode);
}

#[test]
fn agent_response() {
    replay("agent_response", scap::fuzz::agent_response);
}
