//! Route by affinity, then by load.
//!
//! Among the offered workers (all have a free slot and can render the avatar):
//! 1. prefer a worker that has the requested avatar **preloaded** (lists it in its config) over
//!    one that renders any avatar on demand;
//! 2. then one whose label `region_label` (default `region`) equals the principal's claim of the
//!    same name (set by your auth policy, e.g. from a JWT claim);
//! 3. then the least loaded (fraction of capacity in use);
//! 4. then the lowest tunnel RTT; then the id, so the choice is deterministic.
//!
//! Config (JSON, optional): `{"region_label": "region", "require_avatar": false}`. With
//! `require_avatar`, sessions for an avatar no worker has preloaded are rejected.

use avatar_policy_sdk::router::*;

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct Config {
    region_label: Option<String>,
    require_avatar: bool,
}

struct Affinity;

impl Guest for Affinity {
    fn route(request: RouteRequest) -> RouteDecision {
        let config: Config = avatar_policy_sdk::config_json().unwrap_or_default();
        let label = config.region_label.as_deref().unwrap_or("region");
        let avatar = request.avatar_id.as_deref();
        let region = request.principal.claim(label);
        let preloaded = |w: &Worker| avatar.is_some_and(|a| w.has_avatar(a));
        if config.require_avatar && avatar.is_some() && !request.workers.iter().any(preloaded) {
            return RouteDecision::reject("no worker has this avatar loaded");
        }
        let best = request.workers.iter().min_by_key(|w| {
            let same_region = region.is_some() && w.label(label) == region;
            (
                !preloaded(w),
                !same_region,
                (w.load() * 1_000_000.0) as u64,
                w.rtt_us,
                w.id.clone(),
            )
        });
        match best {
            Some(w) => RouteDecision::Worker(w.id.clone()),
            None => RouteDecision::reject("no worker available"),
        }
    }
}

avatar_policy_sdk::export_router!(Affinity);
