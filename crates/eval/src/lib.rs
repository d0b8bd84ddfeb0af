//! Evaluation: [`verify`] recomputes a reference dump (the fixtures' format, or one written
//! by `scripts/dump_reference.py` from a real checkpoint) and reports each key's difference;
//! [`vqa`] and [`science_qa`] answer benchmark questions and score them; [`review`] and
//! [`judge`] run LLaVA's GPT-review protocol against an OpenAI-compatible judge; [`synth`]
//! scores a model on held-out synthetic shapes data; [`quant`] measures how far a quantized
//! model drifts from its source; [`bench`] times the pipeline. Models load through `checkpoint` like every other entry point.

pub mod bench;
pub mod judge;
pub mod quant;
pub mod review;
pub mod science_qa;
pub mod synth;
pub mod verify;
pub mod vqa;
