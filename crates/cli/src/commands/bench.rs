//! `kollava bench`: time every stage of answering, with medians over repeats, peak RSS and
//! decode speed against the memory-bandwidth roofline measured in the same run.

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result};
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
    match &args.command {
        Some(crate::args::BenchCommand::Serve(a)) => return serve(a),
        Some(crate::args::BenchCommand::Train(a)) => return train(a),
        None => {}
    }
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
    if let Some(turns) = args.turns {
        return conversation(args, loaded, &img, turns as usize, threads);
    }
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
        constraint: None,
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
        // A GPU runs kernels asynchronously: wait for the tower before reading the clock.
        loaded.device.synchronize()?;
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
        progress(args, run);
    }
    progress(args, args.repeat + 1);
    let col = |i: usize| median(&rows.iter().map(|r| r[i]).collect::<Vec<_>>());
    let (preprocess_ms, vision_ms, prefill_ms, decode_ms, ttft_ms) =
        (col(0), col(1), col(2), col(3), col(4));
    // First token comes from the prefill logits; the rest are decode steps (llama.cpp's count).
    let decode_tps = (gen - 1) as f64 / (decode_ms / 1e3);
    let prefill_tps = prompt_len as f64 / (prefill_ms / 1e3);
    // Read before the bandwidth probe, whose buffers would count.
    let rss = peak_rss_bytes().map(|b| b as f64 / (1 << 20) as f64);
    let bytes_per_token = loaded.model.decoder.bytes_per_token() as f64;
    let bandwidth = if loaded.device.is_cpu() {
        memory_bandwidth(threads, 3)
    } else {
        device_bandwidth(&loaded.device)?
    };
    let device = match loaded.device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    };
    let roofline_tps = bandwidth / bytes_per_token;
    let json = serde_json::json!({
        "model": loaded.ckpt.dir.display().to_string(),
        "family": loaded.ckpt.family.name(),
        "parameters": parameter_count(loaded.model.config()),
        "weights_dtype": loaded.model.decoder.weight_format().to_lowercase(),
        "precision": loaded.precision.describe(),
        "threads": threads,
        "device": device,
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
        "model        {} ({}, {:.2} B params, {} language model, {threads} threads, {device})",
        loaded.ckpt.dir.display(),
        loaded.ckpt.family.name(),
        parameter_count(loaded.model.config()) / 1e9,
        loaded.model.decoder.weight_format()
    )?;
    writeln!(out, "precision    {}", loaded.precision.describe())?;
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

/// The warm-up / run counter on stderr (not with `--json`); past the last run, its newline.
fn progress(args: &BenchArgs, run: u32) {
    if args.json {
        return;
    }
    match run {
        0 => eprint!("\rwarm-up 0/{}", args.repeat),
        r if r <= args.repeat => eprint!("\rrun {r}/{}", args.repeat),
        _ => eprintln!(),
    }
}

/// Follow-up questions of `bench --turns`, in turn.
const FOLLOW_UPS: [&str; 5] = [
    "What colors do you see?",
    "How many shapes are there?",
    "이 그림을 한 문장으로 설명해 주세요.",
    "Which shape is the largest?",
    "Is there anything unusual?",
];

/// `kollava bench --turns N`: one conversation turn by turn through the session (prefix
/// and image caches on, as `chat` and `serve` run), medians of each turn over the repeats.
fn conversation(
    args: &BenchArgs,
    mut loaded: kollava_generate::Session,
    img: &RgbImage,
    turns: usize,
    threads: usize,
) -> Result<()> {
    use kollava_generate::{AnswerOptions, FeatureCache, PrefixCache};
    use std::sync::Arc;
    let opts = AnswerOptions {
        sampling: SamplingParams::greedy(),
        max_new_tokens: args.gen_tokens as usize,
        stop: Vec::new(),
        aspect: None,
        constraint: None,
    };
    let (prefix_budget, image_budget) = (
        loaded.prefix_cache.stats().budget,
        loaded.feature_cache.stats().budget,
    );
    // As `kollava chat`: each answer is kept for the next turn once it is out (outside the
    // turns' times, as a person reading the answer leaves the time for it).
    loaded.keep_answers = true;
    // Per turn: prompt tokens, cached tokens, first token ms, decode tok/s.
    let mut runs: Vec<Vec<[f64; 4]>> = vec![Vec::new(); turns];
    for run in 0..=args.repeat {
        loaded.prefix_cache = Arc::new(PrefixCache::new(prefix_budget));
        loaded.feature_cache = Arc::new(FeatureCache::new(image_budget));
        let mut conv = Conversation::new(loaded.template.clone());
        for (turn, row) in runs.iter_mut().enumerate() {
            // The image comes with the first question and stays in the history.
            let text = match turn {
                0 => loaded.user_text("Describe the image in detail.", 1),
                t => FOLLOW_UPS[(t - 1) % FOLLOW_UPS.len()].to_string(),
            };
            conv.push(Role::User, Some(text));
            conv.push(Role::Assistant, None);
            let answer = loaded.answer(&conv, std::slice::from_ref(img), &opts, &mut |_| true)?;
            conv.messages.pop();
            conv.push(Role::Assistant, Some(answer.generation.text.clone()));
            let t = &answer.timings;
            if run > 0 {
                row.push([
                    answer.prompt_tokens as f64,
                    answer.generation.cached_tokens as f64,
                    t.preprocess_ms + t.vision_ms + t.prefill_ms,
                    t.decode_tokens_per_s,
                ]);
            }
        }
        progress(args, run);
    }
    progress(args, args.repeat + 1);
    let col = |rows: &[[f64; 4]], i: usize| median(&rows.iter().map(|r| r[i]).collect::<Vec<_>>());
    let first = col(&runs[0], 2);
    let per_turn: Vec<serde_json::Value> = runs
        .iter()
        .enumerate()
        .map(|(t, rows)| {
            serde_json::json!({
                "turn": t + 1,
                "prompt_tokens": col(rows, 0),
                "cached_tokens": col(rows, 1),
                "time_to_first_token_ms": col(rows, 2),
                "vs_turn_1": col(rows, 2) / first,
                "decode_tokens_per_s": col(rows, 3),
            })
        })
        .collect();
    let rss = peak_rss_bytes().map(|b| b as f64 / (1 << 20) as f64);
    let json = serde_json::json!({
        "model": loaded.ckpt.dir.display().to_string(),
        "weights_dtype": loaded.model.decoder.weight_format().to_lowercase(),
        "precision": loaded.precision.describe(),
        "threads": threads,
        "repeat": args.repeat,
        "gen_tokens": args.gen_tokens,
        "prefix_cache_budget_mib": prefix_budget as f64 / (1 << 20) as f64,
        "turns": per_turn,
        "peak_rss_mib": rss,
    });
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{json}")?;
        return Ok(());
    }
    writeln!(
        out,
        "model  {} ({} language model, {threads} threads), {} tokens an answer, median of {}",
        loaded.ckpt.dir.display(),
        loaded.model.decoder.weight_format(),
        args.gen_tokens,
        args.repeat
    )?;
    writeln!(
        out,
        "turn  prompt  cached  first token ms  vs turn 1  decode tok/s"
    )?;
    for t in &per_turn {
        writeln!(
            out,
            "{:>4}  {:>6.0}  {:>6.0}  {:>13.1}  {:>8.3}x  {:>12.2}",
            t["turn"].as_u64().unwrap_or(0),
            t["prompt_tokens"].as_f64().unwrap_or(0.0),
            t["cached_tokens"].as_f64().unwrap_or(0.0),
            t["time_to_first_token_ms"].as_f64().unwrap_or(f64::NAN),
            t["vs_turn_1"].as_f64().unwrap_or(f64::NAN),
            t["decode_tokens_per_s"].as_f64().unwrap_or(f64::NAN),
        )?;
    }
    if let Some(rss) = rss {
        writeln!(out, "peak RSS {rss:.0} MiB")?;
    }
    Ok(())
}

/// A GPU's memory bandwidth in bytes/s: a 1 GiB on-device copy (read and write), the
/// fastest of 5 after a warm-up. The CPU's copy kernel would say nothing about it.
fn device_bandwidth(device: &candle_core::Device) -> Result<f64> {
    let bytes = 1usize << 30;
    let x = Tensor::zeros(bytes / 4, candle_core::DType::F32, device)?;
    drop(x.copy()?);
    device.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        let y = x.copy()?;
        device.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64());
        drop(y);
    }
    Ok(2.0 * bytes as f64 / best)
}

/// One streamed request: time to the first text, completion tokens, the answer.
struct Stream {
    ttft_ms: f64,
    tokens: usize,
    text: String,
}

fn stream_once(url: &str, body: &str, api_key: Option<&str>) -> Result<Stream> {
    use std::io::BufRead;
    let t = Instant::now();
    let mut req = ureq::post(format!("{url}/v1/chat/completions"))
        .header("Content-Type", "application/json")
        .config()
        .http_status_as_error(false)
        .build();
    if let Some(k) = api_key {
        req = req.header("Authorization", &format!("Bearer {k}"));
    }
    let mut resp = req
        .send(body)
        .map_err(|e| anyhow::anyhow!("cannot reach {url}: {e}"))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        anyhow::bail!("{url} answered {status}: {}", text.trim());
    }
    let reader = std::io::BufReader::new(resp.body_mut().as_reader());
    let (mut ttft, mut tokens, mut deltas, mut text) = (None, None, 0usize, String::new());
    for line in reader.lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(data)?;
        if let Some(e) = v.get("error") {
            anyhow::bail!("the server failed mid-stream: {e}");
        }
        if let Some(c) = v["choices"][0]["delta"]["content"]
            .as_str()
            .filter(|c| !c.is_empty())
        {
            deltas += 1;
            text.push_str(c);
            ttft.get_or_insert(t.elapsed().as_secs_f64() * 1e3);
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = Some(n as usize);
        }
    }
    Ok(Stream {
        ttft_ms: ttft.unwrap_or(t.elapsed().as_secs_f64() * 1e3),
        tokens: tokens.unwrap_or(deltas),
        text,
    })
}

/// One conversation of `turns` streamed requests, each with the whole history so far;
/// one [`Stream`] a turn.
fn conversation_once(
    url: &str,
    first: &[serde_json::Value],
    turns: usize,
    max_tokens: usize,
    api_key: Option<&str>,
) -> Result<Vec<Stream>> {
    let mut messages = vec![serde_json::json!({"role": "user", "content": first})];
    let mut out = Vec::with_capacity(turns);
    for turn in 0..turns {
        if turn > 0 {
            let q = FOLLOW_UPS[(turn - 1) % FOLLOW_UPS.len()];
            messages.push(serde_json::json!({"role": "user", "content": q}));
        }
        let body = serde_json::json!({
            "model": "kollava", "stream": true, "temperature": 0, "max_tokens": max_tokens,
            "messages": messages,
        })
        .to_string();
        let s = stream_once(url, &body, api_key)?;
        messages.push(serde_json::json!({"role": "assistant", "content": s.text.trim()}));
        out.push(s);
    }
    Ok(out)
}

fn percentile(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v[((p / 100.0) * (v.len() - 1) as f64).round() as usize]
}

/// `kollava bench serve`.
fn serve(args: &crate::args::BenchServeArgs) -> Result<()> {
    use base64::Engine as _;
    let url = args.url.trim_end_matches('/').to_string();
    let key = args
        .api_key
        .clone()
        .or_else(|| std::env::var("KOLLAVA_API_KEY").ok());
    let mut content = vec![serde_json::json!({"type": "text", "text": args.prompt})];
    if let Some(p) = &args.image {
        let bytes = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
        content.push(serde_json::json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{b64}")}}));
    }
    let turns = args.turns as usize;
    let converse = || conversation_once(&url, &content, turns, args.max_tokens, key.as_deref());
    // One request first: fails fast (server down, wrong key) and warms the server up. A
    // conversation's first question only: a whole conversation would fill the server's
    // cache with what the measured ones then ask.
    conversation_once(&url, &content, 1, args.max_tokens, key.as_deref())?;
    let mut levels = Vec::new();
    for &c in &args.concurrency {
        let c = c.max(1);
        let total = args.requests.unwrap_or(2 * c).max(1);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let t = Instant::now();
        let results: Vec<Result<Vec<Stream>>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..c)
                .map(|_| {
                    s.spawn(|| {
                        let mut out = Vec::new();
                        while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                            out.push(converse());
                        }
                        out
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        });
        let wall = t.elapsed().as_secs_f64();
        let (ok, failed): (Vec<_>, Vec<_>) = results.into_iter().partition(|r| r.is_ok());
        let ok: Vec<Vec<Stream>> = ok.into_iter().flatten().collect();
        let tokens: usize = ok.iter().flatten().map(|s| s.tokens).sum();
        let ttft: Vec<f64> = ok.iter().flatten().map(|s| s.ttft_ms).collect();
        let per_turn: Vec<serde_json::Value> = (0..turns)
            .map(|t| {
                let x: Vec<f64> = ok
                    .iter()
                    .filter_map(|c| c.get(t))
                    .map(|s| s.ttft_ms)
                    .collect();
                serde_json::json!({"turn": t + 1, "ttft_ms_p50": percentile(&x, 50.0)})
            })
            .collect();
        levels.push(serde_json::json!({
            "turns": per_turn,
            "concurrency": c, "requests": total, "failed": failed.len(),
            "first_error": failed.first().and_then(|r| r.as_ref().err()).map(|e| e.to_string()),
            "wall_s": wall, "completion_tokens": tokens,
            "tokens_per_s": tokens as f64 / wall,
            "ttft_ms": {"p50": percentile(&ttft, 50.0), "p90": percentile(&ttft, 90.0), "p99": percentile(&ttft, 99.0)},
        }));
    }
    let json = serde_json::json!({"url": url, "max_tokens": args.max_tokens, "image": args.image.is_some(), "turns": turns, "levels": levels});
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{json}")?;
        return Ok(());
    }
    writeln!(
        out,
        "{url}  max_tokens {}  image {}{}",
        args.max_tokens,
        args.image.is_some(),
        match turns {
            1 => String::new(),
            n => format!("  conversations of {n} turns (a request is a conversation)"),
        }
    )?;
    writeln!(
        out,
        "streams  requests  failed    tokens/s   TTFT p50 / p90 / p99 ms"
    )?;
    for l in &levels {
        writeln!(
            out,
            "{:>7}  {:>8}  {:>6}  {:>10.1}   {:.0} / {:.0} / {:.0}",
            l["concurrency"].as_u64().unwrap_or(0),
            l["requests"].as_u64().unwrap_or(0),
            l["failed"].as_u64().unwrap_or(0),
            l["tokens_per_s"].as_f64().unwrap_or(0.0),
            l["ttft_ms"]["p50"].as_f64().unwrap_or(f64::NAN),
            l["ttft_ms"]["p90"].as_f64().unwrap_or(f64::NAN),
            l["ttft_ms"]["p99"].as_f64().unwrap_or(f64::NAN),
        )?;
        if turns > 1 {
            let each: Vec<String> = l["turns"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| format!("{:.0}", t["ttft_ms_p50"].as_f64().unwrap_or(f64::NAN)))
                .collect();
            writeln!(out, "         TTFT p50 by turn, ms: {}", each.join(" / "))?;
        }
    }
    Ok(())
}

type Timed = (f64, usize, usize, kollava_train::trainer::StepTimes);

/// `kollava bench train`: a run of `--warmup` + `--steps` optimizer steps that writes
/// nothing, timed step by step.
fn train(args: &crate::args::BenchTrainArgs) -> Result<()> {
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let mut spec = super::train::spec(&args.setup)?;
    let (warmup, timed) = (args.warmup as usize, args.steps as usize);
    spec.train.max_steps = Some(warmup + timed);
    spec.train.warmup_ratio = 0.0;
    let mut parameters = 0;
    let mut last = std::time::Instant::now();
    // (wall seconds, samples, tokens, phases) of each timed step.
    let mut steps: Vec<Timed> = Vec::new();
    kollava_train::run::execute(&spec, &candle_core::Device::Cpu, None, &mut |e| match e {
        kollava_train::run::Event::Started { parameters: p, .. } => {
            parameters = p;
            last = std::time::Instant::now();
        }
        kollava_train::run::Event::Step { log, .. } => {
            let wall = last.elapsed().as_secs_f64();
            last = std::time::Instant::now();
            if log.step > warmup {
                steps.push((wall, log.samples, log.tokens, log.times));
            }
            eprint!("\rstep {}/{}", log.step, warmup + timed);
        }
        _ => {}
    })?;
    eprintln!();
    let med = |f: &dyn Fn(&Timed) -> f64| median(&steps.iter().map(f).collect::<Vec<_>>());
    let step_s = med(&|s| s.0);
    let samples = med(&|s| s.1 as f64);
    let tokens = med(&|s| s.2 as f64);
    let split = [
        ("vision_s", med(&|s| s.3.vision)),
        ("forward_s", med(&|s| s.3.forward)),
        ("backward_s", med(&|s| s.3.backward)),
        ("optimizer_s", med(&|s| s.3.optimizer)),
        ("communication_s", med(&|s| s.3.communication)),
    ];
    let rss = peak_rss_bytes().map(|b| b as f64 / (1 << 20) as f64);
    let setup = &args.setup;
    let what = match (setup.stage, setup.lora_r, setup.bits) {
        (crate::args::Stage::Pretrain, _, _) => "pretrain".to_string(),
        (_, 0, _) => "finetune".to_string(),
        (_, r, 4) => format!("qlora-r{r}"),
        (_, r, _) => format!("lora-r{r}"),
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        let mut v = serde_json::json!({
            "model": spec.model,
            "run": what,
            "batch": setup.per_device_batch_size,
            "threads": threads,
            "trained_parameters": parameters,
            "steps": timed,
            "step_s": step_s,
            "samples_per_s": samples / step_s,
            "tokens_per_s": tokens / step_s,
            "tokens_per_step": tokens,
            "peak_rss_mib": rss,
        });
        for (k, t) in split {
            v[k] = serde_json::json!(t);
        }
        writeln!(out, "{v}")?;
        return Ok(());
    }
    writeln!(out, "model        {}", spec.model)?;
    writeln!(
        out,
        "run          {what}, batch {}, {threads} threads, {parameters} trained parameters",
        setup.per_device_batch_size
    )?;
    writeln!(out, "step         {step_s:>10.3} s (median of {timed})")?;
    writeln!(out, "samples/s    {:>10.3}", samples / step_s)?;
    writeln!(out, "tokens/s     {:>10.1}", tokens / step_s)?;
    for (k, t) in split {
        let name = format!("  {}", k.trim_end_matches("_s"));
        writeln!(out, "{name:<15}{t:>8.3} s")?;
    }
    if let Some(rss) = rss {
        writeln!(out, "peak RSS     {rss:>10.0} MiB")?;
    }
    Ok(())
}
