//! Helpers shared by the eval test binaries.

use std::path::{Path, PathBuf};

/// The llava-v1.5 fixture written as a `Q8_0` GGUF pair in `dir/q8`; returns the source
/// checkpoint and the pair's directory.
pub fn q8_gguf(dir: &Path) -> (kollava_checkpoint::Checkpoint, PathBuf) {
    let out = dir.join("q8");
    let src = kollava_checkpoint::open(
        kollava_testkit::checkpoint_dir("llava-v1.5")
            .to_str()
            .unwrap(),
        &Default::default(),
    )
    .unwrap();
    kollava_checkpoint::gguf::quantize(
        &src,
        &out,
        kollava_checkpoint::gguf::QuantType::Q8_0,
        &mut |_, _| {},
    )
    .unwrap();
    (src, out)
}
