//! Keep each user on the same worker across reconnects, without storing anything.
//!
//! A policy instance lives for one decision, so "remember where alice went" is impossible, and
//! also unnecessary: rendezvous (highest-random-weight) hashing gives every (user, worker) pair a
//! stable score, and the user goes to the offered worker with the highest score. The same user
//! lands on the same worker every time it is offered (it has a free slot); when a worker leaves,
//! only its users move; when one joins, it takes a fair share of users and nobody else moves.
//!
//! Sessions without a user id go to the least loaded worker. No config.

use avatar_policy_sdk::router::*;
use sha2::{Digest, Sha256};

fn score(user: &str, worker: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(user.as_bytes())
        .chain_update([0u8])
        .chain_update(worker.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

struct Sticky;

impl Guest for Sticky {
    fn route(request: RouteRequest) -> RouteDecision {
        let user = request.principal.user_id.as_str();
        let best = if user.is_empty() || user == "anonymous" {
            request
                .workers
                .iter()
                .min_by_key(|w| ((w.load() * 1_000_000.0) as u64, w.rtt_us))
        } else {
            request.workers.iter().max_by_key(|w| score(user, &w.id))
        };
        match best {
            Some(w) => RouteDecision::Worker(w.id.clone()),
            None => RouteDecision::reject("no worker available"),
        }
    }
}

avatar_policy_sdk::export_router!(Sticky);
