//! Per-sequence attention state, kept apart from the (shared, immutable) weights.
//!
//! Built for batches of sequences of different lengths from the start: every cached slot of
//! every row records the position of the token it holds, or `None` for padding. A step may
//! append a different number of real tokens to each row (right padding fills the rest); the
//! attention mask is then derived from those positions alone, so ragged prefill, batched
//! decode and Mistral's sliding window all go through one rule:
//! query at position `p` may attend the key at position `q` iff `q <= p` and, with a window
//! `W`, `p - q < W`.

use candle_core::{DType, Device, Result, Tensor};

#[derive(Debug)]
pub struct KvCache {
    /// Per decoder layer: keys and values, each `(batch, kv_heads, slots, head_dim)`.
    layers: Vec<Option<LayerBuffer>>,
    /// Per row: the position held by each slot (`None` = padding).
    slots: Vec<Vec<Option<usize>>>,
    /// For a step of one token per row whose rows each hold their tokens as the last slots:
    /// per row, the slots its query attends (`start`, `len`). See [`KvCache::decode_spans`].
    spans: Option<Vec<(usize, usize)>>,
    /// The dtype keys and values are kept in (`None`: the one each step computes them in).
    storage: Option<DType>,
    /// Slots to allocate at least, once a buffer is allocated (see [`KvCache::reserve`]).
    reserved: usize,
}

impl KvCache {
    pub fn new(num_layers: usize, batch: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            slots: vec![Vec::new(); batch],
            spans: None,
            storage: None,
            reserved: 0,
        }
    }

    /// Sizes the buffers for `slots` per row when they are first allocated (the prompt and
    /// the longest answer asked for): a generation then never copies the cache to grow it,
    /// and its memory is known when it starts. Without it, buffers grow as needed.
    pub fn reserve(&mut self, slots: usize) {
        self.reserved = slots;
    }

    /// Keys and values are stored in `dtype` (f16 halves a long context's memory and the
    /// bytes each decoding step reads); every step attends the stored values.
    pub fn storing(mut self, dtype: DType) -> Self {
        self.storage = Some(dtype);
        self
    }

    pub fn batch_size(&self) -> usize {
        self.slots.len()
    }

    /// Slots per row (including padding).
    pub fn slot_count(&self) -> usize {
        self.slots.first().map_or(0, Vec::len)
    }

    /// Slots allocated per row (at least [`KvCache::slot_count`] once a step has run).
    pub fn capacity(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|b| b.k.dim(2).unwrap_or(0))
            .max()
            .unwrap_or(0)
    }

    /// The position the next token of `row` will take (= real tokens cached so far).
    pub fn next_position(&self, row: usize) -> usize {
        self.slots[row].iter().filter(|s| s.is_some()).count()
    }

    /// Registers a step of `seq` new slots per row, of which the first `valid[r]` are real.
    /// Returns the query positions `(batch, seq)` (padding queries get the position they
    /// would have had) and the additive mask `(batch, 1, seq, slots)`.
    pub(crate) fn begin_step(
        &mut self,
        valid: &[usize],
        seq: usize,
        window: Option<usize>,
        max_positions: usize,
        device: &Device,
    ) -> Result<(Vec<u32>, Tensor)> {
        if valid.len() != self.slots.len() {
            candle_core::bail!(
                "batch of {} rows for a cache of {}",
                valid.len(),
                self.slots.len()
            );
        }
        // Check before touching the cache, so a refused step leaves it usable.
        for (r, &n) in valid.iter().enumerate() {
            let end = self.next_position(r) + n;
            if end > max_positions {
                candle_core::bail!(
                    "position {} is beyond the model's context of {max_positions} tokens",
                    end - 1
                );
            }
        }
        let mut positions = Vec::with_capacity(valid.len() * seq);
        for (r, &n) in valid.iter().enumerate() {
            let past = self.next_position(r);
            for i in 0..seq {
                positions.push((past + i) as u32);
                self.slots[r].push((i < n).then_some(past + i));
            }
        }
        let total = self.slot_count();
        let mut mask = vec![0f32; valid.len() * seq * total];
        for (r, row_slots) in self.slots.iter().enumerate() {
            for i in 0..seq {
                let p = positions[r * seq + i] as usize;
                let own = total - seq + i;
                let out = &mut mask[(r * seq + i) * total..(r * seq + i + 1) * total];
                for (j, slot) in row_slots.iter().enumerate() {
                    let allowed = match *slot {
                        Some(q) => q <= p && window.is_none_or(|w| p - q < w),
                        // A padding query still sees itself, so its softmax is finite.
                        None => j == own,
                    };
                    if !allowed {
                        out[j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(mask, (valid.len(), 1, seq, total), device)?;
        self.spans = if seq == 1 && valid.iter().all(|&n| n == 1) {
            self.slots
                .iter()
                .map(|row| {
                    let real = row.iter().rev().take_while(|s| s.is_some()).count();
                    if row[..row.len() - real].iter().any(Option::is_some) {
                        return None; // padding between real slots: use the mask
                    }
                    let len = window.map_or(real, |w| real.min(w));
                    Some((row.len() - len, len))
                })
                .collect()
        } else {
            None
        };
        Ok((positions, mask))
    }

    /// For the step [`KvCache::begin_step`] just registered (`positions`: its query
    /// positions, `seq` per row): key position minus query position for every query and
    /// slot, `(batch, 1, seq, slots)` f32, 0 at padding slots (which the mask hides). ALiBi
    /// multiplies it by each head's slope.
    pub(crate) fn key_offsets(
        &self,
        positions: &[u32],
        seq: usize,
        device: &Device,
    ) -> Result<Tensor> {
        let total = self.slot_count();
        let mut out = vec![0f32; self.slots.len() * seq * total];
        for (r, row) in self.slots.iter().enumerate() {
            for i in 0..seq {
                let p = positions[r * seq + i] as f32;
                let o = &mut out[(r * seq + i) * total..(r * seq + i + 1) * total];
                for (o, slot) in o.iter_mut().zip(row) {
                    if let Some(q) = slot {
                        *o = *q as f32 - p;
                    }
                }
            }
        }
        Tensor::from_vec(out, (self.slots.len(), 1, seq, total), device)
    }

    /// Adds the rows of `other` (a cache of the same model) after this cache's rows. The
    /// newest slots of both line up; the side with fewer slots gets padding slots in front,
    /// which attention never reads. This is how a sequence prefilled on its own joins a
    /// batch that is already decoding.
    pub fn extend(&mut self, other: KvCache) -> Result<()> {
        if other.layers.len() != self.layers.len() {
            candle_core::bail!(
                "joining a cache of {} layers to one of {}",
                other.layers.len(),
                self.layers.len()
            );
        }
        if self.slots.is_empty() {
            *self = other;
            return Ok(());
        }
        if other.slots.is_empty() {
            return Ok(());
        }
        let (mine, theirs) = (self.slot_count(), other.slot_count());
        let total = mine.max(theirs);
        for (layer, their) in self.layers.iter_mut().zip(other.layers) {
            let (Some(buf), Some(their)) = (layer.as_mut(), their) else {
                candle_core::bail!("joining caches before their first step");
            };
            let front = |b: &LayerBuffer, t: &Tensor, pad: usize| -> Result<Tensor> {
                t.narrow(2, 0, b.len)?.pad_with_zeros(2, pad, 0)
            };
            let k = Tensor::cat(
                &[
                    front(buf, &buf.k, total - mine)?,
                    front(&their, &their.k, total - theirs)?,
                ],
                0,
            )?;
            let v = Tensor::cat(
                &[
                    front(buf, &buf.v, total - mine)?,
                    front(&their, &their.v, total - theirs)?,
                ],
                0,
            )?;
            *buf = LayerBuffer { k, v, len: total };
        }
        let pad = |row: Vec<Option<usize>>, n: usize| {
            let mut padded = vec![None; n];
            padded.extend(row);
            padded
        };
        let rows = std::mem::take(&mut self.slots);
        self.slots = rows
            .into_iter()
            .map(|r| pad(r, total - mine))
            .chain(other.slots.into_iter().map(|r| pad(r, total - theirs)))
            .collect();
        Ok(())
    }

    /// Fills an empty one-row cache with keys and values computed earlier for positions
    /// `0..n` (a reused prefix): per layer `(1, kv_heads, len, d)` pieces in order, which
    /// together hold `n` slots. The buffers get room for [`KvCache::reserve`]'s slots, so
    /// the rest of the prompt and the answer append without growing them.
    pub fn load_prefix(&mut self, layers: &[Vec<(Tensor, Tensor)>]) -> Result<()> {
        if self.slots.len() != 1 || self.slot_count() != 0 || layers.len() != self.layers.len() {
            candle_core::bail!(
                "a prefix of {} layers loads only into an empty one-row cache of as many",
                layers.len()
            );
        }
        let n: usize = layers[0]
            .iter()
            .map(|(k, _)| k.dim(2))
            .sum::<Result<usize>>()?;
        if n == 0 {
            return Ok(());
        }
        let cap = match self.reserved {
            0 => capacity_for(n),
            r => r.max(n),
        };
        for (buf, pieces) in self.layers.iter_mut().zip(layers) {
            let (b, h, _, d) = pieces[0].0.dims4()?;
            let dtype = self.storage.unwrap_or(pieces[0].0.dtype());
            let device = pieces[0].0.device();
            let k = Tensor::zeros((b, h, cap, d), dtype, device)?;
            let v = Tensor::zeros((b, h, cap, d), dtype, device)?;
            let mut at = 0;
            for (pk, pv) in pieces {
                k.slice_set(&pk.to_dtype(dtype)?.contiguous()?, 2, at)?;
                v.slice_set(&pv.to_dtype(dtype)?.contiguous()?, 2, at)?;
                at += pk.dim(2)?;
            }
            if at != n {
                candle_core::bail!("prefix pieces of {at} slots in one layer, {n} in another");
            }
            *buf = Some(LayerBuffer { k, v, len: n });
        }
        self.slots[0] = (0..n).map(Some).collect();
        Ok(())
    }

    /// Copies of `row`'s keys and values for the real positions `positions`, which it holds
    /// in consecutive slots (as every row does past its front padding), per layer
    /// `(1, kv_heads, len, d)`: what a prefix store keeps of a sequence. Copies, because the
    /// buffers are written in place later.
    pub fn row_positions(
        &self,
        row: usize,
        positions: std::ops::Range<usize>,
    ) -> Result<Vec<(Tensor, Tensor)>> {
        let Some(slots) = self.slots.get(row) else {
            candle_core::bail!("row {row} of a cache of {}", self.slots.len());
        };
        let start = slots.iter().position(|s| *s == Some(positions.start));
        let held = start.filter(|&j| {
            slots[j..]
                .iter()
                .take(positions.len())
                .copied()
                .eq(positions.clone().map(Some))
        });
        let Some(j0) = held else {
            candle_core::bail!("positions {positions:?} are not in consecutive slots of row {row}");
        };
        self.layers
            .iter()
            .map(|buf| {
                let Some(buf) = buf else {
                    candle_core::bail!("no cache buffer for a layer");
                };
                let pick = |t: &Tensor| {
                    t.narrow(0, row, 1)?
                        .narrow(2, j0, positions.len())?
                        .force_contiguous()
                };
                Ok((pick(&buf.k)?, pick(&buf.v)?))
            })
            .collect()
    }

    /// Keeps the rows for which `keep[r]` holds (a batch whose finished sequences leave),
    /// and drops the slots that are padding in every row left, so that the cache never
    /// grows past its longest sequence.
    pub fn retain_rows(&mut self, keep: &[bool]) -> Result<()> {
        if keep.len() != self.slots.len() {
            candle_core::bail!(
                "{} flags for a cache of {} rows",
                keep.len(),
                self.slots.len()
            );
        }
        if keep.iter().all(|&k| k) {
            return Ok(());
        }
        let rows: Vec<u32> = (0..keep.len() as u32)
            .filter(|&r| keep[r as usize])
            .collect();
        if rows.is_empty() {
            self.layers.iter_mut().for_each(|l| *l = None);
            self.slots.clear();
            self.spans = None;
            return Ok(());
        }
        let slots: Vec<Vec<Option<usize>>> = rows
            .iter()
            .map(|&r| std::mem::take(&mut self.slots[r as usize]))
            .collect();
        let cols: Vec<u32> = (0..slots[0].len())
            .filter(|&j| slots.iter().any(|row| row[j].is_some()))
            .map(|j| j as u32)
            .collect();
        for buf in self.layers.iter_mut().flatten() {
            let device = buf.k.device().clone();
            let rows = Tensor::new(rows.as_slice(), &device)?;
            let cols = Tensor::new(cols.as_slice(), &device)?;
            let pick = |t: &Tensor| -> Result<Tensor> {
                t.narrow(2, 0, buf.len)?
                    .contiguous()?
                    .index_select(&rows, 0)?
                    .index_select(&cols, 2)?
                    .contiguous()
            };
            let (k, v) = (pick(&buf.k)?, pick(&buf.v)?);
            *buf = LayerBuffer {
                k,
                v,
                len: cols.dim(0)?,
            };
        }
        self.slots = slots
            .into_iter()
            .map(|row| cols.iter().map(|&j| row[j as usize]).collect())
            .collect();
        Ok(())
    }

    /// In a decoding step where every row's tokens are its last slots (always, in a
    /// [continuous batch](KvCache::extend)), the slots each row's query attends, so that
    /// attention runs per row over exactly what the row would have alone: the same sums,
    /// whatever the batch. `None` otherwise (prefill, right-padded batches): use the mask.
    pub(crate) fn decode_spans(&self) -> Option<&[(usize, usize)]> {
        self.spans.as_deref()
    }

    /// Appends this step's keys/values `(batch, kv_heads, seq, d)` to `layer` and returns
    /// the keys and values to attend: views of the layer's buffer (nothing already cached is
    /// copied, except when the buffer grows), in the storage dtype; or, when nothing rounds
    /// them (the storage dtype is the step's), on a cache's first step the step's own
    /// tensors, which a training forward keeps differentiable.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let new = k.dim(2)?;
        let storage = self.storage.unwrap_or(k.dtype());
        if self.layers[layer].is_none() {
            if storage == k.dtype() {
                // Kept as they are: a training forward, which must stay differentiable,
                // never gets further than this first step.
                let (k, v) = (k.contiguous()?, v.contiguous()?);
                self.layers[layer] = Some(LayerBuffer {
                    k: k.clone(),
                    v: v.clone(),
                    len: new,
                });
                return Ok((k, v));
            }
            // Every layer's buffers at once, before the step's activations come and go:
            // allocated layer by layer between them, they leave holes in the heap that cost
            // a 7B model's prefill over 100 MiB of peak memory.
            let cap = match self.reserved {
                0 => capacity_for(new),
                r => r.max(new),
            };
            let (b, h, _, d) = k.dims4()?;
            for l in self.layers.iter_mut().filter(|l| l.is_none()) {
                *l = Some(LayerBuffer {
                    k: Tensor::zeros((b, h, cap, d), storage, k.device())?,
                    v: Tensor::zeros((b, h, cap, d), storage, k.device())?,
                    len: 0,
                });
            }
        }
        let Some(buf) = &mut self.layers[layer] else {
            candle_core::bail!("no cache buffer for layer {layer}");
        };
        if buf.len + new > buf.k.dim(2)? {
            let cap = capacity_for(buf.len + new).max(self.reserved);
            let grow = |old: &Tensor| -> Result<Tensor> {
                let (b, h, _, d) = old.dims4()?;
                let t = Tensor::zeros((b, h, cap, d), old.dtype(), old.device())?;
                t.slice_set(&old.narrow(2, 0, buf.len)?.contiguous()?, 2, 0)?;
                Ok(t)
            };
            buf.k = grow(&buf.k)?;
            buf.v = grow(&buf.v)?;
        }
        let dt = buf.k.dtype();
        buf.k
            .slice_set(&k.to_dtype(dt)?.contiguous()?, 2, buf.len)?;
        buf.v
            .slice_set(&v.to_dtype(dt)?.contiguous()?, 2, buf.len)?;
        buf.len += new;
        // Every step, the first included, attends the keys and values as stored (as
        // llama.cpp's f16 cache does): a prompt's rows are then the same numbers whether it
        // is prefilled at once or after a prefix loaded from a store.
        Ok((buf.k.narrow(2, 0, buf.len)?, buf.v.narrow(2, 0, buf.len)?))
    }
}

/// Slots to allocate for `needed`: an eighth more, in steps of 64, so that a long answer
/// copies the cache a handful of times and a 7B model's cache carries little slack (doubling
/// would hold up to twice what is used).
fn capacity_for(needed: usize) -> usize {
    (needed + needed / 8).max(64).next_multiple_of(64)
}

/// One layer's keys and values: `(batch, kv_heads, capacity, d)` buffers of which the first
/// `len` slots are filled. Written in place, so never shared between caches.
#[derive(Debug)]
struct LayerBuffer {
    k: Tensor,
    v: Tensor,
    len: usize,
}
