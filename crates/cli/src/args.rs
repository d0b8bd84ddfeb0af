//! What the user typed, validated: clap structs only. Each doc comment is the `--help`
//! text, in English with Korean alongside. Resolution into library settings happens in the
//! commands.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
pub use kollava_checkpoint::gguf::QuantType;
pub use kollava_inputs::image::AspectMode;
pub use kollava_train::run::{Sharding, Stage};

#[derive(Debug, Parser)]
#[command(
    name = "kollava",
    version,
    about = "Korean/English LLaVA vision-language assistant on CPU — 한국어/영어 이미지 질의응답",
    long_about = "kollava loads KoLLaVA / LLaVA checkpoints (v0 KoVicuna, LLaVA-1.5, llava-hf, Mistral/Synatra) \
and answers questions about images, matching the Python reference.\n\
kollava는 KoLLaVA / LLaVA 체크포인트를 불러와 이미지에 대한 질문에 답합니다 (Python 구현과 같은 결과).",
    after_help = "Examples / 예시:\n  \
kollava run --image examples/shapes.png --query \"이 그림을 설명해 주세요.\"   (the bundled demo model)\n  \
kollava chat --model ./KoLLaVA-KoVicuna-7b --image photo.jpg\n  \
kollava verify --model ./llava-v1.5-7b --reference ./dump"
)]
pub struct Cli {
    /// Log more (repeat for more detail) — 자세한 로그
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Answer one question about an image — 이미지에 대한 질문 하나에 답하기
    #[command(after_help = "Examples / 예시:\n  \
kollava run --model ./KoLLaVA-KoVicuna-7b --image food.jpg --query \"이미지 속 재료들로 어떤 음식을 만들 수 있을까요?\"\n  \
kollava run --model liuhaotian/llava-v1.5-7b --image cat.png --query \"What is unusual here?\" --temperature 0\n  \
kollava run --model ./llava-v1.5-7b --image cat.png --query \"Describe it.\" --json")]
    Run(RunArgs),
    /// Chat in the terminal, with images — 터미널에서 이미지와 함께 대화하기
    #[command(after_help = "In the chat / 대화 중 명령:\n  \
/image PATH   attach an image to the next message — 다음 메시지에 이미지 첨부\n  \
/reset        start over — 대화 초기화\n  \
/exit, Ctrl-D quit — 종료\n\n\
Examples / 예시:\n  \
kollava chat --model ./KoLLaVA-v1.5-Synatra-7b --image photo.jpg --conv-mode mistral")]
    Chat(ChatArgs),
    /// Check a checkpoint against a reference dump from the Python code — Python 결과와 비교 검증
    #[command(after_help = "Examples / 예시:\n  \
kollava verify --model tests/fixtures/llava-v0 --reference tests/fixtures/llava-v0\n  \
kollava verify --model ./llava-v1.5-7b --reference ./dump --tol image.=2\n\n\
A dump is written by scripts/dump_reference.py (see scripts/README.md).\n\
덤프는 scripts/dump_reference.py 로 만듭니다.")]
    Verify(VerifyArgs),
    /// Write a random-weight checkpoint with real shapes — 실제 크기의 무작위 가중치 체크포인트 만들기
    #[command(after_help = "Examples / 예시:\n  \
kollava init-random --arch bench-1b --out models/bench-1b\n  \
kollava init-random --arch llava-1.5-7b --layout hf --dtype bf16 --out /data/llava-7b-random")]
    InitRandom(InitRandomArgs),
    /// Evaluation — 평가
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Training data tools — 학습 데이터 도구
    #[command(subcommand)]
    Data(DataCommand),
    /// Tokenizer tools — 토크나이저 도구
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Train: stage 1 projector pretraining or stage 2 finetuning — 학습 (1단계 프로젝터, 2단계 미세조정)
    #[command(
        after_help = "Data: a JSON array or JSON Lines of {\"id\", \"image\", \"conversations\": [{\"from\": \"human\"|\"gpt\", \"value\"}]}\n\
Stage 1 trains the projector (vision tower and LLM frozen) and writes mm_projector.safetensors;\n\
stage 2 trains the LLM and projector (the tower too with --tune-vision-tower) and writes a checkpoint.\n\
Checkpoints go to OUTPUT/checkpoint-STEP every --save-steps; a rerun resumes from the newest.\n\n\
Examples / 예시:\n  \
kollava train --model ./llava-v1.5-7b --data ko_chat.json --image-folder cc3m --output-dir out/stage1\n  \
kollava train --stage finetune --model ./KoVicuna-llava --projector out/stage1/mm_projector.safetensors \\\n    \
--data ko_llava_instruct_150k.json --image-folder coco/train2014 --image-prefix COCO_train2014_ \\\n    \
--version v1 --output-dir out/stage2"
    )]
    Train(Box<TrainArgs>),
    /// Rewrite a checkpoint's weights as safetensors (e.g. from .bin), optionally in another dtype or layout (LLaVA ↔ llava-hf) — 가중치 변환
    #[command(
        after_help = "Streams tensor by tensor (memory: about one tensor); other files are copied.\n\n\
Examples / 예시:\n  \
kollava convert --input ./KoLLaVA-KoVicuna-7b --output ./KoLLaVA-KoVicuna-7b-st\n  \
kollava convert --input ./KoLLaVA-KoVicuna-7b --output ./KoLLaVA-KoVicuna-7b-f16 --dtype f16\n  \
kollava convert --input ./llava-v1.5-7b --output ./llava-1.5-7b-hf --layout hf\n  \
kollava convert --input ./llava-1.5-7b-hf --output ./llava-1.5-7b-original --layout original"
    )]
    Convert(ConvertArgs),
    /// Write a checkpoint as GGUF for llama.cpp and kollava: the language model quantized,
    /// the image encoder (mmproj) in f16 — GGUF 양자화
    #[command(
        after_help = "Writes OUT/<name>-<TYPE>.gguf (llama.cpp's `llama` names and metadata) and \
OUT/mmproj-<name>-F16.gguf (llama.cpp's LLaVA image encoder). `kollava run/chat/serve/bench \
--model OUT` loads the pair, as does `llama-mtmd-cli -m … --mmproj …`. Streams tensor by tensor.\n\n\
Examples / 예시:\n  \
kollava quantize --type q4_k ./llava-v1.5-7b ./llava-v1.5-7b-q4k\n  \
kollava quantize --type q8_0 --report models/kollava-demo /tmp/demo-q8"
    )]
    Quantize(QuantizeArgs),
    /// Draw a run's loss and learning-rate curves to a PNG — 학습 곡선 그리기
    #[command(
        after_help = "Example / 예시:\n  kollava plot out/stage2/metrics.jsonl -o curves.png"
    )]
    Plot(PlotArgs),
    /// Merge a LoRA adapter (kollava train --lora-r output) into its base model — LoRA 병합
    #[command(
        after_help = "Example / 예시:\n  kollava merge-lora --model ./llava-v1.5-7b --adapter out/lora --output ./llava-v1.5-7b-merged"
    )]
    MergeLora(MergeLoraArgs),
    /// Rebuild a model published as a delta from its base (LLaVA's apply_delta) — 델타 적용
    #[command(
        after_help = "Example / 예시:\n  kollava apply-delta --base ./llama-7b --delta ./LLaVA-7b-delta-v0 --target ./LLaVA-7b-v0"
    )]
    ApplyDelta(DeltaArgs),
    /// Write a model as a delta from its base (LLaVA's make_delta) — 델타 만들기
    #[command(
        after_help = "Example / 예시:\n  kollava make-delta --base ./llama-7b --target ./my-llava --delta ./my-llava-delta"
    )]
    MakeDelta(DeltaArgs),
    /// Save a checkpoint's projector weights to a file (LLaVA's extract_mm_projector) — 프로젝터 추출
    #[command(
        after_help = "Example / 예시:\n  kollava extract-projector --model ./llava-v1.5-7b --output mm_projector.safetensors"
    )]
    ExtractProjector(ExtractProjectorArgs),
    /// Serve an OpenAI-compatible API — OpenAI 호환 API 서버 실행
    #[command(
        after_help = "Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions (images as base64 data URLs; stream: true for SSE)\n\n\
Examples / 예시:\n  \
kollava serve --model ./llava-v1.5-7b --port 8000\n  \
curl localhost:8000/v1/chat/completions -H 'content-type: application/json' \\\n    \
-d '{\"messages\":[{\"role\":\"user\",\"content\":\"안녕하세요\"}]}'"
    )]
    Serve(ServeArgs),
    /// LLaVA's controller: workers (`kollava serve --controller`) register and heartbeat;
    /// clients find them or send requests through it — LLaVA 컨트롤러
    #[command(
        after_help = "Endpoints as the reference's: /register_worker, /receive_heart_beat, /list_models,\n\
/get_worker_address, /refresh_all_workers, /worker_generate_stream, /worker_get_status.\n\
Workers heartbeat every 15 s and are dropped after 30 s of silence.\n\n\
Example / 예시:\n  kollava controller --port 21001\n  \
kollava serve --port 40000 --controller http://127.0.0.1:21001 --worker-address http://127.0.0.1:40000"
    )]
    Controller(ControllerArgs),
    /// Measure speed: preprocessing, vision, prefill, decode, memory — 속도 측정
    #[command(after_help = "Examples / 예시:\n  \
kollava bench --model models/bench-1b --threads 2 --repeat 5\n  \
kollava bench --model tests/fixtures/llava-v1.5 --gen-tokens 16 --json")]
    Bench(BenchArgs),
}

#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// Answer a question file like LLaVA's model_vqa (resumable) — model_vqa 형식 질의응답
    #[command(
        after_help = "Questions: JSON Lines of {\"question_id\", \"image\", \"text\", \"category\"}, or a JSON array of\n\
LLaVA-format records (e.g. `kollava eval science-qa convert` output), run as model_vqa_science.\n\
Answers: JSON Lines of {\"question_id\", \"prompt\", \"text\", \"answer_id\", \"model_id\", \"metadata\"},\n\
appended one by one; run the same command again to resume after an interruption.\n\n\
Examples / 예시:\n  \
kollava eval vqa --model ./KoLLaVA-KoVicuna-7b --question-file ko_questions.jsonl \\\n    \
--image-folder coco/val2014 --answers-file answers/kollava.jsonl --temperature 0"
    )]
    Vqa(Box<VqaArgs>),
    /// Summarize GPT-review files like LLaVA's summarize_gpt_review — 리뷰 점수 요약
    #[command(
        after_help = "Reads reviews_*.jsonl / review_*.jsonl / gpt4_text*.jsonl in DIR and prints, per category and overall,\n\
the mean scores [answer 1, answer 2] and the relative score answer2/answer1*100.\n\n\
Example / 예시:\n  kollava eval summarize -d table/review"
    )]
    Summarize(SummarizeArgs),
    /// Compare two answer files with an OpenAI-compatible judge, like eval_gpt_review_visual — 심사 모델로 답변 비교
    #[command(
        after_help = "Writes the reference's review lines {id, question_id, answer1_id, answer2_id, category, content, tuple};\n\
each is appended when it arrives, and rerunning the command resumes where it stopped.\n\n\
Examples / 예시:\n  \
kollava eval review -q questions.jsonl -c context.jsonl -a gpt4.jsonl kollava.jsonl -r rule.json -o review.jsonl\n  \
kollava eval review ... --judge-url http://127.0.0.1:8000/v1 --judge-model kollava   (a local kollava serve as judge)"
    )]
    Review(ReviewArgs),
    /// Score a model on a synthetic held-out set by exact match — 합성 평가 세트 정확도
    #[command(
        after_help = "Asks every question of DIR/test.json (from `kollava data synth`) greedily and prints\n\
`accuracy X (n=N)` as the last line.\n\n\
Example / 예시:\n  kollava eval synth --data data/synth-heldout"
    )]
    Synth(EvalSynthArgs),
    /// ScienceQA: convert problems to LLaVA's format, or score an answer file — ScienceQA 변환과 채점
    #[command(subcommand)]
    ScienceQa(ScienceQaCommand),
}

#[derive(Debug, Subcommand)]
pub enum ScienceQaCommand {
    /// problems.json + pid_splits.json → LLaVA training/eval records, like convert_sqa_to_llava.py — 변환
    #[command(
        after_help = "Writes BASE/llava_<split>_<format>.json (or --jsonl: BASE/scienceqa_<split>_<format>.jsonl\n\
with {id, image?, instruction, output}) unless --output is given.\n\
Formats: CQM, QCM, QCML, QCME, QCMLE, QCLM, QCEM, QCLEM - A, AL, AE, ALE, AEL, LA, EA, LEA, ELA, LEPA.\n\n\
Example / 예시:\n  kollava eval science-qa convert --base-dir ScienceQA/data/scienceqa --split train --prompt-format QCM-LEPA"
    )]
    Convert(SqaConvertArgs),
    /// Score model_vqa_science answers like eval_science_qa.py, with the paper's buckets — 채점
    #[command(
        after_help = "Reads answers as JSON Lines {question_id, prompt, text}. A missing answer or one without a\n\
readable letter is wrong (deterministic); --random-fallback SEED guesses among the choices instead,\n\
as the original script did. Prints the reference's Total/Accuracy/IMG-Accuracy line, then accuracy\n\
by subject (NAT, SOC, LAN), context (TXT, IMG, NO) and grade (G1-6, G7-12).\n\n\
Example / 예시:\n  kollava eval science-qa score --base-dir ScienceQA/data/scienceqa --result-file answers.jsonl \\\n    \
--output-file sqa_analysis.json --output-result sqa_result.json"
    )]
    Score(SqaScoreArgs),
}

#[derive(Debug, Args)]
pub struct SqaConvertArgs {
    /// Directory with problems.json and pid_splits.json — ScienceQA 데이터 디렉터리
    #[arg(long, value_name = "DIR")]
    pub base_dir: PathBuf,
    /// Split name in pid_splits.json — 분할 이름
    #[arg(long, default_value = "train")]
    pub split: String,
    /// INPUT-OUTPUT format — 프롬프트 형식
    #[arg(long, default_value = "QCM-LEPA")]
    pub prompt_format: String,
    /// Write convert_to_jsonl's records instead — JSONL로 쓰기
    #[arg(long)]
    pub jsonl: bool,
    /// Output file (default: in BASE, named as the reference names it) — 출력 파일
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SqaScoreArgs {
    /// Directory with problems.json and pid_splits.json — ScienceQA 데이터 디렉터리
    #[arg(long, value_name = "DIR")]
    pub base_dir: PathBuf,
    /// Answers (JSON Lines with question_id, prompt, text) — 답변 파일
    #[arg(long, value_name = "FILE")]
    pub result_file: PathBuf,
    /// Split name in pid_splits.json — 분할 이름
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Write {correct: [...], incorrect: [...]} here — 분석 파일
    #[arg(long, value_name = "FILE")]
    pub output_file: Option<PathBuf>,
    /// Write {acc, correct, count, results, outputs} here — 결과 파일
    #[arg(long, value_name = "FILE")]
    pub output_result: Option<PathBuf>,
    /// Guess (seeded) among the choices when no letter can be read — 읽지 못한 답은 무작위 추측
    #[arg(long, value_name = "SEED")]
    pub random_fallback: Option<u64>,
}

#[derive(Debug, Args)]
pub struct ReviewArgs {
    /// Questions (JSONL: question_id, image, text, category) — 질문 파일
    #[arg(short = 'q', long, value_name = "FILE")]
    pub question: PathBuf,
    /// Context per image (JSONL: image, captions, instances) — 문맥 파일
    #[arg(short = 'c', long, value_name = "FILE")]
    pub context: PathBuf,
    /// The two answer files, in the questions' order — 비교할 두 답변 파일
    #[arg(short = 'a', long, num_args = 2, value_names = ["ANSWERS1", "ANSWERS2"])]
    pub answer_list: Vec<PathBuf>,
    /// Rules by category ({"role", "prompt"}) — 규칙 파일
    #[arg(short = 'r', long, value_name = "FILE")]
    pub rule: PathBuf,
    /// Review output (appended; resumable) — 출력 파일
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: PathBuf,
    /// OpenAI-compatible API base URL — 심사 API 주소
    #[arg(long, default_value = "https://api.openai.com/v1")]
    pub judge_url: String,
    /// Judge model name — 심사 모델
    #[arg(long, default_value = "gpt-4-0314")]
    pub judge_model: String,
    /// Environment variable holding the API key (unset: no key sent) — API 키 환경 변수
    #[arg(long, default_value = "OPENAI_API_KEY")]
    pub api_key_env: String,
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: usize,
    /// Requests in flight at once — 동시 요청 수
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub parallel: u32,
    /// Retries per request, with doubling backoff from 0.5 s — 재시도 횟수
    #[arg(long, default_value_t = 5)]
    pub retries: usize,
}

#[derive(Debug, Args)]
pub struct EvalSynthArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Directory written by `kollava data synth` — 합성 데이터 디렉터리
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Ask at most this many questions — 최대 질문 수
    #[arg(long)]
    pub limit: Option<usize>,
    /// Print every wrong answer — 틀린 답 출력
    #[arg(long)]
    pub show_errors: bool,
}

#[derive(Debug, Args)]
pub struct SummarizeArgs {
    /// Directory with review files — 리뷰 파일 디렉터리
    #[arg(short = 'd', long = "dir", value_name = "DIR")]
    pub dir: PathBuf,
    /// Also draw the relative scores per category as a bar chart (PNG) — 막대 그래프 PNG
    #[arg(long, value_name = "FILE")]
    pub chart: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Validate a training file before a long run — 학습 파일 검사
    #[command(
        after_help = "Checks: schema and role order, <image> placement, images that exist and decode,\n\
duplicate ids, and with --model the token lengths against --model-max-length.\n\
Exits non-zero listing the first problems with their ids.\n\n\
Examples / 예시:\n  \
kollava data check --data ko_llava_instruct_150k.json --image-folder coco/train2014 --image-prefix COCO_train2014_\n  \
kollava data check --data ko_chat.json --image-folder cc3m --model ./llava-v1.5-7b --version plain"
    )]
    Check(DataCheckArgs),
    /// Generate the synthetic Korean shapes dataset the demo model learns from — 합성 데이터 생성
    #[command(
        after_help = "Writes DIR/images/*.png, DIR/pretrain.json (captions, stage 1), DIR/finetune.json\n\
(multi-turn Q&A, stage 2) and DIR/test.json (held-out single questions, for `kollava eval synth`).\n\n\
Examples / 예시:\n  \
kollava data synth --out data/synth --count 6000\n  \
kollava data synth --out data/synth-heldout --seed 999 --count 0 --test-count 60"
    )]
    Synth(DataSynthArgs),
}

#[derive(Debug, Args)]
pub struct DataSynthArgs {
    /// Output directory — 출력 디렉터리
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Random seed (use a new one for a held-out set) — 시드
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Training images — 학습 이미지 수
    #[arg(long, default_value_t = 4000)]
    pub count: usize,
    /// Held-out images (each gives 5 to 7 questions) — 평가 이미지 수
    #[arg(long, default_value_t = 60)]
    pub test_count: usize,
}

#[derive(Debug, Subcommand)]
pub enum TokenizerCommand {
    /// Train a LLaMA-style BPE tokenizer on training data — 학습 데이터로 토크나이저 학습
    #[command(
        after_help = "The text is every conversation rendered with --template, so the template's own words\n\
(system prompt, roles, separators) get tokens too.\n\n\
Example / 예시:\n  kollava tokenizer train --data data/synth/pretrain.json --data data/synth/finetune.json --out tok"
    )]
    Train(TokenizerTrainArgs),
}

#[derive(Debug, Args)]
pub struct TokenizerTrainArgs {
    /// Training data files (JSON array or JSONL; repeat) — 학습 데이터
    #[arg(long, value_name = "FILE", required = true)]
    pub data: Vec<PathBuf>,
    /// Conversation template the text is rendered with — 대화 템플릿
    #[arg(long, default_value = "llava_v0", value_parser = template_names())]
    pub template: String,
    /// Vocabulary size, byte-fallback pieces and special tokens included — 어휘 크기
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(300..))]
    pub vocab_size: u32,
    /// Output directory — 출력 디렉터리
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct DataCheckArgs {
    /// Training data (JSON array or JSONL) — 학습 데이터
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// Folder the records' images are in — 이미지 폴더
    #[arg(long, value_name = "DIR")]
    pub image_folder: PathBuf,
    /// Prefix added to every image file name (KoLLaVA's `COCO_train2014_`) — 파일 이름 접두사
    #[arg(long, default_value = "")]
    pub image_prefix: String,
    /// Checkpoint whose tokenizer measures lengths (optional) — 길이 측정용 체크포인트
    #[arg(long, value_name = "DIR|REPO")]
    pub model: Option<String>,
    /// Conversation format for the lengths — 대화 형식
    #[arg(long, default_value = "plain", value_parser = template_names())]
    pub version: String,
    /// Samples longer than this (in tokens) are reported — 최대 토큰 길이
    #[arg(long, default_value_t = 2048)]
    pub model_max_length: usize,
    /// How many problems to list — 출력할 문제 수
    #[arg(long, default_value_t = 20)]
    pub show: usize,
    /// Also draw the token-length histogram to this PNG (needs --model) — 길이 분포 PNG
    #[arg(long, value_name = "FILE")]
    pub histogram: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct VqaArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Questions (JSON Lines) — 질문 파일
    #[arg(long, value_name = "FILE")]
    pub question_file: PathBuf,
    /// Folder the questions' `image` names are relative to — 이미지 폴더
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub image_folder: PathBuf,
    /// Answers (JSON Lines, appended) — 답변 파일
    #[arg(long, value_name = "FILE")]
    pub answers_file: PathBuf,
    /// ScienceQA records: ask for the option's letter only (model_vqa_science's
    /// --single-pred-prompt) — 보기 문자만 답하게 하기
    #[arg(long)]
    pub single_pred_prompt: bool,
    /// ScienceQA records: a second pass after " ###\nANSWER:" appended as "The answer is …"
    /// (model_vqa_science's --answer-prompter) — 두 번째 ANSWER 단계
    #[arg(long)]
    pub answer_prompter: bool,
    /// Questions generated together: decoding reads the weights once per step for all of
    /// them — 한 번에 생성할 질문 수
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub batch_size: u16,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub setup: TrainSetup,
    /// Where results, checkpoints and metrics.jsonl go (required unless --plan) — 출력 디렉터리
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Print the memory each rank needs for this run (weights, gradients, optimizer state,
    /// activations at --per-device-batch-size sequences of --model-max-length tokens) and
    /// stop: no data or weights are read, so hardware can be sized first — 메모리 계획만 출력
    #[arg(long)]
    pub plan: bool,
    /// With --plan: size a named architecture (as `init-random --arch` knows them) instead of
    /// a --model directory — 아키텍처 이름으로 계획
    #[arg(long, value_parser = arch_names(), requires = "plan", conflicts_with = "model")]
    pub arch: Option<String>,
    /// Save a checkpoint every N steps (resume point) — N 스텝마다 저장
    #[arg(long)]
    pub save_steps: Option<usize>,
    /// Keep only the newest N checkpoints — 최근 N개만 보관
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// Weights dtype of the written checkpoint — 저장 자료형
    #[arg(long, value_enum, default_value_t = FloatType::F32)]
    pub save_dtype: FloatType,
    /// Data-parallel processes on this machine (torchrun-style RANK/WORLD_SIZE/MASTER_ADDR/
    /// MASTER_PORT also work, across machines); each step's samples are split between them
    /// — 데이터 병렬 프로세스 수
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub nproc: u32,
    /// Also log to TensorBoard event files in OUTPUT/runs — TensorBoard 로그
    #[arg(long, value_enum, default_value_t = ReportTo::None)]
    pub report_to: ReportTo,
}

/// What a training run trains and how (`train` and `bench train` share it).
#[derive(Debug, Args)]
pub struct TrainSetup {
    #[command(flatten)]
    pub model: ModelArgs,
    /// pretrain: projector only; finetune: LLM + projector — 학습 단계
    #[arg(long, value_enum, default_value_t = Stage::Pretrain)]
    pub stage: Stage,
    /// Training data (JSON array or JSONL; required unless --plan) — 학습 데이터
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Folder the records' `image` names are relative to (required unless --plan) — 이미지 폴더
    #[arg(long, value_name = "DIR")]
    pub image_folder: Option<PathBuf>,
    /// Prefix added to every image file name (KoLLaVA's `COCO_train2014_`) — 파일 이름 접두사
    #[arg(long, default_value = "")]
    pub image_prefix: String,
    /// Conversation format the labels are built with (upstream's --version; default: plain
    /// for pretrain, the model's own template for finetune) — 대화 형식
    #[arg(long, value_parser = template_names())]
    pub version: Option<String>,
    /// Peak learning rate (default: 2e-3 pretrain, 2e-5 finetune, 2e-4 LoRA) — 학습률
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Stop after this many optimizer steps — 최대 스텝
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Samples per forward pass — 배치 크기
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub per_device_batch_size: u32,
    /// Forward passes per optimizer step — 그래디언트 누적
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub grad_accum: u32,
    #[arg(long, default_value_t = 0.03)]
    pub warmup_ratio: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Longest sequence (image features included); longer ones are cut — 최대 길이
    #[arg(long, default_value_t = 2048)]
    pub model_max_length: usize,
    /// Keep only each decoder layer's input and recompute the layer in the backward pass:
    /// long sequences fit in memory for ~30 % more time — 그래디언트 체크포인팅
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// How data-parallel ranks split the training state: none (each holds everything),
    /// grad-opt (each keeps AdamW's moments for 1/N of the parameters; gradients
    /// reduce-scattered, parameters all-gathered; ZeRO-2), or full (the decoder layers'
    /// weights too, each layer gathered for its forward and its recomputation in the
    /// backward; ZeRO-3, implies --gradient-checkpointing) — 학습 상태 분할
    #[arg(long, value_enum, default_value_t = Sharding::None)]
    pub shard: Sharding,
    /// Mixed precision as the reference's --bf16 True: every matrix product in bf16 with
    /// our kernels, forward and backward (frozen matrices packed once; trained ones rounded
    /// for each product); master weights, gradients and the optimizer state stay f32 —
    /// bf16 혼합 정밀도
    #[arg(long)]
    pub bf16: bool,
    /// Stage 2: train the vision tower too — 비전 타워도 학습
    #[arg(long)]
    pub tune_vision_tower: bool,
    /// Stage 2: keep the LLM frozen — 언어 모델 고정
    #[arg(long)]
    pub freeze_backbone: bool,
    /// Stage 2: keep the projector frozen — 프로젝터 고정
    #[arg(long)]
    pub freeze_mm_mlp_adapter: bool,
    /// Stage 2 with LoRA adapters of this rank instead of full finetuning (0 = off) — LoRA 랭크
    #[arg(long, default_value_t = 0)]
    pub lora_r: usize,
    /// LoRA scaling numerator (the update is scaled by alpha / r) — LoRA 알파
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    /// Dropout on the adapters' input — LoRA 드롭아웃
    #[arg(long, default_value_t = 0.05)]
    pub lora_dropout: f32,
    /// Modules to adapt (default: every linear map of the LLM except lm_head) — LoRA 대상 모듈
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    pub lora_targets: Vec<String>,
    /// 4: QLoRA, the frozen base stored in 4 bits (needs --lora-r); 16: as loaded — 양자화 비트 (4 = QLoRA)
    #[arg(long, default_value_t = 16, value_parser = bits)]
    pub bits: u8,
    /// Data order seed — 시드
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct PlotArgs {
    /// A run's metrics.jsonl — 학습 기록 파일
    #[arg(value_name = "METRICS")]
    pub metrics: PathBuf,
    /// Output PNG (default: beside METRICS, named after it) — 출력 PNG
    #[arg(short, long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DeltaArgs {
    /// The base LLaMA checkpoint — 기반 체크포인트
    #[arg(long, value_name = "DIR")]
    pub base: PathBuf,
    /// The delta (input of apply-delta, output of make-delta) — 델타
    #[arg(long, value_name = "DIR")]
    pub delta: PathBuf,
    /// The full model (output of apply-delta, input of make-delta) — 전체 모델
    #[arg(long, value_name = "DIR")]
    pub target: PathBuf,
    /// Weights dtype of the output (default: the input's) — 출력 자료형
    #[arg(long, value_enum)]
    pub dtype: Option<FloatType>,
}

#[derive(Debug, Args)]
pub struct MergeLoraArgs {
    /// The base checkpoint the adapter was trained on — 기반 체크포인트
    #[arg(long, value_name = "DIR|REPO")]
    pub model: String,
    /// Adapter directory (adapter_config.json, adapter_model.safetensors, and
    /// non_lora_trainables.safetensors when the projector was trained too) — 어댑터 디렉터리
    #[arg(long, value_name = "DIR")]
    pub adapter: PathBuf,
    /// New directory (must not exist or be empty) — 출력 디렉터리
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
    /// Weights dtype of the merged checkpoint (default: the base's) — 저장 자료형
    #[arg(long, value_enum)]
    pub dtype: Option<FloatType>,
}

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// Weight type of the language model's matrices (q4_k: Q4_K, with Q6_K for the output
    /// layer) — 가중치 형식
    #[arg(long = "type", short = 't', value_name = "TYPE", value_enum)]
    pub qtype: QuantType,
    /// Checkpoint directory (safetensors or .bin) — 입력 체크포인트
    #[arg(value_name = "IN")]
    pub input: String,
    /// New directory for the two .gguf files (must not exist or be empty) — 출력 디렉터리
    #[arg(value_name = "OUT")]
    pub output: PathBuf,
    /// Afterwards, compare the quantized model with the f32 one on a test image: top-1
    /// agreement of greedy tokens and mean KL divergence — 양자화 오차 보고
    #[arg(long)]
    pub report: bool,
    /// Tokens compared by --report — 비교할 토큰 수
    #[arg(long, default_value_t = 32)]
    pub report_tokens: usize,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Checkpoint directory — 입력 체크포인트
    #[arg(long, value_name = "DIR")]
    pub input: PathBuf,
    /// New directory (must not exist or be empty) — 출력 디렉터리
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
    /// Floating-point dtype of the output (default: keep each tensor's) — 출력 자료형
    #[arg(long, value_enum)]
    pub dtype: Option<FloatType>,
    /// Rewrite the checkpoint in the other layout: `hf` turns an original LLaVA-1.5
    /// checkpoint into transformers' llava-hf (tower inside, <image>/<pad> added, vocabulary
    /// padded to a multiple of 64); `original` turns llava-hf into LLaVA's own layout (tower
    /// in vision_tower/) — 체크포인트 배치 변환
    #[arg(long, value_enum, conflicts_with = "dtype")]
    pub layout: Option<Layout>,
}

#[derive(Debug, Args)]
pub struct ExtractProjectorArgs {
    /// Checkpoint directory — 체크포인트
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Output file: `.safetensors`, or `.bin` for LLaVA's `--pretrain_mm_mlp_adapter` (a
    /// PyTorch pickle) — 출력 파일 (.safetensors 또는 .bin)
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
    /// Also save embed_tokens (June-2023 stage 1 trained the <im_start>/<im_end> rows) — 임베딩 포함
    #[arg(long)]
    pub with_embeddings: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on — 수신 주소
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port — 포트
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Requests that may wait for the model; more get 503 — 대기열 크기
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_queue: u32,
    /// Requests decoded together in one batch; others wait in the queue — 동시 생성 요청 수
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrency: u32,
    /// Drop a streamed request whose client leaves its answer unread (64 pieces behind) for
    /// this many seconds; the batch never waits for a slow reader — 느린 스트림 클라이언트 제한(초)
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub stream_timeout: u64,
    /// Fetch http(s) `image_url`s (off: only base64 data URLs; local paths never) — 원격 이미지 허용
    #[arg(long)]
    pub allow_remote_images: bool,
    /// Keep every image of a conversation's history. By default a message that brings an
    /// image to a history that has one starts a new conversation there (earlier messages
    /// left out, said in the `x-kollava-new-conversation` header), as LLaVA's web UI does:
    /// models trained on one image per conversation mix two up — 대화 속 여러 이미지를 유지
    #[arg(long)]
    pub multi_image: bool,
    /// Allow browser requests from this origin (CORS; `*` for any; default: none) — 허용할 CORS 출처
    #[arg(long, value_name = "ORIGIN")]
    pub cors_origin: Option<String>,
    /// Require `Authorization: Bearer KEY` on the API (default: $KOLLAVA_API_KEY, else none) — API 키
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Keep the chat page's conversation and vote logs here (JSONL per day, images by
    /// content hash) — 대화·투표 기록 디렉터리
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,
    /// Register with this LLaVA controller and send it heartbeats — 등록할 컨트롤러 주소
    #[arg(long, value_name = "URL", requires = "worker_address")]
    pub controller: Option<String>,
    /// The address the controller reaches this worker at — 컨트롤러가 접속할 이 워커의 주소
    #[arg(long, value_name = "URL", requires = "controller")]
    pub worker_address: Option<String>,
    #[command(flatten)]
    pub http: HttpArgs,
}

/// Limits of the HTTP layer (`serve`, `controller`).
#[derive(Debug, Args)]
pub struct HttpArgs {
    /// Close a connection that has not sent a whole request head within this many seconds,
    /// its first request or the next on a kept-alive connection (stalled and slow clients,
    /// idle connections) — 요청 헤더 대기 시간(초)
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_timeout: u64,
    /// End a request whose body stops arriving for this many seconds (a client stalled
    /// midway through its upload) and close its connection — 요청 본문 대기 시간(초)
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub body_timeout: u64,
    /// Connections open at once; one more is answered 503 and closed — 최대 동시 연결 수
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
}

impl HttpArgs {
    pub fn limits(&self) -> kollava_serve::HttpLimits {
        kollava_serve::HttpLimits {
            header_timeout: std::time::Duration::from_secs(self.header_timeout),
            body_timeout: std::time::Duration::from_secs(self.body_timeout),
            max_connections: self.max_connections as usize,
        }
    }
}

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Address to listen on — 수신 주소
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free one, printed) — 포트
    #[arg(long, default_value_t = 21001)]
    pub port: u16,
    /// How requests for a model pick among its workers — 워커 선택 방식
    #[arg(long, value_enum, default_value_t = Dispatch::ShortestQueue)]
    pub dispatch_method: Dispatch,
    #[command(flatten)]
    pub http: HttpArgs,
}

#[derive(Debug, Args)]
pub struct InitRandomArgs {
    /// Architecture — 모델 구조
    #[arg(long, value_parser = arch_names())]
    pub arch: String,
    /// Tokenizer directory to use instead of the bundled LLaMA one; sets the vocabulary
    /// size (required for `demo`) — 사용할 토크나이저 디렉터리
    #[arg(long, value_name = "DIR")]
    pub tokenizer: Option<PathBuf>,
    /// Output directory (must not exist or be empty) — 출력 디렉터리
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Weight dtype on disk — 저장 자료형
    #[arg(long, value_enum, default_value_t = FloatType::F16)]
    pub dtype: FloatType,
    /// Key layout: LLaVA's original or llava-hf (default: the architecture's) — 키 배치
    #[arg(long, value_enum)]
    pub layout: Option<Layout>,
    /// Random seed — 시드
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: Option<BenchCommand>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Image (default: a built-in 336x336 test pattern) — 이미지
    #[arg(short, long, value_name = "PATH|URL")]
    pub image: Option<String>,
    /// Pad the prompt (image rows included) to at least this many tokens — 프롬프트 길이
    #[arg(long)]
    pub prompt_tokens: Option<usize>,
    /// Tokens to generate per run (EOS ignored) — 생성 토큰 수
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(2..))]
    pub gen_tokens: u32,
    /// Threads (default: all cores) — 스레드 수
    #[arg(long)]
    pub threads: Option<usize>,
    /// Timed runs after one warm-up; medians are reported — 반복 횟수
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,
    /// Print one JSON object — JSON 출력
    #[arg(long)]
    pub json: bool,
    /// Time a conversation of N turns instead (the image in the first, short follow-ups
    /// after it, each answered with the history as `kollava chat` does): each turn's time
    /// to first token and how much of its prompt the prefix cache supplied. The caches are
    /// emptied before each repeat — 대화 N턴의 턴별 첫 토큰 시간
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub turns: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Load a running server with concurrent streams: aggregate tokens/s and time to first
    /// token per concurrency level — 서버 부하 측정
    #[command(
        after_help = "Each level runs --requests streamed chat completions (greedy, EOS honoured)\n\
over that many connections at once and reports the tokens generated per second of wall time\n\
and the time-to-first-token percentiles.\n\n\
Examples / 예시:\n  kollava serve --port 8000 &\n  \
kollava bench serve --url http://127.0.0.1:8000 --concurrency 1,4,16 --image examples/shapes.png"
    )]
    Serve(BenchServeArgs),
    /// Time training steps: samples/s, tokens/s, where a step goes (vision, LLM forward,
    /// backward, optimizer, communication) and peak RSS; writes nothing — 학습 속도 측정
    #[command(
        after_help = "Runs --warmup untimed steps, then --steps timed ones, on the given data with the\n\
flags `kollava train` takes (stage, LoRA/QLoRA, batch size, checkpointing), and reports medians.\n\
scripts/bench_train.py runs the same steps in PyTorch beside it.\n\n\
Example / 예시:\n  kollava bench train --model target/peers/bench-train --data data/synth/pretrain.json \\\n    \
--image-folder data/synth/images --per-device-batch-size 4 --json"
    )]
    Train(Box<BenchTrainArgs>),
}

#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    #[command(flatten)]
    pub setup: TrainSetup,
    /// Timed optimizer steps — 측정 스텝 수
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub steps: u32,
    /// Untimed steps first — 예열 스텝 수
    #[arg(long, default_value_t = 2)]
    pub warmup: u32,
    /// Threads (default: all cores) — 스레드 수
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print one JSON object — JSON 출력
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchServeArgs {
    /// Server base URL — 서버 주소
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Concurrency levels (comma-separated) — 동시 요청 수 목록
    #[arg(long, default_value = "1,4,16", value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Requests per level (default: twice the level's concurrency) — 단계별 요청 수
    #[arg(long)]
    pub requests: Option<usize>,
    /// Image sent with every request as a data URL (default: none) — 함께 보낼 이미지
    #[arg(long, value_name = "PATH")]
    pub image: Option<PathBuf>,
    /// The question — 질문
    #[arg(long, default_value = "이 그림을 설명해 주세요.")]
    pub prompt: String,
    /// max_tokens of every request — 최대 생성 토큰 수
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Replay conversations of N turns: each stream asks the question (with the image),
    /// then N-1 follow-ups, each request carrying the whole history as API clients do;
    /// time to first token is reported per turn — 대화 N턴 재생
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub turns: u32,
    /// API key, when the server wants one (default: $KOLLAVA_API_KEY) — API 키
    #[arg(long)]
    pub api_key: Option<String>,
    /// Print one JSON object — JSON 출력
    #[arg(long)]
    pub json: bool,
}

/// Which checkpoint to load.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Checkpoint directory, or a hub repo id already in the local Hugging Face cache
    /// (default: the bundled demo model, models/kollava-demo) — 체크포인트 경로 또는 캐시된 허브
    /// 저장소 ID (기본값: 내장 데모 모델)
    #[arg(short, long, value_name = "DIR|REPO")]
    pub model: Option<String>,
    /// CLIP tower to use instead of the config's mm_vision_tower — mm_vision_tower 대신 쓸 CLIP 경로
    #[arg(long, value_name = "DIR|REPO")]
    pub vision_tower: Option<String>,
    /// Projector weights replacing the checkpoint's (e.g. `kollava train` output; the
    /// reference's --pretrain-mm-mlp-adapter) — 프로젝터 가중치 파일
    #[arg(long, value_name = "FILE", alias = "pretrain-mm-mlp-adapter")]
    pub projector: Option<PathBuf>,
    /// Image encoder of a GGUF --model (default: the mmproj*.gguf beside it) — GGUF 모델의
    /// 이미지 인코더
    #[arg(long, value_name = "FILE")]
    pub mmproj: Option<PathBuf>,
    /// Conversation template (default: what the reference picks from the model name) — 대화 템플릿
    #[arg(long, value_name = "NAME", value_parser = template_names())]
    pub conv_mode: Option<String>,
    /// How images are fitted to the tower (default: the checkpoint's) — 이미지 맞춤 방식
    #[arg(long, value_enum)]
    pub image_aspect: Option<AspectMode>,
    /// Weights in memory: f32 matches the Python reference to 1e-4; f16 halves memory and
    /// decode time at some precision cost; bf16 also runs the tower and prefill through our
    /// bf16 kernels (AMX, AVX512-BF16 or AVX2+FMA; fastest first token). A GGUF model keeps its
    /// stored types; auto = f32, but bf16 for a quantized GGUF model's float matrices (its
    /// tower) — 가중치 자료형
    #[arg(long, value_enum, default_value_t = ModelDtype::Auto)]
    pub dtype: ModelDtype,
    /// Memory for keys and values kept from earlier prompts and answers, so a follow-up
    /// turn or a prompt sharing a prefix (a system prompt, an image) prefills only what is
    /// new; least recently used first out. 0 turns it off (default: an eighth of the memory
    /// free after loading, 64-4096 MiB) — 이전 프롬프트·답변의 KV 캐시 용량(MiB, 0이면 끔)
    #[arg(long, value_name = "MiB")]
    pub prefix_cache_mb: Option<usize>,
    /// Memory for projected image features, so the same picture skips the vision tower
    /// (0: off; default: a quarter of the prefix cache's default) — 이미지 특징 캐시 용량(MiB)
    #[arg(long, value_name = "MiB")]
    pub image_cache_mb: Option<usize>,
}

/// How answers are sampled.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// 0 = greedy (deterministic) — 0이면 탐욕적 디코딩
    #[arg(short, long, default_value_t = 0.2, value_parser = non_negative)]
    pub temperature: f32,
    /// Nucleus sampling mass, (0, 1] — 누적 확률 상한
    #[arg(long, default_value_t = 1.0, value_parser = unit_interval)]
    pub top_p: f32,
    /// Sample among the k most likely tokens; 0 = off — 상위 k개 토큰에서 샘플링
    #[arg(long, default_value_t = 50)]
    pub top_k: usize,
    /// > 1 discourages repetition — 반복 억제 (1 = 끔)
    #[arg(long, default_value_t = 1.0, value_parser = positive)]
    pub repetition_penalty: f32,
    /// Random seed for reproducible sampling — 재현 가능한 샘플링을 위한 시드
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Longest answer in tokens — 최대 생성 토큰 수
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_new_tokens: u32,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Image file or http(s) URL — 이미지 파일 또는 URL
    #[arg(short, long, value_name = "PATH|URL")]
    pub image: Option<String>,
    /// The question — 질문
    #[arg(
        short,
        long,
        required_unless_present = "query_file",
        conflicts_with = "query_file"
    )]
    pub query: Option<String>,
    /// Read the question from a UTF-8 text file — 질문을 파일에서 읽기
    #[arg(long, value_name = "PATH")]
    pub query_file: Option<PathBuf>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// With --json: each answer token's log-probability and the N most likely tokens at
    /// its place (0-20, as OpenAI's top_logprobs) — 토큰별 로그 확률 (--json과 함께)
    #[arg(long, value_name = "N", requires = "json", value_parser = clap::value_parser!(u8).range(0..=20))]
    pub logprobs: Option<u8>,
    /// Print one JSON object (text, ids, timings) instead of streaming — JSON으로 출력
    #[arg(long)]
    pub json: bool,
    /// Answer in JSON: `object` for any JSON object, or a file holding a JSON schema the
    /// answer must validate against (decoded under its grammar, as the API's
    /// response_format) — JSON 형식으로 답하기 (object 또는 JSON 스키마 파일)
    #[arg(long, value_name = "object|SCHEMA.json")]
    pub schema: Option<String>,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Image for the first message — 첫 메시지에 붙일 이미지
    #[arg(short, long, value_name = "PATH|URL")]
    pub image: Option<String>,
    /// Keep earlier images when /image attaches another (for models trained on several
    /// images per conversation). By default a new image starts a new conversation, as
    /// LLaVA's web UI does: LLaVA-style models are trained on one image per conversation
    /// and mix two up — 새 이미지를 붙여도 이전 대화와 이미지를 유지 (기본: 새 대화 시작)
    #[arg(long)]
    pub multi_image: bool,
    /// After each answer, print to stderr how many prompt tokens were prefilled and how
    /// many came from the cache, and the time to the first token — 턴마다 캐시 재사용·첫 토큰
    /// 시간 출력
    #[arg(long)]
    pub stats: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Checkpoint directory or cached repo id — 체크포인트
    #[arg(short, long, value_name = "DIR|REPO")]
    pub model: String,
    /// Directory with reference.json and reference.safetensors — 기준 덤프 디렉터리
    #[arg(short, long, value_name = "DIR")]
    pub reference: PathBuf,
    /// CLIP tower to use instead of the config's mm_vision_tower
    #[arg(long, value_name = "DIR|REPO")]
    pub vision_tower: Option<String>,
    /// Override a tolerance: PREFIX=MAXDIFF, e.g. image.=2 — 허용 오차 변경
    #[arg(long = "tol", value_name = "PREFIX=VALUE", value_parser = parse_tol)]
    pub tolerances: Vec<(String, f64)>,
    /// Where the model runs: cpu, or cuda / cuda:N to check the GPU path against the same
    /// reference (a build with --features cuda) — 실행 장치
    #[arg(long, default_value = "cpu", value_name = "cpu|cuda[:N]", value_parser = parse_device)]
    pub device: DeviceSpec,
}

/// A device named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    match s {
        "cpu" => Ok(DeviceSpec::Cpu),
        "cuda" => Ok(DeviceSpec::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceSpec::Cuda)
            .ok_or_else(|| format!("{s:?} is not cpu, cuda or cuda:N")),
    }
}

fn non_negative(s: &str) -> Result<f32, String> {
    let v: f32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if v >= 0.0 && v.is_finite() {
        Ok(v)
    } else {
        Err(format!("{v} must be a finite number >= 0"))
    }
}

fn positive(s: &str) -> Result<f32, String> {
    let v: f32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if v > 0.0 && v.is_finite() {
        Ok(v)
    } else {
        Err(format!("{v} must be a finite number > 0"))
    }
}

fn unit_interval(s: &str) -> Result<f32, String> {
    let v: f32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if v > 0.0 && v <= 1.0 {
        Ok(v)
    } else {
        Err(format!("{v} must be in (0, 1]"))
    }
}

fn parse_tol(s: &str) -> Result<(String, f64), String> {
    let (prefix, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not PREFIX=VALUE"))?;
    let v: f64 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a number"))?;
    if v < 0.0 || !v.is_finite() {
        return Err(format!("tolerance {v} must be >= 0"));
    }
    Ok((prefix.to_string(), v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn out_of_range_top_p_is_rejected() {
        let r = Cli::try_parse_from(["kollava", "run", "-m", "x", "-q", "hi", "--top-p", "1.5"]);
        assert!(r.unwrap_err().to_string().contains("(0, 1]"));
    }
}

/// A floating-point weight type (`--dtype`, `--save-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FloatType {
    F32,
    F16,
    Bf16,
}

impl FloatType {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            FloatType::F32 => candle_core::DType::F32,
            FloatType::F16 => candle_core::DType::F16,
            FloatType::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// The weights' type in memory (`--dtype` of the model commands); `auto`: the session's
/// choice for the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelDtype {
    Auto,
    F32,
    F16,
    Bf16,
}

impl ModelDtype {
    /// `None` for `auto`.
    pub fn dtype(self) -> Option<candle_core::DType> {
        match self {
            ModelDtype::Auto => None,
            ModelDtype::F32 => Some(candle_core::DType::F32),
            ModelDtype::F16 => Some(candle_core::DType::F16),
            ModelDtype::Bf16 => Some(candle_core::DType::BF16),
        }
    }
}

/// Where training metrics go besides `metrics.jsonl` (`--report-to`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportTo {
    None,
    Tensorboard,
}

/// A checkpoint's key layout (`--layout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// transformers' llava-hf.
    Hf,
    /// LLaVA's own.
    Original,
}

/// How the controller picks a worker (`--dispatch-method`, LLaVA's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dispatch {
    Lottery,
    #[value(name = "shortest_queue")]
    ShortestQueue,
}

/// `--bits`: 4 or 16.
fn bits(s: &str) -> Result<u8, String> {
    match s {
        "4" => Ok(4),
        "16" => Ok(16),
        _ => Err("4 (QLoRA) or 16".into()),
    }
}

/// The conversation templates (`--conv-mode`, `--version`, `--template`), from their table.
fn template_names() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(kollava_inputs::template::Template::names())
}

/// `init-random`'s architectures, from the table that defines them (with what each is).
fn arch_names() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(
        kollava_checkpoint::random::ARCHS
            .iter()
            .map(|a| clap::builder::PossibleValue::new(a.name).help(a.about)),
    )
}
