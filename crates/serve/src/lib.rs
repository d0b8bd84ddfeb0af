//! HTTP serving. [`app`] builds the router (`/`: the chat page, `/health`, `/v1/models`,
//! `/v1/chat/completions`, and LLaVA's `/worker_get_status` and `/worker_generate_stream`); handlers are thin: parse → hand a job to the
//! [`engine::EngineHandle`] → map events to OpenAI-shaped responses. No tensors here.
//!
//! Still to come (issue 4): the page's image modes and votes/logs, the controller and
//! worker registration, batching across requests, metrics, API keys.

pub mod engine;
pub mod error;
pub mod openai;
pub mod worker;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

pub use engine::EngineHandle;

/// The chat page, embedded in the binary (it must work offline: no CDN).
const CHAT_PAGE: &str = include_str!("../assets/index.html");

async fn chat_page() -> axum::response::Html<&'static str> {
    axum::response::Html(CHAT_PAGE)
}

/// Largest request body: a few base64 images.
pub const MAX_BODY_BYTES: usize = 32 << 20;

#[derive(Clone)]
pub struct AppState {
    pub engine: EngineHandle,
}

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/", get(chat_page))
        .route("/health", get(|| async { "ok" }))
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/worker_get_status", post(worker::get_status))
        .route("/worker_generate_stream", post(worker::generate_stream))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves until Ctrl-C / SIGTERM; in-flight requests finish first.
pub async fn serve(listener: tokio::net::TcpListener, state: AppState) -> std::io::Result<()> {
    axum::serve(listener, app(state))
        .with_graceful_shutdown(async {
            let ctrl_c = tokio::signal::ctrl_c();
            #[cfg(unix)]
            {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("installing the SIGTERM handler");
                tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
            }
            #[cfg(not(unix))]
            let _ = ctrl_c.await;
        })
        .await
}
