//! Text ↔ token ids, as the reference's tokenizer computes them (llava-spec §2).
//!
//! Two backends behind one [`Tokenizer`]:
//! - **`tokenizer.json`** (llava-hf): the `tokenizers` crate, which is what transformers'
//!   fast tokenizer runs.
//! - **`tokenizer.model`** (LLaVA v0/1.5, KoLLaVA): our own port of the slow `LlamaTokenizer`:
//!   sentencepiece BPE ([`sentencepiece`]) plus transformers' added-token handling: the text
//!   is split on added/special tokens (longest match first), plain-string added tokens such as
//!   v0's `<im_start>` swallow the whitespace on both sides (transformers ≤ 4.33), and every
//!   chunk between them is encoded on its own. `legacy: false` tokenizers (LLaVA-1.5) add the
//!   dummy `▁` once at the start and none after special tokens (transformers ≥ 4.37).
//!
//! Decoding goes through the pieces for both backends so that [`StreamDecoder`] can hold
//! back a Hangul syllable until all of its UTF-8 bytes have arrived.

pub mod hf_json;
pub mod sentencepiece;
pub mod train;

use std::collections::HashSet;
use std::path::Path;

use serde_json::Value;

pub use self::sentencepiece::SpmVocab;
use self::sentencepiece::{SentencePiece, SPACE_MARK};

/// Errors from loading or running a tokenizer. Each names the file or value at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    #[error("no tokenizer in {dir}: expected tokenizer.json or tokenizer.model")]
    Missing { dir: String },
    #[error("cannot read {file}: {reason}")]
    Parse { file: String, reason: String },
    #[error("tokenizer failed on the input: {reason}")]
    Encode { reason: String },
}

/// One token that transformers splits the text on before sentencepiece sees it.
#[derive(Debug, Clone)]
struct AddedToken {
    content: String,
    id: u32,
    /// Swallow whitespace on the left / right.
    lstrip: bool,
    rstrip: bool,
    /// Skipped by `decode(skip_special_tokens=True)`.
    special: bool,
}

#[derive(Debug, Clone)]
enum Backend {
    Slow(Box<SlowTokenizer>),
    /// A `tokenizer.json`; `byte_level` when its decoder is GPT-2's byte-level one (MPT's
    /// GPT-NeoX tokenizer) rather than sentencepiece pieces with byte fallback (LLaMA's).
    Fast {
        tok: Box<tokenizers::Tokenizer>,
        byte_level: bool,
    },
}

#[derive(Debug, Clone)]
struct SlowTokenizer {
    sp: SentencePiece,
    added: Vec<AddedToken>,
    legacy: bool,
    add_bos: bool,
    add_eos: bool,
}

/// See [`Tokenizer::export_byte_level_bpe`].
#[derive(Debug, Clone)]
pub struct ByteLevelVocab {
    pub tokens: Vec<String>,
    pub kinds: Vec<i32>,
    pub merges: Vec<String>,
}

/// A checkpoint's tokenizer.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    backend: Backend,
    pub bos_id: u32,
    pub eos_id: u32,
    pub unk_id: u32,
    /// Ids `decode(skip_special=true)` drops.
    special_ids: HashSet<u32>,
    /// Number of ids the tokenizer can produce (sentencepiece pieces plus added tokens).
    vocab_size: usize,
    /// Whether text after a special token gets sentencepiece's dummy prefix (transformers'
    /// `legacy` behaviour). When it does not (slow tokenizers with `legacy: false`), the
    /// reference's training label arithmetic subtracts one per later round.
    legacy: bool,
}

fn read_json(path: &Path) -> Result<Option<Value>, TokenizerError> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| TokenizerError::Parse {
        file: path.display().to_string(),
        reason: e.to_string(),
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TokenizerError::Parse {
            file: path.display().to_string(),
            reason: e.to_string(),
        })
}

/// A special-token entry: either `"<s>"` or `{"content": "<s>", "lstrip": …}`.
fn token_entry(v: &Value) -> Option<(String, bool, bool)> {
    match v {
        Value::String(s) => Some((s.clone(), false, false)),
        Value::Object(o) => Some((
            o.get("content")?.as_str()?.to_string(),
            o.get("lstrip").and_then(Value::as_bool).unwrap_or(false),
            o.get("rstrip").and_then(Value::as_bool).unwrap_or(false),
        )),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads the tokenizer of a checkpoint directory: `tokenizer.json` when present,
    /// otherwise `tokenizer.model` with `tokenizer_config.json`, `special_tokens_map.json`
    /// and `added_tokens.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let json_path = dir.join("tokenizer.json");
        if json_path.exists() {
            return Self::from_tokenizer_json(&json_path, &config);
        }
        Self::from_dir_sentencepiece(dir)
    }

    /// The slow tokenizer of a checkpoint directory (`tokenizer.model` with
    /// `tokenizer_config.json`, `special_tokens_map.json` and `added_tokens.json`), even
    /// where a `tokenizer.json` is beside it.
    pub fn from_dir_sentencepiece(dir: &Path) -> Result<Self, TokenizerError> {
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let model_path = dir.join("tokenizer.model");
        if !model_path.exists() {
            return Err(TokenizerError::Missing {
                dir: dir.display().to_string(),
            });
        }
        let bytes = std::fs::read(&model_path).map_err(|e| TokenizerError::Parse {
            file: model_path.display().to_string(),
            reason: e.to_string(),
        })?;
        let sp = SentencePiece::from_bytes(&bytes, &model_path.display().to_string())?;
        let special_map = read_json(&dir.join("special_tokens_map.json"))?.unwrap_or(Value::Null);
        let added_json = read_json(&dir.join("added_tokens.json"))?;
        Self::from_sentencepiece(sp, &config, &special_map, added_json.as_ref())
    }

    fn from_tokenizer_json(path: &Path, config: &Value) -> Result<Self, TokenizerError> {
        let what = path.display().to_string();
        let json = std::fs::read(path).map_err(|e| TokenizerError::Parse {
            file: what.clone(),
            reason: e.to_string(),
        })?;
        Self::from_tokenizer_json_bytes(&json, config, &what)
    }

    /// A `tokenizer.json` held in memory (GGUF's `tokenizer.huggingface.json`) with its
    /// `tokenizer_config.json`. `what` names the source in errors.
    pub fn from_tokenizer_json_bytes(
        json: &[u8],
        config: &Value,
        what: &str,
    ) -> Result<Self, TokenizerError> {
        // `tokenizers` panics on some malformed files (a decoder it cannot deserialize).
        let tok = crate::untrusted::guard(|| tokenizers::Tokenizer::from_bytes(json))
            .unwrap_or_else(|panic| Err(panic.into()))
            .map_err(|e| TokenizerError::Parse {
                file: what.to_string(),
                reason: e.to_string(),
            })?;
        let id = |key: &str, default: &str| -> u32 {
            let name = config
                .get(key)
                .and_then(token_entry)
                .map(|t| t.0)
                .unwrap_or_else(|| default.to_string());
            tok.token_to_id(&name).unwrap_or(0)
        };
        let (bos_id, eos_id, unk_id) = (
            id("bos_token", "<s>"),
            id("eos_token", "</s>"),
            id("unk_token", "<unk>"),
        );
        let special_ids = tok
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&i, _)| i)
            .collect();
        let vocab_size = tok.get_vocab_size(true);
        // The 2023 tokenizer.json layout (Prepend + Replace normalizer) gives every segment
        // after a special token its dummy prefix, i.e. it behaves like `legacy: true`
        // whatever tokenizer_config.json says.
        let legacy = true;
        let decoder: Value = serde_json::from_slice::<Value>(json)
            .map(|v| v["decoder"].clone())
            .unwrap_or(Value::Null);
        let is_byte_level = |d: &Value| d["type"] == "ByteLevel";
        let byte_level = is_byte_level(&decoder)
            || decoder["decoders"]
                .as_array()
                .is_some_and(|ds| ds.iter().any(is_byte_level));
        Ok(Self {
            legacy,
            backend: Backend::Fast {
                tok: Box::new(tok),
                byte_level,
            },
            bos_id,
            eos_id,
            unk_id,
            special_ids,
            vocab_size,
        })
    }

    /// A sentencepiece vocabulary given piece by piece (GGUF's `tokenizer.ggml.*`), with the
    /// JSON files a checkpoint directory would hold next to `tokenizer.model`.
    pub fn from_spm_vocab(
        vocab: SpmVocab,
        config: &Value,
        special_map: &Value,
        added_json: Option<&Value>,
        what: &str,
    ) -> Result<Self, TokenizerError> {
        let sp = SentencePiece::from_vocab(vocab, what)?;
        Self::from_sentencepiece(sp, config, special_map, added_json)
    }

    /// Every id as a sentencepiece piece with a score and a type, `rows` long (padding ids
    /// become unused `[PAD{id}]` pieces): what GGUF's `tokenizer.ggml.*` keys store, and
    /// what llama.cpp's LLaMA tokenizer runs on. A `tokenizer.json` BPE is spelled as
    /// sentencepiece would: a piece made by merge `r` scores `-r`, so that the highest score
    /// first is the lowest rank first.
    pub fn export_vocab(&self, rows: usize) -> Result<SpmVocab, TokenizerError> {
        let mut v = match &self.backend {
            Backend::Slow(s) => {
                let mut v = s.sp.vocab();
                for a in &s.added {
                    let i = a.id as usize;
                    if i >= v.pieces.len() {
                        v.pieces.resize(i + 1, String::new());
                        v.scores.resize(i + 1, 0.0);
                        v.kinds.resize(i + 1, 5);
                    }
                    if s.sp.piece(a.id).is_none() {
                        v.pieces[i] = a.content.clone();
                        v.kinds[i] = if a.special { 3 } else { 4 };
                    }
                }
                v
            }
            Backend::Fast { tok: t, .. } => bpe_json_vocab(t, self.unk_id)?,
        };
        let n = v.pieces.len().max(rows);
        for i in 0..n {
            if i >= v.pieces.len() {
                v.pieces.push(String::new());
                v.scores.push(0.0);
                v.kinds.push(5);
            }
            if v.pieces[i].is_empty() {
                v.pieces[i] = format!("[PAD{i}]");
                v.kinds[i] = 5;
            }
        }
        Ok(v)
    }

    /// A byte-level BPE tokenizer (MPT's GPT-NeoX) as GGUF's `gpt2` tokenizer keys hold
    /// it: every token in id order (added tokens too, `[PAD{i}]` up to `rows`), its type
    /// (1 normal, 3 control = special added token, 4 user-defined = other added token,
    /// 5 unused) and the merges as `"left right"`. `None` for other tokenizers.
    pub fn export_byte_level_bpe(
        &self,
        rows: usize,
    ) -> Result<Option<ByteLevelVocab>, TokenizerError> {
        let Backend::Fast {
            tok,
            byte_level: true,
        } = &self.backend
        else {
            return Ok(None);
        };
        let bad = |reason: String| TokenizerError::Parse {
            file: "tokenizer.json".into(),
            reason,
        };
        let json: Value =
            serde_json::from_str(&tok.to_string(false).map_err(|e| bad(e.to_string()))?)
                .map_err(|e| bad(e.to_string()))?;
        let n = tok.get_vocab_size(true).max(rows);
        let mut tokens = vec![String::new(); n];
        let mut kinds = vec![5; n];
        for (piece, id) in tok.get_vocab(false) {
            tokens[id as usize] = piece;
            kinds[id as usize] = 1;
        }
        for (&id, t) in tok.get_added_tokens_decoder().iter() {
            tokens[id as usize] = t.content.clone();
            kinds[id as usize] = if t.special { 3 } else { 4 };
        }
        for (i, t) in tokens.iter_mut().enumerate() {
            if t.is_empty() {
                *t = format!("[PAD{i}]");
            }
        }
        let merges = json["model"]["merges"]
            .as_array()
            .ok_or_else(|| bad("a byte-level BPE without merges".into()))?
            .iter()
            .filter_map(|m| match m {
                Value::String(s) => Some(s.clone()),
                Value::Array(p) => Some(
                    p.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(" "),
                ),
                _ => None,
            })
            .collect();
        Ok(Some(ByteLevelVocab {
            tokens,
            kinds,
            merges,
        }))
    }

    fn from_sentencepiece(
        sp: SentencePiece,
        config: &Value,
        special_map: &Value,
        added_json: Option<&Value>,
    ) -> Result<Self, TokenizerError> {
        let mut added: Vec<AddedToken> = Vec::new();
        let mut push = |t: AddedToken| {
            if !t.content.is_empty() && !added.iter().any(|a| a.content == t.content) {
                added.push(t);
            }
        };
        // Newer configs list every added token with its flags.
        if let Some(Value::Object(dec)) = config.get("added_tokens_decoder") {
            for (id, v) in dec {
                if let (Ok(id), Some((content, lstrip, rstrip))) = (id.parse(), token_entry(v)) {
                    let special = v.get("special").and_then(Value::as_bool).unwrap_or(true);
                    push(AddedToken {
                        content,
                        id,
                        lstrip,
                        rstrip,
                        special,
                    });
                }
            }
        }
        // bos/eos/unk/pad: from the config, else special_tokens_map.json.
        let mut specials = Vec::new();
        for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            let entry = config
                .get(key)
                .and_then(token_entry)
                .or_else(|| special_map.get(key).and_then(token_entry));
            if let Some((content, lstrip, rstrip)) = entry {
                specials.push((key, content.clone()));
                if let Some(id) = sp.piece_to_id(&content) {
                    push(AddedToken {
                        content,
                        id,
                        lstrip,
                        rstrip,
                        special: true,
                    });
                }
            }
        }
        // added_tokens.json holds bare strings (v0's <im_patch>, <im_start>, <im_end>);
        // transformers ≤ 4.33 strips whitespace on both sides of such tokens.
        if let Some(Value::Object(map)) = added_json {
            let mut entries: Vec<(String, u32)> = map
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_u64()? as u32)))
                .collect();
            entries.sort_by_key(|e| e.1);
            for (content, id) in entries {
                push(AddedToken {
                    content,
                    id,
                    lstrip: true,
                    rstrip: true,
                    special: true,
                });
            }
        }
        let find = |key: &str, default: &str| -> u32 {
            let name = specials
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, c)| c.as_str())
                .unwrap_or(default);
            sp.piece_to_id(name).unwrap_or(0)
        };
        let (bos_id, eos_id) = (find("bos_token", "<s>"), find("eos_token", "</s>"));
        let unk_id = sp.unk_id();
        let legacy = config
            .get("legacy")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let add_bos = config
            .get("add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let add_eos = config
            .get("add_eos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let mut special_ids: HashSet<u32> =
            added.iter().filter(|a| a.special).map(|a| a.id).collect();
        special_ids.extend((0..sp.vocab_size() as u32).filter(|&i| sp.is_control(i)));
        let vocab_size = added
            .iter()
            .map(|a| a.id as usize + 1)
            .max()
            .unwrap_or(0)
            .max(sp.vocab_size());
        Ok(Self {
            legacy,
            backend: Backend::Slow(Box::new(SlowTokenizer {
                sp,
                added,
                legacy,
                add_bos,
                add_eos,
            })),
            bos_id,
            eos_id,
            unk_id,
            special_ids,
            vocab_size,
        })
    }

    /// transformers' `legacy` flag.
    pub fn is_legacy(&self) -> bool {
        self.legacy
    }

    /// Number of distinct ids (the embedding rows a checkpoint needs at least).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// `tokenizer(text).input_ids`: BOS (when the tokenizer adds it) then the text's ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match &self.backend {
            Backend::Slow(s) => Ok(s.encode(text)),
            Backend::Fast { tok: t, .. } => t
                .encode(text, true)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| TokenizerError::Encode {
                    reason: e.to_string(),
                }),
        }
    }

    /// Whether `decode(…, skip_special = true)` drops this id.
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// The id of a token string, such as `<im_patch>` or `<image>`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.backend {
            Backend::Slow(s) => s
                .added
                .iter()
                .find(|a| a.content == token)
                .map(|a| a.id)
                .or_else(|| s.sp.piece_to_id(token)),
            Backend::Fast { tok: t, .. } => t.token_to_id(token),
        }
    }

    /// The token string of an id, if it has one.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.backend {
            Backend::Slow(s) => s
                .added
                .iter()
                .find(|a| a.id == id)
                .map(|a| a.content.clone())
                .or_else(|| s.sp.piece(id).map(str::to_string)),
            Backend::Fast { tok: t, .. } => t.id_to_token(id),
        }
    }

    /// The bytes `id` stands for in decoded text (a sentencepiece `▁` as a space, a byte
    /// piece `<0xNN>` as its byte), as constrained decoding matches them against a grammar.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let mut out = Vec::new();
        self.push_token_bytes(id, &mut out);
        out
    }

    fn push_token_bytes(&self, id: u32, out: &mut Vec<u8>) {
        match &self.backend {
            Backend::Slow(s) => {
                if let Some(a) = s.added.iter().find(|a| a.id == id) {
                    out.extend_from_slice(a.content.as_bytes());
                } else {
                    s.sp.piece_bytes(id, out);
                }
            }
            Backend::Fast { tok, byte_level } => {
                let Some(p) = tok.id_to_token(id) else {
                    return;
                };
                if *byte_level {
                    // As the `tokenizers` ByteLevel decoder does: each character back to its
                    // byte, or the token's own text when a character has none (added tokens
                    // such as MPT's runs of spaces).
                    match p.chars().map(byte_of_char).collect::<Option<Vec<u8>>>() {
                        Some(bytes) => out.extend(bytes),
                        None => out.extend(p.bytes()),
                    }
                    return;
                }
                match sentencepiece::parse_byte_piece(&p) {
                    Some(b) => out.push(b),
                    None => out.extend(p.replace(SPACE_MARK, " ").bytes()),
                }
            }
        }
    }

    /// Raw bytes of `ids`, special tokens dropped when `skip_special`, with sentencepiece's
    /// leading dummy space removed. May end in the middle of a UTF-8 character.
    pub fn decode_bytes(&self, ids: &[u32], skip_special: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for &id in ids {
            if skip_special && self.special_ids.contains(&id) {
                continue;
            }
            self.push_token_bytes(id, &mut out);
        }
        let byte_level = matches!(
            self.backend,
            Backend::Fast {
                byte_level: true,
                ..
            }
        );
        if out.first() == Some(&b' ') && !byte_level {
            out.remove(0);
        }
        out
    }

    /// `tokenizer.decode(ids, skip_special_tokens=skip_special)`; invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids, skip_special)).into_owned()
    }
}

/// The byte GPT-2's byte-level alphabet writes as `c`: printable Latin-1 bytes stand for
/// themselves, and the other 68 bytes, in order, for U+0100 onwards (`Ġ` is the space).
fn byte_of_char(c: char) -> Option<u8> {
    let printable = |b: u8| matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
    // The 68 other bytes in order, found once: decoding looks one up per character.
    static SHIFTED: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    match u32::from(c) {
        c @ 0..0x100 => printable(c as u8).then_some(c as u8),
        c => SHIFTED
            .get_or_init(|| (0..=255u8).filter(|&b| !printable(b)).collect())
            .get((c - 0x100) as usize)
            .copied(),
    }
}

/// A `tokenizer.json` BPE as sentencepiece pieces (see [`Tokenizer::export_vocab`]).
fn bpe_json_vocab(t: &tokenizers::Tokenizer, unk_id: u32) -> Result<SpmVocab, TokenizerError> {
    let bad = |reason: String| TokenizerError::Parse {
        file: "tokenizer.json".into(),
        reason,
    };
    let json: Value = serde_json::from_str(&t.to_string(false).map_err(|e| bad(e.to_string()))?)
        .map_err(|e| bad(e.to_string()))?;
    let model = &json["model"];
    let Some(vocab) = model["vocab"].as_object() else {
        return Err(bad(
            "the model has no vocab (only BPE vocabularies convert)".into(),
        ));
    };
    let n = vocab
        .values()
        .filter_map(Value::as_u64)
        .max()
        .map_or(0, |m| m as usize + 1);
    let mut pieces = vec![String::new(); n];
    for (piece, id) in vocab {
        if let Some(id) = id.as_u64() {
            pieces[id as usize] = piece.clone();
        }
    }
    let mut scores = vec![0f32; n];
    let mut scored = vec![false; n];
    let merges = model["merges"].as_array().cloned().unwrap_or_default();
    for (rank, m) in merges.iter().enumerate() {
        let joined = match m {
            Value::String(s) => s.replacen(' ', "", 1),
            Value::Array(p) => p.iter().filter_map(Value::as_str).collect(),
            _ => continue,
        };
        if let Some(id) = vocab.get(&joined).and_then(Value::as_u64) {
            let id = id as usize;
            if !scored[id] {
                scores[id] = -(rank as f32);
                scored[id] = true;
            }
        }
    }
    let mut kinds: Vec<i32> = pieces
        .iter()
        .map(|p| {
            if sentencepiece::parse_byte_piece(p).is_some() {
                6
            } else {
                1
            }
        })
        .collect();
    if let Some(k) = kinds.get_mut(unk_id as usize) {
        *k = 2;
    }
    for (&id, tok) in t.get_added_tokens_decoder().iter() {
        let i = id as usize;
        if i >= pieces.len() {
            pieces.resize(i + 1, String::new());
            scores.resize(i + 1, 0.0);
            kinds.resize(i + 1, 5);
        }
        pieces[i] = tok.content.clone();
        if i != unk_id as usize {
            kinds[i] = if tok.special { 3 } else { 4 };
        }
    }
    Ok(SpmVocab {
        pieces,
        scores,
        kinds,
        add_dummy_prefix: true,
        remove_extra_whitespaces: false,
        escape_whitespaces: true,
    })
}

impl SlowTokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        if self.add_bos {
            if let Some(bos) = self.added.iter().find(|a| a.content == "<s>") {
                ids.push(bos.id);
            } else if let Some(bos) = self.sp.piece_to_id("<s>") {
                ids.push(bos);
            }
        }
        if self.legacy {
            ids.extend(self.encode_legacy(text));
        } else {
            ids.extend(self.encode_modern(text));
        }
        if self.add_eos {
            if let Some(eos) = self.sp.piece_to_id("</s>") {
                ids.push(eos);
            }
        }
        ids
    }

    /// transformers' `Trie.split` plus the whitespace stripping around no-split tokens.
    fn split<'a>(&'a self, text: &'a str) -> Vec<Chunk<'a>> {
        let mut chunks: Vec<Chunk<'a>> = Vec::new();
        let mut last = 0;
        let mut i = 0;
        let bytes = text.as_bytes();
        while i < bytes.len() {
            let hit = self
                .added
                .iter()
                .filter(|a| text[i..].starts_with(a.content.as_str()))
                .max_by_key(|a| a.content.len());
            match hit {
                Some(a) => {
                    if last < i {
                        chunks.push(Chunk::Text(&text[last..i]));
                    }
                    chunks.push(Chunk::Token(a));
                    i += a.content.len();
                    last = i;
                }
                None => {
                    // Advance one character (added tokens start on char boundaries).
                    i += text[i..].chars().next().map_or(1, char::len_utf8);
                }
            }
        }
        if last < text.len() {
            chunks.push(Chunk::Text(&text[last..]));
        }
        for k in 0..chunks.len() {
            if let Chunk::Token(a) = chunks[k] {
                if a.rstrip {
                    if let Some(Chunk::Text(t)) = chunks.get_mut(k + 1) {
                        *t = t.trim_start();
                    }
                }
                if a.lstrip && k > 0 {
                    if let Some(Chunk::Text(t)) = chunks.get_mut(k - 1) {
                        *t = t.trim_end();
                    }
                }
            }
        }
        chunks
    }

    /// transformers ≤ 4.33 (`legacy: true`): every text chunk gets sentencepiece's dummy prefix.
    fn encode_legacy(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        for chunk in self.split(text) {
            match chunk {
                Chunk::Token(a) => ids.push(a.id),
                Chunk::Text(t) if !t.is_empty() => ids.extend(self.sp.encode(t, true)),
                Chunk::Text(_) => {}
            }
        }
        ids
    }

    /// transformers ≥ 4.37 with `legacy: false`: `▁` is prepended to the whole text once; a
    /// chunk starting with a space is encoded behind `<unk>` (then cut off) so that its `▁`
    /// survives, and no other chunk gets a dummy prefix.
    fn encode_modern(&self, text: &str) -> Vec<u32> {
        if text.is_empty() {
            return Vec::new();
        }
        let unk = self
            .sp
            .piece(self.sp.unk_id())
            .unwrap_or("<unk>")
            .to_string();
        let unk_len = self.sp.encode(&unk, false).len();
        let text = format!("{SPACE_MARK}{}", text.replace(SPACE_MARK, " "));
        let chunks = self.split(&text);
        let mut pieces: Vec<Vec<u32>> = Vec::new();
        let mut is_special: Vec<bool> = Vec::new();
        for chunk in &chunks {
            match chunk {
                Chunk::Token(a) => {
                    pieces.push(vec![a.id]);
                    is_special.push(true);
                }
                Chunk::Text(t) if !t.is_empty() => {
                    let ids = if t.starts_with([SPACE_MARK, ' ']) {
                        let all = self.sp.encode(&format!("{unk}{t}"), false);
                        all.get(unk_len..).map(<[u32]>::to_vec).unwrap_or(all)
                    } else {
                        self.sp.encode(t, false)
                    };
                    // One entry per token, as transformers' token list.
                    for id in ids {
                        pieces.push(vec![id]);
                        is_special.push(false);
                    }
                }
                Chunk::Text(_) => {}
            }
        }
        let mut flat: Vec<u32> = pieces.into_iter().flatten().collect();
        // `tokens[0] == "▁" and tokens[1] in all_special_tokens`: drop the lone prefix.
        let space_id = self.sp.piece_to_id(&SPACE_MARK.to_string());
        if flat.len() > 1 && Some(flat[0]) == space_id && is_special.get(1) == Some(&true) {
            flat.remove(0);
        }
        flat
    }
}

enum Chunk<'a> {
    Text(&'a str),
    Token(&'a AddedToken),
}

/// Turns generated ids into text as they arrive, never emitting half a UTF-8 character.
///
/// It re-decodes the whole generation each step (as transformers' `TextStreamer` does), so
/// sentencepiece's leading-space rule and multi-token byte sequences come out right.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    emitted: usize,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one id; returns the newly completed text, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Option<String> {
        self.ids.push(id);
        let bytes = tok.decode_bytes(&self.ids, true);
        let valid = match std::str::from_utf8(&bytes) {
            Ok(s) => s.len(),
            // An incomplete trailing sequence: wait for more bytes. An invalid one in the
            // middle cannot become valid: emit it lossily.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => bytes.len(),
        };
        if valid <= self.emitted {
            return None;
        }
        let text = String::from_utf8_lossy(&bytes[self.emitted..valid]).into_owned();
        self.emitted = valid;
        Some(text)
    }

    /// Whatever is left (an incomplete character at the end becomes U+FFFD).
    pub fn finish(&mut self, tok: &Tokenizer) -> Option<String> {
        let bytes = tok.decode_bytes(&self.ids, true);
        if bytes.len() <= self.emitted {
            return None;
        }
        let text = String::from_utf8_lossy(&bytes[self.emitted..]).into_owned();
        self.emitted = bytes.len();
        Some(text)
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}
