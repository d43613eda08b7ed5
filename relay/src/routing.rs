//! Choosing the worker for a new session, in one place.
//!
//! The candidates are the workers ([`crate::registry::Registry::views`], where a draining one
//! shows as full) that [`serves`] the avatar asked for, that have a free slot (counting the load
//! each worker reports, sessions from other relays of a fleet included), and that have not already refused
//! this offer as `busy`. Among them the operator's
//! routing module decides when one is configured ([`crate::policy`]; on its failure the
//! configured fallback), otherwise [`LeastLoaded`]. No candidate at all is `no_worker`; only full
//! ones is `busy`. The caller then takes the slot atomically, so a choice that raced with another
//! session is refused rather than overbooked.
//!
//! Everything here works on [`WorkerView`]s, so it is tested without tunnels or sockets.

use crate::config::RouterFallback;
use crate::policy::{self, Policies, Principal, RouteDecision};
use avatar_proto::signaling::ErrorCode;
use std::time::Duration;
use tracing::{info, warn};

/// Whether a worker announcing `avatars` serves `avatar_id`: one that announces none serves any
/// avatar (the built-in one), and a session that names none may go to any worker.
pub fn serves(avatars: &[String], avatar_id: Option<&str>) -> bool {
    avatars.is_empty() || avatar_id.is_none_or(|a| avatars.iter().any(|x| x == a))
}

/// What a routing policy sees of a worker.
#[derive(Debug, Clone)]
pub struct WorkerView {
    pub id: String,
    pub avatars: Vec<String>,
    pub capacity: u32,
    pub active: u32,
    pub labels: std::collections::BTreeMap<String, String>,
    pub rtt: Duration,
}

/// What a routing policy is asked.
#[derive(Debug, Clone)]
pub struct RouteRequest<'a> {
    pub session_id: &'a str,
    pub user_id: Option<String>,
    pub avatar_id: Option<&'a str>,
    /// Workers that refused this offer as `busy`: counted as full.
    pub refused_by: &'a [String],
}

/// Picks the worker for a new session among those with a free slot.
///
/// Contract: return the id of one of `workers`, or `None` when none should take the session. The
/// relay still checks capacity atomically after the choice, so a policy may race harmlessly.
pub trait RoutePolicy: Send + Sync {
    fn choose(&self, request: &RouteRequest<'_>, workers: &[WorkerView]) -> Option<String>;
}

/// Built-in rule: among workers serving the avatar with free capacity, the least loaded
/// (by fraction of capacity in use), ties broken by lower tunnel RTT.
#[derive(Debug, Default)]
pub struct LeastLoaded;

impl RoutePolicy for LeastLoaded {
    fn choose(&self, request: &RouteRequest<'_>, workers: &[WorkerView]) -> Option<String> {
        workers
            .iter()
            .filter(|w| w.active < w.capacity)
            .filter(|w| serves(&w.avatars, request.avatar_id))
            .min_by(|a, b| {
                let load = |w: &WorkerView| w.active as f64 / w.capacity.max(1) as f64;
                load(a).total_cmp(&load(b)).then(a.rtt.cmp(&b.rtt))
            })
            .map(|w| w.id.clone())
    }
}

/// Pick a worker for the session: the router module when one is configured, else the built-in
/// rule. `Err` is the error to send the browser.
pub async fn choose_worker(
    request: &RouteRequest<'_>,
    principal: Option<&Principal>,
    views: Vec<WorkerView>,
    router: &dyn RoutePolicy,
    policies: Option<&Policies>,
) -> Result<String, (ErrorCode, String)> {
    let avatar = request.avatar_id;
    let what = avatar
        .map(|a| format!("avatar `{a}`"))
        .unwrap_or_else(|| "this session".into());
    let serving: Vec<WorkerView> = views.into_iter().filter(|w| serves(&w.avatars, avatar)).collect();
    if serving.is_empty() {
        return Err((
            ErrorCode::NoWorker,
            format!("no connected worker serves {what}; the socket stays open, retry the offer later"),
        ));
    }
    let free: Vec<WorkerView> = serving
        .into_iter()
        .filter(|w| w.active < w.capacity && !request.refused_by.contains(&w.id))
        .collect();
    let busy = || {
        (
            ErrorCode::Busy,
            format!("every worker that serves {what} is at capacity; try again shortly"),
        )
    };
    if free.is_empty() {
        return Err(busy());
    }
    let builtin = || router.choose(request, &free).ok_or_else(busy);
    let Some(policies) = policies.filter(|p| p.has_router()) else {
        return builtin();
    };
    let route_request = policy::RouteRequest {
        session_id: request.session_id.to_owned(),
        principal: principal.cloned().unwrap_or_else(|| Principal {
            user_id: request.user_id.clone().unwrap_or_default(),
            claims: Vec::new(),
        }),
        avatar_id: avatar.map(str::to_owned),
        workers: free.iter().map(policy_worker).collect(),
        now_ms: policy::now_ms(),
    };
    match policies.route(route_request).await {
        None => builtin(),
        Some(Ok(RouteDecision::Worker(id))) => Ok(id),
        Some(Ok(RouteDecision::Reject(reason))) => {
            info!(%reason, "routing policy rejected the session");
            Err((ErrorCode::NoWorker, reason))
        }
        Some(Err(e)) => match policies.router_fallback() {
            RouterFallback::Builtin => {
                warn!(error = %e, "routing policy failed; using the built-in rule");
                builtin()
            }
            RouterFallback::Reject => {
                warn!(error = %e, "routing policy failed; rejecting the session (fallback = reject)");
                Err((
                    ErrorCode::NoWorker,
                    "no worker could be chosen (routing policy error); retry the offer later".into(),
                ))
            }
        },
    }
}

fn policy_worker(w: &WorkerView) -> policy::Worker {
    policy::Worker {
        id: w.id.clone(),
        avatars: w.avatars.clone(),
        capacity: w.capacity,
        active: w.active,
        labels: w.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        rtt_us: w.rtt.as_micros() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(id: &str, avatars: &[&str], capacity: u32, active: u32, rtt_ms: u64) -> WorkerView {
        WorkerView {
            id: id.into(),
            avatars: avatars.iter().map(|s| s.to_string()).collect(),
            capacity,
            active,
            labels: Default::default(),
            rtt: Duration::from_millis(rtt_ms),
        }
    }

    fn req(avatar: Option<&str>) -> RouteRequest<'_> {
        RouteRequest {
            session_id: "s",
            user_id: None,
            avatar_id: avatar,
            refused_by: &[],
        }
    }

    #[test]
    fn least_loaded_prefers_free_capacity_then_rtt() {
        let ws = [
            view("a", &[], 4, 2, 1),
            view("b", &[], 4, 1, 9),
            view("c", &[], 4, 1, 3),
        ];
        assert_eq!(LeastLoaded.choose(&req(None), &ws).as_deref(), Some("c"));
    }

    #[test]
    fn a_worker_without_avatars_serves_any_and_a_session_without_one_goes_anywhere() {
        let tutor = vec!["tutor".to_owned()];
        assert!(serves(&[], Some("tutor")));
        assert!(serves(&tutor, Some("tutor")));
        assert!(!serves(&tutor, Some("other")));
        assert!(serves(&tutor, None));
    }

    fn choose(views: Vec<WorkerView>, avatar: Option<&str>) -> Result<String, (ErrorCode, String)> {
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        rt.block_on(choose_worker(&req(avatar), None, views, &LeastLoaded, None))
    }

    #[test]
    fn no_serving_worker_is_no_worker_and_only_full_ones_is_busy() {
        let err = choose(vec![], Some("tutor")).expect_err("nobody");
        assert_eq!(err.0, ErrorCode::NoWorker);
        let err = choose(vec![view("a", &["other"], 4, 0, 1)], Some("tutor")).expect_err("wrong avatar");
        assert_eq!(err.0, ErrorCode::NoWorker);
        assert!(err.1.contains("avatar `tutor`"), "{}", err.1);
        let err = choose(vec![view("a", &["tutor"], 2, 2, 1)], Some("tutor")).expect_err("full");
        assert_eq!(err.0, ErrorCode::Busy);
        let chosen = choose(
            vec![view("a", &["tutor"], 2, 2, 1), view("b", &[], 2, 1, 1)],
            Some("tutor"),
        );
        assert_eq!(chosen.as_deref(), Ok("b"));
    }

    #[test]
    fn a_worker_that_refused_the_offer_counts_as_full() {
        let views = || vec![view("a", &[], 2, 0, 1), view("b", &[], 2, 1, 9)];
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let refused = ["a".to_owned()];
        let request = RouteRequest {
            refused_by: &refused,
            ..req(None)
        };
        let chosen = rt.block_on(choose_worker(&request, None, views(), &LeastLoaded, None));
        assert_eq!(chosen.as_deref(), Ok("b"), "a is less loaded but refused");
        let refused = ["a".to_owned(), "b".to_owned()];
        let request = RouteRequest {
            refused_by: &refused,
            ..req(None)
        };
        let err = rt
            .block_on(choose_worker(&request, None, views(), &LeastLoaded, None))
            .expect_err("all refused");
        assert_eq!(err.0, ErrorCode::Busy);
    }

    #[test]
    fn least_loaded_respects_avatars_and_capacity() {
        let ws = [
            view("a", &["tutor"], 1, 1, 1),
            view("b", &["other"], 4, 0, 1),
            view("c", &[], 2, 1, 1),
        ];
        assert_eq!(LeastLoaded.choose(&req(Some("tutor")), &ws).as_deref(), Some("c"));
        let ws = [view("a", &["tutor"], 1, 1, 1), view("b", &["other"], 4, 0, 1)];
        assert_eq!(LeastLoaded.choose(&req(Some("tutor")), &ws), None);
        assert_eq!(LeastLoaded.choose(&req(None), &[]), None);
    }
}
