//! `kollava serve` and the controller against real clients (the `openai` package,
//! Chromium), workers coming and going, shutdown.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use crate::common::*;

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
