//! Training on the model crate's own forward path: [`data`] (the reference's JSON),
//! [`labels`] (a conversation → ids and labels with upstream's masking arithmetic, quirks
//! included), [`loss`] (shifted cross-entropy over the spliced sequence), [`optim`]
//! (schedule, clipping) and [`pretrain`] (stage 1: the projector alone).
//! It has no forward pass of its own.

pub mod check;
pub mod data;
pub mod labels;
pub mod loss;
pub mod optim;
pub mod pretrain;

pub use labels::{label_rule, preprocess, LabelRule, TrainExample, IGNORE_INDEX};
