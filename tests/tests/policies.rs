//! Policy modules in the real relay process: admission by token, hot reload under a live
//! session, hostile modules failing closed while the relay keeps serving, and routing modules
//! with their fallback.
//!
//! Each test runs in its own loopback-only network namespace (see `netns`).

use avatar_edge_tests::cluster::{http_get, Cluster};
use avatar_edge_tests::signaling::Signaling;
use avatar_edge_tests::{hmac_token, netns, play, policy_module, unix_now};
use std::path::Path;
use std::time::{Duration, Instant};

const SECS: fn(u64) -> Duration = Duration::from_secs;
const POLICY_SECRET: &str = "e2e-policy-secret-5f1c2a9d";

/// Replace `path` with the module `name` the way a deploy does (write aside, rename over).
fn install(name: &str, path: &Path) {
    let tmp = path.with_extension("part");
    std::fs::copy(policy_module(name), &tmp).expect("copy module");
    std::fs::rename(&tmp, path).expect("rename module");
}

/// A relay whose auth module is the file `auth.wasm` in a directory the test controls, polled
/// every 100 ms, with the HMAC secret in its config, and one worker.
async fn relay_with_swappable_auth(first: &str, deadline_ms: u64) -> (Cluster, tempfile::TempDir) {
    let modules = tempfile::tempdir().expect("tempdir");
    let path = modules.path().join("auth.wasm");
    install(first, &path);
    let toml = format!(
        "[policies]\nreload_poll_ms = 100\ndeadline_ms = {deadline_ms}\n[policies.auth]\npath = \"{}\"\nconfig = {{ secret = \"{POLICY_SECRET}\" }}\n",
        path.display()
    );
    let mut cluster = Cluster::relay_only(&toml).await;
    cluster.add_worker("worker-1", 4, "").await;
    (cluster, modules)
}

/// Install module `name` at `path` and wait until the relay's log shows its `reloads`-th reload.
async fn swap_and_wait(cluster: &Cluster, name: &str, path: &Path, reloads: usize) {
    install(name, path);
    let deadline = Instant::now() + SECS(5);
    loop {
        let log = std::fs::read_to_string(&cluster.relay.log).unwrap_or_default();
        if log.matches("policy reloaded").count() >= reloads {
            return;
        }
        assert!(Instant::now() < deadline, "{name} never loaded:\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Connect and expect the relay to refuse with `unauthorized`, then close; returns the reason.
async fn refused(cluster: &Cluster, url_suffix: &str) -> String {
    let mut sig = Signaling::connect(&format!("{}{url_suffix}", cluster.ws_url(&format!("r-{}", rand_id()))))
        .await
        .expect("upgrade succeeds; refusal comes as an event");
    let ev = sig.next_event(SECS(5)).await.expect("event");
    assert_eq!(ev["type"], "error", "{ev}");
    assert_eq!(ev["code"], "unauthorized", "{ev}");
    let closed = sig
        .next_event(SECS(5))
        .await
        .expect_err("socket closes after the refusal");
    assert!(
        closed.to_string().contains("closed") || closed.to_string().contains("ended"),
        "{closed}"
    );
    ev["message"].as_str().expect("message").to_owned()
}

fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

async fn metrics(cluster: &Cluster) -> String {
    http_get(cluster.relay.http, "/metrics").await.expect("metrics").1
}

#[test]
fn a_valid_hmac_token_gets_video_and_no_token_gets_unauthorized() {
    netns::run(
        "a_valid_hmac_token_gets_video_and_no_token_gets_unauthorized",
        || async {
            let (cluster, _modules) = relay_with_swappable_auth("hmac-token", 10).await;
            let reason = refused(&cluster, "").await;
            assert!(reason.starts_with("missing token"), "{reason}");
            let expired = hmac_token(POLICY_SECRET, "alice", unix_now() - 5);
            assert_eq!(refused(&cluster, &format!("?token={expired}")).await, "token expired");
            let forged = hmac_token("not-the-secret-0123456789", "alice", unix_now() + 600);
            assert_eq!(refused(&cluster, &format!("?token={forged}")).await, "bad signature");

            let token = hmac_token(POLICY_SECRET, "alice", unix_now() + 600);
            let url = format!("{}?token={token}", cluster.ws_url("hmac-ok"));
            let mut sig = Signaling::connect(&url).await.expect("ws");
            let client = play(&mut sig, "a")
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
            let stats = client.wait_frames(50, SECS(6)).await;
            assert!(stats.frames_decoded >= 50, "{stats:?}");
            let relay_log = std::fs::read_to_string(&cluster.relay.log).expect("log");
            assert!(relay_log.contains("user=alice"), "sessions are logged with their user");
            assert!(
                !relay_log.contains(POLICY_SECRET),
                "the module's secret leaked into the log"
            );
            assert!(!relay_log.contains(&token), "a token leaked into the log");
            let m = metrics(&cluster).await;
            assert!(
                m.contains("relay_policy_decisions_total{hook=\"connect\",outcome=\"deny\"} 3"),
                "{m}"
            );
            assert!(
                m.contains("relay_policy_decisions_total{hook=\"connect\",outcome=\"allow\"} 1"),
                "{m}"
            );
            client.close().await;
        },
    );
}

#[test]
fn hot_reload_keeps_the_stream_and_the_next_connect_obeys_the_new_policy() {
    netns::run(
        "hot_reload_keeps_the_stream_and_the_next_connect_obeys_the_new_policy",
        || async {
            let (cluster, modules) = relay_with_swappable_auth("allow-all", 10).await;
            let mut sig = Signaling::connect(&cluster.ws_url("before-reload")).await.expect("ws");
            let client = play(&mut sig, "a")
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
            let before = client.wait_frames(25, SECS(5)).await.frames_decoded;
            assert!(before >= 25);

            install("hmac-token", &modules.path().join("auth.wasm"));
            cluster
                .wait_for_log(&cluster.relay.log, "policy reloaded", SECS(5))
                .await;
            let reloaded_at = Instant::now();
            // The open session does not notice: frames keep coming, on the same socket.
            let after = client.wait_frames(before + 50, SECS(5)).await.frames_decoded;
            assert!(after >= before + 50, "stream stalled after reload: {before} -> {after}");
            sig.send_json(&serde_json::json!({"type": "webrtc_ice_candidate", "candidate": null}))
                .await
                .expect("socket still open");
            // The next connect is judged by the new module.
            let reason = refused(&cluster, "").await;
            assert!(reason.starts_with("missing token"), "{reason}");
            let token = hmac_token(POLICY_SECRET, "bob", unix_now() + 600);
            let mut sig2 = Signaling::connect(&format!("{}?token={token}", cluster.ws_url("after-reload")))
                .await
                .expect("ws");
            let second = play(&mut sig2, "a").await.expect("token holder plays");
            assert!(second.wait_frames(25, SECS(5)).await.frames_decoded >= 25);
            eprintln!(
                "reload observed; stream went on {before} -> {after} frames in {:?}",
                reloaded_at.elapsed()
            );
            client.close().await;
            second.close().await;
        },
    );
}

#[test]
fn hostile_auth_modules_fail_closed_and_the_relay_keeps_serving() {
    netns::run(
        "hostile_auth_modules_fail_closed_and_the_relay_keeps_serving",
        || async {
            // 100 ms: the memory bomb reaches its 16 MiB cap in ~8 ms, so on a loaded machine a 10 ms
            // deadline could stop it first and the test would not see the memory cap at work.
            let (cluster, modules) = relay_with_swappable_auth("hostile-infinite-loop", 100).await;
            let path = modules.path().join("auth.wasm");
            let mut reloads = 0;
            for (module, kind) in [
                ("hostile-infinite-loop", "deadline"),
                ("hostile-memory-bomb", "memory"),
                ("hostile-panic", "trap"),
                ("hostile-huge-output", "output"),
            ] {
                if module != "hostile-infinite-loop" {
                    reloads += 1;
                    swap_and_wait(&cluster, module, &path, reloads).await;
                }
                let started = Instant::now();
                let reason = refused(&cluster, "?token=whatever").await;
                assert!(reason.contains("policy error"), "{module}: {reason}");
                let m = metrics(&cluster).await;
                assert!(
                    m.contains(&format!(
                        "relay_policy_failures_total{{hook=\"connect\",kind=\"{kind}\"}} 1"
                    )),
                    "{module} not counted as {kind}:\n{m}"
                );
                eprintln!("{module}: refused (fail closed) in {:?}", started.elapsed());
                assert_eq!(http_get(cluster.relay.http, "/healthz").await.expect("healthz").0, 200);
            }
            // A good module again: sessions play on the same relay process.
            reloads += 1;
            swap_and_wait(&cluster, "allow-all", &path, reloads).await;
            let mut sig = Signaling::connect(&cluster.ws_url("after-hostile")).await.expect("ws");
            let client = play(&mut sig, "a")
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
            assert!(client.wait_frames(25, SECS(5)).await.frames_decoded >= 25);
            client.close().await;
        },
    );
}

#[test]
fn a_module_importing_wasi_stops_the_start_and_a_bad_reload_keeps_the_old_module() {
    netns::run(
        "a_module_importing_wasi_stops_the_start_and_a_bad_reload_keeps_the_old_module",
        || async {
            let dir = tempfile::tempdir().expect("tempdir");
            let config = dir.path().join("relay.toml");
            std::fs::write(
            &config,
            format!(
                "[tunnel]\nsecret = \"0123456789abcdef0123\"\n[tls]\nself_signed = true\n[policies.auth]\npath = \"{}\"\n",
                policy_module("hostile-wasi-import").display()
            ),
        )
        .expect("write");
            let out = std::process::Command::new(avatar_edge_tests::bin_path("relay"))
                .arg("--config")
                .arg(&config)
                .arg("--check-config")
                .output()
                .expect("run relay");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(64), "{stderr}");
            assert!(
                stderr.contains("imports `wasi:") && stderr.contains("no WASI"),
                "{stderr}"
            );

            // At run time a broken new version is refused and the old one keeps deciding.
            let (cluster, modules) = relay_with_swappable_auth("allow-all", 10).await;
            install("hostile-unknown-import", &modules.path().join("auth.wasm"));
            cluster
                .wait_for_log(&cluster.relay.log, "policy reload failed", SECS(5))
                .await;
            let log = std::fs::read_to_string(&cluster.relay.log).expect("log");
            assert!(log.contains("evil:net/socket"), "the error names the import:\n{log}");
            let mut sig = Signaling::connect(&cluster.ws_url("old-module")).await.expect("ws");
            let client = play(&mut sig, "a").await.expect("allow-all still admits");
            client.close().await;
        },
    );
}

#[test]
fn a_router_module_picks_the_worker_and_its_failure_takes_the_fallback() {
    netns::run(
        "a_router_module_picks_the_worker_and_its_failure_takes_the_fallback",
        || async {
            // Sticky router: one user always lands on the same one of three workers.
            let toml = format!(
                "[policies.router]\npath = \"{}\"\n",
                policy_module("router-sticky").display()
            );
            let mut cluster = Cluster::relay_only(&toml).await;
            for id in ["w-a", "w-b", "w-c"] {
                cluster.add_worker(id, 4, "").await;
            }
            let mut homes = std::collections::HashSet::new();
            for i in 0..3 {
                let mut sig = Signaling::connect(&cluster.ws_url(&format!("sticky-{i}")))
                    .await
                    .expect("ws");
                sig.send_json(&serde_json::json!({
                "type": "webrtc_offer", "user_id": "alice", "sdp": avatar_edge_tests::rtc_client::RtcClient::new(true).await.expect("client").offer().await.expect("offer"),
            }))
            .await
            .expect("send");
                let ev = sig
                    .wait_for_any(&["session_assigned", "error"], SECS(10))
                    .await
                    .expect("event");
                assert_eq!(ev["type"], "session_assigned", "{ev}");
                homes.insert(ev["worker_id"].as_str().expect("worker").to_owned());
                sig.close().await;
            }
            assert_eq!(homes.len(), 1, "alice moved between workers: {homes:?}");
            drop(cluster);

            // A router naming a worker it was not offered: fallback `builtin` still serves...
            for (fallback, expect) in [("builtin", "session_assigned"), ("reject", "error")] {
                let toml = format!(
                    "[policies.router]\npath = \"{}\"\nfallback = \"{fallback}\"\n",
                    policy_module("hostile-bogus-route").display()
                );
                let mut cluster = Cluster::relay_only(&toml).await;
                cluster.add_worker("w-1", 4, "").await;
                let mut sig = Signaling::connect(&cluster.ws_url("bogus")).await.expect("ws");
                let offer = avatar_edge_tests::rtc_client::RtcClient::new(true)
                    .await
                    .expect("client");
                sig.send_offer(&offer.offer().await.expect("offer"), "a")
                    .await
                    .expect("send");
                let ev = sig
                    .wait_for_any(&["session_assigned", "error"], SECS(10))
                    .await
                    .expect("event");
                assert_eq!(ev["type"], expect, "fallback {fallback}: {ev}");
                if expect == "error" {
                    // ...and `reject` refuses with no_worker, the socket staying open.
                    assert_eq!(ev["code"], "no_worker", "{ev}");
                    sig.send_json(&serde_json::json!({"type": "interrupt"}))
                        .await
                        .expect("still open");
                }
                let m = metrics(&cluster).await;
                assert!(
                    m.contains("relay_policy_failures_total{hook=\"route\",kind=\"invalid\"} 1"),
                    "{m}"
                );
            }
        },
    );
}

fn hangup(cluster: &Cluster) {
    avatar_edge_tests::cluster::signal(&cluster.relay.child, "HUP");
}

#[test]
fn sighup_reloads_policies_and_a_relay_without_policies_survives_it() {
    netns::run(
        "sighup_reloads_policies_and_a_relay_without_policies_survives_it",
        || async {
            let modules = tempfile::tempdir().expect("tempdir");
            let path = modules.path().join("auth.wasm");
            install("allow-all", &path);
            // Polling off: only SIGHUP reloads.
            let toml = format!(
            "[policies]\nreload_poll_ms = 0\n[policies.auth]\npath = \"{}\"\nconfig = {{ secret = \"{POLICY_SECRET}\" }}\n",
            path.display()
        );
            let cluster = Cluster::relay_only(&toml).await;
            install("hmac-token", &path);
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut sig = Signaling::connect(&cluster.ws_url("still-old")).await.expect("ws");
            sig.send_json(&serde_json::json!({"type": "interrupt"}))
                .await
                .expect("send");
            let ev = sig.next_event(SECS(5)).await.expect("event");
            assert_eq!(ev["code"], "no_session", "allow-all still admits before SIGHUP: {ev}");
            hangup(&cluster);
            cluster
                .wait_for_log(&cluster.relay.log, "policy reloaded", SECS(5))
                .await;
            assert!(refused(&cluster, "").await.starts_with("missing token"));

            let plain = Cluster::relay_only("").await;
            hangup(&plain);
            // No policy to reload: the config file is re-read (nothing changed), and the relay lives.
            plain
                .wait_for_log(&plain.relay.log, "SIGHUP: configuration reloaded changed=[]", SECS(5))
                .await;
            assert_eq!(
                http_get(plain.relay.http, "/healthz")
                    .await
                    .expect("alive after SIGHUP")
                    .0,
                200
            );
        },
    );
}

/// Low finding of the security review: a session id was not bound to its user, so another user
/// could take it over while its owner was away (a reload, a network change). With an auth policy
/// that names users, the id stays its owner's for `limits.session_binding_s`.
#[test]
fn a_session_id_stays_bound_to_its_user_while_they_are_away() {
    netns::run("a_session_id_stays_bound_to_its_user_while_they_are_away", || async {
        let (cluster, _modules) = relay_with_swappable_auth("hmac-token", 10).await;
        let token = |user: &str| hmac_token(POLICY_SECRET, user, unix_now() + 600);
        let url = |user: &str| format!("{}?token={}", cluster.ws_url("lesson-7"), token(user));
        let mut alice = Signaling::connect(&url("alice")).await.expect("alice connects");
        alice.send_text("{}").await.expect("send");
        assert_eq!(alice.next_event(SECS(5)).await.expect("event")["type"], "error");
        alice.close().await;
        tokio::time::sleep(Duration::from_millis(200)).await;

        let mut mallory = Signaling::connect(&url("mallory")).await.expect("upgrade");
        let ev = mallory.next_event(SECS(5)).await.expect("event");
        assert_eq!(ev["code"], "session_in_use", "{ev}");
        assert!(mallory.next_event(SECS(5)).await.is_err(), "and closed");

        let mut back = Signaling::connect(&url("alice")).await.expect("alice returns");
        back.send_text("{}").await.expect("send");
        let ev = back.next_event(SECS(5)).await.expect("event");
        assert_eq!(ev["type"], "error", "{ev}");
        assert_ne!(ev["code"], "session_in_use", "alice has her session id back: {ev}");
    });
}
