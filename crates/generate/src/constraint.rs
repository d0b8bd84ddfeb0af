//! Structured output: an answer held to a grammar (any JSON object, or JSON valid under a
//! schema) by masking, at every step, the tokens that cannot continue it. The grammar
//! engine is `llguidance` (what llama.cpp and mistral.rs use); this module gives it the
//! model's vocabulary as bytes and says how an answer may begin and end.

use std::fmt;
use std::sync::{Arc, OnceLock};

use kollava_inputs::Tokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

/// What text an answer must be.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid under this schema (OpenAI's `json_schema`).
    JsonSchema(Value),
}

/// A grammar that cannot be used, or a grammar engine failure mid-answer.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConstraintError(String);

/// The vocabulary as llguidance sees it: each id's bytes in decoded text, special tokens
/// behind llguidance's marker byte so that no grammar over text can produce them.
struct Vocab {
    trie: TokTrie,
}

impl TokenizerEnv for Vocab {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // Only used for text a grammar forces, which our grammars never do.
        self.trie.greedy_tokenize(s)
    }
}

/// A model's vocabulary prepared for grammars, built on first use (it walks every token)
/// and then shared by every request, from any thread.
pub struct Grammars {
    tok: Tokenizer,
    rows: usize,
    factory: OnceLock<Result<ParserFactory, String>>,
}

impl Grammars {
    /// `rows`: the logits' length (the embedding rows, at least the tokenizer's ids; rows
    /// past them are never allowed).
    pub fn new(tok: Tokenizer, rows: usize) -> Self {
        Self {
            tok,
            rows,
            factory: OnceLock::new(),
        }
    }

    fn factory(&self) -> Result<&ParserFactory, ConstraintError> {
        self.factory
            .get_or_init(|| build_factory(&self.tok, self.rows))
            .as_ref()
            .map_err(|e| ConstraintError(e.clone()))
    }

    /// A fresh constraint for one answer, or why the format cannot be used (an invalid or
    /// unsupported schema), in one line.
    ///
    /// Unless the schema's own `x-guidance` says otherwise, JSON is written with `", "` and
    /// `": "` between items and no other whitespace: an answer's length is then bounded by
    /// its schema, and a model cannot pad it with blank lines until its token budget runs
    /// out. One space may lead (a sentencepiece answer's first token usually carries it).
    pub fn compile(&self, format: &OutputFormat) -> Result<Constraint, ConstraintError> {
        let mut schema = match format {
            OutputFormat::JsonObject => json!({"type": "object"}),
            OutputFormat::JsonSchema(s) => s.clone(),
        };
        match &mut schema {
            Value::Object(o) => {
                o.entry("x-guidance").or_insert_with(|| {
                    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
                });
            }
            Value::Bool(_) => {}
            _ => {
                return Err(ConstraintError(
                    "a JSON schema must be an object (or true/false)".into(),
                ))
            }
        }
        let lark = format!("start: \" \"? answer\nanswer: %json {schema}\n");
        let parser = self
            .factory()?
            .create_parser(TopLevelGrammar::from_lark(lark))
            .map_err(|e| ConstraintError(schema_error(&e.to_string())))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(ConstraintError(one_line(&e)));
        }
        Ok(Constraint { matcher })
    }
}

/// llguidance's view of the vocabulary, and the factory that compiles grammars over it.
fn build_factory(tok: &Tokenizer, rows: usize) -> Result<ParserFactory, String> {
    let rows = rows.max(tok.vocab_size());
    let words: Vec<Vec<u8>> = (0..rows as u32)
        .map(|id| {
            if id as usize >= tok.vocab_size() {
                Vec::new()
            } else if tok.is_special(id) {
                let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                w.extend(tok.id_to_token(id).unwrap_or_default().bytes());
                w
            } else {
                tok.token_bytes(id)
            }
        })
        .collect();
    let info = TokRxInfo::new(rows as u32, tok.eos_id);
    let env: TokEnv = Arc::new(Vocab {
        trie: TokTrie::from(&info, &words),
    });
    let mut factory = ParserFactory::new_simple(&env)
        .map_err(|e| format!("preparing the vocabulary for grammars: {e}"))?;
    factory.quiet();
    Ok(factory)
}

/// The schema's part of a compile error, without the grammar listing that wraps it.
fn schema_error(e: &str) -> String {
    let e = one_line(e);
    match e.split_once("failed to compile JSON schema: ") {
        Some((_, rest)) => rest.split(" 1 | ").next().unwrap_or(rest).to_string(),
        None => e,
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One answer's place in its grammar.
pub struct Constraint {
    matcher: Matcher,
}

impl Clone for Constraint {
    /// An independent copy (each of a request's `n` answers walks the grammar on its own).
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
        }
    }
}

impl fmt::Debug for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

/// The tokens that may come next.
pub struct Allowed {
    mask: SimpleVob,
    /// Whether the answer is complete here (the end-of-sequence ids are allowed).
    pub may_end: bool,
}

impl Allowed {
    pub fn contains(&self, id: u32) -> bool {
        self.mask.is_allowed(id)
    }
}

impl Constraint {
    /// What may follow the answer so far.
    pub fn allowed(&mut self) -> Result<Allowed, ConstraintError> {
        let mut mask = self.matcher.compute_mask().map_err(engine_error)?;
        let eos = self
            .matcher
            .tok_env()
            .map_err(engine_error)?
            .tok_trie()
            .eos_token();
        let may_end = mask.is_allowed(eos);
        mask.disallow_token(eos);
        if mask.is_zero() && !may_end {
            return Err(ConstraintError(
                "the grammar allows no token here (an internal error)".into(),
            ));
        }
        Ok(Allowed { mask, may_end })
    }

    /// Moves past `id`, one of [`Constraint::allowed`]'s.
    pub fn commit(&mut self, id: u32) -> Result<(), ConstraintError> {
        self.matcher.consume_token(id).map_err(engine_error)
    }

    /// Whether the answer is complete and nothing may follow it.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

fn engine_error(e: impl fmt::Display) -> ConstraintError {
    ConstraintError(format!(
        "constrained decoding: {}",
        one_line(&e.to_string())
    ))
}
