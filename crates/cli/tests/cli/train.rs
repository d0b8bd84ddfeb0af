//! `kollava train` (both stages, LoRA and QLoRA, resume, data parallel) and `merge-lora`.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use candle_core::{DType, Device};
use serde_json::{json, Value};

use crate::common::*;

#[test]
fn train_pretrain_writes_projector_metrics_and_config() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_file(
        &tmp,
        "data.jsonl",
        "{\"id\": 1, \"image\": \"wide_rgb.png\", \"conversations\": [{\"from\": \"human\", \"value\": \"<image>\\n설명해 주세요.\"}, {\"from\": \"gpt\", \"value\": \"빨간 사각형\"}]}\n".as_bytes(),
    );
    let out = tmp.path().join("out");
    let images = crate_fixture_images();
    let o = kollava(&[
        &"train",
        &"--model",
        &checkpoint("llava-v1.5"),
        &"--data",
        &data,
        &"--image-folder",
        &images,
        &"--output-dir",
        &out,
        &"--max-steps",
        &"3",
        &"--report-to",
        &"tensorboard",
    ]);
    assert_success(&o);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3);
    // TensorBoard: one version record, then 4 scalars per step, all with valid checksums.
    let events: Vec<PathBuf> = std::fs::read_dir(out.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(events.len(), 1);
    let records = kollava_train::tensorboard::read_records(&events[0]).unwrap();
    assert_eq!(records.len(), 1 + 4 * 3);
    // And the curves as a picture.
    let png = tmp.path().join("curves.png");
    let o = kollava(&[&"plot", &out.join("metrics.jsonl"), &"-o", &png]);
    assert_success(&o);
    assert_eq!(image::image_dimensions(&png).unwrap().0, 900);
    let tensors = candle_core::safetensors::load(
        out.join("mm_projector.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(tensors.contains_key("model.mm_projector.0.weight"));
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["tune_mm_mlp_adapter"], true);

    let bad = write_file(&tmp, "bad.json", b"[{\"conversations\": 3}]");
    let o = kollava(&[
        &"train",
        &"--model",
        &checkpoint("llava-v1.5"),
        &"--data",
        &bad,
        &"--image-folder",
        &images,
        &"--output-dir",
        &out,
    ]);
    assert_one_line_error(&o, &["bad.json", "record 0", "conversations"]);
}

fn losses(metrics: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn finetune_lowers_the_loss_and_writes_a_checkpoint_that_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = finetune_data(&tmp);
    let images = crate_fixture_images();
    let out = tmp.path().join("out");
    let o = kollava(&as_args(&finetune_args(&data, &images, &out, "12")));
    assert_success(&o);
    let l = losses(&out.join("metrics.jsonl"));
    assert_eq!(l.len(), 12);
    let first = (l[0].1 + l[1].1 + l[2].1) / 3.0;
    let last = (l[9].1 + l[10].1 + l[11].1) / 3.0;
    assert!(last < first * 0.95, "loss {first:.3} -> {last:.3}");
    // The result is a checkpoint in the input's layout: it runs, and its weights changed.
    let o = kollava(&[
        &"run",
        &"--model",
        &out,
        &"--image",
        &image("wide_rgb.png"),
        &"--query",
        &QUERY,
        &"--max-new-tokens",
        &"4",
    ]);
    assert_success(&o);
    let before = candle_core::safetensors::load(
        Path::new(FINETUNE_MODEL).join("model-00001-of-00002.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let after =
        candle_core::safetensors::load(out.join("model-00001-of-00002.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(
        before.keys().collect::<std::collections::BTreeSet<_>>(),
        after.keys().collect::<std::collections::BTreeSet<_>>()
    );
    let changed = before
        .iter()
        .filter(|(k, t)| {
            let a = t
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let b = after[*k]
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            a != b
        })
        .count();
    assert!(changed > 0);
    // The tower was trained, so it is written beside the weights and the config points there.
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let tower = config["mm_vision_tower"].as_str().unwrap();
    assert!(out.join(tower).join("config.json").is_file(), "{tower}");
    // Checkpoints every 3 steps; the last step is the result itself.
    for s in [3, 6, 9] {
        assert!(out
            .join(format!("checkpoint-{s}/trainer_state.json"))
            .is_file());
    }
}

/// Killed after a checkpoint and run again, training resumes there and every later loss is
/// what the uninterrupted run got: full finetuning, and LoRA with dropout (masks drawn from
/// the step, not from the process) and gradient checkpointing.
#[test]
fn an_interrupted_finetune_resumes_with_identical_losses() {
    let lora = [
        "--lora-r",
        "8",
        "--lora-alpha",
        "16",
        "--lora-dropout",
        "0.1",
        "--gradient-checkpointing",
    ];
    for extra in [&[][..], &lora[..]] {
        let tmp = tempfile::tempdir().unwrap();
        let data = finetune_data(&tmp);
        let images = crate_fixture_images();
        let args = |out: &Path| {
            let mut a = finetune_args(&data, &images, out, "40");
            if !extra.is_empty() {
                a.retain(|a| a != "--tune-vision-tower");
            }
            a.extend(extra.iter().map(std::ffi::OsString::from));
            a
        };
        let whole = tmp.path().join("whole");
        assert_success(&kollava(&as_args(&args(&whole))));
        let reference = losses(&whole.join("metrics.jsonl"));

        let cut = tmp.path().join("cut");
        let mut child = command(&as_args(&args(&cut)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while !cut.join("checkpoint-3/trainer_state.json").is_file() {
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint appeared"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let finished = if extra.is_empty() {
            "config.json"
        } else {
            "adapter_config.json"
        };
        assert!(
            !cut.join(finished).is_file(),
            "the run finished before it was killed"
        );
        let o = kollava(&as_args(&args(&cut)));
        assert_success(&o);
        assert!(stderr(&o).contains("resuming from"), "{}", stderr(&o));
        // The metrics after the checkpoint are redone, and bit for bit the same.
        assert_eq!(losses(&cut.join("metrics.jsonl")), reference, "{extra:?}");
    }
}

/// LoRA (and QLoRA) finetuning lowers the loss, writes PEFT-style files, and merge-lora
/// turns them into a checkpoint that runs.
#[test]
fn lora_finetune_and_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let data = finetune_data(&tmp);
    let images = crate_fixture_images();
    for bits in ["16", "4"] {
        let out = tmp.path().join(format!("lora-{bits}"));
        let mut args = finetune_args(&data, &images, &out, "12");
        args.retain(|a| a != "--tune-vision-tower");
        // Adapters start as a no-op (B = 0) and learn from there: a larger step.
        let lr = args.iter().position(|a| a == "--lr").unwrap() + 1;
        args[lr] = "1e-2".into();
        for a in [
            "--lora-r",
            "8",
            "--lora-alpha",
            "16",
            "--lora-dropout",
            "0",
            "--bits",
            bits,
        ] {
            args.push(a.into());
        }
        let o = kollava(&as_args(&args));
        assert_success(&o);
        let l = losses(&out.join("metrics.jsonl"));
        let first = (l[0].1 + l[1].1 + l[2].1) / 3.0;
        let last = (l[9].1 + l[10].1 + l[11].1) / 3.0;
        assert!(
            last < first * 0.95,
            "{bits} bits: loss {first:.3} -> {last:.3}"
        );
        let adapter =
            candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu)
                .unwrap();
        assert!(
            adapter
                .keys()
                .any(|k| k.starts_with("base_model.model.model.layers.0.self_attn.q_proj.lora_A")),
            "{:?}",
            adapter.keys()
        );
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["r"], 8);
        assert!(out.join("non_lora_trainables.safetensors").is_file());

        let merged = tmp.path().join(format!("merged-{bits}"));
        let o = kollava(&[
            &"merge-lora",
            &"--model",
            &FINETUNE_MODEL,
            &"--adapter",
            &out,
            &"--output",
            &merged,
        ]);
        assert_success(&o);
        let o = kollava(&[
            &"run",
            &"--model",
            &merged,
            &"--image",
            &image("wide_rgb.png"),
            &"--query",
            &QUERY,
            &"--max-new-tokens",
            &"4",
        ]);
        assert_success(&o);
    }
    let o = kollava(&[
        &"train",
        &"--model",
        &FINETUNE_MODEL,
        &"--data",
        &data,
        &"--image-folder",
        &images,
        &"--output-dir",
        &tmp.path().join("x"),
        &"--bits",
        &"4",
    ]);
    assert_one_line_error(&o, &["--bits 4"]);
}

/// Stage 1 of a v0 checkpoint with `<im_start>`/`<im_end>` trains those two embedding rows
/// with the projector, and no other row (llava-spec §1a.6).
#[test]
fn v0_pretraining_trains_only_the_image_boundary_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_file(
        &tmp,
        "captions.json",
        json!([
            {"id": 0, "image": "wide_rgb.png", "conversations": [{"from": "human", "value": "<image>\n설명"}, {"from": "gpt", "value": "빨간 사각형"}]},
            {"id": 1, "image": "gray.png", "conversations": [{"from": "human", "value": "<image>\n설명"}, {"from": "gpt", "value": "회색 그림"}]}
        ])
        .to_string()
        .as_bytes(),
    );
    let out = tmp.path().join("out");
    let model = checkpoint("llava-v0");
    let o = kollava(&[
        &"train",
        &"--model",
        &model,
        &"--data",
        &data,
        &"--image-folder",
        &crate_fixture_images(),
        &"--output-dir",
        &out,
        &"--max-steps",
        &"4",
        &"--lr",
        &"1e-2",
    ]);
    assert_success(&o);
    let saved =
        candle_core::safetensors::load(out.join("mm_projector.safetensors"), &Device::Cpu).unwrap();
    let trained = saved["model.embed_tokens.weight"]
        .to_dtype(DType::F32)
        .unwrap();
    let ckpt = kollava_checkpoint::open(model.to_str().unwrap(), &Default::default()).unwrap();
    let tok = ckpt.tokenizer().unwrap();
    let rows = [
        tok.token_to_id("<im_start>").unwrap(),
        tok.token_to_id("<im_end>").unwrap(),
    ];
    let base = ckpt
        .load_trainable(
            DType::F32,
            &Device::Cpu,
            std::sync::Arc::new(|_: &str| false),
        )
        .unwrap();
    let original = &base
        .tensors
        .iter()
        .find(|(n, _)| n == "model.embed_tokens.weight")
        .unwrap()
        .1;
    let (a, b) = (
        original.to_vec2::<f32>().unwrap(),
        trained.to_vec2::<f32>().unwrap(),
    );
    for (i, (ra, rb)) in a.iter().zip(&b).enumerate() {
        if rows.contains(&(i as u32)) {
            assert_ne!(
                ra, rb,
                "row {i} (an image boundary token) should have trained"
            );
        } else {
            assert_eq!(ra, rb, "row {i} must not change");
        }
    }

    // Stage 2 from that file takes its two rows into the embeddings (at lr 0 nothing else
    // moves, so the saved checkpoint shows exactly what was loaded).
    let stage2 = tmp.path().join("stage2");
    let o = kollava(&[
        &"train",
        &"--stage",
        &"finetune",
        &"--model",
        &model,
        &"--projector",
        &out.join("mm_projector.safetensors"),
        &"--data",
        &data,
        &"--image-folder",
        &crate_fixture_images(),
        &"--output-dir",
        &stage2,
        &"--max-steps",
        &"1",
        &"--lr",
        &"0",
    ]);
    assert_success(&o);
    assert!(stderr(&o).contains("took the <im_start>/<im_end> embeddings"));
    let finetuned = kollava_checkpoint::open(stage2.to_str().unwrap(), &Default::default())
        .unwrap()
        .load_trainable(
            DType::F32,
            &Device::Cpu,
            std::sync::Arc::new(|_: &str| false),
        )
        .unwrap();
    let loaded = finetuned
        .tensors
        .iter()
        .find(|(n, _)| n == "model.embed_tokens.weight")
        .unwrap()
        .1
        .to_vec2::<f32>()
        .unwrap();
    for (i, (ra, rl)) in a.iter().zip(&loaded).enumerate() {
        let want = if rows.contains(&(i as u32)) {
            &b[i]
        } else {
            ra
        };
        assert_eq!(rl, want, "row {i} after loading the stage-1 file");
    }
}

/// Two data-parallel processes, one sample each per step, train like one process that
/// accumulates two micro-batches: the same losses (up to summation order), and one result;
/// also with `--shard grad-opt` and `--shard full`.
#[test]
fn two_ranks_train_like_one_process_with_gradient_accumulation() {
    let tmp = tempfile::tempdir().unwrap();
    // Four records: every step has two samples, for both runs alike.
    let five: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(finetune_data(&tmp)).unwrap()).unwrap();
    let data = write_file(
        &tmp,
        "four.json",
        Value::Array(five[..4].to_vec()).to_string().as_bytes(),
    );
    let images = crate_fixture_images();
    let with = |out: &Path, extra: &[&str]| {
        let mut args = finetune_args(&data, &images, out, "5");
        let bs = args
            .iter()
            .position(|a| a == "--per-device-batch-size")
            .unwrap()
            + 1;
        args[bs] = "1".into();
        args.extend(extra.iter().map(Into::into));
        args
    };
    let single = tmp.path().join("single");
    assert_success(&kollava(&as_args(&with(&single, &["--grad-accum", "2"]))));
    let a = losses(&single.join("metrics.jsonl"));
    assert_eq!(a.len(), 5);
    // Plain data parallelism, and with the optimizer state sharded between the ranks.
    for (name, extra) in [
        ("ddp", &[][..]),
        ("sharded", &["--shard", "grad-opt"][..]),
        ("fully-sharded", &["--shard", "full"][..]),
    ] {
        let ddp = tmp.path().join(name);
        let mut flags = vec!["--nproc", "2"];
        flags.extend(extra);
        let o = kollava(&as_args(&with(&ddp, &flags)));
        assert_success(&o);
        let b = losses(&ddp.join("metrics.jsonl"));
        assert_eq!(b.len(), 5, "only rank 0 reports");
        for ((sa, la), (sb, lb)) in a.iter().zip(&b) {
            assert_eq!(sa, sb);
            assert!(
                (la - lb).abs() < 1e-4 * la.abs().max(1.0),
                "{name} step {sa}: {la} vs {lb}"
            );
        }
        assert!(ddp.join("config.json").is_file());
    }
}

/// `train --plan` sizes a run from the configuration alone (no data, no weights, no
/// output directory): a named 7B architecture, whose optimizer state halves from 4 to 8
/// ranks under `--shard grad-opt`, and a fixture directory.
#[test]
fn train_plan_sizes_a_run_from_the_configuration_alone() {
    let plan = |extra: &[&str]| {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
            &"train",
            &"--plan",
            &"--stage",
            &"finetune",
            &"--per-device-batch-size",
            &"16",
            &"--model-max-length",
            &"2048",
            &"--gradient-checkpointing",
        ];
        for e in extra {
            args.push(e);
        }
        let o = kollava(&args);
        assert_success(&o);
        stdout(&o)
    };
    let gib = |out: &str, what: &str| -> f64 {
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(what))
            .unwrap_or_else(|| panic!("no {what} line in:\n{out}"));
        line.split_whitespace().last().unwrap().parse().unwrap()
    };
    let arch = ["--arch", "llava-1.5-7b", "--shard", "grad-opt", "--nproc"];
    let four = plan(&[arch.as_slice(), &["4"]].concat());
    let eight = plan(&[arch.as_slice(), &["8"]].concat());
    assert!(
        four.contains("memory per rank") && four.contains("4 ranks"),
        "{four}"
    );
    let (o4, o8) = (
        gib(&four, "optimizer state"),
        gib(&eight, "optimizer state"),
    );
    assert!(o4 > 10.0 && (o4 / o8 - 2.0).abs() < 0.01, "{o4} {o8}");
    assert_eq!(gib(&four, "weights"), gib(&eight, "weights"));
    let mpt = checkpoint("llava-mpt");
    let out = plan(&[
        "--model",
        mpt.to_str().unwrap(),
        "--lora-r",
        "8",
        "--bits",
        "4",
    ]);
    assert!(out.contains("QLoRA r=8"), "{out}");
    assert!(gib(&out, "peak") > 0.0, "{out}");
}

#[test]
fn train_without_data_or_output_dir_says_which_is_missing() {
    let o = kollava(&[&"train", &"--output-dir", &"/tmp/kollava-never-written"]);
    assert_one_line_error(&o, &["--data"]);
    let o = kollava(&[&"train", &"--data", &"x.json", &"--image-folder", &"."]);
    assert_one_line_error(&o, &["--output-dir"]);
    assert!(!Path::new("/tmp/kollava-never-written").exists());
}
