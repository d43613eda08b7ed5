//! Headless Chromium driven over the DevTools protocol (no driver download: Debian's chromium).
//!
//! [`Chromium::launch`] starts the browser on a URL with the flags WebRTC needs in a
//! loopback-only namespace, finds the page's DevTools WebSocket, and [`Chromium::eval`] runs
//! JavaScript in the page (awaiting promises) and returns the JSON value.

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

pub const CHROMIUM: &str = "/usr/bin/chromium";

pub struct Chromium {
    child: Child,
    _dir: tempfile::TempDir,
    ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    next_id: u64,
}

impl Chromium {
    pub async fn launch(url: &str) -> anyhow::Result<Self> {
        Self::launch_with(url, &[]).await
    }

    /// [`launch`](Self::launch) with more Chromium flags. With
    /// `--ignore-certificate-errors-spki-list=…` among them the page's certificate is checked as
    /// usual except for that one key (a test CA's certificate, as a browser trusts a public one),
    /// instead of every certificate error being ignored.
    pub async fn launch_with(url: &str, extra: &[String]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let pinned = extra
            .iter()
            .any(|a| a.starts_with("--ignore-certificate-errors-spki-list="));
        let child = Command::new(CHROMIUM)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--allow-loopback-in-peer-connection",
                "--disable-features=WebRtcHideLocalIpsWithMdns",
                "--autoplay-policy=no-user-gesture-required",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
            ])
            // Unless a key is pinned, the relay under test has a fresh self-signed certificate.
            .args((!pinned).then_some("--ignore-certificate-errors"))
            .args(extra)
            .arg(format!("--user-data-dir={}", dir.path().display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {CHROMIUM} (scripts/test installs it): {e}"))?;
        let port_file = dir.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(20);
        let port: u16 = loop {
            if let Some(p) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|t| t.lines().next()?.trim().parse().ok())
            {
                break p;
            }
            anyhow::ensure!(Instant::now() < deadline, "chromium did not open its DevTools port");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let page_ws = loop {
            let (_, body) = crate::cluster::http_get(addr, "/json/list").await?;
            let targets: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            let found = targets.as_array().and_then(|ts| {
                ts.iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_owned))
            });
            if let Some(ws) = found {
                break ws;
            }
            anyhow::ensure!(Instant::now() < deadline, "chromium has no page target");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (ws, _) = tokio_tungstenite::connect_async(page_ws.as_str()).await?;
        Ok(Self {
            child,
            _dir: dir,
            ws,
            next_id: 1,
        })
    }

    /// Evaluate `expression` in the page, awaiting a promise result; returns its JSON value.
    pub async fn eval(&mut self, expression: &str) -> anyhow::Result<Value> {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "awaitPromise": true, "returnByValue": true}),
            )
            .await?;
        if let Some(ex) = result.get("exceptionDetails") {
            anyhow::bail!("page threw: {ex}");
        }
        Ok(result["result"]["value"].clone())
    }

    /// Evaluate `expression` until `done` accepts its value or `timeout` passes; the last value
    /// (`null` while the page throws, e.g. before its script has loaded).
    pub async fn poll(&mut self, expression: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(expression).await.unwrap_or(Value::Null);
            if done(&v) || Instant::now() >= deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    }

    /// Send one DevTools command and return its result.
    pub async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let req = json!({"id": id, "method": method, "params": params});
        self.ws.send(Message::Text(req.to_string().into())).await?;
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(20), self.ws.next())
                .await
                .map_err(|_| anyhow::anyhow!("DevTools did not answer {method}"))?
                .ok_or_else(|| anyhow::anyhow!("DevTools socket closed"))??;
            let Message::Text(text) = msg else { continue };
            let v: Value = serde_json::from_str(text.as_str())?;
            if v["id"] != id {
                continue;
            }
            if let Some(error) = v.get("error") {
                anyhow::bail!("{method} failed: {error}");
            }
            return Ok(v["result"].clone());
        }
    }

    /// Lay the page out as on a screen `width` × `height` CSS pixels (`mobile`: a phone's
    /// viewport and touch).
    pub async fn viewport(&mut self, width: u32, height: u32, mobile: bool) -> anyhow::Result<()> {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        )
        .await?;
        self.call("Emulation.setTouchEmulationEnabled", json!({"enabled": mobile}))
            .await?;
        Ok(())
    }

    /// A PNG of what the page shows now, written to `path`.
    pub async fn screenshot(&mut self, path: &std::path::Path) -> anyhow::Result<()> {
        use base64::Engine;
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"})).await?;
        let data = shot["data"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("no screenshot data"))?;
        let png = base64::engine::general_purpose::STANDARD.decode(data)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The page's session state (`live` once it plays), as a JavaScript expression.
pub const SESSION_STATE: &str =
    "window.avatarEdge && window.avatarEdge.state.session ? window.avatarEdge.state.session.state : 'none'";

/// A JavaScript expression: the mean luma of the built-in avatar's mouth area in the page's video
/// (`window.avatarEdge.lumaAt`), `null` before the first picture.
pub fn mouth_luma() -> String {
    let m = avatar_worker::talk::face::mouth_area(avatar_worker::media::avatar::synthetic_face_box(512, 512), 512, 512);
    format!(
        "window.avatarEdge.lumaAt({}, {}, {}, {})",
        m.x,
        m.y,
        m.x + m.w,
        m.y + m.h
    )
}

/// Chromium flags for a fake microphone that plays `wav` once, permission granted.
pub fn fake_microphone(wav: &std::path::Path) -> Vec<String> {
    vec![
        "--use-fake-ui-for-media-stream".into(),
        "--use-fake-device-for-media-stream".into(),
        format!("--use-file-for-fake-audio-capture={}%noloop", wav.display()),
    ]
}
