//! Prometheus metrics of the relay.
//!
//! Counters and histograms are recorded where things happen (`metrics::counter!` and friends);
//! gauges that describe current state (workers, their tunnel RTT) are refreshed from the registry
//! when `/metrics` is scraped, so they can never drift. Without an installed recorder (library use,
//! unit tests) every macro is a no-op.
//!
//! Every metric of the relay and the worker, with its labels and meaning, is listed in
//! `docs/metrics.md`; `tests/tests/metrics_reference.rs` fails when one recorded here is not.

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
    metrics::gauge!("relay_sessions_free").set(f64::from(state.registry.sessions_free()));
    for w in workers {
        metrics::gauge!("relay_worker_sessions", "worker" => w.id.clone()).set(w.active() as f64);
        metrics::gauge!("relay_worker_load", "worker" => w.id.clone()).set(f64::from(w.load()));
        metrics::gauge!("relay_worker_capacity", "worker" => w.id.clone()).set(f64::from(w.registration.capacity));
        let transport = w.connection.transport().as_str();
        metrics::gauge!("relay_tunnel_rtt_seconds", "worker" => w.id.clone(), "transport" => transport)
            .set(w.connection.rtt().as_secs_f64());
    }
}
