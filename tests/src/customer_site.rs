//! The customer's own web site, on its own origin (a real HTTP server on loopback), with the pages
//! a school puts in front of its students, and what headless Chromium measures on them.
//!
//! The pages ([`Page`]):
//! * the test page from the original design notes (`tests/web/test_webrtc.html`), as written;
//! * the same page with the two lines docs/integration.md tells integrators to add before
//!   `createOffer()`;
//! * the page as written plus one `<script>` tag loading the relay's `compat.js`;
//! * a page written against the SDK, imported from the relay, with or without its audio warm-up.
//!
//! [`first_frame`] opens one in a fresh Chromium, a browser that has played no sound yet (a
//! student's first visit), connects as a user would, and times connect → first frame shown.

use crate::cdp::Chromium;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The design notes' page, with `{{RELAY}}` and `{{HEAD}}` to fill.
const OLD_PAGE: &str = include_str!("../web/test_webrtc.html");

/// The notes' call, and the same call after the documented fix.
const OLD_OFFER: &str = "const offer = await peerConnection.createOffer();";
const FIXED_OFFER: &str = "peerConnection.addTransceiver('video', { direction: 'recvonly' });\n      \
     peerConnection.addTransceiver('audio', { direction: 'recvonly' });\n      \
     const offer = await peerConnection.createOffer();";

/// A page of the customer's site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// The notes' page exactly as written: its offer has no media sections.
    OldAsWritten,
    /// The notes' page with the two `addTransceiver` lines the docs ask for.
    OldFixedInline,
    /// The notes' page as written, plus `<script src="…/compat.js">` in its head.
    OldWithCompat,
    /// A page on the SDK (`connect()` on load); `warm_audio: false` turns its audio warm-up off.
    Sdk { warm_audio: bool },
}

impl Page {
    fn path(self) -> &'static str {
        match self {
            Page::OldAsWritten => "old.html",
            Page::OldFixedInline => "old-fixed.html",
            Page::OldWithCompat => "old-compat.html",
            Page::Sdk { warm_audio: true } => "sdk.html",
            Page::Sdk { warm_audio: false } => "sdk-no-warm-up.html",
        }
    }

    /// What a table calls it.
    pub fn label(self) -> &'static str {
        match self {
            Page::OldAsWritten => "design notes' page, as written",
            Page::OldFixedInline => "design notes' page, two-line fix inline",
            Page::OldWithCompat => "design notes' page + compat.js",
            Page::Sdk { warm_audio: true } => "SDK page",
            Page::Sdk { warm_audio: false } => "SDK page, warmAudio: false",
        }
    }

    fn html(self, relay: SocketAddr) -> String {
        let old = |head: &str| {
            OLD_PAGE
                .replace("{{RELAY}}", &relay.to_string())
                .replace("{{HEAD}}", head)
        };
        match self {
            Page::OldAsWritten => old(""),
            Page::OldFixedInline => old("").replacen(OLD_OFFER, FIXED_OFFER, 1),
            Page::OldWithCompat => old(&format!("  <script src=\"http://{relay}/compat.js\"></script>")),
            Page::Sdk { warm_audio } => format!(
                r#"<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>Tutor</title></head>
<body>
  <video id="tutor" autoplay playsinline muted></video>
  <script type="module">
    import {{ connect }} from 'http://{relay}/avatar-edge.js';
    const video = document.getElementById('tutor');
    // Timed from the call, so that what the SDK does before its socket opens counts too.
    const page = window.page = {{ t0: performance.now() }};
    video.requestVideoFrameCallback(() => {{ page.shown = performance.now() - page.t0; }});
    page.session = await connect({{ url: 'http://{relay}', avatarId: 'avatar_tutor_13', video, warmAudio: {warm_audio} }});
  </script>
</body>
</html>
"#
            ),
        }
    }
}

/// The customer's web server. Stops when dropped.
pub struct CustomerSite {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CustomerSite {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CustomerSite {
    /// Serve the pages, talking to the relay whose HTTP address is `relay`.
    pub async fn start(relay: SocketAddr) -> Self {
        let app = Router::new().route("/{page}", get(page)).with_state(Arc::new(relay));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, task }
    }

    pub fn url(&self, page: Page) -> String {
        format!("http://{}/{}", self.addr, page.path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_variant_of_the_old_page_is_what_it_says() {
        let relay: SocketAddr = ([127, 0, 0, 1], 8080).into();
        let as_written = Page::OldAsWritten.html(relay);
        assert!(as_written.contains("ws://127.0.0.1:8080/ws/") && !as_written.contains("{{"));
        assert_eq!(as_written.matches(OLD_OFFER).count(), 1, "the notes' one offer");
        assert!(!as_written.contains("addTransceiver") && !as_written.contains("/compat.js"));
        let fixed = Page::OldFixedInline.html(relay);
        assert_eq!(fixed.matches("addTransceiver").count(), 2);
        let compat = Page::OldWithCompat.html(relay);
        assert!(compat.contains("<script src=\"http://127.0.0.1:8080/compat.js\"></script>\n</head>"));
        assert!(!compat.contains("addTransceiver"));
    }
}

async fn page(State(relay): State<Arc<SocketAddr>>, Path(name): Path<String>) -> impl IntoResponse {
    let pages = [
        Page::OldAsWritten,
        Page::OldFixedInline,
        Page::OldWithCompat,
        Page::Sdk { warm_audio: true },
        Page::Sdk { warm_audio: false },
    ];
    match pages.into_iter().find(|p| p.path() == name) {
        // The notes' page has no <meta charset>: the header says it (see reference.md).
        Some(p) => ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], p.html(*relay)).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Connect → first frame on one page load, ms (`performance.now()` in the page).
#[derive(Debug, Clone, Copy)]
pub struct FirstFrame {
    /// To the first frame shown (`requestVideoFrameCallback`). "Connect" is the click on the old
    /// page's Connect button, and the SDK page's call of `connect()` (on load).
    pub shown_ms: f64,
    /// To the answer applied.
    pub answer_ms: f64,
    /// To the peer's `connected`.
    pub connected_ms: f64,
}

/// How long a user looks at the old page before clicking Connect.
const CLICK_AFTER: Duration = Duration::from_secs(1);

/// Open `page` in a fresh Chromium and time its first frame (the old page's Connect is clicked
/// as a user clicks it). With `then_talk`, press the page's
/// Send button afterwards and require the avatar's voice (audio energy) within 10 s.
pub async fn first_frame(site: &CustomerSite, page: Page, then_talk: bool) -> anyhow::Result<FirstFrame> {
    // Chromium's own autoplay policy, not the tests' "no gesture required": sound plays only
    // after a click, and an AudioContext made before one starts suspended.
    let policy = ["--autoplay-policy=document-user-activation-required".to_owned()];
    let mut browser = Chromium::launch_with(&site.url(page), &policy).await?;
    let timing = match page {
        Page::Sdk { .. } => sdk_first_frame(&mut browser).await?,
        _ => old_page_first_frame(&mut browser).await?,
    };
    if then_talk {
        anyhow::ensure!(
            matches!(page, Page::OldWithCompat | Page::OldFixedInline),
            "talks on the old page"
        );
        talk_on_old_page(&mut browser).await?;
    }
    Ok(timing)
}

async fn old_page_first_frame(browser: &mut Chromium) -> anyhow::Result<FirstFrame> {
    let open = browser
        .poll(
            "typeof websocket !== 'undefined' && websocket.readyState === WebSocket.OPEN",
            Duration::from_secs(15),
            |v| v == true,
        )
        .await;
    anyhow::ensure!(open == true, "the page's socket never opened");
    tokio::time::sleep(CLICK_AFTER).await;
    // Timers first. A capturing listener notes the click before the button's own handler runs;
    // that handler (connectWebRTC) creates `peerConnection` before its first await, so a task
    // queued from the click sees it, long before the answer can come.
    browser
        .eval(
            "(() => {
               const video = document.getElementById('avatar-video');
               const ff = window.firstFrame = {};
               const since = () => performance.now() - ff.t0;
               video.requestVideoFrameCallback(() => { ff.shown = since(); });
               document.addEventListener('click', () => {
                 ff.t0 = performance.now();
                 setTimeout(() => {
                   peerConnection.addEventListener('signalingstatechange', () => {
                     if (peerConnection.signalingState === 'stable') ff.answer ??= since();
                   });
                   peerConnection.addEventListener('connectionstatechange', () => {
                     if (peerConnection.connectionState === 'connected') ff.connected ??= since();
                   });
                 });
               }, { capture: true, once: true });
               return true;
             })()",
        )
        .await?;
    // A real click on the Connect button: a user gesture, as the page's unmuted video needs.
    let at = browser
        .eval(
            "(() => { const b = document.querySelector('button'); b.scrollIntoView({ block: 'center' }); \
                   const r = b.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()",
        )
        .await?;
    let (x, y) = (at[0].as_f64().unwrap_or(0.0), at[1].as_f64().unwrap_or(0.0));
    for kind in ["mousePressed", "mouseReleased"] {
        let click = json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1});
        browser.call("Input.dispatchMouseEvent", click).await?;
    }
    let ff = browser
        .poll("window.firstFrame", Duration::from_secs(10), |v| v["shown"].is_number())
        .await;
    timing(&ff, ("shown", "answer", "connected"))
}

async fn sdk_first_frame(browser: &mut Chromium) -> anyhow::Result<FirstFrame> {
    // The SDK times its steps from its socket's opening: moved to the page's call of connect().
    let steps = browser
        .poll(
            "(() => { const p = window.page; if (!p || !p.session || p.shown === undefined) return null; \
              const c = p.session.timing.connect, off = p.session.openedAt - p.t0; \
              return { shown: p.shown, answer: c.answerMs + off, connected: c.connectedMs + off }; })()",
            Duration::from_secs(15),
            |v| v["shown"].is_number(),
        )
        .await;
    timing(&steps, ("shown", "answer", "connected"))
}

fn timing(v: &Value, (shown, answer, connected): (&str, &str, &str)) -> anyhow::Result<FirstFrame> {
    let ms = |k: &str| v[k].as_f64().ok_or_else(|| anyhow::anyhow!("no {k} in {v}"));
    Ok(FirstFrame {
        shown_ms: ms(shown)?,
        answer_ms: ms(answer)?,
        connected_ms: ms(connected)?,
    })
}

/// Press Send (the page's `sendMessage()`, 你好，请介绍一下自己) and wait for the avatar's voice:
/// the received audio's energy (silence while idle) rising.
async fn talk_on_old_page(browser: &mut Chromium) -> anyhow::Result<()> {
    const ENERGY: &str = "peerConnection.getStats().then(s => { let e = 0; \
        s.forEach(r => { if (r.type === 'inbound-rtp' && r.kind === 'audio') e = r.totalAudioEnergy || 0; }); return e; })";
    let idle = browser.eval(ENERGY).await?.as_f64().unwrap_or(0.0);
    browser.eval("sendMessage(), true").await?;
    let spoken = browser
        .poll(ENERGY, Duration::from_secs(10), |v| {
            v.as_f64().unwrap_or(0.0) > idle + 0.01
        })
        .await;
    anyhow::ensure!(
        spoken.as_f64().unwrap_or(0.0) > idle + 0.01,
        "no voice after Send: audio energy {idle} → {spoken}"
    );
    Ok(())
}
