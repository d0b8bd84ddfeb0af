//! From the user's flags to a loaded [`Session`] (the shared path lives in
//! `kollava_generate::session`), plus reading images from paths or URLs.

use anyhow::{Context, Result};
use kollava_generate::{AnswerOptions, SamplingParams, Session, SessionOptions};
use kollava_inputs::image::{self, RgbImage};
use kollava_inputs::template::Template;

use crate::args::{ModelArgs, SamplingArgs};

pub fn load(args: &ModelArgs) -> Result<Session> {
    let aspect = args.image_aspect;
    let opts = SessionOptions {
        model: model_path(args.model.as_deref()),
        vision_tower: args.vision_tower.clone(),
        conv_mode: args.conv_mode.clone(),
        aspect,
        dtype: args.dtype.dtype(),
        projector: args.projector.clone(),
        mmproj: args.mmproj.clone(),
        prefix_cache_bytes: args.prefix_cache_mb.map(|mb| mb << 20),
        image_cache_bytes: args.image_cache_mb.map(|mb| mb << 20),
    };
    Ok(Session::load(&opts)?)
}

/// Where the bundled demo model is, relative to the repository.
const DEMO_MODEL: &str = "models/kollava-demo";

/// The `--model` value, or the bundled demo model: looked up in the working directory,
/// then beside the executable (`target/release/kollava` in a checkout), then in the
/// checkout the binary was built from.
pub fn model_path(arg: Option<&str>) -> String {
    if let Some(m) = arg {
        return m.to_string();
    }
    let mut candidates = vec![std::path::PathBuf::from(DEMO_MODEL)];
    if let Ok(exe) = std::env::current_exe() {
        candidates.extend(exe.ancestors().skip(1).map(|d| d.join(DEMO_MODEL)));
    }
    candidates.push(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(DEMO_MODEL),
    );
    candidates
        .into_iter()
        .find(|p| p.join("config.json").is_file())
        .unwrap_or_else(|| DEMO_MODEL.into())
        .display()
        .to_string()
}

/// A template by name; the error names the flag it came from and lists the known ones.
pub fn template(name: &str, flag: &str) -> Result<Template> {
    Template::by_name(name).with_context(|| {
        format!(
            "unknown {flag} {name:?}; known: {}",
            Template::names().join(", ")
        )
    })
}

/// Reads an image from a path or an http(s) URL.
pub fn read_image(spec: &str) -> Result<RgbImage> {
    if spec.starts_with("http://") || spec.starts_with("https://") {
        let mut resp = ureq::get(spec)
            .call()
            .with_context(|| format!("cannot fetch image {spec}"))?;
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(256 << 20)
            .read_to_vec()
            .with_context(|| format!("cannot read image {spec}"))?;
        return Ok(image::decode(&bytes, spec)?);
    }
    Ok(image::open(std::path::Path::new(spec))?)
}

pub fn answer_options(s: &SamplingArgs) -> Result<AnswerOptions> {
    let sampling = SamplingParams {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        repetition_penalty: s.repetition_penalty,
        seed: s.seed,
        ..SamplingParams::default()
    };
    sampling.validate()?;
    Ok(AnswerOptions {
        sampling,
        max_new_tokens: s.max_new_tokens as usize,
        stop: Vec::new(),
        aspect: None,
        constraint: None,
    })
}
