//! `kollava eval vqa`: LLaVA's `model_vqa` (llava-spec §8). Questions are JSON Lines of
//! `{"question_id", "image", "text", "category"}`, or a JSON array of LLaVA-format records
//! (`eval science-qa convert` output), which runs as `model_vqa_science`: the question is
//! the first human turn without `<image>`, the image goes after it, and
//! [`ScienceOptions`] add the letter-only instruction or the second "ANSWER:" pass.
//! Answers are JSON Lines of
//! `{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}`, appended and
//! flushed one by one, so an interrupted run resumes where it stopped and never loses
//! what it wrote.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use kollava_generate::{AnswerOptions, Session, SessionError};
use kollava_inputs::image;
use kollava_inputs::template::{Conversation, Role};
use rand::Rng;
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VqaError {
    #[error("cannot read {file}: {reason}")]
    Read { file: String, reason: String },
    #[error("{file}:{line}: {reason}")]
    Line {
        file: String,
        line: usize,
        reason: String,
    },
    #[error("cannot write {file}: {reason}")]
    Write { file: String, reason: String },
    #[error("question {id}: {source}")]
    Answer { id: String, source: SessionError },
    #[error("question {id}: {reason}")]
    Image { id: String, reason: String },
}

/// One question of a `model_vqa` question file.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    /// Kept as written (a number or a string) and echoed back unchanged.
    pub question_id: Value,
    pub image: Option<String>,
    pub text: String,
    /// From a LLaVA-format record (`model_vqa_science`): the image follows the question.
    pub science: bool,
}

/// `model_vqa_science`'s switches.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScienceOptions {
    /// `--single-pred-prompt`: ask for the option's letter only.
    pub single_pred_prompt: bool,
    /// `--answer-prompter`: a second pass after `" ###\nANSWER:"` (64 tokens), answered as
    /// `reasoning + "\n The answer is " + answer`.
    pub answer_prompter: bool,
}

/// How [`run`] answers.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub answer: AnswerOptions,
    pub science: ScienceOptions,
    /// Questions generated together.
    pub batch_size: usize,
}

const SINGLE_PRED: &str = "Answer with the option's letter from the given choices directly.";

/// LLaVA-format records (a JSON array) as questions.
fn science_questions(file: &str, text: &str) -> Result<Vec<Question>, VqaError> {
    let records: Vec<Value> = serde_json::from_str(text).map_err(|e| VqaError::Line {
        file: file.to_string(),
        line: e.line(),
        reason: format!("invalid JSON: {e}"),
    })?;
    records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let bad = |reason: &str| VqaError::Line {
                file: file.to_string(),
                line: 0,
                reason: format!("record {i}: {reason}"),
            };
            let question_id = r
                .get("id")
                .cloned()
                .filter(|v| !v.is_null())
                .ok_or_else(|| bad("no id"))?;
            let first = r["conversations"][0]["value"]
                .as_str()
                .ok_or_else(|| bad("no conversations[0].value"))?;
            Ok(Question {
                question_id,
                image: r["image"].as_str().map(str::to_string),
                text: first.replace("<image>", "").trim().to_string(),
                science: true,
            })
        })
        .collect()
}

impl Question {
    fn key(&self) -> String {
        self.question_id.to_string()
    }
}

/// Reads a question file; errors name the line.
pub fn read_questions(path: &Path) -> Result<Vec<Question>, VqaError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| VqaError::Read {
        file: file.clone(),
        reason: e.to_string(),
    })?;
    if text.trim_start().starts_with('[') {
        return science_questions(&file, &text);
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| VqaError::Line {
            file: file.clone(),
            line: i + 1,
            reason,
        };
        let v: Value = serde_json::from_str(line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let question_id = v
            .get("question_id")
            .cloned()
            .filter(|q| !q.is_null())
            .ok_or_else(|| bad("no question_id".into()))?;
        let text = v["text"]
            .as_str()
            .ok_or_else(|| bad("no \"text\" string".into()))?
            .to_string();
        let image = v["image"].as_str().map(str::to_string);
        out.push(Question {
            question_id,
            image,
            text,
            science: false,
        });
    }
    Ok(out)
}

/// Question ids already answered in `answers` (missing file: none). A malformed last
/// line (an interrupted write) is ignored; earlier malformed lines are errors.
pub fn answered(answers: &Path) -> Result<HashSet<String>, VqaError> {
    let file = answers.display().to_string();
    let text = match std::fs::read_to_string(answers) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(e) => {
            return Err(VqaError::Read {
                file,
                reason: e.to_string(),
            })
        }
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut ids = HashSet::new();
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str::<Value>(line) {
            Ok(v) => {
                ids.insert(v["question_id"].to_string());
            }
            Err(_) if i + 1 == lines.len() => {}
            Err(e) => {
                return Err(VqaError::Line {
                    file: file.clone(),
                    line: i + 1,
                    reason: format!("invalid JSON: {e}"),
                })
            }
        }
    }
    Ok(ids)
}

/// `shortuuid.uuid()`-like: 22 characters of base57.
fn answer_id() -> String {
    const ALPHABET: &[u8] = b"23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
    let mut rng = rand::rng();
    (0..22)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Answers every question not yet in `answers_path`, appending one line per answer;
/// `batch_size` questions are generated together.
/// Returns how many were answered now. `on_done(done, total)` after each.
pub fn run(
    session: &Session,
    questions: &[Question],
    image_folder: &Path,
    run_opts: &RunOptions,
    answers_path: &Path,
    on_done: &mut dyn FnMut(usize, usize),
) -> Result<usize, VqaError> {
    let RunOptions {
        answer: opts,
        science,
        batch_size,
    } = run_opts;
    let (science, batch_size) = (*science, *batch_size);
    let done = answered(answers_path)?;
    let todo: Vec<&Question> = questions
        .iter()
        .filter(|q| !done.contains(&q.key()))
        .collect();
    let file = answers_path.display().to_string();
    let werr = |e: std::io::Error| VqaError::Write {
        file: file.clone(),
        reason: e.to_string(),
    };
    // A run killed mid-write leaves a torn last line: cut it off (its question is redone);
    // a complete last line without its newline gets one.
    let existing = std::fs::read(answers_path).unwrap_or_default();
    let mut needs_newline = false;
    if !existing.is_empty() && existing.last() != Some(&b'\n') {
        let start = existing
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        if serde_json::from_slice::<Value>(&existing[start..]).is_ok() {
            needs_newline = true;
        } else {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(answers_path)
                .map_err(werr)?;
            f.set_len(start as u64).map_err(werr)?;
        }
    }
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(answers_path)
        .map_err(werr)?;
    if needs_newline {
        out.write_all(b"\n").map_err(werr)?;
    }
    // Each question's rendered prompt, the prompt recorded with the answer, and its images.
    let prepare = |q: &Question| -> Result<(String, String, Vec<image::RgbImage>), VqaError> {
        let images = match &q.image {
            Some(name) => {
                vec![
                    image::open(&image_folder.join(name)).map_err(|e| VqaError::Image {
                        id: q.key(),
                        reason: e.to_string(),
                    })?,
                ]
            }
            None => Vec::new(),
        };
        let (user, shown) = if q.science {
            // model_vqa_science: the image after the question, recorded as such.
            let mut user = q.text.clone();
            let mut shown = q.text.clone();
            if !images.is_empty() {
                user.push_str("\n<image>");
                shown.push_str("\n<image>");
            }
            if science.single_pred_prompt {
                user = format!("{user}\n{SINGLE_PRED}");
                shown = format!("{shown}\n{SINGLE_PRED}");
            }
            (user, shown)
        } else {
            (session.user_text(&q.text, images.len()), q.text.clone())
        };
        let mut conv = Conversation::new(session.template.clone());
        conv.push(Role::User, Some(user));
        conv.push(Role::Assistant, None);
        Ok((conv.prompt(), shown, images))
    };
    let mut n = 0;
    for chunk in todo.chunks(batch_size.max(1)) {
        let prepared = chunk
            .iter()
            .map(|q| prepare(q))
            .collect::<Result<Vec<_>, _>>()?;
        let first_id = chunk[0].key();
        let texts: Vec<String> = if chunk.len() == 1 {
            let (prompt, _, images) = &prepared[0];
            vec![
                session
                    .answer_prompt(prompt, images, opts, &mut |_| true)
                    .map_err(|source| VqaError::Answer {
                        id: first_id.clone(),
                        source,
                    })?
                    .generation
                    .text,
            ]
        } else {
            let batch: Vec<(String, Vec<image::RgbImage>)> = prepared
                .iter()
                .map(|(p, _, i)| (p.clone(), i.clone()))
                .collect();
            session
                .answer_batch(&batch, opts)
                .map_err(|source| VqaError::Answer {
                    id: format!("{first_id} (or another of its batch)"),
                    source,
                })?
                .into_iter()
                .map(|g| g.text)
                .collect()
        };
        for ((q, (prompt, shown, images)), mut text) in chunk.iter().zip(prepared).zip(texts) {
            if q.science && science.answer_prompter {
                let second = AnswerOptions {
                    max_new_tokens: 64,
                    ..opts.clone()
                };
                let a = session
                    .answer_prompt(
                        &format!("{prompt}{text} ###\nANSWER:"),
                        &images,
                        &second,
                        &mut |_| true,
                    )
                    .map_err(|source| VqaError::Answer {
                        id: q.key(),
                        source,
                    })?;
                text = format!("{text}\n The answer is {}", a.generation.text);
            }
            let line = json!({
                "question_id": q.question_id,
                "prompt": shown,
                "text": text,
                "answer_id": answer_id(),
                "model_id": session.ckpt.name,
                "metadata": {},
            });
            writeln!(out, "{line}")
                .and_then(|_| out.flush())
                .map_err(werr)?;
            n += 1;
            on_done(n, todo.len());
        }
    }
    Ok(todo.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_errors_name_the_line_and_a_torn_last_answer_is_ignored() {
        let dir = std::env::temp_dir().join(format!("kollava-vqa-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let q = dir.join("q.jsonl");
        std::fs::write(
            &q,
            "{\"question_id\": 1, \"text\": \"a\"}\n{\"question_id\": 2, \"text\": \n",
        )
        .unwrap();
        let err = read_questions(&q).unwrap_err().to_string();
        assert!(err.contains("q.jsonl:2"), "{err}");
        let a = dir.join("a.jsonl");
        std::fs::write(
            &a,
            "{\"question_id\": 1, \"text\": \"x\"}\n{\"question_id\": \"two\", \"te",
        )
        .unwrap();
        assert_eq!(answered(&a).unwrap(), HashSet::from(["1".to_string()]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
