//! The handle between HTTP handlers and the model: one worker thread owns the
//! [`Session`] and answers jobs from a bounded queue in order, streaming text back over
//! a channel. A job whose receiver is gone (client disconnected) is cancelled at the next
//! token. Batching several requests per step comes later (issue 4); the handle's shape
//! does not change for it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

use kollava_generate::{AnswerOptions, Session, SessionError, StopReason};
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
    pub events: tmpsc::Sender<Event>,
}

/// What comes back, in order: text pieces, then exactly one `Done` or `Failed` (nothing
/// more when the job was cancelled).
#[derive(Debug)]
pub enum Event {
    Text(String),
    Done {
        text: String,
        prompt_tokens: usize,
        completion_tokens: usize,
        finish_reason: &'static str,
    },
    Failed(ApiError),
}

#[derive(Clone)]
pub struct EngineHandle {
    jobs: mpsc::SyncSender<Job>,
    pub model_name: String,
    /// Jobs queued or running (LLaVA's `queue_length`).
    pending: Arc<AtomicUsize>,
    /// The checkpoint follows the June-2023 worker, whose sampler has no top-k.
    pub june_sampler: bool,
}

impl EngineHandle {
    /// Starts the worker thread. At most `max_queue` jobs wait; more are refused.
    pub fn spawn(session: Session, max_queue: usize) -> EngineHandle {
        let (tx, rx) = mpsc::sync_channel::<Job>(max_queue);
        let model_name = session.ckpt.name.clone();
        let june_sampler = session.ckpt.family == kollava_checkpoint::Family::LlavaV0;
        let pending = Arc::new(AtomicUsize::new(0));
        let done = pending.clone();
        std::thread::Builder::new()
            .name("kollava-engine".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    let events = job.events.clone();
                    let last = run_job(&session, job);
                    // Count the job as finished before the client can see its end.
                    done.fetch_sub(1, Ordering::SeqCst);
                    if let Some(last) = last {
                        let _ = events.blocking_send(last);
                    }
                }
            })
            .expect("spawning the engine thread");
        EngineHandle {
            jobs: tx,
            model_name,
            pending,
            june_sampler,
        }
    }

    /// Jobs waiting or running.
    pub fn queue_length(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// Queues a job; 503 when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        self.pending.fetch_add(1, Ordering::SeqCst);
        self.jobs.try_send(job).map_err(|e| {
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

/// Runs a job, streaming its text; returns its final event (`None` when cancelled).
fn run_job(session: &Session, job: Job) -> Option<Event> {
    let (prompt, images) = render(session, job.input);
    let events = job.events;
    let result = session.answer_prompt(&prompt, &images, &job.options, &mut |piece| {
        events.blocking_send(Event::Text(piece.to_string())).is_ok()
    });
    let last = match result {
        Ok(answer) => {
            let g = answer.generation;
            if g.stop == StopReason::Cancelled {
                return None;
            }
            Event::Done {
                text: g.text,
                prompt_tokens: answer.prompt_tokens,
                completion_tokens: g.ids.len(),
                finish_reason: if matches!(g.stop, StopReason::MaxTokens | StopReason::Context) {
                    "length"
                } else {
                    "stop"
                },
            }
        }
        Err(e) => Event::Failed(session_error(e)),
    };
    Some(last)
}
