//! The `auth` world: admit WebSocket connects and check each signaling message.
//!
//! Implement [`Guest`] and export it with [`export_auth!`](crate::export_auth).

// The generated ABI glue passes flattened records as many arguments.
#![allow(clippy::too_many_arguments)]

wit_bindgen::generate!({
    world: "auth",
    path: "../wit",
    default_bindings_module: "avatar_policy_sdk::auth",
    pub_export_macro: true,
    export_macro_name: "export_auth",
});

pub use self::avatar_edge::policy::types::{Header, MessageKind, Principal};

impl ConnectRequest {
    /// The value of header `name` (case-insensitive), if the relay passed it.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }

    /// A query parameter of the WebSocket URL, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        crate::query_param(&self.query, name)
    }

    /// A token from `Authorization: Bearer ...`, else from the query parameter `param`.
    ///
    /// Browsers cannot set headers on a WebSocket, so pages pass tokens in the query; other
    /// clients (and proxies) may use the header.
    pub fn token(&self, param: &str) -> Option<String> {
        self.header("authorization")
            .and_then(crate::bearer)
            .map(str::to_owned)
            .or_else(|| self.query_param(param).filter(|t| !t.is_empty()))
    }

    /// The client's IP address (without the port).
    pub fn remote_ip(&self) -> Option<std::net::IpAddr> {
        self.remote_addr.parse::<std::net::SocketAddr>().ok().map(|a| a.ip())
    }
}

impl Principal {
    /// A principal with no claims.
    pub fn user(user_id: impl Into<String>) -> Self {
        Self {
            user_id: user_id.into(),
            claims: Vec::new(),
        }
    }

    /// Add a claim (for the router: plan, region, tenant ...).
    pub fn with_claim(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.claims.push((key.into(), value.into()));
        self
    }
}

impl ConnectDecision {
    pub fn deny(reason: impl Into<String>) -> Self {
        Self::Deny(reason.into())
    }
}

impl Verdict {
    pub fn deny(reason: impl Into<String>) -> Self {
        Self::Deny(reason.into())
    }
}
