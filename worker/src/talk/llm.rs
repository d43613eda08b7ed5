//! The language model stage: a conversation in, a stream of text deltas out.
//!
//! * [`ScriptedLlm`]: built in, needs no service. It answers in the user's language (Chinese if the
//!   message has CJK ideographs, else English), word by word, so the demo and the tests exercise the
//!   whole streaming path offline.
//! * [`OpenAiLlm`]: any OpenAI-compatible `POST {base_url}/chat/completions` with `stream: true`,
//!   read as server-sent events (`data: {json}` lines, `data: [DONE]` at the end). Every wait is
//!   bounded: connecting, the first event and the gap between events.

use super::sentences::is_chinese;
use super::TalkError;
use futures::future::BoxFuture;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

/// A chat model that streams its answer as text deltas into `out`. Returns when the answer is
/// complete; dropping the future cancels the request.
pub trait Llm: Send + Sync {
    fn name(&self) -> String;
    fn stream<'a>(
        &'a self,
        messages: &'a [ChatMessage],
        out: mpsc::Sender<String>,
    ) -> BoxFuture<'a, Result<(), TalkError>>;
}

/// The built-in responder.
#[derive(Debug, Clone)]
pub struct ScriptedLlm {
    /// Pause between words, as a hosted model's token rate.
    pub delay: Duration,
}

impl ScriptedLlm {
    pub fn reply_to(text: &str) -> String {
        let quoted: String = text.trim().chars().take(40).collect();
        if is_chinese(text) {
            format!(
                "你好！你刚才说：{quoted}。我是内置的演示导师，不需要任何外部服务。配置一个大语言模型以后，我会认真回答你的问题。"
            )
        } else {
            format!(
                "Hello! You said: {quoted}. I am the built-in demo tutor, and I need no outside service. \
                 Connect a language model and I will answer your questions properly."
            )
        }
    }
}

impl Llm for ScriptedLlm {
    fn name(&self) -> String {
        "scripted".into()
    }

    fn stream<'a>(
        &'a self,
        messages: &'a [ChatMessage],
        out: mpsc::Sender<String>,
    ) -> BoxFuture<'a, Result<(), TalkError>> {
        Box::pin(async move {
            let last = messages
                .iter()
                .rev()
                .find(|m| m.role == Role::User)
                .map(|m| m.content.as_str())
                .unwrap_or_default();
            let reply = Self::reply_to(last);
            // Deltas as a model sends them: a word (with its space) or two CJK characters.
            let mut piece = String::new();
            for c in reply.chars() {
                piece.push(c);
                let cjk = is_chinese(&piece);
                if (c == ' ' && !cjk) || (cjk && piece.chars().count() >= 2) || "，。！？".contains(c) {
                    if out.send(std::mem::take(&mut piece)).await.is_err() {
                        return Ok(());
                    }
                    tokio::time::sleep(self.delay).await;
                }
            }
            if !piece.is_empty() {
                let _ = out.send(piece).await;
            }
            Ok(())
        })
    }
}

/// An OpenAI-compatible chat-completions endpoint.
pub struct OpenAiLlm {
    pub client: reqwest::Client,
    pub base_url: String,
    pub model: String,
    pub api_key: Option<String>,
    pub temperature: Option<f32>,
    /// Longest wait for the response head, the first event, and between events.
    pub timeout: Duration,
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Delta,
}

#[derive(Deserialize, Default)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

impl Llm for OpenAiLlm {
    fn name(&self) -> String {
        format!("openai:{} at {}", self.model, self.base_url)
    }

    fn stream<'a>(
        &'a self,
        messages: &'a [ChatMessage],
        out: mpsc::Sender<String>,
    ) -> BoxFuture<'a, Result<(), TalkError>> {
        Box::pin(async move {
            let url = format!("{}/chat/completions", self.base_url.trim_end_matches('/'));
            let mut body = serde_json::json!({ "model": self.model, "messages": messages, "stream": true });
            if let Some(t) = self.temperature {
                body["temperature"] = serde_json::json!(t);
            }
            let mut req = self.client.post(&url).json(&body);
            if let Some(key) = &self.api_key {
                req = req.bearer_auth(key);
            }
            let response = tokio::time::timeout(self.timeout, req.send())
                .await
                .map_err(|_| TalkError::Timeout("the language model did not answer"))?
                .map_err(|e| TalkError::Llm(format!("request failed: {}", without_url(&e))))?;
            let status = response.status();
            if !status.is_success() {
                let body = read_capped(response, ERROR_BODY_LIMIT).await.unwrap_or_default();
                return Err(TalkError::Llm(format!(
                    "HTTP {status}: {}",
                    snippet(&String::from_utf8_lossy(&body))
                )));
            }
            let mut bytes = response.bytes_stream();
            let mut buf = Vec::new();
            loop {
                let next = tokio::time::timeout(self.timeout, bytes.next())
                    .await
                    .map_err(|_| TalkError::Timeout("the language model stopped sending"))?;
                let Some(chunk) = next else {
                    return Ok(()); // the server closed the stream without [DONE]: take what came
                };
                let chunk = chunk.map_err(|e| TalkError::Llm(format!("stream broke: {}", without_url(&e))))?;
                buf.extend_from_slice(&chunk);
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let line = String::from_utf8_lossy(&line);
                    let line = line.trim();
                    let Some(data) = line.strip_prefix("data:") else {
                        continue; // comments, `event:` and blank separators
                    };
                    let data = data.trim();
                    if data == "[DONE]" {
                        return Ok(());
                    }
                    let chunk: Chunk = serde_json::from_str(data)
                        .map_err(|e| TalkError::Llm(format!("bad event from the model: {e}: {}", snippet(data))))?;
                    for choice in chunk.choices {
                        if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
                            if out.send(text).await.is_err() {
                                return Ok(());
                            }
                        }
                    }
                }
                if buf.len() > 1 << 20 {
                    return Err(TalkError::Llm("an event line longer than 1 MiB".into()));
                }
            }
        })
    }
}

/// How much of an error response is read (only a snippet is reported).
pub(crate) const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// Read a response body, refusing one larger than `limit` bytes (a server cannot make the worker
/// buffer without bound).
pub(crate) async fn read_capped(response: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| without_url(&e))?;
        if body.len() + chunk.len() > limit {
            return Err(format!("the response is larger than {limit} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Send `req` and read the whole answer (at most `limit` bytes): the body of a success, or an
/// error naming what failed, for the stage to wrap (`what`: what the body is, e.g. "the audio").
pub(crate) async fn fetch(req: reqwest::RequestBuilder, limit: usize, what: &str) -> Result<Vec<u8>, String> {
    let response = req
        .send()
        .await
        .map_err(|e| format!("request failed: {}", without_url(&e)))?;
    let status = response.status();
    let cap = if status.is_success() { limit } else { ERROR_BODY_LIMIT };
    let body = read_capped(response, cap)
        .await
        .map_err(|e| format!("reading {what}: {e}"))?;
    if !status.is_success() {
        return Err(format!("HTTP {status}: {}", snippet(&String::from_utf8_lossy(&body))));
    }
    Ok(body)
}

/// A reqwest error without its URL (which may carry a key in a query string).
pub(crate) fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(url.as_str(), "<url>");
    }
    s
}

pub(crate) fn snippet(s: &str) -> String {
    let s: String = s.chars().take(200).collect();
    s.replace(['\n', '\r'], " ")
}
