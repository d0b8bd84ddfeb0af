//! ScienceQA (llava-spec §8): converting `problems.json` + `pid_splits.json` into LLaVA's
//! training/evaluation format for any prompt format (`scripts/convert_sqa_to_llava.py`), and
//! scoring a `model_vqa_science` answer file (`llava/eval/eval_science_qa.py`), with the
//! accuracy buckets of the ScienceQA paper (subject, context modality, grade).
//!
//! Strings are built exactly as the reference builds them, quirks included: one pass of
//! `"  " → " "`, a trailing `BECAUSE:` removed everywhere, every `"Question: "` and
//! `"Answer: "` dropped once the text starts with one.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Letters of the choices, as the reference offers them.
pub const OPTIONS: [&str; 5] = ["A", "B", "C", "D", "E"];

#[derive(Debug, thiserror::Error)]
pub enum SqaError {
    #[error("cannot read {path}: {reason}")]
    Io { path: String, reason: String },
    #[error("{path} is not valid JSON: {reason}")]
    Json { path: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

/// One problem of `problems.json` (the fields the reference reads).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Problem {
    pub question: String,
    pub choices: Vec<String>,
    pub answer: usize,
    #[serde(default)]
    pub hint: String,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub caption: String,
    #[serde(default)]
    pub lecture: String,
    #[serde(default)]
    pub solution: String,
    #[serde(default)]
    pub subject: String,
    #[serde(default)]
    pub grade: String,
}

/// `problems.json` and `pid_splits.json` of a ScienceQA directory.
pub struct Dataset {
    pub problems: HashMap<String, Problem>,
    pub splits: HashMap<String, Vec<String>>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, SqaError> {
    let text = std::fs::read_to_string(path).map_err(|e| SqaError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| SqaError::Json {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

impl Dataset {
    pub fn open(base_dir: &Path) -> Result<Self, SqaError> {
        Ok(Self {
            problems: read_json(&base_dir.join("problems.json"))?,
            splits: read_json(&base_dir.join("pid_splits.json"))?,
        })
    }

    /// The ids of `split`, in the file's order; each must be a known problem.
    pub fn split(&self, split: &str) -> Result<&[String], SqaError> {
        let ids = self.splits.get(split).ok_or_else(|| {
            let mut known: Vec<&str> = self.splits.keys().map(String::as_str).collect();
            known.sort();
            SqaError::Invalid(format!(
                "pid_splits.json has no split {split:?} (it has: {})",
                known.join(", ")
            ))
        })?;
        if let Some(bad) = ids.iter().find(|id| !self.problems.contains_key(*id)) {
            return Err(SqaError::Invalid(format!(
                "split {split:?} lists problem {bad}, which problems.json does not have"
            )));
        }
        Ok(ids)
    }
}

/// `(A) c1 (B) c2 …`.
fn choice_text(p: &Problem) -> Result<String, SqaError> {
    if p.choices.len() > OPTIONS.len() {
        return Err(SqaError::Invalid(format!(
            "a problem has {} choices; the reference letters at most 5",
            p.choices.len()
        )));
    }
    Ok(p.choices
        .iter()
        .zip(OPTIONS)
        .map(|(c, o)| format!("({o}) {c}"))
        .collect::<Vec<_>>()
        .join(" "))
}

/// The `(human, gpt)` texts of one problem in `format` (`QCM-LEPA`, `CQM-A`, …).
pub fn example(format: &str, p: &Problem) -> Result<(String, String), SqaError> {
    let bad = || SqaError::Invalid(format!("unknown prompt format {format:?}"));
    let (input_format, output_format) = format.split_once('-').ok_or_else(bad)?;
    let question = &p.question;
    let context = match p.hint.trim() {
        "" => "N/A".to_string(),
        c => c.to_string(),
    };
    let choice = choice_text(p)?;
    let answer = OPTIONS
        .get(p.answer)
        .filter(|_| p.answer < p.choices.len())
        .ok_or_else(|| SqaError::Invalid(format!("answer index {} is not a choice", p.answer)))?;
    // The reference escapes newlines and then turns every `\n` sequence back into one.
    let lecture = p.lecture.replace('\n', "\\n").replace("\\n", "\n");
    let solution = p.solution.replace('\n', "\\n").replace("\\n", "\n");
    let qc = format!("Question: {question}\nContext: {context}\n");
    let input = match input_format {
        "CQM" => format!("Context: {context}\nQuestion: {question}\nOptions: {choice}\n"),
        "QCM" => format!("{qc}Options: {choice}\n"),
        "QCML" => format!("{qc}Options: {choice}\nBECAUSE: {lecture}\n"),
        "QCME" => format!("{qc}Options: {choice}\nBECAUSE: {solution}\n"),
        "QCMLE" => format!("{qc}Options: {choice}\nBECAUSE: {lecture} {solution}\n"),
        "QCLM" => format!("{qc}BECAUSE: {lecture}\nOptions: {choice}\n"),
        "QCEM" => format!("{qc}BECAUSE: {solution}\nOptions: {choice}\n"),
        "QCLEM" => format!("{qc}BECAUSE: {lecture} {solution}\nOptions: {choice}\n"),
        _ => return Err(bad()),
    };
    let is = format!("The answer is {answer}.");
    let output = match output_format {
        "A" => format!("Answer: {is}"),
        "AL" => format!("Answer: {is} BECAUSE: {solution}"),
        "AE" => format!("Answer: {is} BECAUSE: {lecture}"),
        "ALE" => format!("Answer: {is} BECAUSE: {lecture} {solution}"),
        "AEL" => format!("Answer: {is} BECAUSE: {solution} {lecture}"),
        "LA" => format!("Answer: {lecture} {is}"),
        "EA" => format!("Answer: {solution} {is}"),
        "LEA" => format!("Answer: {lecture} {solution} {is}"),
        "ELA" => format!("Answer: {solution} {lecture} {is}"),
        "LEPA" => {
            let mut o = String::new();
            if !lecture.trim().is_empty() {
                o += &format!("LECTURE: {lecture}\n");
            }
            if !solution.trim().is_empty() {
                o += &format!("SOLUTION: {solution}\n");
            }
            o + &format!("###\nANSWER: {answer}.")
        }
        _ => return Err(bad()),
    };
    let tidy = |s: String| {
        let s = s.replace("  ", " ").trim().to_string();
        if s.ends_with("BECAUSE:") {
            s.replace("BECAUSE:", "").trim().to_string()
        } else {
            s
        }
    };
    let (mut input, mut output) = (tidy(input), tidy(output));
    if input.starts_with("Question: ") {
        input = input.replace("Question: ", "");
    }
    if output.starts_with("Answer: ") {
        output = output.replace("Answer: ", "");
    }
    Ok((input, output))
}

/// The records of `convert_to_llava` (`jsonl = false`) or `convert_to_jsonl`, in split order.
pub fn convert(
    ds: &Dataset,
    split: &str,
    format: &str,
    jsonl: bool,
) -> Result<Vec<Value>, SqaError> {
    let mut out = Vec::new();
    for id in ds.split(split)? {
        let p = &ds.problems[id];
        let (input, output) = example(format, p)?;
        let image = p.image.as_ref().map(|i| format!("{id}/{i}"));
        let human = match image {
            Some(_) => format!("{input}\n<image>"),
            None => input,
        };
        let mut rec = serde_json::Map::new();
        rec.insert("id".into(), id.clone().into());
        if let Some(i) = image {
            rec.insert("image".into(), i.into());
        }
        if jsonl {
            rec.insert("instruction".into(), human.into());
            rec.insert("output".into(), output.into());
        } else {
            rec.insert(
                "conversations".into(),
                json!([{"from": "human", "value": human}, {"from": "gpt", "value": output}]),
            );
        }
        out.push(Value::Object(rec));
    }
    Ok(out)
}

/// The letter the reference reads from an answer (`eval_science_qa.py`, fork HEAD): the
/// whole answer, `X. …` at the start, or `The answer is X` anywhere; `None` = FAILED.
pub fn parse_letter(text: &str) -> Option<&'static str> {
    let text = text.replace('\n', ". ");
    if let Some(o) = OPTIONS.iter().find(|o| **o == text.trim()) {
        return Some(o);
    }
    let mut chars = text.chars();
    if let (Some(c), Some('.'), Some(' ')) = (chars.next(), chars.next(), chars.next()) {
        if let Some(o) = OPTIONS.iter().find(|o| o.starts_with(c)) {
            return Some(o);
        }
    }
    let after = |with_dot: bool| {
        text.match_indices("The answer is ").find_map(|(i, m)| {
            let rest = &text[i + m.len()..];
            let c = rest.chars().next()?;
            let ok = !with_dot || rest[c.len_utf8()..].starts_with('.');
            OPTIONS
                .iter()
                .find(|o| o.starts_with(c))
                .filter(|_| ok)
                .copied()
        })
    };
    after(true).or_else(|| after(false))
}

/// A scored answer file.
#[derive(Debug, Clone)]
pub struct Scores {
    pub correct: usize,
    pub total: usize,
    /// Questions whose prompt holds `<image>`: (correct, total).
    pub multimodal: (usize, usize),
    /// Bucket name → (correct, total), in the paper's order.
    pub buckets: Vec<(&'static str, usize, usize)>,
    /// `{"correct": [...], "incorrect": [...]}` (the reference's `--output-file`).
    pub analysis: Value,
    /// `{"acc", "correct", "count", "results", "outputs"}` (its `--output-result`).
    pub result: Value,
}

/// Which of the paper's buckets a problem counts in.
fn buckets_of(p: &Problem) -> Vec<&'static str> {
    let mut b = Vec::new();
    b.push(match p.subject.as_str() {
        "natural science" => "NAT",
        "social science" => "SOC",
        "language science" => "LAN",
        _ => "other subject",
    });
    let (text, image) = (!p.hint.is_empty(), p.image.is_some());
    if text {
        b.push("TXT");
    }
    if image {
        b.push("IMG");
    }
    if !text && !image {
        b.push("NO");
    }
    let grade: Option<u32> = p.grade.strip_prefix("grade").and_then(|g| g.parse().ok());
    match grade {
        Some(1..=6) => b.push("G1-6"),
        Some(7..=12) => b.push("G7-12"),
        _ => {}
    }
    b
}

/// Scores `answers` (`question_id` → `(text, prompt)`) on `split`. An answer without a
/// readable letter, or a missing one, is wrong; with `random_fallback` it becomes a seeded
/// uniform guess among the problem's choices instead, as the original reference guessed.
pub fn score(
    ds: &Dataset,
    split: &str,
    answers: &HashMap<String, (String, String)>,
    random_fallback: Option<u64>,
) -> Result<Scores, SqaError> {
    let mut rng = random_fallback.map(rand::rngs::StdRng::seed_from_u64);
    let order = ["NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12"];
    let mut tally: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let (mut correct_list, mut incorrect_list) = (Vec::new(), Vec::new());
    let (mut results, mut outputs) = (serde_json::Map::new(), serde_json::Map::new());
    let mut mm = (0, 0);
    for id in ds.split(split)? {
        let p = &ds.problems[id];
        let (text, prompt) = answers
            .get(id)
            .cloned()
            .unwrap_or_else(|| ("FAILED".into(), "Unknown".into()));
        let text = text.replace('\n', ". ");
        let letter = parse_letter(&text);
        let mut idx: i64 = letter
            .and_then(|l| {
                OPTIONS[..p.choices.len().min(5)]
                    .iter()
                    .position(|o| *o == l)
            })
            .map_or(-1, |i| i as i64);
        if idx < 0 {
            if let Some(r) = rng.as_mut() {
                idx = r.random_range(0..p.choices.len().max(1)) as i64;
            }
        }
        let ok = idx == p.answer as i64;
        let multimodal = prompt.contains("<image>");
        let analysis = json!({
            "question_id": id,
            "parsed_ans": letter.unwrap_or("FAILED"),
            "ground_truth": OPTIONS.get(p.answer).copied().unwrap_or("?"),
            "question": prompt,
            "pred": text,
            "is_multimodal": multimodal,
        });
        results.insert(id.clone(), idx.into());
        outputs.insert(id.clone(), text.clone().into());
        if ok {
            correct_list.push(analysis);
        } else {
            incorrect_list.push(analysis);
        }
        if multimodal {
            mm.1 += 1;
            mm.0 += usize::from(ok);
        }
        for b in buckets_of(p) {
            let e = tally.entry(b).or_default();
            e.1 += 1;
            e.0 += usize::from(ok);
        }
    }
    let (correct, total) = (
        correct_list.len(),
        correct_list.len() + incorrect_list.len(),
    );
    let acc = if total == 0 {
        0.0
    } else {
        100.0 * correct as f64 / total as f64
    };
    let buckets = order
        .iter()
        .map(|b| {
            let (c, n) = tally.get(b).copied().unwrap_or((0, 0));
            (*b, c, n)
        })
        .collect();
    Ok(Scores {
        correct,
        total,
        multimodal: mm,
        buckets,
        analysis: json!({"correct": correct_list, "incorrect": incorrect_list}),
        result: json!({"acc": acc, "correct": correct, "count": total, "results": results, "outputs": outputs}),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(hint: &str, image: Option<&str>, lecture: &str, solution: &str) -> Problem {
        Problem {
            question: "Which is a mammal?".into(),
            choices: vec!["frog".into(), "whale".into()],
            answer: 1,
            hint: hint.into(),
            image: image.map(str::to_string),
            caption: String::new(),
            lecture: lecture.into(),
            solution: solution.into(),
            subject: "natural science".into(),
            grade: "grade4".into(),
        }
    }

    #[test]
    fn formats_match_the_reference_strings() {
        let p = problem(
            "",
            None,
            "Mammals have fur.\nThey breathe air.",
            "A whale is a mammal.",
        );
        let (i, o) = example("QCM-LEPA", &p).unwrap();
        assert_eq!(
            i,
            "Which is a mammal?\nContext: N/A\nOptions: (A) frog (B) whale"
        );
        assert_eq!(
            o,
            "LECTURE: Mammals have fur.\nThey breathe air.\nSOLUTION: A whale is a mammal.\n###\nANSWER: B."
        );
        let (i, o) = example("CQM-A", &p).unwrap();
        assert_eq!(
            i,
            "Context: N/A\nQuestion: Which is a mammal?\nOptions: (A) frog (B) whale"
        );
        assert_eq!(o, "The answer is B.");
        // An empty lecture leaves a dangling BECAUSE:, which the reference strips.
        let q = problem("Look at the picture.", Some("image.png"), "", "");
        let (i, o) = example("QCML-AE", &q).unwrap();
        assert_eq!(
            i,
            "Which is a mammal?\nContext: Look at the picture.\nOptions: (A) frog (B) whale"
        );
        assert_eq!(o, "The answer is B.");
        let (_, o) = example("QCM-LEPA", &q).unwrap();
        assert_eq!(o, "###\nANSWER: B.");
        assert!(example("QCM-XYZ", &q).is_err());
        assert!(example("QCM", &q).is_err());
    }

    /// Every one of the reference's 8 × 10 formats: the input holds the question, context
    /// and options in its order (with the BECAUSE part where it puts it), the output the
    /// answer in its wording; nothing is left with a dangling `BECAUSE:` or a double space.
    #[test]
    fn every_prompt_format_builds() {
        let p = problem("A hint.", None, "Lecture text.", "Solution text.");
        let inputs = [
            "CQM", "QCM", "QCML", "QCME", "QCMLE", "QCLM", "QCEM", "QCLEM",
        ];
        let outputs = [
            "A", "AL", "AE", "ALE", "AEL", "LA", "EA", "LEA", "ELA", "LEPA",
        ];
        for i in inputs {
            for o in outputs {
                let (input, output) = example(&format!("{i}-{o}"), &p).unwrap();
                let at = |s: &str| {
                    input
                        .find(s)
                        .unwrap_or_else(|| panic!("{i}-{o}: no {s:?} in {input:?}"))
                };
                let (q, c, m) = (
                    at("Which is a mammal?"),
                    at("Context: A hint."),
                    at("Options: (A) frog (B) whale"),
                );
                assert_eq!(q < c, i != "CQM", "{i}-{o}");
                assert!(c < m || i.starts_with("CQ"), "{i}-{o}");
                if i.len() > 3 {
                    let b = at("BECAUSE: ");
                    assert_eq!(b > m, i.starts_with("QCM"), "{i}-{o}: {input:?}");
                }
                assert!(!input.contains("  ") && !output.contains("  "));
                assert!(!input.starts_with("Question: ") && !output.starts_with("Answer: "));
                match o {
                    "LEPA" => assert_eq!(
                        output,
                        "LECTURE: Lecture text.\nSOLUTION: Solution text.\n###\nANSWER: B."
                    ),
                    _ => assert!(output.contains("The answer is B."), "{i}-{o}: {output:?}"),
                }
            }
        }
        assert_eq!(
            example("QCM-ALE", &p).unwrap().1,
            "The answer is B. BECAUSE: Lecture text. Solution text."
        );
        assert_eq!(
            example("QCLEM-ELA", &p).unwrap(),
            (
                "Which is a mammal?\nContext: A hint.\nBECAUSE: Lecture text. Solution text.\nOptions: (A) frog (B) whale".into(),
                "Solution text. Lecture text. The answer is B.".into()
            )
        );
    }

    #[test]
    fn letters_are_read_as_the_reference_reads_them() {
        assert_eq!(parse_letter("B"), Some("B"));
        assert_eq!(parse_letter(" C "), Some("C"));
        // The newline becomes ". " first, so this is "C ." to the reference: not a letter.
        assert_eq!(parse_letter(" C \n"), None);
        assert_eq!(parse_letter("A. frog"), Some("A"));
        assert_eq!(
            parse_letter("LECTURE: …\n###\nANSWER: B.\n The answer is B."),
            Some("B")
        );
        assert_eq!(parse_letter("I think The answer is D"), Some("D"));
        // With a dot wins over without, wherever it is.
        assert_eq!(
            parse_letter("The answer is C or The answer is A."),
            Some("A")
        );
        assert_eq!(parse_letter("The answer is F."), None);
        assert_eq!(parse_letter("whale"), None);
        assert_eq!(parse_letter(""), None);
    }
}
