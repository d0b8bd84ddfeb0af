//! LLaVA model graphs on candle: [`clip`] (vision tower), [`projector`], [`decoder`]
//! (LLaMA/Mistral and MPT), composed in [`llava`]; the CPU kernels they call live apart in
//! [`kernels`]. [`config::ModelConfig`] describes any supported
//! checkpoint; the `checkpoint` crate builds it and hands over `VarBuilder`s with canonical
//! key names, so this crate never sees files or family-specific key layouts.
//!
//! Weights are immutable; per-sequence state is a [`kv_cache::KvCache`]. The decoder takes
//! embeddings and returns every position's hidden state, so inference and training share
//! one forward path.

pub mod clip;
pub mod config;
pub mod decoder;
pub mod form;
pub mod kernels;
pub mod kv_cache;
pub mod layers;
pub mod llava;
pub mod projector;

pub use config::ModelConfig;
pub use kv_cache::KvCache;
pub use llava::Llava;
