//! One file per subcommand: wiring only.

pub mod chat;
pub mod run;
pub mod verify;
