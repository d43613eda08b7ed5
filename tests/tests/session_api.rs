//! The session API (issue 28): the operator's backend drives a session through `/api/v1/...` on
//! the relay, with a key. Real relay and worker processes, a Rust WebRTC receiver that decodes
//! the pictures and the audio, and a real HTTP server speaking the OpenAI API as the language
//! model (so a test can tell whether the model was asked).

use avatar_edge_tests::cluster::{http_request, Cluster, SECRET};
use avatar_edge_tests::netns;
use avatar_edge_tests::openai::OpenAiServer;
use avatar_edge_tests::rtc_client::{ReceiverStats, RtcClient};
use avatar_edge_tests::signaling::Signaling;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const KEY: &str = "backend-key-0123456789abcdef0123456789";
const SECS: fn(u64) -> Duration = Duration::from_secs;

fn api_keys(extra: &str) -> String {
    format!("[api]\nmax_text_chars = 400\n{extra}\n[[api.keys]]\nname = \"backend\"\nkey = \"{KEY}\"\n")
}

/// Call the API on `addr` with the test key; the status and the JSON body (`Null` if none).
async fn call(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    call_with(addr, method, path, Some(KEY), body.map(|b| b.to_string()).as_deref()).await
}

async fn call_with(addr: SocketAddr, method: &str, path: &str, key: Option<&str>, body: Option<&str>) -> (u16, Value) {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = auth.as_deref() {
        headers.push(("Authorization", a));
    }
    let (status, text) = http_request(addr, method, path, &headers, body.unwrap_or("").as_bytes())
        .await
        .expect("HTTP");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn play(sig: &mut Signaling, cluster: &Cluster) -> RtcClient {
    avatar_edge_tests::play(sig, "avatar_tutor_13")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()))
}

/// Events until the `speech_ended` of the next speech to start; (events, started, ended).
async fn until_speech_ended(sig: &mut Signaling, cluster: &Cluster) -> (Vec<Value>, Instant, Instant) {
    let deadline = Instant::now() + SECS(20);
    let mut events = Vec::new();
    let mut started: Option<(Instant, Value)> = None;
    loop {
        let ev = sig
            .next_event(deadline.saturating_duration_since(Instant::now()))
            .await
            .unwrap_or_else(|e| panic!("{e}; events so far {events:?}\n{}", cluster.logs()));
        match ev["type"].as_str() {
            Some("speech_started") => started = Some((Instant::now(), ev["turn"].clone())),
            Some("speech_ended") if started.as_ref().is_some_and(|(_, t)| *t == ev["turn"]) => {
                let (at, _) = started.expect("matched above");
                events.push(ev);
                return (events, at, Instant::now());
            }
            Some("error") => panic!("error event: {ev}\n{}", cluster.logs()),
            _ => {}
        }
        events.push(ev);
    }
}

fn loud(stats: &ReceiverStats, from: Instant, to: Instant) -> (usize, usize) {
    let audio = stats.audio_between(from, to);
    (audio.iter().filter(|v| **v > 0.02).count(), audio.len())
}

async fn talking_cluster(relay_extra: &str, llm: &OpenAiServer) -> Cluster {
    let mut cluster = Cluster::relay_only(relay_extra).await;
    let worker = format!(
        "[talk.llm]\nbackend = \"openai\"\nbase_url = \"{}\"\nmodel = \"tutor-1\"\napi_key = \"sk-test\"\ntimeout_ms = 3000\n",
        llm.base_url()
    );
    cluster.add_worker("talker", 4, &worker).await;
    cluster
}

#[test]
fn the_backend_lists_the_session_makes_it_speak_interrupts_and_ends_it() {
    netns::run(
        "the_backend_lists_the_session_makes_it_speak_interrupts_and_ends_it",
        || async {
            let llm = OpenAiServer::start().await;
            let cluster = talking_cluster(&api_keys(""), &llm).await;
            let api = cluster.relay.http;
            let mut sig = Signaling::connect(&cluster.ws_url("lesson-7")).await.expect("ws");
            let client = play(&mut sig, &cluster).await;
            client.wait_frames(10, SECS(5)).await;

            // GET lists the session with its worker and avatar.
            let (status, list) = call(api, "GET", "/api/v1/sessions", None).await;
            assert_eq!(status, 200, "{list}");
            let session = list["sessions"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s["session_id"] == "lesson-7"))
                .unwrap_or_else(|| panic!("listed: {list}"));
            assert_eq!(session["worker_id"], "talker");
            assert_eq!(session["avatar_id"], "avatar_tutor_13");
            assert_eq!(session["state"], "idle");
            assert!(
                session["started_at"].as_str().is_some_and(|t| t.ends_with('Z')),
                "{session}"
            );
            let (status, one) = call(api, "GET", "/api/v1/sessions/lesson-7", None).await;
            assert_eq!((status, &one["session_id"]), (200, &json!("lesson-7")));

            // say (repeat): spoken as given, with no language model.
            let text = "Today we learn how plants make food from light.";
            let sent = Instant::now();
            let (status, turn) = call(
                api,
                "POST",
                "/api/v1/sessions/lesson-7/say",
                Some(json!({"text": text})),
            )
            .await;
            assert_eq!(status, 202, "{turn}");
            assert_eq!(turn["queued"], false);
            let (events, started, ended) = until_speech_ended(&mut sig, &cluster).await;
            eprintln!("say (repeat) -> speech_started {:?}", started - sent);
            let said = events
                .iter()
                .find(|e| e["type"] == "assistant_text" && e["final"] == true)
                .expect("final text");
            assert_eq!(said["text"], text, "the browser sees exactly the text");
            assert_eq!(said["turn"], turn["turn"]);
            let (n_loud, n) = loud(&client.snapshot(), started + Duration::from_millis(150), ended);
            assert!(n_loud * 3 >= n && n > 20, "speech heard: {n_loud}/{n} loud packets");
            assert!(llm.seen().chat_requests.is_empty(), "repeat asks no language model");

            // say (chat): the language model answers it.
            let (status, _) = call(
                api,
                "POST",
                "/api/v1/sessions/lesson-7/say",
                Some(json!({"text": "hello there", "mode": "chat"})),
            )
            .await;
            assert_eq!(status, 202);
            let (events, ..) = until_speech_ended(&mut sig, &cluster).await;
            let answer = events.iter().find(|e| e["final"] == true).expect("final");
            assert_eq!(answer["text"], "Sure. You asked: hello there. Here is my answer.");
            assert_eq!(llm.seen().chat_requests.len(), 1, "chat asks the model");

            // A say while the avatar speaks waits its turn; interrupt stops both.
            let long = "This is a long explanation. ".repeat(8);
            call(
                api,
                "POST",
                "/api/v1/sessions/lesson-7/say",
                Some(json!({"text": long})),
            )
            .await;
            sig.wait_for("speech_started", SECS(10)).await.expect("speaking");
            let (_, queued) = call(
                api,
                "POST",
                "/api/v1/sessions/lesson-7/say",
                Some(json!({"text": "And this comes after."})),
            )
            .await;
            assert_eq!(queued["queued"], true, "{queued}");
            let (_, state) = call(api, "GET", "/api/v1/sessions/lesson-7", None).await;
            assert_eq!(state["state"], "speaking");
            tokio::time::sleep(Duration::from_millis(500)).await;
            let at = Instant::now();
            let (status, stopped) = call(api, "POST", "/api/v1/sessions/lesson-7/interrupt", None).await;
            assert_eq!((status, &stopped["interrupted"]), (200, &json!(true)), "{stopped}");
            let ended = sig.wait_for("speech_ended", SECS(2)).await.expect("speech_ended");
            assert_eq!(ended["interrupted"], true);
            tokio::time::sleep(Duration::from_millis(900)).await;
            let (n_loud, n) = loud(
                &client.snapshot(),
                at + Duration::from_millis(200),
                at + Duration::from_millis(900),
            );
            eprintln!("after interrupt: {n_loud}/{n} loud packets from 200 ms on");
            assert!(
                n > 20 && n_loud == 0,
                "silent within 200 ms of the interrupt: {n_loud}/{n} loud"
            );
            let (_, again) = call(api, "POST", "/api/v1/sessions/lesson-7/interrupt", None).await;
            assert_eq!(again["interrupted"], false, "the queued say was dropped too");

            // DELETE ends the browser's session.
            let (status, _) = call(api, "DELETE", "/api/v1/sessions/lesson-7", None).await;
            assert_eq!(status, 204);
            let err = sig.wait_for("error", SECS(5)).await.expect("told");
            assert_eq!(err["code"], "session_ended", "{err}");
            let (status, gone) = call(api, "GET", "/api/v1/sessions/lesson-7", None).await;
            assert_eq!(status, 404, "{gone}");
            assert_eq!(gone["error"]["code"], "no_session");
        },
    );
}

#[test]
fn bad_calls_get_their_status_and_the_session_is_unharmed() {
    netns::run("bad_calls_get_their_status_and_the_session_is_unharmed", || async {
        // Without keys the API is not there.
        let off = Cluster::start().await;
        let (status, _) = call(off.relay.http, "GET", "/api/v1/sessions", None).await;
        assert_eq!(status, 404, "no key configured: off");

        let llm = OpenAiServer::start().await;
        let cluster = talking_cluster(&api_keys(""), &llm).await;
        let api = cluster.relay.http;
        let mut sig = Signaling::connect(&cluster.ws_url("bad-1")).await.expect("ws");
        let client = play(&mut sig, &cluster).await;
        let say = "/api/v1/sessions/bad-1/say";
        // (method, key, path, body, status, error code)
        type Case<'a> = (&'a str, Option<&'a str>, &'a str, Option<&'a str>, u16, &'a str);
        let cases: Vec<Case> = vec![
            ("GET", None, "/api/v1/sessions", None, 401, "unauthorized"),
            (
                "GET",
                Some("wrong-key-0123456789abcdef0123"),
                "/api/v1/sessions",
                None,
                401,
                "unauthorized",
            ),
            ("GET", Some(KEY), "/api/v1/sessions/nobody", None, 404, "no_session"),
            (
                "POST",
                Some(KEY),
                "/api/v1/sessions/nobody/say",
                Some(r#"{"text":"hi"}"#),
                404,
                "no_session",
            ),
            ("POST", Some(KEY), say, Some("{not json"), 400, "bad_json"),
            (
                "POST",
                Some(KEY),
                say,
                Some(r#"{"text":"hi","mode":"sing"}"#),
                400,
                "bad_json",
            ),
            ("POST", Some(KEY), say, Some(r#"{"text":"   "}"#), 400, "empty_text"),
            ("DELETE", Some(KEY), "/api/v1/sessions/nobody", None, 404, "no_session"),
        ];
        for (method, key, path, body, want, code) in cases {
            let (status, reply) = call_with(api, method, path, key, body).await;
            assert_eq!(status, want, "{method} {path} {body:?}: {reply}");
            assert_eq!(reply["error"]["code"], code, "{method} {path}: {reply}");
            assert!(reply["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
        let too_long = json!({"text": "x".repeat(401)}).to_string();
        let (status, reply) = call_with(api, "POST", say, Some(KEY), Some(&too_long)).await;
        assert_eq!(
            (status, &reply["error"]["code"]),
            (413, &json!("text_too_long")),
            "{reply}"
        );
        assert!(
            reply["error"]["message"].as_str().is_some_and(|m| m.contains("400")),
            "{reply}"
        );
        // The session is unharmed: it plays, and a good call works.
        let frames = client.snapshot().frames_decoded;
        assert!(client.wait_frames(frames + 10, SECS(5)).await.frames_decoded >= frames + 10);
        let (status, _) = call(api, "POST", say, Some(json!({"text": "Still here."}))).await;
        assert_eq!(status, 202);
        assert!(llm.seen().chat_requests.is_empty());
    });
}

#[test]
fn a_call_on_any_relay_of_a_fleet_reaches_the_session() {
    netns::run("a_call_on_any_relay_of_a_fleet_reaches_the_session", || async {
        let keys = api_keys("");
        let a = Cluster::relay_only(&keys).await;
        let mut b = Cluster::relay_only(&keys).await;
        let also_a = format!(
            "[[relays]]\naddress = \"{}\"\nserver_name = \"localhost\"\nfingerprint = \"{}\"",
            a.relay.tunnel, a.relay.fingerprint
        );
        let trust = format!("fingerprint = \"{}\"", b.relay.fingerprint);
        let log = b.spawn_worker("fleet-worker", 4, SECRET, &trust, &also_a);
        let registered = avatar_edge_tests::cluster::wait_for_count(&log, "registered with relay", 2, SECS(15)).await;
        assert!(registered.is_some(), "not registered with both relays:\n{}", b.logs());
        // The browser is on relay A; the backend calls relay B.
        let mut sig = Signaling::connect(&a.ws_url("fleet-1")).await.expect("ws");
        let _client = play(&mut sig, &a).await;
        let api = b.relay.http;
        let (status, list) = call(api, "GET", "/api/v1/sessions", None).await;
        assert_eq!(status, 200);
        assert!(
            list["sessions"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["session_id"] == "fleet-1")),
            "{list}"
        );
        let (status, _) = call(
            api,
            "POST",
            "/api/v1/sessions/fleet-1/say",
            Some(json!({"text": "Hello through the other relay, and a little more to say."})),
        )
        .await;
        assert_eq!(status, 202);
        let said = sig
            .wait_for("speech_started", SECS(10))
            .await
            .expect("the browser on A hears it");
        assert!(said["turn"].as_u64().is_some());
        let (status, stopped) = call(api, "POST", "/api/v1/sessions/fleet-1/interrupt", None).await;
        assert_eq!((status, &stopped["interrupted"]), (200, &json!(true)));
        let ended = sig.wait_for("speech_ended", SECS(2)).await.expect("interrupted");
        assert_eq!(ended["interrupted"], true);
        let (status, _) = call(api, "DELETE", "/api/v1/sessions/fleet-1", None).await;
        assert_eq!(status, 204);
        let err = sig.wait_for("error", SECS(5)).await.expect("ended");
        assert_eq!(err["code"], "session_ended");
    });
}
