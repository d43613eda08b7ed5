//! A fleet of relays: two relays, two workers of capacity 2, each worker dialing both relays, and
//! browsers spread over both (issue 16). The worker is the authority on its capacity: it reports
//! its load to every relay and refuses with `busy` when full, and a relay that gets `busy` tries
//! another worker before telling the browser.
//!
//! Real relay and worker processes and Rust WebRTC clients, in a loopback-only namespace.

use avatar_edge_tests::cluster::{Cluster, SECRET};
use avatar_edge_tests::netns;
use avatar_edge_tests::rtc_client::RtcClient;
use avatar_edge_tests::signaling::Signaling;
use std::time::{Duration, Instant};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Idle video only, smaller than the default: this test is about where sessions go, and four
/// sessions with their receivers share two cores.
const WORKER_TOML: &str = "[video]\nwidth = 256\nheight = 256";

/// A session that plays: its socket and its receiving peer.
struct Playing {
    relay: usize,
    worker: String,
    sig: Signaling,
    client: RtcClient,
}

/// Open a session on `relay` and offer; `Ok` once it plays (frames decoded), `Err(code)` with
/// the error the relay or worker sent instead, and how long it took to come.
async fn open(relays: &[&Cluster], relay: usize, name: &str) -> Result<Playing, (String, Duration)> {
    let cluster = relays[relay];
    let mut sig = Signaling::connect(&cluster.ws_url(name)).await.expect("socket");
    let client = RtcClient::new(true).await.expect("peer");
    let offer = client.offer().await.expect("offer");
    let started = Instant::now();
    sig.send_offer(&offer, "a").await.expect("send offer");
    let mut worker = String::new();
    loop {
        let ev = sig
            .wait_for_any(&["session_assigned", "webrtc_answer", "error"], SECS(10))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", logs(relays)));
        match ev["type"].as_str() {
            Some("session_assigned") => worker = ev["worker_id"].as_str().unwrap_or_default().to_owned(),
            Some("error") => {
                return Err((ev["code"].as_str().unwrap_or_default().to_owned(), started.elapsed()));
            }
            _ => {
                let sdp = ev["sdp"].as_str().expect("answer sdp");
                client.accept_answer(sdp).await.expect("answer");
                client
                    .connected(SECS(10))
                    .await
                    .unwrap_or_else(|e| panic!("{name} did not connect: {e}\n{}", logs(relays)));
                let frames = client.wait_frames(10, SECS(10)).await.frames_decoded;
                assert!(frames >= 10, "{name} connected but decoded {frames} frames");
                return Ok(Playing {
                    relay,
                    worker,
                    sig,
                    client,
                });
            }
        }
    }
}

fn logs(relays: &[&Cluster]) -> String {
    relays.iter().map(|c| c.logs()).collect::<Vec<_>>().join("\n")
}

/// Whether `client` is still receiving video: more frames decoded after `within`.
async fn still_playing(client: &RtcClient, within: Duration) -> bool {
    let before = client.snapshot().frames_decoded;
    client.wait_frames(before + 10, within).await.frames_decoded >= before + 10
}

/// Close session `index` of `playing`: the browser leaves, and its worker ends the session.
async fn close(playing: &mut Vec<Playing>, index: usize) {
    let p = playing.remove(index);
    p.sig.close().await;
}

#[test]
fn two_relays_share_two_workers_without_oversubscribing_them() {
    netns::run("two_relays_share_two_workers_without_oversubscribing_them", || async {
        let mut a = Cluster::relay_only("").await;
        let b = Cluster::relay_only("").await;
        // Each worker dials both relays: relay A through the cluster's own entry, relay B as a
        // second `[[relays]]` entry.
        let also_b = format!(
            "[[relays]]\naddress = \"{}\"\nserver_name = \"localhost\"\nfingerprint = \"{}\"",
            b.relay.tunnel, b.relay.fingerprint
        );
        let trust = format!("fingerprint = \"{}\"", a.relay.fingerprint);
        let mut worker_logs = Vec::new();
        for id in ["gpu-1", "gpu-2"] {
            worker_logs.push(a.spawn_worker(id, 2, SECRET, &trust, &format!("{WORKER_TOML}\n{also_b}")));
        }
        for log in &worker_logs {
            let took = avatar_edge_tests::cluster::wait_for_count(log, "registered with relay", 2, SECS(20)).await;
            assert!(
                took.is_some(),
                "a worker did not register with both relays:\n{}",
                a.logs()
            );
        }
        let relays = [&a, &b];

        // Six browsers, alternately on each relay: exactly four play, the others are refused
        // quickly, whichever relay they came through.
        let mut playing = Vec::new();
        let mut refused = Vec::new();
        for i in 0..6 {
            match open(&relays, i % 2, &format!("s{i}")).await {
                Ok(p) => playing.push(p),
                Err((code, took)) => refused.push((i, code, took)),
            }
        }
        assert_eq!(playing.len(), 4, "refused: {refused:?}\n{}", logs(&relays));
        for (i, code, took) in &refused {
            assert!(code == "busy" || code == "no_worker", "s{i} got {code}");
            assert!(*took < SECS(2), "s{i} waited {took:?} for `{code}`");
        }
        for worker in ["gpu-1", "gpu-2"] {
            let on = playing.iter().filter(|p| p.worker == worker).count();
            assert_eq!(on, 2, "{worker} runs {on} sessions");
        }
        // Both relays routed sessions, so each worker's load came from both.
        assert!(playing.iter().any(|p| p.relay == 0) && playing.iter().any(|p| p.relay == 1));

        // Closing a session frees its slot for the next browser, on either relay.
        for relay in [0, 1] {
            let other = 1 - relay;
            let index = playing
                .iter()
                .position(|p| p.relay == other)
                .expect("a session on the other relay");
            close(&mut playing, index).await;
            let name = format!("after-close-{relay}");
            let deadline = Instant::now() + SECS(5);
            loop {
                match open(&relays, relay, &name).await {
                    Ok(p) => {
                        playing.push(p);
                        break;
                    }
                    Err((code, _)) if Instant::now() < deadline => {
                        // The worker reports the freed slot once the closed peer is gone.
                        assert_eq!(code, "busy");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err((code, _)) => panic!("the freed slot never took {name}: {code}\n{}", logs(&relays)),
                }
            }
        }
        assert_eq!(playing.len(), 4);

        // Make room for one more, then kill relay A: the sessions it routed play on (media never
        // rides the relay), and a new session goes through relay B.
        let index = playing.iter().position(|p| p.relay == 1).expect("a session on B");
        close(&mut playing, index).await;
        let routed_by_a: Vec<usize> = (0..playing.len()).filter(|&i| playing[i].relay == 0).collect();
        assert!(!routed_by_a.is_empty());
        // SIGKILL: no goodbye to the browsers or the workers.
        a.relay.child.kill().expect("kill relay A");
        let _ = a.relay.child.wait();
        for &i in &routed_by_a {
            assert!(
                still_playing(&playing[i].client, SECS(5)).await,
                "a session routed by the killed relay stopped"
            );
        }
        let deadline = Instant::now() + SECS(10);
        loop {
            match open(&[&b], 0, "after-relay-loss").await {
                Ok(p) => {
                    playing.push(p);
                    break;
                }
                Err((code, _)) if Instant::now() < deadline => {
                    assert_eq!(code, "busy", "relay B still has both workers");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err((code, _)) => panic!("no session through relay B after A died: {code}\n{}", b.logs()),
            }
        }
    });
}

/// One worker per GPU (issue 27): two instances of `avatar-edge-worker@.service` on one host read
/// the same config file and register under distinct ids, the unit's `AVATAR_EDGE_WORKER_ID`
/// (the hostname and the instance) with `%H` and `%i` filled in as systemd does.
#[test]
fn two_instances_of_the_unit_template_register_under_distinct_ids() {
    netns::run(
        "two_instances_of_the_unit_template_register_under_distinct_ids",
        || async {
            let unit = std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/avatar-edge-worker@.service"),
            )
            .expect("template");
            let id_of = |instance: &str| {
                let template = unit
                    .lines()
                    .find_map(|l| l.strip_prefix("Environment=AVATAR_EDGE_WORKER_ID="))
                    .expect("the template names the worker id");
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
                template.replace("%H", host.trim()).replace("%i", instance)
            };
            let mut cluster = Cluster::relay_only("").await;
            let trust = format!("fingerprint = \"{}\"", cluster.relay.fingerprint);
            let mut logs = Vec::new();
            for instance in ["0", "1"] {
                let env = [("AVATAR_EDGE_WORKER_ID", id_of(instance))];
                // The same config (its worker_id is what the environment replaces).
                logs.push(cluster.spawn_worker_env(None, "from-the-config", 2, SECRET, &trust, WORKER_TOML, &env));
            }
            for log in &logs {
                cluster.wait_for_log(log, "registered with relay", SECS(15)).await;
            }
            let (_, body) = avatar_edge_tests::cluster::http_get(cluster.relay.http, "/api/workers")
                .await
                .expect("workers");
            let workers: serde_json::Value = serde_json::from_str(&body).expect("json");
            let mut ids: Vec<String> = workers["workers"]
                .as_array()
                .expect("list")
                .iter()
                .filter_map(|w| w["id"].as_str().map(str::to_owned))
                .collect();
            ids.sort();
            assert_eq!(ids, vec![id_of("0"), id_of("1")], "{workers}");
        },
    );
}
