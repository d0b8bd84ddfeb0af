//! Fuzz targets: each takes arbitrary bytes to one of the parsers kollava runs on outside
//! input, through the same entry points the program uses, and must return (an error is
//! fine) without panicking or hanging. `scripts/fuzz.sh TARGET MINUTES` runs one under
//! AFL++; `tests/corpus.rs` replays the seed corpus and every crash found so far.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kollava_inputs::image::{self, AspectMode, ClipPreprocess};

/// A fuzz target: takes any bytes, must return.
pub type Target = fn(&[u8]);

/// The targets, by the name `scripts/fuzz.sh` and the corpus folders use.
pub const TARGETS: &[(&str, Target)] = &[
    ("image", image_bytes),
    ("openai_request", openai_request),
    ("training_data", training_data),
    ("safetensors", safetensors),
    ("gguf", gguf),
    ("torch_pickle", torch_pickle),
    ("tokenizer_model", tokenizer_model),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|&(_, f)| f)
}

/// The repository's `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// `data` written to a fresh file called `name` (the readers that take paths).
fn file(name: &str, data: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join(name);
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(data))
        .expect("writing the input");
    (dir, path)
}

/// An uploaded image: decoded, then fitted to a tower as each aspect mode does.
pub fn image_bytes(data: &[u8]) {
    if let Ok(img) = image::decode(data, "fuzz") {
        let cfg = ClipPreprocess::square(28);
        for mode in [AspectMode::Crop, AspectMode::Pad, AspectMode::Resize] {
            let _ = image::preprocess(&img, mode, &cfg);
        }
    }
}

/// A `POST /v1/chat/completions` body: JSON, messages, data-URL images, sampling settings
/// and `response_format` (schemas compiled over the LLaVA-1.5 fixture's vocabulary).
pub fn openai_request(data: &[u8]) {
    static GRAMMARS: OnceLock<(kollava_generate::Grammars, usize)> = OnceLock::new();
    let (grammars, rows) = GRAMMARS.get_or_init(|| {
        let tok = kollava_inputs::Tokenizer::from_dir(&fixtures().join("llava-v1.5"))
            .expect("the fixture's tokenizer");
        let rows = tok.vocab_size();
        (kollava_generate::Grammars::new(tok, rows), rows)
    });
    let _ = kollava_serve::openai::parse_request(data, *rows, grammars);
}

/// A training data file, JSON array or JSON Lines, every record checked.
pub fn training_data(data: &[u8]) {
    let (_dir, path) = file("data.json", data);
    let _ = kollava_train::data::read_records(&path);
}

/// A `.safetensors` file's header, as a checkpoint's weights are listed and checked.
pub fn safetensors(data: &[u8]) {
    let (_dir, path) = file("model.safetensors", data);
    let _ = kollava_checkpoint::weights::WeightFiles::single(&path);
}

/// A GGUF model file opened with the fixture pair's image encoder: header, metadata, the
/// configuration and tokenizer built from it, and the tensors' extents.
pub fn gguf(data: &[u8]) {
    let (dir, path) = file("model.gguf", data);
    let mmproj = dir.path().join("mmproj.gguf");
    if std::fs::copy(gguf_mmproj(), &mmproj).is_ok() {
        if let Ok(ckpt) = kollava_checkpoint::gguf::open_pair(path, mmproj) {
            let _ = ckpt.tokenizer();
        }
    }
}

/// The image encoder of the GGUF seed pair (fuzz/corpus/gguf-mmproj.gguf).
fn gguf_mmproj() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/gguf-mmproj.gguf")
}

/// A PyTorch `.bin` (a zip of a pickle and tensor data): listed, then every tensor read.
pub fn torch_pickle(data: &[u8]) {
    let (_dir, path) = file("pytorch_model.bin", data);
    let Ok(files) = kollava_checkpoint::weights::WeightFiles::single(&path) else {
        return;
    };
    if let Ok(pth) = candle_core::pickle::PthTensors::new(&path, None) {
        for name in &files.names {
            let _ = pth.get(name);
        }
    }
}

/// A sentencepiece `tokenizer.model`, loaded as a checkpoint's tokenizer (no
/// `tokenizer.json` beside it) and used on Korean and English text both ways.
pub fn tokenizer_model(data: &[u8]) {
    let (dir, _path) = file("tokenizer.model", data);
    if let Ok(tok) = kollava_inputs::Tokenizer::from_dir_sentencepiece(dir.path()) {
        if let Ok(ids) = tok.encode("안녕하세요, 이 그림을 설명해 주세요. Hello!") {
            let _ = tok.decode(&ids, false);
        }
    }
}
