//! A WebSocket client that speaks the customer's signaling JSON.

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

pub struct Signaling {
    ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
}

impl Signaling {
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        Ok(Self { ws })
    }

    pub async fn send_text(&mut self, text: impl Into<String>) -> anyhow::Result<()> {
        self.ws.send(Message::Text(text.into().into())).await?;
        Ok(())
    }

    pub async fn send_json(&mut self, v: &Value) -> anyhow::Result<()> {
        self.send_text(v.to_string()).await
    }

    /// The next JSON event, or an error on timeout or close. `video_quality` reports (the
    /// stream following the bandwidth, sent whenever it moves) are skipped: the tests that read
    /// them use an independent viewer (`slow_link`) or the page.
    pub async fn next_event(&mut self, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| anyhow::anyhow!("no event within {timeout:?}"))?;
            match msg {
                Some(Ok(Message::Text(t))) => {
                    let ev: Value = serde_json::from_str(t.as_str())?;
                    if ev["type"] == "video_quality" {
                        continue;
                    }
                    return Ok(ev);
                }
                Some(Ok(Message::Close(c))) => anyhow::bail!("socket closed: {c:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => anyhow::bail!("socket error: {e}"),
                None => anyhow::bail!("socket ended"),
            }
        }
    }

    /// Skip events until one of type `kind` arrives.
    pub async fn wait_for(&mut self, kind: &str, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let ev = self.next_event(left).await?;
            if ev["type"] == kind {
                return Ok(ev);
            }
        }
    }

    /// Skip events until one whose type is in `kinds` arrives.
    pub async fn wait_for_any(&mut self, kinds: &[&str], timeout: Duration) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let ev = self.next_event(left).await?;
            if kinds.iter().any(|k| ev["type"] == *k) {
                return Ok(ev);
            }
        }
    }

    /// Send a `webrtc_offer` the way the customer's page does.
    pub async fn send_offer(&mut self, sdp: &str, avatar: &str) -> anyhow::Result<()> {
        self.send_json(&serde_json::json!({
            "type": "webrtc_offer", "session_id": "s", "user_id": 5, "avatar_id": avatar, "sdp": sdp,
        }))
        .await
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}
