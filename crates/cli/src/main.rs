//! The `kollava` binary: parse arguments, run a command, map errors to exit codes.
//! Errors print as one `error: …` line with their causes (`{:#}`); a closed stdout (e.g.
//! `| head`) is not an error. [`args`] declares the flags, [`commands`] wires each
//! subcommand to the libraries, [`pipeline`] is what several commands share (the model's
//! path, templates, images from files or URLs), [`charts`] draws the PNG charts.

mod args;
mod charts;
mod commands;
mod pipeline;

use std::process::ExitCode;

use clap::Parser;

fn run() -> anyhow::Result<ExitCode> {
    // Errors are one line for users: keep candle (and anyhow) from capturing backtraces into
    // error values even when RUST_BACKTRACE is set. Panics still honour RUST_BACKTRACE.
    // Called before any other thread exists.
    std::env::set_var("RUST_LIB_BACKTRACE", "0");
    let cli = args::Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .init();
    match &cli.command {
        args::Command::Run(a) => commands::run::run(a).map(|_| ExitCode::SUCCESS),
        args::Command::Chat(a) => commands::chat::run(a).map(|_| ExitCode::SUCCESS),
        args::Command::Verify(a) => commands::verify::run(a),
        args::Command::InitRandom(a) => commands::init_random::run(a).map(|_| ExitCode::SUCCESS),
        args::Command::Eval(args::EvalCommand::Vqa(a)) => {
            commands::eval::vqa(a).map(|_| ExitCode::SUCCESS)
        }
        args::Command::Eval(args::EvalCommand::Summarize(a)) => {
            commands::eval::summarize(a).map(|_| ExitCode::SUCCESS)
        }
        args::Command::Data(args::DataCommand::Check(a)) => commands::data::check(a),
        args::Command::Data(args::DataCommand::Synth(a)) => commands::data::synth(a),
        args::Command::Tokenizer(args::TokenizerCommand::Train(a)) => {
            commands::tokenizer::train(a).map(|_| ExitCode::SUCCESS)
        }
        args::Command::Eval(args::EvalCommand::Review(a)) => {
            commands::eval::review(a).map(|_| ExitCode::SUCCESS)
        }
        args::Command::Eval(args::EvalCommand::ScienceQa(c)) => {
            commands::eval::science_qa(c).map(|_| ExitCode::SUCCESS)
        }
        args::Command::Eval(args::EvalCommand::Synth(a)) => {
            commands::eval::synth(a).map(|_| ExitCode::SUCCESS)
        }
        args::Command::ExtractProjector(a) => {
            commands::convert::extract_projector(a).map(|_| ExitCode::SUCCESS)
        }
        args::Command::ApplyDelta(a) => {
            commands::convert::delta(a, true).map(|_| ExitCode::SUCCESS)
        }
        args::Command::MakeDelta(a) => {
            commands::convert::delta(a, false).map(|_| ExitCode::SUCCESS)
        }
        args::Command::Convert(a) => commands::convert::run(a).map(|_| ExitCode::SUCCESS),
        args::Command::Quantize(a) => commands::convert::quantize(a).map(|_| ExitCode::SUCCESS),
        args::Command::Plot(a) => commands::train::plot(a).map(|_| ExitCode::SUCCESS),
        args::Command::MergeLora(a) => commands::train::merge_lora(a).map(|_| ExitCode::SUCCESS),
        args::Command::Train(a) => commands::train::run(a).map(|_| ExitCode::SUCCESS),
        args::Command::Serve(a) => commands::serve::run(a).map(|_| ExitCode::SUCCESS),
        args::Command::Controller(a) => commands::serve::controller(a).map(|_| ExitCode::SUCCESS),
        args::Command::Bench(a) => commands::bench::run(a).map(|_| ExitCode::SUCCESS),
    }
}

fn main() -> ExitCode {
    keep_large_buffers();
    match run() {
        Ok(code) => code,
        Err(err) => {
            if err.chain().any(|e| {
                e.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// A prefill allocates and frees buffers of megabytes hundreds of times (activations, the
/// tower's attention scores). By default glibc maps each from the kernel and unmaps it when
/// freed, and the page faults that zero it again cost a third of a quantized model's first
/// token on bench-1b (vision 1.32 → 0.86 s, prefill 2.96 → 2.12 s). So buffers up to
/// 256 MiB come from the heap, and the heap keeps up to 512 MiB of free memory.
fn keep_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator thresholds; no allocation is live across it
    // that depends on them.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}
