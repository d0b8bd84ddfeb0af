//! SentencePiece BPE encoding in pure Rust, as `sentencepiece`'s `bpe_model.cc` does it.
//!
//! The reference uses the *slow* `LlamaTokenizer`, i.e. the sentencepiece library itself, not
//! a `tokenizers` BPE. The two disagree on some strings (`" Hello"` is `▁` `▁Hello` here and
//! `▁▁` `Hello` in tokenizer.json), so we run sentencepiece's own algorithm: split the
//! normalised text into characters, then repeatedly merge the adjacent pair whose
//! concatenation is a vocabulary piece with the highest score (leftmost on ties); pieces
//! that are not in the vocabulary fall back to `<0xXX>` byte tokens.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use sentencepiece_model::{SentencePieceModel, Type};

use super::TokenizerError;

/// sentencepiece's whitespace marker, U+2581.
pub const SPACE_MARK: char = '\u{2581}';

/// A loaded `tokenizer.model` (BPE type only: every LLaMA/Mistral vocabulary is BPE).
#[derive(Debug, Clone)]
pub struct SentencePiece {
    pieces: Vec<String>,
    kinds: Vec<Type>,
    /// Mergeable pieces (NORMAL, USER_DEFINED, UNUSED) and their score.
    merge_scores: HashMap<String, (u32, f32)>,
    /// Every piece by text, for lookups of control and byte pieces.
    by_text: HashMap<String, u32>,
    byte_ids: [Option<u32>; 256],
    unk_id: u32,
    /// All 256 `<0xXX>` pieces exist: unknown text is spelled in bytes.
    byte_fallback: bool,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
}

/// A sentencepiece vocabulary spelled out: piece `i` has `scores[i]` and type `kinds[i]`
/// (sentencepiece's numbering, which GGUF's `tokenizer.ggml.token_type` shares: 1 normal,
/// 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
#[derive(Debug, Clone, PartialEq)]
pub struct SpmVocab {
    pub pieces: Vec<String>,
    pub scores: Vec<f32>,
    pub kinds: Vec<i32>,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
}

impl SentencePiece {
    /// Parses a serialized `ModelProto`. `what` names the file in errors.
    pub fn from_bytes(bytes: &[u8], what: &str) -> Result<Self, TokenizerError> {
        let model = SentencePieceModel::from_slice(bytes).map_err(|e| TokenizerError::Parse {
            file: what.to_string(),
            reason: e.to_string(),
        })?;
        let bad = |reason: String| TokenizerError::Parse {
            file: what.to_string(),
            reason,
        };
        if let Some(trainer) = model.trainer() {
            use sentencepiece_model::ModelType;
            if trainer.model_type() != ModelType::Bpe {
                return Err(bad(format!(
                    "model type {:?} is not supported; LLaMA-family vocabularies are BPE",
                    trainer.model_type()
                )));
            }
        }
        let (add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces) =
            match model.normalizer() {
                Some(n) => {
                    if n.precompiled_charsmap
                        .as_ref()
                        .is_some_and(|m| !m.is_empty())
                    {
                        return Err(bad(format!(
                            "normalizer {:?} with a character map is not supported (only identity)",
                            n.name()
                        )));
                    }
                    (
                        n.add_dummy_prefix(),
                        n.remove_extra_whitespaces(),
                        n.escape_whitespaces(),
                    )
                }
                None => (true, false, true),
            };
        let vocab = SpmVocab {
            pieces: model
                .pieces()
                .iter()
                .map(|p| p.piece().to_string())
                .collect(),
            scores: model.pieces().iter().map(|p| p.score()).collect(),
            kinds: model.pieces().iter().map(|p| p.r#type() as i32).collect(),
            add_dummy_prefix,
            remove_extra_whitespaces,
            escape_whitespaces,
        };
        Self::from_vocab(vocab, what)
    }

    /// Builds the model from its pieces (GGUF stores a vocabulary this way).
    pub fn from_vocab(vocab: SpmVocab, what: &str) -> Result<Self, TokenizerError> {
        let bad = |reason: String| TokenizerError::Parse {
            file: what.to_string(),
            reason,
        };
        let n = vocab.pieces.len();
        if vocab.scores.len() != n || vocab.kinds.len() != n {
            return Err(bad(format!(
                "{n} pieces but {} scores and {} types",
                vocab.scores.len(),
                vocab.kinds.len()
            )));
        }
        let mut kinds = Vec::with_capacity(n);
        let mut merge_scores = HashMap::new();
        let mut by_text = HashMap::new();
        let mut byte_ids = [None; 256];
        let mut unk_id = None;
        for (i, (text, (&score, &kind))) in vocab
            .pieces
            .iter()
            .zip(vocab.scores.iter().zip(&vocab.kinds))
            .enumerate()
        {
            let id = i as u32;
            let kind = match kind {
                2 => Type::Unknown,
                3 => Type::Control,
                4 => Type::UserDefined,
                5 => Type::Unused,
                6 => Type::Byte,
                _ => Type::Normal,
            };
            match kind {
                Type::Normal | Type::UserDefined | Type::Unused => {
                    merge_scores.insert(text.clone(), (id, score));
                }
                Type::Unknown => unk_id = Some(id),
                Type::Byte => {
                    if let Some(b) = parse_byte_piece(text) {
                        byte_ids[b as usize] = Some(id);
                    }
                }
                Type::Control => {}
            }
            by_text.entry(text.clone()).or_insert(id);
            kinds.push(kind);
        }
        let unk_id = unk_id.ok_or_else(|| bad("the vocabulary has no unknown piece".into()))?;
        let byte_fallback = byte_ids.iter().all(Option::is_some);
        Ok(Self {
            byte_fallback,
            pieces: vocab.pieces,
            kinds,
            merge_scores,
            by_text,
            byte_ids,
            unk_id,
            add_dummy_prefix: vocab.add_dummy_prefix,
            remove_extra_whitespaces: vocab.remove_extra_whitespaces,
            escape_whitespaces: vocab.escape_whitespaces,
        })
    }

    /// The model as a list of pieces, the inverse of [`SentencePiece::from_vocab`].
    pub fn vocab(&self) -> SpmVocab {
        let score = |i: usize| {
            self.merge_scores
                .get(&self.pieces[i])
                .filter(|(id, _)| *id as usize == i)
                .map_or(0.0, |&(_, s)| s)
        };
        SpmVocab {
            pieces: self.pieces.clone(),
            scores: (0..self.pieces.len()).map(score).collect(),
            kinds: self.kinds.iter().map(|&k| k as i32).collect(),
            add_dummy_prefix: self.add_dummy_prefix,
            remove_extra_whitespaces: self.remove_extra_whitespaces,
            escape_whitespaces: self.escape_whitespaces,
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    pub fn piece_to_id(&self, piece: &str) -> Option<u32> {
        self.by_text.get(piece).copied()
    }

    pub fn is_control(&self, id: u32) -> bool {
        matches!(self.kinds.get(id as usize), Some(Type::Control))
    }

    pub fn unk_id(&self) -> u32 {
        self.unk_id
    }

    /// `sp.encode(text)` with the model's own normaliser settings, except that the dummy
    /// prefix can be turned off (transformers' non-legacy mode loads the model that way).
    pub fn encode(&self, text: &str, dummy_prefix: bool) -> Vec<u32> {
        let normalized = self.normalize(text, dummy_prefix && self.add_dummy_prefix);
        if normalized.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for piece in self.bpe(&normalized) {
            if let Some(&(id, _)) = self.merge_scores.get(piece) {
                out.push(id);
            } else if self.byte_fallback {
                out.extend(piece.bytes().filter_map(|b| self.byte_ids[b as usize]));
            } else if out.last() != Some(&self.unk_id) {
                // Without byte fallback consecutive unknowns collapse into one.
                out.push(self.unk_id);
            }
        }
        out
    }

    fn normalize(&self, text: &str, dummy_prefix: bool) -> String {
        let mut t: String = if self.remove_extra_whitespaces {
            let mut s = String::with_capacity(text.len());
            for word in text.split(' ').filter(|w| !w.is_empty()) {
                if !s.is_empty() {
                    s.push(' ');
                }
                s.push_str(word);
            }
            s
        } else {
            text.to_string()
        };
        if t.is_empty() {
            return t;
        }
        if dummy_prefix {
            t.insert(0, ' ');
        }
        if self.escape_whitespaces {
            t = t.replace(' ', "\u{2581}");
        }
        t
    }

    /// The merge loop of `bpe_model.cc`: a max-heap of candidate pairs, stale entries skipped.
    fn bpe<'a>(&self, text: &'a str) -> Vec<&'a str> {
        // Symbols as byte ranges into `text`, linked by prev/next.
        let mut start: Vec<usize> = Vec::new();
        let mut len: Vec<usize> = Vec::new();
        for (i, c) in text.char_indices() {
            start.push(i);
            len.push(c.len_utf8());
        }
        let n = start.len();
        let mut prev: Vec<isize> = (0..n as isize).map(|i| i - 1).collect();
        let mut next: Vec<isize> = (0..n as isize)
            .map(|i| if i + 1 < n as isize { i + 1 } else { -1 })
            .collect();
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<Candidate>,
                    l: isize,
                    r: isize,
                    start: &[usize],
                    len: &[usize]| {
            if l < 0 || r < 0 {
                return;
            }
            let (l, r) = (l as usize, r as usize);
            let total = len[l] + len[r];
            let s = &text[start[l]..start[l] + total];
            if let Some(&(_, score)) = self.merge_scores.get(s) {
                heap.push(Candidate {
                    score,
                    left: l,
                    right: r,
                    total,
                });
            }
        };
        for i in 1..n {
            push(&mut heap, i as isize - 1, i as isize, &start, &len);
        }
        while let Some(c) = heap.pop() {
            // Stale: one side was already merged away or grew.
            if len[c.left] == 0 || len[c.right] == 0 || len[c.left] + len[c.right] != c.total {
                continue;
            }
            len[c.left] = c.total;
            len[c.right] = 0;
            next[c.left] = next[c.right];
            if next[c.right] >= 0 {
                prev[next[c.right] as usize] = c.left as isize;
            }
            push(&mut heap, prev[c.left], c.left as isize, &start, &len);
            push(&mut heap, c.left as isize, next[c.left], &start, &len);
        }
        let mut out = Vec::new();
        let mut i: isize = if n > 0 { 0 } else { -1 };
        while i >= 0 {
            let u = i as usize;
            out.push(&text[start[u]..start[u] + len[u]]);
            i = next[u];
        }
        out
    }

    /// The bytes a piece stands for when decoding: `<0xXX>` pieces are one raw byte, `▁` is a
    /// space, everything else is its UTF-8 text.
    pub fn piece_bytes(&self, id: u32, out: &mut Vec<u8>) {
        let Some(p) = self.pieces.get(id as usize) else {
            return;
        };
        if matches!(self.kinds[id as usize], Type::Byte) {
            if let Some(b) = parse_byte_piece(p) {
                out.push(b);
                return;
            }
        }
        for ch in p.chars() {
            if ch == SPACE_MARK {
                out.push(b' ');
            } else {
                let mut buf = [0u8; 4];
                out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

/// `<0x0A>` → 0x0A.
pub(crate) fn parse_byte_piece(p: &str) -> Option<u8> {
    let hex = p.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// A merge candidate. Ordered as sentencepiece's `SymbolPairComparator`: higher score first,
/// then the leftmost pair.
#[derive(Debug)]
struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    total: usize,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}
