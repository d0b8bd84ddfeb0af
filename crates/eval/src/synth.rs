//! `kollava eval synth`: exact-match accuracy on a held-out set from `kollava data synth`.
//! Each record is one question with one correct sentence; the model answers greedily and
//! is right when its answer, trimmed, is that sentence.

use std::path::Path;

use kollava_generate::{AnswerOptions, SamplingParams, Session};
use kollava_inputs::image::RgbImage;
use kollava_inputs::template::{Conversation, Role};

/// One scored question.
#[derive(Debug, Clone)]
pub struct Graded {
    pub id: String,
    pub question: String,
    pub expected: String,
    pub answer: String,
    pub correct: bool,
}

/// Answers are compared after trimming whitespace.
pub fn matches(answer: &str, expected: &str) -> bool {
    answer.trim() == expected.trim()
}

/// Asks every question of `DIR/test.json` (at most `limit`), reporting each as it is graded.
pub fn evaluate(
    session: &Session,
    dir: &Path,
    limit: Option<usize>,
    on_graded: &mut dyn FnMut(&Graded, usize),
) -> Result<Vec<Graded>, String> {
    let file = dir.join("test.json");
    let records = kollava_train::data::read_samples(&file).map_err(|e| e.to_string())?;
    let n = limit.unwrap_or(records.len()).min(records.len());
    let opts = AnswerOptions {
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        max_new_tokens: 64,
        stop: Vec::new(),
        aspect: None,
        constraint: None,
    };
    let mut out = Vec::with_capacity(n);
    for s in records.iter().take(n) {
        let [(Role::User, q), (Role::Assistant, expected), ..] = s.turns.as_slice() else {
            return Err(format!(
                "{}: record {} is not a question and an answer",
                file.display(),
                s.id
            ));
        };
        let question = q.replace("<image>\n", "").replace("<image>", "");
        let images: Vec<RgbImage> = match &s.image {
            Some(name) => {
                let path = dir.join("images").join(name);
                vec![kollava_inputs::image::open(&path).map_err(|e| e.to_string())?]
            }
            None => Vec::new(),
        };
        let mut conv = Conversation::new(session.template.clone());
        conv.push(Role::User, Some(session.user_text(&question, images.len())));
        conv.push(Role::Assistant, None);
        let answer = session
            .answer(&conv, &images, &opts, &mut |_| true)
            .map_err(|e| format!("{}: {e}", s.id))?
            .generation
            .text;
        let g = Graded {
            id: s.id.clone(),
            correct: matches(&answer, expected),
            question,
            expected: expected.clone(),
            answer,
        };
        on_graded(&g, n);
        out.push(g);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_surrounding_whitespace_is_forgiven() {
        assert!(matches(" 원입니다.\n", "원입니다."));
        assert!(!matches("원입니다", "원입니다."));
        assert!(!matches("사각형입니다.", "원입니다."));
    }
}
