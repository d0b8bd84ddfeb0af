//! A conversation → input ids and labels, exactly as the reference's `preprocess_*`
//! functions compute them (llava-spec §5.3; haotian-liu/LLaVA:llava/train/train.py@c121f04,
//! tabtoyou/KoLLaVA:llava/train/train.py@ae472b3). The arithmetic is reproduced, not fixed:
//! the v0 `### ` rule measures every piece with its own BOS, so its mask drifts by one per
//! turn; the v1 rule subtracts 2 (BOS and the `▁` before the separator) and, for
//! non-legacy tokenizers, one more per round after the first.
//!
//! Lengths are measured on the ids the model sees before splicing: `<image>` counts as one
//! `-200` (LLaVA-1.5), as N `<image>` tokens (llava-hf), or as its `<im_patch>` block (v0).

use kollava_inputs::prompt::{self, ImageTokens, PromptError};
use kollava_inputs::template::{Conversation, Role, SepStyle, Template};
use kollava_inputs::Tokenizer;

/// Label of a position that is not trained on.
pub const IGNORE_INDEX: i64 = -100;

/// Which upstream preprocessor a template dispatches to (§5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelRule {
    /// `preprocess_plain`: `<image>` + caption + `\n`; the image prefix is masked.
    Plain,
    /// `preprocess_v1`: rounds split on `sep2`, instructions on `sep + roles[1] + ": "`.
    V1,
    /// `preprocess_llama_2`: the same arithmetic with `[/INST] ` and no round correction.
    Llama2,
    /// The default `### ` signal preprocessor (`v0`, and KoLLaVA's `mistral` by fallthrough).
    Signal,
    /// `preprocess_mpt` as LLaVA-MPT was trained (May 2023, llava-spec §1d.6): rounds split
    /// on `<|im_end|>` and regrouped, no BOS, each answer and its `<|im_end|>` trained.
    Mpt,
}

/// The dispatch of upstream's `preprocess`: PLAIN style, LLAMA_2 style, a `v1` version,
/// else the `### ` signal path (which is where KoLLaVA's `mistral` lands).
pub fn label_rule(t: &Template) -> LabelRule {
    match t.style {
        SepStyle::Plain => LabelRule::Plain,
        SepStyle::Llama2 => LabelRule::Llama2,
        SepStyle::Mpt => LabelRule::Mpt,
        SepStyle::Two if t.name != "mistral" => LabelRule::V1,
        _ => LabelRule::Signal,
    }
}

/// The template and rule of a reference dump's `train_labels.NAME` entry: the dump names
/// templates as the Python code does (`conv_v1_signal` is v0's `### ` signal format,
/// `mistral_kollava` KoLLaVA's `mistral`); LLaVA-MPT's dumps come from the May-2023 code,
/// whose `conv_mpt` is our `mpt_june` (`mpt_may_2023`).
pub fn reference_template(name: &str, mpt_may_2023: bool) -> Option<(Template, LabelRule)> {
    let ours = match name {
        "conv_v1_signal" => "llava_v0",
        "mistral_kollava" => "mistral",
        "mpt" | "mpt_pretrain" if mpt_may_2023 => "mpt_june",
        other => other,
    };
    let t = Template::by_name(ours)?;
    let rule = if name == "conv_v1_signal" {
        LabelRule::Signal
    } else {
        label_rule(&t)
    };
    Some((t, rule))
}

/// One training sample before splicing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainExample {
    /// Ids as the reference writes them (`-200` at each inserted image).
    pub ids: Vec<i64>,
    /// Same length; [`IGNORE_INDEX`] where nothing is learned.
    pub labels: Vec<i64>,
    /// The same sample as the model takes it: ids without `-200` plus image slots.
    pub prompt: prompt::Prompt,
    /// The v1 rule's length check failed and the whole sample was masked (upstream prints
    /// "WARNING: tokenization mismatch").
    pub mismatch: bool,
}

/// Errors building a sample.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabelError {
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error("a conversation needs at least one turn")]
    Empty,
}

fn ids_of(tok: &Tokenizer, text: &str, scheme: &ImageTokens) -> Result<Vec<i64>, PromptError> {
    Ok(prompt::build(tok, text, scheme)?.reference_ids())
}

/// `input_ids.ne(pad_token_id).sum()` with pad = unk (id 0) as every non-v0 recipe sets it.
fn non_pad_len(ids: &[i64], pad: u32) -> usize {
    ids.iter().filter(|&&i| i != pad as i64).count()
}

/// Builds ids and labels for `turns` (alternating user/assistant, user first) with the
/// masking rule `rule` and the system prompt and roles of `template`.
pub fn preprocess(
    tok: &Tokenizer,
    scheme: &ImageTokens,
    template: &Template,
    rule: LabelRule,
    turns: &[(Role, String)],
) -> Result<TrainExample, LabelError> {
    if turns.is_empty() {
        return Err(LabelError::Empty);
    }
    match rule {
        LabelRule::Plain => plain(tok, scheme, template, turns),
        LabelRule::Signal => signal(tok, scheme, template, turns),
        LabelRule::V1 | LabelRule::Llama2 | LabelRule::Mpt => {
            rounds(tok, scheme, template, rule, turns)
        }
    }
}

fn plain(
    tok: &Tokenizer,
    scheme: &ImageTokens,
    t: &Template,
    turns: &[(Role, String)],
) -> Result<TrainExample, LabelError> {
    // The instruction is dropped: the sample is the image, the caption and `sep`.
    let caption = turns
        .iter()
        .find(|(r, _)| *r == Role::Assistant)
        .map(|(_, s)| s.as_str())
        .unwrap_or("");
    let text = format!("{}{caption}{}", prompt::IMAGE_PLACEHOLDER, t.sep);
    let built = prompt::build(tok, &text, scheme)?;
    let ids = built.reference_ids();
    let prefix = ids_of(tok, prompt::IMAGE_PLACEHOLDER, scheme)?.len();
    let labels = ids
        .iter()
        .enumerate()
        .map(|(i, &id)| if i < prefix { IGNORE_INDEX } else { id })
        .collect();
    Ok(TrainExample {
        ids,
        labels,
        prompt: built,
        mismatch: false,
    })
}

fn signal(
    tok: &Tokenizer,
    scheme: &ImageTokens,
    t: &Template,
    turns: &[(Role, String)],
) -> Result<TrainExample, LabelError> {
    let header = format!("{}\n\n", t.system);
    let pieces: Vec<(Role, String)> = turns
        .iter()
        .map(|(role, value)| {
            let name = match role {
                Role::User => &t.roles[0],
                Role::Assistant => &t.roles[1],
            };
            (*role, format!("### {name}: {value}\n"))
        })
        .collect();
    let mut conversation = header.clone();
    for (_, p) in &pieces {
        conversation.push_str(p);
    }
    conversation.push_str("### ");
    let built = prompt::build(tok, &conversation, scheme)?;
    let ids = built.reference_ids();
    let pad = tok.unk_id;
    let mut labels = ids.clone();
    // `_mask_targets`: each piece measured alone, BOS included.
    let mut cur = non_pad_len(&ids_of(tok, &header, scheme)?, pad);
    mask(&mut labels, 0, cur);
    for (role, piece) in &pieces {
        let len = non_pad_len(&ids_of(tok, piece, scheme)?, pad);
        if *role == Role::User {
            mask(&mut labels, cur + 2, cur + len);
        }
        cur += len;
    }
    Ok(TrainExample {
        ids,
        labels,
        prompt: built,
        mismatch: false,
    })
}

fn rounds(
    tok: &Tokenizer,
    scheme: &ImageTokens,
    t: &Template,
    rule: LabelRule,
    turns: &[(Role, String)],
) -> Result<TrainExample, LabelError> {
    let mut conv = Conversation::new(t.clone());
    conv.messages.clear();
    for (role, text) in turns {
        conv.push(*role, Some(text.clone()));
    }
    preprocess_rendered(tok, scheme, t, rule, &conv.prompt())
}

/// The `V1`/`Llama2` rules work on the rendered conversation; this entry point takes it
/// as rendered elsewhere (e.g. by the reference, in a dump).
pub fn preprocess_rendered(
    tok: &Tokenizer,
    scheme: &ImageTokens,
    t: &Template,
    rule: LabelRule,
    text: &str,
) -> Result<TrainExample, LabelError> {
    if rule == LabelRule::Mpt {
        return mpt_rounds(tok, scheme, t, text);
    }
    let built = prompt::build(tok, text, scheme)?;
    let ids = built.reference_ids();
    let mut labels = ids.clone();
    let total = non_pad_len(&ids, tok.unk_id);
    let sep = match rule {
        LabelRule::Llama2 => "[/INST] ".to_string(),
        _ => format!("{}{}: ", t.sep, t.roles[1]),
    };
    // transformers ≥ 4.37 non-legacy tokenizers lose the `▁` at round starts (upstream-HEAD).
    let minus_one = rule == LabelRule::V1 && !tok.is_legacy();
    let mut cur = 1;
    mask(&mut labels, 0, cur);
    for (i, round) in text.split(t.sep2.as_str()).enumerate() {
        if round.is_empty() {
            break;
        }
        let parts: Vec<&str> = round.split(sep.as_str()).collect();
        if parts.len() != 2 {
            break;
        }
        let instruction = format!("{}{sep}", parts[0]);
        let mut round_len = ids_of(tok, round, scheme)?.len();
        let mut instruction_len = ids_of(tok, &instruction, scheme)?.len().saturating_sub(2);
        if i != 0 && minus_one {
            round_len -= 1;
            instruction_len = instruction_len.saturating_sub(1);
        }
        mask(&mut labels, cur, cur + instruction_len);
        cur += round_len;
    }
    Ok(finish_rounds(built, ids, labels, cur, total))
}

/// May-2023 `preprocess_mpt`: the conversation split on `sep` (`<|im_end|>`), regrouped as
/// [system, user, answer] then [user, answer] pairs; in each, everything up to and including
/// `sep + roles[1]` is masked, and a round counts its tokens plus `sep`'s (the separator the
/// split removed). No BOS. Pad is `<|endoftext|>` (the unk token).
fn mpt_rounds(
    tok: &Tokenizer,
    scheme: &ImageTokens,
    t: &Template,
    text: &str,
) -> Result<TrainExample, LabelError> {
    let built = prompt::build(tok, text, scheme)?;
    let ids = built.reference_ids();
    let mut labels = ids.clone();
    let total = non_pad_len(&ids, tok.unk_id);
    let sep = t.sep.as_str();
    let split: Vec<&str> = text.split(sep).collect();
    let mut regrouped = vec![split[..split.len().min(3)].join(sep)];
    for pair in split.get(3..).unwrap_or_default().chunks(2) {
        regrouped.push(pair.join(sep));
    }
    let answer_sep = format!("{sep}{}", t.roles[1]);
    let sep_len = ids_of(tok, sep, scheme)?.len();
    let mut cur = 0;
    for round in &regrouped {
        if round.is_empty() {
            break;
        }
        let parts: Vec<&str> = round.split(answer_sep.as_str()).collect();
        if parts.len() != 2 {
            break;
        }
        let round_len = ids_of(tok, round, scheme)?.len() + sep_len;
        let instruction_len = ids_of(tok, &format!("{}{answer_sep}", parts[0]), scheme)?.len();
        mask(&mut labels, cur, cur + instruction_len);
        cur += round_len;
    }
    Ok(finish_rounds(built, ids, labels, cur, total))
}

/// The end the round rules share: everything after the last round is masked, and the whole
/// sample when the rounds did not add up to its `total` non-pad tokens (upstream prints
/// "WARNING: tokenization mismatch").
fn finish_rounds(
    built: prompt::Prompt,
    ids: Vec<i64>,
    mut labels: Vec<i64>,
    cur: usize,
    total: usize,
) -> TrainExample {
    mask(&mut labels, cur, usize::MAX);
    let mismatch = cur != total;
    if mismatch {
        mask(&mut labels, 0, usize::MAX);
    }
    TrainExample {
        ids,
        labels,
        prompt: built,
        mismatch,
    }
}

/// `labels[from:to] = IGNORE`, with Python's clamping of out-of-range slices.
fn mask(labels: &mut [i64], from: usize, to: usize) {
    let to = to.min(labels.len());
    if from < to {
        labels[from..to].fill(IGNORE_INDEX);
    }
}
