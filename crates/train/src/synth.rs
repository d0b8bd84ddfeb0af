//! A synthetic Korean visual-instruction dataset in the reference's format, for training
//! the bundled demo model from scratch (no pretrained weights or datasets can be fetched).
//!
//! Each image is a plain background with one to four shapes of one kind and colour. The
//! answers are short fixed sentences, so a small model can learn them exactly and
//! `kollava eval synth` can score by exact match. Stage 1 gets one caption per image,
//! stage 2 multi-turn questions, and the held-out split one question per record.

use std::path::Path;

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Side of every generated image, in pixels.
pub const IMAGE_SIZE: u32 = 64;

const KINDS: [&str; 4] = ["원", "사각형", "삼각형", "마름모"];
const COLOURS: [(&str, [u8; 3]); 6] = [
    ("빨간색", [220, 40, 40]),
    ("파란색", [40, 80, 220]),
    ("초록색", [40, 170, 60]),
    ("노란색", [240, 210, 40]),
    ("보라색", [140, 60, 190]),
    ("주황색", [245, 140, 30]),
];
const BACKGROUNDS: [(&str, [u8; 3]); 3] = [
    ("흰색", [255, 255, 255]),
    ("검은색", [20, 20, 20]),
    ("회색", [128, 128, 128]),
];
const COUNTS: [&str; 4] = ["한 개", "두 개", "세 개", "네 개"];
/// Positions of a single shape: name and centre.
const POSITIONS: [(&str, (i32, i32)); 5] = [
    ("왼쪽 위", (16, 16)),
    ("오른쪽 위", (48, 16)),
    ("왼쪽 아래", (16, 48)),
    ("오른쪽 아래", (48, 48)),
    ("가운데", (32, 32)),
];

/// What one image shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scene {
    pub kind: usize,
    pub colour: usize,
    pub background: usize,
    /// 1 to 4.
    pub count: usize,
    /// Only for a single shape: index into the positions and whether it is big.
    pub position: Option<usize>,
    pub big: bool,
    /// Centres and radius of the drawn shapes.
    shapes: Vec<(i32, i32)>,
    radius: i32,
}

/// The kinds of question the data asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Question {
    Kind,
    Count,
    Colour,
    Background,
    Position,
    Size,
    Describe,
}

impl Question {
    const ALL: [Question; 7] = [
        Question::Kind,
        Question::Count,
        Question::Colour,
        Question::Background,
        Question::Position,
        Question::Size,
        Question::Describe,
    ];

    fn phrasings(self) -> &'static [&'static str] {
        match self {
            Question::Kind => &[
                "이 그림에 있는 도형은 무엇인가요?",
                "어떤 도형이 보이나요?",
                "무슨 모양인가요?",
            ],
            Question::Count => &["도형이 몇 개 있나요?", "도형은 모두 몇 개인가요?"],
            Question::Colour => &["도형은 무슨 색인가요?", "도형의 색깔은 무엇인가요?"],
            Question::Background => &["배경은 무슨 색인가요?", "배경 색깔을 알려 주세요."],
            Question::Position => &["도형은 어디에 있나요?", "도형의 위치는 어디인가요?"],
            Question::Size => &["도형은 큰가요, 작은가요?", "도형의 크기는 어떤가요?"],
            Question::Describe => &["이 그림을 설명해 주세요.", "그림에 무엇이 있나요?"],
        }
    }

    fn applies(self, s: &Scene) -> bool {
        !matches!(self, Question::Position | Question::Size) || s.count == 1
    }
}

/// `이` after a final consonant, `가` after a vowel.
fn subject_particle(word: &str) -> &'static str {
    let last = word.chars().last().unwrap_or('가') as u32;
    if (0xAC00..=0xD7A3).contains(&last) && !(last - 0xAC00).is_multiple_of(28) {
        "이"
    } else {
        "가"
    }
}

impl Scene {
    fn random(rng: &mut StdRng) -> Scene {
        let kind = rng.random_range(0..KINDS.len());
        let colour = rng.random_range(0..COLOURS.len());
        let background = rng.random_range(0..BACKGROUNDS.len());
        let count = rng.random_range(1..=4);
        if count == 1 {
            let position = rng.random_range(0..POSITIONS.len());
            let big = rng.random_bool(0.5);
            let (cx, cy) = POSITIONS[position].1;
            let jitter = |rng: &mut StdRng| rng.random_range(-3..=3);
            let shapes = vec![(cx + jitter(rng), cy + jitter(rng))];
            let radius = if big { 13 } else { 8 };
            return Scene {
                kind,
                colour,
                background,
                count,
                position: Some(position),
                big,
                shapes,
                radius,
            };
        }
        // Several shapes in distinct quadrants, so they never touch and each is big enough
        // to recognise at 8-pixel patches.
        let mut cells: Vec<usize> = (0..4).collect();
        cells.shuffle(rng);
        let shapes = cells[..count]
            .iter()
            .map(|&c| {
                let (gx, gy) = ((c % 2) as i32, (c / 2) as i32);
                (
                    16 + gx * 32 + rng.random_range(-3..=3),
                    16 + gy * 32 + rng.random_range(-3..=3),
                )
            })
            .collect();
        Scene {
            kind,
            colour,
            background,
            count,
            position: None,
            big: false,
            shapes,
            radius: 10,
        }
    }

    fn inside(&self, dx: i32, dy: i32) -> bool {
        let r = self.radius;
        match self.kind {
            0 => dx * dx + dy * dy <= r * r,
            1 => dx.abs() <= r && dy.abs() <= r,
            // Apex up: the half-width grows from 0 at the top to r at the bottom.
            2 => dy >= -r && dy <= r && 2 * dx.abs() <= dy + r,
            _ => dx.abs() + dy.abs() <= r,
        }
    }

    /// The picture as RGB bytes, `IMAGE_SIZE` square.
    pub fn render(&self) -> image::RgbImage {
        let bg = BACKGROUNDS[self.background].1;
        let fg = COLOURS[self.colour].1;
        image::RgbImage::from_fn(IMAGE_SIZE, IMAGE_SIZE, |x, y| {
            let hit = self
                .shapes
                .iter()
                .any(|&(cx, cy)| self.inside(x as i32 - cx, y as i32 - cy));
            image::Rgb(if hit { fg } else { bg })
        })
    }

    /// The one correct answer to `q`.
    pub fn answer(&self, q: Question) -> String {
        let kind = KINDS[self.kind];
        let colour = COLOURS[self.colour].0;
        let bg = BACKGROUNDS[self.background].0;
        let count = COUNTS[self.count - 1];
        match q {
            Question::Kind => format!("{kind}입니다."),
            Question::Count => format!("{count} 있습니다."),
            Question::Colour => format!("{colour}입니다."),
            Question::Background => format!("{bg}입니다."),
            Question::Position => format!("{}에 있습니다.", self.position_name()),
            Question::Size => format!("{} 도형입니다.", self.size_name()),
            Question::Describe => {
                let p = subject_particle(kind);
                if self.count == 1 {
                    format!(
                        "{bg} 배경의 {}에 {} {colour} {kind}{p} 하나 있습니다.",
                        self.position_name(),
                        self.size_name()
                    )
                } else {
                    format!("{bg} 배경에 {colour} {kind}{p} {count} 있습니다.")
                }
            }
        }
    }

    fn position_name(&self) -> &'static str {
        self.position.map(|p| POSITIONS[p].0).unwrap_or("여러 곳")
    }

    fn size_name(&self) -> &'static str {
        if self.big {
            "큰"
        } else {
            "작은"
        }
    }
}

/// What `generate` wrote.
#[derive(Debug, Clone, Default)]
pub struct SynthSummary {
    pub images: usize,
    pub pretrain: usize,
    pub finetune: usize,
    pub test: usize,
}

/// Options for [`generate`].
#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub seed: u64,
    /// Training images (each gives one caption and one multi-turn conversation).
    pub count: usize,
    /// Held-out images; each gives one question per applicable kind.
    pub test_count: usize,
}

fn turn(from: &str, value: String) -> Value {
    json!({"from": from, "value": value})
}

fn write_json_atomically(path: &Path, v: &Value) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(v)?)?;
    std::fs::rename(&tmp, path)
}

/// Writes `images/*.png`, `pretrain.json` (captions), `finetune.json` (multi-turn Q&A) and
/// `test.json` (single questions on images never used for training) under `out`.
pub fn generate(out: &Path, opts: &SynthOptions) -> std::io::Result<SynthSummary> {
    let images = out.join("images");
    std::fs::create_dir_all(&images)?;
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut pretrain = Vec::new();
    let mut finetune = Vec::new();
    let mut test = Vec::new();
    let total = opts.count + opts.test_count;
    for i in 0..total {
        let scene = Scene::random(&mut rng);
        let file = format!("{:06}.png", i);
        let path = images.join(&file);
        let tmp = images.join(format!(".{file}.tmp"));
        scene
            .render()
            .save_with_format(&tmp, image::ImageFormat::Png)
            .map_err(std::io::Error::other)?;
        std::fs::rename(&tmp, &path)?;
        let ask = |q: Question, rng: &mut StdRng| {
            q.phrasings()
                .choose(rng)
                .copied()
                .unwrap_or_default()
                .to_string()
        };
        let applicable: Vec<Question> = Question::ALL
            .iter()
            .copied()
            .filter(|q| q.applies(&scene))
            .collect();
        if i < opts.count {
            let caption_q = ask(Question::Describe, &mut rng);
            pretrain.push(json!({
                "id": format!("synth-{i}-caption"), "image": file,
                "conversations": [turn("human", format!("<image>\n{caption_q}")),
                                  turn("gpt", scene.answer(Question::Describe))],
            }));
            let mut qs = applicable.clone();
            qs.shuffle(&mut rng);
            let turns = rng.random_range(2..=4).min(qs.len());
            let mut conv = Vec::new();
            for (k, &q) in qs[..turns].iter().enumerate() {
                let text = ask(q, &mut rng);
                let text = if k == 0 {
                    format!("<image>\n{text}")
                } else {
                    text
                };
                conv.push(turn("human", text));
                conv.push(turn("gpt", scene.answer(q)));
            }
            finetune
                .push(json!({"id": format!("synth-{i}"), "image": file, "conversations": conv}));
        } else {
            for q in applicable {
                test.push(json!({
                    "id": format!("synth-{i}-{q:?}").to_lowercase(), "image": file,
                    "conversations": [turn("human", format!("<image>\n{}", ask(q, &mut rng))),
                                      turn("gpt", scene.answer(q))],
                }));
            }
        }
    }
    let summary = SynthSummary {
        images: total,
        pretrain: pretrain.len(),
        finetune: finetune.len(),
        test: test.len(),
    };
    write_json_atomically(&out.join("pretrain.json"), &Value::Array(pretrain))?;
    write_json_atomically(&out.join("finetune.json"), &Value::Array(finetune))?;
    write_json_atomically(&out.join("test.json"), &Value::Array(test))?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn particles_follow_the_final_consonant() {
        assert_eq!(subject_particle("원"), "이");
        assert_eq!(subject_particle("사각형"), "이");
        assert_eq!(subject_particle("마름모"), "가");
    }

    #[test]
    fn shapes_are_drawn_in_their_colour_on_the_background() {
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..50 {
            let s = Scene::random(&mut rng);
            let img = s.render();
            let fg = COLOURS[s.colour].1;
            let bg = BACKGROUNDS[s.background].1;
            for &(cx, cy) in &s.shapes {
                assert_eq!(img.get_pixel(cx as u32, cy as u32).0, fg, "{s:?}");
            }
            assert_eq!(img.get_pixel(0, 0).0, bg);
            let painted = img.pixels().filter(|p| p.0 == fg).count();
            assert!(painted >= s.count * 20, "{painted} pixels for {s:?}");
        }
    }

    #[test]
    fn answers_describe_the_scene() {
        let s = Scene {
            kind: 3,
            colour: 0,
            background: 1,
            count: 1,
            position: Some(4),
            big: true,
            shapes: vec![(32, 32)],
            radius: 12,
        };
        assert_eq!(
            s.answer(Question::Describe),
            "검은색 배경의 가운데에 큰 빨간색 마름모가 하나 있습니다."
        );
        assert_eq!(s.answer(Question::Count), "한 개 있습니다.");
        assert!(!Question::Position.applies(&Scene {
            count: 2,
            ..s.clone()
        }));
    }

    #[test]
    fn the_same_seed_gives_the_same_data_and_test_images_are_unseen() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let opts = SynthOptions {
            seed: 5,
            count: 6,
            test_count: 3,
        };
        let sa = generate(a.path(), &opts).unwrap();
        generate(b.path(), &opts).unwrap();
        for f in ["pretrain.json", "finetune.json", "test.json"] {
            assert_eq!(
                std::fs::read(a.path().join(f)).unwrap(),
                std::fs::read(b.path().join(f)).unwrap()
            );
        }
        assert_eq!((sa.images, sa.pretrain, sa.finetune), (9, 6, 6));
        assert!(sa.test >= 3 * 5);
        let samples = crate::data::read_samples(&a.path().join("test.json")).unwrap();
        assert!(samples
            .iter()
            .all(|s| s.image.as_deref().unwrap() >= "000006.png"));
    }
}
