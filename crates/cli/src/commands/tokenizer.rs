//! `kollava tokenizer train`: a BPE vocabulary learned from training data, rendered with the
//! conversation template the model will be trained with.

use anyhow::{Context, Result};
use kollava_inputs::template::Conversation;

use crate::args::TokenizerTrainArgs;

pub fn train(args: &TokenizerTrainArgs) -> Result<()> {
    let template = crate::pipeline::template(&args.template, "--template")?;
    let mut texts = Vec::new();
    for f in &args.data {
        for s in kollava_train::data::read_samples(f)? {
            let mut conv = Conversation::new(template.clone());
            for (role, text) in &s.turns {
                conv.push(*role, Some(text.replace("<image>", "")));
            }
            // Special tokens are cut out before the vocabulary applies: train on what is
            // between them.
            texts.extend(
                conv.prompt()
                    .split("</s>")
                    .filter(|t| !t.is_empty())
                    .map(str::to_string),
            );
        }
    }
    let n =
        kollava_inputs::tokenizer::train::train_bpe(&texts, args.vocab_size as usize, &args.out)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("cannot train a tokenizer into {}", args.out.display()))?;
    eprintln!(
        "trained a {n}-token vocabulary on {} conversations; wrote {}",
        texts.len(),
        args.out.display()
    );
    Ok(())
}
