//! The policy sandbox with real compiled modules: every example's decisions, every hostile
//! module's containment, load-time refusals and hot reload.
//!
//! The modules come from `scripts/build-policies` (run by `scripts/test` before the tests), in
//! `wasm-policies/dist/`.

use avatar_relay::config::{ModuleSettings, PoliciesConfig, PolicyModuleConfig, RouterFallback};
use avatar_relay::policy::{
    CallError, ConnectDecision, ConnectRequest, Header, LoadError, MessageKind, MessageRequest, Policies, Principal,
    Reload, RouteDecision, RouteRequest, Verdict, Worker,
};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn module(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../wasm-policies/dist")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run scripts/build-policies (scripts/test does)",
        path.display()
    );
    path
}

fn module_config(path: PathBuf, config: &str) -> PolicyModuleConfig {
    PolicyModuleConfig {
        path,
        config: Some(ModuleSettings(toml::Value::String(config.into()))),
        config_file: None,
        fallback: None,
    }
}

fn auth(name: &str, config: &str) -> Arc<Policies> {
    let config = PoliciesConfig {
        auth: Some(module_config(module(name), config)),
        ..Default::default()
    };
    Policies::load(&config).expect("loads").expect("configured")
}

fn router(name: &str, config: &str) -> Arc<Policies> {
    let config = PoliciesConfig {
        router: Some(module_config(module(name), config)),
        ..Default::default()
    };
    Policies::load(&config).expect("loads").expect("configured")
}

fn now_ms() -> u64 {
    avatar_relay::policy::now_ms()
}

fn connect(query: &str, headers: &[(&str, &str)], remote: &str) -> ConnectRequest {
    ConnectRequest {
        session_id: "s-1".into(),
        path: "/ws/s-1".into(),
        query: query.into(),
        headers: headers
            .iter()
            .map(|(n, v)| Header {
                name: n.to_string(),
                value: v.to_string(),
            })
            .collect(),
        remote_addr: remote.into(),
        now_ms: now_ms(),
    }
}

async fn decide(p: &Policies, request: ConnectRequest) -> Result<ConnectDecision, CallError> {
    p.authorize_connect(request).await.expect("auth configured")
}

/// The user id if allowed, else the deny reason as an error.
async fn admit(p: &Policies, request: ConnectRequest) -> Result<Principal, String> {
    match decide(p, request).await.expect("decision") {
        ConnectDecision::Allow(principal) => Ok(principal),
        ConnectDecision::Deny(reason) => Err(reason),
    }
}

async fn message(p: &Policies, kind: MessageKind, avatar: Option<&str>) -> Verdict {
    let request = MessageRequest {
        session_id: "s-1".into(),
        kind,
        user_id: "alice".into(),
        avatar_id: avatar.map(str::to_owned),
        now_ms: now_ms(),
    };
    p.authorize_message(request)
        .await
        .expect("auth configured")
        .expect("decision")
}

const SECRET: &str = "policy-test-secret-0123456789";

fn hmac_token(secret: &str, user: &str, expiry: u64) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(format!("{user}.{expiry}").as_bytes());
    format!(
        "{user}.{expiry}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

#[tokio::test]
async fn allow_all_admits_everyone() {
    let p = auth("allow-all", "");
    assert_eq!(
        admit(&p, connect("user=li", &[], "127.0.0.1:1"))
            .await
            .expect("allowed")
            .user_id,
        "li"
    );
    assert_eq!(
        admit(&p, connect("", &[], "127.0.0.1:1"))
            .await
            .expect("allowed")
            .user_id,
        "anonymous"
    );
    assert!(matches!(message(&p, MessageKind::Text, None).await, Verdict::Allow));
}

#[tokio::test]
async fn hmac_token_allows_valid_tokens_and_names_every_refusal() {
    let config = format!(r#"{{"secret": "{SECRET}", "avatars": ["tutor"]}}"#);
    let p = auth("hmac-token", &config);
    let now = now_ms() / 1000;
    let good = hmac_token(SECRET, "alice", now + 600);
    let who = admit(&p, connect(&format!("token={good}"), &[], "127.0.0.1:1"))
        .await
        .expect("query token");
    assert_eq!(who.user_id, "alice");
    assert!(who.claims.contains(&("auth".into(), "hmac-token".into())));
    let bearer = format!("Bearer {}", hmac_token(SECRET, "bob.smith", now + 600));
    let who = admit(&p, connect("", &[("authorization", &bearer)], "127.0.0.1:1"))
        .await
        .expect("header token");
    assert_eq!(who.user_id, "bob.smith", "user ids may contain dots");

    let refused = |query: String| {
        let p = Arc::clone(&p);
        async move {
            admit(&p, connect(&query, &[], "127.0.0.1:1"))
                .await
                .expect_err("refused")
        }
    };
    assert!(refused(String::new()).await.starts_with("missing token"));
    assert_eq!(
        refused(format!("token={}", hmac_token(SECRET, "alice", now - 1))).await,
        "token expired"
    );
    let forged = hmac_token("another-secret-0123456789", "alice", now + 600);
    assert_eq!(refused(format!("token={forged}")).await, "bad signature");
    let tampered = good.replacen("alice", "admin", 1);
    assert_eq!(refused(format!("token={tampered}")).await, "bad signature");
    assert!(refused("token=garbage".into()).await.starts_with("malformed token"));
    let forever = hmac_token(SECRET, "alice", now + 10 * 86_400);
    assert!(refused(format!("token={forever}")).await.contains("lifetime"));

    // Per-message: offers only for the configured avatars.
    assert!(matches!(
        message(&p, MessageKind::Offer, Some("tutor")).await,
        Verdict::Allow
    ));
    assert!(matches!(message(&p, MessageKind::Offer, Some("ceo")).await, Verdict::Deny(r) if r.contains("ceo")));
    assert!(matches!(
        message(&p, MessageKind::IceCandidate, None).await,
        Verdict::Allow
    ));

    // A misconfigured module denies (it never lets anyone in by accident).
    let p = auth("hmac-token", r#"{"secret": "short"}"#);
    let reason = admit(&p, connect(&format!("token={good}"), &[], "127.0.0.1:1"))
        .await
        .expect_err("denied");
    assert!(reason.contains("misconfigured"), "{reason}");
}

fn jwt_hs256(secret: &str, claims: &serde_json::Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), claims, &key).expect("encode")
}

#[tokio::test]
async fn jwt_hs256_checks_signature_expiry_issuer_and_audience() {
    let config = format!(
        r#"{{"algorithm": "HS256", "secret": "{SECRET}", "issuer": "https://id.example", "audience": "tutor"}}"#
    );
    let p = auth("jwt", &config);
    let now = now_ms() / 1000;
    let claims = |exp: u64| serde_json::json!({"sub": "alice", "exp": exp, "iss": "https://id.example", "aud": "tutor", "region": "eu"});
    let token = jwt_hs256(SECRET, &claims(now + 600));
    let who = admit(&p, connect(&format!("token={token}"), &[], "127.0.0.1:1"))
        .await
        .expect("valid");
    assert_eq!(who.user_id, "alice");
    assert!(who.claims.contains(&("region".into(), "eu".into())), "{:?}", who.claims);

    let refused = |token: String| {
        let p = Arc::clone(&p);
        async move {
            admit(
                &p,
                connect("", &[("authorization", &format!("Bearer {token}"))], "127.0.0.1:1"),
            )
            .await
            .expect_err("refused")
        }
    };
    assert_eq!(refused(jwt_hs256(SECRET, &claims(now - 120))).await, "token expired");
    assert_eq!(
        refused(jwt_hs256("wrong-secret-0123456789", &claims(now + 600))).await,
        "bad signature"
    );
    let mut other_iss = claims(now + 600);
    other_iss["iss"] = "https://evil.example".into();
    assert_eq!(refused(jwt_hs256(SECRET, &other_iss)).await, "wrong issuer");
    let mut other_aud = claims(now + 600);
    other_aud["aud"] = "billing".into();
    assert_eq!(refused(jwt_hs256(SECRET, &other_aud)).await, "wrong audience");
    let mut no_exp = claims(now + 600);
    no_exp.as_object_mut().expect("object").remove("exp");
    assert_eq!(refused(jwt_hs256(SECRET, &no_exp)).await, "token has no `exp`");
    // "alg": "none" with no signature.
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims(now + 600).to_string())
    );
    assert!(refused(none).await.starts_with("wrong algorithm"));
}

#[tokio::test]
async fn jwt_rs256_verifies_with_the_public_key_and_refuses_other_algorithms() {
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let mut rng = rand::thread_rng();
    let key = rsa::RsaPrivateKey::new(&mut rng, 2048).expect("key");
    let other = rsa::RsaPrivateKey::new(&mut rng, 2048).expect("key");
    let public_pem = key.to_public_key().to_public_key_pem(LineEnding::LF).expect("pem");
    let sign = |k: &rsa::RsaPrivateKey, claims: &serde_json::Value| {
        let pem = k.to_pkcs8_pem(LineEnding::LF).expect("pem");
        let enc = jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()).expect("encoding key");
        jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256), claims, &enc).expect("encode")
    };
    let config = serde_json::json!({"algorithm": "RS256", "public_key_pem": public_pem}).to_string();
    let p = auth("jwt", &config);
    let claims = serde_json::json!({"sub": "carol", "exp": now_ms() / 1000 + 600, "plan": "pro"});
    let who = admit(
        &p,
        connect(&format!("token={}", sign(&key, &claims)), &[], "127.0.0.1:1"),
    )
    .await
    .expect("valid RS256");
    assert_eq!(who.user_id, "carol");
    let forged = sign(&other, &claims);
    let reason = admit(&p, connect(&format!("token={forged}"), &[], "127.0.0.1:1"))
        .await
        .expect_err("forged");
    assert_eq!(reason, "bad signature");
    // Key confusion: an HS256 token "signed" with the public key text must not pass.
    let confused = jwt_hs256(&public_pem, &claims);
    let reason = admit(&p, connect(&format!("token={confused}"), &[], "127.0.0.1:1"))
        .await
        .expect_err("HS256");
    assert!(
        reason.starts_with("wrong algorithm: token is signed with HS256"),
        "{reason}"
    );
}

#[tokio::test]
async fn ip_allowlist_matches_networks_and_mapped_addresses() {
    let p = auth("ip-allowlist", r#"{"allow": ["203.0.113.0/24", "2001:db8::/32"]}"#);
    assert_eq!(
        admit(&p, connect("", &[], "203.0.113.7:5000"))
            .await
            .expect("in list")
            .user_id,
        "ip:203.0.113.7"
    );
    admit(&p, connect("", &[], "[::ffff:203.0.113.9]:5000"))
        .await
        .expect("IPv4-mapped");
    admit(&p, connect("", &[], "[2001:db8::1]:5000"))
        .await
        .expect("IPv6 net");
    let reason = admit(&p, connect("", &[], "198.51.100.1:5000"))
        .await
        .expect_err("not listed");
    assert!(reason.contains("198.51.100.1"), "{reason}");
    admit(&p, connect("", &[], "[::1]:5000"))
        .await
        .expect_err("loopback not listed");
}

fn worker(id: &str, avatars: &[&str], capacity: u32, active: u32, rtt_us: u64, labels: &[(&str, &str)]) -> Worker {
    Worker {
        id: id.into(),
        avatars: avatars.iter().map(|a| a.to_string()).collect(),
        capacity,
        active,
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        rtt_us,
    }
}

async fn route(
    p: &Policies,
    user: &str,
    claims: &[(&str, &str)],
    avatar: Option<&str>,
    workers: Vec<Worker>,
) -> String {
    let request = RouteRequest {
        session_id: "s-1".into(),
        principal: Principal {
            user_id: user.into(),
            claims: claims.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        },
        avatar_id: avatar.map(str::to_owned),
        workers,
        now_ms: now_ms(),
    };
    match p.route(request).await.expect("router configured").expect("decision") {
        RouteDecision::Worker(id) => id,
        RouteDecision::Reject(reason) => format!("rejected: {reason}"),
    }
}

#[tokio::test]
async fn affinity_router_prefers_preloaded_avatar_then_region_then_load() {
    let p = router("router-affinity", "");
    let ws = || {
        vec![
            worker("generic-idle", &[], 8, 0, 100, &[("region", "us")]),
            worker("tutor-busy", &["tutor"], 8, 6, 100, &[("region", "us")]),
            worker("tutor-eu", &["tutor"], 8, 7, 900, &[("region", "eu")]),
        ]
    };
    assert_eq!(
        route(&p, "u", &[], Some("tutor"), ws()).await,
        "tutor-busy",
        "preloaded, then load"
    );
    assert_eq!(
        route(&p, "u", &[("region", "eu")], Some("tutor"), ws()).await,
        "tutor-eu",
        "region claim"
    );
    assert_eq!(route(&p, "u", &[], None, ws()).await, "generic-idle", "least loaded");
    let tie = vec![worker("far", &[], 4, 1, 9000, &[]), worker("near", &[], 4, 1, 200, &[])];
    assert_eq!(route(&p, "u", &[], None, tie).await, "near", "RTT breaks ties");
    let p = router("router-affinity", r#"{"require_avatar": true}"#);
    assert!(route(&p, "u", &[], Some("ceo"), ws()).await.starts_with("rejected"));
}

#[tokio::test]
async fn sticky_router_keeps_users_on_their_worker() {
    let p = router("router-sticky", "");
    let ws: Vec<Worker> = (0..4).map(|i| worker(&format!("w{i}"), &[], 8, i, 100, &[])).collect();
    let mut homes = std::collections::HashMap::new();
    for u in 0..40 {
        let user = format!("user-{u}");
        let home = route(&p, &user, &[], None, ws.clone()).await;
        // Same answer again, and with the workers listed in another order.
        assert_eq!(route(&p, &user, &[], None, ws.clone()).await, home);
        let mut reversed = ws.clone();
        reversed.reverse();
        assert_eq!(route(&p, &user, &[], None, reversed).await, home);
        // Another worker leaving does not move the user.
        let others: Vec<Worker> = ws.iter().filter(|w| w.id == home || w.id != "w0").cloned().collect();
        assert_eq!(route(&p, &user, &[], None, others).await, home);
        *homes.entry(home).or_insert(0) += 1;
    }
    assert_eq!(homes.len(), 4, "40 users spread over all 4 workers: {homes:?}");
    assert_eq!(
        route(&p, "", &[], None, ws.clone()).await,
        "w0",
        "no user: least loaded"
    );
}

/// Copy `name` to `path` (replacing it atomically, as a deploy would).
fn install(name: &str, path: &Path) {
    let tmp = path.with_extension("tmp");
    std::fs::copy(module(name), &tmp).expect("copy");
    std::fs::rename(&tmp, path).expect("rename");
}

/// A policy set whose auth module lives in a temp file we can swap.
fn swappable(name: &str, dir: &Path, deadline_ms: u64) -> (Arc<Policies>, PathBuf) {
    let path = dir.join("auth.wasm");
    install(name, &path);
    let config = PoliciesConfig {
        auth: Some(module_config(path.clone(), "")),
        deadline_ms,
        reload_poll_ms: 0,
        ..Default::default()
    };
    (Policies::load(&config).expect("loads").expect("configured"), path)
}

/// After a hostile decision, the same relay state swaps in a good module and serves.
async fn recovers(p: &Policies, path: &Path) {
    install("allow-all", path);
    let report = p.reload(false);
    assert!(
        matches!(report.as_slice(), [(_, Reload::Reloaded { .. })]),
        "{report:?}"
    );
    assert_eq!(
        admit(p, connect("user=ok", &[], "127.0.0.1:1"))
            .await
            .expect("allowed")
            .user_id,
        "ok"
    );
}

#[tokio::test]
async fn an_infinite_loop_is_stopped_at_the_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (p, path) = swappable("hostile-infinite-loop", dir.path(), 10);
    for _ in 0..3 {
        let started = Instant::now();
        let err = decide(&p, connect("", &[], "127.0.0.1:1")).await.expect_err("stopped");
        let took = started.elapsed();
        assert!(matches!(err, CallError::Deadline(_)), "{err}");
        // Deadline plus one 1 ms tick, plus scheduling slack on a busy 2-core machine.
        assert!(
            took >= Duration::from_millis(10),
            "stopped before its deadline: {took:?}"
        );
        assert!(took < Duration::from_millis(10 + 1 + 40), "took {took:?}");
        eprintln!("infinite loop stopped after {took:?} (deadline 10 ms)");
    }
    recovers(&p, &path).await;
}

#[tokio::test]
async fn a_memory_bomb_is_stopped_at_the_cap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (p, path) = swappable("hostile-memory-bomb", dir.path(), 1000);
    let err = decide(&p, connect("", &[], "127.0.0.1:1")).await.expect_err("stopped");
    assert!(matches!(err, CallError::Memory(cap) if cap == 16 << 20), "{err}");
    recovers(&p, &path).await;
}

#[tokio::test]
async fn a_panic_is_a_failed_decision() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (p, path) = swappable("hostile-panic", dir.path(), 10);
    let err = decide(&p, connect("", &[], "127.0.0.1:1")).await.expect_err("trapped");
    assert!(matches!(err, CallError::Trap(_)), "{err}");
    let err = p
        .authorize_message(MessageRequest {
            session_id: "s".into(),
            kind: MessageKind::Text,
            user_id: "u".into(),
            avatar_id: None,
            now_ms: 0,
        })
        .await
        .expect("configured")
        .expect_err("trapped");
    assert!(matches!(err, CallError::Trap(_)), "{err}");
    recovers(&p, &path).await;
}

#[tokio::test]
async fn a_huge_answer_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (p, path) = swappable("hostile-huge-output", dir.path(), 1000);
    let err = decide(&p, connect("", &[], "127.0.0.1:1")).await.expect_err("too big");
    assert!(
        matches!(err, CallError::Output { size, max } if size == 4 << 20 && max == 64 << 10),
        "{err}"
    );
    recovers(&p, &path).await;
}

fn load_err(name: &str, world_is_router: bool) -> LoadError {
    let m = Some(module_config(module(name), ""));
    let config = if world_is_router {
        PoliciesConfig {
            router: m,
            ..Default::default()
        }
    } else {
        PoliciesConfig {
            auth: m,
            ..Default::default()
        }
    };
    match Policies::load(&config) {
        Ok(_) => panic!("{name} must be refused"),
        Err(e) => e,
    }
}

#[test]
fn modules_that_import_wasi_or_unknown_functions_are_refused_at_load() {
    let err = load_err("hostile-wasi-import", false);
    let text = err.to_string();
    assert!(matches!(err, LoadError::ForbiddenImport { .. }), "{text}");
    assert!(text.contains("imports `wasi:") && text.contains("no WASI"), "{text}");
    let err = load_err("hostile-unknown-import", false);
    let text = err.to_string();
    assert!(text.contains("imports `evil:net/socket@0.1.0`"), "{text}");
}

#[test]
fn a_module_for_the_wrong_world_or_too_big_is_refused() {
    let text = load_err("router-sticky", false).to_string();
    assert!(text.contains("does not implement the `auth` world"), "{text}");
    let text = load_err("allow-all", true).to_string();
    assert!(text.contains("does not implement the `router` world"), "{text}");
    let config = PoliciesConfig {
        auth: Some(module_config(module("jwt"), "")),
        max_module_bytes: 1000,
        ..Default::default()
    };
    let text = Policies::load(&config).err().expect("too big").to_string();
    assert!(text.contains("above policies.max_module_bytes"), "{text}");
    let dir = tempfile::tempdir().expect("tempdir");
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm not really").expect("write");
    let config = PoliciesConfig {
        auth: Some(module_config(junk, "")),
        ..Default::default()
    };
    let text = Policies::load(&config).err().expect("junk").to_string();
    assert!(text.contains("not a valid WebAssembly component"), "{text}");
}

#[tokio::test]
async fn a_router_naming_a_worker_it_was_not_offered_fails() {
    let p = router("hostile-bogus-route", "");
    let request = RouteRequest {
        session_id: "s".into(),
        principal: Principal {
            user_id: "u".into(),
            claims: vec![],
        },
        avatar_id: None,
        workers: vec![worker("w1", &[], 1, 0, 1, &[])],
        now_ms: 0,
    };
    let err = p.route(request).await.expect("configured").expect_err("bogus");
    assert!(err.to_string().contains("no-such-worker"), "{err}");
    assert_eq!(p.router_fallback(), RouterFallback::Builtin);
}

#[tokio::test]
async fn hot_reload_swaps_versions_and_keeps_the_old_one_when_the_new_one_is_broken() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("auth.wasm");
    let config_file = dir.path().join("auth.json");
    install("allow-all", &path);
    std::fs::write(&config_file, format!(r#"{{"secret": "{SECRET}"}}"#)).expect("write");
    let config = PoliciesConfig {
        auth: Some(PolicyModuleConfig {
            path: path.clone(),
            config: None,
            config_file: Some(config_file.clone()),
            fallback: None,
        }),
        reload_poll_ms: 0,
        ..Default::default()
    };
    let p = Policies::load(&config).expect("loads").expect("configured");
    admit(&p, connect("", &[], "127.0.0.1:1"))
        .await
        .expect("allow-all admits");
    assert!(p.reload(false).is_empty(), "nothing changed, nothing reloaded");

    install("hmac-token", &path);
    assert!(matches!(p.reload(false).as_slice(), [(_, Reload::Reloaded { .. })]));
    admit(&p, connect("", &[], "127.0.0.1:1"))
        .await
        .expect_err("hmac-token wants a token");
    let token = hmac_token(SECRET, "dana", now_ms() / 1000 + 60);
    admit(&p, connect(&format!("token={token}"), &[], "127.0.0.1:1"))
        .await
        .expect("token accepted");

    // A changed config file is a new version too: the old token's secret no longer matches.
    std::fs::write(&config_file, r#"{"secret": "a-rotated-secret-0123456789"}"#).expect("write");
    assert!(matches!(p.reload(false).as_slice(), [(_, Reload::Reloaded { .. })]));
    let reason = admit(&p, connect(&format!("token={token}"), &[], "127.0.0.1:1"))
        .await
        .expect_err("rotated");
    assert_eq!(reason, "bad signature");

    // A broken version is refused and the running one stays.
    install("hostile-wasi-import", &path);
    let report = p.reload(false);
    assert!(
        matches!(
            report.as_slice(),
            [(_, Reload::Failed(LoadError::ForbiddenImport { .. }))]
        ),
        "{report:?}"
    );
    let reason = admit(&p, connect(&format!("token={token}"), &[], "127.0.0.1:1"))
        .await
        .expect_err("still hmac");
    assert_eq!(reason, "bad signature");
    // Reported once, not on every poll.
    assert!(p.reload(false).is_empty());
}

#[tokio::test]
async fn many_concurrent_decisions_share_the_pool() {
    let config = PoliciesConfig {
        auth: Some(module_config(module("allow-all"), "")),
        max_concurrent: 4,
        ..Default::default()
    };
    let p = Policies::load(&config).expect("loads").expect("configured");
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let p = Arc::clone(&p);
            tokio::spawn(async move { admit(&p, connect(&format!("user=u{i}"), &[], "127.0.0.1:1")).await })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.expect("task").expect("allowed").user_id, format!("u{i}"));
    }
}

#[test]
fn compiled_modules_are_cached_on_disk() {
    let cache = tempfile::tempdir().expect("tempdir");
    let config = PoliciesConfig {
        auth: Some(module_config(module("jwt"), "")),
        cache_dir: Some(cache.path().to_path_buf()),
        ..Default::default()
    };
    let files = |dir: &Path| -> usize {
        fn walk(dir: &Path) -> usize {
            std::fs::read_dir(dir)
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 })
                        .sum()
                })
                .unwrap_or(0)
        }
        walk(dir)
    };
    let started = Instant::now();
    drop(Policies::load(&config).expect("loads"));
    let cold = started.elapsed();
    assert!(files(cache.path()) >= 1, "nothing cached in {}", cache.path().display());
    let started = Instant::now();
    drop(Policies::load(&config).expect("loads from the cache"));
    let warm = started.elapsed();
    eprintln!("jwt module load: {cold:?} compiling, {warm:?} from the cache");
}
