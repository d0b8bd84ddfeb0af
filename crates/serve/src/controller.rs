//! LLaVA's controller (llava-spec §7.1): workers register and send heartbeats; clients ask
//! which worker serves a model, or send generation requests that the controller forwards.
//! Endpoints and bodies are the reference's, so its workers, gradio page and `test_message`
//! client work with `kollava controller`, and `kollava serve --controller` with its
//! controller. The controller also serves the chat page and fronts the OpenAI API: the
//! page lists every registered model and its requests go to a worker of the chosen one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use rand::Rng;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::worker::SERVER_ERROR_MSG;

/// Workers heartbeat this often (the reference's `WORKER_HEART_BEAT_INTERVAL`)…
pub const HEART_BEAT_INTERVAL: Duration = Duration::from_secs(15);
/// …and are dropped when silent for this long (`CONTROLLER_HEART_BEAT_EXPIRATION`).
pub const HEART_BEAT_EXPIRATION: Duration = Duration::from_secs(30);

/// How a model's request picks among its workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatch {
    /// At random, in proportion to the workers' speeds.
    Lottery,
    /// The shortest queue relative to speed; the pick's queue grows by one meanwhile.
    ShortestQueue,
}

#[derive(Debug, Clone)]
struct Worker {
    model_names: Vec<String>,
    speed: f64,
    queue_length: f64,
    check_heart_beat: bool,
    last_heart_beat: Instant,
}

/// The registry of workers.
pub struct Controller {
    workers: Mutex<HashMap<String, Worker>>,
    dispatch: Dispatch,
}

fn status_of(v: &Value) -> Option<(Vec<String>, f64, f64)> {
    let names = v["model_names"]
        .as_array()?
        .iter()
        .filter_map(|n| n.as_str().map(str::to_string))
        .collect();
    Some((
        names,
        v["speed"].as_f64().unwrap_or(1.0),
        v["queue_length"].as_f64().unwrap_or(0.0),
    ))
}

/// POSTs `body` as JSON and reads a JSON answer; `None` on any failure.
fn post_json(url: &str, body: &Value) -> Option<Value> {
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .new_agent();
    let text = agent
        .post(url)
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .ok()?
        .body_mut()
        .read_to_string()
        .ok()?;
    serde_json::from_str(&text).ok()
}

/// A worker's `/worker_get_status`, asked without blocking the async runtime.
async fn fetch_status(address: &str) -> Option<Value> {
    let url = format!("{}/worker_get_status", address.trim_end_matches('/'));
    tokio::task::spawn_blocking(move || post_json(&url, &json!({})))
        .await
        .ok()
        .flatten()
}

impl Controller {
    pub fn new(dispatch: Dispatch) -> Arc<Self> {
        Arc::new(Self {
            workers: Mutex::new(HashMap::new()),
            dispatch,
        })
    }

    fn workers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Worker>> {
        self.workers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds or refreshes a worker from its status; `false` when the status is unusable.
    fn register(&self, name: &str, check_heart_beat: bool, status: &Value) -> bool {
        let Some((model_names, speed, queue_length)) = status_of(status) else {
            return false;
        };
        self.workers().insert(
            name.to_string(),
            Worker {
                model_names,
                speed,
                queue_length,
                check_heart_beat,
                last_heart_beat: Instant::now(),
            },
        );
        tracing::info!("registered worker {name}");
        true
    }

    /// Every model some worker serves, sorted.
    pub fn models(&self) -> Vec<String> {
        let mut m: Vec<String> = self
            .workers()
            .values()
            .flat_map(|w| w.model_names.clone())
            .collect();
        m.sort();
        m.dedup();
        m
    }

    /// The address of a worker for `model`, or `None`.
    pub fn pick(&self, model: &str) -> Option<String> {
        let mut workers = self.workers();
        let candidates: Vec<(&String, &Worker)> = workers
            .iter()
            .filter(|(_, w)| w.model_names.iter().any(|n| n == model))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let name = match self.dispatch {
            Dispatch::Lottery => {
                let total: f64 = candidates.iter().map(|(_, w)| w.speed.max(0.0)).sum();
                let mut x = rand::rng().random_range(0.0..total.max(f64::MIN_POSITIVE));
                let mut chosen = candidates[0].0.clone();
                for (n, w) in &candidates {
                    chosen = (*n).clone();
                    x -= w.speed.max(0.0);
                    if x < 0.0 {
                        break;
                    }
                }
                chosen
            }
            Dispatch::ShortestQueue => candidates
                .iter()
                .min_by(|a, b| {
                    let load = |w: &Worker| w.queue_length / w.speed.max(f64::MIN_POSITIVE);
                    load(a.1).total_cmp(&load(b.1)).then_with(|| a.0.cmp(b.0))
                })
                .map(|(n, _)| (*n).clone())?,
        };
        if self.dispatch == Dispatch::ShortestQueue {
            if let Some(w) = workers.get_mut(&name) {
                w.queue_length += 1.0;
            }
        }
        Some(name)
    }

    /// Records a heartbeat; `false` when the worker is unknown (it should register again).
    pub fn heart_beat(&self, name: &str, queue_length: f64) -> bool {
        match self.workers().get_mut(name) {
            Some(w) => {
                w.queue_length = queue_length;
                w.last_heart_beat = Instant::now();
                true
            }
            None => false,
        }
    }

    /// Drops a worker that could not be reached (it died between heartbeats).
    fn forget(&self, name: &str) {
        if self.workers().remove(name).is_some() {
            tracing::warn!("worker {name} is unreachable; removed");
        }
    }

    /// Drops the workers whose heartbeats stopped.
    pub fn expire(&self, now: Instant) {
        self.workers().retain(|name, w| {
            let alive = !w.check_heart_beat || now - w.last_heart_beat < HEART_BEAT_EXPIRATION;
            if !alive {
                tracing::warn!("worker {name} stopped sending heartbeats; removed");
            }
            alive
        });
    }
}

#[derive(Debug, Deserialize)]
struct RegisterRequest {
    worker_name: String,
    #[serde(default)]
    check_heart_beat: bool,
    worker_status: Option<Value>,
}

async fn register_worker(
    State(c): State<Arc<Controller>>,
    Json(req): Json<RegisterRequest>,
) -> Response {
    let status = match req.worker_status {
        Some(s) => Some(s),
        None => fetch_status(&req.worker_name).await,
    };
    match status {
        Some(s) if c.register(&req.worker_name, req.check_heart_beat, &s) => {
            Json(json!({})).into_response()
        }
        _ => (
            axum::http::StatusCode::BAD_REQUEST,
            format!("cannot get the status of worker {}", req.worker_name),
        )
            .into_response(),
    }
}

async fn refresh_all_workers(State(c): State<Arc<Controller>>) -> Json<Value> {
    let names: Vec<(String, bool)> = c
        .workers()
        .iter()
        .map(|(n, w)| (n.clone(), w.check_heart_beat))
        .collect();
    for (name, check) in names {
        match fetch_status(&name).await {
            Some(s) => {
                c.register(&name, check, &s);
            }
            None => {
                c.workers().remove(&name);
            }
        }
    }
    Json(json!({}))
}

async fn list_models(State(c): State<Arc<Controller>>) -> Json<Value> {
    Json(json!({"models": c.models()}))
}

async fn get_worker_address(
    State(c): State<Arc<Controller>>,
    Json(req): Json<Value>,
) -> Json<Value> {
    let model = req["model"].as_str().unwrap_or_default();
    Json(json!({"address": c.pick(model).unwrap_or_default()}))
}

async fn receive_heart_beat(
    State(c): State<Arc<Controller>>,
    Json(req): Json<Value>,
) -> Json<Value> {
    let name = req["worker_name"].as_str().unwrap_or_default();
    let queue = req["queue_length"].as_f64().unwrap_or(0.0);
    Json(json!({"exist": c.heart_beat(name, queue)}))
}

async fn worker_get_status(State(c): State<Arc<Controller>>) -> Json<Value> {
    let workers = c.workers();
    let speed: f64 = workers.values().map(|w| w.speed).sum();
    let queue: f64 = workers.values().map(|w| w.queue_length).sum();
    drop(workers);
    Json(json!({"model_names": c.models(), "speed": speed, "queue_length": queue}))
}

/// What [`forward`] got from a worker before its body: status and content type, or why
/// no worker answered.
enum Head {
    Answer(u16, String),
    NoWorker,
    Unreachable(String),
}

/// Sends `body` to `path` of a worker of `model`, streaming the answer back. A worker that
/// cannot be reached is forgotten at once and the next one is tried, so requests keep
/// succeeding while a dead worker's heartbeats run out.
async fn forward(
    c: Arc<Controller>,
    model: String,
    path: &'static str,
    auth: Option<String>,
    body: Bytes,
) -> (Head, Body) {
    let (head_tx, head_rx) = tokio::sync::oneshot::channel();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    std::thread::spawn(move || {
        use std::io::Read;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .new_agent();
        let mut last_error = String::new();
        let mut resp = loop {
            let Some(address) = c.pick(&model) else {
                let _ = head_tx.send(if last_error.is_empty() {
                    Head::NoWorker
                } else {
                    Head::Unreachable(last_error)
                });
                return;
            };
            let url = format!("{}{path}", address.trim_end_matches('/'));
            let mut req = agent.post(&url).header("Content-Type", "application/json");
            if let Some(auth) = &auth {
                req = req.header("Authorization", auth);
            }
            match req.send(&body[..]) {
                Ok(r) => break r,
                Err(e) => {
                    last_error = format!("{url}: {e}");
                    c.forget(&address);
                }
            }
        };
        let content_type = resp
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_string();
        let head = Head::Answer(resp.status().as_u16(), content_type);
        if head_tx.send(head).is_err() {
            return;
        }
        let mut reader = resp.body_mut().as_reader();
        let mut buf = [0u8; 8192];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx
                        .blocking_send(Ok(Bytes::copy_from_slice(&buf[..n])))
                        .is_err()
                    {
                        break; // the client went away
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    break;
                }
            }
        }
    });
    let head = head_rx
        .await
        .unwrap_or_else(|_| Head::Unreachable("the relay stopped".into()));
    (
        head,
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
}

fn model_of(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["model"].as_str().map(str::to_string))
        .filter(|m| !m.is_empty())
}

/// Forwards a generation request to a worker of `params["model"]`, streaming its chunks
/// back; without one, the reference's error chunk (`error_code` 2; 3 when none answered).
async fn worker_generate_stream(State(c): State<Arc<Controller>>, body: Bytes) -> Response {
    let error = |code: u8| {
        let mut b = json!({"text": SERVER_ERROR_MSG, "error_code": code})
            .to_string()
            .into_bytes();
        b.push(0);
        Response::new(Body::from(b))
    };
    let model = model_of(&body).unwrap_or_default();
    match forward(c, model, "/worker_generate_stream", None, body).await {
        (Head::Answer(..), body) => Response::new(body),
        (Head::NoWorker, _) => error(2),
        (Head::Unreachable(e), _) => {
            tracing::warn!("{e}");
            error(3)
        }
    }
}

/// `GET /v1/models` in front of the workers: every registered model, in OpenAI's shape
/// (the chat page offers them in its model list).
async fn openai_models(State(c): State<Arc<Controller>>) -> Json<Value> {
    let data: Vec<Value> = c
        .models()
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "kollava"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// The chat page's requests (`/v1/chat/completions`, `/api/log`) go to a worker of the
/// body's `model` (the first registered model when it names none); the worker's status,
/// content type and body come back as they stream.
async fn relay_to_worker(
    State(c): State<Arc<Controller>>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    use axum::http::{header, StatusCode};
    let openai_error = |status: StatusCode, message: String| {
        let body = json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}});
        (status, Json(body)).into_response()
    };
    let path = match uri.path() {
        "/api/log" => "/api/log",
        _ => "/v1/chat/completions",
    };
    let Some(model) = model_of(&body).or_else(|| c.models().into_iter().next()) else {
        return openai_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no worker is registered with this controller".into(),
        );
    };
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    match forward(c, model.clone(), path, auth, body).await {
        (Head::Answer(status, content_type), body) => Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, content_type)
            .body(body)
            .unwrap_or_else(|e| openai_error(StatusCode::BAD_GATEWAY, e.to_string())),
        (Head::NoWorker, _) => openai_error(
            StatusCode::NOT_FOUND,
            format!("no worker serves the model {model:?}"),
        ),
        (Head::Unreachable(e), _) => openai_error(
            StatusCode::BAD_GATEWAY,
            format!("no worker for {model:?} answered ({e})"),
        ),
    }
}

/// The controller's routes, and a task that expires silent workers.
pub fn router(c: Arc<Controller>) -> Router {
    let expiring = c.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(HEART_BEAT_INTERVAL).await;
            expiring.expire(Instant::now());
        }
    });
    Router::new()
        .route("/register_worker", post(register_worker))
        .route("/refresh_all_workers", post(refresh_all_workers))
        .route("/list_models", post(list_models))
        .route("/get_worker_address", post(get_worker_address))
        .route("/receive_heart_beat", post(receive_heart_beat))
        .route("/worker_generate_stream", post(worker_generate_stream))
        .route("/worker_get_status", post(worker_get_status))
        .route("/", axum::routing::get(crate::chat_page))
        .route("/v1/models", axum::routing::get(openai_models))
        .route("/v1/chat/completions", post(relay_to_worker))
        .route("/api/log", post(relay_to_worker))
        .layer(axum::extract::DefaultBodyLimit::max(crate::MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(crate::refuse_declared_oversize))
        .with_state(c)
}

/// A worker's side: registers `address` (serving `model`) with the controller at `url`,
/// then heartbeats every [`HEART_BEAT_INTERVAL`], registering again when the controller
/// has forgotten it. Runs on its own thread until the process ends; failures are logged.
pub fn keep_registered(
    url: String,
    address: String,
    model: String,
    queue: Arc<dyn Fn() -> usize + Send + Sync>,
) {
    std::thread::spawn(move || {
        let url = url.trim_end_matches('/').to_string();
        let register = || {
            let body = json!({
                "worker_name": address, "check_heart_beat": true,
                "worker_status": {"model_names": [model], "speed": 1, "queue_length": queue()},
            });
            match post_json(&format!("{url}/register_worker"), &body) {
                Some(_) => tracing::info!("registered with the controller at {url}"),
                None => tracing::warn!("cannot register with the controller at {url}"),
            }
        };
        register();
        loop {
            std::thread::sleep(HEART_BEAT_INTERVAL);
            let body = json!({"worker_name": address, "queue_length": queue()});
            let exist = post_json(&format!("{url}/receive_heart_beat"), &body)
                .and_then(|v| v["exist"].as_bool());
            match exist {
                Some(true) => {}
                Some(false) => register(),
                None => tracing::warn!("heartbeat to {url} failed"),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(model: &str, speed: f64, queue: f64) -> Value {
        json!({"model_names": [model], "speed": speed, "queue_length": queue})
    }

    #[test]
    fn shortest_queue_picks_the_least_loaded_and_counts_the_pick() {
        let c = Controller::new(Dispatch::ShortestQueue);
        assert!(c.register("http://a", true, &status("m", 1.0, 2.0)));
        assert!(c.register("http://b", true, &status("m", 2.0, 2.0)));
        assert!(c.register("http://c", true, &status("other", 1.0, 0.0)));
        // b: 2/2 = 1 < a: 2/1; then b: 3/2 = 1.5 < 2; then b: 4/2 = 2 = a: 2 → a by name.
        assert_eq!(c.pick("m").as_deref(), Some("http://b"));
        assert_eq!(c.pick("m").as_deref(), Some("http://b"));
        assert_eq!(c.pick("m").as_deref(), Some("http://a"));
        assert_eq!(c.pick("nope"), None);
        assert_eq!(c.models(), vec!["m".to_string(), "other".to_string()]);
    }

    #[test]
    fn lottery_only_picks_workers_of_the_model_and_favours_speed() {
        let c = Controller::new(Dispatch::Lottery);
        c.register("http://slow", true, &status("m", 1.0, 0.0));
        c.register("http://fast", true, &status("m", 9.0, 0.0));
        c.register("http://x", true, &status("x", 100.0, 0.0));
        let fast = (0..400)
            .filter(|_| c.pick("m").as_deref() == Some("http://fast"))
            .count();
        assert!((300..400).contains(&fast), "{fast}");
    }

    #[test]
    fn silent_workers_expire_and_heartbeats_keep_them() {
        let c = Controller::new(Dispatch::Lottery);
        c.register("http://a", true, &status("m", 1.0, 0.0));
        c.register("http://b", false, &status("m", 1.0, 0.0));
        assert!(c.heart_beat("http://a", 3.0));
        assert!(!c.heart_beat("http://unknown", 0.0));
        c.expire(Instant::now() + HEART_BEAT_EXPIRATION + Duration::from_secs(1));
        // a checks heartbeats and went silent; b registered without the check.
        assert_eq!(c.pick("m").as_deref(), Some("http://b"));
    }
}
