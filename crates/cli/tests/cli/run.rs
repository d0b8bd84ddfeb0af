//! `kollava run`: answers, timings and determinism on every fixture, and every kind of bad
//! checkpoint, image, prompt or flag as one error line.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Output, Stdio};

use kollava_testkit::CHECKPOINTS;
use serde_json::Value;

use crate::common::*;

/// `(tensor name, shard file)` from the checkpoint's `model.safetensors.index.json`, for the
/// first tensor whose name ends with `suffix`.
fn indexed_tensor(ckpt: &Path, suffix: &str) -> (String, String) {
    let text = std::fs::read_to_string(ckpt.join("model.safetensors.index.json")).expect("index");
    let index: Value = serde_json::from_str(&text).expect("index parses");
    let map = index["weight_map"].as_object().expect("weight_map");
    let (name, shard) = map
        .iter()
        .find(|(name, _)| name.ends_with(suffix))
        .unwrap_or_else(|| panic!("no tensor *{suffix} in the index"));
    (
        name.clone(),
        shard.as_str().expect("shard name").to_string(),
    )
}

/// The first half of a fixture image's bytes.
fn first_half(name: &str) -> Vec<u8> {
    let bytes = std::fs::read(image(name)).expect("fixture image");
    bytes[..bytes.len() / 2].to_vec()
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn adler32(bytes: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in bytes {
        a = (a + u32::from(x)) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc_input = kind.to_vec();
    crc_input.extend_from_slice(data);
    out.extend_from_slice(&crc32(&crc_input).to_be_bytes());
    out
}

/// A valid grey PNG header claiming `width`x`height`, with only the first row of pixels
/// stored (an uncompressed deflate block): a few kB on disk that would need
/// `width * height` bytes once decoded.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit greyscale, deflate, no filter/interlace
    let row: Vec<u8> = std::iter::once(0).chain((0..width).map(|_| 0)).collect();
    let len = u16::try_from(row.len()).expect("one row fits a stored block");
    let mut zlib = vec![0x78, 0x01, 0x01]; // zlib header; final stored block
    zlib.extend_from_slice(&len.to_le_bytes());
    zlib.extend_from_slice(&(!len).to_le_bytes());
    zlib.extend_from_slice(&row);
    zlib.extend_from_slice(&adler32(&row).to_be_bytes());
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(png_chunk(b"IHDR", &ihdr));
    png.extend(png_chunk(b"IDAT", &zlib));
    png.extend(png_chunk(b"IEND", &[]));
    png
}

#[test]
fn run_json_reports_text_ids_and_every_timing_on_every_checkpoint() {
    for name in CHECKPOINTS {
        let answer = run_json(&checkpoint(name), &["--temperature", "0"]);
        assert!(answer["text"].is_string(), "{name}: {answer}");
        let ids = token_ids(&answer);
        assert!(!ids.is_empty() && ids.len() <= 8, "{name}: {answer}");
        let prompt_tokens = answer["prompt_tokens"].as_u64().unwrap_or(0);
        assert!(prompt_tokens > 0, "{name}: {answer}");
        for key in [
            "load_ms",
            "preprocess_ms",
            "vision_ms",
            "prefill_ms",
            "decode_ms",
            "decode_tokens_per_s",
        ] {
            let v = answer["timings"][key].as_f64();
            assert!(
                v.is_some_and(|v| v.is_finite() && v >= 0.0),
                "{name}: timings.{key} in {answer}"
            );
        }
    }
}

#[test]
fn greedy_run_gives_the_same_ids_twice() {
    for name in CHECKPOINTS {
        let a = run_json(&checkpoint(name), &["--temperature", "0"]);
        let b = run_json(&checkpoint(name), &["--temperature", "0"]);
        assert_eq!(token_ids(&a), token_ids(&b), "{name}");
    }
}

/// `run --json --logprobs 3`: per answer token, its log-probability and the three most
/// likely at its place, best first; greedy picks the first of them, so its log-probability
/// is that one's. Sampled at a high temperature, the log-probabilities are still the
/// model's (not the tempered distribution's): the same three alternatives as greedy's at the
/// first token. Without --json the flag is refused.
#[test]
fn run_reports_each_tokens_log_probability_and_alternatives() {
    let model = checkpoint("llava-v1.5");
    let greedy = run_json(&model, &["--temperature", "0", "--logprobs", "3"]);
    let ids = token_ids(&greedy);
    let steps = greedy["logprobs"].as_array().unwrap();
    assert_eq!(steps.len(), ids.len());
    for (t, &id) in steps.iter().zip(&ids) {
        assert_eq!(t["id"].as_u64(), Some(id));
        let top = t["top"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        let lp: Vec<f64> = top.iter().map(|c| c["logprob"].as_f64().unwrap()).collect();
        assert!(lp.windows(2).all(|w| w[0] >= w[1]) && lp[0] <= 0.0, "{t}");
        assert_eq!(top[0]["id"].as_u64(), Some(id), "{t}");
        assert_eq!(t["logprob"].as_f64(), Some(lp[0]));
    }
    let hot = run_json(&model, &["--temperature", "1.5", "--logprobs", "3"]);
    assert_eq!(hot["logprobs"][0]["top"], steps[0]["top"]);
    let plain = run_json(&model, &["--temperature", "0"]);
    assert!(plain["logprobs"].is_null());
    let o = kollava(&[
        &"run",
        &"--model",
        &model,
        &"--query",
        &"hi",
        &"--logprobs",
        &"2",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--json"), "{}", stderr(&o));
}

#[test]
fn seeded_sampling_gives_the_same_ids_twice() {
    let args = ["--temperature", "0.8", "--seed", "5"];
    for name in CHECKPOINTS {
        let a = run_json(&checkpoint(name), &args);
        let b = run_json(&checkpoint(name), &args);
        assert_eq!(token_ids(&a), token_ids(&b), "{name}");
    }
}

#[test]
fn missing_model_dir_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-model");
    let o = kollava(&[&"run", &"-m", &missing, &"-q", &"hi"]);
    assert_one_line_error(&o, &[&missing.display().to_string(), "does not exist"]);
}

#[test]
fn model_path_that_is_a_file_is_refused() {
    let file = checkpoint("llava-v1.5").join("config.json");
    let o = kollava(&[&"run", &"-m", &file, &"-q", &"hi"]);
    assert_one_line_error(&o, &[&file.display().to_string(), "is a file"]);
}

#[test]
fn missing_shard_is_named_with_its_index() {
    let s = Scratch::new("llava-v1.5");
    let (_, shard) = indexed_tensor(&s.ckpt, "up_proj.weight");
    std::fs::remove_file(s.file(&shard)).unwrap();
    let o = kollava(&[&"run", &"-m", &s.ckpt, &"-q", &"hi"]);
    assert_one_line_error(&o, &[&shard, "model.safetensors.index.json", "missing"]);
}

#[test]
fn tensor_missing_from_its_shard_names_tensor_and_shard() {
    let s = Scratch::new("llava-v1.5");
    let (key, shard) = indexed_tensor(&s.ckpt, "up_proj.weight");
    edit_safetensors(&s.file(&shard), |t| {
        t.remove(&key)
            .expect("the index is right about the fixture");
    });
    let o = kollava(&[&"run", &"-m", &s.ckpt, &"-q", &"hi"]);
    assert_one_line_error(&o, &[&key, &shard]);
}

#[test]
fn tensor_missing_from_the_checkpoint_is_named_without_a_backtrace() {
    let s = Scratch::new("llava-v1.5");
    let (key, shard) = indexed_tensor(&s.ckpt, "up_proj.weight");
    edit_safetensors(&s.file(&shard), |t| {
        t.remove(&key);
    });
    edit_json(&s.file("model.safetensors.index.json"), |j| {
        j["weight_map"].as_object_mut().unwrap().remove(&key);
    });
    let o = kollava(&[&"run", &"-m", &s.ckpt, &"-q", &"hi"]);
    assert_one_line_error(&o, &[&key, &s.ckpt.display().to_string()]);
}

#[test]
fn tensor_of_the_wrong_shape_shows_both_shapes_without_a_backtrace() {
    let s = Scratch::new("llava-v1.5");
    let (key, shard) = indexed_tensor(&s.ckpt, "up_proj.weight");
    let (mut want, mut got) = (Vec::new(), Vec::new());
    edit_safetensors(&s.file(&shard), |t| {
        let w = &t[&key];
        want = w.dims().to_vec();
        let short = w.narrow(0, 0, want[0] - 1).unwrap();
        got = short.dims().to_vec();
        t.insert(key.clone(), short);
    });
    let o = kollava(&[&"run", &"-m", &s.ckpt, &"-q", &"hi"]);
    assert_one_line_error(&o, &[&key, &format!("{want:?}"), &format!("{got:?}")]);
}

#[test]
fn unknown_architecture_is_refused_listing_what_was_found() {
    let s = Scratch::new("llava-v1.5");
    edit_json(&s.file("config.json"), |c| {
        c["architectures"] = serde_json::json!(["LlavaQwenForCausalLM"]);
        c["model_type"] = serde_json::json!("llava_qwen");
    });
    let o = kollava(&[&"run", &"-m", &s.ckpt, &"-q", &"hi"]);
    assert_one_line_error(&o, &["config.json", "LlavaQwenForCausalLM", "llava_qwen"]);
}

#[test]
fn unknown_projector_type_is_named() {
    let s = Scratch::new("llava-v1.5");
    edit_json(&s.file("config.json"), |c| {
        c["mm_projector_type"] = serde_json::json!("resampler");
    });
    let o = kollava(&[&"run", &"-m", &s.ckpt, &"-q", &"hi"]);
    assert_one_line_error(&o, &["config.json", "mm_projector_type", "resampler"]);
}

/// `kollava run` on llava-v1.5 with `image`.
fn run_with_image(image: &Path) -> Output {
    let dir = checkpoint("llava-v1.5");
    kollava(&[&"run", &"-m", &dir, &"-i", &image, &"-q", &QUERY])
}

#[test]
fn missing_image_is_named_and_its_reason_printed_once() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-image.png");
    let line = assert_one_line_error(&run_with_image(&missing), &[&missing.display().to_string()]);
    assert_eq!(line.matches("os error").count(), 1, "{line}");
}

#[test]
fn text_file_as_image_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let notes = write_file(&tmp, "notes.txt", b"not a picture\n");
    assert_one_line_error(
        &run_with_image(&notes),
        &[&notes.display().to_string(), "not a readable image"],
    );
}

#[test]
fn truncated_png_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let png = write_file(&tmp, "cut.png", &first_half("wide_rgb.png"));
    assert_one_line_error(
        &run_with_image(&png),
        &[&png.display().to_string(), "not a readable image"],
    );
}

#[test]
fn truncated_jpeg_is_refused_not_padded_with_grey() {
    let tmp = tempfile::tempdir().unwrap();
    let jpg = write_file(&tmp, "cut.jpg", &first_half("photo.jpg"));
    assert_one_line_error(
        &run_with_image(&jpg),
        &[&jpg.display().to_string(), "truncated"],
    );
}

#[test]
fn decompression_bomb_is_refused_by_its_header() {
    let tmp = tempfile::tempdir().unwrap();
    let bomb = write_file(&tmp, "bomb.png", &png_claiming(20_000, 20_000));
    assert_one_line_error(
        &run_with_image(&bomb),
        &[&bomb.display().to_string(), "20000x20000", "limit"],
    );
}

#[test]
fn blank_query_is_refused() {
    let dir = checkpoint("llava-v1.5");
    let o = kollava(&[&"run", &"-m", &dir, &"--query", &"  "]);
    assert_one_line_error(&o, &["query", "empty"]);
}

#[test]
fn prompt_longer_than_the_context_says_by_how_much() {
    let prompt_tokens = run_json(&checkpoint("llava-v1.5"), &["--temperature", "0"])
        ["prompt_tokens"]
        .as_u64()
        .expect("prompt_tokens");
    let context = 20;
    assert!(
        prompt_tokens >= context,
        "the fixture prompt fits in {context}"
    );
    let s = Scratch::new("llava-v1.5");
    edit_json(&s.file("config.json"), |c| {
        for key in ["max_position_embeddings", "max_sequence_length"] {
            if c.get(key).is_some() {
                c[key] = Value::from(context);
            }
        }
    });
    let img = image("wide_rgb.png");
    let o = kollava(&[&"run", &"-m", &s.ckpt, &"-i", &img, &"-q", &QUERY]);
    assert_one_line_error(
        &o,
        &[
            &format!("{prompt_tokens} tokens"),
            &format!("context of {context}"),
            &format!("at least {} tokens", prompt_tokens + 1 - context),
        ],
    );
}

#[test]
fn query_file_with_invalid_utf8_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let file = write_file(&tmp, "question.txt", &[0xff, 0xfe, 0x41]);
    let dir = checkpoint("llava-v1.5");
    let o = kollava(&[&"run", &"-m", &dir, &"--query-file", &file]);
    assert_one_line_error(&o, &[&file.display().to_string(), "UTF-8"]);
}

/// A usage error before anything loads, listing the templates from their table.
#[test]
fn unknown_conv_mode_lists_the_known_ones() {
    let dir = checkpoint("llava-v1.5");
    let o = kollava(&[&"run", &"-m", &dir, &"-q", &"hi", &"--conv-mode", &"nope"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for needle in ["--conv-mode", "'nope'", "vicuna_v1", "llava_v1", "mpt"] {
        assert!(err.contains(needle), "{needle} missing from {err}");
    }
}

#[test]
fn top_p_above_one_is_a_usage_error() {
    let dir = checkpoint("llava-v1.5");
    let o = kollava(&[&"run", &"-m", &dir, &"-q", &"hi", &"--top-p", &"1.5"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("--top-p") && err.contains("1.5") && err.contains("(0, 1]"),
        "{err}"
    );
}

/// Serves `body` once on a loopback port; returns the URL.
fn serve_once(body: Vec<u8>) -> (String, std::thread::JoinHandle<()>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/image.png", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        if let Ok((mut stream, _)) = listener.accept() {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let head = format!("HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    (url, handle)
}

#[test]
fn an_image_url_gives_the_same_answer_as_the_file() {
    let ckpt = checkpoint("llava-v1.5");
    let file = image("wide_rgb.png");
    let (url, server) = serve_once(std::fs::read(&file).unwrap());
    let run = |img: &dyn AsRef<OsStr>| {
        let mut cmd = command(&[
            &"run",
            &"--model",
            &ckpt,
            &"--image",
            img,
            &"--query",
            &QUERY,
            &"--temperature",
            &"0",
            &"--max-new-tokens",
            &"6",
            &"--json",
        ]);
        for var in [
            "HTTP_PROXY",
            "http_proxy",
            "HTTPS_PROXY",
            "https_proxy",
            "ALL_PROXY",
            "all_proxy",
        ] {
            cmd.env_remove(var);
        }
        let o = cmd.stdin(Stdio::null()).output().unwrap();
        assert_success(&o);
        token_ids(&serde_json::from_str(stdout(&o).trim()).unwrap())
    };
    let from_url = run(&url);
    server.join().unwrap();
    assert_eq!(from_url, run(&file));
}

#[test]
fn f16_weights_give_the_same_greedy_start_as_f32() {
    // f16 is opt-in (memory and decode speed); the first tokens must not change on any
    // family, and overall most positions agree (random tiny models have near-ties).
    let (mut same, mut total) = (0, 0);
    for name in ["llava-v0", "llava-v1.5", "llava-hf", "llava-mistral"] {
        let ckpt = checkpoint(name);
        let f32_ids = token_ids(&run_json(&ckpt, &["--temperature", "0", "--dtype", "f32"]));
        let f16_ids = token_ids(&run_json(&ckpt, &["--temperature", "0", "--dtype", "f16"]));
        assert_eq!(f32_ids[..4], f16_ids[..4], "{name}");
        same += f32_ids.iter().zip(&f16_ids).filter(|(a, b)| a == b).count();
        total += f32_ids.len();
    }
    assert!(same * 4 >= total * 3, "{same}/{total} positions agree");
}

/// `kollava run` without --model uses the demo model, and the README's example answers.
#[test]
fn run_without_a_model_uses_the_demo() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    let example = readme
        .lines()
        .find(|l| l.contains("kollava run") || l.contains("-- run"))
        .unwrap();
    assert!(!example.contains("--model"), "{example}");
    let o = kollava(&[
        &"run",
        &"--image",
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/shapes.png"),
        &"--query",
        &"도형은 무슨 색인가요?",
        &"--temperature",
        &"0",
    ]);
    assert_success(&o);
    let expected = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/shapes.json"),
    )
    .unwrap();
    let expected: Value = serde_json::from_str(&expected).unwrap();
    assert_eq!(
        stdout(&o).trim(),
        expected["도형은 무슨 색인가요?"].as_str().unwrap()
    );
}

/// `run --schema FILE` answers in JSON valid under the schema (Korean keys and enum values,
/// bounds, nested objects), greedy or sampled, where the same question without it gets
/// prose; `--schema object` starts an object; a schema that does not compile or cannot be
/// read is a one-line error.
#[test]
fn run_answers_in_json_under_a_schema() {
    let dir = tempfile::tempdir().unwrap();
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "도형": {"type": "array", "maxItems": 4, "items": {
                "type": "object",
                "properties": {
                    "이름": {"type": "string", "maxLength": 10},
                    "색깔": {"enum": ["빨강", "파랑", "초록", "노랑", "검정"]},
                },
                "required": ["이름", "색깔"],
                "additionalProperties": false,
            }},
            "개수": {"type": "integer", "minimum": 0, "maximum": 20},
        },
        "required": ["도형", "개수"],
        "additionalProperties": false,
    });
    let path = dir.path().join("schema.json");
    std::fs::write(&path, schema.to_string()).unwrap();
    let image = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/shapes.png");
    let ask = |extra: &[&dyn AsRef<OsStr>]| {
        let mut args: Vec<&dyn AsRef<OsStr>> = vec![
            &"run",
            &"--image",
            &image,
            &"--query",
            &"이 그림의 도형을 설명해 주세요.",
        ];
        args.extend_from_slice(extra);
        kollava(&args)
    };
    let prose = ask(&[&"--temperature", &"0"]);
    assert_success(&prose);
    assert!(serde_json::from_str::<Value>(stdout(&prose).trim()).is_err());
    for (temperature, seed) in [("0", "0"), ("1.0", "1"), ("1.0", "2")] {
        let o = ask(&[
            &"--schema",
            &path,
            &"--max-new-tokens",
            &"300",
            &"--temperature",
            &temperature,
            &"--seed",
            &seed,
        ]);
        assert_success(&o);
        let v: Value = serde_json::from_str(stdout(&o).trim())
            .unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)));
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 2, "{v}");
        let n = v["개수"].as_i64().unwrap();
        assert!((0..=20).contains(&n), "{v}");
        let shapes = v["도형"].as_array().unwrap();
        assert!(shapes.len() <= 4, "{v}");
        for s in shapes {
            assert_eq!(s.as_object().unwrap().len(), 2, "{v}");
            assert!(s["이름"].as_str().unwrap().chars().count() <= 10, "{v}");
            let colour = s["색깔"].as_str().unwrap();
            assert!(
                ["빨강", "파랑", "초록", "노랑", "검정"].contains(&colour),
                "{v}"
            );
        }
    }
    let o = ask(&[&"--schema", &"object", &"--max-new-tokens", &"20"]);
    assert_success(&o);
    assert!(stdout(&o).starts_with('{'), "{}", stdout(&o));

    std::fs::write(&path, r##"{"properties": {"a": {"$ref": "#/nowhere"}}}"##).unwrap();
    let o = ask(&[&"--schema", &path]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("--schema") && err.contains("nowhere"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let o = ask(&[&"--schema", &dir.path().join("missing.json")]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("missing.json"), "{}", stderr(&o));
}
