//! Hostile: never returns from a connect decision. The relay's epoch deadline must stop it.
use avatar_policy_sdk::auth::*;

struct Spin;

impl Guest for Spin {
    fn authorize_connect(request: ConnectRequest) -> ConnectDecision {
        let mut n = request.now_ms;
        loop {
            n = std::hint::black_box(n.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
    fn authorize_message(_request: MessageRequest) -> Verdict {
        loop {
            std::hint::black_box(());
        }
    }
}

avatar_policy_sdk::export_auth!(Spin);
