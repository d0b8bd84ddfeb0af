//! The same answer across code paths (style guide §4): one full forward vs prefill then
//! cached steps, and one sequence alone vs in a right-padded batch with a longer one.

use candle_core::{DType, Device, IndexOp, Tensor};
use kollava_checkpoint::{OpenOptions, Precision};
use kollava_model::{KvCache, Llava};
use kollava_testkit::{checkpoint_dir, max_abs_diff};

fn load(name: &str) -> Llava {
    let dir = checkpoint_dir(name);
    let ckpt = kollava_checkpoint::open(dir.to_str().unwrap(), &OpenOptions::default()).unwrap();
    ckpt.load_model(DType::F32, &Device::Cpu).unwrap()
}

fn embed(model: &Llava, ids: &[u32]) -> Tensor {
    model
        .decoder
        .embed(
            &Tensor::new(ids, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
        .unwrap()
}

fn logits_rows(model: &Llava, hidden: &Tensor) -> Vec<Vec<f32>> {
    let l = model.decoder.logits(hidden).unwrap().squeeze(0).unwrap();
    (0..l.dim(0).unwrap())
        .map(|i| l.i(i).unwrap().to_vec1().unwrap())
        .collect()
}

const IDS: [u32; 12] = [
    1, 319, 13563, 1546, 263, 12758, 5199, 322, 385, 23116, 21082, 20255,
];

#[test]
fn cached_decode_equals_one_full_forward() {
    // llava-mistral has a sliding window of 40 in its config; this also runs through it.
    for name in ["llava-v1.5", "llava-mistral"] {
        let model = load(name);
        let layers = model.config().decoder.num_hidden_layers;
        let mut full_cache = KvCache::new(layers, 1);
        let full = model
            .decoder
            .forward(&embed(&model, &IDS), &[IDS.len()], &mut full_cache)
            .unwrap();
        let full = logits_rows(&model, &full);

        let mut cache = KvCache::new(layers, 1);
        let mut stepwise = logits_rows(
            &model,
            &model
                .decoder
                .forward(&embed(&model, &IDS[..5]), &[5], &mut cache)
                .unwrap(),
        );
        for &id in &IDS[5..] {
            let h = model
                .decoder
                .forward(&embed(&model, &[id]), &[1], &mut cache)
                .unwrap();
            stepwise.extend(logits_rows(&model, &h));
        }
        for (i, (a, b)) in full.iter().zip(&stepwise).enumerate() {
            assert!(
                max_abs_diff(a, b) < 1e-4,
                "{name} position {i}: {}",
                max_abs_diff(a, b)
            );
        }
    }
}

/// A cache kept in f16 (what `--dtype bf16` and quantized models prefill and decode with)
/// against the exact full forward, over enough steps that the buffers grow twice past their first
/// capacity (and past llava-mistral's window of 40).
#[test]
fn an_f16_cache_decodes_close_to_one_full_forward() {
    let ids: Vec<u32> = (0..150u32)
        .map(|i| IDS[i as usize % IDS.len()] + i)
        .collect();
    for name in ["llava-v1.5", "llava-mistral"] {
        let model = load(name);
        let layers = model.config().decoder.num_hidden_layers;
        let full = model
            .decoder
            .forward(
                &embed(&model, &ids),
                &[ids.len()],
                &mut KvCache::new(layers, 1),
            )
            .unwrap();
        let full = logits_rows(&model, &full);
        let prefill = 9;
        // Growing as it goes, and reserved for the whole sequence up front.
        let run = |reserve: usize| {
            let mut cache = KvCache::new(layers, 1).storing(DType::F16);
            cache.reserve(reserve);
            let mut rows = logits_rows(
                &model,
                &model
                    .decoder
                    .forward(&embed(&model, &ids[..prefill]), &[prefill], &mut cache)
                    .unwrap(),
            );
            for &id in &ids[prefill..] {
                let h = model
                    .decoder
                    .forward(&embed(&model, &[id]), &[1], &mut cache)
                    .unwrap();
                rows.extend(logits_rows(&model, &h));
            }
            (rows, cache.capacity())
        };
        let (stepwise, grown) = run(0);
        let (reserved, capacity) = run(ids.len());
        assert!(grown > ids.len(), "{name}: grew to {grown}");
        assert_eq!(capacity, ids.len(), "{name}: the reservation was not kept");
        assert_eq!(
            stepwise, reserved,
            "{name}: a reservation changed the numbers"
        );
        let scale = full.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
        for (i, (a, b)) in full.iter().zip(&stepwise).enumerate() {
            let err = max_abs_diff(a, b);
            // Every step, the prefill included, reads keys and values rounded to f16
            // (relative error 2^-11), so that a prompt prefilled after a reused prefix is
            // computed as a cold one (see kollava_generate::prefix_cache).
            let tol = 5e-4 * scale;
            assert!(
                err < tol,
                "{name} position {i}: {err} (logits up to {scale})"
            );
        }
    }
}

#[test]
fn a_sequence_decodes_the_same_alone_and_in_a_ragged_batch() {
    let model = load("llava-v1.5");
    let layers = model.config().decoder.num_hidden_layers;
    let short = &IDS[..7];
    let long = &IDS[..];
    // Alone: prefill then two steps.
    let mut alone = Vec::new();
    for ids in [short, long] {
        let mut cache = KvCache::new(layers, 1);
        let h = model
            .decoder
            .forward(&embed(&model, ids), &[ids.len()], &mut cache)
            .unwrap();
        let mut rows = vec![logits_rows(&model, &h).pop().unwrap()];
        for id in [29871u32, 13] {
            let h = model
                .decoder
                .forward(&embed(&model, &[id]), &[1], &mut cache)
                .unwrap();
            rows.push(logits_rows(&model, &h).pop().unwrap());
        }
        alone.push(rows);
    }
    // Batched: the short row right-padded with id 0.
    let mut padded = short.to_vec();
    padded.resize(long.len(), 0);
    let x = Tensor::cat(&[embed(&model, &padded), embed(&model, long)], 0).unwrap();
    let mut cache = KvCache::new(layers, 2);
    let h = model
        .decoder
        .forward(&x, &[short.len(), long.len()], &mut cache)
        .unwrap();
    let l = model.decoder.logits(&h).unwrap();
    let mut batched = [
        vec![l.i((0, short.len() - 1)).unwrap().to_vec1::<f32>().unwrap()],
        vec![l.i((1, long.len() - 1)).unwrap().to_vec1::<f32>().unwrap()],
    ];
    for id in [29871u32, 13] {
        let ids = Tensor::new(&[[id], [id]], &Device::Cpu).unwrap();
        let h = model
            .decoder
            .forward(&model.decoder.embed(&ids).unwrap(), &[1, 1], &mut cache)
            .unwrap();
        let l = model.decoder.logits(&h).unwrap();
        for (r, rows) in batched.iter_mut().enumerate() {
            rows.push(l.i((r, 0)).unwrap().to_vec1::<f32>().unwrap());
        }
    }
    for r in 0..2 {
        for (step, (a, b)) in alone[r].iter().zip(&batched[r]).enumerate() {
            assert!(
                max_abs_diff(a, b) < 1e-4,
                "row {r} step {step}: {}",
                max_abs_diff(a, b)
            );
        }
    }
}

#[test]
fn sliding_window_changes_attention_beyond_the_window() {
    // With a 40-token window, a 60-token sequence's last logits differ from a model that
    // ignores the window (guards against the window silently not being applied).
    let dir = checkpoint_dir("llava-mistral");
    let ckpt = kollava_checkpoint::open(dir.to_str().unwrap(), &OpenOptions::default()).unwrap();
    assert_eq!(ckpt.config.decoder.sliding_window, Some(40));
    let windowed = ckpt.load_model(DType::F32, &Device::Cpu).unwrap();
    let mut unwindowed_ckpt = ckpt.clone();
    unwindowed_ckpt.config.decoder.sliding_window = None;
    let plain = unwindowed_ckpt
        .load_model(DType::F32, &Device::Cpu)
        .unwrap();
    let ids: Vec<u32> = (0..60).map(|i| 100 + i * 37).collect();
    let run = |m: &Llava| {
        let mut cache = KvCache::new(m.config().decoder.num_hidden_layers, 1);
        logits_rows(
            m,
            &m.decoder
                .forward(&embed(m, &ids), &[ids.len()], &mut cache)
                .unwrap(),
        )
    };
    let (a, b) = (run(&windowed), run(&plain));
    assert!(
        max_abs_diff(&a[30], &b[30]) < 1e-5,
        "inside the window both agree"
    );
    assert!(
        max_abs_diff(&a[59], &b[59]) > 1e-4,
        "beyond the window they must differ"
    );
}

/// Continuous batching (the server's path): sequences that join a running batch at
/// different steps, with different prompt lengths and budgets, and leave when they end,
/// produce exactly the tokens each produces alone.
#[test]
fn sequences_joining_and_leaving_a_running_batch_decode_as_alone() {
    use kollava_generate::{generate, Batch, GenerateOptions, SamplingParams};
    // llava-mistral's window of 40 is crossed by the longest answer.
    for name in ["llava-v1.5", "llava-mistral"] {
        let dir = checkpoint_dir(name);
        let ckpt =
            kollava_checkpoint::open(dir.to_str().unwrap(), &OpenOptions::default()).unwrap();
        let tok = ckpt.tokenizer().unwrap();
        // As loaded (training's layout) and packed for serving: f32, and bf16 on CPUs with
        // AVX512-BF16, whose kernels must not let a row's sums depend on its batch.
        let mut plans = vec![None, Some(Precision::Dense(DType::F32))];
        if kollava_model::kernels::bf16::available() {
            plans.push(Some(Precision::PackedBf16));
        }
        for plan in plans {
            let model = match plan {
                None => ckpt.load_model(DType::F32, &Device::Cpu).unwrap(),
                Some(p) => ckpt.load_for_inference(p, &Device::Cpu).unwrap(),
            };
            let name = format!("{name} as {plan:?}");
            let opts = |max_new_tokens| GenerateOptions {
                sampling: SamplingParams {
                    temperature: 0.0,
                    ..Default::default()
                },
                max_new_tokens,
                eos_ids: Vec::new(),
                stop_strings: Vec::new(),
                context_len: 4096,
                constraint: None,
            };
            // (prompt, budget, decode steps of the batch before it joins)
            let plan: [(&[u32], usize, usize); 4] = [
                (&IDS, 30, 0),
                (&IDS[..5], 6, 2),
                (&IDS[..8], 12, 0),
                (&IDS[3..], 9, 5),
            ];
            let alone: Vec<Vec<u32>> = plan
                .iter()
                .map(|&(ids, n, _)| {
                    generate(
                        &model,
                        &tok,
                        &embed(&model, ids),
                        ids,
                        &opts(n),
                        &mut |_| true,
                    )
                    .unwrap()
                    .ids
                })
                .collect();

            let mut batch = Batch::new(&model);
            let mut got: Vec<Option<Vec<u32>>> = vec![None; plan.len()];
            let mut peak = 0;
            for (i, &(ids, n, wait)) in plan.iter().enumerate() {
                for _ in 0..wait {
                    for f in batch.step(&model, &tok).unwrap() {
                        got[f.tag] = Some(f.generation.ids);
                    }
                }
                let o = opts(n);
                if let Some(f) = batch
                    .join(&model, &tok, &embed(&model, ids), ids, &o, |_| true, i)
                    .unwrap()
                {
                    got[f.tag] = Some(f.generation.ids);
                }
                peak = peak.max(batch.len());
            }
            while !batch.is_empty() {
                for f in batch.step(&model, &tok).unwrap() {
                    got[f.tag] = Some(f.generation.ids);
                }
            }
            assert!(peak >= 3, "{name}: the plan must overlap sequences");
            for (i, want) in alone.iter().enumerate() {
                assert_eq!(
                    want.len(),
                    plan[i].1,
                    "{name}: sequence {i} runs to its budget"
                );
                assert_eq!(got[i].as_ref(), Some(want), "{name}: sequence {i}");
            }
        }
    }
}

/// A decoder whose matrices are `Q4_K` (and `lm_head` `Q6_K`), as in a Q4_K_M GGUF, with
/// widths that are multiples of 256 so that our k-quant kernels take them; and the same
/// (dequantized) weights as f32 matrices, multiplied by candle.
fn k_quant_decoder() -> (
    kollava_model::decoder::Decoder,
    kollava_model::decoder::Decoder,
) {
    use candle_core::quantized::{GgmlDType, QTensor};
    use kollava_model::config::{Activation, DecoderConfig};
    use kollava_model::decoder::Decoder;
    use kollava_model::layers::Linear;
    use std::sync::Arc;

    let dev = Device::Cpu;
    let cfg = DecoderConfig {
        arch: kollava_model::config::Architecture::Llama,
        vocab_size: 320,
        hidden_size: 256,
        intermediate_size: 512,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 1e4,
        max_position_embeddings: 256,
        sliding_window: None,
        attention_bias: false,
        mlp_bias: false,
        hidden_act: Activation::Silu,
        tie_word_embeddings: false,
    };
    let (h, f, kv) = (256, 512, 2 * 64);
    let mut weights = std::collections::HashMap::new();
    // Seeded, so that the test sees the same weights every run: random weights make an
    // activation that rounds differently on the two paths now and then, which moves a logit
    // by up to ~2 % of the largest.
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut put = |name: String, shape: (usize, usize)| {
        let w: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.random_range(-0.09f32..0.09))
            .collect();
        weights.insert(name, Tensor::from_vec(w, shape, &dev).unwrap());
    };
    put("model.embed_tokens.weight".into(), (320, h));
    put("lm_head.weight".into(), (320, h));
    for i in 0..2 {
        let l = format!("model.layers.{i}");
        for (name, shape) in [
            ("self_attn.q_proj", (h, h)),
            ("self_attn.k_proj", (kv, h)),
            ("self_attn.v_proj", (kv, h)),
            ("self_attn.o_proj", (h, h)),
            ("mlp.gate_proj", (f, h)),
            ("mlp.up_proj", (f, h)),
            ("mlp.down_proj", (h, f)),
        ] {
            put(format!("{l}.{name}.weight"), shape);
        }
    }
    let ones = Tensor::ones(h, DType::F32, &dev).unwrap();
    for name in ["model.norm".to_string()]
        .into_iter()
        .chain((0..2).flat_map(|i| {
            ["input_layernorm", "post_attention_layernorm"].map(|n| format!("model.layers.{i}.{n}"))
        }))
    {
        weights.insert(format!("{name}.weight"), ones.clone());
    }
    let vb = candle_nn::VarBuilder::from_tensors(weights, DType::F32, &dev);
    let mut decoder = Decoder::load(vb, &cfg, kollava_model::form::Matrices::AS_READ).unwrap();
    let quantize = |l: &Linear, t: GgmlDType| {
        let (w, _) = l.parameters().unwrap();
        Linear::Quantized {
            weight: Arc::new(QTensor::quantize(w, t).unwrap()),
            bias: None,
        }
    };
    for (_, l) in decoder.linears_mut() {
        *l = quantize(l, GgmlDType::Q4K);
    }
    let head = quantize(decoder.lm_head_mut(), GgmlDType::Q6K);
    *decoder.lm_head_mut() = head;
    // The reference: the same (dequantized) weights, multiplied in f32 by candle.
    let mut exact = decoder.clone();
    let dense = |l: &Linear| match l {
        Linear::Quantized { weight, .. } => Linear::from_weight(weight.dequantize(&dev).unwrap()),
        _ => unreachable!(),
    };
    for (_, l) in exact.linears_mut() {
        *l = dense(l);
    }
    let head = dense(exact.lm_head_mut());
    *exact.lm_head_mut() = head;

    (decoder, exact)
}

/// Logits decoded step by step (our integer kernels) and those of one full forward of the
/// whole sequence (the tiled bf16 GEMM with AVX512, the integer kernels again with AVX2)
/// both agree with candle's f32 forward of the dequantized weights.
#[test]
fn k_quant_prefill_and_decoding_agree_with_the_dequantized_f32_forward() {
    use kollava_model::decoder::Decoder;
    let dev = Device::Cpu;
    let (decoder, exact) = k_quant_decoder();
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 11) % 320).collect();
    let embed = |ids: &[u32]| {
        decoder
            .embed(&Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap())
            .unwrap()
    };
    let rows = |d: &Decoder, h: &Tensor| -> Vec<Vec<f32>> {
        d.logits(h).unwrap().squeeze(0).unwrap().to_vec2().unwrap()
    };
    let full_forward = |d: &Decoder| {
        let mut cache = KvCache::new(2, 1);
        rows(
            d,
            &d.forward(&embed(&ids), &[ids.len()], &mut cache).unwrap(),
        )
    };
    let want = full_forward(&exact);
    // Prefill: 24 rows, the tiled bf16 GEMM over blocks dequantized on the fly (where the
    // integer kernels are the AVX2 ones, they take prefill too: see `kquant::max_rows`).
    let full = full_forward(&decoder);
    let prefill_is_integer = ids.len() <= kollava_model::kernels::kquant::max_rows();
    // Decoding: row by row, the integer kernels over Q8_K activations.
    let mut cache = KvCache::new(2, 1);
    let mut stepwise = rows(
        &decoder,
        &decoder
            .forward(&embed(&ids[..4]), &[4], &mut cache)
            .unwrap(),
    );
    for &id in &ids[4..] {
        stepwise.extend(rows(
            &decoder,
            &decoder.forward(&embed(&[id]), &[1], &mut cache).unwrap(),
        ));
    }
    // Rounding the activations (to bf16; to 8 bits per block of 256 for decoding) moves the
    // logits of these random weights by ~1 and ~2 % of the largest; a kernel bug (a wrong
    // scale, a dropped sub-block, swapped values) moves them by tens of per cent.
    // Prefill through the integer kernels rounds as decoding does, and is held to its bounds.
    let (integer, bf16) = ((5e-2, 3.5e-2), (2.5e-2, 1.5e-2));
    let prefill = if prefill_is_integer { integer } else { bf16 };
    for (path, got, (max, median)) in [
        ("prefill", &full, prefill),
        ("decoding", &stepwise, integer),
    ] {
        let mut errors: Vec<f32> = want
            .iter()
            .zip(got)
            .map(|(a, b)| {
                let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(scale > 0.1, "logits all but zero");
                max_abs_diff(a, b) / scale
            })
            .collect();
        errors.sort_by(f32::total_cmp);
        assert!(errors[errors.len() - 1] < max, "{path}: {errors:?}");
        assert!(errors[errors.len() / 2] < median, "{path}: {errors:?}");
    }
}

/// A `Q4_K_M`-like prompt prefilled in two steps (a reused prefix, then the rest), the
/// second at least `steady_rows` long, gives the logits of one forward of the whole prompt
/// bit for bit, with the cache in f32 and in f16: whatever kernels this CPU runs, every
/// prefill step of a quantized model takes the same one (on AVX512 the bf16 GEMM, however
/// short the step), which is what lets a conversation's follow-up answer as a cold run.
#[test]
fn a_k_quant_prompt_cut_after_a_prefix_prefills_the_bits_of_one_forward() {
    let dev = Device::Cpu;
    let (decoder, _) = k_quant_decoder();
    let fresh = decoder.steady_rows();
    let ids: Vec<u32> = (0..40 + fresh as u32).map(|i| (i * 53 + 7) % 320).collect();
    let embed = |ids: &[u32]| {
        decoder
            .embed(&Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap())
            .unwrap()
    };
    let logits = |h: &Tensor| -> Vec<Vec<f32>> {
        decoder
            .logits(h)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap()
    };
    for dtype in [DType::F32, DType::F16] {
        let cache = || KvCache::new(2, 1).storing(dtype);
        let mut c = cache();
        let whole = logits(&decoder.forward(&embed(&ids), &[ids.len()], &mut c).unwrap());
        // Each step as long as the store keeps (see `Batch::join_prompt`).
        for cut in [fresh, fresh + 7, ids.len() - fresh] {
            let mut c = cache();
            decoder
                .forward(&embed(&ids[..cut]), &[cut], &mut c)
                .unwrap();
            let rest = &ids[cut..];
            let got = logits(
                &decoder
                    .forward(&embed(rest), &[rest.len()], &mut c)
                    .unwrap(),
            );
            assert!(
                got == whole[cut..],
                "{dtype:?}: the last {} positions after a cut at {cut} differ",
                rest.len()
            );
        }
    }
}
