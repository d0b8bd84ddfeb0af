//! `kollava chat`: turns, the reused history, and quitting.

use std::ffi::OsStr;
use std::io::Write;
use std::path::Path;
use std::process::{Output, Stdio};

use crate::common::*;

/// `kollava ARGS` with `input` typed on stdin, then end of input.
fn kollava_with_stdin(args: &[&dyn AsRef<OsStr>], input: &str) -> Output {
    let mut child = command(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kollava starts");
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(input.as_bytes()).expect("write stdin");
    drop(stdin);
    child.wait_with_output().expect("kollava runs")
}

/// On every family (LLaVA-MPT's ChatML turns among them).
#[test]
fn chat_answers_each_message_and_quits_on_slash_exit() {
    for family in kollava_testkit::CHECKPOINTS {
        let dir = checkpoint(family);
        let input = format!(
            "/image {}\nHello\nWhat color?\n/reset\n/exit\n",
            image("wide_rgb.png").display()
        );
        let o = kollava_with_stdin(
            &[
                &"chat",
                &"--model",
                &dir,
                &"--temperature",
                &"0",
                &"--max-new-tokens",
                &"4",
            ],
            &input,
        );
        assert_success(&o);
        assert_eq!(
            stdout(&o).matches("ASSISTANT>").count(),
            2,
            "{family}: {}",
            stdout(&o)
        );
        assert!(!stderr(&o).contains("error:"), "{family}: {}", stderr(&o));
    }
}

/// A follow-up turn prefills only what it adds to the conversation (the cache holds the
/// image and the history), and a new image starts a new conversation as LLaVA's web UI
/// does: the bundled demo model then describes the new picture as it does alone, where
/// keeping both images in one context made it describe the first one's shapes. With
/// `--multi-image` both stay.
#[test]
fn chat_reuses_the_history_and_a_new_image_starts_a_new_conversation() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let (shapes, one) = (
        root.join("examples/shapes.png"),
        root.join("examples/one-shape.png"),
    );
    let q = "이 그림을 설명해 주세요.";
    let alone = kollava(&[
        &"run",
        &"--image",
        &one,
        &"--query",
        &q,
        &"--temperature",
        &"0",
    ]);
    assert_success(&alone);
    let alone = stdout(&alone).trim().to_string();
    let input = format!(
        "/image {}\n{q}\n도형은 몇 개인가요?\n/image {}\n{q}\n",
        shapes.display(),
        one.display()
    );
    let chat = |extra: &[&dyn AsRef<OsStr>]| {
        let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"chat", &"--temperature", &"0", &"--stats"];
        args.extend_from_slice(extra);
        let o = kollava_with_stdin(&args, &input);
        assert_success(&o);
        o
    };
    let o = chat(&[]);
    let (out, err) = (stdout(&o), stderr(&o));
    let answers: Vec<&str> = out
        .split("ASSISTANT> ")
        .skip(1)
        .map(|a| a.split("USER>").next().unwrap().trim())
        .collect();
    assert_eq!(answers.len(), 3, "{out}");
    assert_eq!(answers[2], alone, "{out}\n{err}");
    assert!(err.contains("new conversation"), "{err}");
    // "[prompt N tokens: C from the cache, P prefilled; ...]" per turn.
    let stats: Vec<(usize, usize, usize)> = err
        .lines()
        .filter_map(|l| l.strip_prefix("[prompt "))
        .map(|l| {
            let n: Vec<usize> = l
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|w| w.parse().ok())
                .collect();
            (n[0], n[1], n[2])
        })
        .collect();
    assert_eq!(stats.len(), 3, "{err}");
    let (first, second) = (stats[0], stats[1]);
    assert_eq!(first.1, 0, "turn 1 is cold: {err}");
    assert_eq!(second.1 + second.2, second.0);
    // Turn 2 prefills what it adds (its question, the template around it and, when it is
    // too short to be kept alone, the answer before it), never the first prompt (image
    // included) again. The exact count is checked in eval's prefix_reuse tests.
    assert!(second.1 > first.0 / 2, "{err}");
    assert!(second.2 < first.0 / 2, "{err}");

    let o = chat(&[&"--multi-image"]);
    assert!(!stderr(&o).contains("new conversation"), "{}", stderr(&o));
    assert_eq!(stdout(&o).matches("ASSISTANT>").count(), 3);
}

#[test]
fn chat_quits_cleanly_on_end_of_input() {
    let dir = checkpoint("llava-v1.5");
    let args: [&dyn AsRef<OsStr>; 5] = [&"chat", &"--model", &dir, &"--max-new-tokens", &"4"];
    assert_success(&kollava(&args));
    // Ctrl-D in the middle of a conversation.
    let o = kollava_with_stdin(&args, "Hello\n");
    assert_success(&o);
    assert_eq!(
        stdout(&o).matches("ASSISTANT>").count(),
        1,
        "{}",
        stdout(&o)
    );
}
