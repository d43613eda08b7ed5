//! TURN with an external coturn (`[turn] mode = "external"`): the relay mints coturn REST-API
//! credentials, hands them to the browser (`ice_servers` event, `GET /api/ice-servers`) and to the
//! worker (in the session's `Open` frame), and media flows through a real coturn process.
//!
//! Each test runs in its own loopback-only network namespace (see `netns`).

use avatar_edge_tests::cluster::{http_get, Cluster};
use avatar_edge_tests::netns;
use avatar_edge_tests::rtc_client::RtcClient;
use avatar_edge_tests::signaling::Signaling;
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
            assert_eq!(user, "turn-1", "without an auth policy the session id names the user");
            let (_, password) = avatar_relay::ice::rest_credentials(SECRET, user, expiry);
            assert_eq!(turn_entry["credential"], password.as_str());

            // The same list over HTTP, for custom front ends; never cached.
            let (status, body) = http_get(cluster.relay.http, "/api/ice-servers").await.expect("get");
            assert_eq!(status, 200, "{body}");
            let api: Value = serde_json::from_str(body.rsplit("\r\n\r\n").next().unwrap_or(&body)).expect("json");
            assert_eq!(api["ice_servers"][0]["urls"], turn_entry["urls"]);

            // A browser that may only use relay candidates still plays: the media goes through coturn.
            let client = RtcClient::with_ice(true, to_rtc(&ev["ice_servers"]), true)
                .await
                .expect("client");
            let offer = client.offer().await.expect("offer");
            assert!(
                offer.contains("typ relay"),
                "coturn accepted the minted credentials:\n{offer}\n{}",
                coturn.log()
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
                .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
            let stats = client.wait_frames(100, Duration::from_secs(8)).await;
            assert!(
                stats.frames_decoded >= 100,
                "decoded {} frames through TURN",
                stats.frames_decoded
            );
            let log = coturn.log();
            assert!(
                log.contains("worker-worker-1"),
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
