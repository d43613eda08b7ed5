//! Hostile: a router that names a worker it was not offered. The relay must treat it as a
//! failure and take the configured fallback.
use avatar_policy_sdk::router::*;

struct Bogus;

impl Guest for Bogus {
    fn route(_request: RouteRequest) -> RouteDecision {
        RouteDecision::Worker("no-such-worker".into())
    }
}

avatar_policy_sdk::export_router!(Bogus);
