//! The field deployment, as docs/deploy.md tells an operator to do it, on machines that are not
//! the build machine.
//!
//! `packages_…`: two fresh Debian 12 root filesystems (debootstrap), a VPS and a GPU box, each in
//! its own network namespace behind the documentation-range topology of [`Topology`] (the VPS is
//! the public side, the GPU box and the browser each behind a NAT). The release's packages are
//! installed with apt (dependencies from Debian's mirror, before the test's namespace is made,
//! as on a real machine), and the packages each install adds are listed: no test tool (coturn,
//! Chromium, podman, pebble, Node), build tool or compiler among them; the shipped configs, unedited, keep both services from starting and
//! name their REQUIRED keys; then deploy.md's steps are pasted as printed (its `deploy-test`
//! shell blocks, read from the file and run in each root with `sh -e`; no TOML is merged): the
//! nftables ruleset is loaded in the VPS's namespace and guards everything after, the config
//! files are written whole, and the token policy is appended. The units are started as systemd would start them (see
//! [`avatar_edge_tests::debian`]: systemd cannot be PID 1 in this sandbox), and headless Chromium
//! in the browser namespace opens `https://relay.avatar-edge.test/`, plays and makes the avatar
//! talk. Then deploy.md's step 8 switches on the packaged HMAC token policy: a socket without a
//! token is refused, tokens minted by deploy.md's Python and Node snippets are admitted. Rebuilt
//! packages (a new revision) are installed over the running ones: the edited configs, the policy
//! settings and the secret stay, the services come back, and a page given a token plays again.
//!
//! `images_…`: the OCI images (podman, runc), run with the compose file's settings (host
//! networking, configs mounted read-only, the secret in the environment), serve a session.
//!
//! The test's internet is made of documentation ranges, which the worker's candidate filter and
//! the TURN peer filter refuse by default; the one edit here that deploy.md does not show lets
//! those ranges through (`[ice] allow_candidate_ranges`, `turn.embedded.allow_peers`).

use avatar_edge_tests::debian::{self, doc_block, Root, Service};
use avatar_edge_tests::netns;
use avatar_edge_tests::topology::Topology;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const DOMAIN: &str = "relay.avatar-edge.test";
/// The VPS's address on the public side of the topology (the relay runs in the test namespace).
const VPS_IP: &str = "203.0.113.1";
/// The same VPS as the browser's side of the topology reaches it.
const VPS_IP_BROWSER_SIDE: &str = "192.0.2.1";
const DOC_RANGES: &str = "[\"192.0.2.0/24\", \"198.51.100.0/24\", \"203.0.113.0/24\"]";
/// The example policy modules the relay's package and tarball carry (scripts/release).
const SHIPPED_POLICIES: [&str; 6] = [
    "allow-all.wasm",
    "hmac-token.wasm",
    "jwt.wasm",
    "ip-allowlist.wasm",
    "router-affinity.wasm",
    "router-sticky.wasm",
];

fn work() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("deploy")
}

fn deploy_md() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/deploy.md")).expect("docs/deploy.md")
}

/// deploy.md's example values, replaced by this test's.
fn ours(block: &str) -> String {
    block
        .replace("relay.example.com", DOMAIN)
        .replace("198.51.100.7", VPS_IP)
}

/// Run one of deploy.md's shell blocks in `root` exactly as printed (with this test's name and
/// address for the examples), as an operator pastes it into a root shell.
fn paste(root: &Root, name: &str) {
    let out = root.chroot(&["sh", "-ec", &ours(&doc_block(&deploy_md(), name))]);
    assert!(
        out.status.success(),
        "deploy.md's {name} block: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The file a deploy.md block writes (its here-document), with this test's name and address.
fn heredoc(name: &str) -> String {
    debian::heredoc(&ours(&doc_block(&deploy_md(), name)))
}

/// The one edit deploy.md does not show, for this test's documentation-range internet: every
/// address here is one the relay's TURN and the worker's ICE refuse by default. The relay's
/// line goes at the end of the file, which step 3 ends in `[turn.embedded]`.
fn relay_toml_in_documentation_ranges(relay: &str) -> String {
    let last_table = relay.lines().rfind(|l| l.starts_with('['));
    assert_eq!(
        last_table,
        Some("[turn.embedded]"),
        "step 3's relay.toml ends in [turn.embedded]"
    );
    format!("{relay}allow_peers = {DOC_RANGES}\n")
}

/// The worker's side of [`relay_toml_in_documentation_ranges`].
fn worker_toml_in_documentation_ranges(worker: &str) -> String {
    format!("{worker}\n[ice]\nallow_candidate_ranges = {DOC_RANGES}\n")
}

fn allow_documentation_ranges(vps: &Root, gpu: &Root) {
    let relay = relay_toml_in_documentation_ranges(&vps.read("/etc/avatar-edge/relay.toml"));
    vps.write("/etc/avatar-edge/relay.toml", &relay);
    let worker = worker_toml_in_documentation_ranges(&gpu.read("/etc/avatar-edge/worker.toml"));
    gpu.write("/etc/avatar-edge/worker.toml", &worker);
}

/// Rebuilt packages: the same binaries as the next revision, as an upgrade would bring.
fn build_upgrade_packages() {
    let out_dir = work().join("upgrade");
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir).expect("mkdir");
    for crate_name in ["avatar-relay", "avatar-worker"] {
        let out = Command::new("cargo")
            .args([
                "deb",
                "-p",
                crate_name,
                "--no-build",
                "--fast",
                "--deb-revision",
                "2",
                "-o",
            ])
            .arg(&out_dir)
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
            .output()
            .expect("cargo deb (scripts/install-deps installs cargo-deb)");
        assert!(
            out.status.success(),
            "cargo deb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// What installing our packages must never bring: test tools (coturn's service would be an open
/// TURN relay on the VPS, and take port 3478), build tools, compilers.
fn test_or_build_tool(package: &str) -> bool {
    const NAMES: &str =
        "coturn chromium podman pebble nodejs npm ffmpeg debootstrap gcc g++ cpp clang rustc cargo make pkg-config";
    const PREFIXES: &str = "chromium- node- gcc- g++- cpp- clang- llvm- libclang rustc- cargo-";
    NAMES.split_whitespace().any(|n| n == package)
        || PREFIXES.split_whitespace().any(|p| package.starts_with(p))
        || package.ends_with("-dev")
}

/// `apt install` of `deb` into `root`: the packages it added, none of them a test or build tool.
fn install_adding_nothing_else(root: &Root, deb: &Path) -> Vec<String> {
    let before = root.packages();
    root.apt_install(&[deb], true);
    let added: Vec<String> = root.packages().difference(&before).cloned().collect();
    let unwanted: Vec<&String> = added.iter().filter(|p| test_or_build_tool(p)).collect();
    assert!(
        unwanted.is_empty(),
        "installing {} brought test or build tools: {unwanted:?}\n(all it added: {added:?})",
        deb.display()
    );
    added
}

/// Outside the test's namespace (apt reaches Debian's mirror): two fresh machines, each with
/// its package installed (adding no test or build tool), and the next revision of both packages
/// built.
fn prepare_machines() {
    let started = Instant::now();
    let vps = Root::fresh(&work().join("vps"));
    let added = install_adding_nothing_else(&vps, &debian::dist_package("avatar-edge-relay_"));
    eprintln!(
        "deploy: the relay's package added {} packages: {}",
        added.len(),
        added.join(" ")
    );
    let gpu = Root::fresh(&work().join("gpu"));
    let added = install_adding_nothing_else(&gpu, &debian::dist_package("avatar-edge-worker_"));
    eprintln!(
        "deploy: the worker's package added {} packages: {}",
        added.len(),
        added.join(" ")
    );
    // The GPU runtime's installer and its lock come with the package, and resolve offline.
    for cuda in ["12", "13"] {
        let out = gpu.chroot(&[
            "/usr/share/avatar-edge/install-gpu-runtime",
            "--cuda",
            cuda,
            "--dry-run",
        ]);
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with(&format!("# CUDA {cuda}: ")),
            "install-gpu-runtime --cuda {cuda} --dry-run in the installed package:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    build_upgrade_packages();
    eprintln!(
        "deploy: two machines installed and packages rebuilt in {:?}",
        started.elapsed()
    );
}

/// A test CA and the relay's certificate from it, as certbot would leave them in
/// /etc/letsencrypt/live/DOMAIN; and the SHA-256 of the certificate's key (Chromium's pin).
struct Certificates {
    ca_pem: String,
    fullchain_pem: String,
    key_pem: String,
    spki_sha256_b64: String,
}

fn certificates() -> Certificates {
    use base64::Engine;
    use sha2::Digest;
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "avatar-edge deploy test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec![DOMAIN.to_owned()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("leaf");
    Certificates {
        ca_pem: ca.pem(),
        fullchain_pem: format!("{}{}", cert.pem(), ca.pem()),
        key_pem: key.serialize_pem(),
        spki_sha256_b64: base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(
            rcgen::PublicKeyData::subject_public_key_info(&key),
        )),
    }
}

fn curl(ca: &Path, ip: &str, path: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "3", "--cacert"])
        .arg(ca)
        .args([
            "--resolve",
            &format!("{DOMAIN}:443:{ip}"),
            &format!("https://{DOMAIN}{path}"),
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Poll until `check` holds (true) or `secs` pass (false).
fn wait_until(secs: u64, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// Headless Chromium (the `chromium-probe` binary) opening the relay's page by name (with `query`
/// added to its URL), trusting the relay's key only; run in the namespace of `netns_pid` (None:
/// this one). Its JSON line.
fn browse(
    netns_pid: Option<u32>,
    relay_ip: &str,
    spki: &str,
    frames: u32,
    say: Option<&str>,
    query: &str,
) -> serde_json::Value {
    let probe = avatar_edge_tests::bin_path("chromium-probe");
    let mut cmd = match netns_pid {
        Some(pid) => {
            let mut c = Command::new("nsenter");
            c.args(["-t", &pid.to_string(), "-n", "--"]).arg(&probe);
            c
        }
        None => Command::new(&probe),
    };
    cmd.arg(format!("https://{DOMAIN}/?autoconnect=1{query}"))
        .arg(frames.to_string())
        .arg("--")
        .arg(format!("--host-resolver-rules=MAP {DOMAIN} {relay_ip}"))
        .arg(format!("--ignore-certificate-errors-spki-list={spki}"));
    if let Some(text) = say {
        cmd.env("PROBE_SAY", text);
    }
    let out = cmd.output().expect("chromium-probe");
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim()).unwrap_or_else(|_| serde_json::json!({ "error": line.trim() }))
}

fn played(result: &serde_json::Value, frames: u64) -> bool {
    result["frames"].as_u64().unwrap_or(0) >= frames
}

/// A token for `user` minted by one of deploy.md's snippets (`token-python`, `token-node`), run
/// as the reader's backend would run it, with `secret`.
fn mint_token(snippet: &str, user: &str, secret: &str) -> String {
    let block = doc_block(&deploy_md(), snippet);
    let out = match snippet {
        "token-python" => Command::new("python3")
            .arg("-c")
            .arg(format!(
                "{block}\nimport os\nprint(avatar_token({user:?}, os.environ['SECRET']))"
            ))
            .env("SECRET", secret)
            .output(),
        "token-node" => Command::new("node")
            .arg("-e")
            .arg(format!(
                "{block}\nconsole.log(avatarToken({user:?}, process.env.SECRET));"
            ))
            .env("SECRET", secret)
            .output(),
        other => panic!("no runner for {other}"),
    }
    .unwrap_or_else(|e| panic!("{snippet}: {e}"));
    assert!(
        out.status.success(),
        "{snippet}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// What the relay answers a WebSocket to `wss://DOMAIN{path}` (trusting the test CA only): its
/// first event, and the close code when that event was an error (the relay then closes).
fn socket_answer(ca_pem: &str, path: &str) -> (serde_json::Value, Option<u16>) {
    use futures::StreamExt;
    use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
    use std::sync::Arc;
    use tokio_tungstenite::tungstenite::Message;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("the test CA"))
            .expect("a root");
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = tokio::net::TcpStream::connect((VPS_IP, 443))
            .await
            .expect("TCP to the relay");
        // DOMAIN is a valid DNS name (a constant).
        let name = ServerName::try_from(DOMAIN).expect("a DNS name");
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .expect("TLS to the relay");
        let (mut ws, _) = tokio_tungstenite::client_async(format!("wss://{DOMAIN}{path}"), stream)
            .await
            .expect("the WebSocket upgrade");
        let mut first = serde_json::Value::Null;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(deadline, ws.next()).await {
            match msg {
                Message::Text(t) if first.is_null() => {
                    first = serde_json::from_str(t.as_str()).expect("an event");
                    if first["type"] != "error" {
                        return (first, None);
                    }
                }
                Message::Close(frame) => return (first, frame.map(|f| u16::from(f.code))),
                _ => {}
            }
        }
        (first, None)
    })
}

#[test]
fn packages_install_on_fresh_debian_and_a_session_talks() {
    const NAME: &str = "packages_install_on_fresh_debian_and_a_session_talks";
    if !netns::loopback_only() {
        prepare_machines();
    }
    if !netns::isolated(NAME) {
        return;
    }
    let vps = Root::at(&work().join("vps"));
    let gpu = Root::at(&work().join("gpu"));
    let logs = tempfile::tempdir().expect("tempdir");
    let topo = Topology::new(false, false);
    let vps_ns = std::process::id();
    let gpu_ns = topo.gpu.pid();
    let relay_unit = "/usr/lib/systemd/system/avatar-edge-relay.service";
    let worker_unit = "/usr/lib/systemd/system/avatar-edge-worker.service";

    // The relay's package carries the example policy modules, and none of the test suite's.
    let shipped: Vec<String> = std::fs::read_dir(vps.file("/usr/share/avatar-edge/policies"))
        .expect("/usr/share/avatar-edge/policies")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    for module in SHIPPED_POLICIES {
        assert!(shipped.iter().any(|m| m == module), "{module} in {shipped:?}");
    }
    assert!(
        !shipped.iter().any(|m| m.starts_with("hostile")),
        "test modules shipped: {shipped:?}"
    );

    // The shipped configs, unedited: neither service starts, and each names what to set.
    let refused = Service::start(&vps, relay_unit, vps_ns, &logs.path().join("relay-0.log"))
        .err()
        .expect("the relay must not start on its unedited config");
    for key in [
        "exit status: 64",
        "still marked REQUIRED",
        "tls.acme.domains",
        "turn.embedded.public_ip",
    ] {
        assert!(refused.contains(key), "{key} in:\n{refused}");
    }
    let refused = Service::start(&gpu, worker_unit, gpu_ns, &logs.path().join("worker-0.log"))
        .err()
        .expect("the worker must not start on its unedited config");
    for key in [
        "exit status: 64",
        "worker_id",
        "relays[0].address",
        "secret_file (/etc/avatar-edge/tunnel.secret)",
    ] {
        assert!(refused.contains(key), "{key} in:\n{refused}");
    }
    eprintln!("deploy: unedited configs refused:\n{refused}");

    let docs = deploy_md();
    // Step 1: deploy.md's nftables ruleset guards the VPS (this test's network namespace)
    // for the rest of the test: everything below gets through it, or fails.
    paste(&vps, "nftables");
    let nft = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "nft -c -f {conf} && nft -f {conf}",
            conf = vps.file("/etc/nftables.conf").display()
        ))
        .output()
        .expect("nft (scripts/install-deps installs nftables)");
    assert!(
        nft.status.success(),
        "step 1, nft -f /etc/nftables.conf: {}",
        String::from_utf8_lossy(&nft.stderr)
    );
    // Step 3a (ACME), pasted: the file passes the check (the order itself is
    // tests/tests/acme.rs's business: no CA on the internet here).
    paste(&vps, "relay-acme");
    let check = vps.chroot(&["relay", "--config", "/etc/avatar-edge/relay.toml", "--check-config"]);
    assert!(
        check.status.success(),
        "step 3a: {}",
        String::from_utf8_lossy(&check.stderr)
    );

    // Step 3b (certbot): certbot leaves the certificate under /etc/letsencrypt/live/DOMAIN and
    // runs the deploy hook, which makes it readable for the service.
    let certs = certificates();
    let live = format!("/etc/letsencrypt/live/{DOMAIN}");
    std::fs::create_dir_all(vps.file(&live)).expect("mkdir");
    vps.write(&format!("{live}/fullchain.pem"), &certs.fullchain_pem);
    vps.write(&format!("{live}/privkey.pem"), &certs.key_pem);
    let hook = vps.chroot(&[
        "env",
        &format!("RENEWED_LINEAGE={live}"),
        "/usr/share/avatar-edge/certbot-deploy-hook",
    ]);
    assert!(
        hook.status.success(),
        "deploy hook: {}",
        String::from_utf8_lossy(&hook.stderr)
    );
    paste(&vps, "relay-certbot");

    // Step 6: the relay's secret copied over the worker's placeholder; worker.toml pasted. The
    // test's DNS (the relay's name) and public CA (the test CA) on the GPU box.
    std::fs::copy(
        vps.file("/etc/avatar-edge/tunnel.secret"),
        gpu.file("/etc/avatar-edge/tunnel.secret"),
    )
    .expect("copy the secret");
    paste(&gpu, "worker-toml");
    allow_documentation_ranges(&vps, &gpu);
    let worker_toml = gpu.read("/etc/avatar-edge/worker.toml");
    // (debootstrap's minimal system has no /etc/hosts yet.)
    let hosts = std::fs::read_to_string(gpu.file("/etc/hosts")).unwrap_or_default();
    gpu.write("/etc/hosts", &format!("{hosts}\n{VPS_IP} {DOMAIN}\n"));
    gpu.write(
        "/usr/local/share/ca-certificates/avatar-edge-test-ca.crt",
        &certs.ca_pem,
    );
    assert!(gpu.chroot(&["update-ca-certificates"]).status.success());
    let ca = logs.path().join("ca.pem");
    std::fs::write(&ca, &certs.ca_pem).expect("ca");

    // docs/avatars.md: the packaged worker prepares an avatar from a recording with the
    // packaged face detector and ONNX Runtime, found where the package puts them.
    let poses = avatar_edge_tests::avatars::write_recording(&gpu.file("/tmp/me.mp4"), 512, 3.0, |t| {
        avatar_edge_tests::avatars::pose_at(t, 3.0)
    })
    .expect("a recording");
    let prepared = gpu.chroot(&[
        "worker",
        "avatar",
        "prepare",
        "/tmp/me.mp4",
        "--id",
        "me",
        "--out",
        "/tmp/avatars",
    ]);
    let summary = String::from_utf8_lossy(&prepared.stdout);
    assert!(
        prepared.status.success() && summary.contains(&format!("read {} frames", poses.len())),
        "worker avatar prepare in the installed system:\n{summary}{}",
        String::from_utf8_lossy(&prepared.stderr)
    );
    assert!(gpu.file("/tmp/avatars/me/boxes.tsv").is_file() && gpu.file("/tmp/avatars/me/preview.png").is_file());

    // Step 4 and 6: start both, as systemd would.
    let relay = Service::start(&vps, relay_unit, vps_ns, &logs.path().join("relay.log")).expect("the relay starts");
    assert!(
        wait_until(20, || curl(&ca, VPS_IP, "/healthz").is_some()),
        "https://{DOMAIN}/healthz:\n{}",
        relay.log()
    );
    let worker = Service::start(&gpu, worker_unit, gpu_ns, &logs.path().join("worker.log")).expect("the worker starts");
    let ready = || curl(&ca, VPS_IP, "/readyz").is_some_and(|b| b.contains("\"ready\":true"));
    assert!(
        wait_until(30, ready),
        "the worker registers:\nrelay:\n{}\nworker:\n{}",
        relay.log(),
        worker.log()
    );

    // Step 7: the first session, in a browser behind its own NAT.
    let result = browse(
        Some(topo.browser.pid()),
        VPS_IP_BROWSER_SIDE,
        &certs.spki_sha256_b64,
        50,
        Some("Hello, who are you?"),
        "",
    );
    eprintln!("deploy: first session {result}");
    assert!(
        played(&result, 50) && result["spoke"] == true,
        "the page plays and the avatar talks: {result}\nrelay:\n{}\nworker:\n{}",
        relay.log(),
        worker.log()
    );

    // Step 8: the shipped HMAC token policy, its secret in a file for root and the relay's user,
    // then a restart (the check before the start loads the module as the service user).
    let made = vps.chroot(&["sh", "-ec", &doc_block(&docs, "policy-secret")]);
    assert!(
        made.status.success(),
        "step 8, the secret: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let secret = String::from_utf8_lossy(&made.stdout).trim().to_owned();
    assert!(
        vps.read("/etc/avatar-edge/policies/hmac-token.json").contains(&secret),
        "the settings file holds the secret the block printed"
    );
    paste(&vps, "relay-auth");
    let relay_toml = vps.read("/etc/avatar-edge/relay.toml");
    drop(relay);
    let relay = Service::start(&vps, relay_unit, vps_ns, &logs.path().join("relay-auth.log"))
        .expect("the relay starts with the token policy");
    assert!(
        wait_until(30, ready),
        "with the token policy:\nrelay:\n{}\nworker:\n{}",
        relay.log(),
        worker.log()
    );
    // A page without a token, or with one signed by another key, is turned away before any
    // worker is touched; tokens from both of deploy.md's snippets are admitted.
    let forged = mint_token("token-python", "mallory", "not-the-relays-secret-0123");
    for (query, reason) in [
        (String::new(), "missing token"),
        (format!("?token={forged}"), "bad signature"),
    ] {
        let (event, close) = socket_answer(&certs.ca_pem, &format!("/ws/deploy-refused{query}"));
        assert!(
            event["type"] == "error"
                && event["code"] == "unauthorized"
                && event["message"].as_str().is_some_and(|m| m.contains(reason))
                && close == Some(1008),
            "a socket with {query:?} is refused ({reason}), then closed with 1008: {event} {close:?}\n{}",
            relay.log()
        );
    }
    assert!(
        curl(&ca, VPS_IP, "/api/ice-servers").is_none(),
        "no TURN credentials without a token"
    );
    let token = mint_token("token-python", "alice", &secret);
    for (snippet, token) in [
        ("token-python", token.clone()),
        ("token-node", mint_token("token-node", "bob", &secret)),
    ] {
        let (event, close) = socket_answer(&certs.ca_pem, &format!("/ws/deploy-{snippet}?token={token}"));
        assert!(
            event["type"] == "ice_servers" && close.is_none(),
            "a token from {snippet} is admitted: {event} {close:?}\n{}",
            relay.log()
        );
    }
    assert!(
        curl(&ca, VPS_IP, &format!("/api/ice-servers?token={token}")).is_some_and(|b| b.contains("ice_servers")),
        "TURN credentials with a token"
    );
    eprintln!("deploy: step 8, sockets without a valid token refused, with one admitted");

    // Step 9: upgrade while running; the unit is restarted (deb-systemd-invoke restart).
    let upgrades = upgrade_packages_built();
    let tunnel_secret = vps.read("/etc/avatar-edge/tunnel.secret");
    vps.apt_install(&[&upgrades[0]], false);
    gpu.apt_install(&[&upgrades[1]], false);
    assert_eq!(vps.package_version("avatar-edge-relay"), "0.1.0-2");
    assert_eq!(gpu.package_version("avatar-edge-worker"), "0.1.0-2");
    assert_eq!(
        vps.read("/etc/avatar-edge/relay.toml"),
        relay_toml,
        "the edited relay.toml is kept"
    );
    assert_eq!(
        gpu.read("/etc/avatar-edge/worker.toml"),
        worker_toml,
        "the edited worker.toml is kept"
    );
    assert_eq!(
        vps.read("/etc/avatar-edge/tunnel.secret"),
        tunnel_secret,
        "the secret is kept"
    );
    assert!(
        vps.read("/etc/avatar-edge/policies/hmac-token.json").contains(&secret),
        "the policy's settings are kept"
    );
    drop((relay, worker));
    let relay = Service::start(&vps, relay_unit, vps_ns, &logs.path().join("relay-2.log")).expect("relay restarts");
    let worker = Service::start(&gpu, worker_unit, gpu_ns, &logs.path().join("worker-2.log")).expect("worker restarts");
    assert!(
        wait_until(30, ready),
        "after the upgrade:\nrelay:\n{}\nworker:\n{}",
        relay.log(),
        worker.log()
    );
    let result = browse(
        Some(topo.browser.pid()),
        VPS_IP_BROWSER_SIDE,
        &certs.spki_sha256_b64,
        25,
        None,
        &format!("&token={token}"),
    );
    eprintln!("deploy: after the upgrade {result}");
    assert!(
        played(&result, 25),
        "a page given a token plays after the upgrade: {result}"
    );
}

/// The relay's tarball carries the example policy modules under `policies/` (deploy.md's path
/// for an install without the package), and none of the test suite's hostile modules.
#[test]
fn relay_tarball_carries_the_policy_modules() {
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist");
    let tarball = std::fs::read_dir(&dist)
        .expect("dist/: run scripts/release first")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("avatar-edge-relay-") && n.ends_with("-x86_64-linux.tar.gz"))
        })
        .expect("the relay tarball in dist/: run scripts/release first");
    let out = Command::new("tar").arg("-tzf").arg(&tarball).output().expect("tar");
    assert!(out.status.success(), "tar -tzf {}", tarball.display());
    let listing = String::from_utf8_lossy(&out.stdout);
    let modules: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_once("/policies/").map(|(_, m)| m))
        .filter(|m| !m.is_empty())
        .collect();
    for module in SHIPPED_POLICIES {
        assert!(modules.contains(&module), "policies/{module} in {modules:?}");
    }
    assert!(
        !modules.iter().any(|m| m.starts_with("hostile")),
        "test modules shipped: {modules:?}"
    );
}

/// `dist/SHA256SUMS` names every artefact and `sha256sum -c` accepts it (issue 27: operators
/// check a download against it).
#[test]
fn release_checksums_cover_every_artefact() {
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist");
    let sums = std::fs::read_to_string(dist.join("SHA256SUMS")).expect("dist/SHA256SUMS: run scripts/release first");
    let listed: Vec<&str> = sums
        .lines()
        .filter_map(|l| l.split_once("  ").map(|(_, f)| f))
        .collect();
    for entry in std::fs::read_dir(&dist).expect("dist/").filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != "SHA256SUMS" && !name.ends_with(".tmp") {
            assert!(listed.contains(&name.as_str()), "{name} is not in SHA256SUMS:\n{sums}");
        }
    }
    assert!(
        listed.iter().any(|f| f.ends_with(".deb")) && listed.iter().any(|f| f.ends_with(".tar.gz")),
        "{sums}"
    );
    let out = Command::new("sha256sum")
        .args(["--check", "--strict", "SHA256SUMS"])
        .current_dir(&dist)
        .output()
        .expect("sha256sum");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

/// The packages [`build_upgrade_packages`] made (relay, worker).
fn upgrade_packages_built() -> Vec<PathBuf> {
    let dir = work().join("upgrade");
    ["avatar-edge-relay_", "avatar-edge-worker_"]
        .iter()
        .map(|p| {
            std::fs::read_dir(&dir)
                .expect("upgrade dir")
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|f| f.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(p)))
                .expect("rebuilt package")
        })
        .collect()
}

/// Containers named for this test run, removed however the test ends.
struct Containers(Vec<String>);

impl Drop for Containers {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("podman")
                .args(["--runtime", "runc", "rm", "-f", "-t", "5", name])
                .output();
        }
    }
}

fn podman(args: &[&str]) -> std::process::Output {
    Command::new("podman")
        .args(["--runtime", "runc"])
        .args(args)
        .output()
        .expect("podman (scripts/install-deps installs it)")
}

fn podman_logs(name: &str) -> String {
    let out = podman(&["logs", name]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn images_run_with_the_compose_settings_and_a_session_plays() {
    netns::run("images_run_with_the_compose_settings_and_a_session_plays", || async {
        let version = env!("CARGO_PKG_VERSION");
        let relay_image = format!("localhost/avatar-edge-relay:{version}");
        let worker_image = format!("localhost/avatar-edge-worker:{version}");
        for image in [&relay_image, &worker_image] {
            let size = podman(&["image", "inspect", "--format", "{{.Size}}", image]);
            assert!(
                size.status.success(),
                "{image} is not built: run scripts/release --images"
            );
            let bytes: u64 = String::from_utf8_lossy(&size.stdout).trim().parse().unwrap_or(0);
            eprintln!("images: {image} {:.0} MB", bytes as f64 / 1e6);
        }
        // The host's public address, on an interface of this namespace (a veth pair: this kernel
        // has no dummy interfaces).
        netns::sh(&format!(
            "ip link add ae-pub type veth peer name ae-pub-peer && ip addr add {VPS_IP}/24 dev ae-pub && \
             ip link set ae-pub up && ip link set ae-pub-peer up"
        ));
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = certificates();
        let tls = dir.path().join("tls");
        std::fs::create_dir(&tls).expect("mkdir");
        std::fs::write(tls.join("fullchain.pem"), &certs.fullchain_pem).expect("cert");
        std::fs::write(tls.join("privkey.pem"), &certs.key_pem).expect("key");
        std::fs::write(dir.path().join("ca.pem"), &certs.ca_pem).expect("ca");
        // The container's user reads what is mounted (the test's own throw-away key).
        netns::sh(&format!(
            "chmod 0755 {0} {1} && chmod 0644 {1}/*",
            dir.path().display(),
            tls.display()
        ));

        // deploy.md's files, whole (steps 3b and 6).
        let relay_toml = relay_toml_in_documentation_ranges(&heredoc("relay-certbot"));
        std::fs::write(dir.path().join("relay.toml"), relay_toml).expect("relay.toml");
        let worker_toml = worker_toml_in_documentation_ranges(&heredoc("worker-toml"));
        std::fs::write(dir.path().join("worker.toml"), worker_toml).expect("worker.toml");
        netns::sh(&format!(
            "chmod 0644 {0}/relay.toml {0}/worker.toml",
            dir.path().display()
        ));

        let tag = std::process::id();
        let (relay, worker) = (format!("ae-relay-{tag}"), format!("ae-worker-{tag}"));
        let _containers = Containers(vec![relay.clone(), worker.clone()]);
        let secret = "AVATAR_EDGE_TUNNEL_SECRET=images-test-secret-0123456789";
        let mount = |host: &Path, inside: &str| format!("{}:{inside}:ro", host.display());
        // compose.yaml's settings: host networking, configs read-only, the secret in the environment.
        let common = [
            "run",
            "-d",
            "--network",
            "host",
            "--ulimit",
            "nofile=20000:20000",
            "--ulimit",
            "nproc=4096:4096",
            "-e",
            secret,
        ];
        let out = podman(
            &[
                &common[..],
                &[
                    "--name",
                    &relay,
                    "-v",
                    &mount(&dir.path().join("relay.toml"), "/etc/avatar-edge/relay.toml"),
                    "-v",
                    &mount(&tls, "/etc/avatar-edge/tls"),
                    &relay_image,
                ],
            ]
            .concat(),
        );
        assert!(
            out.status.success(),
            "podman run relay: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = podman(
            &[
                &common[..],
                &[
                    "--name",
                    &worker,
                    "--add-host",
                    &format!("{DOMAIN}:{VPS_IP}"),
                    "-v",
                    &mount(&dir.path().join("worker.toml"), "/etc/avatar-edge/worker.toml"),
                    // The test CA stands in for the public roots the image trusts.
                    "-v",
                    &mount(&dir.path().join("ca.pem"), "/etc/ssl/certs/ca-certificates.crt"),
                    &worker_image,
                ],
            ]
            .concat(),
        );
        assert!(
            out.status.success(),
            "podman run worker: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        let ca = dir.path().join("ca.pem");
        let ready = || curl(&ca, VPS_IP, "/readyz").is_some_and(|b| b.contains("\"ready\":true"));
        assert!(
            wait_until(40, ready),
            "the worker container registers with the relay container:\nrelay:\n{}\nworker:\n{}",
            podman_logs(&relay),
            podman_logs(&worker)
        );
        let result = browse(None, VPS_IP, &certs.spki_sha256_b64, 50, None, "");
        eprintln!("images: session {result}");
        assert!(
            played(&result, 50),
            "a session plays through the images: {result}\nrelay:\n{}\nworker:\n{}",
            podman_logs(&relay),
            podman_logs(&worker)
        );
    });
}
