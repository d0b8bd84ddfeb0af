//! `kollava data check`: everything that would stop or spoil a long training run, found
//! before it starts. Schema and role order, `<image>` placement (once, in the first human
//! turn, at its start or end, and only when the record has an image), image files that
//! exist and decode, duplicate ids, and (given a tokenizer) sequence lengths against the
//! maximum length.

use std::collections::HashMap;
use std::path::Path;

use kollava_inputs::image;
use kollava_inputs::prompt::{ImageTokens, IMAGE_PLACEHOLDER};
use kollava_inputs::template::{Role, Template};
use kollava_inputs::Tokenizer;

use crate::data::{read_records, DataError, Sample};
use crate::labels::{preprocess, LabelRule};

/// One problem, with the record it was found in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub id: String,
    pub what: String,
}

/// What `check` found.
#[derive(Debug, Default)]
pub struct Report {
    pub records: usize,
    pub problems: Vec<Problem>,
    /// Spliced sequence lengths (when a tokenizer was given).
    pub lengths: Vec<usize>,
    pub too_long: usize,
}

/// Tokenizer-side settings for the length check.
pub struct LengthCheck<'a> {
    pub tokenizer: &'a Tokenizer,
    pub scheme: &'a ImageTokens,
    pub template: &'a Template,
    pub rule: LabelRule,
    pub max_length: usize,
}

fn image_problem(s: &Sample) -> Option<String> {
    let count: usize = s
        .turns
        .iter()
        .map(|(_, t)| t.matches(IMAGE_PLACEHOLDER).count())
        .sum();
    match &s.image {
        None if count > 0 => Some(format!(
            "{count} <image> placeholder(s) but no \"image\" field"
        )),
        None => None,
        Some(_) => {
            let first = &s.turns[0].1;
            let trimmed = first.trim();
            if count != 1 || !first.contains(IMAGE_PLACEHOLDER) {
                Some(format!(
                    "expected exactly one <image>, in the first human turn; found {count}"
                ))
            } else if !(trimmed.starts_with(IMAGE_PLACEHOLDER)
                || trimmed.ends_with(IMAGE_PLACEHOLDER))
            {
                Some("<image> is in the middle of the first human turn (the reference expects it at the start or the end)".into())
            } else {
                None
            }
        }
    }
}

/// Checks a training file. Fails only when the file cannot be read at all.
pub fn check(
    data: &Path,
    image_folder: &Path,
    image_prefix: &str,
    lengths: Option<&LengthCheck>,
) -> Result<Report, DataError> {
    let records = read_records(data)?;
    let mut report = Report {
        records: records.len(),
        ..Default::default()
    };
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (index, record) in records.into_iter().enumerate() {
        let s = match record {
            Ok(s) => s,
            Err(e) => {
                report.problems.push(Problem {
                    id: format!("#{index}"),
                    what: e.to_string(),
                });
                continue;
            }
        };
        let mut problem = |what: String| {
            report.problems.push(Problem {
                id: s.id.clone(),
                what,
            })
        };
        if let Some(first) = seen.insert(s.id.clone(), index) {
            problem(format!("duplicate id (first seen at record {first})"));
        }
        if let Some(p) = image_problem(&s) {
            problem(p);
        }
        if let Some(name) = &s.image {
            let path = image_folder.join(format!("{image_prefix}{name}"));
            if let Err(e) = image::open(&path) {
                problem(e.to_string());
            }
        }
        if let Some(lc) = lengths {
            let turns: Vec<(Role, String)> = s.turns.clone();
            match preprocess(lc.tokenizer, lc.scheme, lc.template, lc.rule, &turns) {
                Ok(ex) => {
                    let len = ex.prompt.spliced_len(lc.scheme.n());
                    if len > lc.max_length {
                        report.too_long += 1;
                        problem(format!(
                            "{len} tokens, over the maximum length of {}",
                            lc.max_length
                        ));
                    }
                    if ex.mismatch {
                        problem(
                            "tokenization mismatch: the reference masks this whole sample".into(),
                        );
                    }
                    report.lengths.push(len);
                }
                Err(e) => problem(e.to_string()),
            }
        }
    }
    Ok(report)
}

/// A text histogram of `lengths` in `bins` equal-width bins.
pub fn histogram(lengths: &[usize], bins: usize) -> Vec<(usize, usize, usize)> {
    let Some(&max) = lengths.iter().max() else {
        return Vec::new();
    };
    let width = (max / bins.max(1)).max(1) + 1;
    let mut counts = vec![0usize; max / width + 1];
    for &l in lengths {
        counts[l / width] += 1;
    }
    counts
        .into_iter()
        .enumerate()
        .map(|(i, c)| (i * width, (i + 1) * width - 1, c))
        .collect()
}
