//! The reduced-precision paths stay close to f32 on every fixture family: `--dtype bf16`
//! (our AVX512-BF16 kernels where the CPU has them) and `--dtype f16`, compared with
//! `kollava_eval::quant::compare` (greedy top-1 agreement, mean KL).

mod common;

use kollava_generate::{Session, SessionOptions};
use kollava_inputs::template::{Conversation, Role};

fn session(family: &str, dtype: candle_core::DType) -> Session {
    let dir = kollava_testkit::checkpoint_dir(family);
    Session::load(&SessionOptions {
        model: dir.to_str().unwrap().to_string(),
        vision_tower: None,
        conv_mode: None,
        aspect: None,
        dtype: Some(dtype),
        projector: None,
        mmproj: None,
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn bf16_and_f16_sessions_agree_with_f32() {
    let image =
        kollava_inputs::image::open(&kollava_testkit::fixtures_dir().join("images/wide_rgb.png"))
            .unwrap();
    for family in kollava_testkit::CHECKPOINTS {
        let f32s = session(family, candle_core::DType::F32);
        let mut conv = Conversation::new(f32s.template.clone());
        conv.push(
            Role::User,
            Some(f32s.user_text("이 그림을 자세히 설명해 주세요.", 1)),
        );
        conv.push(Role::Assistant, None);
        for dtype in [candle_core::DType::BF16, candle_core::DType::F16] {
            let other = session(family, dtype);
            let r = kollava_eval::quant::compare(
                &f32s,
                &other,
                &conv.prompt(),
                std::slice::from_ref(&image),
                24,
            )
            .unwrap();
            assert!(
                r.top1_agreement >= 0.9 && r.mean_kl < 0.01,
                "{family} {dtype:?}: agreement {} KL {}",
                r.top1_agreement,
                r.mean_kl
            );
        }
    }
}

/// `--dtype auto` on a quantized GGUF model runs its F16 tower through the bf16 kernels
/// (features rounded, so not equal to f32's, yet close); `--dtype f32` keeps it exact.
#[test]
fn auto_dtype_runs_a_quantized_models_tower_in_bf16() {
    if !kollava_model::kernels::bf16::available() {
        eprintln!("skipped: no AVX512-BF16 on this CPU");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, out) = common::q8_gguf(dir.path());
    let load = |dtype| {
        Session::load(&SessionOptions {
            model: out.to_str().unwrap().to_string(),
            vision_tower: None,
            conv_mode: None,
            aspect: None,
            dtype,
            projector: None,
            mmproj: None,
            ..Default::default()
        })
        .unwrap()
    };
    let (auto, exact) = (load(None), load(Some(candle_core::DType::F32)));
    let s = src.config.vision.image_size;
    let px =
        candle_core::Tensor::randn(0f32, 1.0, (1, 3, s, s), &candle_core::Device::Cpu).unwrap();
    let a = auto.model.vision_features(&px).unwrap();
    let e = exact.model.vision_features(&px).unwrap();
    let diff = kollava_testkit::max_abs_diff_tensors(&a, &e);
    let scale = kollava_testkit::max_abs_diff_tensors(&e, &e.zeros_like().unwrap());
    assert!(diff > 0.0, "auto computed the tower in f32");
    assert!(
        diff <= 2e-2 * scale,
        "bf16 tower off by {diff} (scale {scale})"
    );
}

/// Each inference plan builds its model in final form as it reads (the bf16 plan reads the
/// tower's matrices in bf16, never in f32; a GGUF model takes its blocks as stored), and
/// that model is the one a model read for training becomes once packed: same image
/// features, same logits, on safetensors fixtures and on a Q8_0 GGUF pair.
#[test]
fn building_in_final_form_equals_packing_after_loading() {
    use candle_core::DType;
    use kollava_checkpoint::precision::Precision;
    let cpu = candle_core::Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = common::q8_gguf(dir.path());
    let open = |path: &std::path::Path| {
        kollava_checkpoint::open(path.to_str().unwrap(), &Default::default()).unwrap()
    };
    let bf16 = kollava_model::kernels::bf16::available();
    let mut cases = Vec::new();
    for family in ["llava-v1.5", "llava-hf", "llava-mpt"] {
        let ckpt = open(&kollava_testkit::checkpoint_dir(family));
        for plan in [Precision::Dense(DType::F32), Precision::Dense(DType::F16)] {
            cases.push((family, ckpt.clone(), plan));
        }
        if bf16 {
            cases.push((family, ckpt, Precision::PackedBf16));
        }
    }
    let pair = open(&gguf);
    for b in [false, true].into_iter().filter(|&b| bf16 || !b) {
        cases.push(("q8_0 gguf", pair.clone(), Precision::AsStored { bf16: b }));
    }
    for (family, ckpt, plan) in cases {
        let mut direct = ckpt.load_for_inference(plan, &cpu).unwrap();
        let read_as = match plan {
            Precision::Dense(d) => d,
            Precision::PackedBf16 => DType::BF16,
            Precision::AsStored { .. } => DType::F32,
        };
        let mut after = ckpt.load_model(read_as, &cpu).unwrap();
        after.pack_for_inference(plan.form(&cpu)).unwrap();
        let what = format!("{family} {plan:?}");
        // Every matrix held the same way (dense, ggml container, bf16 panels).
        let held = |m: &mut kollava_model::Llava| {
            let kind = |(n, l): (String, &mut kollava_model::layers::Linear)| {
                (n, std::mem::discriminant(&*l), l.dims().unwrap())
            };
            let mut v: Vec<_> = m.decoder.linears_mut().into_iter().map(kind).collect();
            v.extend(m.vision.linears_mut().into_iter().map(kind));
            v
        };
        assert_eq!(held(&mut direct), held(&mut after), "{what}");
        assert_eq!(
            direct.decoder.weight_format(),
            after.decoder.weight_format()
        );
        let s = ckpt.config.vision.image_size;
        let px = candle_core::Tensor::randn(0f32, 1.0, (1, 3, s, s), &cpu).unwrap();
        let (a, b) = (
            direct.encode_images(&px).unwrap(),
            after.encode_images(&px).unwrap(),
        );
        assert_eq!(kollava_testkit::max_abs_diff_tensors(&a, &b), 0.0, "{what}");
        let ids = candle_core::Tensor::new(&[[1u32, 319, 1003, 546]], &cpu).unwrap();
        let logits = |m: &kollava_model::Llava| {
            let x = m.decoder.embed(&ids).unwrap();
            let h = m
                .decoder
                .forward(&x, &[4], &mut m.decoder.new_cache(1))
                .unwrap();
            m.decoder.logits(&h).unwrap()
        };
        let diff = kollava_testkit::max_abs_diff_tensors(&logits(&direct), &logits(&after));
        assert_eq!(diff, 0.0, "{what}");
    }
}
