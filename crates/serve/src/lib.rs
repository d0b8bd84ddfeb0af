//! HTTP serving. [`app`] builds the router: `/` (the chat page), `/health`, `/metrics`,
//! `/v1/models`, `/v1/chat/completions`, and LLaVA's `/worker_get_status` and
//! `/worker_generate_stream`. Handlers are thin: parse → hand a job to the
//! [`engine::EngineHandle`] → map events to OpenAI-shaped responses. No tensors here.
//! The engine decodes concurrent requests together and reuses what earlier requests
//! computed (the session's prefix and image caches); [`controller`] is LLaVA's controller,
//! [`worker`] its worker protocol, [`logs`] the chat page's conversation and vote logs.

pub mod controller;
pub mod engine;
pub mod error;
pub mod logs;
pub mod openai;
pub mod worker;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

pub use engine::EngineHandle;

/// The chat page, embedded in the binary (it must work offline: no CDN).
const CHAT_PAGE: &str = include_str!("../assets/index.html");

pub(crate) async fn chat_page() -> axum::response::Html<&'static str> {
    axum::response::Html(CHAT_PAGE)
}

/// Largest request body: a few base64 images.
pub const MAX_BODY_BYTES: usize = 32 << 20;

/// Counters for `/metrics` (Prometheus text format).
#[derive(Debug, Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub failed: AtomicU64,
    pub generated_tokens: AtomicU64,
}

#[derive(Clone)]
pub struct AppState {
    pub engine: EngineHandle,
    /// `--api-key`: required as `Authorization: Bearer …` on the API routes when set.
    pub api_key: Option<String>,
    pub metrics: Arc<Metrics>,
    /// `--log-dir`: where the chat page's conversation and vote logs go (none: not kept).
    pub log_dir: Option<std::path::PathBuf>,
    /// `--allow-remote-images`: fetch http(s) `image_url`s.
    pub allow_remote_images: bool,
    /// `--cors-origin`: the one origin (or `*`) browsers may call the API from.
    pub cors_origin: Option<String>,
    /// `--multi-image`: keep every image of a conversation's history (by default a newer
    /// image starts a new conversation, as LLaVA's web UI does).
    pub multi_image: bool,
}

impl AppState {
    pub fn new(engine: EngineHandle, api_key: Option<String>) -> Self {
        Self {
            engine,
            api_key,
            metrics: Arc::default(),
            log_dir: None,
            allow_remote_images: false,
            cors_origin: None,
            multi_image: false,
        }
    }

    pub fn with_multi_image(mut self, on: bool) -> Self {
        self.multi_image = on;
        self
    }

    pub fn with_log_dir(mut self, dir: Option<std::path::PathBuf>) -> Self {
        self.log_dir = dir;
        self
    }

    /// `--allow-remote-images` and `--cors-origin`.
    pub fn with_access(mut self, allow_remote_images: bool, cors_origin: Option<String>) -> Self {
        self.allow_remote_images = allow_remote_images;
        self.cors_origin = cors_origin;
        self
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let m = &state.metrics;
    let e = &state.engine.stats;
    let body = format!(
        "# TYPE kollava_requests_total counter\nkollava_requests_total {}\n\
         # TYPE kollava_request_failures_total counter\nkollava_request_failures_total {}\n\
         # TYPE kollava_generated_tokens_total counter\nkollava_generated_tokens_total {}\n\
         # TYPE kollava_cancelled_requests_total counter\nkollava_cancelled_requests_total {}\n\
         # HELP kollava_slow_reader_drops_total requests dropped because their client fell behind its stream\n\
         # TYPE kollava_slow_reader_drops_total counter\nkollava_slow_reader_drops_total {}\n\
         # HELP kollava_answers_stored_total answers kept in the prefix cache for a next turn\n\
         # TYPE kollava_answers_stored_total counter\nkollava_answers_stored_total {}\n\
         # TYPE kollava_queue_length gauge\nkollava_queue_length {}\n\
         # TYPE kollava_running_sequences gauge\nkollava_running_sequences {}\n\
         # TYPE kollava_peak_running_sequences gauge\nkollava_peak_running_sequences {}\n\
         # TYPE kollava_decode_tokens_per_second gauge\nkollava_decode_tokens_per_second {:.3}\n\
         # TYPE kollava_time_to_first_token_seconds summary\n\
         kollava_time_to_first_token_seconds_sum {:.6}\n\
         kollava_time_to_first_token_seconds_count {}\n",
        m.requests.load(Ordering::Relaxed),
        m.failed.load(Ordering::Relaxed),
        m.generated_tokens.load(Ordering::Relaxed),
        e.cancelled.load(Ordering::Relaxed),
        e.slow_readers.load(Ordering::Relaxed),
        e.answers_stored.load(Ordering::Relaxed),
        state.engine.queue_length(),
        e.running.load(Ordering::Relaxed),
        e.peak_running.load(Ordering::Relaxed),
        e.tokens_per_s(),
        e.first_token_us.load(Ordering::Relaxed) as f64 / 1e6,
        e.first_tokens.load(Ordering::Relaxed),
    );
    let mut body = body;
    let prefix = state.engine.prefix_cache.stats();
    for (name, what, stats) in [
        ("prefix_cache", "blocks of keys and values", prefix),
        (
            "image_cache",
            "projected image features",
            state.engine.feature_cache.stats(),
        ),
    ] {
        body.push_str(&format!(
            "# HELP kollava_{name}_hits_total lookups that reused {what}\n\
             # TYPE kollava_{name}_hits_total counter\nkollava_{name}_hits_total {}\n\
             # TYPE kollava_{name}_misses_total counter\nkollava_{name}_misses_total {}\n\
             # TYPE kollava_{name}_evictions_total counter\nkollava_{name}_evictions_total {}\n\
             # TYPE kollava_{name}_bytes gauge\nkollava_{name}_bytes {}\n\
             # TYPE kollava_{name}_budget_bytes gauge\nkollava_{name}_budget_bytes {}\n\
             # TYPE kollava_{name}_entries gauge\nkollava_{name}_entries {}\n",
            stats.hits, stats.misses, stats.evictions, stats.bytes, stats.budget, stats.entries,
        ));
    }
    let reused = prefix.tokens_reused;
    body.push_str(&format!(
        "# HELP kollava_prefix_cache_reused_tokens_total prompt positions taken from the prefix cache instead of prefilled\n\
         # TYPE kollava_prefix_cache_reused_tokens_total counter\nkollava_prefix_cache_reused_tokens_total {reused}\n"
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// Bearer-key check for the API routes (constant-time comparison).
async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let same = given.len() == key.len()
            && given
                .bytes()
                .zip(key.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !same {
            return error::ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: "missing or wrong API key (send Authorization: Bearer <key>)".into(),
            }
            .into_response();
        }
    }
    next.run(req).await
}

/// A request that declares a body over [`MAX_BODY_BYTES`] (`Content-Length`) gets 413 from
/// its headers, before any of the body is read: a client cannot hold the connection by
/// sending a huge body slowly. (A body without a length is cut at the limit as it is read.)
pub async fn refuse_declared_oversize(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > MAX_BODY_BYTES as u64) {
        return error::ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "request body of {n} bytes is over the {} MiB limit",
                MAX_BODY_BYTES >> 20
            ),
        }
        .into_response();
    }
    next.run(req).await
}

pub fn app(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/worker_get_status", post(worker::get_status))
        .route("/worker_generate_stream", post(worker::generate_stream))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    let cors = state.cors_origin.as_deref().map(cors_layer);
    let router = Router::new()
        .route("/", get(chat_page))
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/api/log", post(logs::log_event))
        .merge(api)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(refuse_declared_oversize))
        .with_state(state);
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// `--cors-origin`: browsers on `origin` (or any, for `*`) may call the API, sending the
/// API key and JSON bodies. Without it no CORS headers are sent, so other sites cannot.
fn cors_layer(origin: &str) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    let layer = CorsLayer::new()
        .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]);
    if origin == "*" {
        layer.allow_origin(Any)
    } else {
        match axum::http::HeaderValue::from_str(origin) {
            Ok(v) => layer.allow_origin(AllowOrigin::exact(v)),
            Err(_) => {
                tracing::warn!("--cors-origin {origin:?} is not a valid origin; CORS stays off");
                layer.allow_origin(AllowOrigin::list([]))
            }
        }
    }
}

/// What the HTTP layer allows a connection, whatever it sends (slow or stalled clients,
/// too many of them): defaults a public deployment can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// A connection must send a whole request head within this, the first one and each
    /// next one on a kept-alive connection (so an idle connection is closed after it too);
    /// otherwise it is closed (slowloris).
    pub header_timeout: std::time::Duration,
    /// A request body must keep coming: a wait longer than this for its next piece ends
    /// the request with an error and closes the connection (a body that stalls midway).
    pub body_timeout: std::time::Duration,
    /// Connections open at once; one more is answered 503 and closed.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: std::time::Duration::from_secs(30),
            body_timeout: std::time::Duration::from_secs(30),
            max_connections: 1024,
        }
    }
}

/// Serves until Ctrl-C / SIGTERM; in-flight requests finish first.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    limits: HttpLimits,
) -> std::io::Result<()> {
    serve_router(listener, app(state), limits, shutdown_signal()).await
}

/// [`serve`] for `kollava controller`.
pub async fn serve_controller(
    listener: tokio::net::TcpListener,
    dispatch: controller::Dispatch,
    limits: HttpLimits,
) -> std::io::Result<()> {
    let router = controller::router(controller::Controller::new(dispatch));
    serve_router(listener, router, limits, shutdown_signal()).await
}

/// Serves `router` on `listener` under `limits` until `shutdown` completes, then lets the
/// open connections finish their requests. Our own accept loop, because axum's `serve`
/// gives hyper no timer, and without one hyper cannot time out a request head.
pub async fn serve_router(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    limits: HttpLimits,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment, keep serving.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                "{peer}: over {} connections, answered 503",
                limits.max_connections
            );
            tokio::spawn(refuse(stream));
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(
            tower_http::timeout::RequestBodyTimeout::new(router.clone(), limits.body_timeout),
        );
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("{peer}: {e}");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// A 503 in OpenAI's error shape to a connection over the limit, then closed.
async fn refuse(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let body = r#"{"error":{"message":"the server has too many open connections; retry shortly","type":"server_error","code":503}}"#;
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} },
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
