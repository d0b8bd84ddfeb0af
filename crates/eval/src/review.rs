//! GPT-assisted review files (llava-spec §8, `eval_gpt_review_visual` /
//! `summarize_gpt_review`): the reference's score parsing, quirks included, and the
//! per-category summary it prints.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The reference's `parse_score`: the review's first line, commas turned into spaces,
/// split on single spaces; exactly two fields that parse as numbers, else `[-1, -1]`.
/// So `"8 7"` and `"8,7"` parse, while `"8, 7"` (three fields) and `"Score: 8"` do not.
pub fn parse_score(review: &str) -> [f64; 2] {
    let first = review.split('\n').next().unwrap_or("").replace(',', " ");
    let fields: Vec<&str> = first.split(' ').collect();
    match fields.as_slice() {
        [a, b] => match (parse_py_float(a), parse_py_float(b)) {
            (Some(a), Some(b)) => [a, b],
            _ => [-1.0, -1.0],
        },
        _ => [-1.0, -1.0],
    }
}

/// Python's `float()` on a string: surrounding whitespace allowed, nothing else.
fn parse_py_float(s: &str) -> Option<f64> {
    s.trim().parse::<f64>().ok()
}

/// Python's `repr` of a float (`6.0`, `7.125`).
fn py_float(x: f64) -> String {
    if x.is_finite() && x.fract() == 0.0 && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

/// Python's `round(x, n)` for the summary's 3 and 1 decimals (half to even on exact ties
/// is irrelevant at these magnitudes; `{:.n}` rounding matches for printed values).
fn round(x: f64, n: i32) -> f64 {
    let m = 10f64.powi(n);
    (x * m).round() / m
}

/// The review files of a directory, as the reference picks them.
pub fn review_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.ends_with(".jsonl")
                && (name.starts_with("gpt4_text")
                    || name.starts_with("reviews_")
                    || name.starts_with("review_"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// `summarize_gpt_review`'s printout for one file: its name, then per category (and
/// `all`) the mean scores and the relative score `mean2 / mean1 * 100`.
pub fn summarize_file(path: &Path) -> Result<String, String> {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let mut out = format!("{stem}\n");
    for (key, [m1, m2], rel) in summarize_scores(path)? {
        out.push_str(&format!(
            "{key} [{}, {}] {}\n",
            py_float(m1),
            py_float(m2),
            py_float(rel)
        ));
    }
    out.push_str("=================================\n");
    Ok(out)
}

/// Per category (in the reference's order, `all` included): the rounded mean scores of
/// answer 1 and answer 2, and the relative score `mean2 / mean1 · 100`.
pub fn summarize_scores(path: &Path) -> Result<Vec<(String, [f64; 2], f64)>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    // Insertion order as the reference's dict: `all` comes right after the first category.
    let mut order: Vec<String> = Vec::new();
    let mut scores: BTreeMap<String, Vec<[f64; 2]>> = BTreeMap::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: Value = serde_json::from_str(line)
            .map_err(|e| format!("{}:{}: invalid JSON: {e}", path.display(), i + 1))?;
        let tuple = match v["tuple"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect::<Vec<_>>())
        {
            Some(t) if t.len() == 2 => [t[0], t[1]],
            _ => match v["content"].as_str() {
                Some(c) => parse_score(c),
                None => {
                    return Err(format!(
                        "{}:{}: no \"tuple\" or \"content\"",
                        path.display(),
                        i + 1
                    ))
                }
            },
        };
        let category = v["category"].as_str().unwrap_or("default").to_string();
        for key in [category, "all".to_string()] {
            if !order.contains(&key) {
                order.push(key.clone());
            }
            scores.entry(key).or_default().push(tuple);
        }
    }
    Ok(order
        .into_iter()
        .map(|key| {
            let v = &scores[&key];
            let n = v.len() as f64;
            let m1 = round(v.iter().map(|t| t[0]).sum::<f64>() / n, 3);
            let m2 = round(v.iter().map(|t| t[1]).sum::<f64>() / n, 3);
            let rel = round(m2 / m1 * 100.0, 1);
            (key, [m1, m2], rel)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_parsing_follows_the_reference_on_tricky_judge_outputs() {
        assert_eq!(parse_score("8 7\nAssistant 1 was better."), [8.0, 7.0]);
        assert_eq!(parse_score("8,7"), [8.0, 7.0]);
        assert_eq!(parse_score("9.5 6"), [9.5, 6.0]);
        assert_eq!(
            parse_score("8, 7"),
            [-1.0, -1.0],
            "comma-space gives three fields"
        );
        assert_eq!(parse_score("Score: 8"), [-1.0, -1.0]);
        assert_eq!(parse_score(""), [-1.0, -1.0]);
        assert_eq!(parse_score("8 7 6"), [-1.0, -1.0]);
    }

    #[test]
    fn summary_prints_means_and_relative_score_like_python() {
        let dir = std::env::temp_dir().join(format!("kollava-review-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("reviews_kollava.jsonl");
        std::fs::write(&f, "{\"category\": \"conv\", \"tuple\": [8, 6]}\n{\"category\": \"detail\", \"tuple\": [7, 7]}\n{\"category\": \"conv\", \"content\": \"9 6\\nok\"}\n").unwrap();
        std::fs::write(dir.join("notes.txt"), "x").unwrap();
        assert_eq!(review_files(&dir).unwrap(), vec![f.clone()]);
        let s = summarize_file(&f).unwrap();
        // conv: [8.5, 6.0] -> 70.6; detail: [7.0, 7.0] -> 100.0; all: [8.0, 6.333] -> 79.2
        assert_eq!(s, "reviews_kollava\nconv [8.5, 6.0] 70.6\nall [8.0, 6.333] 79.2\ndetail [7.0, 7.0] 100.0\n=================================\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
