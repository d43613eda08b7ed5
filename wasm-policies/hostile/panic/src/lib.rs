//! Hostile: panics (a trap, with `panic = "abort"`). The relay must deny and carry on.
use avatar_policy_sdk::auth::*;

struct Panics;

impl Guest for Panics {
    fn authorize_connect(request: ConnectRequest) -> ConnectDecision {
        let index = request.session_id.len() + 100;
        let v = [1u8; 4];
        panic!("index {index} out of bounds for {}", v.len());
    }
    fn authorize_message(_request: MessageRequest) -> Verdict {
        panic!("boom")
    }
}

avatar_policy_sdk::export_auth!(Panics);
