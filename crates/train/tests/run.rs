//! A whole run through the library call the `train` command wires: what it writes, that a
//! run cut short resumes where its last checkpoint left off with the same losses, and the
//! specs it refuses.

use std::path::Path;

use candle_core::{DType, Device};
use kollava_inputs::template::Role;
use kollava_testkit::{checkpoint_dir, fixtures_dir};
use kollava_train::data::Sample;
use kollava_train::lora::LoraOptions;
use kollava_train::run::{execute, Event, RunError, RunSpec, Stage};
use kollava_train::trainer::TrainOptions;

fn samples() -> Vec<Sample> {
    [
        ("wide_rgb.png", "빨간 사각형과 파란 원"),
        ("tall_rgb.png", "a tall picture"),
        ("square_rgb.png", "정사각형 그림"),
        ("gray.png", "a grey image"),
    ]
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
    .collect()
}

fn spec(family: &str, stage: Stage, out: &Path) -> RunSpec {
    RunSpec {
        model: checkpoint_dir(family).display().to_string(),
        vision_tower: None,
        projector: None,
        samples: samples(),
        image_folder: fixtures_dir().join("images"),
        image_prefix: String::new(),
        output_dir: out.to_path_buf(),
        stage,
        lora: None,
        freeze_llm: false,
        freeze_projector: false,
        tune_vision: false,
        version: None,
        conv_mode: None,
        aspect: None,
        lr: Some(1e-2),
        train: TrainOptions {
            max_steps: Some(4),
            ..Default::default()
        },
        save_steps: Some(1),
        save_total_limit: None,
        save_dtype: DType::F32,
        tensorboard: false,
        bf16: false,
        shard: Default::default(),
        write_outputs: true,
    }
}

/// (step, loss) of every line of `metrics.jsonl`.
fn metrics(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn stage_one_writes_the_projector_its_config_and_one_metrics_line_per_step() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut s = spec("llava-v1.5", Stage::Pretrain, &out);
    s.tensorboard = true;
    let (mut started, mut steps) = (None, Vec::new());
    let done = execute(&s, &Device::Cpu, None, &mut |e| match e {
        Event::Started {
            template, total, ..
        } => started = Some((template.to_string(), total)),
        Event::Step { log, .. } => steps.push(log.step),
        _ => {}
    })
    .unwrap();
    assert_eq!(started, Some(("plain".to_string(), 4)));
    assert_eq!(steps, [1, 2, 3, 4]);
    assert_eq!(done.result, out.join("mm_projector.safetensors"));
    let projector = candle_core::safetensors::load(&done.result, &Device::Cpu).unwrap();
    assert!(!projector.is_empty());
    assert!(projector
        .keys()
        .all(|k| k.starts_with("model.mm_projector.")));
    assert!(out.join("mm_projector.bin").is_file());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["tune_mm_mlp_adapter"], true);
    let lines = metrics(&out);
    assert_eq!(lines.iter().map(|l| l.0).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert!(out.join("runs").read_dir().unwrap().next().is_some());
    // Checkpoints at steps 1..3 (the last step writes the result instead).
    for step in 1..=3 {
        assert!(out
            .join(format!("checkpoint-{step}/trainer_state.json"))
            .is_file());
    }
}

/// A run killed after checkpoint 2 (its later checkpoint gone, half a metrics line left) runs
/// again from step 2 with the optimizer's state and gives the uninterrupted run's losses.
#[test]
fn a_cut_run_resumes_from_its_newest_checkpoint_with_the_same_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    let s = spec("llava-v1.5", Stage::Finetune, &whole);
    execute(&s, &Device::Cpu, None, &mut |_| {}).unwrap();
    let want = metrics(&whole);

    let cut = tmp.path().join("cut");
    let mut s = spec("llava-v1.5", Stage::Finetune, &cut);
    s.save_total_limit = Some(2);
    execute(&s, &Device::Cpu, None, &mut |_| {}).unwrap();
    // Pruned to the newest two.
    assert!(!cut.join("checkpoint-1").exists());
    std::fs::remove_dir_all(cut.join("checkpoint-3")).unwrap();
    let mut text = std::fs::read_to_string(cut.join("metrics.jsonl")).unwrap();
    text.push_str("{\"step\": 5, \"lo");
    std::fs::write(cut.join("metrics.jsonl"), text).unwrap();

    let mut resumed = None;
    execute(&s, &Device::Cpu, None, &mut |e| {
        if let Event::Resumed { step, .. } = e {
            resumed = Some(step)
        }
    })
    .unwrap();
    assert_eq!(resumed, Some(2));
    let got = metrics(&cut);
    assert_eq!(got.len(), want.len());
    for ((gs, gl), (ws, wl)) in got.iter().zip(&want) {
        assert_eq!(gs, ws);
        assert!((gl - wl).abs() < 1e-4, "step {gs}: {gl} vs {wl}");
    }
}

#[test]
fn specs_no_run_can_do_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("never");
    let refused = |s: &RunSpec| match execute(s, &Device::Cpu, None, &mut |_| {}) {
        Err(RunError::Invalid(m)) => m,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let mut s = spec("llava-v1.5", Stage::Pretrain, &out);
    s.lora = Some(LoraOptions {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: vec!["q_proj".into()],
        four_bit: false,
        seed: 1,
    });
    assert!(refused(&s).contains("stage 2"));
    let mut s = spec("llava-v1.5", Stage::Pretrain, &out);
    s.image_folder = tmp.path().join("missing");
    assert!(refused(&s).contains("not a directory"));
    let mut s = spec("llava-v1.5", Stage::Pretrain, &out);
    s.version = Some("no_such_template".into());
    assert!(refused(&s).contains("unknown template"));
    assert!(!out.join("metrics.jsonl").exists());
    let mut s = spec("llava-v1.5", Stage::Finetune, &out);
    (s.freeze_llm, s.freeze_projector) = (true, true);
    assert!(refused(&s).contains("nothing to train"));
}

/// `bf16`: the frozen matrices in bf16 (stage 1's language model and tower; the base under
/// LoRA) give the f32 run's losses within bf16 rounding, and only the trained weights are
/// kept for the outputs.
#[test]
fn bf16_runs_follow_the_f32_losses() {
    if !kollava_model::kernels::bf16::available() {
        eprintln!("skipped: no bf16 kernels on this CPU");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for (stage, lora) in [(Stage::Pretrain, false), (Stage::Finetune, true)] {
        let losses = |bf16: bool| {
            let out = tmp.path().join(format!("{stage}-{lora}-{bf16}"));
            let mut s = spec("llava-v1.5", stage, &out);
            s.bf16 = bf16;
            s.save_steps = None;
            if lora {
                s.lora = Some(LoraOptions {
                    r: 4,
                    alpha: 8.0,
                    dropout: 0.0,
                    targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
                    four_bit: false,
                    seed: 1,
                });
            }
            execute(&s, &Device::Cpu, None, &mut |_| {}).unwrap();
            metrics(&out)
        };
        let (f32s, bf16s) = (losses(false), losses(true));
        assert_eq!(f32s.len(), bf16s.len());
        for ((step, a), (_, b)) in f32s.iter().zip(&bf16s) {
            assert!(
                (a - b).abs() < 1e-2 * a.abs().max(1.0),
                "{stage} step {step}: {a} vs {b}"
            );
        }
        // bf16 rounding did happen (the kernels ran, not the f32 path).
        assert!(f32s.iter().zip(&bf16s).any(|((_, a), (_, b))| a != b));
    }
}

/// Under `--shard full` a micro-batch with nothing labelled (here every answer is cut by
/// `model_max_length`) still takes its part in every layer's exchanges: the 2 ranks finish,
/// with zero losses, instead of one waiting for the other forever or failing.
#[test]
fn full_sharding_goes_through_batches_with_nothing_labelled() {
    use kollava_train::run::Sharding;
    let tmp = tempfile::tempdir().unwrap();
    let mut s = spec("llava-v1.5", Stage::Finetune, tmp.path());
    s.train.max_steps = Some(2);
    s.train.model_max_length = 4;
    s.save_steps = None;
    s.shard = Sharding::Full;
    let (losses, _) = ranks(2, &s);
    assert_eq!(losses.len(), 2);
    assert!(losses.iter().all(|&(_, l)| l == 0.0), "{losses:?}");
}

/// Each rank's bytes of optimizer state and of trained layer weights.
type Held = Vec<(usize, usize)>;

/// `world` ranks (threads here, processes in `train --nproc`) running `spec` together over
/// TCP; returns rank 0's metrics and what each rank held.
fn ranks(world: usize, spec: &RunSpec) -> (Vec<(u64, f64)>, Held) {
    use kollava_train::dist::Dist;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let held = std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let addr = addr.clone();
                s.spawn(move || {
                    let d = Dist::connect(rank, world, &addr, std::time::Duration::from_secs(30))
                        .unwrap();
                    let d = std::sync::Mutex::new(d);
                    let f = execute(spec, &Device::Cpu, Some(&d), &mut |_| {}).unwrap();
                    (f.optimizer_bytes, f.layer_weight_bytes)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    (metrics(&spec.output_dir), held)
}

fn assert_losses_close(a: &[(u64, f64)], b: &[(u64, f64)], rel: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for ((sa, la), (sb, lb)) in a.iter().zip(b) {
        assert_eq!(sa, sb);
        assert!(
            (la - lb).abs() <= rel * la.abs().max(1.0),
            "{what}: step {sa}: {la} vs {lb}"
        );
    }
}

/// `--shard grad-opt` and `--shard full` over 2 and 4 ranks, one sample each per step: the
/// losses of one process accumulating the same global batch (within 1e-5: the mean of the
/// gradients is summed in another order), and of the unsharded ranks (within 1e-6 for
/// grad-opt, where only the gradient norm's sum differs; 1e-5 for full, whose layer
/// gradients are averaged per micro-batch). A sharded run cut after a checkpoint resumes
/// with the same losses. Each rank holds 1/N of the optimizer state (and under full, of
/// the layers' weights), counted in bytes.
#[test]
fn sharded_ranks_train_as_one_process_and_resume() {
    use kollava_train::run::Sharding;
    let tmp = tempfile::tempdir().unwrap();
    for world in [2, 4] {
        let dir = |name: &str| tmp.path().join(format!("{world}-{name}"));
        let mut one = spec("llava-v1.5", Stage::Finetune, &dir("one"));
        one.train.grad_accum = world;
        one.train.max_steps = Some(3);
        one.save_steps = None;
        let single = execute(&one, &Device::Cpu, None, &mut |_| {}).unwrap();
        let want = metrics(&one.output_dir);

        let mut plain = spec("llava-v1.5", Stage::Finetune, &dir("plain"));
        plain.train.max_steps = Some(3);
        plain.save_steps = None;
        let (unsharded, _) = ranks(world, &plain);

        for (mode, name, rel) in [
            (Sharding::GradOpt, "grad-opt", 1e-6),
            (Sharding::Full, "full", 1e-5),
        ] {
            let mut sharded = spec("llava-v1.5", Stage::Finetune, &dir(name));
            sharded.train.max_steps = Some(3);
            sharded.shard = mode;
            let (got, held) = ranks(world, &sharded);
            assert_losses_close(&got, &want, 1e-5, &format!("{name} vs one process"));
            assert_losses_close(&got, &unsharded, rel, &format!("{name} vs unsharded"));
            for (rank, (opt_bytes, layer_bytes)) in held.iter().enumerate() {
                let share = |whole: usize| {
                    let r = kollava_train::optim::even_ranges(whole / 4, world)[rank].clone();
                    4 * r.len()
                };
                assert_eq!(
                    *opt_bytes,
                    2 * share(single.optimizer_bytes / 2),
                    "{name} rank {rank}"
                );
                if mode == Sharding::Full {
                    // The layers follow the parameters held whole in the flat vector:
                    // this rank's range of them is at most its 1/N, and all ranks' add up.
                    assert!(
                        *layer_bytes <= share(single.optimizer_bytes / 2),
                        "{name} rank {rank}"
                    );
                } else {
                    assert_eq!(*layer_bytes, single.layer_weight_bytes);
                }
            }
            if mode == Sharding::Full {
                let sum: usize = held.iter().map(|h| h.1).sum();
                assert_eq!(sum, single.layer_weight_bytes);
            }

            // Cut after checkpoint 1 (checkpoint 2 gone, half a metrics line left): the
            // rerun resumes at step 1 and repeats the losses.
            std::fs::remove_dir_all(sharded.output_dir.join("checkpoint-2")).unwrap();
            let path = sharded.output_dir.join("metrics.jsonl");
            let mut text = std::fs::read_to_string(&path).unwrap();
            text.push_str("{\"step\": 4, \"lo");
            std::fs::write(&path, text).unwrap();
            let (resumed, _) = ranks(world, &sharded);
            assert_losses_close(&resumed, &got, 1e-6, &format!("resumed {name} run"));
        }
    }
}
