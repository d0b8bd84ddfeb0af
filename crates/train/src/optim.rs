//! What HF's Trainer does around the weights (llava-spec §5.5): `torch.optim.AdamW`, the
//! cosine schedule with linear warmup and global-norm gradient clipping. AdamW is our own
//! rather than candle-nn's so that its moments can be saved and restored on resume.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};

use crate::dist::Dist;

/// `torch.optim.AdamW` (decoupled weight decay, bias-corrected moments).
pub struct AdamW {
    params: Vec<(String, Var)>,
    /// First and second moments, per parameter, created on the first step.
    m: Vec<Option<Tensor>>,
    v: Vec<Option<Tensor>>,
    /// Optimizer steps taken (bias correction).
    pub t: usize,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Set by [`AdamW::shard`]: this rank keeps and updates only its range.
    shard: Option<Shard>,
}

/// A rank's share of a sharded optimizer. The parameters are laid end to end as one flat
/// vector, cut into one nearly equal range per rank; the rank keeps AdamW's moments and the
/// gradients for its range only (`train --shard grad-opt`: ZeRO-2, FSDP's
/// `SHARD_GRAD_OP`). Under `--shard full` (ZeRO-3, `FULL_SHARD`) the decoder layers'
/// parameters exist only as each rank's range too, gathered for a layer's every use
/// ([`AdamW::gather_layer`]); the rest every rank holds whole, as `AdamW::params`.
struct Shard {
    rank: usize,
    ranges: Vec<Range<usize>>,
    /// Every parameter, in the flat vector's order: `AdamW::params` (held whole) first,
    /// then the layers', layer by layer.
    slots: Vec<Slot>,
    /// Where the layers' parameters start: `0..replicated` is `AdamW::params`.
    replicated: usize,
    /// Layer number → the indices of its slots and its span of the flat vector.
    layers: std::collections::BTreeMap<usize, (Range<usize>, Range<usize>)>,
    /// This rank's range of the parameters (f32).
    p: Tensor,
    /// This rank's range of the mean gradients reduce-scattered so far in this step.
    g: Option<Vec<f32>>,
    m: Option<Tensor>,
    v: Option<Tensor>,
    /// Every rank's moments, put together on rank 0 for a checkpoint by [`AdamW::gather_state`].
    gathered: Option<HashMap<String, Tensor>>,
    /// The layers' parameters, put together on rank 0 for a checkpoint by [`AdamW::gather_state`].
    gathered_params: Vec<(String, Tensor)>,
}

/// One parameter's place in the flat vector.
struct Slot {
    name: String,
    shape: candle_core::Shape,
    at: usize,
}

impl Shard {
    fn own(&self) -> Range<usize> {
        self.ranges[self.rank].clone()
    }

    /// `span` of the flat vector as each rank holds it: every rank's range clipped to the
    /// span, relative to its start (a partition of `0..span.len()`, as the collectives
    /// take it).
    fn parts(&self, span: &Range<usize>) -> Vec<Range<usize>> {
        let clip = |x: usize| x.clamp(span.start, span.end) - span.start;
        self.ranges
            .iter()
            .map(|r| clip(r.start)..clip(r.end))
            .collect()
    }

    /// Where this rank's part of `span` lies in its own range.
    fn own_part(&self, span: &Range<usize>) -> Range<usize> {
        let part = self.parts(span)[self.rank].clone();
        if part.is_empty() {
            return 0..0;
        }
        let at = span.start + part.start - self.own().start;
        at..at + part.len()
    }

    /// Adds the mean over the ranks of `flat` (this rank's gradients for `span`) to this
    /// rank's part of the step's gradients: a reduce-scatter.
    fn add_grads(
        &mut self,
        flat: &[f32],
        span: &Range<usize>,
        dist: Option<&Mutex<Dist>>,
    ) -> Result<f64> {
        let clock = std::time::Instant::now();
        let parts = self.parts(span);
        let mine = match dist {
            Some(d) => exchange(d, |d| d.reduce_scatter_mean(flat, &parts))?,
            None => flat[parts[self.rank].clone()].to_vec(),
        };
        let to = self.own_part(span);
        let own_len = self.own().len();
        let g = self.g.get_or_insert_with(|| vec![0f32; own_len]);
        for (acc, x) in g[to].iter_mut().zip(mine) {
            *acc += x;
        }
        Ok(clock.elapsed().as_secs_f64())
    }

    /// `span` of the parameters, whole, on rank 0 only (`None` on the others).
    fn gather_at_root(
        &self,
        span: &Range<usize>,
        dist: Option<&Mutex<Dist>>,
    ) -> Result<Option<Vec<f32>>> {
        let own = self.own_part(span);
        let mine: Vec<f32> = self.p.narrow(0, own.start, own.len())?.to_vec1()?;
        match dist {
            Some(d) => exchange(d, |d| d.gather_at_root(&mine, &self.parts(span))),
            None => Ok(Some(mine)),
        }
    }

    /// `span` of the parameters, whole, on every rank: an all-gather.
    fn gather(&self, span: &Range<usize>, dist: Option<&Mutex<Dist>>) -> Result<Vec<f32>> {
        let own = self.own_part(span);
        let mine: Vec<f32> = self.p.narrow(0, own.start, own.len())?.to_vec1()?;
        match dist {
            Some(d) => exchange(d, |d| d.all_gather(&mine, &self.parts(span))),
            None => Ok(mine),
        }
    }
}

/// Runs one exchange with the other ranks.
fn exchange<R>(dist: &Mutex<Dist>, f: impl FnOnce(&mut Dist) -> std::io::Result<R>) -> Result<R> {
    let mut d = dist
        .lock()
        .map_err(|_| candle_core::Error::Msg("the rank connection is poisoned".into()))?;
    f(&mut d).map_err(|e| candle_core::Error::Msg(format!("exchanging with the other ranks: {e}")))
}

/// `n` cut into `world` contiguous ranges whose lengths differ by at most one.
pub fn even_ranges(n: usize, world: usize) -> Vec<Range<usize>> {
    let world = world.max(1);
    (0..world)
        .map(|r| (r * n / world)..((r + 1) * n / world))
        .collect()
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, lr: f64, weight_decay: f64) -> Self {
        let n = params.len();
        Self {
            params,
            m: vec![None; n],
            v: vec![None; n],
            t: 0,
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            shard: None,
        }
    }

    /// From now on this optimizer is `rank`'s share of one sharded over `world` ranks:
    /// it keeps the moments of its range of the flat parameters, and steps with
    /// [`AdamW::sharded_step`].
    pub fn shard(&mut self, rank: usize, world: usize) -> Result<()> {
        self.shard_layers(rank, world, &|_| None)
    }

    /// [`AdamW::shard`], and the parameters `layer_of` puts in a decoder layer are given up
    /// but for this rank's range (the caller drops its own references to them):
    /// [`AdamW::gather_layer`] puts a layer's together for each use,
    /// [`AdamW::add_layer_grads`] takes its gradients.
    pub fn shard_layers(
        &mut self,
        rank: usize,
        world: usize,
        layer_of: &dyn Fn(&str) -> Option<usize>,
    ) -> Result<()> {
        let all = std::mem::take(&mut self.params);
        let (mut layered, replicated): (Vec<_>, Vec<_>) =
            all.into_iter().partition(|(n, _)| layer_of(n).is_some());
        layered.sort_by_key(|(n, _)| layer_of(n));
        let mut slots = Vec::with_capacity(replicated.len() + layered.len());
        let mut layers = std::collections::BTreeMap::new();
        let mut at = 0;
        for (name, var) in replicated.iter().chain(&layered) {
            if let Some(l) = layer_of(name) {
                let e = layers
                    .entry(l)
                    .or_insert((slots.len()..slots.len(), at..at));
                (e.0.end, e.1.end) = (slots.len() + 1, at + var.elem_count());
            }
            slots.push(Slot {
                name: name.clone(),
                shape: var.shape().clone(),
                at,
            });
            at += var.elem_count();
        }
        let replicated_len = replicated.iter().map(|(_, v)| v.elem_count()).sum();
        let n_replicated = replicated.len();
        let ranges = even_ranges(at, world);
        // This rank's range of the parameters, read from wherever they are now.
        self.params = replicated.into_iter().chain(layered).collect();
        let p = match self.params.is_empty() {
            true => Tensor::zeros(0, DType::F32, &candle_core::Device::Cpu)?,
            false => self.flat(None, ranges[rank.min(world.max(1) - 1)].clone())?,
        };
        self.params.truncate(n_replicated);
        let n = self.params.len();
        self.m = vec![None; n];
        self.v = vec![None; n];
        self.shard = Some(Shard {
            rank,
            ranges,
            slots,
            replicated: replicated_len,
            layers,
            p,
            g: None,
            m: None,
            v: None,
            gathered: None,
            gathered_params: Vec::new(),
        });
        Ok(())
    }

    pub fn is_sharded(&self) -> bool {
        self.shard.is_some()
    }

    /// Bytes of moments this rank holds.
    pub fn state_bytes(&self) -> usize {
        let bytes = |t: &Option<Tensor>| t.as_ref().map_or(0, |t| t.elem_count() * 4);
        match &self.shard {
            Some(s) => bytes(&s.m) + bytes(&s.v),
            None => self.m.iter().chain(&self.v).map(bytes).sum(),
        }
    }

    /// Bytes of the decoder layers' trained parameters this rank holds between their uses:
    /// its range of them under [`AdamW::shard_layers`], else all of them.
    pub fn layer_param_bytes(&self, layer_of: &dyn Fn(&str) -> Option<usize>) -> usize {
        match &self.shard {
            Some(s) if !s.layers.is_empty() => {
                let own = s.own();
                4 * (own.end.max(s.replicated) - own.start.max(s.replicated))
            }
            _ => self
                .params
                .iter()
                .filter(|(n, _)| layer_of(n).is_some())
                .map(|(_, v)| v.elem_count() * v.dtype().size_in_bytes())
                .sum(),
        }
    }

    /// Whether [`AdamW::shard_layers`] gave up decoder layers' parameters.
    pub fn shards_layers(&self) -> bool {
        self.shard.as_ref().is_some_and(|s| !s.layers.is_empty())
    }

    /// Layer `layer`'s parameters put together from every rank's range (all ranks call
    /// it), by name.
    pub fn gather_layer(
        &self,
        layer: usize,
        dist: Option<&Mutex<Dist>>,
    ) -> Result<Vec<(String, Tensor)>> {
        let Some((slots, span)) = self.shard.as_ref().and_then(|s| s.layers.get(&layer)) else {
            candle_core::bail!("layer {layer}'s parameters are not sharded");
        };
        let shard = self.shard.as_ref().expect("checked above");
        let all = shard.gather(span, dist)?;
        let all = Tensor::from_vec(all, span.len(), shard.p.device())?;
        shard.slots[slots.clone()]
            .iter()
            .map(|s| {
                let t = all.narrow(0, s.at - span.start, s.shape.elem_count())?;
                Ok((s.name.clone(), t.reshape(s.shape.clone())?))
            })
            .collect()
    }

    /// Takes this rank's gradients of layer `layer`'s parameters (in
    /// [`AdamW::gather_layer`]'s order; `None` as zeros) and keeps the mean over the ranks
    /// of its range of them (all ranks call it). Returns the seconds spent exchanging.
    pub fn add_layer_grads(
        &mut self,
        layer: usize,
        grads: &[Option<Tensor>],
        dist: Option<&Mutex<Dist>>,
    ) -> Result<f64> {
        let Some(shard) = self.shard.as_mut() else {
            candle_core::bail!("add_layer_grads on an optimizer that is not sharded");
        };
        let Some((slots, span)) = shard.layers.get(&layer).cloned() else {
            candle_core::bail!("layer {layer}'s parameters are not sharded");
        };
        if grads.len() != slots.len() {
            candle_core::bail!(
                "{} gradients for layer {layer}'s {} parameters",
                grads.len(),
                slots.len()
            );
        }
        let mut flat = Vec::with_capacity(span.len());
        for (s, g) in shard.slots[slots].iter().zip(grads) {
            match g {
                Some(g) => flat.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
                None => flat.extend(std::iter::repeat_n(0f32, s.shape.elem_count())),
            }
        }
        shard.add_grads(&flat, &span, dist)
    }

    /// `range` of the parameters (or, with `grads`, of their gradients, zeros where there
    /// is none) laid end to end as one flat f32 vector; only the parameters it overlaps are
    /// read.
    fn flat(&self, grads: Option<&GradStore>, range: Range<usize>) -> Result<Tensor> {
        let device = self.params[0].1.device();
        let mut parts = Vec::new();
        let mut at = 0;
        for (_, v) in &self.params {
            let n = v.elem_count();
            let (lo, hi) = (range.start.max(at), range.end.min(at + n));
            if lo < hi {
                let t = match grads {
                    Some(g) => match g.get(v.as_tensor()) {
                        Some(g) => g.to_dtype(DType::F32)?.flatten_all()?,
                        None => Tensor::zeros(n, DType::F32, device)?,
                    },
                    None => v.as_tensor().to_dtype(DType::F32)?.flatten_all()?,
                };
                parts.push(t.narrow(0, lo - at, hi - lo)?);
            }
            at += n;
        }
        if parts.is_empty() {
            return Tensor::zeros(0, DType::F32, device);
        }
        Tensor::cat(&parts, 0)
    }

    /// One optimizer step of a sharded run. This rank's gradients of the parameters it
    /// holds whole (`grads`, its share of the batch, row masks applied) and `loss` are
    /// averaged with the other ranks' by a reduce-scatter, so that it gets the mean
    /// gradient of its range only (the layers' came in by [`AdamW::add_layer_grads`]);
    /// they are clipped to `max_norm` by the global norm (its squared parts summed over the
    /// ranks); AdamW updates the range with this rank's moments; and the ranks' updated
    /// ranges of the parameters held whole are all-gathered into them. Returns the mean
    /// loss, the gradient norm and the seconds spent exchanging.
    pub fn sharded_step(
        &mut self,
        grads: Option<&GradStore>,
        loss: f64,
        max_norm: f64,
        dist: Option<&Mutex<Dist>>,
    ) -> Result<(f64, f64, f64)> {
        let Some(shard) = self.shard.as_ref() else {
            candle_core::bail!("sharded_step on an optimizer that is not sharded");
        };
        if shard.slots.is_empty() {
            return Ok((loss, 0.0, 0.0));
        }
        let mut comm = 0.0;
        // One parameter at a time: the same sums (element by element, in rank order) with
        // one parameter's gradient in flight instead of all of them laid end to end.
        let shard = self.shard.as_mut().expect("checked above");
        let starts: Vec<usize> = shard.slots.iter().map(|s| s.at).collect();
        for ((_, var), at) in self.params.iter().zip(starts) {
            let n = var.elem_count();
            let flat: Vec<f32> = match grads.and_then(|g| g.get(var.as_tensor())) {
                Some(g) => g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                None => vec![0f32; n],
            };
            comm += shard.add_grads(&flat, &(at..at + n), dist)?;
        }
        self.t += 1;
        let h = self.hyper();
        let shard = self.shard.as_mut().expect("checked above");
        let device = shard.p.device().clone();
        let own_len = shard.own().len();
        let g = shard.g.take().unwrap_or_else(|| vec![0f32; own_len]);
        let g = Tensor::from_vec(g, own_len, &device)?;
        let sq = g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        let world = shard.ranges.len() as f64;
        let clock = std::time::Instant::now();
        let (mean_loss, sq) = match dist {
            Some(d) => exchange(d, |d| {
                let loss = d.all_reduce_sum_f64(loss)? / world;
                Ok((loss, d.all_reduce_sum_f64(sq)?))
            })?,
            None => (loss, sq),
        };
        comm += clock.elapsed().as_secs_f64();
        let norm = sq.sqrt();
        let coef = max_norm / (norm + 1e-6);
        let g = if coef < 1.0 { (g * coef)? } else { g };
        // AdamW on this rank's range, as `step` does it for a whole parameter.
        let (p, m, v) = update(&shard.p, &g, shard.m.as_ref(), shard.v.as_ref(), h)?;
        (shard.p, shard.m, shard.v) = (p, Some(m), Some(v));
        shard.gathered = None;
        shard.gathered_params.clear();
        // The parameters held whole, one at a time, put back together.
        for ((_, var), slot) in self.params.iter().zip(&shard.slots) {
            let clock = std::time::Instant::now();
            let p = shard.gather(&(slot.at..slot.at + var.elem_count()), dist)?;
            comm += clock.elapsed().as_secs_f64();
            let p = Tensor::from_vec(p, var.shape(), &device)?;
            var.set(&p.to_dtype(var.dtype())?)?;
        }
        Ok((mean_loss, norm, comm))
    }

    /// Puts every rank's share together on rank 0 (all ranks call it), for a checkpoint it
    /// writes: with `moments`, AdamW's (for [`AdamW::state`]); and the layers' parameters
    /// (for [`AdamW::gathered_params`]). The other ranks get nothing, and hold nothing more.
    /// Unsharded: nothing to do.
    pub fn gather_state(&mut self, dist: Option<&Mutex<Dist>>, moments: bool) -> Result<()> {
        let Some(shard) = self.shard.as_ref() else {
            return Ok(());
        };
        let ranges = shard.ranges.clone();
        let total = ranges.last().map_or(0, |r| r.end);
        let own_len = shard.own().len();
        let device = shard.p.device().clone();
        let mut out = HashMap::new();
        let started = shard.m.is_some();
        if moments {
            let whole = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
                let mine = match t {
                    Some(t) => t.to_vec1()?,
                    None => vec![0f32; own_len],
                };
                let all = match dist {
                    Some(d) => exchange(d, |d| d.gather_at_root(&mine, &ranges)).map_err(|e| {
                        candle_core::Error::Msg(format!("gathering the optimizer state: {e}"))
                    })?,
                    None => Some(mine),
                };
                all.map(|a| Tensor::from_vec(a, total, &device)).transpose()
            };
            let (m, v) = (whole(&shard.m)?, whole(&shard.v)?);
            if let (true, Some(m), Some(v)) = (started, m, v) {
                for slot in &shard.slots {
                    let n = slot.shape.elem_count();
                    out.insert(
                        format!("exp_avg.{}", slot.name),
                        m.narrow(0, slot.at, n)?.reshape(slot.shape.clone())?,
                    );
                    out.insert(
                        format!("exp_avg_sq.{}", slot.name),
                        v.narrow(0, slot.at, n)?.reshape(slot.shape.clone())?,
                    );
                }
            }
        }
        let mut params = Vec::new();
        if !shard.layers.is_empty() {
            let span = shard.replicated..total;
            if let Some(all) = shard.gather_at_root(&span, dist)? {
                let all = Tensor::from_vec(all, span.len(), &device)?;
                for slot in shard.slots.iter().filter(|s| s.at >= shard.replicated) {
                    let t = all.narrow(0, slot.at - span.start, slot.shape.elem_count())?;
                    params.push((slot.name.clone(), t.reshape(slot.shape.clone())?));
                }
            }
        }
        if let Some(s) = self.shard.as_mut() {
            s.gathered = Some(out);
            s.gathered_params = params;
        }
        Ok(())
    }

    /// The decoder layers' parameters that [`AdamW::shard_layers`] gave up, as
    /// [`AdamW::gather_state`] last put them together (for a checkpoint).
    pub fn gathered_params(&self) -> &[(String, Tensor)] {
        self.shard.as_ref().map_or(&[], |s| &s.gathered_params)
    }

    pub fn vars(&self) -> Vec<Var> {
        self.params.iter().map(|(_, v)| v.clone()).collect()
    }

    /// The constants of step `self.t`.
    fn hyper(&self) -> Hyper {
        Hyper {
            b1: self.beta1,
            b2: self.beta2,
            c1: 1.0 - self.beta1.powi(self.t as i32),
            c2: 1.0 - self.beta2.powi(self.t as i32),
            lr: self.lr,
            weight_decay: self.weight_decay,
            eps: self.eps,
        }
    }

    /// One update from `grads`; parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.t += 1;
        let h = self.hyper();
        for (i, (_, var)) in self.params.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let (p, m, v) = update(
                var.as_tensor(),
                g,
                self.m[i].as_ref(),
                self.v[i].as_ref(),
                h,
            )?;
            var.set(&p.to_dtype(var.dtype())?)?;
            self.m[i] = Some(m);
            self.v[i] = Some(v);
        }
        Ok(())
    }

    /// The moments as named tensors (`exp_avg.NAME`, `exp_avg_sq.NAME`), to save.
    pub fn state(&self) -> HashMap<String, Tensor> {
        if let Some(s) = &self.shard {
            return s.gathered.clone().unwrap_or_default();
        }
        let mut out = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            if let (Some(m), Some(v)) = (&self.m[i], &self.v[i]) {
                out.insert(format!("exp_avg.{name}"), m.clone());
                out.insert(format!("exp_avg_sq.{name}"), v.clone());
            }
        }
        out
    }

    /// Restores moments saved by [`AdamW::state`] after `t` steps.
    pub fn restore(&mut self, state: &HashMap<String, Tensor>, t: usize) -> Result<()> {
        self.t = t;
        if let Some(shard) = self.shard.as_mut() {
            // This rank's range of the flat moments, from the whole state a checkpoint holds.
            let own = shard.own();
            let flat = |prefix: &str| -> Result<Option<Tensor>> {
                let mut parts = Vec::with_capacity(shard.slots.len());
                for slot in &shard.slots {
                    let name = &slot.name;
                    match state.get(&format!("{prefix}.{name}")) {
                        Some(t) if t.shape() == &slot.shape => {
                            parts.push(t.to_dtype(DType::F32)?.flatten_all()?)
                        }
                        Some(_) => {
                            candle_core::bail!("optimizer state for {name} has the wrong shape")
                        }
                        None => return Ok(None),
                    }
                }
                Tensor::cat(&parts, 0)?
                    .narrow(0, own.start, own.len())
                    .map(Some)
            };
            (shard.m, shard.v) = (flat("exp_avg")?, flat("exp_avg_sq")?);
            return Ok(());
        }
        for (i, (name, var)) in self.params.iter().enumerate() {
            let m = state.get(&format!("exp_avg.{name}"));
            let v = state.get(&format!("exp_avg_sq.{name}"));
            if let (Some(m), Some(v)) = (m, v) {
                if m.dims() != var.dims() || v.dims() != var.dims() {
                    candle_core::bail!("optimizer state for {name} has the wrong shape");
                }
                self.m[i] = Some(m.clone());
                self.v[i] = Some(v.clone());
            }
        }
        Ok(())
    }
}

/// One step's constants.
#[derive(Clone, Copy)]
struct Hyper {
    b1: f64,
    b2: f64,
    c1: f64,
    c2: f64,
    lr: f64,
    weight_decay: f64,
    eps: f64,
}

/// Runs `f` on the contiguous f32 data of a CPU tensor; `None` for any other tensor.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => {
            Some(f(&v[a..b]))
        }
        _ => None,
    }
}

/// AdamW's update (torch's formula) of a parameter `p` (whole, or a rank's flat range) with
/// gradient `g` and moments `m`, `v` (none before the first step): the new parameter, in
/// f32, and moments. One pass for f32 CPU tensors, candle's ops otherwise.
fn update(
    p: &Tensor,
    g: &Tensor,
    m: Option<&Tensor>,
    v: Option<&Tensor>,
    h: Hyper,
) -> Result<(Tensor, Tensor, Tensor)> {
    if let Some(done) = fused_update(p, g, m, v, h)? {
        return Ok(done);
    }
    let g = g.to_dtype(DType::F32)?;
    let m = match m {
        Some(m) => ((m * h.b1)? + (&g * (1.0 - h.b1))?)?,
        None => (&g * (1.0 - h.b1))?,
    };
    let v = match v {
        Some(v) => ((v * h.b2)? + (g.sqr()? * (1.0 - h.b2))?)?,
        None => (g.sqr()? * (1.0 - h.b2))?,
    };
    let p = (p.to_dtype(DType::F32)? * (1.0 - h.lr * h.weight_decay))?;
    let step = ((&m / h.c1)? / ((&v / h.c2)?.sqrt()? + h.eps)?)?;
    Ok(((p - (step * h.lr)?)?, m, v))
}

/// AdamW's update of one f32 CPU parameter in one pass over `(p, g, m, v)`, the same
/// operations in the same order as the tensor path (scalars rounded to f32 as candle's
/// affine ops round them), with the new parameter and moments as its only allocations.
/// `None` when a tensor is not f32 on the CPU (the tensor path does those).
fn fused_update(
    p: &Tensor,
    g: &Tensor,
    m: Option<&Tensor>,
    v: Option<&Tensor>,
    h: Hyper,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    use rayon::prelude::*;
    let n = p.elem_count();
    if g.elem_count() != n {
        candle_core::bail!("a gradient of {} for a parameter of {n}", g.elem_count());
    }
    let (b1, b1c) = (h.b1 as f32, (1.0 - h.b1) as f32);
    let (b2, b2c) = (h.b2 as f32, (1.0 - h.b2) as f32);
    let (inv_c1, inv_c2) = ((1.0 / h.c1) as f32, (1.0 / h.c2) as f32);
    let decay = (1.0 - h.lr * h.weight_decay) as f32;
    let (lr, eps) = (h.lr as f32, h.eps as f32);
    let (mut pn, mut mn, mut vn) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    let zeros: &[f32] = &[];
    let ok = with_f32(p, |p| {
        with_f32(g, |g| {
            let mut run = |mo: &[f32], vo: &[f32]| {
                const CHUNK: usize = 1 << 14;
                pn.par_chunks_mut(CHUNK)
                    .zip(mn.par_chunks_mut(CHUNK))
                    .zip(vn.par_chunks_mut(CHUNK))
                    .enumerate()
                    .for_each(|(c, ((pn, mn), vn))| {
                        let at = c * CHUNK;
                        for j in 0..pn.len() {
                            let (gj, k) = (g[at + j], at + j);
                            let m = match mo.is_empty() {
                                true => gj * b1c,
                                false => mo[k] * b1 + gj * b1c,
                            };
                            let v = match vo.is_empty() {
                                true => (gj * gj) * b2c,
                                false => vo[k] * b2 + (gj * gj) * b2c,
                            };
                            let update = (m * inv_c1) / ((v * inv_c2).sqrt() + eps);
                            pn[j] = p[k] * decay - update * lr;
                            (mn[j], vn[j]) = (m, v);
                        }
                    });
            };
            match (m, v) {
                (Some(m), Some(v)) => with_f32(m, |m| with_f32(v, |v| run(m, v))).flatten(),
                _ => {
                    run(zeros, zeros);
                    Some(())
                }
            }
        })
        .flatten()
    })
    .flatten();
    if ok.is_none() {
        return Ok(None);
    }
    let device = p.device();
    Ok(Some((
        Tensor::from_vec(pn, p.shape(), device)?,
        Tensor::from_vec(mn, p.shape(), device)?,
        Tensor::from_vec(vn, p.shape(), device)?,
    )))
}

/// `get_cosine_schedule_with_warmup`: linear warmup to `base`, then half a cosine to 0.
pub fn cosine_lr(base: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    base * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
}

/// HF's `warmup_steps = ceil(warmup_ratio * total_steps)`.
pub fn warmup_steps(ratio: f64, total: usize) -> usize {
    (ratio * total as f64).ceil() as usize
}

/// Scales the gradients of `vars` so their global L2 norm is at most `max_norm`
/// (`clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            total += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    let norm = total.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for v in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * coef)?);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused update gives, bit for bit, torch's AdamW formula written as candle tensor
    /// ops (the path GPU and non-f32 parameters take), over three steps with weight decay
    /// and odd sizes.
    #[test]
    fn the_fused_update_is_the_tensor_formula() {
        let dev = candle_core::Device::Cpu;
        for n in [1usize, 7, 40_000] {
            let p0 = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            let var = Var::from_tensor(&p0).unwrap();
            let mut opt = AdamW::new(vec![("w".into(), var.clone())], 3e-3, 0.1);
            let h = Hyper {
                b1: 0.9,
                b2: 0.999,
                c1: 0.1,
                c2: 0.001,
                lr: 1e-3,
                weight_decay: 0.0,
                eps: 1e-8,
            };
            assert!(
                fused_update(&p0, &p0, None, None, h).unwrap().is_some(),
                "f32 CPU parameters take the fused update"
            );
            let (mut p, mut m, mut v) = (p0.clone(), None::<Tensor>, None::<Tensor>);
            for t in 1..=3 {
                let g = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
                let store = (var.as_tensor() * &g)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                opt.step(&store).unwrap();
                let (b1, b2, lr, wd, eps) =
                    (opt.beta1, opt.beta2, opt.lr, opt.weight_decay, opt.eps);
                let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
                let mt = match &m {
                    Some(m) => ((m * b1).unwrap() + (&g * (1.0 - b1)).unwrap()).unwrap(),
                    None => (&g * (1.0 - b1)).unwrap(),
                };
                let vt = match &v {
                    Some(v) => {
                        ((v * b2).unwrap() + (g.sqr().unwrap() * (1.0 - b2)).unwrap()).unwrap()
                    }
                    None => (g.sqr().unwrap() * (1.0 - b2)).unwrap(),
                };
                let decayed = (&p * (1.0 - lr * wd)).unwrap();
                let update = ((&mt / c1).unwrap()
                    / ((&vt / c2).unwrap().sqrt().unwrap() + eps).unwrap())
                .unwrap();
                p = (decayed - (update * lr).unwrap()).unwrap();
                (m, v) = (Some(mt), Some(vt));
                let diff = kollava_testkit::max_abs_diff_tensors(var.as_tensor(), &p);
                assert_eq!(diff, 0.0, "n {n}, step {t}");
                let state = opt.state();
                let dm =
                    kollava_testkit::max_abs_diff_tensors(&state["exp_avg.w"], m.as_ref().unwrap());
                assert_eq!(dm, 0.0, "n {n}, step {t}: first moment");
            }
        }
    }

    /// Four ranks sharding AdamW (`grad-opt`): each holds a quarter of the moments (bytes
    /// counted), and three steps on different per-rank gradients leave every rank with the
    /// parameters, and rank 0 with the gathered moments, of one unsharded AdamW on the mean
    /// gradients (clipped by the global norm): the same to 1e-6.
    #[test]
    fn sharded_adamw_holds_a_quarter_and_steps_as_one_optimizer() {
        use std::time::Duration;
        const SHAPES: [&[usize]; 3] = [&[5, 3], &[7], &[2, 2, 3]];
        let dev = candle_core::Device::Cpu;
        fn init() -> Vec<(String, Var)> {
            SHAPES
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let n: usize = s.iter().product();
                    let v: Vec<f32> = (0..n)
                        .map(|j| ((i * 31 + j * 7) % 13) as f32 / 5.0 - 1.0)
                        .collect();
                    let t = Tensor::from_vec(v, *s, &candle_core::Device::Cpu).unwrap();
                    (format!("p{i}"), Var::from_tensor(&t).unwrap())
                })
                .collect()
        }
        // Rank r's gradient at step t for parameter i: a fixed pattern, large enough to clip.
        fn grad(r: usize, t: usize, i: usize, n: usize) -> Vec<f32> {
            (0..n)
                .map(|j| (((r + 1) * (t + 2) * (i + 3) + j * 5) % 11) as f32 - 5.0)
                .collect()
        }
        fn store(vars: &[(String, Var)], g: &dyn Fn(usize, usize) -> Vec<f32>) -> GradStore {
            let dev = candle_core::Device::Cpu;
            let mut loss = Tensor::zeros((), DType::F32, &dev).unwrap();
            for (i, (_, v)) in vars.iter().enumerate() {
                let w = Tensor::from_vec(g(i, v.elem_count()), v.shape(), &dev).unwrap();
                loss = (loss + (v.as_tensor() * w).unwrap().sum_all().unwrap()).unwrap();
            }
            loss.backward().unwrap()
        }
        let world = 4;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let d = Dist::connect(rank, world, &addr, Duration::from_secs(10)).unwrap();
                    let d = Mutex::new(d);
                    let vars = init();
                    let mut opt = AdamW::new(vars.clone(), 0.05, 0.01);
                    opt.shard(rank, world).unwrap();
                    for t in 0..3 {
                        let g = store(&vars, &|i, n| grad(rank, t, i, n));
                        opt.sharded_step(Some(&g), 1.0, 1.0, Some(&d)).unwrap();
                    }
                    let bytes = opt.state_bytes();
                    opt.gather_state(Some(&d), true).unwrap();
                    let params: Vec<Vec<f32>> = vars
                        .iter()
                        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
                        .collect();
                    (bytes, params, opt.state())
                })
            })
            .collect();
        // One optimizer on the mean gradient.
        let vars = init();
        let mut one = AdamW::new(vars.clone(), 0.05, 0.01);
        for t in 0..3 {
            let mut g = store(&vars, &|i, n| {
                let mut mean = vec![0f32; n];
                for r in 0..world {
                    for (m, x) in mean.iter_mut().zip(grad(r, t, i, n)) {
                        *m += x / world as f32;
                    }
                }
                mean
            });
            let all: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
            clip_grad_norm(&mut g, &all, 1.0).unwrap();
            one.step(&g).unwrap();
        }
        let total: usize = SHAPES.iter().map(|s| s.iter().product::<usize>()).sum();
        let close = |a: &Tensor, b: &Tensor| {
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-6, "{d}");
        };
        for (rank, h) in handles.into_iter().enumerate() {
            let (bytes, params, state) = h.join().unwrap();
            assert_eq!(bytes, even_ranges(total, world)[rank].len() * 8);
            assert!(bytes * world <= total * 8 + world * 8);
            for ((_, v), p) in vars.iter().zip(&params) {
                close(
                    &v.as_tensor().flatten_all().unwrap(),
                    &Tensor::new(p.as_slice(), &dev).unwrap(),
                );
            }
            if rank > 0 {
                assert!(state.is_empty(), "only rank 0 holds the gathered state");
                continue;
            }
            let want = one.state();
            assert_eq!(state.len(), want.len());
            for (k, t) in &want {
                close(t, &state[k]);
            }
        }
        assert_eq!(one.state_bytes(), total * 8);
    }

    /// Two steps of `torch.optim.AdamW(lr=0.1, weight_decay=0.01)` on p = [1, -2] with
    /// gradients [0.5, 0.25] then [-1, 2], worked by hand from torch's update rule.
    #[test]
    fn adamw_matches_torch_update_rule() {
        let p = Var::new(&[1f32, -2.0], &candle_core::Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("p".into(), p.clone())], 0.1, 0.01);
        let mut want = [1f64, -2.0];
        let (mut m, mut v) = ([0f64; 2], [0f64; 2]);
        for (t, g) in [[0.5f64, 0.25], [-1.0, 2.0]].iter().enumerate() {
            let loss = (p.as_tensor()
                * &Tensor::new(&[g[0] as f32, g[1] as f32], p.device()).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
            let t = (t + 1) as i32;
            for i in 0..2 {
                want[i] *= 1.0 - 0.1 * 0.01;
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.999f64.powi(t));
                want[i] -= 0.1 * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..2 {
            assert!(
                (got[i] as f64 - want[i]).abs() < 1e-6,
                "{got:?} vs {want:?}"
            );
        }
    }

    #[test]
    fn cosine_schedule_warms_up_peaks_and_decays_to_zero() {
        assert_eq!(cosine_lr(1.0, 0, 10, 100), 0.0);
        assert!((cosine_lr(1.0, 5, 10, 100) - 0.5).abs() < 1e-12);
        assert!((cosine_lr(1.0, 10, 10, 100) - 1.0).abs() < 1e-12);
        assert!((cosine_lr(1.0, 55, 10, 100) - 0.5).abs() < 1e-12);
        assert!(cosine_lr(1.0, 100, 10, 100).abs() < 1e-12);
        assert_eq!(warmup_steps(0.03, 100), 3);
        assert_eq!(warmup_steps(0.03, 10), 1);
    }
}
