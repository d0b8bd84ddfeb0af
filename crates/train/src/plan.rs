//! `kollava train --plan`: the memory one rank of a training run needs, from the model's
//! shapes and the run's choices alone (no data or weights are read), so that hardware can be
//! sized before it is rented.
//!
//! Every figure counts what this program keeps, the way it keeps it: weights in f32 (frozen
//! matrices packed twice in bf16 with `--bf16`, 4-bit bases with QLoRA), f32 gradients and
//! AdamW moments for what trains, and the activations the backward pass needs, per token and
//! layer as the decoder's training graph holds them. The activation coefficients are those
//! of that graph (`tests/plan.rs` holds the whole estimate to the bytes a run allocates).

use kollava_model::config::{ModelConfig, ProjectorKind};

use crate::lora::{self, LoraOptions};
use crate::run::{trainable_filter, Sharding, Stage};

/// What a plan is made for.
#[derive(Debug, Clone)]
pub struct PlanSpec<'a> {
    pub config: &'a ModelConfig,
    /// Stage 1 of a v0 model also trains the `<im_start>`/`<im_end>` embedding rows (the
    /// whole table is a parameter, its gradient masked).
    pub boundary_rows: bool,
    pub stage: Stage,
    pub lora: Option<&'a LoraOptions>,
    pub freeze_llm: bool,
    pub freeze_projector: bool,
    pub tune_vision: bool,
    pub bf16: bool,
    pub shard: Sharding,
    /// Ranks the run is split over.
    pub world: usize,
    /// Samples per forward pass on each rank.
    pub batch: usize,
    /// Tokens per sample (image features included): the longest a batch can be.
    pub seq_len: usize,
    pub grad_accum: usize,
    pub checkpointing: bool,
}

/// Bytes per rank, by what holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryPlan {
    /// Every parameter of the model as built for training (adapters included).
    pub parameters: u64,
    /// The parameters that train.
    pub trained: u64,
    pub weights: u64,
    pub gradients: u64,
    pub optimizer: u64,
    /// What the backward pass needs of the forward's intermediates.
    pub activations: u64,
    /// The output head's logits and the loss over the labelled rows.
    pub head: u64,
    /// Short-lived buffers at the peak: the gradients in flight during the backward pass,
    /// or the flat buffers the ranks exchange.
    pub transient: u64,
    /// The highest point while loading, before the model takes its training form.
    pub load_peak: u64,
}

impl MemoryPlan {
    /// The highest point of a training step.
    pub fn step_peak(&self) -> u64 {
        self.weights
            + self.gradients
            + self.optimizer
            + self.activations
            + self.head
            + self.transient
    }

    /// The highest point of the run.
    pub fn peak(&self) -> u64 {
        self.step_peak().max(self.load_peak)
    }
}

/// One parameter: canonical name, element count, and `(out, in)` for a linear map's matrix.
struct Param {
    name: String,
    numel: u64,
    matrix: Option<(usize, usize)>,
}

/// The model's parameters as the loaders name them (the tower's encoder layers past the
/// selected one are not loaded, nor its `post_layernorm`).
fn parameters(cfg: &ModelConfig) -> Vec<Param> {
    let mut out = Vec::new();
    let matrix = |out: &mut Vec<Param>, name: String, o: usize, i: usize, bias: bool| {
        out.push(Param {
            name: format!("{name}.weight"),
            numel: (o * i) as u64,
            matrix: Some((o, i)),
        });
        if bias {
            out.push(Param {
                name: format!("{name}.bias"),
                numel: o as u64,
                matrix: None,
            });
        }
    };
    let vector = |out: &mut Vec<Param>, name: String, n: usize| {
        out.push(Param {
            name,
            numel: n as u64,
            matrix: None,
        })
    };
    let d = &cfg.decoder;
    let (h, i, hd) = (d.hidden_size, d.intermediate_size, d.head_dim);
    let (q, kv) = (d.num_attention_heads * hd, d.num_key_value_heads * hd);
    let mpt = d.mpt();
    let norm_bias = mpt.is_some_and(|o| o.norm_bias);
    vector(
        &mut out,
        "model.embed_tokens.weight".into(),
        d.vocab_size * h,
    );
    for l in 0..d.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let ab = d.attention_bias;
        match mpt {
            None => {
                matrix(&mut out, format!("{p}.self_attn.q_proj"), q, h, ab);
                matrix(&mut out, format!("{p}.self_attn.k_proj"), kv, h, ab);
                matrix(&mut out, format!("{p}.self_attn.v_proj"), kv, h, ab);
                matrix(&mut out, format!("{p}.mlp.gate_proj"), i, h, d.mlp_bias);
            }
            Some(o) => {
                matrix(
                    &mut out,
                    format!("{p}.self_attn.qkv_proj"),
                    q + 2 * kv,
                    h,
                    ab,
                );
                if o.qk_ln {
                    for n in ["q_ln", "k_ln"] {
                        vector(&mut out, format!("{p}.self_attn.{n}.weight"), h);
                    }
                }
            }
        }
        matrix(&mut out, format!("{p}.self_attn.o_proj"), h, q, ab);
        matrix(&mut out, format!("{p}.mlp.up_proj"), i, h, d.mlp_bias);
        matrix(&mut out, format!("{p}.mlp.down_proj"), h, i, d.mlp_bias);
        for n in ["input_layernorm", "post_attention_layernorm"] {
            vector(&mut out, format!("{p}.{n}.weight"), h);
            if norm_bias {
                vector(&mut out, format!("{p}.{n}.bias"), h);
            }
        }
    }
    vector(&mut out, "model.norm.weight".into(), h);
    if !d.tie_word_embeddings {
        matrix(&mut out, "lm_head".into(), d.vocab_size, h, false);
    }
    let vh = cfg.vision.hidden_size;
    match cfg.projector {
        ProjectorKind::Identity => {}
        ProjectorKind::Linear => matrix(&mut out, "model.mm_projector".into(), h, vh, true),
        ProjectorKind::Mlp { depth, .. } => {
            for k in 0..depth {
                let inp = if k == 0 { vh } else { h };
                matrix(
                    &mut out,
                    format!("model.mm_projector.{}", 2 * k),
                    h,
                    inp,
                    true,
                );
            }
        }
    }
    let v = &cfg.vision;
    let e = "vision_model.embeddings";
    let patch = v.num_channels * v.patch_size * v.patch_size;
    vector(&mut out, format!("{e}.patch_embedding.weight"), vh * patch);
    vector(&mut out, format!("{e}.class_embedding"), vh);
    let positions = v.grid() * v.grid() + 1;
    vector(
        &mut out,
        format!("{e}.position_embedding.weight"),
        positions * vh,
    );
    vector(&mut out, "vision_model.pre_layrnorm.weight".into(), 2 * vh);
    for l in 0..cfg.vision_layers_used {
        let p = format!("vision_model.encoder.layers.{l}");
        for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            matrix(&mut out, format!("{p}.self_attn.{n}"), vh, vh, true);
        }
        matrix(
            &mut out,
            format!("{p}.mlp.fc1"),
            v.intermediate_size,
            vh,
            true,
        );
        matrix(
            &mut out,
            format!("{p}.mlp.fc2"),
            vh,
            v.intermediate_size,
            true,
        );
        for n in ["layer_norm1", "layer_norm2"] {
            vector(&mut out, format!("{p}.{n}.weight"), 2 * vh);
        }
    }
    out
}

/// Q4_0: 32 weights in 18 bytes.
const Q4_0_BYTES: f64 = 18.0 / 32.0;

/// The plan for `spec`.
pub fn plan(spec: &PlanSpec) -> MemoryPlan {
    let cfg = spec.config;
    let d = &cfg.decoder;
    let finetune = spec.stage == Stage::Finetune;
    let filter = trainable_filter(
        finetune,
        spec.lora.is_some(),
        (spec.freeze_llm, spec.freeze_projector, spec.tune_vision),
        spec.boundary_rows && !finetune,
    );
    let params = parameters(cfg);
    let world = spec.world.max(1) as u64;
    let llm_linear = |p: &Param| {
        p.matrix.is_some() && p.name.starts_with("model.layers.") && p.name.ends_with(".weight")
    };
    let adapted = |p: &Param| {
        let module = p.name.trim_end_matches(".weight").rsplit('.').next();
        llm_linear(p)
            && spec
                .lora
                .is_some_and(|lo| lora::targets(&lo.targets, module.unwrap_or_default()))
    };
    let (mut total, mut trained, mut weights, mut loaded) = (0u64, 0u64, 0f64, 0u64);
    for p in &params {
        total += p.numel;
        loaded += 4 * p.numel;
        let trains = filter(&p.name);
        if trains {
            trained += p.numel;
        }
        let four_bit = spec.lora.is_some_and(|lo| lo.four_bit)
            && llm_linear(p)
            && p.matrix.is_some_and(|(_, i)| i % 32 == 0);
        weights += if four_bit {
            Q4_0_BYTES * p.numel as f64
        } else {
            // f32; a frozen matrix packed for the bf16 kernels both ways is as large.
            4.0 * p.numel as f64
        };
        if let (true, Some(lo), Some((o, i))) = (adapted(p), spec.lora, p.matrix) {
            let n = (lo.r * (o + i)) as u64;
            total += n;
            trained += n;
            weights += 4.0 * n as f64;
        }
    }
    let mut weights = weights as u64;
    // Each tensor is read in the file's type (16 bits, as checkpoints are published) and
    // then widened: the largest one's read copy comes on top.
    let largest = |f: &dyn Fn(&Param) -> bool| {
        params
            .iter()
            .filter(|p| f(p))
            .map(|p| p.numel)
            .max()
            .unwrap_or(0)
    };
    loaded += 2 * largest(&|_| true);
    if spec.lora.is_some_and(|lo| lo.four_bit) {
        // The base is quantized as it is read: one matrix at a time (read, then in f32)
        // besides the model.
        loaded = weights + (2 * largest(&|_| true)).max(6 * largest(&llm_linear));
    }
    // `--shard full` shards the decoder layers that train (else it is grad-opt): each rank
    // keeps its range of their weights and gathers one layer at a time, its weights and,
    // in the backward, their differentiable copy and gradients; the rest stays whole.
    let layers_trained: u64 = params
        .iter()
        .filter(|p| p.name.starts_with("model.layers.") && filter(&p.name))
        .map(|p| p.numel)
        .sum();
    let full = spec.shard == Sharding::Full && layers_trained > 0;
    let one_layer = 4 * params
        .iter()
        .filter(|p| p.name.starts_with("model.layers.0."))
        .map(|p| p.numel)
        .sum::<u64>();
    // The trained parameters held whole (embeddings, head, projector, …).
    let whole_trained = trained - layers_trained;
    if full {
        // Each rank's range of the flat vector covers some of those too, kept beside them.
        weights = weights - 4 * layers_trained
            + 4 * layers_trained / world
            + 4 * whole_trained / world
            + 2 * one_layer;
    }
    let grads = 4 * trained;
    let (gradients, optimizer) = match spec.shard {
        Sharding::None => (grads, 8 * trained),
        Sharding::GradOpt => (grads, 8 * trained / world),
        Sharding::Full if !full => (grads, 8 * trained / world),
        // The whole ones' gradients, this rank's range of all, and one layer's.
        Sharding::Full => (
            4 * whole_trained + grads / world + one_layer,
            8 * trained / world,
        ),
    };
    // Full sharding recomputes each layer in the backward.
    let checkpointing = spec.checkpointing || full;

    // Activations, in f32 elements per token of one layer as the training graph keeps them.
    let (h, i) = (d.hidden_size as u64, d.intermediate_size as u64);
    let kvd = (d.num_key_value_heads * d.head_dim) as u64;
    let per_layer = match d.mpt() {
        None => 10 * h + 4 * kvd + 3 * i,
        Some(_) => 14 * h + 8 * kvd + 3 * i,
    };
    let adapter_extra = match spec.lora {
        Some(lo) => {
            let has = |m: &str| lora::targets(&lo.targets, m);
            // Per adapted map (one op, `LoraProduct`): the rank-r product, and with
            // dropout the mask as bits (a 32nd of the input).
            let mut e = 0;
            for (m, inp) in [
                ("q_proj", h),
                ("k_proj", h),
                ("v_proj", h),
                ("o_proj", h),
                ("gate_proj", h),
                ("up_proj", h),
                ("down_proj", i),
            ] {
                if has(m) {
                    let mask = if lo.dropout > 0.0 {
                        inp.div_ceil(32)
                    } else {
                        0
                    };
                    e += mask + lo.r as u64;
                }
            }
            e
        }
        None => 0,
    };
    let tokens = (spec.batch * spec.seq_len) as u64;
    let layers = d.num_hidden_layers as u64;
    let layer_bytes = 4 * tokens * (per_layer + adapter_extra);
    // The spliced input embeddings (the lookup, the splice, the padded batch).
    let inputs = 4 * tokens * 3 * h;
    let activations = if checkpointing {
        // Each layer's input, and one layer recomputed for its backward.
        4 * tokens * h * layers + layer_bytes + inputs
    } else {
        layer_bytes * layers + inputs
    };
    // The projector's intermediates over the image features.
    let image_tokens = cfg.image_tokens() as u64 * spec.batch as u64;
    let vh = cfg.vision.hidden_size as u64;
    let projector = 4 * image_tokens * (vh + 3 * h);
    let activations = activations + projector;

    // The head: the logits over the labelled rows (every text position of a full sequence,
    // at most) and their gradient.
    let text = spec.seq_len.saturating_sub(cfg.image_tokens()).max(1) as u64;
    let rows = text * spec.batch as u64;
    let head = 4 * rows * d.vocab_size as u64 * 2;

    // At the end of the backward pass, what is in flight; at the optimizer step the ranks
    // exchange gradients through flat buffers instead (the activations are gone by then,
    // so the larger of the two counts).
    // The backward pass's gradients of intermediates in flight: measured on the decoder
    // with trained layers, (19h + 2i) per token, and (8h + 3i) more per layer whose
    // backward is pending (all of them, or the one recomputed with checkpointing).
    // Layers whose matrices are frozen (stage 1; LoRA's base, its adapters fused into one
    // op per map) compute no weight gradients, and their fused ops (RMSNorm, rotary, SiLU
    // gate, frozen and LoRA products) return one gradient each: measured, (5h + 2i) per
    // token and (2h + i) per pending layer.
    let pending = if checkpointing { 1 } else { layers };
    let backward = if layers_trained == 0 {
        4 * tokens * (5 * h + 2 * i + pending * (2 * h + i + adapter_extra))
    } else {
        4 * tokens * (19 * h + 2 * i + pending * (8 * h + 3 * i))
    };
    // Accumulating micro-batches: the running sum beside the new pass's gradients (those
    // are `gradients`; the sum is formed one parameter at a time).
    let accumulating = if spec.grad_accum > 1 { grads } else { 0 };
    let in_flight = backward + accumulating;
    let exchange = match (world, spec.shard) {
        (1, _) => 0,
        (_, Sharding::None) => 2 * grads,
        (_, Sharding::Full) if full => {
            // At the step, the whole ones' gradients laid flat (gathered, then read out) and
            // their mean on rank 0; one layer's at a time before that.
            (2 * one_layer).max(3 * 4 * whole_trained)
        }
        (_, Sharding::GradOpt | Sharding::Full) => grads + grads / world,
    };
    let transient = in_flight.max(exchange.saturating_sub(activations + head));
    MemoryPlan {
        parameters: total,
        trained,
        weights,
        gradients,
        optimizer,
        activations,
        head,
        transient,
        load_peak: loaded,
    }
}
