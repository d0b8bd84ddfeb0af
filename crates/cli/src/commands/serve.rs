//! `kollava serve`: load the model, then serve the HTTP API until Ctrl-C / SIGTERM.

use anyhow::{Context, Result};
use kollava_serve::{AppState, EngineHandle};

use crate::args::ServeArgs;
use crate::pipeline;

pub fn run(args: &ServeArgs) -> Result<()> {
    let session = pipeline::load(&args.model)?;
    let engine = EngineHandle::spawn(
        session,
        args.max_queue as usize,
        args.max_concurrency as usize,
    );
    engine.set_slow_reader_timeout(std::time::Duration::from_secs(args.stream_timeout));
    let api_key = args
        .api_key
        .clone()
        .or_else(|| std::env::var("KOLLAVA_API_KEY").ok())
        .filter(|k| !k.is_empty());
    runtime()?.block_on(async {
        let (listener, bound) = bind(&args.host, args.port).await?;
        eprintln!(
            "kollava serving {} on http://{bound} (OpenAI API at /v1/chat/completions)",
            engine.model_name
        );
        let mib = |b: usize| b >> 20;
        eprintln!(
            "caches: {} MiB for earlier prompts and answers, {} MiB for image features \
             (--prefix-cache-mb, --image-cache-mb; 0 turns one off)",
            mib(engine.prefix_cache.stats().budget),
            mib(engine.feature_cache.stats().budget)
        );
        if let (Some(url), Some(address)) = (&args.controller, &args.worker_address) {
            let queue = engine.clone();
            kollava_serve::controller::keep_registered(
                url.clone(),
                address.clone(),
                engine.model_name.clone(),
                std::sync::Arc::new(move || queue.queue_length()),
            );
        }
        kollava_serve::serve(
            listener,
            AppState::new(engine, api_key)
                .with_log_dir(args.log_dir.clone())
                .with_access(args.allow_remote_images, args.cors_origin.clone())
                .with_multi_image(args.multi_image),
            args.http.limits(),
        )
        .await
        .context("serving")
    })
}

/// `kollava controller`.
pub fn controller(args: &crate::args::ControllerArgs) -> Result<()> {
    use kollava_serve::controller::Dispatch;
    let (dispatch, method) = match args.dispatch_method {
        crate::args::Dispatch::Lottery => (Dispatch::Lottery, "lottery"),
        crate::args::Dispatch::ShortestQueue => (Dispatch::ShortestQueue, "shortest_queue"),
    };
    runtime()?.block_on(async {
        let (listener, bound) = bind(&args.host, args.port).await?;
        eprintln!("kollava controller on http://{bound} ({method})");
        kollava_serve::serve_controller(listener, dispatch, args.http.limits())
            .await
            .context("serving")
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Listens on `host:port`; returns the listener and the address it got (so that `--port 0`
/// can say which port that is).
async fn bind(host: &str, port: u16) -> Result<(tokio::net::TcpListener, String)> {
    let addr = format!("{host}:{port}");
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let bound = listener.local_addr().map(|a| a.to_string()).unwrap_or(addr);
    Ok((listener, bound))
}
