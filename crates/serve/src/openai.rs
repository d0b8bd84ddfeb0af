//! `POST /v1/chat/completions` and `GET /v1/models`, as OpenAI's API shapes them: text and
//! `image_url` content parts (base64 data URLs; remote URLs and local paths are refused),
//! `stream` as server-sent events ending with `[DONE]`, `usage` counts, OpenAI errors.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use kollava_generate::{AnswerOptions, Grammars, OutputFormat, SamplingParams};
use kollava_inputs::image;
use kollava_inputs::template::Role;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_stream::StreamExt;

use crate::engine::{Event, Input, Job, Turn};
use crate::error::ApiError;
use crate::AppState;

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub stream: bool,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// Token id (as a string, as JSON keys are) → bias.
    #[serde(default)]
    pub logit_bias: Option<std::collections::HashMap<String, f32>>,
    /// Each answer token's log-probability, and with `top_logprobs` (0 to 20) that many
    /// alternatives'.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// Choices to generate (1 to 16); choice i samples with `seed + i`.
    #[serde(default)]
    pub n: Option<usize>,
    #[serde(default)]
    pub top_logprobs: Option<usize>,
    /// `{"type": "text"}` (the default), `{"type": "json_object"}` or `{"type":
    /// "json_schema", "json_schema": {"name": …, "schema": {…}}}`: the answer is decoded
    /// under a grammar so that it parses (and validates against the schema).
    #[serde(default)]
    pub response_format: Option<Value>,
    /// kollava's extension, the chat page's image mode: `crop`, `resize` or `pad` (LLaVA's
    /// "Crop"/"Resize"/"Pad"); default: the checkpoint's.
    #[serde(default)]
    pub image_aspect: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Content,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Debug, Deserialize)]
pub struct ImageUrl {
    pub url: String,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A data URL's image; anything else is refused with the reason.
pub(crate) fn decode_base64_image(data: &str, what: &str) -> Result<image::RgbImage, ApiError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| ApiError::bad_request(format!("{what}: invalid base64 ({e})")))?;
    image::decode(&bytes, what).map_err(|e| ApiError::bad_request(e.to_string()))
}

fn decode_image_url(url: &str, index: usize, remote: bool) -> Result<image::RgbImage, ApiError> {
    let what = format!("messages image {index}");
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| ApiError::bad_request(format!("{what}: malformed data URL")))?;
        if !meta.ends_with(";base64") {
            return Err(ApiError::bad_request(format!(
                "{what}: data URLs must be base64-encoded"
            )));
        }
        return decode_base64_image(data, &what);
    }
    let scheme = url.split(':').next().unwrap_or("").to_ascii_lowercase();
    if remote && (scheme == "http" || scheme == "https") {
        return fetch_image(url, &what);
    }
    let allowed = if remote {
        "send a base64 data URL or an http(s) URL; local paths are never read"
    } else {
        "send the image as a base64 data URL (remote and local URLs are disabled on this server; see --allow-remote-images)"
    };
    Err(ApiError::bad_request(format!(
        "{what}: {scheme:?} URLs are not accepted; {allowed}"
    )))
}

/// Downloads an image for `--allow-remote-images`: 10 s, at most a request body's size.
fn fetch_image(url: &str, what: &str) -> Result<image::RgbImage, ApiError> {
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(10)))
        .max_redirects(3)
        .build()
        .new_agent();
    let bytes = agent
        .get(url)
        .call()
        .and_then(|mut r| {
            r.body_mut()
                .with_config()
                .limit(crate::MAX_BODY_BYTES as u64)
                .read_to_vec()
        })
        .map_err(|e| ApiError::bad_request(format!("{what}: cannot fetch {url}: {e}")))?;
    image::decode(&bytes, what).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// What the API makes of a chat-completions body before the engine sees it (the JSON, the
/// messages, data-URL images, sampling settings, `response_format`), without queueing it:
/// the request parser's fuzz target. `vocab`: the ids `logit_bias` may name.
pub fn parse_request(body: &[u8], vocab: usize, grammars: &Grammars) -> Result<(), ApiError> {
    let req: ChatRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?;
    let (events, _) = crate::engine::events();
    to_job(req, events, false, false, vocab, grammars).map(|_| ())
}

/// `response_format` as OpenAI shapes it: `None` for plain text.
fn output_format(v: &Value) -> Result<Option<OutputFormat>, ApiError> {
    let bad = |m: &str| Err(ApiError::bad_request(format!("response_format: {m}")));
    match v.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(OutputFormat::JsonObject)),
        Some("json_schema") => match v.get("json_schema") {
            Some(Value::Object(js)) => match js.get("schema") {
                Some(schema) => Ok(Some(OutputFormat::JsonSchema(schema.clone()))),
                None => bad("json_schema.schema is missing"),
            },
            _ => bad("json_schema must be an object with the schema under \"schema\""),
        },
        Some(other) => bad(&format!(
            "type {other:?} is not supported (text, json_object or json_schema)"
        )),
        None => bad("an object with a \"type\" is expected"),
    }
}

/// The response header that tells a client its history was cut to start at its newest
/// image (its value: how many earlier messages were left out).
pub const NEW_CONVERSATION_HEADER: &str = "x-kollava-new-conversation";

/// A request as the engine takes it, and how many earlier messages were left out because a
/// newer one brings an image (unless `multi_image`): LLaVA's web UI starts a new
/// conversation when an image arrives in one that has an image, and LLaVA-style models,
/// trained on one image per conversation, mix two up.
fn to_job(
    req: ChatRequest,
    events: crate::engine::EventSender,
    remote: bool,
    multi_image: bool,
    vocab: usize,
    grammars: &Grammars,
) -> Result<(Job, usize), ApiError> {
    let constraint = match req
        .response_format
        .as_ref()
        .map(output_format)
        .transpose()?
    {
        Some(Some(format)) => Some(
            grammars
                .compile(&format)
                .map_err(|e| ApiError::bad_request(format!("response_format: {e}")))?,
        ),
        _ => None,
    };
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty"));
    }
    let mut system = None;
    let mut turns: Vec<Turn> = Vec::new();
    let mut image_index = 0;
    for (i, m) in req.messages.into_iter().enumerate() {
        let mut text = String::new();
        let mut images = Vec::new();
        match m.content {
            Content::Text(t) => text = t,
            Content::Parts(parts) => {
                for part in parts {
                    match part {
                        Part::Text { text: t } => {
                            if !text.is_empty() {
                                text.push('\n');
                            }
                            text.push_str(&t);
                        }
                        Part::ImageUrl { image_url } => {
                            images.push(decode_image_url(&image_url.url, image_index, remote)?);
                            image_index += 1;
                        }
                    }
                }
            }
        }
        let role = match m.role.as_str() {
            "system" | "developer" if i == 0 => {
                system = Some(text);
                continue;
            }
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => return Err(ApiError::bad_request(format!("messages[{i}].role {other:?} is not supported (user, assistant, or a leading system)"))),
        };
        if role == Role::Assistant && !images.is_empty() {
            return Err(ApiError::bad_request(format!(
                "messages[{i}]: assistant messages cannot carry images"
            )));
        }
        turns.push(Turn { role, text, images });
    }
    if turns.last().map(|t| t.role) != Some(Role::User) {
        return Err(ApiError::bad_request("the last message must be the user's"));
    }
    let newest_image = turns.iter().rposition(|t| !t.images.is_empty());
    let dropped = match newest_image {
        Some(at) if !multi_image && turns[..at].iter().any(|t| !t.images.is_empty()) => {
            turns.drain(..at);
            at
        }
        _ => 0,
    };
    let mut logit_bias = Vec::new();
    for (key, bias) in req.logit_bias.iter().flatten() {
        let id: u32 = key.parse().map_err(|_| {
            ApiError::bad_request(format!("logit_bias key {key:?} is not a token id"))
        })?;
        if id as usize >= vocab {
            return Err(ApiError::bad_request(format!(
                "logit_bias token {id} is outside the vocabulary of {vocab}"
            )));
        }
        logit_bias.push((id, *bias));
    }
    logit_bias.sort_by_key(|&(id, _)| id);
    let sampling = SamplingParams {
        temperature: req.temperature.unwrap_or(0.2),
        top_p: req.top_p.unwrap_or(1.0),
        top_k: 50,
        repetition_penalty: 1.0,
        presence_penalty: req.presence_penalty.unwrap_or(0.0),
        frequency_penalty: req.frequency_penalty.unwrap_or(0.0),
        logit_bias,
        seed: req.seed.unwrap_or(0),
        logprobs: match (req.logprobs.unwrap_or(false), req.top_logprobs) {
            (_, Some(k)) if k > 20 => {
                return Err(ApiError::bad_request(format!(
                    "top_logprobs = {k} is out of range: 0 to 20"
                )))
            }
            (false, Some(_)) => {
                return Err(ApiError::bad_request(
                    "top_logprobs needs logprobs set to true",
                ))
            }
            (true, k) => Some(k.unwrap_or(0)),
            (false, None) => None,
        },
    };
    sampling
        .validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let max_new_tokens = req.max_completion_tokens.or(req.max_tokens).unwrap_or(1024);
    if max_new_tokens == 0 {
        return Err(ApiError::bad_request("max_tokens must be at least 1"));
    }
    let stop = match req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    let aspect = match req
        .image_aspect
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None => None,
        Some("crop") => Some(kollava_inputs::image::AspectMode::Crop),
        Some("resize") => Some(kollava_inputs::image::AspectMode::Resize),
        Some("pad") => Some(kollava_inputs::image::AspectMode::Pad),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "image_aspect {other:?}: use crop, resize or pad"
            )))
        }
    };
    let job = Job {
        input: Input::Turns { system, turns },
        options: AnswerOptions {
            sampling,
            max_new_tokens,
            stop,
            aspect,
            constraint,
        },
        events,
    };
    Ok((job, dropped))
}

pub async fn models(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": state.engine.model_name, "object": "model", "created": 0, "owned_by": "kollava",
                  // Whether a conversation keeps several images (`serve --multi-image`); the
                  // chat page follows it.
                  "multi_image": state.multi_image}],
    }))
}

pub async fn chat_completions(
    state: State<AppState>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let metrics = state.metrics.clone();
    metrics
        .requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let result = chat_completions_inner(state, body).await;
    if result.is_err() {
        metrics
            .failed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    result
}

async fn chat_completions_inner(
    State(state): State<AppState>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body.map_err(|e| {
        // OpenAI answers 400 where axum says 422 (well-formed JSON of the wrong shape).
        let status = if e.status() == axum::http::StatusCode::UNPROCESSABLE_ENTITY {
            axum::http::StatusCode::BAD_REQUEST
        } else {
            e.status()
        };
        ApiError {
            status,
            message: format!("invalid request body: {}", e.body_text()),
        }
    })?;
    let stream = req.stream;
    let n = req.n.unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&n) {
        return Err(ApiError::bad_request(format!(
            "n = {n} is out of range: 1 to {MAX_CHOICES}"
        )));
    }
    let (tx, rx) = crate::engine::events();
    // Decoding (and fetching) images is blocking work: keep it off the async threads.
    let (remote, multi_image) = (state.allow_remote_images, state.multi_image);
    let vocab = state.engine.vocab_size;
    // Compiling a schema (and, the first time, preparing the vocabulary) is blocking too.
    let grammars = state.engine.grammars.clone();
    let (job, dropped) =
        tokio::task::spawn_blocking(move || to_job(req, tx, remote, multi_image, vocab, &grammars))
            .await
            .map_err(ApiError::internal)??;
    if dropped > 0 {
        tracing::info!(
            "a new image starts a new conversation: {dropped} earlier messages left out"
        );
    }
    let mark = move |mut r: Response| {
        if dropped > 0 {
            r.headers_mut().insert(
                NEW_CONVERSATION_HEADER,
                axum::http::HeaderValue::from(dropped),
            );
        }
        r
    };
    // Choice i samples with seed + i: it is the answer a request with that seed gets. The
    // choices decode together, and the prefix cache lets later ones reuse the prompt.
    let mut receivers = vec![rx];
    let mut jobs = Vec::with_capacity(n);
    for i in 1..n {
        let (tx, rx) = crate::engine::events();
        let mut options = job.options.clone();
        options.sampling.seed = options.sampling.seed.wrapping_add(i as u64);
        jobs.push(Job {
            input: job.input.clone(),
            options,
            events: tx,
        });
        receivers.push(rx);
    }
    jobs.insert(0, job);
    for job in jobs {
        state.engine.submit(job)?;
    }
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let id = format!(
        "chatcmpl-{:x}-{}",
        now(),
        NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let model = state.engine.model_name.clone();
    let created = now();

    // Wait for each choice's first event: an error before any text is still an HTTP error.
    let mut firsts = Vec::with_capacity(n);
    for rx in &mut receivers {
        let first = rx
            .recv()
            .await
            .ok_or_else(|| ApiError::internal("the engine dropped the request"))?;
        if let Event::Failed(e) = first {
            return Err(e);
        }
        firsts.push(first);
    }
    if !stream {
        let mut choices = Vec::with_capacity(n);
        let (mut prompt, mut cached, mut completion) = (0, 0, 0);
        for (index, (first, mut rx)) in firsts.into_iter().zip(receivers).enumerate() {
            let mut event = first;
            loop {
                match event {
                    Event::Text(_) => {}
                    Event::Done {
                        text,
                        prompt_tokens,
                        cached_tokens,
                        completion_tokens,
                        finish_reason,
                        logprobs,
                    } => {
                        if index == 0 {
                            (prompt, cached) = (prompt_tokens, cached_tokens);
                        }
                        completion += completion_tokens;
                        choices.push(json!({"index": index, "message": {"role": "assistant", "content": text},
                                            "finish_reason": finish_reason, "logprobs": logprobs.map(|c| json!({"content": c}))}));
                        break;
                    }
                    Event::Failed(e) => return Err(e),
                }
                event = rx
                    .recv()
                    .await
                    .ok_or_else(|| ApiError::internal("the engine dropped the request"))?;
            }
        }
        state
            .metrics
            .generated_tokens
            .fetch_add(completion as u64, std::sync::atomic::Ordering::Relaxed);
        let body = json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices,
            "usage": usage(prompt, cached, completion),
        });
        return Ok(mark(Json(body).into_response()));
    }
    let metrics = state.metrics.clone();
    let chunk = move |index: usize,
                      delta: Value,
                      finish: Option<&str>,
                      usage: Option<Value>,
                      logprobs: Option<Value>|
          -> SseEvent {
        let mut body = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
        });
        if let Some(u) = usage {
            body["usage"] = u;
        }
        if let Some(c) = logprobs {
            body["choices"][0]["logprobs"] = json!({"content": c});
        }
        SseEvent::default().data(body.to_string())
    };
    let heads: Vec<SseEvent> = (0..n)
        .map(|i| chunk(i, json!({"role": "assistant"}), None, None, None))
        .collect();
    let head = tokio_stream::iter(heads);
    // Every choice's events as they come, tagged with its index. The engine drops a
    // choice's sender after its last event, which ends that choice's stream.
    let mut rest = tokio_stream::StreamMap::new();
    for (index, (first, rx)) in firsts.into_iter().zip(receivers).enumerate() {
        rest.insert(index, tokio_stream::once(first).chain(rx));
    }
    let body = rest.map(move |(index, event)| match event {
        Event::Text(t) => chunk(index, json!({"content": t}), None, None, None),
        Event::Done {
            finish_reason,
            completion_tokens,
            prompt_tokens,
            cached_tokens,
            logprobs,
            ..
        } => {
            metrics.generated_tokens.fetch_add(
                completion_tokens as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            // A choice's last chunk also carries its counts (what `stream_options.
            // include_usage` asks of OpenAI; clients ignore a field they do not expect), and
            // streamed, the tokens' log-probabilities.
            let usage = usage(prompt_tokens, cached_tokens, completion_tokens);
            chunk(index, json!({}), Some(finish_reason), Some(usage), logprobs)
        }
        Event::Failed(e) => SseEvent::default()
            .data(json!({"error": {"message": e.message, "type": "server_error"}}).to_string()),
    });
    let done = tokio_stream::once(SseEvent::default().data("[DONE]"));
    let events = head.chain(body).chain(done).map(Ok::<_, Infallible>);
    Ok(mark(
        Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response(),
    ))
}

/// Choices one request may ask for (`n`).
const MAX_CHOICES: usize = 16;

/// OpenAI's `usage`, with the prompt tokens the prefix cache supplied as
/// `prompt_tokens_details.cached_tokens` (as OpenAI reports its own prompt caching).
fn usage(prompt_tokens: usize, cached_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    })
}
