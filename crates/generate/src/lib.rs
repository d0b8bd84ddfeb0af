//! Text generation on a loaded [`kollava_model::Llava`]: [`sampler`] (greedy, temperature,
//! top-k, top-p, repetition penalty, seeded) and [`engine`] (prefill, decode loop, stop
//! conditions, streaming). It knows nothing of HTTP, clap or template text: stop strings
//! and EOS ids come in as plain data.

pub mod engine;
pub mod sampler;

pub use engine::{generate, GenerateOptions, Generation, StopReason};
pub use sampler::{Sampler, SamplingParams};
