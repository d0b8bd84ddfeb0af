//! `train --plan`'s estimate against the bytes a run allocates: each configuration runs two
//! steps on a small random model under a counting allocator, and the highest point of its
//! heap must be within 15 % of the plan.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use kollava_inputs::template::Role;
use kollava_train::data::Sample;
use kollava_train::lora::LoraOptions;
use kollava_train::plan::{plan, PlanSpec};
use kollava_train::run::{execute, Event, RunSpec, Sharding, Stage};
use kollava_train::trainer::TrainOptions;

/// The system allocator, counting the bytes held and their highest point.
struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            let now = HELD.fetch_add(l.size(), Relaxed) + l.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        HELD.fetch_sub(l.size(), Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            if new > l.size() {
                let now = HELD.fetch_add(new - l.size(), Relaxed) + new - l.size();
                PEAK.fetch_max(now, Relaxed);
            } else {
                HELD.fetch_sub(l.size() - new, Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The counts are the whole process's: the tests take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Samples long enough to fill `model_max_length` (cut there), all alike.
fn samples() -> Vec<Sample> {
    let long = "빨간 사각형과 파란 원이 있는 그림입니다. ".repeat(60);
    (0..8)
        .map(|i| Sample {
            id: i.to_string(),
            image: Some("wide_rgb.png".into()),
            turns: vec![
                (Role::User, "<image>\n설명해 주세요.".into()),
                (Role::Assistant, long.clone()),
            ],
        })
        .collect()
}

/// The `tiny` architecture written with random weights in `dtype` under `dir`, opened.
fn tiny(
    dir: &std::path::Path,
    dtype: kollava_checkpoint::random::DiskDtype,
) -> (std::path::PathBuf, kollava_checkpoint::Checkpoint) {
    let arch = kollava_checkpoint::random::arch("tiny").unwrap();
    let model = kollava_checkpoint::random::init_random(
        arch,
        kollava_checkpoint::random::Layout::Original,
        dtype,
        1,
        None,
        &dir.join("tiny"),
        &mut |_, _| {},
    )
    .unwrap();
    let ckpt = kollava_checkpoint::open(model.to_str().unwrap(), &Default::default()).unwrap();
    (model, ckpt)
}

/// A plan on one rank, stage `stage`, one sequence of 64 tokens, nothing else on: what
/// each test changes from.
fn one_rank<'a>(
    config: &'a kollava_model::ModelConfig,
    stage: Stage,
    lora: Option<&'a LoraOptions>,
) -> PlanSpec<'a> {
    PlanSpec {
        config,
        boundary_rows: false,
        stage,
        lora,
        freeze_llm: false,
        freeze_projector: false,
        tune_vision: false,
        bf16: false,
        shard: Sharding::None,
        world: 1,
        batch: 1,
        seq_len: 64,
        grad_accum: 1,
        checkpointing: false,
    }
}

#[test]
fn plans_hold_to_the_bytes_a_run_allocates() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let (model, ckpt) = tiny(tmp.path(), kollava_checkpoint::random::DiskDtype::F32);
    let lora = |four_bit| LoraOptions {
        r: 8,
        alpha: 16.0,
        dropout: 0.05,
        targets: kollava_train::lora::ALL_TARGETS.map(String::from).to_vec(),
        four_bit,
        seed: 1,
    };
    let seq = 640;
    // (what, stage, adapters, batch, checkpointing, accumulation)
    type Run = (&'static str, Stage, Option<LoraOptions>, usize, bool, usize);
    let runs: Vec<Run> = vec![
        ("stage 1", Stage::Pretrain, None, 2, false, 1),
        ("stage 1, batch 4", Stage::Pretrain, None, 4, false, 1),
        ("full finetune", Stage::Finetune, None, 2, false, 1),
        (
            "full finetune, checkpointing",
            Stage::Finetune,
            None,
            2,
            true,
            1,
        ),
        (
            "full finetune, accumulation",
            Stage::Finetune,
            None,
            2,
            false,
            2,
        ),
        ("LoRA", Stage::Finetune, Some(lora(false)), 2, false, 1),
        ("QLoRA", Stage::Finetune, Some(lora(true)), 2, false, 1),
    ];
    let mut report = Vec::new();
    for (what, stage, lo, batch, checkpointing, accum) in runs {
        let predicted = plan(&PlanSpec {
            batch,
            seq_len: seq,
            grad_accum: accum,
            checkpointing,
            ..one_rank(&ckpt.config, stage, lo.as_ref())
        });
        let spec = RunSpec {
            model: model.display().to_string(),
            vision_tower: None,
            projector: None,
            samples: samples(),
            image_folder: kollava_testkit::fixtures_dir().join("images"),
            image_prefix: String::new(),
            output_dir: tmp.path().join("out"),
            stage,
            lora: lo,
            freeze_llm: false,
            freeze_projector: false,
            tune_vision: false,
            version: Some("llava_v1".into()),
            conv_mode: None,
            aspect: None,
            lr: Some(1e-3),
            train: TrainOptions {
                max_steps: Some(2),
                batch_size: batch,
                grad_accum: accum,
                model_max_length: seq,
                gradient_checkpointing: checkpointing,
                ..Default::default()
            },
            save_steps: None,
            save_total_limit: None,
            save_dtype: candle_core::DType::F32,
            tensorboard: false,
            bf16: false,
            shard: Sharding::None,
            write_outputs: false,
        };
        let base = HELD.load(Relaxed);
        PEAK.store(base, Relaxed);
        let mut labelled = 0;
        execute(&spec, &candle_core::Device::Cpu, None, &mut |e| {
            if let Event::Step { log, .. } = e {
                assert!(log.loss.is_finite() && log.loss > 0.0, "{what}: {log:?}");
                labelled += 1;
            }
        })
        .unwrap();
        assert_eq!(labelled, 2, "{what}: steps with a loss");
        let measured = (PEAK.load(Relaxed) - base) as f64;
        let ratio = predicted.peak() as f64 / measured;
        report.push((
            ratio,
            format!(
                "{what}: plan {:.1} MiB, measured {:.1} MiB ({ratio:.2}); {predicted:?}",
                predicted.peak() as f64 / 1048576.0,
                measured / 1048576.0
            ),
        ));
    }
    let text: Vec<&str> = report.iter().map(|(_, t)| t.as_str()).collect();
    let text = text.join("\n");
    println!("{text}");
    assert!(
        report.iter().all(|(r, _)| (0.85..=1.15).contains(r)),
        "a plan more than 15 % off:\n{text}"
    );
}

/// The plan's parameter inventory is the model the loaders build: on every fixture family,
/// as many parameters as the loaded model holds, and as many trained as the run trains
/// (stage 1, full finetuning, LoRA).
#[test]
fn plans_count_the_parameters_the_loaders_build() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for family in kollava_testkit::CHECKPOINTS {
        let dir = kollava_testkit::checkpoint_dir(family);
        let ckpt = kollava_checkpoint::open(dir.to_str().unwrap(), &Default::default()).unwrap();
        let lo = LoraOptions {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: kollava_train::lora::ALL_TARGETS.map(String::from).to_vec(),
            four_bit: false,
            seed: 1,
        };
        for (stage, lora) in [
            (Stage::Pretrain, None),
            (Stage::Finetune, None),
            (Stage::Finetune, Some(&lo)),
        ] {
            let boundary = kollava_train::run::start_end_rows(&ckpt).unwrap().is_some();
            let filter = kollava_train::run::trainable_filter(
                stage == Stage::Finetune,
                lora.is_some(),
                (false, false, false),
                boundary,
            );
            let mut tm = ckpt
                .load_trainable(candle_core::DType::F32, &candle_core::Device::Cpu, filter)
                .unwrap();
            let mut params = tm.params.clone();
            if let Some(lo) = lora {
                params.extend(kollava_train::lora::add_adapters(&mut tm.model, lo, None).unwrap());
            }
            let held: usize = tm
                .tensors
                .iter()
                .map(|(_, t)| t.elem_count())
                .sum::<usize>()
                + params
                    .iter()
                    .filter(|(n, _)| n.contains(".lora_"))
                    .map(|(_, v)| v.elem_count())
                    .sum::<usize>();
            let trained: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
            let p = plan(&PlanSpec {
                boundary_rows: boundary,
                ..one_rank(&ckpt.config, stage, lora)
            });
            let what = format!("{family} {stage:?} lora {}", lora.is_some());
            assert_eq!(p.parameters as usize, held, "{what}: parameters");
            assert_eq!(p.trained as usize, trained, "{what}: trained");
        }
    }
}

/// The plan's peak while loading, for LoRA (the model read in f32) and QLoRA (the base
/// quantized as read), within 15 % of the bytes the load allocates.
#[test]
fn load_peaks_hold_to_the_plan() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let (_, ckpt) = tiny(tmp.path(), kollava_checkpoint::random::DiskDtype::F16);
    for four_bit in [false, true] {
        let lo = LoraOptions {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: ["q_proj", "v_proj"].map(String::from).to_vec(),
            four_bit,
            seed: 1,
        };
        let p = plan(&one_rank(&ckpt.config, Stage::Finetune, Some(&lo)));
        let form = if four_bit {
            kollava_model::form::Form::Q4Base
        } else {
            kollava_model::form::Form::AsRead
        };
        let base = HELD.load(Relaxed);
        PEAK.store(base, Relaxed);
        let filter = kollava_train::run::trainable_filter(true, true, (false, false, false), false);
        let mut tm = ckpt
            .load_trainable_as(
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
                filter,
                form,
            )
            .unwrap();
        kollava_train::lora::add_adapters(&mut tm.model, &lo, None).unwrap();
        let measured = (PEAK.load(Relaxed) - base) as f64;
        let ratio = p.load_peak as f64 / measured;
        assert!(
            (0.85..=1.15).contains(&ratio),
            "four_bit {four_bit}: plan {} measured {measured}",
            p.load_peak
        );
    }
}
