//! Text generation on a loaded [`kollava_model::Llava`]: [`sampler`] (greedy, temperature,
//! top-k, top-p, repetition penalty, seeded) and [`engine`] (prefill, decode loop, stop
//! conditions, streaming, continuous batching), [`constraint`] (answers held to a JSON
//! schema), [`prefix_cache`] (what earlier requests and
//! turns computed, reused), and [`session`], the loaded-checkpoint path every front end
//! shares. It knows nothing of HTTP or clap.

pub mod constraint;
pub mod engine;
pub mod prefix_cache;
pub mod sampler;
pub mod session;

pub use constraint::{Constraint, ConstraintError, Grammars, OutputFormat};
pub use engine::{generate, Batch, Finished, GenerateOptions, Generation, Prompt, StopReason};
pub use prefix_cache::{CacheStats, FeatureCache, PosKey, PrefixCache};
pub use sampler::{Sampler, SamplingParams, TokenLogprob};
pub use session::{Answer, AnswerOptions, Session, SessionError, SessionOptions};
