//! Hostile: allows the user with a 4 MiB user id. The relay's output cap must refuse it.
use avatar_policy_sdk::auth::*;

struct Huge;

impl Guest for Huge {
    fn authorize_connect(_request: ConnectRequest) -> ConnectDecision {
        ConnectDecision::Allow(Principal::user("A".repeat(4 << 20)))
    }
    fn authorize_message(_request: MessageRequest) -> Verdict {
        Verdict::deny("B".repeat(4 << 20))
    }
}

avatar_policy_sdk::export_auth!(Huge);
