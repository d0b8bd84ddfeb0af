//! A LLaMA sentencepiece vocabulary written as the `tokenizer.json` transformers builds from
//! it (5.x's `LlamaTokenizer` with `legacy: false`): a byte-fallback BPE over the same
//! pieces, merges ranked as transformers ranks them, spaces turned into `▁` with one `▁`
//! in front of the text (none after a special token), and `<s>` added in front. With the
//! file beside `tokenizer.model`, transformers loads the fast tokenizer as is instead of
//! converting (which needs the `sentencepiece` and `protobuf` packages).

use serde_json::{json, Value};

use super::SpmVocab;

/// The `tokenizer.json` for `vocab`, with `added` (id, content) special tokens after the
/// vocabulary's own control tokens (`<unk>`, `<s>`, `</s>`).
pub fn llama_tokenizer_json(vocab: &SpmVocab, added: &[(u32, &str)]) -> Value {
    let ids: std::collections::HashMap<&str, u32> = vocab
        .pieces
        .iter()
        .enumerate()
        .map(|(i, p)| (p.as_str(), i as u32))
        .collect();
    // Every split of a piece into two pieces is a merge, ranked by the piece's score (the
    // highest first), then by the piece's id, then by the shorter left part: the order
    // transformers 5.x gives them when it builds the fast tokenizer from the slow one.
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for (piece, &score) in vocab.pieces.iter().zip(&vocab.scores) {
        merges.extend(
            piece
                .char_indices()
                .skip(1)
                .map(|(at, _)| piece.split_at(at))
                .filter(|(l, r)| ids.contains_key(l) && ids.contains_key(r))
                .map(|(l, r)| (l, r, score)),
        );
    }
    // Stable: equal scores keep the id order, and a piece's splits their order.
    merges.sort_by(|a, b| b.2.total_cmp(&a.2));
    let token = |id: u32, content: &str, normalized: bool| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": normalized, "special": true})
    };
    let mut added_tokens = Vec::new();
    for (id, kind) in vocab.kinds.iter().enumerate() {
        // Sentencepiece's unknown (2) and control (3) pieces.
        if matches!(kind, 2 | 3) {
            added_tokens.push(token(id as u32, &vocab.pieces[id], *kind == 2));
        }
    }
    added_tokens.extend(added.iter().map(|&(id, content)| token(id, content, false)));
    let bos = "<s>";
    let bos_id = ids.get(bos).copied().unwrap_or(1);
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false}
        ]},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab.pieces.iter().enumerate()
                .map(|(i, p)| (p.clone(), json!(i)))
                .collect::<serde_json::Map<String, Value>>(),
            "merges": merges.iter().map(|(l, r, _)| json!([l, r])).collect::<Vec<_>>(),
        },
    })
}
