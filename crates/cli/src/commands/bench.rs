//! `kollava bench`: time every stage of answering, with medians over repeats, peak RSS and
//! decode speed against the memory-bandwidth roofline measured in the same run.

use std::io::Write;
use std::time::Instant;

use anyhow::Result;
use candle_core::Tensor;
use kollava_eval::bench::{median, memory_bandwidth, parameter_count, peak_rss_bytes};
use kollava_generate::{GenerateOptions, SamplingParams};
use kollava_inputs::image::{self, RgbImage};
use kollava_inputs::prompt;
use kollava_inputs::template::{Conversation, Role};

use crate::args::BenchArgs;
use crate::pipeline;

/// A deterministic 336x336 colour pattern, so runs need no image file.
pub(crate) fn test_pattern() -> RgbImage {
    let (w, h) = (336u32, 336u32);
    let mut data = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            data.extend([
                (x * 255 / w) as u8,
                (y * 255 / h) as u8,
                (((x / 42 + y / 42) % 2) * 200) as u8,
            ]);
        }
    }
    RgbImage {
        width: w,
        height: h,
        data,
    }
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // candle's CPU kernels size their pool from this variable; set before the first use.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let img = match &args.image {
        Some(spec) => pipeline::read_image(spec)?,
        None => test_pattern(),
    };
    let loaded = pipeline::load(&args.model)?;
    let n = loaded.scheme.n();
    let mut query = "Describe the image in detail.".to_string();
    let build = |q: &str| -> Result<prompt::Prompt> {
        let mut conv = Conversation::new(loaded.template.clone());
        conv.push(Role::User, Some(loaded.user_text(q, 1)));
        conv.push(Role::Assistant, None);
        Ok(prompt::build(&loaded.tok, &conv.prompt(), &loaded.scheme)?)
    };
    let mut p = build(&query)?;
    if let Some(target) = args.prompt_tokens {
        if target + args.gen_tokens as usize > loaded.ckpt.context_len {
            anyhow::bail!(
                "--prompt-tokens {target} + --gen-tokens {} exceed the model's context of {}",
                args.gen_tokens,
                loaded.ckpt.context_len
            );
        }
        while p.spliced_len(n) < target {
            query.push_str(" Please answer carefully.");
            p = build(&query)?;
        }
    }
    let prompt_len = p.spliced_len(n);
    let gen = args.gen_tokens as usize;
    if prompt_len + gen > loaded.ckpt.context_len {
        anyhow::bail!(
            "prompt ({prompt_len}) + generated ({gen}) tokens exceed the context of {}",
            loaded.ckpt.context_len
        );
    }
    let slots: Vec<std::ops::Range<usize>> =
        p.images.iter().map(|s| s.at..s.at + s.replaces).collect();
    let (cw, ch) = loaded.ckpt.preprocess.crop;
    let opts = GenerateOptions {
        sampling: SamplingParams::greedy(),
        max_new_tokens: gen,
        eos_ids: Vec::new(),
        stop_strings: Vec::new(),
        context_len: usize::MAX,
    };

    let mut rows: Vec<[f64; 5]> = Vec::new(); // preprocess, vision, prefill, decode, ttft (ms)
    for run in 0..=args.repeat {
        let t = Instant::now();
        let pixels = image::preprocess(&img, loaded.aspect, &loaded.ckpt.preprocess);
        let preprocess_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let px = Tensor::from_vec(pixels, (1, 3, ch as usize, cw as usize), &loaded.device)?;
        let feats = loaded.model.encode_images(&px)?;
        let embeds = loaded
            .model
            .embed_with_images(&p.ids, &slots, Some(&feats))?;
        let vision_ms = t.elapsed().as_secs_f64() * 1e3;
        let g = kollava_generate::generate(
            &loaded.model,
            &loaded.tok,
            &embeds,
            &p.ids,
            &opts,
            &mut |_| true,
        )?;
        let ttft = preprocess_ms + vision_ms + g.prefill_ms;
        if run > 0 {
            rows.push([preprocess_ms, vision_ms, g.prefill_ms, g.decode_ms, ttft]);
        }
        if !args.json {
            eprint!(
                "\r{} {}/{}",
                if run == 0 { "warm-up" } else { "run" },
                run,
                args.repeat
            );
        }
    }
    if !args.json {
        eprintln!();
    }
    let col = |i: usize| median(&rows.iter().map(|r| r[i]).collect::<Vec<_>>());
    let (preprocess_ms, vision_ms, prefill_ms, decode_ms, ttft_ms) =
        (col(0), col(1), col(2), col(3), col(4));
    // First token comes from the prefill logits; the rest are decode steps (llama.cpp's count).
    let decode_tps = (gen - 1) as f64 / (decode_ms / 1e3);
    let prefill_tps = prompt_len as f64 / (prefill_ms / 1e3);
    // Read before the bandwidth probe, whose buffers would count.
    let rss = peak_rss_bytes().map(|b| b as f64 / (1 << 20) as f64);
    let bytes_per_token = loaded.model.decoder.bytes_per_token() as f64;
    let bandwidth = memory_bandwidth(threads, 3);
    let roofline_tps = bandwidth / bytes_per_token;
    let json = serde_json::json!({
        "model": loaded.ckpt.dir.display().to_string(),
        "family": loaded.ckpt.family.name(),
        "parameters": parameter_count(loaded.model.config()),
        "weights_dtype": loaded.model.decoder.weight_format().to_lowercase(),
        "threads": threads,
        "repeat": args.repeat,
        "prompt_tokens": prompt_len,
        "gen_tokens": gen,
        "load_ms": loaded.load_ms,
        "preprocess_ms": preprocess_ms,
        "vision_ms": vision_ms,
        "prefill_ms": prefill_ms,
        "prefill_tokens_per_s": prefill_tps,
        "time_to_first_token_ms": ttft_ms,
        "decode_ms": decode_ms,
        "decode_tokens_per_s": decode_tps,
        "peak_rss_mib": rss,
        "decode_bytes_per_token": bytes_per_token,
        "memory_bandwidth_gb_s": bandwidth / 1e9,
        "roofline_tokens_per_s": roofline_tps,
        "roofline_fraction": decode_tps / roofline_tps,
    });
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{json}")?;
        return Ok(());
    }
    writeln!(
        out,
        "model        {} ({}, {:.2} B params, {} language model, {threads} threads)",
        loaded.ckpt.dir.display(),
        loaded.ckpt.family.name(),
        parameter_count(loaded.model.config()) / 1e9,
        loaded.model.decoder.weight_format()
    )?;
    writeln!(
        out,
        "prompt       {prompt_len} tokens (image included), {gen} generated, median of {}",
        args.repeat
    )?;
    writeln!(out, "load         {:>10.1} ms", loaded.load_ms)?;
    writeln!(out, "preprocess   {preprocess_ms:>10.1} ms")?;
    writeln!(out, "vision       {vision_ms:>10.1} ms")?;
    writeln!(
        out,
        "prefill      {prefill_ms:>10.1} ms  ({prefill_tps:.1} tok/s)"
    )?;
    writeln!(out, "first token  {ttft_ms:>10.1} ms")?;
    writeln!(out, "decode       {decode_tps:>10.2} tok/s  ({:.0}% of the {roofline_tps:.1} tok/s roofline at {:.1} GB/s)", 100.0 * decode_tps / roofline_tps, bandwidth / 1e9)?;
    if let Some(rss) = rss {
        writeln!(out, "peak RSS     {rss:>10.0} MiB")?;
    }
    Ok(())
}
