//! The `router` world: pick the worker for a session.
//!
//! Implement [`Guest`] and export it with [`export_router!`](crate::export_router).

// The generated ABI glue passes flattened records as many arguments.
#![allow(clippy::too_many_arguments)]

wit_bindgen::generate!({
    world: "router",
    path: "../wit",
    default_bindings_module: "avatar_policy_sdk::router",
    pub_export_macro: true,
    export_macro_name: "export_router",
});

pub use self::avatar_edge::policy::types::{Principal, Worker};

impl Worker {
    /// The fraction of capacity in use, 0.0 to 1.0.
    pub fn load(&self) -> f64 {
        self.active as f64 / self.capacity.max(1) as f64
    }

    /// The value of label `key`.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Whether this worker lists `avatar` among its loaded avatars (a worker listing none renders
    /// any avatar, but has none preloaded).
    pub fn has_avatar(&self, avatar: &str) -> bool {
        self.avatars.iter().any(|a| a == avatar)
    }
}

impl Principal {
    /// The value of claim `key`.
    pub fn claim(&self, key: &str) -> Option<&str> {
        self.claims.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

impl RouteDecision {
    pub fn reject(reason: impl Into<String>) -> Self {
        Self::Reject(reason.into())
    }
}
