//! Connected workers, their session slots, and what routing sees of them.
//!
//! A worker appears here once its tunnel handshake succeeds and disappears when its connection
//! ends. A worker that reconnects under the same id **replaces** its entry at once. If it is a
//! new process (a rebooted GPU box), the old connection is closed, so the box never waits for its
//! ghost to time out. If it is the same process (the same `instance`) moving to another
//! transport, the old tunnel stays open, draining, so the sessions on it play on. Choosing a
//! worker is [`crate::routing`]'s.

use crate::conn::TunnelConn;
use crate::routing::WorkerView;
use avatar_proto::tunnel::Registration;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// One registered worker and its live tunnel.
#[derive(Debug)]
pub struct WorkerHandle {
    pub id: String,
    pub registration: Registration,
    pub connection: TunnelConn,
    /// Distinguishes this tunnel from an earlier one with the same worker id.
    pub generation: u64,
    /// Sessions this relay routed to the worker and that are still open.
    active: AtomicU32,
    /// Sessions the worker says it runs, from every relay ([`Control::Load`]); 0 until it says.
    ///
    /// [`Control::Load`]: avatar_proto::tunnel::Control::Load
    reported: AtomicU32,
    draining: AtomicBool,
}

impl WorkerHandle {
    pub fn new(id: String, registration: Registration, connection: TunnelConn, generation: u64) -> Self {
        Self {
            id,
            registration,
            connection,
            generation,
            active: AtomicU32::new(0),
            reported: AtomicU32::new(0),
            draining: AtomicBool::new(false),
        }
    }

    /// Sessions this relay routed to the worker and that are still open.
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Acquire)
    }

    /// The worker's load as routing sees it: what the worker last reported (sessions from every
    /// relay of a fleet), or this relay's own count when that is higher (sessions routed since).
    pub fn load(&self) -> u32 {
        self.active().max(self.reported.load(Ordering::Acquire))
    }

    /// The worker reported `active` sessions in all.
    pub fn set_reported_load(&self, active: u32) {
        self.reported.store(active, Ordering::Release);
    }

    /// The worker refused a session as full: count it full until it reports a change.
    pub fn refused_as_busy(&self) {
        self.reported.store(self.registration.capacity, Ordering::Release);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn serves(&self, avatar_id: Option<&str>) -> bool {
        crate::routing::serves(&self.registration.avatars, avatar_id)
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

/// Whether two registrations come from one worker process (both name the same `instance`).
pub fn same_process(a: &Registration, b: &Registration) -> bool {
    a.instance.is_some() && a.instance == b.instance
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

    /// Register `worker`, returning the entry it replaced: closed if it was another process,
    /// left draining if it is the same process on another tunnel ([`same_process`]).
    pub fn insert(&self, worker: Arc<WorkerHandle>) -> Option<Arc<WorkerHandle>> {
        let old = self.lock().insert(worker.id.clone(), Arc::clone(&worker));
        if let Some(old) = &old {
            if same_process(&old.registration, &worker.registration) {
                old.set_draining();
            } else {
                old.connection.close(
                    avatar_proto::tunnel::close_code::REPLACED,
                    b"replaced by a newer connection",
                );
            }
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

    /// What routing sees of every worker. A draining one (its process is stopping, an upgrade
    /// rolls through the pool) shows as full: it takes no new session, and one that only it
    /// could take is `busy`, which pages retry, rather than `no_worker`.
    pub fn views(&self) -> Vec<WorkerView> {
        self.lock()
            .values()
            .map(|w| WorkerView {
                id: w.id.clone(),
                avatars: w.registration.avatars.clone(),
                capacity: w.registration.capacity,
                active: if w.is_draining() {
                    w.registration.capacity
                } else {
                    w.load()
                },
                labels: w.registration.labels.clone(),
                rtt: w.connection.rtt(),
            })
            .collect()
    }

    /// Sessions the workers can still take, by the load they report (a draining worker: none,
    /// as [`Registry::views`] shows it).
    pub fn sessions_free(&self) -> u32 {
        self.lock()
            .values()
            .filter(|w| !w.is_draining())
            .map(|w| w.registration.capacity.saturating_sub(w.load()))
            .sum()
    }
}
