//! Hostile: allocates until something stops it. The relay's memory cap must.
use avatar_policy_sdk::auth::*;

struct Bomb;

impl Guest for Bomb {
    fn authorize_connect(_request: ConnectRequest) -> ConnectDecision {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![0xAB; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }
    fn authorize_message(_request: MessageRequest) -> Verdict {
        Verdict::Allow
    }
}

avatar_policy_sdk::export_auth!(Bomb);
