//! Voice-input helpers: the demo's offline speech recognition as a child process, and spoken
//! questions for fake microphones.
//!
//! [`AsrServer`] runs `scripts/asr-server.py` (faster-whisper with the Whisper base model, both
//! installed into `.tools/asr` by `scripts/install-deps`) on a free loopback port: a real
//! recogniser speaking the OpenAI transcription protocol, as `scripts/demo` starts it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub struct AsrServer {
    pub addr: SocketAddr,
    child: Child,
    pub log: PathBuf,
}

impl Drop for AsrServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl AsrServer {
    /// Start it and wait until it answers `/health` (loading the model takes about a second).
    pub async fn start(log_dir: &Path) -> Self {
        Self::start_with(log_dir, &[]).await
    }

    /// The same with more arguments (`--window full`: the 30 s window of the old path).
    pub async fn start_with(log_dir: &Path, args: &[&str]) -> Self {
        let port = crate::turnutils::free_port("127.0.0.1");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let python = root().join(".tools/asr/bin/python");
        let log = log_dir.join(format!("asr-server-{port}.log"));
        let out = std::fs::File::create(&log).expect("asr log");
        let child = Command::new(&python)
            .arg(root().join("scripts/asr-server.py"))
            .args(["--listen", &addr.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e} (run scripts/install-deps)", python.display()));
        let server = Self { addr, child, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = crate::cluster::http_get(addr, "/health").await {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "the ASR server did not start: {}",
                crate::cluster::log_text(&server.log)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

/// `text` spoken by espeak-ng (`voice`, 150 words a minute), mono, at `rate`.
pub fn speak(voice: &str, text: &str, rate: u32) -> Vec<f32> {
    let out = Command::new("espeak-ng")
        .args(["--stdout", "-b", "1", "-s", "150", "-v", voice, text])
        .output()
        .expect("espeak-ng (scripts/install-deps)");
    assert!(
        out.status.success(),
        "espeak-ng: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pcm = avatar_worker::talk::audio::decode_wav(&out.stdout).expect("espeak's WAV");
    avatar_worker::talk::audio::resample(&pcm, rate).expect("resample")
}

/// A 16-bit mono WAV file of `pcm` at `rate`, with `before` and `after` seconds of silence.
pub fn write_wav(path: &Path, pcm: &[f32], rate: u32, before: f32, after: f32) {
    let mut all = vec![0.0; (before * rate as f32) as usize];
    all.extend_from_slice(pcm);
    all.extend(std::iter::repeat_n(0.0, (after * rate as f32) as usize));
    let bytes = avatar_worker::talk::asr::wav_bytes(&all, rate).expect("wav");
    std::fs::write(path, bytes).expect("write wav");
}

/// The fixed set of spoken questions that speech recognition is measured on (`bench-asr`, and
/// `voice.rs`): a tutor's questions, spoken by espeak-ng's `en-us` voice.
pub const QUESTIONS_EN: [&str; 20] = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Why is the sky blue?",
    "Can you explain fractions to me?",
    "What is two plus two?",
    "Who wrote Romeo and Juliet?",
    "How far away is the moon?",
    "What is the biggest animal in the ocean?",
    "Why do leaves change colour in autumn?",
    "How do plants make their food?",
    "What is the square root of sixty four?",
    "Can you help me with my homework?",
    "What does a noun mean?",
    "How many days are there in a year?",
    "Why do we need to sleep?",
    "What is the difference between weather and climate?",
    "How does a rainbow form?",
    "Tell me a story about a dragon.",
    "What time is it in London?",
    "How do you spell elephant?",
];

/// The same in Chinese, spoken by espeak-ng's `cmn-latn-pinyin` voice (measured per character).
pub const QUESTIONS_ZH: [&str; 10] = [
    "法国的首都是哪里？",
    "蜘蛛有几条腿？",
    "天空为什么是蓝色的？",
    "请给我讲讲分数。",
    "二加二等于几？",
    "我想学习数学。",
    "月亮离地球有多远？",
    "今天的天气怎么样？",
    "你能帮我做作业吗？",
    "一年有多少天？",
];

/// The espeak-ng voices that speak each set: three English (American, British, a female
/// variant), two Chinese.
pub const VOICES_EN: [&str; 3] = ["en-us", "en", "en-us+f3"];
pub const VOICES_ZH: [&str; 2] = ["cmn-latn-pinyin", "cmn-latn-pinyin+f3"];

/// `[talk.asr] prompt` for Chinese: "What follows are sentences in Mandarin." (it asks for
/// simplified characters, as docs/models.md advises).
pub const ZH_PROMPT: &str = "以下是普通话的句子。";

/// How a recogniser did on a set of spoken questions.
#[derive(Debug, Default, Clone)]
pub struct Score {
    pub errors: usize,
    pub units: usize,
    /// Milliseconds per question, sorted.
    pub ms: Vec<f64>,
    /// What it misheard: (said, heard).
    pub misheard: Vec<(String, String)>,
}

impl Score {
    pub fn rate(&self) -> f64 {
        self.errors as f64 / self.units.max(1) as f64
    }
}

/// Each of `questions` spoken by each of `voices`, recognised at `base_url` as the worker asks
/// (`OpenAiAsr`, a 16 kHz WAV, `language`, `prompt`).
pub async fn score(
    base_url: &str,
    questions: &[&str],
    voices: &[&str],
    language: &str,
    prompt: Option<&str>,
) -> anyhow::Result<Score> {
    use avatar_worker::talk::asr::{Asr, OpenAiAsr, Urgency};
    let asr = OpenAiAsr {
        client: reqwest::Client::new(),
        base_url: base_url.to_owned(),
        model: "whisper-1".into(),
        api_key: None,
        prompt: prompt.map(str::to_owned),
        timeout: Duration::from_secs(60),
    };
    let mut score = Score::default();
    for voice in voices {
        for q in questions {
            let pcm = speak(voice, q, 16_000);
            let started = Instant::now();
            let heard = asr.transcribe(&pcm, Some(language), Urgency::Now).await?;
            score.ms.push(started.elapsed().as_secs_f64() * 1e3);
            let (e, n) = errors(q, &heard);
            if e > 0 {
                score.misheard.push(((*q).to_owned(), heard));
            }
            score.errors += e;
            score.units += n;
        }
    }
    score.ms.sort_by(f64::total_cmp);
    Ok(score)
}

/// The units an error rate counts: English words (lower case, punctuation dropped, digits
/// spelled out, British and American spelling alike), or Chinese characters.
pub fn tokens(text: &str) -> Vec<String> {
    let is_cjk = |c: char| ('\u{3400}'..='\u{9fff}').contains(&c);
    if text.chars().any(is_cjk) {
        return text
            .chars()
            .filter(|c| is_cjk(*c) || c.is_alphanumeric())
            .map(String::from)
            .collect();
    }
    let spelled = |w: &str| -> Option<&'static str> {
        Some(match w {
            "0" => "zero",
            "1" => "one",
            "2" => "two",
            "3" => "three",
            "4" => "four",
            "5" => "five",
            "6" => "six",
            "7" => "seven",
            "8" => "eight",
            "9" => "nine",
            "10" => "ten",
            "64" => "sixty four",
            _ => return None,
        })
    };
    let lower = text.to_lowercase().replace("colour", "color");
    let cleaned: String = lower
        .chars()
        .map(|c| if c.is_alphanumeric() || c == '\'' { c } else { ' ' })
        .collect();
    cleaned
        .split_whitespace()
        .flat_map(|w| {
            spelled(w)
                .unwrap_or(w)
                .split(' ')
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Word (or character) errors of `heard` against `said`: the edit distance between their
/// [`tokens`], and how many tokens `said` has.
pub fn errors(said: &str, heard: &str) -> (usize, usize) {
    let (a, b) = (tokens(said), tokens(heard));
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, x) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, y) in b.iter().enumerate() {
            let next = (row[j + 1] + 1).min(row[j] + 1).min(diagonal + usize::from(x != y));
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    (row[b.len()], a.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_count_words_and_characters() {
        assert_eq!(errors("What is two plus two?", "what is 2 plus two"), (0, 5));
        assert_eq!(
            errors("What is the capital of France?", "What is the capital and friends?"),
            (2, 6)
        );
        assert_eq!(errors("Why is the sky blue?", ""), (5, 5), "every word missing");
        assert_eq!(errors("蜘蛛有几条腿？", "蜘蛛有几条腿。"), (0, 6));
        assert_eq!(errors("我想学习数学。", "我想学习付血。"), (2, 6));
    }
}
