//! What every command's tests share: running the binary, reading its output and errors,
//! writable fixture copies to break, the Python consumers and servers the tests start.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use candle_core::{Device, Tensor};
use kollava_testkit::fixtures_dir;
use serde_json::{json, Value};

pub(crate) const QUERY: &str = "이 이미지에 무엇이 있나요?";

pub(crate) fn command(args: &[&dyn AsRef<OsStr>]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kollava"));
    cmd.args(args.iter().map(|a| a.as_ref()))
        // Developers often have it set, and candle then appends a backtrace to its errors:
        // that must not leak into the one-line message.
        .env("RUST_BACKTRACE", "1")
        .env_remove("RUST_LOG");
    cmd
}

/// `kollava ARGS` with stdin closed.
pub(crate) fn kollava(args: &[&dyn AsRef<OsStr>]) -> Output {
    command(args)
        .stdin(Stdio::null())
        .output()
        .expect("kollava runs")
}

pub(crate) fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
pub(crate) fn assert_success(o: &Output) {
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
pub(crate) fn assert_one_line_error(o: &Output, needles: &[&str]) -> String {
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
pub(crate) fn run_json(model: &Path, extra: &[&str]) -> Value {
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

pub(crate) fn token_ids(answer: &Value) -> Vec<u64> {
    answer["token_ids"]
        .as_array()
        .expect("token_ids is an array")
        .iter()
        .map(|v| v.as_u64().expect("ids are non-negative integers"))
        .collect()
}

/// `(passed, failed, skipped)` from `verify`'s closing line.
pub(crate) fn verify_summary(out: &str) -> (usize, usize, usize) {
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

pub(crate) fn checkpoint(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

pub(crate) fn image(name: &str) -> PathBuf {
    fixtures_dir().join("images").join(name)
}

/// A writable copy of the fixtures folder with one checkpoint and everything its relative
/// paths point at (`images/`, the `../clip-…` towers): every folder except the other
/// checkpoints.
pub(crate) struct Scratch {
    pub(crate) _tmp: tempfile::TempDir,
    pub(crate) ckpt: PathBuf,
}

impl Scratch {
    pub(crate) fn new(name: &str) -> Scratch {
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

    pub(crate) fn file(&self, name: &str) -> PathBuf {
        self.ckpt.join(name)
    }
}

/// `name` with `bytes` in `dir`.
pub(crate) fn write_file(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).expect("write temp file");
    path
}

pub(crate) fn copy_dir(from: &Path, to: &Path) {
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

pub(crate) fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let text = std::fs::read_to_string(path).expect("read json");
    let mut json: Value = serde_json::from_str(&text).expect("parse json");
    edit(&mut json);
    std::fs::write(path, serde_json::to_string_pretty(&json).unwrap()).expect("write json");
}

pub(crate) fn edit_safetensors(path: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu).expect("load tensors");
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, path).expect("save tensors");
}

pub(crate) fn crate_fixture_images() -> PathBuf {
    image("wide_rgb.png").parent().unwrap().to_path_buf()
}

/// A few conversations over the fixture images (and one without an image).
pub(crate) fn finetune_data(tmp: &tempfile::TempDir) -> PathBuf {
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

pub(crate) fn finetune_args(
    data: &Path,
    images: &Path,
    out: &Path,
    steps: &str,
) -> Vec<std::ffi::OsString> {
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

pub(crate) fn as_args(v: &[std::ffi::OsString]) -> Vec<&dyn AsRef<OsStr>> {
    v.iter().map(|a| a as &dyn AsRef<OsStr>).collect()
}

pub(crate) const FINETUNE_MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/llava-v1.5"
);

/// Starts `kollava ARGS`, which prints its `http://…` address on stderr; returns the
/// child, that base URL, and the rest of its stderr (drained, so the child never blocks on
/// a full pipe) once it exits.
pub(crate) fn spawn_listening(
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
pub(crate) fn serve_demo() -> (std::process::Child, String) {
    let (child, url, _) = spawn_listening(&[&"serve", &"--port", &"0"]);
    (child, url)
}

/// The Python interpreter with the client libraries, set up by scripts/test.sh. Outside it
/// the test is skipped, loudly, unless KOLLAVA_REQUIRE_CLIENT_TESTS is set (CI sets it).
pub(crate) fn client_python() -> Option<PathBuf> {
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

pub(crate) fn post_json(url: &str, body: Value) -> (u16, Vec<u8>) {
    let mut r = ureq::post(url)
        .config()
        .http_status_as_error(false)
        .build()
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .unwrap();
    (r.status().as_u16(), r.body_mut().read_to_vec().unwrap())
}
