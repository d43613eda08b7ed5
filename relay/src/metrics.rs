//! Prometheus metrics of the relay.
//!
//! Counters and histograms are recorded where things happen (`metrics::counter!` and friends);
//! gauges that describe current state (workers, their tunnel RTT) are refreshed from the registry
//! when `/metrics` is scraped, so they can never drift. Without an installed recorder (library use,
//! unit tests) every macro is a no-op.
//!
//! | name | kind | meaning |
//! |---|---|---|
//! | `relay_sessions_active` | gauge | browser sockets open now |
//! | `relay_sessions_total` | counter | browser sockets accepted |
//! | `relay_sessions_routed_total` | counter | sessions handed to a worker |
//! | `relay_signaling_errors_total{code}` | counter | error events sent, by code |
//! | `relay_connections_rate_limited_total{reason}` | counter | upgrades and ICE-server requests refused per client (`rate`: per minute, `open_sockets`: open at once) |
//! | `relay_sockets_not_reading_total` | counter | browsers disconnected for not reading their events (`limits.write_timeout_ms`) |
//! | `relay_connections_refused_total{reason}` | counter | upgrades refused for their `origin` |
//! | `relay_http_connections_refused_total{reason}` | counter | TCP connections closed on accept (`per_ip`, `total`) |
//! | `relay_http_connections_open` | gauge | TCP connections of the HTTP listener open now |
//! | `relay_tunnel_handshakes_refused_total{reason}` | counter | unauthenticated tunnels refused (`pending`) or sent a Retry (`retry`) |
//! | `relay_turn_quota_refusals_total{quota}` | counter | TURN allocations over a quota (`user`, `ip`, `worker`) |
//! | `relay_workers_registered` | gauge | workers with a live tunnel |
//! | `relay_worker_sessions{worker}` | gauge | sessions this relay routed to each worker |
//! | `relay_worker_load{worker}` | gauge | sessions each worker runs, as it reports them (from every relay of a fleet) |
//! | `relay_worker_capacity{worker}` | gauge | sessions each worker takes at once |
//! | `relay_sessions_free` | gauge | sessions the workers that are not draining can still take (what a load balancer wants) |
//! | `relay_sessions_rerouted_total` | counter | offers a worker refused as `busy` and the relay routed to another |
//! | `relay_tunnel_rtt_seconds{worker,transport}` | gauge | RTT of each tunnel (QUIC's estimate, or the relay's pings over TCP); `transport` is `quic` or `tcp` |
//! | `relay_tunnel_registrations_total{transport}` | counter | successful worker registrations (reconnects included), by transport (`quic`, `tcp`) |
//! | `relay_api_requests_total{outcome}` | counter | session API calls: `accepted`, `unauthorized`, `rate_limited` |
//! | `relay_tunnel_turn_streams_total` | counter | TURN streams opened by workers through TCP tunnels |
//! | `relay_policy_decisions_total{hook,outcome}` | counter | policy decisions (`connect`, `message`, `route`; `allow`, `deny`, `failed`) |
//! | `relay_policy_failures_total{hook,kind}` | counter | failed decisions (`deadline`, `memory`, `trap`, `output`, `invalid`, `busy`) |
//! | `relay_policy_decision_seconds{hook}` | histogram | decision latency, pool wait included |
//! | `relay_policy_reloads_total{module,result}` | counter | module reloads (`reloaded`, `failed`) |
//! | `relay_tls_cert_expiry_seconds` | gauge | time the certificate in use has left (files or ACME; negative once expired), set every minute |
//! | `relay_tls_reloads_total{result}` | counter | certificate files re-read after a change or SIGHUP (`reloaded`, `failed`: the old one stays) |

use crate::AppState;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Install the process-wide Prometheus recorder; call once, from `main`.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    PrometheusBuilder::new().install_recorder()
}

/// Set the state gauges from the registry.
pub fn refresh_gauges(state: &AppState) {
    let workers = state.registry.all();
    metrics::gauge!("relay_workers_registered").set(workers.len() as f64);
    metrics::gauge!("relay_http_connections_open").set(state.http_connections.total() as f64);
    let free: u32 = state
        .registry
        .views()
        .iter()
        .map(|w| w.capacity.saturating_sub(w.active))
        .sum();
    metrics::gauge!("relay_sessions_free").set(f64::from(free));
    for w in workers {
        metrics::gauge!("relay_worker_sessions", "worker" => w.id.clone()).set(w.active() as f64);
        metrics::gauge!("relay_worker_load", "worker" => w.id.clone()).set(f64::from(w.load()));
        metrics::gauge!("relay_worker_capacity", "worker" => w.id.clone()).set(f64::from(w.registration.capacity));
        let transport = w.connection.transport().as_str();
        metrics::gauge!("relay_tunnel_rtt_seconds", "worker" => w.id.clone(), "transport" => transport)
            .set(w.connection.rtt().as_secs_f64());
    }
}
