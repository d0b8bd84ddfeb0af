//! The form a model's weights take as it is built. The checkpoint crate's `Precision`
//! chooses it once; every matrix is read straight into it (a GGUF file's blocks taken as
//! stored), so no model exists first in one form and then in another.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::Result;

/// How a whole model is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Form {
    /// Dense tensors as read: what training differentiates and what a GPU multiplies.
    #[default]
    AsRead,
    /// For the CPU's inference kernels: the decoder's matrices in ggml containers of their
    /// own dtype (decoding reads each once, in that width, on all threads), its norms and
    /// activations in f32; the tower and projector in f32.
    Packed,
    /// Every matrix (the tower's and projector's too) packed for our bf16 kernels, a 16-bit
    /// KV cache. Needs [`crate::kernels::bf16::available`].
    PackedBf16,
    /// For QLoRA training: the decoder layers' matrices quantized to 4 bits as each is read
    /// (the frozen base never exists whole in f32), everything else as read.
    Q4Base,
}

impl Form {
    /// How the decoder's matrices are held.
    pub fn decoder(self) -> Pack {
        match self {
            Form::AsRead => Pack::AsRead,
            Form::Packed => Pack::Ggml,
            Form::PackedBf16 => Pack::Bf16,
            Form::Q4Base => Pack::Q4_0,
        }
    }

    /// How the tower's and projector's matrices are held.
    pub fn vision(self) -> Pack {
        match self {
            Form::AsRead | Form::Q4Base => Pack::AsRead,
            Form::Packed => Pack::F32,
            Form::PackedBf16 => Pack::Bf16,
        }
    }
}

/// How one matrix is held (see [`crate::layers::Linear::in_form`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pack {
    /// As read.
    AsRead,
    /// Dense f32 (a stored 16-bit matrix widened once rather than at every use).
    F32,
    /// A ggml container of the stored dtype (quantized matrices stay as they are).
    Ggml,
    /// Packed for our bf16 kernels (quantized matrices stay as they are).
    Bf16,
    /// A frozen base in ggml's Q4_0 blocks (QLoRA; a matrix whose rows are not whole blocks
    /// stays as read).
    Q4_0,
}

/// Matrices a checkpoint holds in ggml blocks (a GGUF file's), handed to the model as
/// stored instead of through a dense tensor.
pub trait StoredMatrices {
    /// The matrix with canonical name `name` (`model.layers.0.self_attn.q_proj.weight`,
    /// `vision_model.encoder.layers.0.mlp.fc1.weight`, `model.embed_tokens.weight`) when it
    /// is kept in blocks; `None` when it is read as a dense tensor.
    fn matrix(&self, name: &str) -> Result<Option<Arc<QTensor>>>;
}

/// What [`crate::layers::Linear::load`] needs besides the weights: how to hold the matrix,
/// and where stored blocks come from.
#[derive(Clone, Copy)]
pub struct Matrices<'a> {
    pub pack: Pack,
    pub stored: Option<&'a dyn StoredMatrices>,
}

impl Matrices<'_> {
    /// Dense tensors as read, nothing stored in blocks (training, tests).
    pub const AS_READ: Matrices<'static> = Matrices {
        pack: Pack::AsRead,
        stored: None,
    };

    /// The stored blocks of `name`, if any.
    pub fn stored(&self, name: &str) -> Result<Option<Arc<QTensor>>> {
        match self.stored {
            Some(s) => s.matrix(name),
            None => Ok(None),
        }
    }
}

impl std::fmt::Debug for Matrices<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Matrices")
            .field("pack", &self.pack)
            .field("stored", &self.stored.is_some())
            .finish()
    }
}
