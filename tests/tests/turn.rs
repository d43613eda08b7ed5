//! TURN, both modes. `external`: the relay mints coturn REST-API credentials, hands them to the
//! browser (`ice_servers` event, `GET /api/ice-servers`) and to the worker (in the session's `Open`
//! frame), and media flows through a real coturn process. `embedded`: coturn's own client tools
//! (`turnutils_stunclient`, `turnutils_uclient`) against the relay's TURN over UDP, TCP and TLS,
//! its safety rules seen from those tools, and media through it.
//!
//! Each test runs in its own loopback-only network namespace (see `netns`).

use avatar_edge_tests::cluster::{http_get, write_certificate, Cluster};
use avatar_edge_tests::netns;
use avatar_edge_tests::rtc_client::RtcClient;
use avatar_edge_tests::signaling::Signaling;
use avatar_edge_tests::turnutils::{self, embedded_toml, Uclient, EMBEDDED_SECRET};
use serde_json::Value;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use webrtc::ice_transport::ice_server::RTCIceServer;

const SECRET: &str = "coturn-static-auth-secret-for-tests";

struct Coturn {
    child: Child,
    port: u16,
    log: tempfile::NamedTempFile,
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Coturn {
    /// coturn 4.6 from Debian on `ip`, REST-API auth, loopback peers allowed (the worker is on
    /// loopback in the single-namespace test).
    async fn start(ip: &str) -> Self {
        let port = {
            let s = std::net::UdpSocket::bind((ip, 0)).expect("free port");
            s.local_addr().expect("addr").port()
        };
        let log = tempfile::NamedTempFile::new().expect("log");
        let child = Command::new("turnserver")
            .args([
                "-n",
                "-v",
                "--no-cli",
                "--no-tls",
                "--no-dtls",
                "--simple-log",
                "--allow-loopback-peers",
            ])
            .args(["--listening-ip", ip, "--relay-ip", ip])
            .args(["--listening-port", &port.to_string()])
            .args(["--min-port", "49152", "--max-port", "49252"])
            .args([
                "--use-auth-secret",
                "--static-auth-secret",
                SECRET,
                "--realm",
                "avatar-edge.test",
            ])
            .args(["--log-file", &log.path().display().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("turnserver (scripts/install-deps installs coturn)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect((ip, port)).is_err() {
            assert!(Instant::now() < deadline, "coturn did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { child, port, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

fn to_rtc(servers: &Value) -> Vec<RTCIceServer> {
    servers
        .as_array()
        .expect("ice_servers array")
        .iter()
        .map(|s| RTCIceServer {
            urls: s["urls"]
                .as_array()
                .expect("urls")
                .iter()
                .filter_map(|u| u.as_str().map(str::to_owned))
                .collect(),
            username: s["username"].as_str().unwrap_or_default().to_owned(),
            credential: s["credential"].as_str().unwrap_or_default().to_owned(),
        })
        .collect()
}

/// A client that may only use relay candidates offers (with a relay candidate: the TURN server took
/// the minted credentials), gets the worker's answer (with relay candidates from the worker's own
/// credentials), connects and decodes 100 frames. `server_log` explains a failure.
async fn relay_only_plays(
    cluster: &Cluster,
    sig: &mut Signaling,
    servers: &Value,
    server_log: impl Fn() -> String,
) -> RtcClient {
    let client = RtcClient::with_ice(true, to_rtc(servers), true).await.expect("client");
    let offer = client.offer().await.expect("offer");
    assert!(
        offer.contains("typ relay"),
        "the TURN server accepted the minted credentials:\n{offer}\n{}",
        server_log()
    );
    sig.send_offer(&offer, "avatar_tutor_13").await.expect("send");
    let answer = sig
        .wait_for("webrtc_answer", Duration::from_secs(10))
        .await
        .expect("answer");
    let sdp = answer["sdp"].as_str().expect("sdp");
    assert!(
        sdp.contains("typ relay"),
        "the worker's answer carries relay candidates from its own credentials:\n{sdp}"
    );
    client.accept_answer(sdp).await.expect("accept");
    client
        .connected(Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", cluster.logs(), server_log()));
    let stats = client.wait_frames(100, Duration::from_secs(8)).await;
    assert!(
        stats.frames_decoded >= 100,
        "decoded {} frames through TURN",
        stats.frames_decoded
    );
    client
}

#[test]
fn external_coturn_relays_the_media_with_credentials_the_relay_minted() {
    netns::run(
        "external_coturn_relays_the_media_with_credentials_the_relay_minted",
        || async {
            let coturn = Coturn::start("127.0.0.1").await;
            let turn = format!(
            "[turn]\nmode = \"external\"\nsecret = \"{SECRET}\"\nttl_s = 300\nurls = [\"turn:127.0.0.1:{}?transport=udp\"]\n",
            coturn.port
        );
            let mut cluster = Cluster::relay_only(&turn).await;
            cluster.add_worker("worker-1", 2, "").await;

            // The browser hears of the servers first thing, with coturn REST-API credentials.
            let mut sig = Signaling::connect(&cluster.ws_url("turn-1")).await.expect("ws");
            let ev = sig.next_event(Duration::from_secs(5)).await.expect("event");
            assert_eq!(ev["type"], "ice_servers", "{ev}");
            assert_eq!(ev["ttl_s"], 300);
            let turn_entry = &ev["ice_servers"][0];
            let username = turn_entry["username"].as_str().expect("username");
            let (expiry, user) = username.split_once(':').expect("expiry:user");
            let expiry: u64 = expiry.parse().expect("unix expiry");
            let now = avatar_edge_tests::unix_now();
            assert!(
                (now + 290..=now + 310).contains(&expiry),
                "expires in ~300 s: {expiry} vs {now}"
            );
            assert_eq!(
                user, "b.turn-1",
                "without an auth policy the session id names the (browser) user"
            );
            let (_, password) = avatar_relay::ice::rest_credentials(SECRET, user, expiry);
            assert_eq!(turn_entry["credential"], password.as_str());

            // The same list over HTTP, for custom front ends; never cached.
            let (status, body) = http_get(cluster.relay.http, "/api/ice-servers").await.expect("get");
            assert_eq!(status, 200, "{body}");
            let api: Value = serde_json::from_str(body.rsplit("\r\n\r\n").next().unwrap_or(&body)).expect("json");
            assert_eq!(api["ice_servers"][0]["urls"], turn_entry["urls"]);

            // A browser that may only use relay candidates still plays: the media goes through coturn.
            let client = relay_only_plays(&cluster, &mut sig, &ev["ice_servers"], || coturn.log()).await;
            let log = coturn.log();
            assert!(
                log.contains(":w.worker-1"),
                "the worker allocated under its own name:\n{log}"
            );
            client.close().await;

            // A credential minted with another secret is refused by coturn: no relay candidate.
            let mut forged = to_rtc(&ev["ice_servers"]);
            forged[0].credential = avatar_relay::ice::rest_credentials("some-other-secret-entirely", user, expiry).1;
            let refused = RtcClient::with_ice(true, forged, true).await.expect("client");
            let offer = refused.offer().await.expect("offer");
            assert!(
                !offer.contains("typ relay"),
                "a forged credential gets no allocation:\n{offer}"
            );
            assert!(coturn.log().contains("401"), "coturn answered 401:\n{}", coturn.log());
            refused.close().await;
            sig.close().await;
        },
    );
}

#[test]
fn embedded_turn_passes_coturns_client_tools_over_udp_tcp_and_tls() {
    netns::run(
        "embedded_turn_passes_coturns_client_tools_over_udp_tcp_and_tls",
        || async {
            let (port, tls_port, peer_port) = (
                turnutils::free_port("127.0.0.1"),
                turnutils::free_port("127.0.0.1"),
                turnutils::free_port("127.0.0.2"),
            );
            // Only the echo peer's address is allow-listed: 127.0.0.1 itself stays forbidden.
            let cluster = Cluster::relay_only(&embedded_toml(port, tls_port, "\"127.0.0.2/32\"")).await;
            let _peer = turnutils::echo_peer("127.0.0.2", peer_port);

            let (done, out) = turnutils::run(
                "turnutils_stunclient",
                &["-p".into(), port.to_string(), "127.0.0.1".into()],
                Duration::from_secs(10),
            );
            assert!(done && out.contains("UDP reflexive addr: 127.0.0.1:"), "{out}");

            // A small run over UDP to the allow-listed echo peer; the checks below vary one field.
            let small = Uclient {
                server_ip: "127.0.0.1",
                port,
                secret: EMBEDDED_SECRET,
                peer_ip: "127.0.0.2",
                peer_port,
                clients: 1,
                messages: 5,
                bytes: 100,
                interval_ms: 1,
                transport: "udp",
            };
            for transport in ["udp", "tcp", "tls"] {
                let run = Uclient {
                    port: if transport == "tls" { tls_port } else { port },
                    clients: 5,
                    messages: 200,
                    bytes: 1200,
                    transport,
                    ..small
                };
                // -v: the tool then reports each step (allocate, refresh, channel bind).
                let mut args = run.args();
                args.insert(0, "-v".into());
                let (done, out) = turnutils::run("turnutils_uclient", &args, Duration::from_secs(60));
                let report =
                    turnutils::parse_uclient(&out).unwrap_or_else(|| panic!("{transport}: no summary:\n{out}"));
                assert!(done, "{transport}: did not finish");
                for step in [
                    "allocate response received",
                    "refresh response received",
                    "channel bind sent",
                    "success",
                ] {
                    assert!(out.contains(step), "{transport}: no `{step}`:\n{out}");
                }
                assert_eq!((report.sent, report.received), (1000, 1000), "{transport}: {report:?}");
                assert_eq!(report.lost_percent, 0.0, "{transport}: {report:?}");
                println!("embedded TURN over {transport}: {report:?}");
            }

            // Forbidden peers: the tool's channel bind is answered 403.
            for forbidden in ["127.0.0.1", "169.254.169.254", "10.0.0.1"] {
                let run = Uclient {
                    peer_ip: forbidden,
                    ..small
                };
                let (_, out) = turnutils::run("turnutils_uclient", &run.args(), Duration::from_secs(5));
                assert!(
                    out.contains("error 403"),
                    "{forbidden} must be refused with 403:\n{out}"
                );
            }

            // A wrong secret never gets an allocation: the tool keeps being told 401 and gives nothing.
            let wrong = Uclient {
                secret: "not-the-embedded-secret",
                ..small
            };
            let mut args = wrong.args();
            args.insert(0, "-v".into());
            let (_, out) = turnutils::run("turnutils_uclient", &args, Duration::from_secs(3));
            assert!(out.contains("allocate response received"), "answered:\n{out}");
            assert!(!out.contains("success"), "a wrong secret must not allocate:\n{out}");
            assert!(turnutils::parse_uclient(&out).is_none(), "{out}");
            drop(cluster);
        },
    );
}

#[test]
fn embedded_turn_relays_the_media_for_a_relay_only_browser() {
    netns::run("embedded_turn_relays_the_media_for_a_relay_only_browser", || async {
        let (port, tls_port) = (turnutils::free_port("127.0.0.1"), turnutils::free_port("127.0.0.1"));
        // Everything is on loopback here, so loopback must be allow-listed for media to flow.
        let mut cluster = Cluster::relay_only(&embedded_toml(port, tls_port, "\"127.0.0.0/8\"")).await;
        cluster.add_worker("worker-1", 2, "").await;
        let mut sig = Signaling::connect(&cluster.ws_url("turn-embedded")).await.expect("ws");
        let ev = sig.next_event(Duration::from_secs(5)).await.expect("event");
        assert_eq!(ev["type"], "ice_servers", "{ev}");
        let urls = ev["ice_servers"][1]["urls"].to_string();
        assert!(urls.contains(&format!("turn:127.0.0.1:{port}?transport=udp")), "{urls}");
        let client = relay_only_plays(&cluster, &mut sig, &ev["ice_servers"], String::new).await;
        let (local, remote) = client.selected_pair().await.expect("a selected pair");
        assert_eq!(
            local, "relay",
            "a relay-only client's pair starts at its relay candidate"
        );
        println!("selected pair: local {local}, remote {remote}");
        client.close().await;
        sig.close().await;
    });
}

/// The SHA-256 fingerprint of the certificate a new TLS connection to `port` is given (openssl).
fn served_fingerprint(port: u16) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -servername localhost </dev/null 2>/dev/null \
             | openssl x509 -noout -fingerprint -sha256"
        ))
        .output()
        .expect("openssl");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split('=')
        .nth(1)
        .unwrap_or_default()
        .trim()
        .replace(':', "")
        .to_lowercase()
}

#[test]
fn a_certificate_renewal_is_a_reload_the_session_through_turn_plays_on_and_new_connections_get_the_new_certificate() {
    netns::run(
        "a_certificate_renewal_is_a_reload_the_session_through_turn_plays_on_and_new_connections_get_the_new_certificate",
        || async {
            let (port, tls_port) = (turnutils::free_port("127.0.0.1"), turnutils::free_port("127.0.0.1"));
            let dir = tempfile::tempdir().expect("tempdir");
            let (_, first) = write_certificate(dir.path());
            let tls = format!(
                "cert = \"{}\"\nkey = \"{}\"",
                dir.path().join("cert.pem").display(),
                dir.path().join("key.pem").display()
            );
            let mut cluster =
                Cluster::relay_with_tls(&embedded_toml(port, tls_port, "\"127.0.0.0/8\""), false, &tls).await;
            cluster.add_worker("worker-1", 2, "").await;
            assert_eq!(served_fingerprint(tls_port), first, "TURN over TLS serves the files' certificate");
            let mut sig = Signaling::connect(&cluster.ws_url("renewal")).await.expect("ws");
            let ev = sig.next_event(Duration::from_secs(5)).await.expect("event");
            let client = relay_only_plays(&cluster, &mut sig, &ev["ice_servers"], String::new).await;

            // certbot renews and its hook runs `systemctl reload` (SIGHUP).
            let pid = cluster.relay.child.id();
            let renewed_at = Instant::now();
            let (_, second) = write_certificate(dir.path());
            avatar_edge_tests::cluster::signal(&cluster.relay.child, "HUP");
            cluster
                .wait_for_log(&cluster.relay.log, "certificate reloaded", Duration::from_secs(5))
                .await;
            let reloaded = renewed_at.elapsed();
            assert_eq!(served_fingerprint(tls_port), second, "a new connection gets the new certificate");
            assert!(
                cluster.relay.child.try_wait().expect("wait").is_none(),
                "the relay (pid {pid}) runs on"
            );
            // The session through the relay's TURN played on, with no gap.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let stats = client.snapshot();
            let arrivals: Vec<Instant> = stats
                .mouth
                .iter()
                .map(|(t, _)| *t)
                .filter(|t| *t + Duration::from_secs(1) >= renewed_at)
                .collect();
            let gap = arrivals
                .windows(2)
                .map(|w| w[1] - w[0])
                .max()
                .unwrap_or(Duration::MAX);
            eprintln!(
                "renewal: reloaded {reloaded:?} after the files changed; {} frames around it, longest gap {gap:?}",
                arrivals.len()
            );
            assert!(arrivals.len() >= 60, "frames kept coming: {}", arrivals.len());
            assert!(gap <= Duration::from_millis(200), "longest gap in frames: {gap:?}");
            let (_, metrics) = http_get(cluster.relay.http, "/metrics").await.expect("metrics");
            let left = metrics
                .lines()
                .find_map(|l| l.strip_prefix("relay_tls_cert_expiry_seconds "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no expiry gauge:\n{metrics}"));
            assert!(left > 86_400.0, "the new certificate has time left: {left} s");
            client.close().await;
            sig.close().await;
        },
    );
}
