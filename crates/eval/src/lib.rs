//! Evaluation. For now: [`verify`], which recomputes a reference dump (the fixtures'
//! format, or one written by `scripts/dump_reference.py` from a real checkpoint) and
//! reports each key's difference. It loads models through `checkpoint` like every other
//! entry point.

pub mod bench;
pub mod judge;
pub mod quant;
pub mod review;
pub mod science_qa;
pub mod synth;
pub mod verify;
pub mod vqa;
