//! The handle between HTTP handlers and the model: one worker thread owns the
//! [`Session`] and decodes every running request together (continuous batching): between
//! two decode steps it prefills the requests that arrived and lets them join, and a request
//! leaves the batch the step it ends. Text streams back over a channel per request (see
//! [`events`]), which never makes the batch wait: a request whose receiver is gone (the
//! client disconnected), or whose client has left a backlog unread for longer than the
//! slow-reader timeout, is dropped before the next step.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use kollava_generate::session::Timings;
use kollava_generate::{
    AnswerOptions, Batch, FeatureCache, Finished, PrefixCache, Session, SessionError, StopReason,
};
use kollava_inputs::image::RgbImage;
use kollava_inputs::template::{Conversation, Role};
use tokio::sync::mpsc as tmpsc;

use crate::error::ApiError;

/// One turn of a conversation as the API received it.
#[derive(Debug, Clone)]
pub struct Turn {
    pub role: Role,
    pub text: String,
    pub images: Vec<RgbImage>,
}

/// The conversation to answer.
#[derive(Clone)]
pub enum Input {
    /// OpenAI-style messages, rendered with the checkpoint's template.
    Turns {
        system: Option<String>,
        turns: Vec<Turn>,
    },
    /// A prompt rendered by the client (LLaVA's worker protocol), with its images.
    Prompt { text: String, images: Vec<RgbImage> },
}

/// What a client asked for.
pub struct Job {
    pub input: Input,
    pub options: AnswerOptions,
    pub events: EventSender,
}

/// Unread events past which a request's client counts as behind.
const BACKLOG: usize = 64;

/// The engine's end of a request's events. Sending never waits: events the client has not
/// read yet queue up, and the engine drops a request whose client stays more than
/// [`BACKLOG`] events behind for longer than the slow-reader timeout.
#[derive(Clone)]
pub struct EventSender {
    tx: tmpsc::UnboundedSender<Event>,
    unread: Arc<AtomicUsize>,
}

impl EventSender {
    /// `false` when the receiver is gone.
    fn send(&self, e: Event) -> bool {
        self.unread.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(e).is_err() {
            self.unread.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    fn unread(&self) -> usize {
        self.unread.load(Ordering::SeqCst)
    }

    /// Whether the receiver is gone (the client disconnected).
    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// The handler's end of a request's events, in order.
pub struct EventReceiver {
    rx: tmpsc::UnboundedReceiver<Event>,
    unread: Arc<AtomicUsize>,
}

impl EventReceiver {
    pub async fn recv(&mut self) -> Option<Event> {
        let e = self.rx.recv().await;
        if e.is_some() {
            self.unread.fetch_sub(1, Ordering::SeqCst);
        }
        e
    }
}

impl tokio_stream::Stream for EventReceiver {
    type Item = Event;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Event>> {
        let polled = self.rx.poll_recv(cx);
        if let std::task::Poll::Ready(Some(_)) = &polled {
            self.unread.fetch_sub(1, Ordering::SeqCst);
        }
        polled
    }
}

/// A request's event channel.
pub fn events() -> (EventSender, EventReceiver) {
    let (tx, rx) = tmpsc::unbounded_channel();
    let unread = Arc::new(AtomicUsize::new(0));
    (
        EventSender {
            tx,
            unread: unread.clone(),
        },
        EventReceiver { rx, unread },
    )
}

/// What comes back, in order: text pieces, then exactly one `Done` or `Failed` (nothing
/// more when the job was cancelled).
#[derive(Debug)]
pub enum Event {
    Text(String),
    Done {
        text: String,
        prompt_tokens: usize,
        /// Of the prompt's tokens, those reused from the prefix cache.
        cached_tokens: usize,
        completion_tokens: usize,
        finish_reason: &'static str,
        /// OpenAI's `logprobs.content`, when asked for.
        logprobs: Option<serde_json::Value>,
    },
    Failed(ApiError),
}

/// OpenAI's `logprobs.content` for `picks` (`None` when none were asked for): each token's
/// text and UTF-8 bytes (a byte-fallback token's one byte), its log-probability, and its
/// alternatives'.
fn logprobs_json(
    tok: &kollava_inputs::Tokenizer,
    picks: &[kollava_generate::TokenLogprob],
) -> Option<serde_json::Value> {
    if picks.is_empty() {
        return None;
    }
    let entry = |id: u32, logprob: f32| {
        let mut bytes = tok.decode_bytes(&[id], false);
        // Decoding one token drops sentencepiece's word-start space: put it back.
        if tok
            .id_to_token(id)
            .is_some_and(|t| t.starts_with('\u{2581}'))
            && !bytes.starts_with(b" ")
        {
            bytes.insert(0, b' ');
        }
        serde_json::json!({
            "token": String::from_utf8_lossy(&bytes),
            "logprob": logprob,
            "bytes": bytes,
        })
    };
    Some(serde_json::Value::Array(
        picks
            .iter()
            .map(|p| {
                let mut e = entry(p.id, p.logprob);
                e["top_logprobs"] = p.top.iter().map(|&(t, lp)| entry(t, lp)).collect();
                e
            })
            .collect(),
    ))
}

/// Live figures for `/metrics`, written by the engine thread.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Sequences in the running batch, and the most there have been at once.
    pub running: AtomicUsize,
    pub peak_running: AtomicUsize,
    /// Sum (µs) and count of the times from submission to the first token.
    pub first_token_us: AtomicU64,
    pub first_tokens: AtomicU64,
    /// Tokens per second over the last decode step, all sequences together (f64 bits).
    pub step_tokens_per_s: AtomicU64,
    /// Requests dropped because their client went away.
    pub cancelled: AtomicU64,
    /// Requests dropped because their client read its stream too slowly.
    pub slow_readers: AtomicU64,
    /// Answers stored in the prefix cache for their conversations' next turns.
    pub answers_stored: AtomicU64,
}

impl EngineStats {
    pub fn tokens_per_s(&self) -> f64 {
        f64::from_bits(self.step_tokens_per_s.load(Ordering::Relaxed))
    }
}

#[derive(Clone)]
pub struct EngineHandle {
    jobs: mpsc::SyncSender<(Instant, Job)>,
    pub model_name: String,
    /// Jobs queued or running (LLaVA's `queue_length`).
    pending: Arc<AtomicUsize>,
    pub stats: Arc<EngineStats>,
    /// The reference worker's top-k for this checkpoint (0: off), the default of LLaVA's
    /// worker protocol.
    pub worker_top_k: usize,
    /// The model's vocabulary size (what `logit_bias` may name).
    pub vocab_size: usize,
    /// The session's caches, for `/metrics`.
    pub prefix_cache: Arc<PrefixCache>,
    pub feature_cache: Arc<FeatureCache>,
    /// The session's vocabulary for structured output (requests compile their formats).
    pub grammars: Arc<kollava_generate::Grammars>,
    /// How long a client may stay behind its stream (ms).
    slow_reader_ms: Arc<AtomicU64>,
}

/// The default slow-reader timeout.
pub const SLOW_READER: Duration = Duration::from_secs(30);

impl EngineHandle {
    /// How long a client may leave more than [`BACKLOG`] events of its stream unread
    /// before its request is dropped (default [`SLOW_READER`]).
    pub fn set_slow_reader_timeout(&self, d: Duration) {
        self.slow_reader_ms
            .store(d.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    /// Starts the worker thread. At most `max_queue` jobs wait (more are refused) and at
    /// most `max_concurrency` are decoded together.
    pub fn spawn(session: Session, max_queue: usize, max_concurrency: usize) -> EngineHandle {
        let (tx, rx) = mpsc::sync_channel::<(Instant, Job)>(max_queue);
        let model_name = session.ckpt.name.clone();
        let worker_top_k = session.ckpt.worker_top_k();
        let vocab_size = session.ckpt.config.decoder.vocab_size;
        let pending = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(EngineStats::default());
        let slow_reader_ms = Arc::new(AtomicU64::new(SLOW_READER.as_millis() as u64));
        let (prefix_cache, feature_cache) =
            (session.prefix_cache.clone(), session.feature_cache.clone());
        let grammars = session.grammars.clone();
        let worker = Worker {
            session,
            rx,
            pending: pending.clone(),
            stats: stats.clone(),
            max_concurrency: max_concurrency.max(1),
            slow_reader_ms: slow_reader_ms.clone(),
        };
        std::thread::Builder::new()
            .name("kollava-engine".into())
            .spawn(move || worker.run())
            .expect("spawning the engine thread");
        EngineHandle {
            jobs: tx,
            model_name,
            pending,
            stats,
            worker_top_k,
            vocab_size,
            prefix_cache,
            feature_cache,
            grammars,
            slow_reader_ms,
        }
    }

    /// Jobs waiting or running.
    pub fn queue_length(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// Queues a job; 503 when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        self.pending.fetch_add(1, Ordering::SeqCst);
        self.jobs.try_send((Instant::now(), job)).map_err(|e| {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            match e {
                mpsc::TrySendError::Full(_) => ApiError::unavailable(
                    "the server is busy: too many queued requests, retry later",
                ),
                mpsc::TrySendError::Disconnected(_) => {
                    ApiError::internal("the engine thread has stopped")
                }
            }
        })
    }
}

/// How long the engine waits for a request before it stores the answers it gave (one
/// prefill of each): longer than an API client takes to send the next turn of a scripted
/// conversation, far shorter than a person takes to read an answer.
const STORE_WHEN_IDLE_FOR: Duration = Duration::from_millis(100);

/// What the batch remembers of a request.
struct Tag {
    events: EventSender,
    prompt_tokens: usize,
}

/// The engine thread's state.
struct Worker {
    session: Session,
    rx: mpsc::Receiver<(Instant, Job)>,
    pending: Arc<AtomicUsize>,
    stats: Arc<EngineStats>,
    max_concurrency: usize,
    slow_reader_ms: Arc<AtomicU64>,
}

impl Worker {
    fn run(self) {
        let mut batch: Batch<'static, Tag> = self.session.batch();
        loop {
            // Admit what has arrived; wait only when there is nothing to decode.
            while batch.len() < self.max_concurrency {
                let next = if batch.is_empty() && batch.has_answers() {
                    // Answers are stored for their conversations' next turns once the
                    // server is idle: a client that sends its next turn at once gets it
                    // without waiting for that (its prefill covers the answer anyway).
                    match self.rx.recv_timeout(STORE_WHEN_IDLE_FOR) {
                        Ok(job) => job,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            let stored = self.session.store_answers(&mut batch);
                            self.stats
                                .answers_stored
                                .fetch_add(stored as u64, Ordering::Relaxed);
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                } else if batch.is_empty() {
                    match self.rx.recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    }
                } else {
                    match self.rx.try_recv() {
                        Ok(job) => job,
                        Err(_) => break,
                    }
                };
                if let Some(done) = self.admit(&mut batch, next) {
                    self.finish(done);
                }
            }
            self.stats.running.store(batch.len(), Ordering::Relaxed);
            self.stats
                .peak_running
                .fetch_max(batch.len(), Ordering::Relaxed);
            let tok = &self.session.tok;
            match batch.cancel(tok, |t| t.events.is_closed()) {
                Ok(gone) => gone.into_iter().for_each(|f| self.finish(Ok(f))),
                Err(e) => return self.fail_all(&mut batch, e),
            };
            if batch.is_empty() {
                continue;
            }
            let t = Instant::now();
            let n = batch.len();
            match batch.step(&self.session.model, tok) {
                Ok(ended) => {
                    let rate = n as f64 / t.elapsed().as_secs_f64().max(1e-9);
                    self.stats
                        .step_tokens_per_s
                        .store(rate.to_bits(), Ordering::Relaxed);
                    for done in ended {
                        self.finish(Ok(done));
                    }
                }
                Err(e) => self.fail_all(&mut batch, e),
            }
        }
    }

    /// Prefills a job and adds it to the batch; returns it when it has already ended (or
    /// failed).
    fn admit(
        &self,
        batch: &mut Batch<'static, Tag>,
        (submitted, job): (Instant, Job),
    ) -> Option<Result<Finished<Tag>, (Tag, ApiError)>> {
        let session = &self.session;
        let (prompt, images) = render(session, job.input);
        let mut timings = Timings::default();
        let prepared = session.prepare(&prompt, &images, &job.options, &mut timings);
        let mut tag = Tag {
            events: job.events,
            prompt_tokens: 0,
        };
        let (embedded, opts) = match prepared {
            Ok(p) => p,
            Err(e) => return Some(Err((tag, session_error(e)))),
        };
        tag.prompt_tokens = embedded.tokens;
        let events = tag.events.clone();
        let stats = self.stats.clone();
        let mut first = true;
        let slow_reader = Duration::from_millis(self.slow_reader_ms.load(Ordering::Relaxed));
        let mut behind_since: Option<Instant> = None;
        let on_text = move |piece: &str| {
            if first {
                first = false;
                let us = submitted.elapsed().as_micros() as u64;
                stats.first_token_us.fetch_add(us, Ordering::Relaxed);
                stats.first_tokens.fetch_add(1, Ordering::Relaxed);
            }
            if !events.send(Event::Text(piece.to_string())) {
                return false;
            }
            if events.unread() <= BACKLOG {
                behind_since = None;
            } else if behind_since.get_or_insert_with(Instant::now).elapsed() > slow_reader {
                tracing::info!(
                    "a client left {} events unread for over {slow_reader:?}: request dropped",
                    events.unread()
                );
                stats.slow_readers.fetch_add(1, Ordering::Relaxed);
                // What the client finds at the end of what it has not read yet.
                events.send(Event::Failed(ApiError {
                    status: axum::http::StatusCode::REQUEST_TIMEOUT,
                    message: format!(
                        "the answer was stopped: this client left it unread for over {slow_reader:?}"
                    ),
                }));
                return false;
            }
            true
        };
        let failed = tag.events.clone();
        let t_prefill = Instant::now();
        let joined = batch.join_prompt(
            &session.model,
            &session.tok,
            embedded.prompt(),
            &opts,
            on_text,
            tag,
        );
        tracing::debug!(
            "request: {:.0} ms queued and tokenizing, preprocess {:.0} ms, vision {:.0} ms, prefill {:.0} ms \
             ({} positions)",
            (t_prefill - submitted).as_secs_f64() * 1e3
                - timings.preprocess_ms
                - timings.vision_ms,
            timings.preprocess_ms,
            timings.vision_ms,
            t_prefill.elapsed().as_secs_f64() * 1e3,
            embedded.tokens,
        );
        match joined {
            Ok(None) => None,
            Ok(Some(done)) => Some(Ok(done)),
            Err(e) => Some(Err((
                Tag {
                    events: failed,
                    prompt_tokens: 0,
                },
                ApiError::internal(format!("prefill: {e}")),
            ))),
        }
    }

    /// Sends a request's last event and counts it as no longer pending.
    fn finish(&self, done: Result<Finished<Tag>, (Tag, ApiError)>) {
        // Count the job as finished before the client can see its end.
        self.pending.fetch_sub(1, Ordering::SeqCst);
        let (events, last) = match done {
            Ok(Finished { tag, generation: g }) => {
                if g.stop == StopReason::Cancelled {
                    self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                if g.stop == StopReason::Grammar {
                    let e = ApiError::internal("constrained decoding failed (see the server log)");
                    tag.events.send(Event::Failed(e));
                    return;
                }
                let logprobs = logprobs_json(&self.session.tok, &g.logprobs);
                let last = Event::Done {
                    logprobs,
                    text: g.text,
                    prompt_tokens: tag.prompt_tokens,
                    cached_tokens: g.cached_tokens,
                    completion_tokens: g.ids.len(),
                    finish_reason: if matches!(g.stop, StopReason::MaxTokens | StopReason::Context)
                    {
                        "length"
                    } else {
                        "stop"
                    },
                };
                (tag.events, last)
            }
            Err((tag, e)) => (tag.events, Event::Failed(e)),
        };
        events.send(last);
    }

    /// A decode step failed: every running request gets the error.
    fn fail_all(&self, batch: &mut Batch<'static, Tag>, e: impl std::fmt::Display) {
        let message = format!("decode step: {e}");
        match batch.cancel(&self.session.tok, |_| true) {
            Ok(gone) => {
                for f in gone {
                    self.finish(Err((f.tag, ApiError::internal(&message))));
                }
            }
            Err(e2) => {
                tracing::error!("{message}; clearing the batch failed too: {e2}");
                self.pending.fetch_sub(batch.len(), Ordering::SeqCst);
                *batch = self.session.batch();
            }
        }
    }
}

fn session_error(e: SessionError) -> ApiError {
    match e {
        SessionError::TooLong { .. }
        | SessionError::ImageCount { .. }
        | SessionError::Sampling(_)
        | SessionError::Prompt(_) => ApiError::bad_request(e.to_string()),
        other => ApiError::internal(other),
    }
}

fn render(session: &Session, input: Input) -> (String, Vec<RgbImage>) {
    match input {
        Input::Prompt { text, images } => (text, images),
        Input::Turns { system, turns } => {
            let mut template = session.template.clone();
            if let Some(system) = system {
                template.system = system;
                template.few_shot.clear();
            }
            let mut conv = Conversation::new(template);
            let mut images = Vec::new();
            for turn in turns {
                let text = match turn.role {
                    Role::User => session.user_text(&turn.text, turn.images.len()),
                    Role::Assistant => turn.text,
                };
                conv.push(turn.role, Some(text));
                images.extend(turn.images);
            }
            conv.push(Role::Assistant, None);
            (conv.prompt(), images)
        }
    }
}
