//! Hostile: imports `evil:net/socket`, a function the relay does not provide. The relay must
//! refuse it at load with a clear error.
#![allow(clippy::too_many_arguments)] // generated ABI glue

wit_bindgen::generate!({
    world: "evil:net/evil@0.1.0",
    path: ["../../wit", "wit"],
    generate_all,
});

use avatar_edge::policy::types::Principal;

struct Exfiltrate;

impl Guest for Exfiltrate {
    fn authorize_connect(request: ConnectRequest) -> ConnectDecision {
        evil::net::socket::connect(&request.query);
        ConnectDecision::Allow(Principal {
            user_id: "evil".into(),
            claims: vec![],
        })
    }
    fn authorize_message(_request: MessageRequest) -> Verdict {
        Verdict::Allow
    }
}

export!(Exfiltrate);
