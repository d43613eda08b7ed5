//! Certificates by ACME, against a real ACME server: Debian's `pebble` (Let's Encrypt's test
//! server) and `pebble-challtestsrv` for DNS, all on loopback inside the test's namespace.
//!
//! Pebble resolves the relay's domain through challtestsrv (every name → 127.0.0.1) and checks
//! the TLS-ALPN-01 challenge on the relay's HTTPS port, so the whole flow is real: account, order,
//! challenge answered by the relay's resolver, finalize, certificate deployed to HTTPS and to the
//! QUIC tunnel.

use avatar_edge_tests::cluster::{Cluster, SECRET};
use avatar_edge_tests::netns;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DOMAIN: &str = "relay.avatar-edge.test";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Kill the ACME servers when the test ends, however it ends.
struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(program: &str, args: &[&str], log: &Path) -> Child {
    let out = std::fs::File::create(log).expect("log");
    Command::new(program)
        .args(args)
        // No artificial delays and no random nonce rejections: a deterministic test.
        .env("PEBBLE_VA_NOSLEEP", "1")
        .env("PEBBLE_WFE_NONCEREJECT", "0")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e} (scripts/install-deps installs pebble)"))
}

async fn wait_tcp(port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn the_relay_gets_its_certificate_by_acme_and_serves_https_and_the_tunnel_with_it() {
    netns::run(
        "the_relay_gets_its_certificate_by_acme_and_serves_https_and_the_tunnel_with_it",
        || async {
            let dir = tempfile::tempdir().expect("tempdir");
            let d = dir.path();
            // Pebble's own HTTPS certificate (its API), from a CA the relay is told to trust.
            let ca_key = rcgen::KeyPair::generate().expect("key");
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA");
            let api_key = rcgen::KeyPair::generate().expect("key");
            let api = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("params")
                .signed_by(&api_key, &ca)
                .expect("leaf");
            std::fs::write(d.join("api.pem"), api.pem()).expect("write");
            std::fs::write(d.join("api.key"), api_key.serialize_pem()).expect("write");
            std::fs::write(d.join("api-ca.pem"), ca.pem()).expect("write");

            let (acme, mgmt, dns, https) = (free_port(), free_port(), free_port(), free_port());
            let config = serde_json::json!({"pebble": {
                "listenAddress": format!("127.0.0.1:{acme}"),
                "managementListenAddress": format!("127.0.0.1:{mgmt}"),
                "certificate": d.join("api.pem"),
                "privateKey": d.join("api.key"),
                "httpPort": free_port(),
                "tlsPort": https,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }});
            std::fs::write(d.join("pebble.json"), config.to_string()).expect("write");
            let dns_addr = format!("127.0.0.1:{dns}");
            let challtest_mgmt = format!("127.0.0.1:{}", free_port());
            let (dns_log, pebble_log) = (d.join("challtestsrv.log"), d.join("pebble.log"));
            let mut servers = Servers(vec![spawn(
                "pebble-challtestsrv",
                &[
                    "-dns01",
                    &dns_addr,
                    "-management",
                    &challtest_mgmt,
                    "-defaultIPv4",
                    "127.0.0.1",
                    "-defaultIPv6",
                    "",
                    "-http01",
                    "",
                    "-https01",
                    "",
                    "-tlsalpn01",
                    "",
                ],
                &dns_log,
            )]);
            let pebble_config = d.join("pebble.json");
            servers.0.push(spawn(
                "pebble",
                &[
                    "-config",
                    pebble_config.to_str().expect("path"),
                    "-dnsserver",
                    &dns_addr,
                ],
                &pebble_log,
            ));
            wait_tcp(acme, "pebble", &pebble_log).await;

            let tls = format!(
                "[tls.acme]\ndomains = [\"{DOMAIN}\"]\ncontact = [\"mailto:ops@example.com\"]\ncache_dir = \"{}\"\ndirectory = \"https://127.0.0.1:{acme}/dir\"\nca_file = \"{}\"\n",
                d.join("acme-cache").display(),
                d.join("api-ca.pem").display()
            );
            let started = Instant::now();
            let mut cluster = Cluster::relay_at(&format!("127.0.0.1:{https}"), "127.0.0.1:0", "", true, &tls).await;
            cluster
                .wait_for_log(&cluster.relay.log, "DeployedNewCert", Duration::from_secs(30))
                .await;
            let issued = started.elapsed();
            let pebble = std::fs::read_to_string(&pebble_log).unwrap_or_default();
            // Pebble connected to the relay's HTTPS port with ALPN acme-tls/1 and found the
            // challenge certificate (the only challenge rustls-acme answers by default).
            assert!(
                pebble.contains("set VALID by completed challenge"),
                "pebble validated the challenge:\n{pebble}"
            );

            // The CA that signed the relay's certificate, from pebble's management API (served
            // with a certificate pebble makes up itself, hence -k: this is the test's own server
            // on loopback; what matters is that the relay's certificate chains to this root).
            let root = Command::new("curl")
                .args(["-sS", "--fail-with-body", "-k"])
                .arg(format!("https://127.0.0.1:{mgmt}/roots/0"))
                .output()
                .expect("curl");
            assert!(
                root.status.success(),
                "fetching pebble's root: {} {}",
                String::from_utf8_lossy(&root.stdout),
                String::from_utf8_lossy(&root.stderr)
            );
            let root_file = d.join("acme-root.pem");
            std::fs::write(&root_file, &root.stdout).expect("write");

            // HTTPS serves the ACME certificate for the domain.
            let https_check = Command::new("curl")
                .args(["-sf", "--cacert"])
                .arg(&root_file)
                .args(["--resolve", &format!("{DOMAIN}:{https}:127.0.0.1")])
                .arg(format!("https://{DOMAIN}:{https}/healthz"))
                .output()
                .expect("curl");
            assert!(
                https_check.status.success() && String::from_utf8_lossy(&https_check.stdout).contains("ok"),
                "HTTPS with the ACME certificate: {}",
                String::from_utf8_lossy(&https_check.stderr)
            );

            // The tunnel serves it too: a worker trusting only the ACME CA registers.
            let trust = format!("server_name = \"{DOMAIN}\"\nca_file = \"{}\"", root_file.display());
            let log = cluster.spawn_worker("acme-worker", 2, SECRET, &trust, "");
            cluster
                .wait_for_log(&log, "registered with relay", Duration::from_secs(15))
                .await;
            eprintln!("ACME: certificate issued and deployed {issued:?} after the relay started");

            // A restart reuses the cached certificate: no new order.
            cluster.stop_relay();
            let orders = |text: &str| text.matches("DeployedNewCert").count();
            cluster.restart_relay().await;
            cluster
                .wait_for_log(&cluster.relay.log, "DeployedCachedCert", Duration::from_secs(10))
                .await;
            assert_eq!(
                orders(&std::fs::read_to_string(&cluster.relay.log).unwrap_or_default()),
                0
            );
        },
    );
}
