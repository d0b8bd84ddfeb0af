//! `kollava eval …`: evaluation commands.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::{EvalSynthArgs, ReviewArgs, SummarizeArgs, VqaArgs};

/// `kollava eval review`.
pub fn review(args: &ReviewArgs) -> Result<()> {
    use kollava_eval::judge::{review, Judge, ReviewFiles};
    let judge = Judge {
        url: args.judge_url.clone(),
        model: args.judge_model.clone(),
        api_key: std::env::var(&args.api_key_env)
            .ok()
            .filter(|k| !k.is_empty()),
        max_tokens: args.max_tokens,
        temperature: 0.2,
        retries: args.retries,
        parallel: args.parallel as usize,
    };
    let files = ReviewFiles {
        questions: args.question.clone(),
        context: args.context.clone(),
        answers: [args.answer_list[0].clone(), args.answer_list[1].clone()],
        rules: args.rule.clone(),
        output: args.output.clone(),
    };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} reviewed  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let (new, old) = review(&judge, &files, &|done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .map_err(anyhow::Error::msg)?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {new} reviews to {} ({old} were already there)",
        args.output.display()
    );
    Ok(())
}

/// `kollava eval synth`: exact-match accuracy; the last line is `accuracy X (n=N)`.
pub fn synth(args: &EvalSynthArgs) -> Result<()> {
    let session = pipeline::load(&args.model)?;
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} questions  {msg}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut right = 0usize;
    let mut done = 0usize;
    let graded = kollava_eval::synth::evaluate(&session, &args.data, args.limit, &mut |g, n| {
        done += 1;
        right += g.correct as usize;
        bar.set_length(n as u64);
        bar.set_position(done as u64);
        bar.set_message(format!("accuracy {:.3}", right as f64 / done as f64));
        if args.show_errors && !g.correct {
            bar.suspend(|| {
                eprintln!(
                    "{}: {} → {:?} (expected {:?})",
                    g.id, g.question, g.answer, g.expected
                )
            });
        }
    })
    .map_err(anyhow::Error::msg)?;
    bar.finish_and_clear();
    let n = graded.len();
    let correct = graded.iter().filter(|g| g.correct).count();
    let accuracy = if n == 0 {
        0.0
    } else {
        correct as f64 / n as f64
    };
    println!("accuracy {accuracy:.4} (n={n})");
    Ok(())
}
use crate::pipeline;

/// `kollava eval vqa`: model_vqa answers, resumable.
pub fn vqa(args: &VqaArgs) -> Result<()> {
    let questions = kollava_eval::vqa::read_questions(&args.question_file)?;
    let opts = pipeline::answer_options(&args.sampling)?;
    if let Some(parent) = args
        .answers_file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let session = pipeline::load(&args.model)?;
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} answered  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let n = kollava_eval::vqa::run(
        &session,
        &questions,
        &args.image_folder,
        &kollava_eval::vqa::RunOptions {
            answer: opts,
            science: kollava_eval::vqa::ScienceOptions {
                single_pred_prompt: args.single_pred_prompt,
                answer_prompter: args.answer_prompter,
            },
            batch_size: usize::from(args.batch_size),
        },
        &args.answers_file,
        &mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    eprintln!(
        "answered {n} of {} questions ({} already in {})",
        questions.len(),
        questions.len() - n,
        args.answers_file.display()
    );
    Ok(())
}

/// `kollava eval summarize`: the reference's per-category review summary.
pub fn summarize(args: &SummarizeArgs) -> Result<()> {
    use std::io::Write;
    let files = kollava_eval::review::review_files(&args.dir)
        .with_context(|| format!("cannot read {}", args.dir.display()))?;
    if files.is_empty() {
        anyhow::bail!(
            "no review files (reviews_*.jsonl, review_*.jsonl, gpt4_text*.jsonl) in {}",
            args.dir.display()
        );
    }
    let mut out = std::io::stdout().lock();
    let mut panels = Vec::new();
    for f in files {
        let text = kollava_eval::review::summarize_file(&f).map_err(anyhow::Error::msg)?;
        out.write_all(text.as_bytes())?;
        if args.chart.is_some() {
            let scores = kollava_eval::review::summarize_scores(&f).map_err(anyhow::Error::msg)?;
            let stem = f
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            panels.push((
                format!("{stem}: answer 2 / answer 1 %"),
                scores.into_iter().map(|(k, _, rel)| (k, rel)).collect(),
            ));
        }
    }
    if let Some(chart) = &args.chart {
        crate::charts::bar_chart(&panels, 100.0, chart).map_err(anyhow::Error::msg)?;
        eprintln!("wrote {}", chart.display());
    }
    Ok(())
}

/// `kollava eval science-qa convert|score`.
pub fn science_qa(cmd: &crate::args::ScienceQaCommand) -> Result<()> {
    use kollava_eval::science_qa::{self, Dataset};
    match cmd {
        crate::args::ScienceQaCommand::Convert(a) => {
            let ds = Dataset::open(&a.base_dir)?;
            let records = science_qa::convert(&ds, &a.split, &a.prompt_format, a.jsonl)?;
            let out = a.output.clone().unwrap_or_else(|| {
                a.base_dir.join(if a.jsonl {
                    format!("scienceqa_{}_{}.jsonl", a.split, a.prompt_format)
                } else {
                    format!("llava_{}_{}.json", a.split, a.prompt_format)
                })
            });
            let text = if a.jsonl {
                records.iter().map(|r| format!("{r}\n")).collect::<String>()
            } else {
                serde_json::to_string_pretty(&records)?
            };
            super::write_atomic(&out, text.as_bytes())?;
            eprintln!("Number of samples: {}", records.len());
            eprintln!("wrote {}", out.display());
        }
        crate::args::ScienceQaCommand::Score(a) => {
            let ds = Dataset::open(&a.base_dir)?;
            let text = std::fs::read_to_string(&a.result_file)
                .with_context(|| format!("cannot read {}", a.result_file.display()))?;
            let mut answers = std::collections::HashMap::new();
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(line).with_context(|| {
                    format!("{} line {}: not valid JSON", a.result_file.display(), i + 1)
                })?;
                let id = match &v["question_id"] {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Number(n) => n.to_string(),
                    _ => {
                        anyhow::bail!("{} line {}: no question_id", a.result_file.display(), i + 1)
                    }
                };
                let field = |k: &str| v[k].as_str().unwrap_or_default().to_string();
                answers.insert(id, (field("text"), field("prompt")));
            }
            let s = science_qa::score(&ds, &a.split, &answers, a.random_fallback)?;
            let pct = |c: usize, n: usize| {
                if n == 0 {
                    0.0
                } else {
                    100.0 * c as f64 / n as f64
                }
            };
            for (name, c, n) in &s.buckets {
                if *n > 0 {
                    println!("{name:<6} {:>6.2}%  ({c}/{n})", pct(*c, *n));
                }
            }
            if let Some(f) = &a.output_file {
                super::write_atomic(f, serde_json::to_string_pretty(&s.analysis)?.as_bytes())?;
            }
            if let Some(f) = &a.output_result {
                super::write_atomic(f, serde_json::to_string_pretty(&s.result)?.as_bytes())?;
            }
            println!(
                "Total: {}, Correct: {}, Accuracy: {:.2}%, IMG-Accuracy: {:.2}%",
                s.total,
                s.correct,
                pct(s.correct, s.total),
                pct(s.multimodal.0, s.multimodal.1)
            );
        }
    }
    Ok(())
}
