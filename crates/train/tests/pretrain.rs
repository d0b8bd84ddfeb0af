//! Stage-1 projector pretraining on a fixture model: the loss goes down, and only the
//! projector changes.

use candle_core::{DType, Device};
use kollava_inputs::template::{Role, Template};
use kollava_testkit::{checkpoint_dir, fixtures_dir, max_abs_diff};
use kollava_train::data::Sample;
use kollava_train::labels::LabelRule;
use kollava_train::optim::AdamW;
use kollava_train::trainer::{train, TrainInputs, TrainOptions};

#[test]
fn projector_pretraining_lowers_the_caption_loss() {
    let dir = checkpoint_dir("llava-v1.5");
    let ckpt = kollava_checkpoint::open(dir.to_str().unwrap(), &Default::default()).unwrap();
    let tm = ckpt
        .load_trainable(
            DType::F32,
            &Device::Cpu,
            std::sync::Arc::new(|n: &str| n.starts_with("model.mm_projector.")),
        )
        .unwrap();
    let model = &tm.model;
    let tok = ckpt.tokenizer().unwrap();
    let scheme = ckpt.image_tokens(&tok).unwrap();
    let template = Template::by_name("plain").unwrap();
    let captions = [
        ("wide_rgb.png", "빨간 사각형과 파란 원"),
        ("tall_rgb.png", "a tall picture"),
        ("square_rgb.png", "정사각형 그림"),
        ("gray.png", "a grey image"),
    ];
    let samples: Vec<Sample> = captions
        .iter()
        .enumerate()
        .map(|(i, (img, cap))| Sample {
            id: i.to_string(),
            image: Some(img.to_string()),
            turns: vec![
                (Role::User, "<image>\n설명해 주세요.".into()),
                (Role::Assistant, cap.to_string()),
            ],
        })
        .collect();
    let images = fixtures_dir().join("images");
    let load = move |name: &str| {
        kollava_inputs::image::open(&images.join(name)).map_err(|e| e.to_string())
    };
    let inputs = TrainInputs {
        model,
        tokenizer: &tok,
        scheme: &scheme,
        template: &template,
        rule: LabelRule::Plain,
        preprocess: &ckpt.preprocess,
        aspect: ckpt.aspect,
        load_image: &load,
        row_masks: &[],
        dist: None,
    };
    let opts = TrainOptions {
        lr: 1e-2,
        max_steps: Some(24),
        grad_accum: 2,
        warmup_ratio: 0.1,
        ..Default::default()
    };
    let before = model.projector.to_trainable().unwrap().1[0]
        .1
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut opt = AdamW::new(tm.params.clone(), opts.lr, 0.0);
    let mut losses = Vec::new();
    let mut saves = Vec::new();
    train(
        &inputs,
        &mut opt,
        &samples,
        &opts,
        0,
        Some(10),
        &mut |log| losses.push(log.loss),
        &mut |step, _| {
            saves.push(step);
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(losses.len(), 24);
    assert_eq!(saves, [10, 20, 24]);
    let first: f64 = losses[..4].iter().sum::<f64>() / 4.0;
    let last: f64 = losses[20..].iter().sum::<f64>() / 4.0;
    assert!(last < first - 0.5, "loss {first:.3} -> {last:.3}");
    // Only the projector trained: its weights moved, the language model's did not.
    let (name, w) = &tm.params[0];
    assert_eq!(name, "model.mm_projector.0.weight");
    let after = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(max_abs_diff(&before, &after) > 1e-3);
    assert!(tm
        .params
        .iter()
        .all(|(n, _)| n.starts_with("model.mm_projector.")));
}
