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

/// The device a `--device` names; a GPU needs a build with `--features cuda`.
pub(crate) fn device(spec: crate::args::DeviceSpec) -> anyhow::Result<candle_core::Device> {
    match spec {
        crate::args::DeviceSpec::Cpu => Ok(candle_core::Device::Cpu),
        #[cfg(feature = "cuda")]
        crate::args::DeviceSpec::Cuda(n) => candle_core::Device::new_cuda(n)
            .map_err(|e| anyhow::anyhow!("cannot open CUDA device {n}: {e}")),
        #[cfg(not(feature = "cuda"))]
        crate::args::DeviceSpec::Cuda(_) => anyhow::bail!(
            "this kollava was built without CUDA: rebuild with `cargo build --release --features cuda`"
        ),
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so an interrupted run
/// never leaves a half-written file.
pub(crate) fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}
