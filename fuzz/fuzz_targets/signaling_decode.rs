//! The browser-facing decoder and the session rules it feeds: any bytes, never a panic.
#![no_main]

use avatar_proto::session::{Action, SignalingSession};
use avatar_proto::signaling::{decode_client_message, ServerEvent, DEFAULT_MAX_MESSAGE_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = decode_client_message(&text, DEFAULT_MAX_MESSAGE_LEN);
    let _ = avatar_proto::sdp::inspect_offer(&text);
    // The same input split into a sequence of messages, driven through the state machine.
    let mut session = SignalingSession::new(DEFAULT_MAX_MESSAGE_LEN);
    for (i, part) in text.split('\n').enumerate() {
        match session.on_text(part) {
            Action::Route(offer) if i % 2 == 0 => session.attached("w", offer),
            Action::Route(_) => {
                let _ = session.route_failed(avatar_proto::ErrorCode::NoWorker, "none");
            }
            Action::Reply(ev) => assert!(matches!(ev, ServerEvent::Error { .. })),
            Action::Forward(msg) if i % 3 == 2 => {
                let _ = session.forward_failed(msg);
            }
            _ => {}
        }
        if i % 5 == 4 {
            let _ = session.worker_lost();
        }
        if i % 7 == 6 {
            // The worker ends the session; an unanswered offer comes back to be routed once.
            if let Action::Route(offer) = session.worker_closed() {
                session.attached("w2", offer);
            }
        }
    }
});
