//! Tensor-only state dicts written as `torch.save` writes them, for the Python code that reads
//! `.bin` files with `torch.load` (LLaVA's `--pretrain_mm_mlp_adapter`, its
//! `non_lora_trainables.bin`). The format: a zip archive (entries stored, 64-byte aligned as
//! torch aligns them) holding `archive/data.pkl`, a pickle (protocol 2) of a dict whose values
//! are `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())`
//! with each storage a persistent id `('storage', torch.<Type>Storage, key, 'cpu', numel)`,
//! the storages' bytes as `archive/data/<key>`, and `archive/version`. Everything it names is
//! on `torch.load`'s `weights_only` allow-list. Reading goes through candle's pickle reader.

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Tensor};

use crate::CheckpointError;

/// candle's [`PthTensors::new`](candle_core::pickle::PthTensors::new) for `path`, its panics
/// on malformed pickles being errors (see [`crate::untrusted`]).
pub fn open(path: &Path) -> candle_core::Result<candle_core::pickle::PthTensors> {
    guarded(|| candle_core::pickle::PthTensors::new(path, None))
}

/// The tensors a `.bin` file lists (names, dtypes, layouts), read without their data.
pub fn tensor_info(path: &Path) -> candle_core::Result<Vec<candle_core::pickle::TensorInfo>> {
    guarded(|| candle_core::pickle::read_pth_tensor_info(path, false, None))
}

/// One tensor of an opened `.bin` file (`None`: not in it).
pub fn get(
    pth: &candle_core::pickle::PthTensors,
    name: &str,
) -> candle_core::Result<Option<Tensor>> {
    guarded(|| pth.get(name))
}

fn guarded<T>(f: impl FnOnce() -> candle_core::Result<T>) -> candle_core::Result<T> {
    crate::untrusted::guard(f).unwrap_or_else(|p| {
        Err(candle_core::Error::Msg(format!(
            "malformed PyTorch pickle ({p})"
        )))
    })
}

/// Writes `tensors` (name → tensor, in this order) to `path` as `torch.save({...})` would,
/// through a temporary file renamed into place.
pub fn save(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), CheckpointError> {
    let err = |reason: String| CheckpointError::Io {
        path: path.display().to_string(),
        reason,
    };
    let mut pickle = Pickle::default();
    let mut storages = Vec::with_capacity(tensors.len());
    pickle.header();
    for (key, (name, t)) in tensors.iter().enumerate() {
        let storage = match t.dtype() {
            DType::F32 => "FloatStorage",
            DType::F16 => "HalfStorage",
            DType::BF16 => "BFloat16Storage",
            DType::F64 => "DoubleStorage",
            DType::I64 => "LongStorage",
            DType::U8 => "ByteStorage",
            other => return Err(err(format!("{name}: no torch storage for {other:?}"))),
        };
        pickle.tensor(name, storage, &key.to_string(), t.dims());
        storages.push(bytes(t).map_err(|e| err(format!("{name}: {e}")))?);
    }
    pickle.footer();

    let tmp = path.with_extension("bin.partial");
    let write = || -> zip::result::ZipResult<()> {
        let file = std::fs::File::create(&tmp)?;
        let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .with_alignment(64)
            .large_file(storages.iter().any(|s| s.len() >= u32::MAX as usize));
        zip.start_file("archive/data.pkl", opts)?;
        zip.write_all(&pickle.out)?;
        zip.start_file("archive/byteorder", opts)?;
        zip.write_all(b"little")?;
        for (key, data) in storages.iter().enumerate() {
            zip.start_file(format!("archive/data/{key}"), opts)?;
            zip.write_all(data)?;
        }
        zip.start_file("archive/version", opts)?;
        zip.write_all(b"3\n")?;
        zip.finish()?.flush()?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e.to_string()));
    }
    std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))
}

/// A tensor's values, contiguous, little-endian.
fn bytes(t: &Tensor) -> candle_core::Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => le(t.to_vec1::<f32>()?, f32::to_le_bytes),
        DType::F16 => le(t.to_vec1::<half::f16>()?, half::f16::to_le_bytes),
        DType::BF16 => le(t.to_vec1::<half::bf16>()?, half::bf16::to_le_bytes),
        DType::F64 => le(t.to_vec1::<f64>()?, f64::to_le_bytes),
        DType::I64 => le(t.to_vec1::<i64>()?, i64::to_le_bytes),
        DType::U8 => t.to_vec1::<u8>()?,
        other => candle_core::bail!("no torch storage for {other:?}"),
    })
}

fn le<T: Copy, const N: usize>(values: Vec<T>, f: fn(T) -> [u8; N]) -> Vec<u8> {
    values.into_iter().flat_map(f).collect()
}

/// The pickle opcodes `torch.save` uses for a flat dict of tensors.
#[derive(Default)]
struct Pickle {
    out: Vec<u8>,
}

impl Pickle {
    const MARK: u8 = b'(';
    const TUPLE: u8 = b't';
    const EMPTY_TUPLE: u8 = b')';
    const REDUCE: u8 = b'R';
    const BINPERSID: u8 = b'Q';
    const NEWFALSE: u8 = 0x89;

    /// `PROTO 2`, an empty dict, and the mark its items follow.
    fn header(&mut self) {
        self.out.extend([0x80, 2, b'}', Self::MARK]);
    }

    /// `SETITEMS`, `STOP`.
    fn footer(&mut self) {
        self.out.extend([b'u', b'.']);
    }

    fn global(&mut self, module: &str, name: &str) {
        self.out.push(b'c');
        self.out.extend(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend(name.as_bytes());
        self.out.push(b'\n');
    }

    fn string(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend((s.len() as u32).to_le_bytes());
        self.out.extend(s.as_bytes());
    }

    fn int(&mut self, v: usize) {
        match i32::try_from(v) {
            Ok(v) => {
                self.out.push(b'J');
                self.out.extend(v.to_le_bytes());
            }
            Err(_) => {
                // LONG1: little-endian two's complement, eight bytes.
                self.out.extend([0x8a, 8]);
                self.out.extend((v as i64).to_le_bytes());
            }
        }
    }

    fn ints(&mut self, vs: &[usize]) {
        self.out.push(Self::MARK);
        for &v in vs {
            self.int(v);
        }
        self.out.push(Self::TUPLE);
    }

    /// `name: _rebuild_tensor_v2(storage, 0, dims, contiguous strides, False, OrderedDict())`.
    fn tensor(&mut self, name: &str, storage: &str, key: &str, dims: &[usize]) {
        self.string(name);
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.push(Self::MARK);
        // The storage, by persistent id.
        self.out.push(Self::MARK);
        self.string("storage");
        self.global("torch", storage);
        self.string(key);
        self.string("cpu");
        self.int(dims.iter().product());
        self.out.push(Self::TUPLE);
        self.out.push(Self::BINPERSID);
        self.int(0);
        self.ints(dims);
        let mut strides = vec![1; dims.len()];
        for i in (0..dims.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * dims[i + 1];
        }
        self.ints(&strides);
        self.out.push(Self::NEWFALSE);
        self.global("collections", "OrderedDict");
        self.out.extend([Self::EMPTY_TUPLE, Self::REDUCE]);
        self.out.push(Self::TUPLE);
        self.out.push(Self::REDUCE);
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    /// What we write, candle's pickle reader (the one kollava loads `.bin` checkpoints with)
    /// reads back exactly, in every dtype; torch itself reads it in the interop tests.
    #[test]
    fn candle_reads_back_what_we_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.bin");
        let a = Tensor::arange(0f32, 24., &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        let tensors = vec![
            ("model.mm_projector.0.weight".to_string(), a.clone()),
            ("half".to_string(), a.to_dtype(DType::F16).unwrap()),
            ("brain".to_string(), a.to_dtype(DType::BF16).unwrap()),
            (
                "scalar".to_string(),
                Tensor::new(3.5f32, &Device::Cpu).unwrap(),
            ),
        ];
        super::save(&path, &tensors).unwrap();
        let read: std::collections::HashMap<String, Tensor> = candle_core::pickle::read_all(&path)
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(read.len(), tensors.len());
        for (name, want) in &tensors {
            let got = &read[name];
            assert_eq!(got.dtype(), want.dtype());
            assert_eq!(got.dims(), want.dims());
            let values = |t: &Tensor| -> Vec<f32> {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let diff = kollava_testkit::max_abs_diff(&values(got), &values(want));
            assert_eq!(diff, 0.0, "{name}");
        }
        assert!(!dir.path().join("x.bin.partial").exists());
    }
}
