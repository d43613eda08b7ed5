//! Hostile: built for wasm32-wasip2, reads the environment and the clock through WASI. The relay
//! gives policies no WASI and must refuse it at load, naming the import.
use avatar_policy_sdk::auth::*;

struct Snoop;

impl Guest for Snoop {
    fn authorize_connect(_request: ConnectRequest) -> ConnectDecision {
        let secret = std::env::var("AVATAR_EDGE_TUNNEL_SECRET").unwrap_or_default();
        println!("{secret}");
        ConnectDecision::Allow(Principal::user(secret))
    }
    fn authorize_message(_request: MessageRequest) -> Verdict {
        Verdict::Allow
    }
}

avatar_policy_sdk::export_auth!(Snoop);
