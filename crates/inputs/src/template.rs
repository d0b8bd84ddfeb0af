//! Conversation templates: the system prompts, role names and separators that LLaVA and
//! KoLLaVA checkpoints were trained and served with, and the assembly of a list of turns into
//! one prompt string (llava-spec §4).
//!
//! This module owns template *text*, prompt *assembly* (§4.1) and the rule tables that pick a
//! template from a checkpoint name (§4.4). It does not place or expand images: callers write the
//! literal `<image>` into the user text where the reference puts it, and `prompt.rs` turns the
//! string into ids. The one exception is [`SepStyle::Plain`], whose user turn *is* the image
//! placeholder. It does not tokenize and it does not detect a checkpoint's family; `checkpoint`
//! does that and then asks for a template by name.
//!
//! Two reference revisions are ported, because checkpoints from both are in use:
//! - fork-June, `tabtoyou/KoLLaVA:llava/conversation.py@ae472b3` (= `haotian-liu/LLaVA@3c3d89b`,
//!   spec §4.2), which KoLLaVA-KoVicuna-7b was released with;
//! - fork-HEAD, `tabtoyou/KoLLaVA:llava/conversation.py@0e70c78` (upstream v1.x plus the Korean
//!   `mistral` template, spec §4.3), which LLaVA-1.5 and KoLLaVA-v1.5-Synatra are served with.
//!
//! Where both revisions register one key with different text, [`Template::by_name`] says which
//! one wins and under which name the other stays reachable.
//!
//! Template strings are training data, so they are reproduced byte for byte, including
//! upstream's missing spaces after periods and the double space in `"Hi there!  How…"`.
//! Do not tidy them.

use std::sync::OnceLock;

/// How turns are joined (spec §4.1). Each style is a different surface form the model saw in
/// training; none is interchangeable with another even when the words match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SepStyle {
    /// `system + sep`, then `role + ": " + text + sep` per turn, `role + ":"` for a pending one.
    Single,
    /// As [`SepStyle::Single`], but even turns end with `sep` and odd turns with `sep2`
    /// (the Vicuna v1.1 form). kollava quirk: an empty system prompt also drops the leading
    /// `sep`. Upstream would emit a lone `" "` there, but no upstream `Two` template has an empty
    /// system, and the rule gives llava-hf's prompt (`USER: …`) exactly.
    Two,
    /// ChatML: the roles carry `<|im_start|>…\n`, so there is no `": "`; each turn ends in `sep`.
    Mpt,
    /// Projector pretraining (`preprocess_plain`): the user turn is only the image placeholder
    /// (its question text is dropped), the assistant turn is the caption followed by `sep`.
    Plain,
    /// Llama-2 chat: `[INST] … [/INST]` around user turns, system wrapped in `<<SYS>>` inside
    /// the first one; then upstream strips leading characters found in `sep` (a character-set
    /// `lstrip`, reproduced as such).
    Llama2,
}

/// Who speaks a turn. Rendered through [`Template::roles`], never as a fixed word, because the
/// role names are part of the trained surface form (`Human`, `USER`, `<|im_start|>user\n`, …).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

/// One conversation template, as upstream's `Conversation` object before any turn is added.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    /// The registry key it was looked up by (aliases keep their own key).
    pub name: &'static str,
    pub system: String,
    /// `[user, assistant]`.
    pub roles: [String; 2],
    pub style: SepStyle,
    pub sep: String,
    /// Empty when upstream has `None`.
    pub sep2: String,
    /// Turns upstream pre-fills and hides from the UI (its `offset`); they are part of the
    /// prompt the model sees.
    pub few_shot: Vec<(Role, String)>,
}

/// One registry row: key, system, roles, style, sep, sep2, few-shot turns.
type Row = (
    &'static str,
    &'static str,
    [&'static str; 2],
    SepStyle,
    &'static str,
    &'static str,
    &'static [(Role, &'static str)],
);

const CURIOUS_HUMAN: &str = "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.";
const CURIOUS_USER: &str = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.";
const LLAVA_UW: &str = "You are LLaVA, a large language and vision assistant trained by UW Madison WAIV Lab.You are able to understand the visual content that the user provides, and assist the user with a variety of tasks using natural language.Follow the instructions carefully and explain your answers in detail.";
const LLAVA_LEGACY: &str = "You are LLaVA, a large language model trained by UW Madison WAIV Lab.You are designed to assist human with a variety of tasks using natural language.Follow the instructions carefully.";
const MMTAG: &str = "A chat between a curious user and an artificial intelligence assistant. The assistant is able to understand the visual content that the user provides, and assist the user with a variety of tasks using natural language.The visual content will be provided with the following format: <Image>visual content</Image>.";
const LLAMA_2_META: &str = "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question does not make any sense, or is not factually coherent, explain why instead of answering something not correct. If you don't know the answer to a question, please don't share false information.";
const LLAVA_LLAMA_2: &str = "You are a helpful language and vision assistant. You are able to understand the visual content that the user provides, and assist the user with a variety of tasks using natural language.";
/// fork-Aug (`tabtoyou/KoLLaVA@2f962e9`) text, reverted in `@c74b3cd`; KoLLaVA-LLaMA-v2 was
/// trained with it.
const LLAVA_LLAMA_2_KO: &str = "You are a helpful language and vision assistant. You are able to understand the visual content that the user provides, and assist the user with a variety of tasks using natural language in korean.";
const MISTRAL_KO: &str = "당신은 유용한 언어 및 시각 도우미입니다. 사용자가 제공하는 시각적 콘텐츠를 이해할 수 있으며, 자연어를 사용하여 사용자에게 다양한 작업을 지원합니다.";
const MPT_JUNE: &str = "<|im_start|>system\n- You are a helpful language and vision assistant.\n- You are able to understand the visual content that the user provides, and assist the user with a variety of tasks using natural language.\n- You should follow the instructions carefully and explain your answers in detail.";
const MPT_TEXT: &str = "<|im_start|>system\n- You are a helpful assistant chatbot trained by MosaicML.\n- You answer questions.\n- You are excited to be able to help the user, but will refuse to do anything that could be considered harmful to the user.\n- You are more than just an information source, you are also able to write poetry, short stories, and make jokes.";
const MPT_MULTIMODAL: &str = "<|im_start|>system\n- You are LLaVA, a large language and vision assistant trained by UW Madison WAIV Lab.\n- You are able to understand the visual content that the user provides, and assist the user with a variety of tasks using natural language.\n- You should follow the instructions carefully and explain your answers in detail.";
const MPT_HEAD: &str = "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers.";

const RENEWABLE_Q: &str =
    "What are the key differences between renewable and non-renewable energy sources?";
const RENEWABLE_A: &str = "Renewable energy sources are those that can be replenished naturally in a relatively short amount of time, such as solar, wind, hydro, geothermal, and biomass. Non-renewable energy sources, on the other hand, are finite and will eventually be depleted, such as coal, oil, and natural gas. Here are some key differences between renewable and non-renewable energy sources:\n\
1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable energy sources are finite and will eventually run out.\n\
2. Environmental impact: Renewable energy sources have a much lower environmental impact than non-renewable sources, which can lead to air and water pollution, greenhouse gas emissions, and other negative effects.\n\
3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically have lower operational costs than non-renewable sources.\n\
4. Reliability: Renewable energy sources are often more reliable and can be used in more remote locations than non-renewable sources.\n\
5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different situations and needs, while non-renewable sources are more rigid and inflexible.\n\
6. Sustainability: Renewable energy sources are more sustainable over the long term, while non-renewable sources are not, and their depletion can lead to economic and social instability.\n";

const HUMAN: [&str; 2] = ["Human", "Assistant"];
const USER: [&str; 2] = ["USER", "ASSISTANT"];
const CHATML: [&str; 2] = ["<|im_start|>user\n", "<|im_start|>assistant\n"];

const RENEWABLE: &[(Role, &str)] = &[(Role::User, RENEWABLE_Q), (Role::Assistant, RENEWABLE_A)];
const HI: &[(Role, &str)] = &[
    (Role::User, "Hi!"),
    (Role::Assistant, "Hi there! How can I help you today?"),
];
const HI_MULTIMODAL: &[(Role, &str)] = &[
    (Role::User, "Hi!"),
    (Role::Assistant, "Hi there!  How can I help you today?\n"),
];
const HI_LEGACY: &[(Role, &str)] = &[
    (Role::User, "Hi!\n\n### Response:"),
    (Role::Assistant, "Hi there!  How can I help you today?\n"),
];

/// The registry: fork-June keys, then fork-HEAD keys, then kollava's own. `default`, `v1` and
/// `v0` are June's `conv_v1_2`, which HEAD keeps verbatim as `conv_vicuna_v0`.
#[rustfmt::skip] // one aligned row per key, like the spec's tables
const TEMPLATES: &[Row] = &[
    // fork-June, llava/conversation.py@ae472b3 (spec §4.2).
    ("default",          CURIOUS_HUMAN, HUMAN, SepStyle::Single, "###", "", RENEWABLE),
    ("v1",               CURIOUS_HUMAN, HUMAN, SepStyle::Single, "###", "", RENEWABLE),
    ("simple",           CURIOUS_HUMAN, HUMAN, SepStyle::Single, "###", "", HI),
    ("multimodal",       LLAVA_UW, HUMAN, SepStyle::Single, "###", "", HI_MULTIMODAL),
    ("simple_legacy",    LLAVA_LEGACY, HUMAN, SepStyle::Single, "###", "", HI_LEGACY),
    ("llava_v1_june",    LLAVA_UW, USER, SepStyle::Two, " ", "</s>", &[]),
    ("vicuna_v1_1",      CURIOUS_USER, USER, SepStyle::Two, " ", "</s>", &[]),
    ("bair_v1",          "BEGINNING OF CONVERSATION:", ["USER", "GPT"], SepStyle::Two, " ", "</s>", &[]),
    ("mpt_june",         MPT_JUNE, CHATML, SepStyle::Mpt, "<|im_end|>", "", &[]),
    ("mpt_text",         MPT_TEXT, CHATML, SepStyle::Mpt, "<|im_end|>", "", &[]),
    ("mpt_multimodal",   MPT_MULTIMODAL, CHATML, SepStyle::Mpt, "<|im_end|>", "", &[]),
    // fork-HEAD, llava/conversation.py@0e70c78 (spec §4.3).
    ("v0",               CURIOUS_HUMAN, HUMAN, SepStyle::Single, "###", "", RENEWABLE),
    ("vicuna_v1",        CURIOUS_USER, USER, SepStyle::Two, " ", "</s>", &[]),
    ("llama_2",          LLAMA_2_META, USER, SepStyle::Llama2, "<s>", "</s>", &[]),
    ("llava_llama_2",    LLAVA_LLAMA_2, USER, SepStyle::Llama2, "<s>", "</s>", &[]),
    ("llava_llama_2_ko", LLAVA_LLAMA_2_KO, USER, SepStyle::Llama2, "<s>", "</s>", &[]),
    ("mistral",          MISTRAL_KO, CHATML, SepStyle::Two, " ", "<|im_end|>", &[]),
    ("mpt",              MPT_HEAD, CHATML, SepStyle::Mpt, "<|im_end|>", "", &[]),
    ("plain",            "", ["", ""], SepStyle::Plain, "\n", "", &[]),
    ("v0_plain",         "", ["", ""], SepStyle::Plain, "\n", "", &[]),
    ("llava_v0",         CURIOUS_HUMAN, HUMAN, SepStyle::Single, "###", "", &[]),
    ("v0_mmtag",         MMTAG, HUMAN, SepStyle::Single, "###", "", &[]),
    ("llava_v1",         CURIOUS_HUMAN, USER, SepStyle::Two, " ", "</s>", &[]),
    ("v1_mmtag",         MMTAG, USER, SepStyle::Two, " ", "</s>", &[]),
    // llava-hf/llava-1.5-7b-hf: the v1 prompt without a system line.
    ("llava_hf",         "", USER, SepStyle::Two, " ", "</s>", &[]),
];

impl Template {
    /// Looks a template up by its key: every key of fork-June (§4.2) and fork-HEAD (§4.3), plus
    /// `llava_hf` and `llava_llama_2_ko`. Returns `None` for an unknown key; upstream raises
    /// `KeyError` there, and guessing a template would silently change what the model sees.
    ///
    /// Keys that the two revisions define differently resolve as follows:
    /// - `v1` is June's `conv_v1_2` (`###`, renewable-energy few-shot), the default of June's
    ///   text CLI and of its gradio fallback. HEAD registers its `v1` under `vicuna_v1` too.
    /// - `llava_v1` is HEAD's (curious-human system, `USER`/`ASSISTANT`, `</s>`), because every
    ///   LLaVA-1.5 and KoLLaVA-v1.5 checkpoint is served with it and HEAD's CLI rule names it.
    ///   June's `conv_llava_v1` (the `multimodal` system text with the same separators) is
    ///   `llava_v1_june`, which [`NameRule::ForkJuneRunLlava`] returns.
    /// - `mpt` is HEAD's; June's `conv_mpt` is `mpt_june`. No June name rule picks `mpt` (June
    ///   picks `mpt_multimodal`), while HEAD's CLI rule does.
    /// - `default` is the same text in both (`conv_v1_2` = `conv_vicuna_v0`), as is `v0`.
    ///
    /// `llava_llama_2` is HEAD's text; `llava_llama_2_ko` is fork-Aug's "… in korean." variant
    /// that KoLLaVA-LLaMA-v2 was trained with. `llava_hf` is LLaVA v1 without its system line
    /// ([`SepStyle::Two`], empty system), as the llava-hf fixture pins it: `USER: <image>\nQ
    /// ASSISTANT:`, then `… ASSISTANT: A1</s>USER: Q2 ASSISTANT:`. The hub's
    /// `chat_template.jinja` differs after an answer (`A1 USER:`, no `</s>`); the fixture's
    /// form is the v1 format the weights were trained on.
    ///
    /// The `*_mmtag` templates only carry the text: upstream also inserts two turns
    /// (`<Image><image></Image>` / `Received.`) before an image turn, which is the caller's job,
    /// like all image placement here.
    ///
    /// ```
    /// use kollava_inputs::template::{Conversation, Role, Template};
    /// let mut conv = Conversation::new(Template::by_name("llava_hf").unwrap());
    /// conv.push(Role::User, Some("<image>\nWhat is this?".into()));
    /// conv.push(Role::Assistant, None);
    /// assert_eq!(conv.prompt(), "USER: <image>\nWhat is this? ASSISTANT:");
    /// ```
    pub fn by_name(name: &str) -> Option<Template> {
        let (key, system, roles, style, sep, sep2, few_shot) =
            TEMPLATES.iter().find(|row| row.0 == name)?;
        Some(Template {
            name: key,
            system: (*system).to_owned(),
            roles: roles.map(str::to_owned),
            style: *style,
            sep: (*sep).to_owned(),
            sep2: (*sep2).to_owned(),
            few_shot: few_shot
                .iter()
                .map(|(r, text)| (*r, (*text).to_owned()))
                .collect(),
        })
    }

    /// Every key [`Template::by_name`] accepts, in registry order (for `--help` and errors).
    pub fn names() -> &'static [&'static str] {
        static NAMES: OnceLock<Vec<&'static str>> = OnceLock::new();
        NAMES.get_or_init(|| TEMPLATES.iter().map(|row| row.0).collect())
    }

    /// The string upstream's clients cut generation at: `sep` for `Single`/`Mpt`, `sep2`
    /// otherwise (spec §4.1). Empty means there is none (`plain`): stop on EOS only.
    /// Some entry points differ (fork-HEAD's CLI always stops on `"###"`); that is theirs to
    /// reproduce, not the template's.
    pub fn stop_string(&self) -> &str {
        match self.style {
            SepStyle::Single | SepStyle::Mpt => &self.sep,
            SepStyle::Two | SepStyle::Plain | SepStyle::Llama2 => &self.sep2,
        }
    }

    fn role_name(&self, role: Role) -> &str {
        match role {
            Role::User => &self.roles[0],
            Role::Assistant => &self.roles[1],
        }
    }

    /// The template as a transformers chat template (Jinja), for the `Single`, `Two` and
    /// `Mpt` styles without few-shot turns: `apply_chat_template` with
    /// `add_generation_prompt` renders what [`Conversation::prompt`] renders, a message's
    /// images first, each as `image` (`<image>\n` where LLaVA's first turn puts it), then
    /// its text. A leading `system` message replaces the system text. `None` for the other
    /// styles.
    pub fn jinja(&self, image: &str) -> Option<String> {
        if !self.few_shot.is_empty()
            || !matches!(self.style, SepStyle::Single | SepStyle::Two | SepStyle::Mpt)
        {
            return None;
        }
        let lit = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let (colon, space) = match self.style {
            SepStyle::Mpt => ("", ""),
            _ => (":", " "),
        };
        let odd_end = match self.style {
            SepStyle::Two => &self.sep2,
            _ => &self.sep,
        };
        // An empty system drops its separator in the `Two` style (see `SepStyle::Two`).
        let system = format!(
            "{{%- set system = {} -%}}\
             {{%- if messages and messages[0]['role'] == 'system' -%}}\
             {{%- set system = messages[0]['content'] if messages[0]['content'] is string \
             else messages[0]['content'] | map(attribute='text') | join(' ') -%}}\
             {{%- endif -%}}\
             {{%- if system or {} -%}}{{{{ system + {} }}}}{{%- endif -%}}",
            lit(&self.system),
            if self.style == SepStyle::Two {
                "false"
            } else {
                "true"
            },
            lit(&self.sep),
        );
        Some(format!(
            "{system}\
             {{%- for m in messages if m['role'] != 'system' -%}}\
             {{{{ ({user} if m['role'] == 'user' else {assistant}) + {colon} }}}}\
             {{%- if m['content'] is string -%}}{{%- set text = m['content'] -%}}\
             {{%- else -%}}{{%- set text = namespace(s='') -%}}\
             {{%- for c in m['content'] if c['type'] == 'image' -%}}\
             {{%- set text.s = text.s + {image} -%}}{{%- endfor -%}}\
             {{%- set text = text.s + (m['content'] | selectattr('type', 'equalto', 'text') \
             | map(attribute='text') | join(' ')) -%}}\
             {{%- endif -%}}\
             {{{{ {space} + text + ({odd} if loop.index0 % 2 == 1 else {even}) }}}}\
             {{%- endfor -%}}\
             {{%- if add_generation_prompt -%}}{{{{ {assistant} + {colon} }}}}{{%- endif -%}}",
            user = lit(&self.roles[0]),
            assistant = lit(&self.roles[1]),
            colon = lit(colon),
            space = lit(space),
            odd = lit(odd_end),
            even = lit(&self.sep),
            image = lit(image),
        ))
    }
}

/// A template plus the turns so far, few-shot turns included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conversation {
    pub template: Template,
    /// `None` marks the turn the model is to write next (upstream's `append_message(role, None)`).
    /// Turns are expected to alternate, user first, as upstream assumes; `Two` and `Llama2`
    /// choose separators by position, not by role.
    pub messages: Vec<(Role, Option<String>)>,
}

impl Conversation {
    pub fn new(template: Template) -> Self {
        let messages = template
            .few_shot
            .iter()
            .map(|(role, text)| (*role, Some(text.clone())))
            .collect();
        Conversation { template, messages }
    }

    pub fn push(&mut self, role: Role, text: Option<String>) {
        self.messages.push((role, text));
    }

    /// The prompt string as upstream's `get_prompt()` builds it (spec §4.1), minus the v1.0+
    /// image-turn rewriting (see [`Template::by_name`]). As upstream tests `if message:`, an
    /// empty text renders like `None`.
    pub fn prompt(&self) -> String {
        let t = &self.template;
        let mut out = String::new();
        let turns = self
            .messages
            .iter()
            .map(|(role, text)| (*role, text.as_deref().filter(|s| !s.is_empty())));
        match t.style {
            // `role + ": " + text + sep` (MPT: no ": ", its roles end in "\n"); `role + ":"`
            // (MPT: `role`) for the pending turn. `Two` ends odd turns with `sep2`.
            SepStyle::Single | SepStyle::Two | SepStyle::Mpt => {
                let (colon, space) = if t.style == SepStyle::Mpt {
                    ("", "")
                } else {
                    (":", " ")
                };
                if !(t.style == SepStyle::Two && t.system.is_empty()) {
                    out += &t.system;
                    out += &t.sep;
                }
                for (i, (role, text)) in turns.enumerate() {
                    out += t.role_name(role);
                    out += colon;
                    if let Some(text) = text {
                        let odd_two = t.style == SepStyle::Two && i % 2 == 1;
                        out += space;
                        out += text;
                        out += if odd_two { &t.sep2 } else { &t.sep };
                    }
                }
            }
            SepStyle::Plain => {
                out += &t.system;
                for (role, text) in turns {
                    match (role, text) {
                        // One placeholder however many the text has, as `preprocess_plain`
                        // replaces the whole user value with DEFAULT_IMAGE_TOKEN.
                        (Role::User, Some(text)) if text.contains(IMAGE_PLACEHOLDER) => {
                            out += IMAGE_PLACEHOLDER;
                        }
                        (Role::Assistant, Some(text)) => {
                            out += text;
                            out += &t.sep;
                        }
                        _ => {}
                    }
                }
            }
            SepStyle::Llama2 => {
                for (i, (_, text)) in turns.enumerate() {
                    let Some(text) = text else { continue };
                    if i % 2 == 0 {
                        out += &t.sep;
                        out += "[INST] ";
                        // Upstream-HEAD skips an empty system (its `mistral_instruct`); v1.0
                        // would emit an empty `<<SYS>>` block. Every template here has one.
                        if i == 0 && !t.system.is_empty() {
                            out += "<<SYS>>\n";
                            out += &t.system;
                            out += "\n<</SYS>>\n\n";
                        }
                        out += text;
                        out += " [/INST]";
                    } else {
                        out += " ";
                        out += text;
                        out += " ";
                        out += &t.sep2;
                    }
                }
                let stripped = out.trim_start_matches(|c| t.sep.contains(c));
                return stripped.to_owned();
            }
        }
        out
    }
}

/// The image placeholder callers write into user text.
const IMAGE_PLACEHOLDER: &str = "<image>";

/// Which reference entry point's name rule to follow (spec §4.4). They disagree, so the caller
/// says whose behaviour it reproduces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameRule {
    /// fork-June `llava.eval.run_llava` (and its worker): `v1` → `llava_v1_june`, `mpt` →
    /// `mpt_multimodal`, else `multimodal`.
    ForkJuneRunLlava,
    /// fork-HEAD `llava.serve.cli`: `llama-2` → `llava_llama_2`, `v1` → `llava_v1`, `mpt` →
    /// `mpt`, `synatra` → `mistral`, else `llava_v0`.
    ForkHeadCli,
}

/// The template key the reference picks for a checkpoint from its model name (spec §4.4):
/// substring tests on the lower-cased name, first match wins. This is upstream's rule, kept
/// for compatibility with its quirks: `kollava-v1.5-synatra-7b` contains `v1`, so the HEAD CLI
/// gives it `llava_v1`, not `mistral`. Every returned key resolves with [`Template::by_name`].
pub fn template_for_model_name(name: &str, rule: NameRule) -> &'static str {
    let name = name.to_lowercase();
    let has = |s: &str| name.contains(s);
    match rule {
        NameRule::ForkJuneRunLlava if has("v1") => "llava_v1_june",
        NameRule::ForkJuneRunLlava if has("mpt") => "mpt_multimodal",
        NameRule::ForkJuneRunLlava => "multimodal",
        NameRule::ForkHeadCli if has("llama-2") => "llava_llama_2",
        NameRule::ForkHeadCli if has("v1") => "llava_v1",
        NameRule::ForkHeadCli if has("mpt") => "mpt",
        NameRule::ForkHeadCli if has("synatra") => "mistral",
        NameRule::ForkHeadCli => "llava_v0",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

    fn reference(ckpt: &str) -> Value {
        let path = format!("{FIXTURES}/{ckpt}/reference.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap()
    }

    fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
        v.pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("missing string at {pointer}"))
    }

    /// The fixture dialogue: query, first answer, second question, read from a `train_labels`
    /// entry's turns with the image marker (`<image>` or v0's expanded block) removed.
    #[derive(Clone)]
    struct Dialogue {
        query: String,
        answer: String,
        question2: String,
    }

    fn dialogue(json: &Value, labels: &str, image: &str) -> Dialogue {
        let turn = |i: usize| str_at(json, &format!("/train_labels/{labels}/turns/{i}/1"));
        Dialogue {
            query: turn(0).replace(image, "").trim().to_owned(),
            answer: turn(1).to_owned(),
            question2: turn(2).to_owned(),
        }
    }

    /// v0's `<im_start><im_patch>×N<im_end>`, with N read from the fixture.
    fn v0_image_block(json: &Value) -> String {
        let n = json["image_tokens"]["N"].as_u64().unwrap() as usize;
        format!("<im_start>{}<im_end>", "<im_patch>".repeat(n))
    }

    fn render(template: &str, turns: &[(Role, Option<&str>)]) -> String {
        let mut conv = Conversation::new(Template::by_name(template).unwrap());
        for (role, text) in turns {
            conv.push(*role, text.map(str::to_owned));
        }
        conv.prompt()
    }

    /// User, answer, user, pending assistant.
    fn two_turns<'a>(
        user1: &'a str,
        answer: &'a str,
        user2: &'a str,
    ) -> [(Role, Option<&'a str>); 4] {
        use Role::{Assistant, User};
        [
            (User, Some(user1)),
            (Assistant, Some(answer)),
            (User, Some(user2)),
            (Assistant, None),
        ]
    }

    /// Renders the single- and two-turn prompts and compares them with the fixture's, after
    /// `<image>` is replaced by `image` (v0 expands it in the text).
    fn check(json: &Value, fixture_tpl: &str, ours: &str, user1: &str, d: &Dialogue, image: &str) {
        let single = render(ours, &[(Role::User, Some(user1)), (Role::Assistant, None)]);
        let two = render(ours, &two_turns(user1, &d.answer, &d.question2));
        for (kind, got) in [("single_turn", single), ("two_turn", two)] {
            let want = str_at(json, &format!("/prompts/{fixture_tpl}/{kind}/text"));
            let got = got.replace("<image>", image);
            assert_eq!(got, want, "{fixture_tpl} → {ours}, {kind}");
        }
    }

    #[test]
    fn v0_prompts_match_reference_with_image_after_query() {
        let json = reference("llava-v0");
        let block = v0_image_block(&json);
        let d = dialogue(&json, "conv_v1_signal", &block);
        let user1 = format!("{}\n<image>", d.query);
        let pairs = [
            ("conv_v1", "llava_v0"),
            ("multimodal", "multimodal"),
            ("vicuna_v1", "vicuna_v1"),
        ];
        for (fixture_tpl, ours) in pairs {
            check(&json, fixture_tpl, ours, &user1, &d, &block);
        }
    }

    #[test]
    fn image_first_prompts_match_reference() {
        // (checkpoint, its template name, ours, train_labels entry holding the dialogue);
        // llava-hf's labels carry no turns, and the generator uses one dialogue throughout.
        #[rustfmt::skip]
        let cases = [
            ("llava-v1.5", "llava_v1", "llava_v1", ("llava-v1.5", "llava_v1")),
            ("llava-v1.5", "vicuna_v1", "vicuna_v1", ("llava-v1.5", "llava_v1")),
            ("llava-mistral", "mistral_kollava", "mistral", ("llava-mistral", "mistral_kollava")),
            ("llava-hf", "llava_hf", "llava_hf", ("llava-v1.5", "llava_v1")),
        ];
        for (ckpt, fixture_tpl, ours, (turns_ckpt, labels)) in cases {
            let d = dialogue(&reference(turns_ckpt), labels, "<image>");
            let user1 = format!("<image>\n{}", d.query);
            check(&reference(ckpt), fixture_tpl, ours, &user1, &d, "<image>");
        }
    }

    #[test]
    fn plain_keeps_only_the_image_and_the_caption() {
        use Role::{Assistant, User};
        for (ckpt, labels) in [
            ("llava-v1.5", "llava_v1"),
            ("llava-mistral", "mistral_kollava"),
        ] {
            let json = reference(ckpt);
            let d = dialogue(&json, labels, "<image>");
            let user1 = format!("<image>\n{}", d.query);
            let caption = str_at(&json, "/train_labels/plain/turns/1/1");
            let single = render("plain", &[(User, Some(&user1)), (Assistant, None)]);
            let two = render("plain", &[(User, Some(&user1)), (Assistant, Some(caption))]);
            let want =
                |kind: &str| str_at(&json, &format!("/prompts/plain/{kind}/text")).to_owned();
            assert_eq!(single, want("single_turn"), "{ckpt}");
            assert_eq!(two, want("two_turn"), "{ckpt}");
            // A later user turn without an image adds nothing.
            assert_eq!(
                render("plain", &two_turns(&user1, caption, &d.question2)),
                two
            );
        }
    }

    #[test]
    fn every_listed_name_resolves_under_its_own_key() {
        for name in Template::names() {
            let t = Template::by_name(name).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(t.name, *name);
        }
        assert_eq!(Template::names().len(), TEMPLATES.len());
        assert!(Template::by_name("conv_v1").is_none());
        assert!(Template::by_name("").is_none());
    }

    #[test]
    fn every_spec_4_key_is_registered() {
        let june = "default v1 simple multimodal simple_legacy llava_v1 vicuna_v1_1 bair_v1 mpt \
                    mpt_text mpt_multimodal";
        let head = "default v0 v1 vicuna_v1 llama_2 llava_llama_2 mistral mpt plain v0_plain \
                    llava_v0 v0_mmtag llava_v1 v1_mmtag";
        for name in june.split_whitespace().chain(head.split_whitespace()) {
            assert!(Template::by_name(name).is_some(), "{name}");
        }
    }

    #[test]
    fn v1_and_default_are_june_conv_v1_2_with_renewable_few_shot() {
        for name in ["v1", "default", "v0"] {
            let got = render(name, &[(Role::User, Some("Q")), (Role::Assistant, None)]);
            let want = format!(
                "{CURIOUS_HUMAN}###Human: {RENEWABLE_Q}###Assistant: {RENEWABLE_A}###Human: Q###Assistant:"
            );
            assert_eq!(got, want, "{name}");
        }
        assert!(RENEWABLE_A.ends_with("economic and social instability.\n"));
        assert_eq!(Template::by_name("vicuna_v1").unwrap().style, SepStyle::Two);
    }

    #[test]
    fn llava_v1_june_keeps_the_uw_madison_system_prompt() {
        let june = Template::by_name("llava_v1_june").unwrap();
        let head = Template::by_name("llava_v1").unwrap();
        assert_eq!(june.system, LLAVA_UW);
        assert_eq!(head.system, CURIOUS_HUMAN);
        assert_eq!((june.style, june.sep2.as_str()), (SepStyle::Two, "</s>"));
    }

    #[test]
    fn llava_llama_2_wraps_system_in_first_inst_and_strips_leading_bos() {
        let turns = two_turns("<image>\nQ1", "A1", "Q2");
        let want = format!(
            "[INST] <<SYS>>\n{LLAVA_LLAMA_2}\n<</SYS>>\n\n<image>\nQ1 [/INST] A1 </s><s>[INST] Q2 [/INST]"
        );
        assert_eq!(render("llava_llama_2", &turns), want);
        let ko = render("llava_llama_2_ko", &turns);
        assert!(ko.contains("natural language in korean.\n<</SYS>>"));
    }

    #[test]
    fn llama_2_without_system_has_no_sys_block() {
        let mut t = Template::by_name("llama_2").unwrap();
        t.system.clear();
        let mut conv = Conversation::new(t);
        conv.push(Role::User, Some("Q".into()));
        conv.push(Role::Assistant, None);
        assert_eq!(conv.prompt(), "[INST] Q [/INST]");
    }

    #[test]
    fn mpt_uses_chatml_roles_without_colon() {
        let got = render("mpt", &[(Role::User, Some("Q")), (Role::Assistant, None)]);
        assert_eq!(
            got,
            format!("{MPT_HEAD}<|im_end|><|im_start|>user\nQ<|im_end|><|im_start|>assistant\n")
        );
        assert_eq!(Template::by_name("mpt_june").unwrap().system, MPT_JUNE);
    }

    #[test]
    fn empty_text_renders_as_pending_turn_like_upstream_truthiness() {
        let empty = render("llava_v0", &[(Role::User, Some(""))]);
        let none = render("llava_v0", &[(Role::User, None)]);
        assert_eq!(empty, none);
        assert!(none.ends_with("###Human:"));
    }

    #[test]
    fn stop_strings_follow_the_separator_style() {
        for (name, stop) in [
            ("multimodal", "###"),
            ("llava_v0", "###"),
            ("v1", "###"),
            ("mpt_multimodal", "<|im_end|>"),
            ("llava_v1", "</s>"),
            ("vicuna_v1", "</s>"),
            ("llava_hf", "</s>"),
            ("mistral", "<|im_end|>"),
            ("llava_llama_2", "</s>"),
            ("plain", ""),
        ] {
            assert_eq!(
                Template::by_name(name).unwrap().stop_string(),
                stop,
                "{name}"
            );
        }
    }

    /// One test per row of the spec §4.4 rule tables, plus the precedence quirks.
    macro_rules! rule_rows {
        ($($test:ident: $rule:ident, $model:literal => $key:literal;)*) => {$(
            #[test]
            fn $test() {
                let key = template_for_model_name($model, NameRule::$rule);
                assert_eq!(key, $key);
                assert!(Template::by_name(key).is_some(), "{key} is not registered");
            }
        )*};
    }

    rule_rows! {
        june_v1_gives_llava_v1_june: ForkJuneRunLlava, "LLaVA-13b-delta-v1-1" => "llava_v1_june";
        june_v1_wins_over_mpt: ForkJuneRunLlava, "llava-mpt-v1" => "llava_v1_june";
        june_mpt_gives_mpt_multimodal: ForkJuneRunLlava, "LLaVA-Lightning-MPT-7B-preview" => "mpt_multimodal";
        june_kovicuna_falls_back_to_multimodal: ForkJuneRunLlava, "KoLLaVA-KoVicuna-7b" => "multimodal";
        head_llama_2_gives_llava_llama_2: ForkHeadCli, "llava-llama-2-13b-chat-lightning-preview" => "llava_llama_2";
        head_llama_2_wins_over_v1: ForkHeadCli, "llava-v1-llama-2-7b" => "llava_llama_2";
        head_llama_v2_spelling_is_not_llama_2: ForkHeadCli, "KoLLaVA-LLaMA-v2-7b" => "llava_v0";
        head_v1_gives_llava_v1: ForkHeadCli, "llava-v1.5-7b" => "llava_v1";
        head_synatra_with_v1_gets_llava_v1_not_mistral: ForkHeadCli, "kollava-v1.5-synatra-7b" => "llava_v1";
        head_mpt_gives_mpt: ForkHeadCli, "LLaVA-Lightning-MPT-7B-preview" => "mpt";
        head_mpt_wins_over_synatra: ForkHeadCli, "synatra-mpt" => "mpt";
        head_synatra_gives_mistral: ForkHeadCli, "KoLLaVA-Synatra-7b" => "mistral";
        head_kovicuna_falls_back_to_llava_v0: ForkHeadCli, "KoLLaVA-KoVicuna-7b" => "llava_v0";
    }
}
