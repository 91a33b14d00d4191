//! Replays every fuzz target's corpus (`fuzz/corpus/<target>/`) through the functions the
//! targets run, so what the fuzzer once found stays fixed without a nightly compiler.

use std::path::Path;

#[test]
fn every_fuzz_corpus_replays_without_a_failure() {
    let corpora = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, run) in gitfleet::fuzzing::TARGETS {
        let directory = corpora.join(target);
        let mut inputs: Vec<_> = std::fs::read_dir(&directory)
            .unwrap_or_else(|error| panic!("{}: {error}", directory.display()))
            .map(|entry| entry.expect("a corpus entry").path())
            .collect();
        inputs.sort();
        assert!(inputs.len() >= 10, "{target}: a corpus of {} inputs", inputs.len());
        for input in inputs {
            let data = std::fs::read(&input).expect("a corpus file");
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{target} fails on {}", input.display());
        }
    }
}
