//! Reuse across requests and turns (the prefix and image caches) answers as a cold run does:
//! bit for bit where the reused rows come from a prefill in f32, the same greedy tokens on
//! every family otherwise (answers reused by the next turn, 16-bit caches, GGUF models).

mod common;

use candle_core::{DType, Tensor};
use kollava_generate::{
    Answer, AnswerOptions, PosKey, PrefixCache, SamplingParams, Session, SessionOptions,
};
use kollava_inputs::image::RgbImage;
use kollava_inputs::template::{Conversation, Role};
use kollava_model::KvCache;

/// Positions a prompt prefills however much of it is stored.
fn fresh(s: &Session) -> usize {
    kollava_generate::engine::fresh_positions(&s.model)
}
const FAMILIES: [&str; 5] = [
    "llava-v0",
    "llava-v1.5",
    "llava-hf",
    "llava-mistral",
    "llava-mpt",
];

fn session_at(model: &str, dtype: Option<DType>, cache: bool) -> Session {
    let budget = if cache { None } else { Some(0) };
    let mut s = Session::load(&SessionOptions {
        model: model.to_string(),
        dtype,
        prefix_cache_bytes: budget,
        image_cache_bytes: budget,
        ..Default::default()
    })
    .unwrap();
    // As `kollava chat` does.
    s.keep_answers = cache;
    s
}

fn session(family: &str, cache: bool) -> Session {
    let dir = kollava_testkit::checkpoint_dir(family);
    session_at(dir.to_str().unwrap(), Some(DType::F32), cache)
}

fn image(name: &str) -> RgbImage {
    kollava_inputs::image::open(&kollava_testkit::fixtures_dir().join("images").join(name)).unwrap()
}

fn greedy(tokens: usize) -> AnswerOptions {
    AnswerOptions {
        sampling: SamplingParams::greedy(),
        max_new_tokens: tokens,
        stop: Vec::new(),
        aspect: None,
        constraint: None,
    }
}

/// A conversation turn by turn, as `kollava chat` runs it: the image with the first
/// question, the answers kept in the history.
fn converse(s: &Session, img: &RgbImage, questions: &[&str], tokens: usize) -> Vec<Answer> {
    let mut conv = Conversation::new(s.template.clone());
    let mut answers = Vec::new();
    for (i, q) in questions.iter().enumerate() {
        let text = if i == 0 {
            s.user_text(q, 1)
        } else {
            q.to_string()
        };
        conv.push(Role::User, Some(text));
        conv.push(Role::Assistant, None);
        let a = s
            .answer(
                &conv,
                std::slice::from_ref(img),
                &greedy(tokens),
                &mut |_| true,
            )
            .unwrap();
        conv.messages.pop();
        conv.push(Role::Assistant, Some(a.generation.text.clone()));
        answers.push(a);
    }
    answers
}

const QUESTIONS: [&str; 3] = [
    "이 그림을 자세히 설명해 주세요.",
    "What colors are there?",
    "몇 개의 도형이 있나요? Answer in one sentence.",
];

fn last_logits(s: &Session, hidden: &Tensor) -> Vec<u32> {
    let n = hidden.dim(1).unwrap();
    s.model
        .decoder
        .logits(&hidden.narrow(1, n - 1, 1).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// A long follow-up: what prompt B prefills after A covers any model's fresh positions.
const LONG_FOLLOW_UP: &str = "Please describe every shape in the picture: its colour, its size \
    compared with the others, and where it is. 그림 속 도형을 하나하나 모양과 색깔, 크기, 위치까지 \
    자세히 설명해 주세요. Then say which one you noticed first and why.";

/// The path `Batch::join_prompt` takes, step by step: prompt A prefilled and stored; prompt
/// B (A's conversation one answer and question later) loads what it shares with A and
/// prefills the rest. B's last logits equal a cold prefill of B bit for bit.
fn assert_reuse_is_exact(s: &Session, what: &str) {
    let img = image("wide_rgb.png");
    let embed = |follow_up: bool| {
        let mut conv = Conversation::new(s.template.clone());
        conv.push(Role::User, Some(s.user_text("What is in this picture?", 1)));
        if follow_up {
            conv.push(
                Role::Assistant,
                Some("Some shapes on a plain background.".into()),
            );
            conv.push(Role::User, Some(LONG_FOLLOW_UP.into()));
        }
        conv.push(Role::Assistant, None);
        s.embed_prompt(
            &conv.prompt(),
            std::slice::from_ref(&img),
            &mut Default::default(),
        )
        .unwrap()
    };
    let (a, b) = (embed(false), embed(true));
    let store = PrefixCache::new(64 << 20);
    let mut cache = s.model.decoder.new_cache(1);
    s.model
        .decoder
        .forward(&a.embeds, &[a.tokens], &mut cache)
        .unwrap();
    store
        .insert(&a.keys, |r| cache.row_positions(0, r))
        .unwrap();

    let reuse = store.lookup(&b.keys, b.tokens - fresh(s));
    let shared = a
        .keys
        .iter()
        .zip(&b.keys)
        .take_while(|(x, y)| x == y)
        .count();
    assert_eq!(reuse.tokens, shared.min(b.tokens - fresh(s)), "{what}");
    assert!(reuse.tokens > s.scheme.n(), "{what}: the image is reused");
    let mut warm: KvCache = s.model.decoder.new_cache(1);
    warm.load_prefix(&reuse.layers().unwrap()).unwrap();
    let rest = b.tokens - reuse.tokens;
    let hidden = s
        .model
        .decoder
        .forward(
            &b.embeds.narrow(1, reuse.tokens, rest).unwrap(),
            &[rest],
            &mut warm,
        )
        .unwrap();
    let mut cold = s.model.decoder.new_cache(1);
    let cold_hidden = s
        .model
        .decoder
        .forward(&b.embeds, &[b.tokens], &mut cold)
        .unwrap();
    assert!(
        last_logits(s, &hidden) == last_logits(s, &cold_hidden),
        "{what}: logits after a reused prefix differ from a cold prefill"
    );
}

/// Every family (Mistral's prompt runs past its window of 40) in every weight dtype: f32,
/// f16 matrices, and bf16 (our bf16 kernels, keys and values kept in f16).
#[test]
fn a_prefix_reused_from_a_prefill_gives_the_cold_logits_bit_for_bit() {
    for family in FAMILIES {
        let dir = kollava_testkit::checkpoint_dir(family);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let s = session_at(dir.to_str().unwrap(), Some(dtype), false);
            assert_reuse_is_exact(&s, &format!("{family} {dtype:?}"));
        }
    }
}

/// The same for a GGUF model: quantized matrices, keys and values kept in f16.
#[test]
fn a_gguf_models_reused_prefix_gives_the_cold_logits_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let model = gguf(dir.path());
    assert_reuse_is_exact(&session_at(&model, None, false), "llava-v1.5 q8_0 GGUF");
}

/// llava-v1.5 as a `Q8_0` GGUF pair under `dir`; returns the model path.
fn gguf(dir: &std::path::Path) -> String {
    common::q8_gguf(dir).1.to_str().unwrap().to_string()
}

/// Three turns with every cache on answer the same tokens as three cold runs, on every
/// family; each follow-up prefills only what it does not share with the turn before (its
/// prompt and the part of its answer that was fed back), counted here.
#[test]
fn follow_up_turns_reuse_the_history_and_answer_as_cold_runs() {
    for family in FAMILIES {
        let (warm, cold) = (session(family, true), session(family, false));
        let img = image("wide_rgb.png");
        let got = converse(&warm, &img, &QUESTIONS, 12);
        let want = converse(&cold, &img, &QUESTIONS, 12);
        for (t, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.generation.ids,
                w.generation.ids,
                "{family} turn {}",
                t + 1
            );
            assert_eq!(
                w.generation.cached_tokens, 0,
                "the cold session reuses nothing"
            );
        }
        assert_eq!(
            got[0].generation.cached_tokens, 0,
            "{family}: turn 1 is cold"
        );
        // What turn t+1 shares with turn t's prompt and answer as the cache holds them.
        let mut conv = Conversation::new(warm.template.clone());
        let mut previous: Option<Vec<PosKey>> = None;
        for (t, (q, a)) in QUESTIONS.iter().zip(&got).enumerate() {
            let text = if t == 0 {
                warm.user_text(q, 1)
            } else {
                q.to_string()
            };
            conv.push(Role::User, Some(text));
            conv.push(Role::Assistant, None);
            let e = warm
                .embed_prompt(
                    &conv.prompt(),
                    std::slice::from_ref(&img),
                    &mut Default::default(),
                )
                .unwrap();
            if let Some(prev) = &previous {
                let shared = prev.iter().zip(&e.keys).take_while(|(x, y)| x == y).count();
                assert_eq!(
                    a.generation.cached_tokens,
                    shared.min(e.tokens - fresh(&warm)),
                    "{family} turn {}: prefilled {} of {} positions",
                    t + 1,
                    e.tokens - a.generation.cached_tokens,
                    e.tokens
                );
                assert!(shared > e.tokens / 2, "{family} turn {}", t + 1);
            }
            // The prompt, and the answer after it (prefilled with the template text before
            // it when it is shorter than a step the store keeps).
            let mut held = e.keys.clone();
            held.extend(a.generation.ids.iter().map(|&id| PosKey::Token(id)));
            previous = Some(held);
            conv.messages.pop();
            conv.push(Role::Assistant, Some(a.generation.text.clone()));
        }
    }
}

/// A GGUF model (quantized matrices, tower in bf16 where the kernels run, keys and values
/// kept in f16) answers follow-ups with reuse as it does cold.
#[test]
fn a_gguf_model_answers_follow_ups_as_cold_runs() {
    let dir = tempfile::tempdir().unwrap();
    let model = gguf(dir.path());
    let model = model.as_str();
    let (warm, cold) = (
        session_at(model, None, true),
        session_at(model, None, false),
    );
    let img = image("tall_rgb.png");
    let got = converse(&warm, &img, &QUESTIONS, 12);
    let want = converse(&cold, &img, &QUESTIONS, 12);
    for (t, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.generation.ids, w.generation.ids, "turn {}", t + 1);
    }
    assert!(got[1].generation.cached_tokens > 0 && got[2].generation.cached_tokens > 0);
}

/// Two pictures that differ in one pixel share neither features nor the positions from
/// the first image row on; the same picture decoded again shares both.
#[test]
fn images_differing_in_one_pixel_never_share_what_was_computed() {
    let s = session("llava-v1.5", true);
    let a = image("square_rgb.png");
    let mut b = a.clone();
    b.data[3 * (b.width as usize * 20 + 20)] ^= 0xff;
    let ask = |img: &RgbImage| {
        let mut conv = Conversation::new(s.template.clone());
        conv.push(Role::User, Some(s.user_text("What is this?", 1)));
        conv.push(Role::Assistant, None);
        s.answer(&conv, std::slice::from_ref(img), &greedy(4), &mut |_| true)
            .unwrap()
    };
    let first = ask(&a);
    assert_eq!(first.generation.cached_tokens, 0);
    let other = ask(&b);
    let f = s.feature_cache.stats();
    assert_eq!((f.hits, f.misses), (0, 2), "b's features were computed");
    // The prompt's text before the image is shared, nothing from the image on.
    let mut conv = Conversation::new(s.template.clone());
    conv.push(Role::User, Some(s.user_text("What is this?", 1)));
    conv.push(Role::Assistant, None);
    let cold = session("llava-v1.5", false);
    let e = cold
        .embed_prompt(
            &conv.prompt(),
            std::slice::from_ref(&a),
            &mut Default::default(),
        )
        .unwrap();
    let image_at = e
        .keys
        .iter()
        .position(|k| matches!(k, PosKey::Image { .. }))
        .unwrap();
    assert!(other.generation.cached_tokens <= image_at);
    let mut conv = Conversation::new(cold.template.clone());
    conv.push(Role::User, Some(cold.user_text("What is this?", 1)));
    conv.push(Role::Assistant, None);
    let want = cold
        .answer(&conv, std::slice::from_ref(&b), &greedy(4), &mut |_| true)
        .unwrap();
    assert_eq!(other.generation.ids, want.generation.ids);
    // The same picture again: features from the cache, every position but the last two
    // reused.
    let again = ask(&a.clone());
    assert_eq!(s.feature_cache.stats().hits, 1);
    assert_eq!(
        again.generation.cached_tokens,
        again.prompt_tokens - fresh(&s)
    );
    assert_eq!(again.generation.ids, first.generation.ids);
}

/// Requests decoded together in one batch, sharing a system prompt and an image: the later
/// ones reuse what the first one's prefill stored while it is still running, and every
/// answer equals the same request answered cold and alone.
#[test]
fn concurrent_requests_share_a_prefix_and_answer_as_alone() {
    let (warm, cold) = (session("llava-hf", true), session("llava-hf", false));
    let img = image("tall_rgb.png");
    // Long enough that what each prompt prefills after the shared part covers the model's
    // fresh positions.
    let questions = [
        "Describe the picture in detail, with every shape and colour you can see in it.",
        "What colors are there in this picture, and which of them covers the most area?",
        "이 그림에 무엇이 있나요? 도형의 모양과 색깔, 위치를 하나하나 자세히 설명해 주세요.",
    ];
    let prompt = |s: &Session, q: &str| {
        let mut conv = Conversation::new(s.template.clone());
        conv.push(Role::User, Some(s.user_text(q, 1)));
        conv.push(Role::Assistant, None);
        conv.prompt()
    };
    let opts = greedy(10);
    let mut batch = warm.batch::<usize>();
    let mut got: Vec<Option<kollava_generate::Generation>> = vec![None; questions.len()];
    let mut cached = Vec::new();
    for (i, q) in questions.iter().enumerate() {
        let (e, g) = warm
            .prepare(
                &prompt(&warm, q),
                std::slice::from_ref(&img),
                &opts,
                &mut Default::default(),
            )
            .unwrap();
        if let Some(f) = batch
            .join_prompt(&warm.model, &warm.tok, e.prompt(), &g, |_| true, i)
            .unwrap()
        {
            got[f.tag] = Some(f.generation);
        }
        // One step between arrivals: the first request is still running.
        for f in batch.step(&warm.model, &warm.tok).unwrap() {
            got[f.tag] = Some(f.generation);
        }
        assert!(i == 0 || !batch.is_empty());
    }
    while !batch.is_empty() {
        for f in batch.step(&warm.model, &warm.tok).unwrap() {
            got[f.tag] = Some(f.generation);
        }
    }
    for (i, q) in questions.iter().enumerate() {
        let g = got[i].take().unwrap();
        cached.push(g.cached_tokens);
        let want = cold
            .answer_prompt(
                &prompt(&cold, q),
                std::slice::from_ref(&img),
                &opts,
                &mut |_| true,
            )
            .unwrap();
        assert_eq!(g.ids, want.generation.ids, "request {i}");
    }
    assert_eq!(cached[0], 0);
    assert!(
        cached[1] > warm.scheme.n() && cached[2] > warm.scheme.n(),
        "the image and the text before it are shared: {cached:?}"
    );
}

/// However many conversations come and go, the store stays under its budget.
#[test]
fn a_small_budget_is_never_exceeded() {
    let dir = kollava_testkit::checkpoint_dir("llava-v0");
    let s = Session::load(&SessionOptions {
        model: dir.to_str().unwrap().to_string(),
        dtype: Some(DType::F32),
        prefix_cache_bytes: Some(40 << 10),
        image_cache_bytes: Some(1 << 10),
        ..Default::default()
    })
    .unwrap();
    let img = image("photo.jpg");
    for q in ["One?", "Two shapes?", "세 번째 질문입니다.", "Four", "다섯"] {
        converse(&s, &img, &[q, "And then?"], 6);
        let p = s.prefix_cache.stats();
        assert!(p.bytes <= 40 << 10, "{} bytes held", p.bytes);
        assert!(s.feature_cache.stats().bytes <= 1 << 10);
    }
    assert!(s.prefix_cache.stats().evictions > 0);
}
