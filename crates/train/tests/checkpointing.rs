//! Gradient checkpointing changes memory and time, not results: the same run with and
//! without it logs the same losses and gradient norms and ends with the same weights, for
//! full finetuning (LLM + projector, every layer's weights and the embeddings trained) and
//! for LoRA with dropout (the recomputed layers draw the masks of the first pass).

use std::sync::Arc;

use candle_core::{DType, Device};
use kollava_inputs::template::{Role, Template};
use kollava_testkit::{checkpoint_dir, fixtures_dir, max_abs_diff};
use kollava_train::data::Sample;
use kollava_train::labels::label_rule;
use kollava_train::lora::{add_adapters, LoraOptions, ALL_TARGETS};
use kollava_train::optim::AdamW;
use kollava_train::trainer::{train, TrainInputs, TrainOptions};

/// (loss, grad norm) per step and every trained parameter's final values.
type Run = (Vec<(f64, f64)>, Vec<Vec<f32>>);

fn run(family: &str, lora: bool, checkpointing: bool) -> Run {
    let dir = checkpoint_dir(family);
    let ckpt = kollava_checkpoint::open(dir.to_str().unwrap(), &Default::default()).unwrap();
    let full = !lora;
    let mut tm = ckpt
        .load_trainable(
            DType::F32,
            &Device::Cpu,
            Arc::new(move |n: &str| {
                n.starts_with("model.mm_projector.") || (full && !n.contains("vision_tower"))
            }),
        )
        .unwrap();
    let mut params = tm.params.clone();
    if lora {
        let opts = LoraOptions {
            r: 4,
            alpha: 8.0,
            dropout: 0.2,
            targets: ALL_TARGETS.iter().map(|s| s.to_string()).collect(),
            four_bit: false,
            seed: 3,
        };
        params.extend(add_adapters(&mut tm.model, &opts, None).unwrap());
    }
    let tok = ckpt.tokenizer().unwrap();
    let scheme = ckpt.image_tokens(&tok).unwrap();
    let template = Template::by_name("v1").unwrap();
    let turns = |q: &str, a: &str| {
        vec![
            (Role::User, q.to_string()),
            (Role::Assistant, a.to_string()),
        ]
    };
    let samples = vec![
        Sample {
            id: "0".into(),
            image: Some("wide_rgb.png".into()),
            turns: turns(
                "<image>\n무엇이 보이나요?",
                "빨간 사각형과 파란 원이 있습니다.",
            ),
        },
        Sample {
            id: "1".into(),
            image: None,
            turns: turns("안녕하세요?", "네, 안녕하세요. 무엇을 도와드릴까요?"),
        },
        Sample {
            id: "2".into(),
            image: Some("square_rgb.png".into()),
            turns: turns("<image>\nDescribe it.", "A square picture."),
        },
    ];
    let images = fixtures_dir().join("images");
    let load = move |name: &str| {
        kollava_inputs::image::open(&images.join(name)).map_err(|e| e.to_string())
    };
    let inputs = TrainInputs {
        model: &tm.model,
        tokenizer: &tok,
        scheme: &scheme,
        template: &template,
        rule: label_rule(&template),
        preprocess: &ckpt.preprocess,
        aspect: ckpt.aspect,
        load_image: &load,
        row_masks: &[],
        dist: None,
    };
    let opts = TrainOptions {
        lr: 1e-3,
        max_steps: Some(3),
        batch_size: 2,
        warmup_ratio: 0.0,
        gradient_checkpointing: checkpointing,
        ..Default::default()
    };
    let vars: Vec<_> = params.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(params, opts.lr, 0.0);
    let mut log = Vec::new();
    train(
        &inputs,
        &mut opt,
        &samples,
        &opts,
        0,
        None,
        &mut |l| log.push((l.loss, l.grad_norm)),
        &mut |_, _| Ok(()),
    )
    .unwrap();
    let weights = vars
        .iter()
        .map(|v| v.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect();
    (log, weights)
}

fn assert_same(family: &str, lora: bool) {
    let (plain_log, plain_w) = run(family, lora, false);
    let (ck_log, ck_w) = run(family, lora, true);
    assert_eq!(plain_log.len(), 3);
    for (step, ((l0, g0), (l1, g1))) in plain_log.iter().zip(&ck_log).enumerate() {
        assert!(
            (l0 - l1).abs() <= 1e-5 * l0.abs() && (g0 - g1).abs() <= 1e-4 * g0.abs(),
            "{family} lora={lora} step {step}: loss {l0} vs {l1}, grad norm {g0} vs {g1}"
        );
        assert!(*g0 > 0.0, "{family}: nothing learned at step {step}");
    }
    assert_eq!(plain_w.len(), ck_w.len());
    for (i, (a, b)) in plain_w.iter().zip(&ck_w).enumerate() {
        assert!(
            max_abs_diff(a, b) < 1e-5,
            "{family} lora={lora} parameter {i}: {}",
            max_abs_diff(a, b)
        );
    }
}

#[test]
fn checkpointed_full_finetuning_matches_the_plain_backward() {
    // llava-mistral: grouped-query attention and a sliding window in the recomputed layers.
    for family in ["llava-v1.5", "llava-mistral"] {
        assert_same(family, false);
    }
}

#[test]
fn checkpointed_lora_with_dropout_matches_the_plain_backward() {
    assert_same("llava-v1.5", true);
}
