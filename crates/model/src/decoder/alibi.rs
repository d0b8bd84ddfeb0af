//! ALiBi (MPT's positions): a per-head linear bias on the attention scores instead of
//! rotary embeddings (llava-spec §1d.3).

use std::sync::Arc;

use candle_core::{DType, Result, Tensor};

/// ALiBi's bias for a step (MPT): `slope_h · (key position − query position)`, which
/// differs from MPT's `slope_h · (j − (keys − 1))` by a constant per query row, so the
/// softmax is the same; from positions, it also holds for padded and batched rows.
#[derive(Debug, Clone)]
pub(super) struct Alibi {
    /// Key position minus query position, `(b, 1, s, slots)` (0 where masked anyway).
    pub(super) dist: Tensor,
    /// `(1, heads, 1, 1)`.
    pub(super) slopes: Tensor,
    /// The same slopes, for the CPU kernels.
    pub(super) values: Arc<[f32]>,
}

impl Alibi {
    /// The bias of a step whose key-minus-query distances are `dist` (see
    /// `KvCache::key_offsets`), for heads with `slopes`, in `dtype`.
    pub(super) fn new(dist: Tensor, slopes: Vec<f32>, dtype: DType) -> Result<Alibi> {
        let heads = slopes.len();
        let values: Arc<[f32]> = slopes.into();
        let slopes = Tensor::from_slice(&values, (1, heads, 1, 1), dist.device())?;
        Ok(Alibi {
            dist: dist.to_dtype(dtype)?,
            slopes: slopes.to_dtype(dtype)?,
            values,
        })
    }

    /// The bias of heads `start..start + n`.
    pub(super) fn heads(&self, start: usize, n: usize) -> Result<Alibi> {
        Ok(Alibi {
            dist: self.dist.clone(),
            slopes: self.slopes.narrow(1, start, n)?,
            values: self.values[start..start + n].into(),
        })
    }

    /// Query rows `start..start + len` over the first `extent` slots.
    pub(super) fn block(&self, start: usize, len: usize, extent: usize) -> Result<Alibi> {
        Ok(Alibi {
            dist: self.dist.narrow(2, start, len)?.narrow(3, 0, extent)?,
            slopes: self.slopes.clone(),
            values: self.values.clone(),
        })
    }

    /// One decoding query over its last `len` keys: distances `-(len-1) ..= 0`.
    pub(super) fn for_last_keys(&self, len: usize) -> Result<Alibi> {
        let dist: Vec<f32> = (0..len).map(|j| j as f32 - (len - 1) as f32).collect();
        Ok(Alibi {
            dist: Tensor::from_vec(dist, (1, 1, 1, len), self.slopes.device())?
                .to_dtype(self.slopes.dtype())?,
            slopes: self.slopes.clone(),
            values: self.values.clone(),
        })
    }

    /// The additive bias `(b, heads, s, t)`, with `mask` added.
    pub(super) fn with_mask(&self, mask: Option<&Tensor>) -> Result<Tensor> {
        let bias = self.dist.broadcast_mul(&self.slopes)?;
        match mask {
            Some(m) => bias.broadcast_add(m),
            None => Ok(bias),
        }
    }
}
