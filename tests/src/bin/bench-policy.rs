//! Policy decision latency: a fresh WebAssembly instance per decision, beside the same logic
//! written natively in Rust, in the same run.
//!
//! ```text
//! scripts/build-policies
//! cargo run --release -p avatar-edge-tests --bin bench-policy -- [DECISIONS]
//! ```
//!
//! Each wasm row is what the relay pays per decision: a new store, instantiation from the
//! pre-linked module in a pooled slot, the call (arguments lowered, answer lifted), teardown. The
//! `via pool` row adds what the relay's async path adds: a slot from the semaphore and a hop to
//! the blocking thread pool and back. Prints a table (microseconds).

use avatar_edge_tests::{hmac_token, policy_module, unix_now};
use avatar_relay::config::{ModuleSettings, PoliciesConfig, PolicyModuleConfig};
use avatar_relay::policy::{
    ConnectDecision, ConnectRequest, Header, Policies, Principal, RouteDecision, RouteRequest, Worker,
};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::Mac;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

const SECRET: &str = "bench-policy-secret-0123456789";

fn load(world_auth: bool, name: &str, config: &str) -> Arc<Policies> {
    let module = Some(PolicyModuleConfig {
        path: policy_module(name),
        config: Some(ModuleSettings(toml::Value::String(config.into()))),
        config_file: None,
        fallback: None,
    });
    // A generous deadline: a VM preempting the bench for 10 ms must not turn into a failure.
    let base = PoliciesConfig {
        deadline_ms: 100,
        ..Default::default()
    };
    let config = if world_auth {
        PoliciesConfig { auth: module, ..base }
    } else {
        PoliciesConfig { router: module, ..base }
    };
    Policies::load(&config).expect("module loads").expect("configured")
}

/// p50 and p99, in microseconds.
type Percentiles = (f64, f64);

/// Run `f` `n` times after a warm-up.
fn measure(n: usize, mut f: impl FnMut()) -> Percentiles {
    for _ in 0..n / 10 + 10 {
        f();
    }
    let mut us: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    us.sort_by(f64::total_cmp);
    let at = |p: f64| us[((p / 100.0) * (us.len() - 1) as f64).round() as usize];
    (at(50.0), at(99.0))
}

fn connect(query: String, authorization: Option<String>) -> ConnectRequest {
    ConnectRequest {
        session_id: "bench-session".into(),
        path: "/ws/bench-session".into(),
        query,
        headers: authorization
            .map(|v| Header {
                name: "authorization".into(),
                value: v,
            })
            .into_iter()
            .collect(),
        remote_addr: "203.0.113.7:50000".into(),
        now_ms: unix_now() * 1000,
    }
}

fn allowed(d: Option<Result<ConnectDecision, avatar_relay::policy::CallError>>) -> bool {
    match d {
        Some(Ok(ConnectDecision::Allow(_))) => true,
        other => panic!("unexpected decision: {other:?}"),
    }
}

/// The hmac-token example's check, natively.
fn native_hmac(token: &str, now_s: u64) -> Option<String> {
    let mut parts = token.rsplitn(3, '.');
    let (sig, expiry, user) = (parts.next()?, parts.next()?, parts.next()?);
    let expiry: u64 = expiry.parse().ok()?;
    let sig = URL_SAFE_NO_PAD.decode(sig).ok()?;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).ok()?;
    mac.update(user.as_bytes());
    mac.update(b".");
    mac.update(expiry.to_string().as_bytes());
    mac.verify_slice(&sig).ok()?;
    (expiry > now_s && expiry - now_s <= 86_400).then(|| user.to_owned())
}

/// The router-sticky example's choice, natively.
fn native_sticky(user: &str, workers: &[Worker]) -> Option<String> {
    use sha2::Digest;
    workers
        .iter()
        .max_by_key(|w| {
            let d = sha2::Sha256::new()
                .chain_update(user.as_bytes())
                .chain_update([0u8])
                .chain_update(w.id.as_bytes())
                .finalize();
            u64::from_be_bytes(d[..8].try_into().unwrap_or_default())
        })
        .map(|w| w.id.clone())
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    // (decision, wasm, native)
    let mut rows: Vec<(&str, Percentiles, Percentiles)> = Vec::new();

    // allow-all: the floor (instantiate + call + teardown of a tiny module).
    let p = load(true, "allow-all", "");
    let wasm = measure(n, || {
        assert!(allowed(p.authorize_connect_blocking(&connect("user=li".into(), None))))
    });
    let native = measure(n, || {
        let r = connect("user=li".into(), None);
        black_box(ConnectDecision::Allow(Principal {
            user_id: r.query[5..].to_owned(),
            claims: vec![],
        }));
    });
    rows.push(("allow-all", wasm, native));

    // The same, the way the relay calls it: semaphore slot + blocking pool hop.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let via_pool = measure(n, || {
        let decision = rt.block_on(p.authorize_connect(connect("user=li".into(), None)));
        assert!(allowed(decision));
    });
    rows.push(("allow-all via pool (relay path)", via_pool, native));

    // hmac-token: a real check (base64, HMAC-SHA256, expiry).
    let p = load(true, "hmac-token", &format!(r#"{{"secret": "{SECRET}"}}"#));
    let token = hmac_token(SECRET, "alice", unix_now() + 600);
    let wasm = measure(n, || {
        assert!(allowed(
            p.authorize_connect_blocking(&connect(format!("token={token}"), None))
        ))
    });
    let native = measure(n, || {
        let r = connect(format!("token={token}"), None);
        assert!(native_hmac(&r.query[6..], r.now_ms / 1000).is_some());
    });
    rows.push(("hmac-token", wasm, native));

    // jwt HS256 against jsonwebtoken natively.
    let p = load(
        true,
        "jwt",
        &format!(r#"{{"algorithm": "HS256", "secret": "{SECRET}"}}"#),
    );
    let claims = serde_json::json!({"sub": "alice", "exp": unix_now() + 600, "region": "eu"});
    let jwt = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("encode");
    let bearer = format!("Bearer {jwt}");
    let wasm = measure(n, || {
        assert!(allowed(
            p.authorize_connect_blocking(&connect(String::new(), Some(bearer.clone())))
        ))
    });
    let key = jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes());
    let validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    let native = measure(n, || {
        let r = connect(String::new(), Some(bearer.clone()));
        let token = r.headers[0].value.trim_start_matches("Bearer ");
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key, &validation);
        assert!(data.is_ok());
    });
    rows.push(("jwt HS256", wasm, native));

    // router-sticky over 8 workers.
    let p = load(false, "router-sticky", "");
    let workers: Vec<Worker> = (0..8)
        .map(|i| Worker {
            id: format!("gpu-{i}"),
            avatars: vec!["tutor".into()],
            capacity: 8,
            active: i % 8,
            labels: vec![("region".into(), "eu".into())],
            rtt_us: 500 + i as u64,
        })
        .collect();
    let request = || RouteRequest {
        session_id: "bench-session".into(),
        principal: Principal {
            user_id: "alice".into(),
            claims: vec![],
        },
        avatar_id: Some("tutor".into()),
        workers: workers.clone(),
        now_ms: 0,
    };
    let wasm = measure(n, || {
        assert!(matches!(
            p.route_blocking(&request()),
            Some(Ok(RouteDecision::Worker(_)))
        ))
    });
    let native = measure(n, || {
        let r = request();
        assert!(native_sticky(&r.principal.user_id, &r.workers).is_some());
    });
    rows.push(("router-sticky (8 workers)", wasm, native));

    println!("\npolicy decisions, {n} each, fresh instance per wasm decision (µs)\n");
    println!("| decision | wasm p50 | wasm p99 | native p50 | native p99 | ratio p50 |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, (w50, w99), (n50, n99)) in rows {
        let ratio = w50 / n50.max(0.01);
        println!("| {name} | {w50:.1} | {w99:.1} | {n50:.2} | {n99:.2} | {ratio:.0}× |");
    }
}
