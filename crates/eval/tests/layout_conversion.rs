//! `convert --layout hf`: the llava-hf checkpoint computes what the original did. Given the
//! same pixels it gives the same image features, and given the same input embeddings the
//! same logits over the original vocabulary (the rows it adds are `<image>`, `<pad>` and
//! padding).

use candle_core::{DType, Device, Tensor};
use kollava_checkpoint::{open, Family};
use kollava_model::KvCache;

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    kollava_testkit::max_abs_diff_tensors(a, b)
}

#[test]
fn the_llava_hf_copy_gives_the_same_features_and_logits() {
    let src_dir = kollava_testkit::checkpoint_dir("llava-v1.5");
    let src = open(src_dir.to_str().unwrap(), &Default::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("hf");
    kollava_checkpoint::convert::to_llava_hf(&src, &out, &mut |_, _| {}).unwrap();
    let hf = open(out.to_str().unwrap(), &Default::default()).unwrap();
    assert_eq!(hf.family, Family::LLAVA_HF);
    assert_eq!(hf.default_template(), src.default_template());
    assert_eq!(hf.config.vision, src.config.vision);
    assert_eq!(hf.config.decoder.vocab_size, 32064);
    let tok = hf.tokenizer().unwrap();
    assert_eq!(tok.token_to_id("<image>"), Some(32000));
    assert_eq!(tok.token_to_id("<pad>"), Some(32001));
    let text = "USER: 이 그림을 설명해 주세요. ASSISTANT:";
    assert_eq!(
        tok.encode(text).unwrap(),
        src.tokenizer().unwrap().encode(text).unwrap()
    );

    let (a, b) = (
        src.load_model(DType::F32, &Device::Cpu).unwrap(),
        hf.load_model(DType::F32, &Device::Cpu).unwrap(),
    );
    let s = src.config.vision.image_size;
    let pixels = Tensor::randn(0f32, 1.0, (1, 3, s, s), &Device::Cpu).unwrap();
    let (fa, fb) = (
        a.encode_images(&pixels).unwrap(),
        b.encode_images(&pixels).unwrap(),
    );
    assert_eq!(max_diff(&fa, &fb), 0.0);

    let ids: Vec<u32> = src.tokenizer().unwrap().encode(text).unwrap();
    let embeds = a
        .embed_with_images(&ids, std::slice::from_ref(&(3..3)), Some(&fa))
        .unwrap();
    let layers = src.config.decoder.num_hidden_layers;
    let logits = |m: &kollava_model::Llava| {
        let n = embeds.dim(1).unwrap();
        let h = m
            .decoder
            .forward(&embeds, &[n], &mut KvCache::new(layers, 1))
            .unwrap();
        m.decoder.logits(&h).unwrap().narrow(2, 0, 32000).unwrap()
    };
    assert_eq!(max_diff(&logits(&a), &logits(&b)), 0.0);
    // The added rows are the mean of the others.
    let row = b
        .decoder
        .embed(&Tensor::new(&[[32001u32]], &Device::Cpu).unwrap())
        .unwrap();
    let mean = a
        .decoder
        .embed(
            &Tensor::arange(0u32, 32000, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
        .unwrap()
        .mean_keepdim(1)
        .unwrap();
    // Stored in the checkpoint's dtype (f16 here): exactly the mean rounded to it.
    let mean = mean
        .to_dtype(DType::F16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    assert_eq!(max_diff(&row, &mean), 0.0);
}

#[test]
fn only_llava_1_5_style_checkpoints_convert() {
    let v0 = open(
        kollava_testkit::checkpoint_dir("llava-v0")
            .to_str()
            .unwrap(),
        &Default::default(),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let e = kollava_checkpoint::convert::to_llava_hf(&v0, &tmp.path().join("x"), &mut |_, _| {});
    assert!(e.unwrap_err().to_string().contains("llava-v0"));
    assert!(!tmp.path().join("x").exists(), "nothing is left behind");
    let e =
        kollava_checkpoint::convert::to_llava_original(&v0, &tmp.path().join("z"), &mut |_, _| {});
    assert!(e
        .unwrap_err()
        .to_string()
        .contains("llava-hf checkpoints convert"));
    let hf = open(
        kollava_testkit::checkpoint_dir("llava-hf")
            .to_str()
            .unwrap(),
        &Default::default(),
    )
    .unwrap();
    assert!(
        kollava_checkpoint::convert::to_llava_hf(&hf, &tmp.path().join("y"), &mut |_, _| {})
            .is_err()
    );
}

/// `convert --layout original`: the llava-hf fixture in LLaVA's own layout computes the same
/// features and logits, and tokenizes the same.
#[test]
fn the_original_layout_copy_of_llava_hf_gives_the_same_features_and_logits() {
    let src = open(
        kollava_testkit::checkpoint_dir("llava-hf")
            .to_str()
            .unwrap(),
        &Default::default(),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("original");
    kollava_checkpoint::convert::to_llava_original(&src, &out, &mut |_, _| {}).unwrap();
    assert!(out.join("vision_tower/config.json").is_file());
    let orig = open(out.to_str().unwrap(), &Default::default()).unwrap();
    assert_eq!(orig.family, Family::LLAVA_15);
    assert_eq!(orig.config, src.config);
    assert_eq!(orig.default_template(), src.default_template());
    let text = "USER: 이 그림을 설명해 주세요. ASSISTANT:";
    assert_eq!(
        orig.tokenizer().unwrap().encode(text).unwrap(),
        src.tokenizer().unwrap().encode(text).unwrap()
    );
    let (a, b) = (
        src.load_model(DType::F32, &Device::Cpu).unwrap(),
        orig.load_model(DType::F32, &Device::Cpu).unwrap(),
    );
    let s = src.config.vision.image_size;
    let pixels = Tensor::randn(0f32, 1.0, (1, 3, s, s), &Device::Cpu).unwrap();
    let (fa, fb) = (
        a.encode_images(&pixels).unwrap(),
        b.encode_images(&pixels).unwrap(),
    );
    assert_eq!(max_diff(&fa, &fb), 0.0);
    let ids = src.tokenizer().unwrap().encode(text).unwrap();
    let embeds = a
        .embed_with_images(&ids, std::slice::from_ref(&(3..3)), Some(&fa))
        .unwrap();
    let layers = src.config.decoder.num_hidden_layers;
    let logits = |m: &kollava_model::Llava| {
        let n = embeds.dim(1).unwrap();
        let h = m
            .decoder
            .forward(&embeds, &[n], &mut KvCache::new(layers, 1))
            .unwrap();
        m.decoder.logits(&h).unwrap()
    };
    assert_eq!(max_diff(&logits(&a), &logits(&b)), 0.0);
}
