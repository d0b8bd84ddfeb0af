//! Everything that turns a user's image and words into model inputs, matching the Python
//! reference exactly: [`image`] (decode, PIL-exact resize, pad/crop, normalise),
//! [`tokenizer`] (sentencepiece and tokenizer.json), [`template`] (conversation templates)
//! and [`prompt`] (rendered text → ids + image slots).
//!
//! This crate knows no model weights and no tensors: it hands plain data (`Vec<f32>` pixels
//! in CHW order, `Vec<u32>` ids, image slots) to the model crate.

pub mod image;
pub mod prompt;
pub mod template;
pub mod tokenizer;
pub mod untrusted;

pub use prompt::{ImageSlot, ImageTokens, Prompt};
pub use tokenizer::{StreamDecoder, Tokenizer};
