//! Training on the model crate's own forward path. So far: [`labels`] (a conversation →
//! ids and labels with upstream's masking arithmetic, quirks included) and [`loss`] (the
//! shifted cross-entropy over the spliced sequence and gradients of the trainable parts).
//! It has no forward pass of its own.

pub mod labels;
pub mod loss;

pub use labels::{label_rule, preprocess, LabelRule, TrainExample, IGNORE_INDEX};
