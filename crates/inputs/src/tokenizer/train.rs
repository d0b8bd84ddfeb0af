//! Training a new LLaMA-style BPE tokenizer (for the demo model, which has no pretrained
//! vocabulary to reuse). The vocabulary is learned by the `tokenizers` crate's BPE trainer;
//! the pipeline around it is LLaMA's: `<unk>`, `<s>`, `</s>` at ids 0–2, sentencepiece's
//! `▁` word marker (also after special tokens, like the legacy LLaMA tokenizer, which the
//! reference's label arithmetic assumes), byte fallback for anything unseen, `<s>`
//! prepended on encoding.

use std::collections::HashSet;
use std::path::Path;

use serde_json::{json, Value};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::{AddedToken, Trainer};

const MARKER: char = '▁';

/// Splits text into sentencepiece-style words: spaces become `▁`, which starts each word,
/// and the text gets one leading `▁`.
fn words(text: &str) -> Vec<String> {
    let marked: String = std::iter::once(MARKER)
        .chain(text.chars().map(|c| if c == ' ' { MARKER } else { c }))
        .collect();
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in marked.chars() {
        if c == MARKER && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        cur.push(c);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Trains a vocabulary of `vocab_size` tokens on `texts` and writes `tokenizer.json`,
/// `tokenizer_config.json` and `special_tokens_map.json` into `out` (created if needed).
/// Returns the vocabulary size.
pub fn train_bpe(texts: &[String], vocab_size: usize, out: &Path) -> Result<usize, String> {
    let mut specials: Vec<AddedToken> = ["<unk>", "<s>", "</s>"]
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    // Byte-fallback pieces come right after, as in LLaMA's vocabulary.
    specials.extend((0..=255u8).map(|b| AddedToken::from(format!("<0x{b:02X}>"), false)));
    let alphabet: HashSet<char> = texts.iter().flat_map(|t| t.chars()).collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(alphabet)
        .build();
    trainer
        .feed(texts.iter(), |t| Ok(words(t)))
        .map_err(|e| e.to_string())?;
    let mut model = BPE::default();
    trainer.train(&mut model).map_err(|e| e.to_string())?;
    let mut model_json = serde_json::to_value(&model).map_err(|e| e.to_string())?;
    model_json["unk_token"] = json!("<unk>");
    model_json["byte_fallback"] = json!(true);
    model_json["fuse_unk"] = json!(true);
    let vocab = model_json["vocab"]
        .as_object()
        .map(|v| v.len())
        .unwrap_or(0);
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let metaspace =
        json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true});
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": null,
        "pre_tokenizer": metaspace,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "ByteFallback"}, {"type": "Fuse"}, metaspace
        ]},
        "model": model_json,
    });
    let config = json!({
        "add_bos_token": true, "add_eos_token": false, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": null, "model_max_length": 2048, "padding_side": "right",
        "legacy": true, "clean_up_tokenization_spaces": false, "tokenizer_class": "LlamaTokenizerFast",
    });
    let special_map = json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"});
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    for (name, v) in [
        ("tokenizer.json", &tokenizer),
        ("tokenizer_config.json", &config),
        ("special_tokens_map.json", &special_map),
    ] {
        write_json(&out.join(name), v)?;
    }
    // Whatever we wrote must load as a tokenizer.
    tokenizers::Tokenizer::from_file(out.join("tokenizer.json"))
        .map_err(|e| format!("the trained tokenizer does not load: {e}"))?;
    Ok(vocab)
}

fn write_json(path: &Path, v: &Value) -> Result<(), String> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(v).map_err(|e| e.to_string())?;
    std::fs::write(&tmp, text)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_start_with_the_marker() {
        assert_eq!(words("빨간 원 ###"), ["▁빨간", "▁원", "▁###"]);
        assert_eq!(words("a  b"), ["▁a", "▁", "▁b"]);
    }

    #[test]
    fn a_trained_tokenizer_round_trips_and_merges_frequent_words() {
        let texts: Vec<String> = (0..200)
            .map(|i| format!("빨간색 원이 {} 개 있습니다. Human: 무엇인가요?", i % 7))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let n = train_bpe(&texts, 400, dir.path()).unwrap();
        assert!(n > 259 && n <= 400, "{n}");
        let tok = crate::Tokenizer::from_dir(dir.path()).unwrap();
        let text = "빨간색 원이 3 개 있습니다.";
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids[0], 1, "<s> first");
        assert!(ids.len() < 10, "frequent words merge: {ids:?}");
        assert_eq!(tok.decode(&ids, true), text);
        // Characters never seen in training survive through byte fallback.
        let odd = "ẞ 漢";
        let ids = tok.encode(odd).unwrap();
        assert_eq!(tok.decode(&ids, true), odd);
    }
}
