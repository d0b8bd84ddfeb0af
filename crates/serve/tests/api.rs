//! The OpenAI-compatible API driven without a socket (`oneshot`), on a fixture checkpoint.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine as _;
use http_body_util::BodyExt;
use kollava_generate::{AnswerOptions, SamplingParams, Session, SessionOptions};
use kollava_inputs::template::{Conversation, Role};
use kollava_serve::{app, AppState, EngineHandle};
use serde_json::{json, Value};
use tower::ServiceExt;

fn session() -> Session {
    session_of("llava-v1.5")
}

fn session_of(family: &str) -> Session {
    let dir = kollava_testkit::checkpoint_dir(family);
    Session::load(&SessionOptions {
        model: dir.to_str().unwrap().to_string(),
        vision_tower: None,
        conv_mode: None,
        aspect: None,
        dtype: Some(candle_core::DType::F32),
        projector: None,
        mmproj: None,
        ..Default::default()
    })
    .unwrap()
}

fn state() -> AppState {
    AppState::new(EngineHandle::spawn(session(), 32, 16), None)
}

fn data_url() -> String {
    let bytes = std::fs::read(kollava_testkit::fixtures_dir().join("images/wide_rgb.png")).unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

const QUESTION: &str = "이 이미지에 무엇이 있나요?";

/// QUESTION about one image, in `s`'s template, the assistant's turn open.
fn question(s: &Session) -> Conversation {
    let mut conv = Conversation::new(s.template.clone());
    conv.push(Role::User, Some(s.user_text(QUESTION, 1)));
    conv.push(Role::Assistant, None);
    conv
}

/// The fixtures' wide test image.
fn wide_image() -> kollava_inputs::image::RgbImage {
    kollava_inputs::image::open(&kollava_testkit::fixtures_dir().join("images/wide_rgb.png"))
        .unwrap()
}

/// Greedy answers of at most `max_new_tokens`.
fn greedy(max_new_tokens: usize) -> AnswerOptions {
    AnswerOptions {
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        max_new_tokens,
        stop: Vec::new(),
        aspect: None,
        constraint: None,
    }
}

fn request(body: Value) -> Request<Body> {
    Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn with_image(stream: bool) -> Value {
    json!({
        "model": "llava-v1.5",
        "stream": stream,
        "temperature": 0,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": QUESTION},
            {"type": "image_url", "image_url": {"url": data_url()}},
        ]}],
    })
}

async fn send(state: &AppState, req: Request<Body>) -> (StatusCode, String) {
    let resp = app(state.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_completion_equals_the_cli_path_and_streaming_adds_up() {
    let state = state();
    let (status, body) = send(&state, request(with_image(false))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(v["usage"]["completion_tokens"], 8);
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 9);

    // The same request through the library path `kollava run` uses.
    let s = session();
    let conv = question(&s);
    let img = wide_image();
    let opts = greedy(8);
    let direct = s.answer(&conv, &[img], &opts, &mut |_| true).unwrap();
    assert_eq!(content, direct.generation.text);

    let (status, body) = send(&state, request(with_image(true))).await;
    assert_eq!(status, StatusCode::OK);
    let mut streamed = String::new();
    let mut finish = None;
    let data: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{body}");
    for d in &data[..data.len() - 1] {
        let chunk: Value = serde_json::from_str(d).unwrap();
        if let Some(t) = chunk["choices"][0]["delta"]["content"].as_str() {
            streamed.push_str(t);
        }
        if let Some(f) = chunk["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    assert_eq!(streamed.trim(), content);
    assert_eq!(finish.as_deref(), Some("length"));
}

/// Every family (LLaVA-MPT's ChatML template and stop rule among them) answers through the
/// API as through the library path `kollava run` takes, up to its own stop.
#[tokio::test(flavor = "multi_thread")]
async fn every_family_answers_through_the_api_as_through_the_cli_path() {
    let img = wide_image();
    for family in kollava_testkit::CHECKPOINTS {
        let state = AppState::new(EngineHandle::spawn(session_of(family), 32, 16), None);
        let mut body = with_image(false);
        body["model"] = json!(family);
        body["max_tokens"] = json!(24);
        let (status, text) = send(&state, request(body)).await;
        assert_eq!(status, StatusCode::OK, "{family}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let s = session_of(family);
        let conv = question(&s);
        let opts = greedy(24);
        let direct = s
            .answer(&conv, std::slice::from_ref(&img), &opts, &mut |_| true)
            .unwrap();
        assert_eq!(
            v["choices"][0]["message"]["content"], direct.generation.text,
            "{family}"
        );
        assert_eq!(
            v["usage"]["completion_tokens"],
            direct.generation.ids.len(),
            "{family}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn models_lists_the_loaded_checkpoint() {
    let state = state();
    let (status, body) = send(
        &state,
        Request::get("/v1/models").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"][0]["id"], "llava-v1.5");
}

async fn assert_openai_error(
    state: &AppState,
    req: Request<Body>,
    status: StatusCode,
    needle: &str,
) {
    let (got, body) = send(state, req).await;
    assert_eq!(got, status, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains(needle), "{msg:?} does not mention {needle:?}");
    assert!(v["error"]["type"].is_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let state = state();
    let malformed = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from("{not json"))
        .unwrap();
    assert_openai_error(
        &state,
        malformed,
        StatusCode::BAD_REQUEST,
        "invalid request body",
    )
    .await;
    assert_openai_error(
        &state,
        request(json!({"model": "x"})),
        StatusCode::BAD_REQUEST,
        "messages",
    )
    .await;
    assert_openai_error(
        &state,
        request(json!({"messages": []})),
        StatusCode::BAD_REQUEST,
        "empty",
    )
    .await;
    let file_url = json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]});
    assert_openai_error(
        &state,
        request(file_url),
        StatusCode::BAD_REQUEST,
        "\"file\"",
    )
    .await;
    let not_image = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(b"hello")
    );
    let bad_image = json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": not_image}}]}]});
    assert_openai_error(
        &state,
        request(bad_image),
        StatusCode::BAD_REQUEST,
        "not a readable image",
    )
    .await;
    let bad_temp = json!({"temperature": -1, "messages": [{"role": "user", "content": "hi"}]});
    assert_openai_error(
        &state,
        request(bad_temp),
        StatusCode::BAD_REQUEST,
        "temperature",
    )
    .await;
    let huge = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(vec![b' '; kollava_serve::MAX_BODY_BYTES + 1]))
        .unwrap();
    assert_openai_error(
        &state,
        huge,
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid request body",
    )
    .await;
    // Still serving.
    let ok =
        json!({"temperature": 0, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]});
    let (status, body) = send(&state, request(ok)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn llava_worker_protocol_streams_nul_delimited_prompt_plus_answer() {
    let state = state();
    let s = session();
    let conv = question(&s);
    let prompt = conv.prompt();
    let image_b64 = data_url().split_once(',').unwrap().1.to_string();
    let body = json!({"model": "llava-v1.5", "prompt": prompt, "temperature": 0.0, "max_new_tokens": 8, "stop": "</s>", "images": [image_b64]});
    let req = Request::post("/worker_generate_stream")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let (status, text) = send(&state, req).await;
    assert_eq!(status, StatusCode::OK);
    let chunks: Vec<Value> = text
        .split('\0')
        .filter(|c| !c.is_empty())
        .map(|c| serde_json::from_str(c).unwrap())
        .collect();
    assert!(chunks.len() >= 2, "{text:?}");
    for c in &chunks {
        assert_eq!(c["error_code"], 0);
        assert!(c["text"].as_str().unwrap().starts_with(&prompt));
    }
    // The final chunk is the prompt plus the same answer the OpenAI route gives.
    let (_, body) = send(&state, request(with_image(false))).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(
        chunks.last().unwrap()["text"].as_str().unwrap(),
        format!("{prompt}{answer}")
    );

    let status_req = Request::post("/worker_get_status")
        .body(Body::empty())
        .unwrap();
    let (status, body) = send(&state, status_req).await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["model_names"][0], "llava-v1.5");
    assert_eq!(v["speed"], 1);
    assert_eq!(v["queue_length"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chat_page_is_served_offline_and_uses_the_api() {
    let state = state();
    let (status, html) = send(&state, Request::get("/").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("/v1/chat/completions") && html.contains("image_url"));
    assert!(
        html.contains("다시 생성") && html.contains("Regenerate"),
        "Korean and English labels"
    );
    assert!(
        !html.contains("https://"),
        "no external assets: the page must work offline"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sixteen_simultaneous_greedy_requests_each_equal_the_request_alone() {
    let state = state();
    // Prompts of different lengths and budgets, so that requests join and leave the batch
    // at different steps.
    let ask = |i: usize| {
        json!({"temperature": 0, "max_tokens": 16 + 4 * (i % 4),
        "messages": [{"role": "user", "content": format!("질문 {}{}", i % 4, " 그리고".repeat(i % 4))}]})
    };
    let mut alone = Vec::new();
    for i in 0..4 {
        let (status, body) = send(&state, request(ask(i))).await;
        assert_eq!(status, StatusCode::OK);
        let v: Value = serde_json::from_str(&body).unwrap();
        alone.push(
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let state = state.clone();
            tokio::spawn(async move { (i, send(&state, request(ask(i))).await) })
        })
        .collect();
    for h in handles {
        let (i, (status, body)) = h.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v["choices"][0]["message"]["content"].as_str().unwrap(),
            alone[i % 4],
            "request {i}"
        );
    }
    let (_, metrics) = send(
        &state,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    let peak: usize = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kollava_peak_running_sequences "))
        .and_then(|v| v.parse().ok())
        .expect("metrics has the peak batch size");
    assert!(peak > 1, "the requests were decoded together:\n{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn api_key_guards_the_api_and_metrics_count_requests() {
    let state = AppState::new(EngineHandle::spawn(session(), 4, 16), Some("s3cret".into()));
    let ok = || json!({"temperature": 0, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]});
    assert_openai_error(&state, request(ok()), StatusCode::UNAUTHORIZED, "API key").await;
    let mut wrong = request(ok());
    wrong
        .headers_mut()
        .insert("authorization", "Bearer nope".parse().unwrap());
    assert_openai_error(&state, wrong, StatusCode::UNAUTHORIZED, "API key").await;
    let mut right = request(ok());
    right
        .headers_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    let (status, body) = send(&state, right).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The page, health and metrics stay open.
    let (status, metrics) = send(
        &state,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(metrics.contains("kollava_requests_total 1"), "{metrics}");
    assert!(
        metrics.contains("kollava_generated_tokens_total 2"),
        "{metrics}"
    );
    assert!(metrics.contains("kollava_queue_length 0"), "{metrics}");
}

/// `/api/log` (the chat page's conversation and vote log): one line per event in the day's
/// file, the image saved once by content hash; unknown types are 400; without --log-dir
/// nothing is kept.
#[tokio::test(flavor = "multi_thread")]
async fn page_events_are_logged_with_images_by_hash() {
    let dir = tempfile::tempdir().unwrap();
    let logging = state().with_log_dir(Some(dir.path().to_path_buf()));
    let log = |kind: &str| {
        Request::post("/api/log")
            .header("content-type", "application/json")
            .body(Body::from(
                json!({"type": kind, "model": "llava-v1.5", "messages": [
                    {"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": data_url()}}]},
                    {"role": "assistant", "content": "원입니다."}]})
                .to_string(),
            ))
            .unwrap()
    };
    for kind in ["chat", "upvote", "flag"] {
        let (status, body) = send(&logging, log(kind)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap()["logged"],
            true
        );
    }
    let (status, _) = send(&logging, log("like")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with("-conv.json"))
        .collect();
    assert_eq!(files.len(), 1);
    let lines: Vec<Value> = std::fs::read_to_string(&files[0])
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = lines.iter().map(|l| l["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["chat", "upvote", "flag"]);
    let image = lines[0]["messages"][0]["content"][1]["image_url"]["url"]
        .as_str()
        .unwrap();
    assert!(
        image.starts_with("images/") && image.ends_with(".png"),
        "{image}"
    );
    let saved = std::fs::read(dir.path().join(image)).unwrap();
    let original =
        std::fs::read(kollava_testkit::fixtures_dir().join("images/wide_rgb.png")).unwrap();
    assert_eq!(saved, original);
    assert_eq!(
        std::fs::read_dir(dir.path().join("images"))
            .unwrap()
            .count(),
        1,
        "stored once"
    );
    // Without a log directory nothing is kept.
    let (status, body) = send(&state(), log("upvote")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["logged"],
        false
    );
}

/// `image_aspect` (the chat page's Crop/Resize/Pad): each request is answered with its own
/// image mode, as the library answers with that mode; an unknown mode is a 400.
#[tokio::test(flavor = "multi_thread")]
async fn each_request_fits_its_image_by_its_own_mode() {
    use kollava_inputs::image::AspectMode;
    let state = state();
    let s = session();
    let img = wide_image();
    let conv = question(&s);
    // The modes really differ on this wide image: the image features are not the same.
    let mut t = Default::default();
    let mut embeds = |a| {
        s.embed_prompt_as(&conv.prompt(), std::slice::from_ref(&img), a, &mut t)
            .unwrap()
            .embeds
    };
    let (pad, crop) = (embeds(AspectMode::Pad), embeds(AspectMode::Crop));
    assert!(kollava_testkit::max_abs_diff_tensors(&pad, &crop) > 1e-3);
    for (name, mode) in [
        ("pad", AspectMode::Pad),
        ("Crop", AspectMode::Crop),
        ("resize", AspectMode::Resize),
    ] {
        let mut body = with_image(false);
        body["image_aspect"] = json!(name);
        let (status, body) = send(&state, request(body)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let opts = AnswerOptions {
            aspect: Some(mode),
            constraint: None,
            ..greedy(8)
        };
        let direct = s
            .answer(&conv, std::slice::from_ref(&img), &opts, &mut |_| true)
            .unwrap();
        assert_eq!(
            v["choices"][0]["message"]["content"], direct.generation.text,
            "{name}"
        );
    }
    let mut body = with_image(false);
    body["image_aspect"] = json!("squash");
    let (status, body) = send(&state, request(body)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("squash"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_answers_503_with_retry_after_and_the_rest_still_complete() {
    // One request decodes at a time and one may wait: of four sent together while the
    // first decodes a long answer, at least one finds the queue full.
    let state = AppState::new(EngineHandle::spawn(session(), 1, 1), None);
    let long = json!({"temperature": 0, "max_tokens": 200, "messages": [{"role": "user", "content": "길게"}]});
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (state, body) = (state.clone(), long.clone());
            tokio::spawn(async move { app(state).oneshot(request(body)).await.unwrap() })
        })
        .collect();
    let (mut ok, mut busy) = (0, 0);
    for h in handles {
        let resp = h.await.unwrap();
        match resp.status() {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                busy += 1;
                assert_eq!(resp.headers()["retry-after"], "1");
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                let v: Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(v["error"]["type"], "server_overloaded");
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(ok >= 1 && busy >= 1, "{ok} answered, {busy} refused");
    assert_eq!(state.engine.queue_length(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_headers_only_for_the_configured_origin() {
    let preflight = |origin: &str| {
        Request::options("/v1/chat/completions")
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .body(Body::empty())
            .unwrap()
    };
    let closed = state();
    let resp = app(closed)
        .oneshot(preflight("https://example.org"))
        .await
        .unwrap();
    assert!(resp.headers().get("access-control-allow-origin").is_none());

    let open = state().with_access(false, Some("https://example.org".into()));
    let resp = app(open.clone())
        .oneshot(preflight("https://example.org"))
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://example.org"
    );
    // Another site is not named back, so its browser refuses the response.
    let resp = app(open)
        .oneshot(preflight("https://evil.example"))
        .await
        .unwrap();
    assert_ne!(
        resp.headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some("https://evil.example")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_images_only_with_allow_remote_images_and_never_local_paths() {
    // A local web server with the fixture image.
    let png = std::fs::read(kollava_testkit::fixtures_dir().join("images/wide_rgb.png")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/wide.png", listener.local_addr().unwrap());
    let files = axum::Router::new().route(
        "/wide.png",
        axum::routing::get(move || async move { png.clone() }),
    );
    tokio::spawn(async move { axum::serve(listener, files).await.unwrap() });

    let ask = |url: &str| {
        json!({"temperature": 0, "max_tokens": 8, "messages": [{"role": "user", "content": [
            {"type": "text", "text": QUESTION},
            {"type": "image_url", "image_url": {"url": url}},
        ]}]})
    };
    let closed = state();
    assert_openai_error(
        &closed,
        request(ask(&url)),
        StatusCode::BAD_REQUEST,
        "--allow-remote-images",
    )
    .await;

    let open = state().with_access(true, None);
    let (status, body) = send(&open, request(ask(&url))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let remote: Value = serde_json::from_str(&body).unwrap();
    let (_, body) = send(&open, request(with_image(false))).await;
    let inline: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        remote["choices"][0]["message"]["content"], inline["choices"][0]["message"]["content"],
        "the fetched image is the data URL's image"
    );
    let missing = url.replace("wide.png", "missing.png");
    assert_openai_error(
        &open,
        request(ask(&missing)),
        StatusCode::BAD_REQUEST,
        "cannot fetch",
    )
    .await;
    let path = kollava_testkit::fixtures_dir().join("images/wide_rgb.png");
    let file_url = format!("file://{}", path.display());
    assert_openai_error(
        &open,
        request(ask(&file_url)),
        StatusCode::BAD_REQUEST,
        "local paths are never read",
    )
    .await;
    // The engine measured the time to first token of the answered requests.
    let (_, metrics) = send(&open, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    assert!(
        metrics.contains("kollava_time_to_first_token_seconds_count 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_disconnects_mid_stream_is_dropped_and_the_server_keeps_serving() {
    let state = state();
    let long = json!({"stream": true, "temperature": 0, "max_tokens": 4000,
        "messages": [{"role": "user", "content": "아주 길게 답하세요"}]});
    let resp = app(state.clone()).oneshot(request(long)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    // The first event, then the client goes away.
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    drop(body);
    let mut cancelled = 0;
    for _ in 0..300 {
        cancelled = state
            .engine
            .stats
            .cancelled
            .load(std::sync::atomic::Ordering::Relaxed);
        if cancelled > 0 && state.engine.queue_length() == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        cancelled, 1,
        "the abandoned request was cancelled, not run to its end"
    );
    assert_eq!(state.engine.queue_length(), 0);
    let (status, body) = send(&state, request(with_image(false))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, metrics) = send(
        &state,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    assert!(
        metrics.contains("kollava_cancelled_requests_total 1"),
        "{metrics}"
    );
}

/// A request that declares a body over the limit gets 413 from its headers at once: the
/// body here never arrives, and reading it would wait forever.
#[tokio::test(flavor = "multi_thread")]
async fn a_declared_oversized_body_is_refused_before_it_is_read() {
    let state = state();
    let never = tokio_stream::pending::<Result<axum::body::Bytes, std::io::Error>>();
    let req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("content-length", (64u64 << 20).to_string())
        .body(Body::from_stream(never))
        .unwrap();
    let answer = tokio::time::timeout(std::time::Duration::from_secs(10), send(&state, req))
        .await
        .expect("answered without reading the body");
    assert_eq!(answer.0, StatusCode::PAYLOAD_TOO_LARGE, "{}", answer.1);
    let v: Value = serde_json::from_str(&answer.1).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("67108864 bytes"),
        "{v}"
    );
}

/// Once no request has come for a moment, the server stores the answer it gave (prefilled
/// once more) for the conversation's next turn, and says so in `/metrics`; the next turn
/// then reuses the answer's positions too.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_server_keeps_the_answer_for_the_next_turn() {
    let state = state();
    let first = with_image(false);
    let (status, body) = send(&state, request(first.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let first_prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    let answer = v["choices"][0]["message"]["content"].clone();
    let mut stored = String::new();
    for _ in 0..600 {
        let (_, metrics) = send(
            &state,
            Request::get("/metrics").body(Body::empty()).unwrap(),
        )
        .await;
        stored = metrics
            .lines()
            .find(|l| l.starts_with("kollava_answers_stored_total "))
            .unwrap_or_default()
            .to_string();
        if stored.ends_with(" 1") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(stored, "kollava_answers_stored_total 1");
    // The engine stored the answer's generated tokens after the prompt; the client sends
    // its text back, which this tokenizer splits into the same tokens at least at first.
    let mut follow = first;
    let messages = follow["messages"].as_array_mut().unwrap();
    messages.push(json!({"role": "assistant", "content": answer}));
    messages.push(json!({"role": "user", "content": "What colors are there?"}));
    let (status, body) = send(&state, request(follow)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached > first_prompt, "{cached} of {body}");
}

/// A follow-up sent with its history (as API clients send it) reuses the first request's
/// prompt: `usage` says how many prompt tokens came from the cache and `/metrics` counts
/// the hit. A message that brings an image to a history that has one starts the
/// conversation there (LLaVA's web UI does), said in a header, unless `--multi-image`.
#[tokio::test(flavor = "multi_thread")]
async fn follow_ups_reuse_the_history_and_a_new_image_starts_a_new_conversation() {
    let state = state();
    let first = with_image(false);
    let (status, body) = send(&state, request(first.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let answer = v["choices"][0]["message"]["content"].clone();
    let first_prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();

    let mut follow = first.clone();
    let messages = follow["messages"].as_array_mut().unwrap();
    messages.push(json!({"role": "assistant", "content": answer}));
    messages.push(json!({"role": "user", "content": "What colors are there?"}));
    let (status, body) = send(&state, request(follow.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached >= first_prompt - 2, "{body}");
    let (_, metrics) = send(
        &state,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    assert!(
        metrics.contains("kollava_prefix_cache_hits_total 1\n")
            && metrics.contains("kollava_image_cache_hits_total 1\n")
            && metrics.contains(&format!(
                "kollava_prefix_cache_reused_tokens_total {cached}\n"
            )),
        "{metrics}"
    );

    // The same conversation with an image in the last message too.
    let mut again = follow.clone();
    let last = again["messages"]
        .as_array_mut()
        .unwrap()
        .last_mut()
        .unwrap();
    *last = json!({"role": "user", "content": [
        {"type": "text", "text": QUESTION},
        {"type": "image_url", "image_url": {"url": data_url()}},
    ]});
    let resp = app(state.clone())
        .oneshot(request(again.clone()))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-kollava-new-conversation"], "2");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_str(std::str::from_utf8(&body).unwrap()).unwrap();
    // Answered as the last message alone.
    let (_, alone) = send(&state, request(with_image(false))).await;
    let alone: Value = serde_json::from_str(&alone).unwrap();
    assert_eq!(v["choices"][0]["message"], alone["choices"][0]["message"]);
    assert_eq!(v["usage"]["prompt_tokens"], alone["usage"]["prompt_tokens"]);

    let multi = state.clone().with_multi_image(true);
    let resp = app(multi.clone()).oneshot(request(again)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("x-kollava-new-conversation").is_none());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_str(std::str::from_utf8(&body).unwrap()).unwrap();
    // Both images (9 positions each) and the history between them.
    let alone_prompt = alone["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > alone_prompt + 9);
    let (_, models) = send(
        &multi,
        Request::get("/v1/models").body(Body::empty()).unwrap(),
    )
    .await;
    assert!(models.contains("\"multi_image\":true"), "{models}");
}

/// `logit_bias`, `presence_penalty` and `frequency_penalty` reach the sampler: a token
/// forced with +100 makes the answer, and out-of-range values, keys that are not token ids
/// and ids past the vocabulary are 400s naming the field.
#[tokio::test(flavor = "multi_thread")]
async fn logit_bias_and_penalties_reach_the_sampler_or_are_refused() {
    let state = state();
    let ask = |extra: Value| {
        let mut body = json!({"temperature": 0, "max_tokens": 3,
            "messages": [{"role": "user", "content": "안녕하세요"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        request(body)
    };
    let content = |body: &str| -> String {
        let v: Value = serde_json::from_str(body).unwrap();
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (status, plain) = send(&state, ask(json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{plain}");
    let plain = content(&plain);
    // A token that decodes to a short ASCII word, not the greedy answer's.
    let s = session();
    let vocab = s.ckpt.config.decoder.vocab_size as u32;
    let (id, word) = (100..vocab)
        .map(|id| (id, s.tok.decode(&[id], true).trim().to_string()))
        .find(|(_, w)| {
            w.len() >= 3
                && w.chars().all(|c| c.is_ascii_alphabetic())
                && !plain.contains(w.as_str())
        })
        .expect("an ASCII token");
    let (status, forced) = send(&state, ask(json!({"logit_bias": {id.to_string(): 100}}))).await;
    assert_eq!(status, StatusCode::OK, "{forced}");
    let forced = content(&forced);
    assert!(
        forced.contains(&word),
        "{forced:?} does not contain {word:?}"
    );
    let (status, _) = send(
        &state,
        ask(json!({"presence_penalty": 0.5, "frequency_penalty": -0.5})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    for (extra, needle) in [
        (json!({"presence_penalty": 2.5}), "presence_penalty"),
        (json!({"frequency_penalty": -3}), "frequency_penalty"),
        (json!({"logit_bias": {"7": 101}}), "logit_bias"),
        (json!({"logit_bias": {"abc": 1}}), "logit_bias"),
        (json!({"logit_bias": {vocab.to_string(): 1}}), "vocabulary"),
    ] {
        assert_openai_error(&state, ask(extra), StatusCode::BAD_REQUEST, needle).await;
    }
}

/// A client that stops reading its stream neither holds up the batch (another request is
/// answered meanwhile) nor keeps its request forever: once it is over 64 pieces behind for
/// longer than the slow-reader timeout, the engine drops it and its stream ends unfinished.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_its_stream_does_not_hold_up_the_batch() {
    let engine = EngineHandle::spawn(session(), 32, 16);
    engine.set_slow_reader_timeout(std::time::Duration::from_millis(20));
    let state = AppState::new(engine.clone(), None);
    let mut long = with_image(true);
    long["max_tokens"] = json!(3000);
    // No end of sequence: the answer runs to its length.
    long["logit_bias"] = json!({"2": -100});
    let slow = app(state.clone()).oneshot(request(long)).await.unwrap();
    assert_eq!(slow.status(), StatusCode::OK);
    // Its body is not read while another request comes and goes.
    let (status, body) = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        send(&state, request(with_image(false))),
    )
    .await
    .expect("answered while the first client reads nothing");
    assert_eq!(status, StatusCode::OK, "{body}");
    let dropped = || {
        engine
            .stats
            .slow_readers
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let t0 = std::time::Instant::now();
    while dropped() == 0 && t0.elapsed() < std::time::Duration::from_secs(120) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(dropped(), 1, "the slow reader was not dropped");
    let rest = slow.into_body().collect().await.unwrap().to_bytes();
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("left it unread"), "{rest}");
    assert!(
        !rest.contains("finish_reason\":\""),
        "a dropped stream ended as finished"
    );
}

/// `logprobs` with `top_logprobs`: one entry per answer token, the pick's log-probability
/// first among its alternatives (greedy), and the first token's alternatives are the
/// log-softmax of the logits the model computes for the prompt, checked here by running the
/// model on it directly. Streamed, they come with the closing chunk. Out-of-range values are
/// 400s.
#[tokio::test(flavor = "multi_thread")]
async fn logprobs_are_the_log_softmax_of_the_models_logits() {
    let state = state();
    let mut body = with_image(false);
    body["max_tokens"] = json!(6);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    let (status, text) = send(&state, request(body.clone())).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    for e in content {
        let top: Vec<f64> = e["top_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["logprob"].as_f64().unwrap())
            .collect();
        assert_eq!(top.len(), 3, "{e}");
        assert!(top.windows(2).all(|w| w[0] >= w[1]), "{e}");
        assert_eq!(
            e["logprob"].as_f64().unwrap(),
            top[0],
            "greedy picks the likeliest"
        );
        assert_eq!(e["token"], e["top_logprobs"][0]["token"]);
        assert!(e["bytes"].as_array().is_some_and(|b| !b.is_empty()), "{e}");
    }
    // The first step's logits, computed here from the same prompt.
    let s = session();
    let conv = question(&s);
    let img = wide_image();
    let p = s
        .embed_prompt(&conv.prompt(), &[img], &mut Default::default())
        .unwrap();
    let d = &s.model.decoder;
    let hidden = d
        .forward(&p.embeds, &[p.tokens], &mut d.new_cache(1))
        .unwrap();
    let last = hidden.narrow(1, p.tokens - 1, 1).unwrap();
    let logits = d.logits(&last).unwrap().flatten_all().unwrap();
    let logits: Vec<f32> = logits.to_vec1().unwrap();
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&x| (x as f64 - max).exp())
            .sum::<f64>()
            .ln();
    let mut want: Vec<f32> = logits.iter().map(|&x| (x as f64 - lse) as f32).collect();
    want.sort_by(|a, b| b.total_cmp(a));
    for (k, t) in content[0]["top_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let got = t["logprob"].as_f64().unwrap() as f32;
        assert!(
            (got - want[k]).abs() < 1e-4,
            "alternative {k}: {got} vs {}",
            want[k]
        );
    }
    // Streamed.
    body["stream"] = json!(true);
    let (status, text) = send(&state, request(body.clone())).await;
    assert_eq!(status, StatusCode::OK);
    let last: Value = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .rfind(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .unwrap();
    assert_eq!(last["choices"][0]["logprobs"]["content"], json!(content));
    // Refused.
    let mut bad = body.clone();
    bad["top_logprobs"] = json!(21);
    let (status, text) = send(&state, request(bad)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    let mut bad = body.clone();
    bad["logprobs"] = json!(false);
    let (status, text) = send(&state, request(bad)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("needs logprobs"), "{text}");
}

/// `n` choices: choice i is the answer a request with `seed + i` gets alone, whole and
/// streamed (each chunk tagged with its choice's index); usage sums the choices' tokens.
#[tokio::test(flavor = "multi_thread")]
async fn n_choices_are_the_answers_of_separate_seeded_requests() {
    let state = state();
    let mut body = with_image(false);
    body["max_tokens"] = json!(10);
    body["temperature"] = json!(1.5);
    body["seed"] = json!(7);
    body["n"] = json!(3);
    let (status, text) = send(&state, request(body.clone())).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    let mut total = 0;
    let mut texts = Vec::new();
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        let mut alone = body.clone();
        alone.as_object_mut().unwrap().remove("n");
        alone["seed"] = json!(7 + i);
        let (status, a) = send(&state, request(alone)).await;
        assert_eq!(status, StatusCode::OK, "{a}");
        let a: Value = serde_json::from_str(&a).unwrap();
        assert_eq!(
            c["message"]["content"], a["choices"][0]["message"]["content"],
            "choice {i}"
        );
        total += a["usage"]["completion_tokens"].as_u64().unwrap();
        texts.push(c["message"]["content"].as_str().unwrap().to_string());
    }
    assert_eq!(v["usage"]["completion_tokens"], total);
    assert!(
        texts.iter().any(|t| t != &texts[0]),
        "the seeds made no difference: {texts:?}"
    );
    // Streamed: each index's pieces add up to its whole answer.
    body["stream"] = json!(true);
    let (status, text) = send(&state, request(body.clone())).await;
    assert_eq!(status, StatusCode::OK);
    let mut streamed = vec![String::new(); 3];
    for d in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if d == "[DONE]" {
            continue;
        }
        let c: Value = serde_json::from_str(d).unwrap();
        let i = c["choices"][0]["index"].as_u64().unwrap() as usize;
        if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
            streamed[i].push_str(t);
        }
    }
    for (i, t) in streamed.iter().enumerate() {
        assert_eq!(t.trim(), texts[i], "streamed choice {i}");
    }
    for bad in [0, 17] {
        let mut b = body.clone();
        b["n"] = json!(bad);
        let (status, text) = send(&state, request(b)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    }
}

/// A small family of JSON schemas, drawn from `seed`: objects (keys Korean or not, all
/// required, nothing else allowed) of booleans, bounded integers, short strings, Korean
/// enums, Hangul-only strings, short arrays and nested objects.
fn random_schema(seed: &mut u64, depth: usize) -> Value {
    fn next(seed: &mut u64, n: u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed % n
    }
    let keys = ["name", "이름", "count", "색깔", "ok", "목록", "x"];
    let mut props = serde_json::Map::new();
    for _ in 0..1 + next(seed, 3) {
        let key = keys[next(seed, keys.len() as u64) as usize];
        let kind = next(seed, if depth == 0 { 7 } else { 6 });
        let (lo, hi) = (next(seed, 50) as i64 - 25, next(seed, 1000) as i64);
        let value = match kind {
            0 => json!({"type": "boolean"}),
            1 => json!({"type": "integer", "minimum": lo, "maximum": lo + hi}),
            2 => json!({"type": "string", "maxLength": 1 + next(seed, 6)}),
            3 => json!({"enum": ["사과", "바나나 🍌", "고양이", "plain"]}),
            4 => json!({"type": "string", "pattern": "^[가-힣]{1,4}$"}),
            5 => json!({"type": "array", "maxItems": 1 + next(seed, 3),
                        "items": {"type": "integer", "minimum": 0, "maximum": 99}}),
            _ => random_schema(seed, depth + 1),
        };
        props.insert(key.to_string(), value);
    }
    let required: Vec<&String> = props.keys().collect();
    json!({"type": "object", "properties": props, "required": required,
           "additionalProperties": false})
}

/// Whether `v` is valid under a schema of [`random_schema`]'s family (the checks this
/// family needs: type, bounds, length in characters, enum, the Hangul pattern, required
/// and no other properties).
fn valid(schema: &Value, v: &Value) -> Result<(), String> {
    let fail = |what: &str| Err(format!("{v} is not {what} (schema {schema})"));
    if let Some(options) = schema.get("enum") {
        return if options.as_array().unwrap().contains(v) {
            Ok(())
        } else {
            fail("in the enum")
        };
    }
    match schema["type"].as_str().unwrap() {
        "boolean" if v.is_boolean() => Ok(()),
        "integer" => match v.as_i64() {
            Some(i)
                if i >= schema["minimum"].as_i64().unwrap()
                    && i <= schema["maximum"].as_i64().unwrap() =>
            {
                Ok(())
            }
            _ => fail("an integer in range"),
        },
        "string" => {
            let Some(s) = v.as_str() else {
                return fail("a string");
            };
            let n = s.chars().count();
            if let Some(max) = schema.get("maxLength") {
                if n as u64 > max.as_u64().unwrap() {
                    return fail("short enough");
                }
            }
            if schema.get("pattern").is_some()
                && !((1..=4).contains(&n) && s.chars().all(|c| ('가'..='힣').contains(&c)))
            {
                return fail("1 to 4 Hangul syllables");
            }
            Ok(())
        }
        "array" => {
            let Some(items) = v.as_array() else {
                return fail("an array");
            };
            if items.len() as u64 > schema["maxItems"].as_u64().unwrap() {
                return fail("short enough");
            }
            items.iter().try_for_each(|i| valid(&schema["items"], i))
        }
        "object" => {
            let Some(o) = v.as_object() else {
                return fail("an object");
            };
            let props = schema["properties"].as_object().unwrap();
            if o.len() != props.len() || !props.keys().all(|k| o.contains_key(k)) {
                return fail("an object with exactly the schema's properties");
            }
            props.iter().try_for_each(|(k, s)| valid(s, &o[k]))
        }
        _ => fail("of the schema's type"),
    }
}

/// Structured output on every tokenizer kind (sentencepiece with byte fallback, slow and
/// fast; GPT-2 byte-level): whatever the sampler draws, each answer to a random schema of
/// a small family parses and validates, Korean included, with its `n` choices decoding in
/// one batch; `json_object` gives an object; bad formats are refused with a 400.
#[tokio::test(flavor = "multi_thread")]
async fn json_schema_answers_always_parse_and_validate() {
    for family in ["llava-v0", "llava-hf", "llava-mpt"] {
        let state = AppState::new(EngineHandle::spawn(session_of(family), 32, 16), None);
        let mut seed = family.bytes().fold(0x9E37_79B9_7F4A_7C15u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01B3)
        });
        for round in 0..8 {
            let schema = random_schema(&mut seed, 0);
            let mut body = with_image(false);
            body["max_tokens"] = json!(400);
            body["temperature"] = json!(1.0);
            body["seed"] = json!(round);
            body["n"] = json!(2);
            body["response_format"] =
                json!({"type": "json_schema", "json_schema": {"name": "t", "schema": schema}});
            let (status, text) = send(&state, request(body)).await;
            assert_eq!(status, StatusCode::OK, "{family}: {text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            for c in v["choices"].as_array().unwrap() {
                let content = c["message"]["content"].as_str().unwrap();
                assert_eq!(
                    c["finish_reason"], "stop",
                    "{family}: {content:?} for {schema}"
                );
                let parsed: Value = serde_json::from_str(content)
                    .unwrap_or_else(|e| panic!("{family}: {content:?} does not parse: {e}"));
                valid(&schema, &parsed).unwrap_or_else(|e| panic!("{family}: {e}"));
            }
        }
        let mut body = with_image(false);
        body["max_tokens"] = json!(400);
        body["temperature"] = json!(0);
        body["response_format"] = json!({"type": "json_object"});
        let (status, text) = send(&state, request(body)).await;
        assert_eq!(status, StatusCode::OK, "{family}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let content = v["choices"][0]["message"]["content"].as_str().unwrap();
        if v["choices"][0]["finish_reason"] == "stop" {
            let parsed: Value = serde_json::from_str(content).unwrap();
            assert!(parsed.is_object(), "{family}: {content}");
        } else {
            assert!(content.starts_with('{'), "{family}: {content}");
        }
    }
    let state = state();
    for bad in [
        json!({"type": "xml"}),
        json!({"type": "json_schema"}),
        json!({"type": "json_schema", "json_schema": {"name": "t", "schema": 3}}),
        json!({"type": "json_schema", "json_schema": {"name": "t",
               "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}),
        json!("json"),
    ] {
        let mut body = with_image(false);
        body["response_format"] = bad.clone();
        let (status, text) = send(&state, request(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {text}");
        assert!(text.contains("response_format"), "{bad}: {text}");
    }
    let mut body = with_image(false);
    body["response_format"] = json!({"type": "text"});
    let (status, text) = send(&state, request(body)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
}
