//! Every fuzz target on its seed corpus (`fuzz/corpus/TARGET`) and on each input that
//! once crashed or hung it (`fuzz/regressions/TARGET`, kept when the bug is fixed): none
//! may panic. `scripts/fuzz.sh` does the fuzzing itself; this keeps CI on the same code.

use std::path::Path;

fn inputs(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn every_target_survives_its_corpus_and_past_crashes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for &(name, target) in kollava_fuzz::TARGETS {
        let seeds = inputs(&root.join("corpus").join(name));
        assert!(!seeds.is_empty(), "{name}: no seed corpus");
        for path in seeds
            .iter()
            .chain(&inputs(&root.join("regressions").join(name)))
        {
            let data = std::fs::read(path).unwrap();
            let result = std::panic::catch_unwind(|| target(&data));
            assert!(result.is_ok(), "{name} panicked on {}", path.display());
        }
    }
}
