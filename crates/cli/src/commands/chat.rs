//! `kollava chat`: multi-turn chat in the terminal. Follows the template's history like
//! LLaVA's CLI; `/image PATH` attaches an image to the next message (any turn), text-only
//! follow-ups reuse the images already in the conversation. A new image in a conversation
//! that has one starts a new conversation (LLaVA's web UI does the same: its models are
//! trained on one image per conversation) unless `--multi-image` keeps both.
//!
//! Every turn goes through the session's prefix cache, so a follow-up prefills only what
//! is new since the previous turn (its own message and the template text around it); the
//! image and the history are not computed again.

use std::io::{BufRead, Write};

use anyhow::Result;
use kollava_inputs::image::RgbImage;
use kollava_inputs::template::{Conversation, Role};

use crate::args::ChatArgs;
use kollava_generate::Session;

use crate::pipeline;

/// One line of user input, parsed.
#[derive(Debug, PartialEq, Eq)]
enum Input {
    Message(String),
    Image(String),
    Reset,
    Exit,
    Empty,
}

fn parse(line: &str) -> Input {
    let t = line.trim();
    match t {
        "" => Input::Empty,
        "/exit" | "/quit" => Input::Exit,
        "/reset" => Input::Reset,
        _ => match t.strip_prefix("/image") {
            Some(rest) if rest.is_empty() || rest.starts_with(char::is_whitespace) => {
                Input::Image(rest.trim().to_string())
            }
            _ => Input::Message(t.to_string()),
        },
    }
}

struct State {
    conv: Conversation,
    images: Vec<RgbImage>,
    pending: Option<RgbImage>,
}

impl State {
    fn new(loaded: &Session) -> Self {
        Self {
            conv: Conversation::new(loaded.template.clone()),
            images: Vec::new(),
            pending: None,
        }
    }
}

pub fn run(args: &ChatArgs) -> Result<()> {
    let first_image = args
        .image
        .as_deref()
        .map(pipeline::read_image)
        .transpose()?;
    let mut loaded = pipeline::load(&args.model)?;
    // The next turn prefills only its own text.
    loaded.keep_answers = true;
    let opts = pipeline::answer_options(&args.sampling)?;
    let mut state = State::new(&loaded);
    state.pending = first_image.clone();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    eprintln!(
        "kollava chat — {} ({}, template {}). /image PATH, /reset, /exit or Ctrl-D. 종료: /exit 또는 Ctrl-D",
        loaded.ckpt.name,
        loaded.ckpt.family.name(),
        loaded.template.name
    );
    loop {
        write!(out, "USER> ")?;
        out.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            writeln!(out)?;
            return Ok(());
        }
        match parse(&line) {
            Input::Empty => continue,
            Input::Exit => return Ok(()),
            Input::Reset => {
                state = State::new(&loaded);
                state.pending = first_image.clone();
                eprintln!("(conversation reset / 대화 초기화)");
            }
            Input::Image(path) if path.is_empty() => eprintln!("usage: /image PATH"),
            Input::Image(path) => match pipeline::read_image(&path) {
                Ok(img) => {
                    eprintln!(
                        "(image attached to your next message: {}x{})",
                        img.width, img.height
                    );
                    state.pending = Some(img);
                }
                Err(e) => eprintln!("error: {e:#}"),
            },
            Input::Message(text) => {
                let with_image = state.pending.is_some();
                if with_image && !state.images.is_empty() && !args.multi_image {
                    state.conv = Conversation::new(loaded.template.clone());
                    state.images.clear();
                    eprintln!(
                        "(a new image starts a new conversation, as LLaVA's web UI does; \
                         --multi-image keeps earlier images / 새 이미지로 새 대화를 시작합니다)"
                    );
                }
                state.conv.push(
                    Role::User,
                    Some(loaded.user_text(&text, usize::from(with_image))),
                );
                state.conv.push(Role::Assistant, None);
                if let Some(img) = state.pending.take() {
                    state.images.push(img);
                }
                write!(out, "ASSISTANT> ")?;
                out.flush()?;
                let result = loaded.answer(&state.conv, &state.images, &opts, &mut |piece| {
                    out.write_all(piece.as_bytes())
                        .and_then(|_| out.flush())
                        .is_ok()
                });
                writeln!(out)?;
                // Replace the pending `None` with the answer (or drop the turn on error).
                state.conv.messages.pop();
                match result {
                    Ok(answer) => {
                        if args.stats {
                            let t = &answer.timings;
                            let cached = answer.generation.cached_tokens;
                            eprintln!(
                                "[prompt {} tokens: {} from the cache, {} prefilled; first token {:.0} ms]",
                                answer.prompt_tokens,
                                cached,
                                answer.prompt_tokens - cached,
                                t.preprocess_ms + t.vision_ms + t.prefill_ms
                            );
                        }
                        state
                            .conv
                            .push(Role::Assistant, Some(answer.generation.text))
                    }
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        state.conv.messages.pop();
                        if with_image {
                            state.pending = state.images.pop();
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_recognised_and_text_is_kept() {
        assert_eq!(parse("/image cat.png\n"), Input::Image("cat.png".into()));
        assert_eq!(parse("/reset"), Input::Reset);
        assert_eq!(parse("  /exit "), Input::Exit);
        assert_eq!(
            parse("/imagery is nice"),
            Input::Message("/imagery is nice".into())
        );
        assert_eq!(
            parse("고양이는 몇 마리인가요?"),
            Input::Message("고양이는 몇 마리인가요?".into())
        );
        assert_eq!(parse("\n"), Input::Empty);
    }
}
