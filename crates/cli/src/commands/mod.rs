//! One file per subcommand: wiring only.

pub mod bench;
pub mod chat;
pub mod convert;
pub mod data;
pub mod eval;
pub mod init_random;
pub mod run;
pub mod serve;
pub mod tokenizer;
pub mod train;
pub mod verify;
