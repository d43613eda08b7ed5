//! The worker's session loop without a relay or a tunnel: `run_session` on one end of a
//! `tokio::io::duplex`, this test as the relay on the other, and a real WebRTC peer (the Rust
//! receiver) as the browser, in one process. What the tunnel carries is exactly what a relay
//! would send: the open frame, the offer, a text message, the close. A second media sink joins
//! through the session's handle, as a recording will.

use avatar_edge_tests::netns;
use avatar_edge_tests::rtc_client::RtcClient;
use avatar_proto::signaling::{decode_client_message, ServerEvent, DEFAULT_MAX_MESSAGE_LEN};
use avatar_proto::stream::{send_frame, FramedRecv};
use avatar_proto::tunnel::{SessionFrame, SessionOpen};
use avatar_worker::config::WorkerConfig;
use avatar_worker::media::encoder::contains_idr;
use avatar_worker::media::stream::MediaOut;
use serde_json::json;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// The next event the worker sends, skipping none; panics after `within`.
async fn next_event<R: tokio::io::AsyncRead + Unpin>(recv: &mut FramedRecv<R>, within: Duration) -> ServerEvent {
    match tokio::time::timeout(within, recv.next::<SessionFrame>()).await {
        Ok(Ok(Some(SessionFrame::Event(ev)))) => ev,
        other => panic!("expected an event, got {other:?}"),
    }
}

#[test]
fn a_session_answers_streams_talks_and_ends_on_close_with_no_relay() {
    netns::run(
        "a_session_answers_streams_talks_and_ends_on_close_with_no_relay",
        || async {
            let worker = avatar_worker::Worker::new(WorkerConfig::dev()).expect("worker");
            let ctx = std::sync::Arc::clone(worker.context());
            let (relay_end, worker_end) = tokio::io::duplex(256 * 1024);
            let (worker_recv, worker_send) = tokio::io::split(worker_end);
            let session = tokio::spawn(avatar_worker::session::run_session(
                Box::new(worker_send),
                Box::new(worker_recv),
                std::sync::Arc::clone(&ctx),
                CancellationToken::new(),
                None,
            ));
            let (relay_recv, mut relay_send) = tokio::io::split(relay_end);
            let mut relay_recv = FramedRecv::new(relay_recv);

            // Open, then the browser's offer, as the relay sends them.
            let client = RtcClient::new(true).await.expect("client");
            let open = SessionOpen {
                session_id: "in-memory".into(),
                avatar_id: Some("avatar_tutor_13".into()),
                user_id: None,
                ice_servers: vec![],
                records: false,
            };
            send_frame(&mut relay_send, &SessionFrame::Open(open))
                .await
                .expect("open");
            let offer = json!({"type": "webrtc_offer", "sdp": client.offer().await.expect("offer")}).to_string();
            let offer = decode_client_message(&offer, DEFAULT_MAX_MESSAGE_LEN).expect("offer decodes");
            send_frame(&mut relay_send, &SessionFrame::Client(offer))
                .await
                .expect("offer");
            // First what the session can do: no VAD model here, so no voice input.
            assert_eq!(
                next_event(&mut relay_recv, SECS(10)).await,
                ServerEvent::Features { voice: false }
            );
            let sdp = match next_event(&mut relay_recv, SECS(10)).await {
                ServerEvent::WebrtcAnswer { sdp, .. } => sdp,
                other => panic!("expected the answer, got {other:?}"),
            };
            assert_eq!(ctx.active_sessions(), 1, "the session holds a slot");
            client.accept_answer(&sdp).await.expect("accept");
            client.connected(SECS(10)).await.expect("ICE connects");
            let stats = client.wait_frames(25, SECS(6)).await;
            assert!(stats.frames_decoded >= 25, "idle video plays: {stats:?}");

            // A second sink joins the media mid-session through the session's handle (as a
            // recording will): it starts at a keyframe asked for at once, gets the audio too,
            // and the viewer plays on.
            let handle = ctx.directory.handle("in-memory").expect("registered by id");
            let joined = std::time::Instant::now();
            let mut tap = handle.tap("test-sink", 64).await.expect("the session runs");
            let (mut pictures, mut packets, mut first_is_key) = (0, 0, None);
            while pictures < 25 || packets < 25 {
                match tokio::time::timeout(SECS(5), tap.recv()).await {
                    Ok(Some(MediaOut::Video(frame))) => {
                        first_is_key.get_or_insert_with(|| {
                            eprintln!("tap: first picture {:?} after joining", joined.elapsed());
                            contains_idr(&frame.data)
                        });
                        pictures += 1;
                    }
                    Ok(Some(MediaOut::Audio(_))) => packets += 1,
                    other => panic!("the tap stopped after {pictures} pictures, {packets} packets: {other:?}"),
                }
            }
            assert_eq!(first_is_key, Some(true), "the tap's first picture is a keyframe");
            assert!(
                joined.elapsed() < SECS(2),
                "25 pictures in about a second, not after a GOP"
            );
            let before = client.snapshot().frames_decoded;
            drop(tap);
            assert!(
                client.wait_frames(before + 10, SECS(3)).await.frames_decoded >= before + 10,
                "the viewer plays on after the sink leaves"
            );

            // A text message: the answer's text and its speech come back as events.
            let text = json!({"type": "text_webrtc", "message": "hello"}).to_string();
            let text = decode_client_message(&text, DEFAULT_MAX_MESSAGE_LEN).expect("text decodes");
            send_frame(&mut relay_send, &SessionFrame::Client(text))
                .await
                .expect("text");
            let mut saw_text = false;
            loop {
                match next_event(&mut relay_recv, SECS(20)).await {
                    ServerEvent::AssistantText { .. } => saw_text = true,
                    ServerEvent::SpeechStarted { .. } => break,
                    _ => {}
                }
            }
            assert!(saw_text, "the answer's text came before its speech");

            // The relay closes the session: the worker stops and gives its slot back.
            send_frame(
                &mut relay_send,
                &SessionFrame::Close {
                    reason: "browser left".into(),
                },
            )
            .await
            .expect("close");
            tokio::time::timeout(SECS(10), session)
                .await
                .expect("the session ends on close")
                .expect("session task");
            assert_eq!(ctx.active_sessions(), 0, "the slot is back");
            client.close().await;
        },
    );
}
