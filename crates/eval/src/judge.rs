//! `kollava eval review`: the reference's GPT-assisted comparison
//! (`eval_gpt_review_visual`, llava-spec §8) against any OpenAI-compatible judge, `kollava
//! serve` included. Requests run in parallel with retries and backoff; every review is
//! appended as soon as it arrives, and a rerun skips the questions already reviewed, so
//! an interrupted or failed run loses nothing.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};

use crate::review::parse_score;

const SYSTEM: &str =
    "You are a helpful and precise assistant for checking the quality of the answer.";

/// Where the judge is and how to ask it.
#[derive(Debug, Clone)]
pub struct Judge {
    /// Base URL of an OpenAI-compatible API (`…/v1`).
    pub url: String,
    pub model: String,
    pub api_key: Option<String>,
    pub max_tokens: usize,
    pub temperature: f64,
    pub retries: usize,
    pub parallel: usize,
}

/// The review inputs, as the reference's command line names them.
#[derive(Debug, Clone)]
pub struct ReviewFiles {
    pub questions: PathBuf,
    pub context: PathBuf,
    pub answers: [PathBuf; 2],
    pub rules: PathBuf,
    pub output: PathBuf,
}

fn read_jsonl(path: &Path) -> Result<Vec<Value>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| format!("{}: line {}: {e}", path.display(), i + 1))
        })
        .collect()
}

/// Python's `str()` of a JSON value as the reference formats boxes (`[0.1, 0.2, 0.3]`).
fn py_repr(v: &Value) -> String {
    match v {
        Value::Array(a) => format!("[{}]", a.iter().map(py_repr).collect::<Vec<_>>().join(", ")),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 => format!("{f:.1}"),
            _ => n.to_string(),
        },
        Value::String(s) => format!("'{s}'"),
        other => other.to_string(),
    }
}

/// The judge's user message, exactly as the reference builds it.
pub fn judge_prompt(
    context: &Value,
    question: &str,
    answers: [&str; 2],
    role: &str,
    rule: &str,
) -> String {
    let captions: Vec<&str> = context["captions"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let boxes: Vec<String> = context["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| {
                    format!(
                        "{}: {}",
                        i["category"].as_str().unwrap_or_default(),
                        py_repr(&i["bbox"])
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    format!(
        "[Context]\n{}\n\n{}\n\n[Question]\n{question}\n\n[{role} 1]\n{}\n\n[End of {role} 1]\n\n[{role} 2]\n{}\n\n[End of {role} 2]\n\n[System]\n{rule}\n\n",
        captions.join("\n"),
        boxes.join("\n"),
        answers[0],
        answers[1],
    )
}

/// One request to the judge, retried with backoff; returns the review text.
fn ask(judge: &Judge, content: &str) -> Result<String, String> {
    let body = json!({
        "model": judge.model,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}],
        "temperature": judge.temperature,
        "max_tokens": judge.max_tokens,
    });
    let url = format!("{}/chat/completions", judge.url.trim_end_matches('/'));
    let mut wait = Duration::from_millis(500);
    let mut last = String::new();
    for attempt in 0..=judge.retries {
        if attempt > 0 {
            std::thread::sleep(wait);
            wait = (wait * 2).min(Duration::from_secs(16));
        }
        let mut req = ureq::post(&url);
        if let Some(k) = &judge.api_key {
            req = req.header("Authorization", &format!("Bearer {k}"));
        }
        let sent = req
            .header("content-type", "application/json")
            .send(body.to_string());
        match sent {
            Ok(mut resp) => match resp
                .body_mut()
                .read_to_string()
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str::<Value>(&t).map_err(|e| e.to_string()))
            {
                Ok(v) => match v["choices"][0]["message"]["content"].as_str() {
                    Some(text) => return Ok(text.to_string()),
                    None => last = format!("no choices[0].message.content in {v}"),
                },
                Err(e) => last = e,
            },
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!(
        "the judge at {url} failed {} times; last: {last}",
        judge.retries + 1
    ))
}

/// Reviews every question not yet in the output file. Returns (written now, already there).
pub fn review(
    judge: &Judge,
    files: &ReviewFiles,
    on_done: &(dyn Fn(usize, usize) + Sync),
) -> Result<(usize, usize), String> {
    let questions = read_jsonl(&files.questions)?;
    let answers1 = read_jsonl(&files.answers[0])?;
    let answers2 = read_jsonl(&files.answers[1])?;
    let contexts: HashMap<String, Value> = read_jsonl(&files.context)?
        .into_iter()
        .map(|c| (c["image"].as_str().unwrap_or_default().to_string(), c))
        .collect();
    let rules_text = std::fs::read_to_string(&files.rules)
        .map_err(|e| format!("{}: {e}", files.rules.display()))?;
    let rules: Value =
        serde_json::from_str(&rules_text).map_err(|e| format!("{}: {e}", files.rules.display()))?;
    if answers1.len() < questions.len() || answers2.len() < questions.len() {
        return Err(format!(
            "{} questions but {} and {} answers",
            questions.len(),
            answers1.len(),
            answers2.len()
        ));
    }
    // Resume: drop a torn last line, skip what is there.
    let existing = std::fs::read_to_string(&files.output).unwrap_or_default();
    let mut done: HashSet<String> = HashSet::new();
    let mut kept = String::new();
    for line in existing.lines() {
        if let Ok(v) = serde_json::from_str::<Value>(line) {
            done.insert(v["question_id"].to_string());
            kept.push_str(line);
            kept.push('\n');
        }
    }
    if kept.len() != existing.len() {
        std::fs::write(&files.output, &kept)
            .map_err(|e| format!("{}: {e}", files.output.display()))?;
    }
    let mut jobs = Vec::new();
    for (i, q) in questions.iter().enumerate() {
        let (a1, a2) = (&answers1[i], &answers2[i]);
        for (a, f) in [(a1, &files.answers[0]), (a2, &files.answers[1])] {
            if a["question_id"] != q["question_id"] {
                return Err(format!(
                    "{}: line {} answers question {} where {} expects {}",
                    f.display(),
                    i + 1,
                    a["question_id"],
                    files.questions.display(),
                    q["question_id"]
                ));
            }
        }
        if done.contains(&q["question_id"].to_string()) {
            continue;
        }
        let category = q["category"].as_str().unwrap_or_default();
        let rule = rules.get(category).ok_or_else(|| {
            format!(
                "{}: no rule for category {category:?}",
                files.rules.display()
            )
        })?;
        let image = q["image"].as_str().unwrap_or_default();
        let context = contexts.get(image).ok_or_else(|| {
            format!(
                "{}: no context for image {image:?}",
                files.context.display()
            )
        })?;
        let content = judge_prompt(
            context,
            q["text"].as_str().unwrap_or_default(),
            [
                a1["text"].as_str().unwrap_or_default(),
                a2["text"].as_str().unwrap_or_default(),
            ],
            rule["role"].as_str().unwrap_or("Assistant"),
            rule["prompt"].as_str().unwrap_or_default(),
        );
        let record = json!({
            "id": i + 1, "question_id": q["question_id"],
            "answer1_id": a1.get("answer_id").unwrap_or(&q["question_id"]),
            "answer2_id": a2.get("answer_id").unwrap_or(&q["question_id"]),
            "category": category,
        });
        jobs.push((content, record));
    }
    let total = jobs.len();
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&files.output)
        .map_err(|e| format!("{}: {e}", files.output.display()))?;
    let out = Mutex::new(out);
    let queue = Mutex::new(jobs.into_iter());
    let written = Mutex::new(0usize);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..judge.parallel.max(1) {
            s.spawn(|| loop {
                if failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                    return;
                }
                let Some((content, mut record)) = queue.lock().ok().and_then(|mut q| q.next())
                else {
                    return;
                };
                match ask(judge, &content) {
                    Ok(text) => {
                        let [a, b] = parse_score(&text);
                        record["content"] = json!(text);
                        record["tuple"] = json!([a, b]);
                        let line = format!("{record}\n");
                        let ok = out.lock().map(|mut f| f.write_all(line.as_bytes()));
                        match ok {
                            Ok(Ok(())) => {
                                let mut n = written.lock().unwrap_or_else(|p| p.into_inner());
                                *n += 1;
                                on_done(*n, total);
                            }
                            Ok(Err(e)) => {
                                let _ = failure
                                    .lock()
                                    .map(|mut f| f.get_or_insert(e.to_string()).clone());
                            }
                            Err(_) => return,
                        }
                    }
                    Err(e) => {
                        let _ = failure.lock().map(|mut f| f.get_or_insert(e).clone());
                    }
                }
            });
        }
    });
    let n = *written.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(format!(
            "{e} ({n} reviews written, {} kept from before; rerun to resume)",
            done.len()
        ));
    }
    Ok((n, done.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prompt_is_built_as_the_reference_builds_it() {
        let ctx = json!({"image": "a.jpg", "captions": ["A cat.", "A mat."],
                         "instances": [{"category": "cat", "bbox": [0.1, 0.25, 0.5, 1.0]}]});
        let p = judge_prompt(&ctx, "What?", ["one", "two"], "Assistant", "Rate them.");
        assert_eq!(
            p,
            "[Context]\nA cat.\nA mat.\n\ncat: [0.1, 0.25, 0.5, 1.0]\n\n[Question]\nWhat?\n\n\
             [Assistant 1]\none\n\n[End of Assistant 1]\n\n[Assistant 2]\ntwo\n\n\
             [End of Assistant 2]\n\n[System]\nRate them.\n\n"
        );
    }
}
