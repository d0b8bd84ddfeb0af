//! Text generation on a loaded [`kollava_model::Llava`]: [`sampler`] (greedy, temperature,
//! top-k, top-p, repetition penalty, seeded) and [`engine`] (prefill, decode loop, stop
//! conditions, streaming), and [`session`], the loaded-checkpoint path every front end
//! shares. It knows nothing of HTTP or clap.

pub mod engine;
pub mod sampler;
pub mod session;

pub use engine::{
    generate, generate_batch, Batch, Finished, GenerateOptions, Generation, StopReason,
};
pub use sampler::{Sampler, SamplingParams};
pub use session::{Answer, AnswerOptions, Session, SessionError, SessionOptions};
