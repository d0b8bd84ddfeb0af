//! `kollava run`: one question about one image, like LLaVA's `run_llava`.

use std::io::Write;

use anyhow::{bail, Context, Result};
use kollava_generate::OutputFormat;
use kollava_inputs::template::{Conversation, Role};

use crate::args::RunArgs;
use crate::pipeline;

pub fn run(args: &RunArgs) -> Result<()> {
    let query = match (&args.query, &args.query_file) {
        (Some(q), _) => q.clone(),
        (None, Some(path)) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            String::from_utf8(bytes).map_err(|e| {
                anyhow::anyhow!(
                    "{} is not valid UTF-8 (byte {})",
                    path.display(),
                    e.utf8_error().valid_up_to()
                )
            })?
        }
        (None, None) => bail!("give --query or --query-file"),
    };
    if query.trim().is_empty() {
        bail!("the query is empty");
    }
    // Read the image before the (slow) model load, so a bad path fails fast.
    let image = args
        .image
        .as_deref()
        .map(pipeline::read_image)
        .transpose()?;
    // The schema is read before the model loads, so that a bad one fails at once.
    let format = match args.schema.as_deref() {
        None => None,
        Some("object") => Some(("object", OutputFormat::JsonObject)),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the schema {path}"))?;
            let schema = serde_json::from_str(&text)
                .with_context(|| format!("the schema {path} is not JSON"))?;
            Some((path, OutputFormat::JsonSchema(schema)))
        }
    };
    let loaded = pipeline::load(&args.model)?;
    let mut conv = Conversation::new(loaded.template.clone());
    conv.push(
        Role::User,
        Some(loaded.user_text(&query, usize::from(image.is_some()))),
    );
    conv.push(Role::Assistant, None);
    let images: Vec<_> = image.into_iter().collect();

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_err = None;
    let mut opts = pipeline::answer_options(&args.sampling)?;
    opts.sampling.logprobs = args.logprobs.map(usize::from);
    if let Some((spec, format)) = &format {
        let c = loaded.grammars.compile(format);
        opts.constraint = Some(c.with_context(|| format!("--schema {spec}"))?);
    }
    let answer = loaded.answer(&conv, &images, &opts, &mut |piece| {
        if !args.json && write_err.is_none() {
            if let Err(e) = out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
                write_err = Some(e);
            }
        }
        // Stop generating once stdout is gone (e.g. `| head`).
        write_err.is_none()
    })?;
    if let Some(e) = write_err {
        return Err(e.into());
    }
    if args.json {
        let json = serde_json::json!({
            "text": answer.generation.text,
            "token_ids": answer.generation.ids,
            "prompt_tokens": answer.prompt_tokens,
            "stop": format!("{:?}", answer.generation.stop).to_lowercase(),
            "template": loaded.template.name,
            "logprobs": args.logprobs.map(|_| {
                answer.generation.logprobs.iter().map(|t| serde_json::json!({
                    "id": t.id,
                    "logprob": t.logprob,
                    "top": t.top.iter().map(|&(id, lp)| serde_json::json!({"id": id, "logprob": lp})).collect::<Vec<_>>(),
                })).collect::<Vec<_>>()
            }),
            "timings": {
                "load_ms": answer.timings.load_ms,
                "preprocess_ms": answer.timings.preprocess_ms,
                "vision_ms": answer.timings.vision_ms,
                "prefill_ms": answer.timings.prefill_ms,
                "decode_ms": answer.timings.decode_ms,
                "decode_tokens_per_s": answer.timings.decode_tokens_per_s,
            },
        });
        writeln!(out, "{json}")?;
    } else {
        writeln!(out)?;
    }
    Ok(())
}
