//! Connected workers and the choice of one for each new session.
//!
//! A worker appears here once its tunnel handshake succeeds and disappears when its connection
//! ends. A worker that reconnects under the same id **replaces** its stale entry at once (the old
//! connection is closed), so a rebooted GPU box never waits for its ghost to time out.
//!
//! Choosing a worker goes through [`RoutePolicy`]: the seam where an operator's routing module
//! plugs in. [`LeastLoaded`] is the built-in rule.

use avatar_proto::tunnel::Registration;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// One registered worker and its live tunnel.
#[derive(Debug)]
pub struct WorkerHandle {
    pub id: String,
    pub registration: Registration,
    pub connection: quinn::Connection,
    /// Distinguishes this tunnel from an earlier one with the same worker id.
    pub generation: u64,
    active: AtomicU32,
    draining: AtomicBool,
}

impl WorkerHandle {
    pub fn new(id: String, registration: Registration, connection: quinn::Connection, generation: u64) -> Self {
        Self {
            id,
            registration,
            connection,
            generation,
            active: AtomicU32::new(0),
            draining: AtomicBool::new(false),
        }
    }

    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Acquire)
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn serves(&self, avatar_id: Option<&str>) -> bool {
        match avatar_id {
            _ if self.registration.avatars.is_empty() => true,
            Some(a) => self.registration.avatars.iter().any(|x| x == a),
            None => true,
        }
    }

    /// Take one session slot if capacity allows; the slot returns when the guard drops.
    pub fn try_acquire(self: &Arc<Self>) -> Option<SessionSlot> {
        let cap = self.registration.capacity;
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < cap).then_some(n + 1))
            .ok()
            .map(|_| SessionSlot {
                worker: Arc::clone(self),
            })
    }
}

/// A reserved session slot on a worker.
#[derive(Debug)]
pub struct SessionSlot {
    pub worker: Arc<WorkerHandle>,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.worker.active.fetch_sub(1, Ordering::AcqRel);
    }
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
}

/// Picks the worker for a new session among those that are not draining.
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
            .filter(|w| match request.avatar_id {
                Some(a) if !w.avatars.is_empty() => w.avatars.iter().any(|x| x == a),
                _ => true,
            })
            .min_by(|a, b| {
                let load = |w: &WorkerView| w.active as f64 / w.capacity.max(1) as f64;
                load(a).total_cmp(&load(b)).then(a.rtt.cmp(&b.rtt))
            })
            .map(|w| w.id.clone())
    }
}

/// All registered workers.
#[derive(Default)]
pub struct Registry {
    workers: Mutex<HashMap<String, Arc<WorkerHandle>>>,
    next_generation: AtomicU64,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<WorkerHandle>>> {
        // A poisoned lock only means another thread panicked mid-insert; the map is still valid.
        self.workers.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn next_generation(&self) -> u64 {
        self.next_generation.fetch_add(1, Ordering::Relaxed)
    }

    /// Register `worker`, returning the stale entry it replaced (already closed).
    pub fn insert(&self, worker: Arc<WorkerHandle>) -> Option<Arc<WorkerHandle>> {
        let old = self.lock().insert(worker.id.clone(), worker);
        if let Some(old) = &old {
            old.connection.close(
                quinn::VarInt::from_u32(avatar_proto::tunnel::close_code::REPLACED),
                b"replaced by a newer connection",
            );
        }
        old
    }

    /// Remove `id` if it is still the given generation (a newer tunnel may have replaced it).
    pub fn remove(&self, id: &str, generation: u64) -> bool {
        let mut map = self.lock();
        if map.get(id).is_some_and(|w| w.generation == generation) {
            map.remove(id);
            true
        } else {
            false
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<WorkerHandle>> {
        self.lock().get(id).cloned()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn all(&self) -> Vec<Arc<WorkerHandle>> {
        self.lock().values().cloned().collect()
    }

    /// Views of the workers that may take new sessions.
    pub fn views(&self) -> Vec<WorkerView> {
        self.lock()
            .values()
            .filter(|w| !w.is_draining())
            .map(|w| WorkerView {
                id: w.id.clone(),
                avatars: w.registration.avatars.clone(),
                capacity: w.registration.capacity,
                active: w.active(),
                labels: w.registration.labels.clone(),
                rtt: w.connection.rtt(),
            })
            .collect()
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
