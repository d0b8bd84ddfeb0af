//! End-to-end tests of the `kollava` binary, run as a user runs it: every subcommand on
//! every fixture checkpoint, `verify` catching a perturbed reference, and every kind of bad
//! input turned into one `error: …` line that names the file or value at fault (never a
//! panic, never a backtrace).
//!
//! Broken checkpoints are built in a temp dir from a copy of the fixtures folder, so the
//! fixtures stay read-only. Keys, shapes and lengths are read from the fixtures, never
//! hard-coded, so the tests also hold on the hidden fixture set.
//!
//! One test binary; one module per command, helpers in [`common`].

mod bench;
mod chat;
mod common;
mod convert;
mod data;
mod demo;
mod eval;
mod interop;
mod quantize;
mod run;
mod serve;
mod train;
mod verify;
