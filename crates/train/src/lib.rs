//! Training on the model crate's own forward path: [`data`] (the reference's JSON),
//! [`labels`] (a conversation → ids and labels with upstream's masking arithmetic, quirks
//! included), [`loss`] (shifted cross-entropy over the spliced sequence), [`optim`]
//! (AdamW, schedule, clipping), [`lora`] (adapters, 4-bit bases, merging), [`trainer`] (the
//! loop both stages share), [`run`] (a whole run as one call: resume, what trains, default
//! rates, checkpoints, metrics, the result) and [`synth`]
//! (the demo model's generated data), with [`tensorboard`] for watching runs.
//! It has no forward pass of its own.

pub mod check;
pub mod data;
pub mod dist;
pub mod labels;
pub mod lora;
pub mod loss;
pub mod optim;
pub mod plan;
pub mod run;
pub mod synth;
pub mod tensorboard;
pub mod trainer;

pub use labels::{label_rule, preprocess, LabelRule, TrainExample, IGNORE_INDEX};
