//! The multimodal projector (`model.mm_projector`, llava-hf's `multi_modal_projector`):
//! maps CLIP features into the decoder's embedding space (llava-spec §1b).

use candle_core::{Result, Tensor, Var};
use candle_nn::VarBuilder;

use crate::config::{Activation, ProjectorKind};
use crate::form::Matrices;
use crate::layers::{activate_owned, Linear};

#[derive(Debug, Clone)]
pub struct Projector {
    /// Linear layers in order; an activation sits between consecutive ones.
    linears: Vec<Linear>,
    activation: Activation,
    /// `ProjectorKind::Linear` (keys without an index) rather than an MLP.
    is_linear: bool,
}

impl Projector {
    /// `vb` is scoped at `model.mm_projector`. `Linear` loads `weight`/`bias` there;
    /// `Mlp` loads `0`, `2`, `4`, … (the `nn.Sequential` indices, activations at the odd ones).
    pub fn load(
        vb: VarBuilder,
        kind: ProjectorKind,
        vision_dim: usize,
        hidden: usize,
        m: Matrices,
    ) -> Result<Self> {
        let (linears, activation) = match kind {
            ProjectorKind::Identity => (Vec::new(), Activation::Gelu),
            ProjectorKind::Linear => (
                vec![Linear::load(vb, vision_dim, hidden, true, m)?],
                Activation::Gelu,
            ),
            ProjectorKind::Mlp { depth, activation } => {
                let mut v = Vec::with_capacity(depth);
                for i in 0..depth {
                    let in_dim = if i == 0 { vision_dim } else { hidden };
                    v.push(Linear::load(vb.pp(2 * i), in_dim, hidden, true, m)?);
                }
                (v, activation)
            }
        };
        Ok(Self {
            linears,
            activation,
            is_linear: kind == ProjectorKind::Linear,
        })
    }

    /// A copy with trainable weights, and those `Var`s named as in the checkpoint
    /// (`0.weight`, `0.bias`, `2.weight`, … for an MLP; `weight`, `bias` for a linear one).
    pub fn to_trainable(&self) -> Result<(Projector, Vec<(String, Var)>)> {
        let mut linears = Vec::with_capacity(self.linears.len());
        let mut vars = Vec::new();
        let single = self.linears.len() == 1 && self.is_linear;
        for (i, l) in self.linears.iter().enumerate() {
            let (l, w, b) = l.to_trainable()?;
            let prefix = if single {
                String::new()
            } else {
                format!("{}.", 2 * i)
            };
            vars.push((format!("{prefix}weight"), w));
            if let Some(b) = b {
                vars.push((format!("{prefix}bias"), b));
            }
            linears.push(l);
        }
        Ok((
            Projector {
                linears,
                activation: self.activation,
                is_linear: self.is_linear,
            },
            vars,
        ))
    }

    /// A copy computing in f32 (it is small, and runs on hundreds of rows at once).
    pub fn to_f32(&self) -> Result<Projector> {
        Ok(Projector {
            linears: self
                .linears
                .iter()
                .map(Linear::to_f32)
                .collect::<Result<_>>()?,
            activation: self.activation,
            is_linear: self.is_linear,
        })
    }

    /// Replaces every linear map by `f` of it.
    pub fn map_linears(&mut self, f: impl Fn(&Linear) -> Result<Linear>) -> Result<()> {
        for l in &mut self.linears {
            *l = f(l)?;
        }
        Ok(())
    }

    /// `xs: (…, vision_dim) → (…, hidden)`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, l) in self.linears.iter().enumerate() {
            if i > 0 {
                // `xs` is the previous layer's fresh output.
                xs = activate_owned(self.activation, xs)?;
            }
            xs = l.forward(&xs)?;
        }
        Ok(xs)
    }
}
