//! How a model's weights are held for inference, decided in one place: from the dtype the
//! user asked for (if any), the checkpoint (safetensors/pickles or a GGUF pair, quantized or
//! not) and the machine (a GPU, our bf16 kernels). [`Checkpoint::load_for_inference`] then
//! builds the model in that form.

use candle_core::{DType, Device};
use kollava_model::form::Form;
use kollava_model::Llava;

use crate::{Checkpoint, CheckpointError};

/// The plan for a model's weights at inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Dense weights in this dtype (f32: the reference's numbers; f16: half the memory;
    /// bf16 where our bf16 kernels cannot run; any dtype on a GPU). On the CPU, matrices go
    /// into ggml containers of their dtype and activations run in f32.
    Dense(DType),
    /// Every matrix (tower and projector too) packed for our bf16 kernels, a 16-bit KV cache.
    PackedBf16,
    /// A GGUF pair's matrices as stored (k-quants stay in their blocks); with `bf16`, its
    /// float matrices (the tower's) packed for our bf16 kernels.
    AsStored { bf16: bool },
}

impl Precision {
    /// The plan for `asked` (`None`: the default) on `ckpt` and `device`. On the CPU the
    /// default is exact f32, except that a quantized GGUF model runs its float matrices in
    /// bf16 (its quantization error already dwarfs bf16 rounding).
    pub fn resolve(asked: Option<DType>, ckpt: &Checkpoint, device: &Device) -> Precision {
        let kernels = device.is_cpu() && kollava_model::kernels::bf16::available();
        match &ckpt.gguf {
            Some(pair) => Precision::AsStored {
                bf16: kernels
                    && match asked {
                        Some(d) => d == DType::BF16,
                        None => pair.is_quantized(),
                    },
            },
            None if asked == Some(DType::BF16) && kernels => Precision::PackedBf16,
            None => Precision::Dense(asked.unwrap_or(DType::F32)),
        }
    }

    /// One line for `-v` and `bench`: what is stored how, and which kernels run it.
    pub fn describe(self) -> String {
        let kernels = || match kollava_model::kernels::bf16::kernels() {
            Some(k) => format!("{k} kernels"),
            None => "no bf16 kernels".into(),
        };
        match self {
            Precision::Dense(DType::F32) => "f32 weights and activations (the reference's)".into(),
            Precision::Dense(d) => format!("{d:?} weights, f32 activations"),
            Precision::PackedBf16 => {
                format!("bf16 matrices packed for the {}, f16 KV cache", kernels())
            }
            Precision::AsStored { bf16: true } => format!(
                "GGUF matrices as stored, float ones packed for the {}, f16 KV cache",
                kernels()
            ),
            Precision::AsStored { bf16: false } => "GGUF matrices as stored".into(),
        }
    }
}

impl Precision {
    /// The form the model is built in on `device`: packed for our CPU kernels, as read on a
    /// GPU (which multiplies dense weights).
    pub fn form(self, device: &Device) -> Form {
        if !device.is_cpu() {
            return Form::AsRead;
        }
        match self {
            Precision::PackedBf16 | Precision::AsStored { bf16: true } => Form::PackedBf16,
            Precision::Dense(_) | Precision::AsStored { bf16: false } => Form::Packed,
        }
    }
}

impl Checkpoint {
    /// Loads the model as `precision` says, each matrix read straight into its final form.
    pub fn load_for_inference(
        &self,
        precision: Precision,
        device: &Device,
    ) -> Result<Llava, CheckpointError> {
        let form = precision.form(device);
        match (&self.gguf, precision) {
            (Some(pair), _) => pair.load(self, device, form),
            (None, Precision::Dense(dtype)) => self.load_with(dtype, device, form, &|vb, _| vb),
            (None, _) => self.load_with(DType::BF16, device, form, &|vb, _| vb),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{quantize, QuantType};

    /// Each request on each kind of checkpoint gets one plan: exact f32 by default, bf16
    /// packing where asked and the kernels exist, a GGUF model's matrices as stored (its
    /// float ones in bf16 when it is quantized or bf16 is asked).
    #[test]
    fn the_plan_follows_the_request_the_checkpoint_and_the_machine() {
        let cpu = Device::Cpu;
        let kernels = kollava_model::kernels::bf16::available();
        let dir = kollava_testkit::checkpoint_dir("llava-v1.5");
        let src = crate::open(dir.to_str().unwrap(), &Default::default()).unwrap();
        let plan = |asked, ckpt: &Checkpoint| Precision::resolve(asked, ckpt, &cpu);
        assert_eq!(plan(None, &src), Precision::Dense(DType::F32));
        assert_eq!(plan(Some(DType::F16), &src), Precision::Dense(DType::F16));
        let bf16 = if kernels {
            Precision::PackedBf16
        } else {
            Precision::Dense(DType::BF16)
        };
        assert_eq!(plan(Some(DType::BF16), &src), bf16);
        let tmp = tempfile::tempdir().unwrap();
        for (q, quantized) in [(QuantType::Q8_0, true), (QuantType::F16, false)] {
            let out = tmp.path().join(q.name());
            quantize(&src, &out, q, &mut |_, _| {}).unwrap();
            let pair = crate::open(out.to_str().unwrap(), &Default::default()).unwrap();
            let want = |bf16| Precision::AsStored { bf16 };
            assert_eq!(plan(None, &pair), want(kernels && quantized), "{q:?}");
            assert_eq!(plan(Some(DType::BF16), &pair), want(kernels), "{q:?}");
            assert_eq!(plan(Some(DType::F32), &pair), want(false), "{q:?}");
            let model = pair.load_for_inference(plan(None, &pair), &cpu).unwrap();
            assert_eq!(model.decoder.is_quantized(), quantized);
        }
    }
}
