//! The speech-recognition stage: one utterance in, its text out.
//!
//! [`OpenAiAsr`] speaks the OpenAI transcription protocol, `POST {base_url}/audio/transcriptions`
//! with a multipart form (`file` as 16 kHz mono WAV, `model`, `language`, `prompt`,
//! `response_format=json`), which whisper.cpp's server, faster-whisper servers, vLLM and the hosted
//! APIs all accept. The demo runs scripts/asr-server.py (faster-whisper, offline). Like the other
//! stages it is bounded by a timeout and a cancelled turn drops the request.

use super::llm::{fetch, snippet};
use super::TalkError;
use futures::future::BoxFuture;
use std::time::Duration;

/// How soon a transcript is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    /// Someone waits for it: a pause's or a whole utterance's.
    Now,
    /// A partial transcript, worth having only if it costs nobody a wait. The request says so
    /// in the header [`PRIORITY_HEADER`]` : low`, which scripts/asr-server.py serves after every
    /// other (other servers ignore it).
    Idle,
}

/// The request header that marks a partial transcript's request.
pub const PRIORITY_HEADER: &str = "x-avatar-edge-priority";

pub trait Asr: Send + Sync {
    fn name(&self) -> String;
    /// `pcm`: mono at [`super::vad::RATE`]. `language`: a code like `en`, or `None` to detect.
    fn transcribe<'a>(
        &'a self,
        pcm: &'a [f32],
        language: Option<&'a str>,
        urgency: Urgency,
    ) -> BoxFuture<'a, Result<String, TalkError>>;
    /// Whether the recogniser answers at all (any HTTP answer but a server error counts; a
    /// refused or timed-out connection does not): voice input is offered only while it does.
    fn reachable(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

/// How long [`Asr::reachable`] waits for an answer.
pub const REACHABLE_WITHIN: Duration = Duration::from_secs(3);

/// Largest transcript accepted (the text of a minute of speech is a few kilobytes).
const MAX_TRANSCRIPT_BYTES: usize = 256 * 1024;

pub struct OpenAiAsr {
    pub client: reqwest::Client,
    pub base_url: String,
    pub model: String,
    pub api_key: Option<String>,
    pub prompt: Option<String>,
    pub timeout: Duration,
}

/// 16-bit PCM WAV of `pcm` at `rate`.
pub fn wav_bytes(pcm: &[f32], rate: u32) -> Result<Vec<u8>, TalkError> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut out = std::io::Cursor::new(Vec::with_capacity(44 + pcm.len() * 2));
    let err = |e: hound::Error| TalkError::Asr(format!("encoding the utterance: {e}"));
    let mut writer = hound::WavWriter::new(&mut out, spec).map_err(err)?;
    for s in pcm {
        writer
            .write_sample((s.clamp(-1.0, 1.0) * f32::from(i16::MAX)) as i16)
            .map_err(err)?;
    }
    writer.finalize().map_err(err)?;
    Ok(out.into_inner())
}

impl Asr for OpenAiAsr {
    fn name(&self) -> String {
        format!("openai:{} at {}", self.model, self.base_url)
    }

    fn reachable(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let url = format!("{}/models", self.base_url.trim_end_matches('/'));
            match tokio::time::timeout(REACHABLE_WITHIN, self.client.get(&url).send()).await {
                // A proxy in front of a recogniser that is down answers 502/503.
                Ok(Ok(r)) if r.status().is_server_error() => Err(format!("{url}: HTTP {}", r.status())),
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => {
                    // reqwest's own text is "error sending request"; the cause is below it.
                    let mut why = e.to_string();
                    let mut source = std::error::Error::source(&e);
                    while let Some(cause) = source {
                        why = format!("{why}: {cause}");
                        source = cause.source();
                    }
                    Err(format!("{url}: {}", snippet(&why)))
                }
                Err(_) => Err(format!("{url}: no answer within {REACHABLE_WITHIN:?}")),
            }
        })
    }

    fn transcribe<'a>(
        &'a self,
        pcm: &'a [f32],
        language: Option<&'a str>,
        urgency: Urgency,
    ) -> BoxFuture<'a, Result<String, TalkError>> {
        Box::pin(async move {
            let url = format!("{}/audio/transcriptions", self.base_url.trim_end_matches('/'));
            let wav = wav_bytes(pcm, super::vad::RATE)?;
            let file = reqwest::multipart::Part::bytes(wav)
                .file_name("utterance.wav")
                .mime_str("audio/wav")
                .map_err(|e| TalkError::Asr(e.to_string()))?;
            let mut form = reqwest::multipart::Form::new()
                .part("file", file)
                .text("model", self.model.clone())
                .text("response_format", "json");
            if let Some(language) = language {
                form = form.text("language", language.to_owned());
            }
            if let Some(prompt) = &self.prompt {
                form = form.text("prompt", prompt.clone());
            }
            let mut req = self.client.post(&url).multipart(form);
            if let Some(key) = &self.api_key {
                req = req.bearer_auth(key);
            }
            if urgency == Urgency::Idle {
                req = req.header(PRIORITY_HEADER, "low");
            }
            let work = async {
                let body = fetch(req, MAX_TRANSCRIPT_BYTES, "the transcript")
                    .await
                    .map_err(TalkError::Asr)?;
                parse_transcript(&body)
            };
            tokio::time::timeout(self.timeout, work)
                .await
                .map_err(|_| TalkError::Timeout("speech recognition took too long"))?
        })
    }
}

/// The `text` of a JSON transcription response.
fn parse_transcript(body: &[u8]) -> Result<String, TalkError> {
    #[derive(serde::Deserialize)]
    struct Transcription {
        text: String,
    }
    serde_json::from_slice::<Transcription>(body)
        .map(|t| t.text.trim().to_owned())
        .map_err(|e| {
            TalkError::Asr(format!(
                "not a transcription ({e}): {}",
                snippet(&String::from_utf8_lossy(body))
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_utterance_travels_as_a_16_bit_wav() {
        let pcm: Vec<f32> = (0..1600).map(|i| ((i as f32) * 0.05).sin() * 0.5).collect();
        let wav = wav_bytes(&pcm, 16_000).expect("wav");
        assert_eq!(&wav[..4], b"RIFF");
        let back = super::super::audio::decode_wav(&wav).expect("decode");
        assert_eq!(back.rate, 16_000);
        assert_eq!(back.samples.len(), 1600);
        assert!((back.samples[100] - pcm[100]).abs() < 1e-3);
    }

    #[test]
    fn transcripts_are_read_and_bad_bodies_named() {
        assert_eq!(
            parse_transcript(br#"{"text": " Hello there. "}"#).expect("ok"),
            "Hello there."
        );
        let err = parse_transcript(b"<html>502</html>").expect_err("not json");
        assert!(err.to_string().contains("speech recognition"), "{err}");
        assert!(err.to_string().contains("502"), "{err}");
    }
}
