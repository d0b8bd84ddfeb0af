//! The multimodal projector (`model.mm_projector`, llava-hf's `multi_modal_projector`):
//! maps CLIP features into the decoder's embedding space (llava-spec §1b).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::{Activation, ProjectorKind};
use crate::layers::{activate, Linear};

#[derive(Debug, Clone)]
pub struct Projector {
    /// Linear layers in order; an activation sits between consecutive ones.
    linears: Vec<Linear>,
    activation: Activation,
}

impl Projector {
    /// `vb` is scoped at `model.mm_projector`. `Linear` loads `weight`/`bias` there;
    /// `Mlp` loads `0`, `2`, `4`, … (the `nn.Sequential` indices, activations at the odd ones).
    pub fn load(
        vb: VarBuilder,
        kind: ProjectorKind,
        vision_dim: usize,
        hidden: usize,
    ) -> Result<Self> {
        let (linears, activation) = match kind {
            ProjectorKind::Identity => (Vec::new(), Activation::Gelu),
            ProjectorKind::Linear => (
                vec![Linear::load(vb, vision_dim, hidden, true)?],
                Activation::Gelu,
            ),
            ProjectorKind::Mlp { depth, activation } => {
                let mut v = Vec::with_capacity(depth);
                for i in 0..depth {
                    let in_dim = if i == 0 { vision_dim } else { hidden };
                    v.push(Linear::load(vb.pp(2 * i), in_dim, hidden, true)?);
                }
                (v, activation)
            }
        };
        Ok(Self {
            linears,
            activation,
        })
    }

    /// `xs: (…, vision_dim) → (…, hidden)`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, l) in self.linears.iter().enumerate() {
            if i > 0 {
                xs = activate(self.activation, &xs)?;
            }
            xs = l.forward(&xs)?;
        }
        Ok(xs)
    }
}
