//! LoRA on a fixture model: adapters start as a no-op, and a merged checkpoint gives the
//! logits that base + adapters give.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use kollava_model::KvCache;
use kollava_testkit::{checkpoint_dir, max_abs_diff};
use kollava_train::lora::{add_adapters, merge, LoraOptions, ALL_TARGETS};

fn logits(model: &kollava_model::Llava, ids: &[u32]) -> Vec<f32> {
    let embeds = model.embed_with_images(ids, &[], None).unwrap();
    let mut cache = KvCache::new(model.config().decoder.num_hidden_layers, 1);
    let hidden = model
        .decoder
        .forward(&embeds, &[ids.len()], &mut cache)
        .unwrap();
    model
        .decoder
        .logits(&hidden)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn merged_weights_give_the_logits_of_base_plus_adapters() {
    let dir = checkpoint_dir("llava-v1.5");
    let ckpt = kollava_checkpoint::open(dir.to_str().unwrap(), &Default::default()).unwrap();
    let ids: Vec<u32> = ckpt
        .tokenizer()
        .unwrap()
        .encode("안녕하세요, 무엇이 보이나요?")
        .unwrap();
    let mut tm = ckpt
        .load_trainable(DType::F32, &Device::Cpu, Arc::new(|_: &str| false))
        .unwrap();
    let base = logits(&tm.model, &ids);
    let opts = LoraOptions {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: ALL_TARGETS.iter().map(|s| s.to_string()).collect(),
        four_bit: false,
        seed: 1,
    };
    let params = add_adapters(&mut tm.model, &opts, None).unwrap();
    assert_eq!(params.len(), 2 * 7 * ckpt.config.decoder.num_hidden_layers);
    // B starts at zero: the adapted model is the base model (up to float rounding: with
    // trainable adapters the softmax runs as differentiable tensor ops, not the fused pass).
    let d = max_abs_diff(&base, &logits(&tm.model, &ids));
    assert!(d < 1e-5, "{d}");
    // Give B values, as training would.
    for (name, var) in &params {
        if name.ends_with("lora_B.weight") {
            var.set(&Tensor::randn(0f32, 0.5, var.dims(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let adapted = logits(&tm.model, &ids);
    assert!(
        max_abs_diff(&base, &adapted) > 1e-3,
        "the adapters change the output"
    );

    let adapter: HashMap<String, Tensor> = params
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let merged = merge(&tm.tensors, &adapter, opts.scale()).unwrap();
    assert_eq!(merged.len(), params.len() / 2);
    let out = tempfile::tempdir().unwrap();
    let out = out.path().join("merged");
    ckpt.save_with(&out, &merged, Some(DType::F32)).unwrap();
    let again = kollava_checkpoint::open(out.to_str().unwrap(), &Default::default())
        .unwrap()
        .load_model(DType::F32, &Device::Cpu)
        .unwrap();
    let d = max_abs_diff(&adapted, &logits(&again, &ids));
    assert!(d < 1e-4, "merged vs adapted: {d}");
}

#[test]
fn four_bit_bases_stay_close_to_the_dense_model() {
    let dir = checkpoint_dir("llava-v1.5");
    let ckpt = kollava_checkpoint::open(dir.to_str().unwrap(), &Default::default()).unwrap();
    let ids: Vec<u32> = ckpt
        .tokenizer()
        .unwrap()
        .encode("무엇이 보이나요?")
        .unwrap();
    let mut tm = ckpt
        .load_trainable(DType::F32, &Device::Cpu, Arc::new(|_: &str| false))
        .unwrap();
    let dense = logits(&tm.model, &ids);
    let opts = LoraOptions {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets: vec!["q_proj".into(), "v_proj".into()],
        four_bit: true,
        seed: 1,
    };
    let params = add_adapters(&mut tm.model, &opts, None).unwrap();
    assert_eq!(params.len(), 2 * 2 * ckpt.config.decoder.num_hidden_layers);
    let quantized = logits(&tm.model, &ids);
    assert!(
        max_abs_diff(&dense, &quantized) > 0.0,
        "the bases really are quantized"
    );
    // Q4_0 keeps 16 levels per block of 32 weights: the logits move, but keep their shape.
    let dot: f32 = dense.iter().zip(&quantized).map(|(a, b)| a * b).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let cosine = dot / (norm(&dense) * norm(&quantized));
    assert!(cosine > 0.98, "cosine {cosine}");
}

/// A QLoRA base quantized as it is read (`Form::Q4Base`) is the base quantized after a
/// dense load: every decoder matrix in the same Q4_0 blocks (the output head as read), the
/// same logits under the same adapters, and no f32 copy of those matrices kept.
#[test]
fn a_base_quantized_as_read_equals_one_quantized_after_loading() {
    for family in ["llava-v1.5", "llava-mpt"] {
        let dir = checkpoint_dir(family);
        let ckpt = kollava_checkpoint::open(dir.to_str().unwrap(), &Default::default()).unwrap();
        let ids: Vec<u32> = vec![1, 23, 45, 67, 89, 101];
        let opts = LoraOptions {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            targets: vec!["q_proj".into(), "down_proj".into()],
            four_bit: true,
            seed: 1,
        };
        let frozen = || Arc::new(|_: &str| false);
        let mut after = ckpt
            .load_trainable(DType::F32, &Device::Cpu, frozen())
            .unwrap();
        let mut read = ckpt
            .load_trainable_as(
                DType::F32,
                &Device::Cpu,
                frozen(),
                kollava_model::form::Form::Q4Base,
            )
            .unwrap();
        assert!(
            !read
                .tensors
                .iter()
                .any(|(n, _)| n.starts_with("model.layers.") && n.ends_with("_proj.weight")),
            "{family}: f32 copies of the base kept"
        );
        assert!(
            read.model
                .decoder
                .linears_mut()
                .iter()
                .all(|(_, l)| l.is_quantized()),
            "{family}: the base is 4-bit before any adapter"
        );
        add_adapters(&mut after.model, &opts, None).unwrap();
        add_adapters(&mut read.model, &opts, None).unwrap();
        let blocks = |m: &mut kollava_model::Llava| -> Vec<(String, Vec<u8>)> {
            let mut v: Vec<_> = m
                .decoder
                .linears_mut()
                .into_iter()
                .map(|(n, l)| {
                    let base = match l {
                        kollava_model::layers::Linear::Lora(a) => a.base.clone(),
                        other => other.clone(),
                    };
                    match base {
                        kollava_model::layers::Linear::Quantized { weight, .. } => {
                            (n, weight.data().unwrap().to_vec())
                        }
                        other => panic!("{family} {n}: {other:?}"),
                    }
                })
                .collect();
            let head = m.decoder.lm_head_mut();
            assert!(
                head.parameters().is_some(),
                "{family}: the head stays as read"
            );
            v.sort();
            v
        };
        assert_eq!(
            blocks(&mut after.model),
            blocks(&mut read.model),
            "{family}"
        );
        assert_eq!(
            max_abs_diff(&logits(&after.model, &ids), &logits(&read.model, &ids)),
            0.0,
            "{family}"
        );
    }
}
