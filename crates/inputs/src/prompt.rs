//! A rendered conversation → token ids plus the places where image features go.
//!
//! The three families put images into the ids differently (llava-spec §1a.6, §1b, gotchas
//! 2, 3, 5 of the fixtures README). [`ImageTokens`] names the scheme; [`build`] returns one
//! uniform [`Prompt`]: ids plus [`ImageSlot`]s that say where the model writes the features
//! and how many ids they replace (0 = inserted, so the sequence grows by N).

use crate::tokenizer::{Tokenizer, TokenizerError};

/// The placeholder callers put in user text.
pub const IMAGE_PLACEHOLDER: &str = "<image>";
/// LLaVA-1.5's `IMAGE_TOKEN_INDEX`, only used to show ids as the reference writes them.
pub const IMAGE_TOKEN_INDEX: i64 = -200;

/// How a checkpoint encodes an image in its ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageTokens {
    /// LLaVA v0: `<im_start>` + N × `<im_patch>` + `<im_end>` (or N patches alone) are real
    /// tokens whose embeddings get overwritten; the sequence length does not change.
    PatchTokens {
        patch: u32,
        start_end: Option<(u32, u32)>,
        n: usize,
    },
    /// LLaVA-1.5: the text is split on `<image>`, each chunk tokenized on its own (BOS kept
    /// only for the first), and N feature rows are inserted at each split.
    Splice { n: usize },
    /// llava-hf: `<image>` is a token (id), repeated N times by the processor, then replaced.
    Token { id: u32, n: usize },
}

impl ImageTokens {
    /// Number of feature rows one image contributes.
    pub fn n(&self) -> usize {
        match *self {
            ImageTokens::PatchTokens { n, .. }
            | ImageTokens::Splice { n }
            | ImageTokens::Token { n, .. } => n,
        }
    }

    /// Where the upstream code puts the image relative to the question in a user turn:
    /// June-2023 `run_llava` appends it (`query\n<image>`), later code prepends it.
    pub fn user_text(&self, query: &str) -> String {
        match self {
            ImageTokens::PatchTokens { .. } => format!("{query}\n{IMAGE_PLACEHOLDER}"),
            _ => format!("{IMAGE_PLACEHOLDER}\n{query}"),
        }
    }
}

/// Where one image's features go in [`Prompt::ids`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSlot {
    /// Index into `ids` of the first replaced id, or the insertion point.
    pub at: usize,
    /// How many ids the features replace (0: inserted).
    pub replaces: usize,
}

/// Token ids ready for the model.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Prompt {
    pub ids: Vec<u32>,
    pub images: Vec<ImageSlot>,
}

impl Prompt {
    /// Length of the sequence the decoder sees, with every image's N rows in place.
    pub fn spliced_len(&self, n_per_image: usize) -> usize {
        self.ids.len()
            + self
                .images
                .iter()
                .map(|s| n_per_image - s.replaces.min(n_per_image))
                .sum::<usize>()
    }

    /// The ids as the reference writes them: `-200` at each inserted image.
    pub fn reference_ids(&self) -> Vec<i64> {
        let mut out = Vec::with_capacity(self.ids.len() + self.images.len());
        let mut inserts = self
            .images
            .iter()
            .filter(|s| s.replaces == 0)
            .map(|s| s.at)
            .peekable();
        for (i, &id) in self.ids.iter().enumerate() {
            while inserts.peek() == Some(&i) {
                out.push(IMAGE_TOKEN_INDEX);
                inserts.next();
            }
            out.push(id as i64);
        }
        out.extend(inserts.map(|_| IMAGE_TOKEN_INDEX));
        out
    }
}

/// Errors building a prompt.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PromptError {
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(
        "malformed image block at position {at}: expected <im_end> {n} tokens after <im_start>"
    )]
    BrokenImageBlock { at: usize, n: usize },
}

/// Tokenizes a rendered prompt containing `<image>` placeholders (or, for v0, already
/// expanded `<im_start><im_patch>…<im_end>` blocks).
pub fn build(tok: &Tokenizer, text: &str, scheme: &ImageTokens) -> Result<Prompt, PromptError> {
    match *scheme {
        ImageTokens::PatchTokens {
            patch,
            start_end,
            n,
        } => {
            let block = match (start_end, tok.id_to_token(patch)) {
                (Some((s, e)), Some(p)) => format!(
                    "{}{}{}",
                    tok.id_to_token(s).unwrap_or_default(),
                    p.repeat(n),
                    tok.id_to_token(e).unwrap_or_default()
                ),
                (None, Some(p)) => p.repeat(n),
                (_, None) => String::new(),
            };
            let ids = tok.encode(&text.replace(IMAGE_PLACEHOLDER, &block))?;
            let mut images = Vec::new();
            let mut i = 0;
            while i < ids.len() {
                match start_end {
                    Some((s, e)) if ids[i] == s => {
                        if ids.get(i + n + 1) != Some(&e) {
                            return Err(PromptError::BrokenImageBlock { at: i, n: n + 1 });
                        }
                        images.push(ImageSlot {
                            at: i + 1,
                            replaces: n,
                        });
                        i += n + 2;
                    }
                    None if ids[i] == patch
                        && ids
                            .get(i..i + n)
                            .is_some_and(|w| w.iter().all(|&x| x == patch)) =>
                    {
                        images.push(ImageSlot { at: i, replaces: n });
                        i += n;
                    }
                    _ => i += 1,
                }
            }
            Ok(Prompt { ids, images })
        }
        ImageTokens::Splice { .. } => {
            let mut ids = Vec::new();
            let mut images = Vec::new();
            for (k, chunk) in text.split(IMAGE_PLACEHOLDER).enumerate() {
                let chunk_ids = tok.encode(chunk)?;
                if k == 0 {
                    ids.extend(chunk_ids);
                } else {
                    images.push(ImageSlot {
                        at: ids.len(),
                        replaces: 0,
                    });
                    // Every chunk was tokenized with its own BOS; upstream keeps only the first.
                    let skip = usize::from(chunk_ids.first() == Some(&tok.bos_id));
                    ids.extend_from_slice(&chunk_ids[skip..]);
                }
            }
            Ok(Prompt { ids, images })
        }
        ImageTokens::Token { id, n } => {
            let raw = tok.encode(text)?;
            let mut ids = Vec::with_capacity(raw.len() + n);
            let mut images = Vec::new();
            for t in raw {
                if t == id {
                    images.push(ImageSlot {
                        at: ids.len(),
                        replaces: n,
                    });
                    ids.extend(std::iter::repeat_n(id, n));
                } else {
                    ids.push(t);
                }
            }
            Ok(Prompt { ids, images })
        }
    }
}
