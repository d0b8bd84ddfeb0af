//! LLaVA's model-worker protocol (llava-spec §7.2), so the reference controller, gradio
//! page and `test_message` client can use kollava as a worker:
//! `POST /worker_get_status` and `POST /worker_generate_stream`, whose body is a sequence
//! of JSON objects `{"text": prompt + answer so far, "error_code": 0}`, each followed by
//! a NUL byte. Failures are a chunk with `error_code` 1 and the reference's message.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kollava_generate::{AnswerOptions, SamplingParams};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_stream::StreamExt;

use crate::engine::{Event, Input, Job};
use crate::error::ApiError;
use crate::openai::decode_base64_image;
use crate::AppState;

/// The reference's `server_error_msg`, shown by its clients as is.
pub const SERVER_ERROR_MSG: &str =
    "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.**";

#[derive(Debug, Deserialize)]
pub struct GenerateRequest {
    pub prompt: String,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub max_new_tokens: Option<usize>,
    pub stop: Option<String>,
    #[serde(default)]
    pub images: Vec<String>,
}

pub async fn get_status(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "model_names": [state.engine.model_name],
        "speed": 1,
        "queue_length": state.engine.queue_length(),
    }))
}

fn chunk(v: Value) -> Bytes {
    let mut b = v.to_string().into_bytes();
    b.push(0);
    Bytes::from(b)
}

pub async fn generate_stream(
    State(state): State<AppState>,
    body: Result<Json<GenerateRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {}", e.body_text())))?;
    let images = req
        .images
        .iter()
        .enumerate()
        .map(|(i, b)| decode_base64_image(b, &format!("images[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let temperature = req.temperature.unwrap_or(1.0);
    let sampling = SamplingParams {
        // The v1.0+ worker samples only above 0.001; below that it is greedy.
        temperature: if temperature <= 0.001 {
            0.0
        } else {
            temperature
        },
        top_p: req.top_p.unwrap_or(1.0),
        top_k: state.engine.worker_top_k,
        ..SamplingParams::default()
    };
    sampling
        .validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let options = AnswerOptions {
        sampling,
        max_new_tokens: req.max_new_tokens.unwrap_or(256).clamp(1, 1024),
        stop: req.stop.into_iter().filter(|s| !s.is_empty()).collect(),
        aspect: None,
        constraint: None,
    };
    let (tx, rx) = crate::engine::events();
    let prompt = req.prompt;
    state.engine.submit(Job {
        input: Input::Prompt {
            text: prompt.clone(),
            images,
        },
        options,
        events: tx,
    })?;
    let mut so_far = String::new();
    let stream = rx.filter_map(move |event| match event {
        Event::Text(t) => {
            so_far.push_str(&t);
            Some(chunk(
                json!({"text": format!("{prompt}{so_far}"), "error_code": 0}),
            ))
        }
        Event::Done { text, .. } => Some(chunk(
            json!({"text": format!("{prompt}{text}"), "error_code": 0}),
        )),
        Event::Failed(e) => {
            tracing::warn!("worker_generate_stream failed: {}", e.message);
            Some(chunk(json!({"text": SERVER_ERROR_MSG, "error_code": 1})))
        }
    });
    Ok(Body::from_stream(stream.map(Ok::<_, Infallible>)).into_response())
}
