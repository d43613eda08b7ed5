//! Admit connections only from listed networks (an office, a partner's NAT, a load balancer).
//!
//! Config (JSON): `{"allow": ["203.0.113.0/24", "2001:db8::/32"]}`. IPv4-mapped IPv6 addresses
//! (`::ffff:203.0.113.7`) are matched as the IPv4 address they are. The principal's user id is
//! the `user` query parameter, or `ip:<address>`.
//!
//! Behind a reverse proxy the relay sees the proxy's address; allow-list the proxy here and do
//! per-user checks in another policy.

use avatar_policy_sdk::auth::*;
use avatar_policy_sdk::host;
use ipnet::IpNet;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    allow: Vec<IpNet>,
}

struct IpAllowList;

impl Guest for IpAllowList {
    fn authorize_connect(request: ConnectRequest) -> ConnectDecision {
        let config: Config = match avatar_policy_sdk::config_json() {
            Ok(c) => c,
            Err(e) => {
                host::warn(&e);
                return ConnectDecision::deny("access control is misconfigured on this relay");
            }
        };
        let Some(ip) = request.remote_ip().map(|ip| ip.to_canonical()) else {
            return ConnectDecision::deny("unreadable client address");
        };
        if !config.allow.iter().any(|net| net.contains(&ip)) {
            return ConnectDecision::deny(format!("connections from {ip} are not allowed"));
        }
        let user = request
            .query_param("user")
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| format!("ip:{ip}"));
        ConnectDecision::Allow(Principal::user(user).with_claim("ip", ip.to_string()))
    }

    fn authorize_message(_request: MessageRequest) -> Verdict {
        Verdict::Allow
    }
}

avatar_policy_sdk::export_auth!(IpAllowList);
