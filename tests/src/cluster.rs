//! Start the real relay and worker binaries, each with a generated config in a temp directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SECRET: &str = "test-secret-0123456789abcdef";

/// The worker takes browser candidates from the documentation ranges the namespace tests use
/// (special-purpose, so dropped by default).
const TEST_NETWORKS: &str = "allow_candidate_ranges = [\"192.0.2.0/24\", \"198.51.100.0/24\", \"203.0.113.0/24\"]";

/// A running relay.
pub struct RelayProc {
    pub child: Child,
    pub http: SocketAddr,
    pub tunnel: SocketAddr,
    pub fingerprint: String,
    pub log: PathBuf,
}

/// A running worker.
pub struct WorkerProc {
    pub child: Child,
    pub log: PathBuf,
}

/// One relay and any number of workers, all killed on drop.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub relay: RelayProc,
    pub workers: Vec<WorkerProc>,
    /// The body of the `[ice]` section of workers started from now on.
    pub worker_ice: String,
}

fn spawn(bin: &str, config: &Path, log: &Path, extra: &[&str]) -> Child {
    spawn_in(None, bin, config, log, extra, &[])
}

/// Spawn `bin`, inside the network namespace of process `netns` when given (via `nsenter`).
fn spawn_in(netns: Option<u32>, bin: &str, config: &Path, log: &Path, extra: &[&str], env: &[(&str, String)]) -> Child {
    let out = std::fs::File::create(log).expect("log file");
    let err = out.try_clone().expect("log file");
    let mut command = match netns {
        Some(pid) => {
            let mut c = Command::new("nsenter");
            c.args(["-t", &pid.to_string(), "-n", "--"]).arg(crate::bin_path(bin));
            c
        }
        None => Command::new(crate::bin_path(bin)),
    };
    command
        .arg("--config")
        .arg(config)
        .args(extra)
        .env(
            "RUST_LOG",
            std::env::var("AE_LOG").unwrap_or_else(|_| "info,webrtc=warn,webrtc_ice=warn".into()),
        )
        .env("NO_COLOR", "1")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {bin}: {e}"))
}

impl Cluster {
    /// A relay on ephemeral loopback ports plus one worker with the default test settings.
    pub async fn start() -> Self {
        let mut c = Self::relay_only("").await;
        c.add_worker("worker-1", 4, "").await;
        c
    }

    /// Just the relay, plain HTTP/WS, its tunnel certificate from files (a fresh self-signed one
    /// for `localhost`), so that after [`Cluster::restart_relay`] it has the one its workers
    /// pinned. Keep the returned directory (the files) as long as the cluster.
    pub async fn relay_with_cert_files() -> (Self, tempfile::TempDir) {
        let certs = tempfile::tempdir().expect("tempdir");
        let (tls, _) = write_certificate(certs.path());
        (Self::relay_with_tls("", false, &tls).await, certs)
    }

    /// Just the relay, plain HTTP/WS.
    pub async fn relay_only(extra_toml: &str) -> Self {
        Self::relay_with(extra_toml, false).await
    }

    /// Just the relay; `extra_toml` goes at the top of its config; `tls` serves HTTPS/WSS with
    /// the relay's self-signed certificate.
    pub async fn relay_with(extra_toml: &str, tls: bool) -> Self {
        Self::relay_with_tls(extra_toml, tls, "self_signed = true").await
    }

    /// As [`Cluster::relay_with`], with the body of the relay's `[tls]` section given.
    pub async fn relay_with_tls(extra_toml: &str, tls: bool, tls_section: &str) -> Self {
        Self::relay_on("127.0.0.1", extra_toml, tls, tls_section).await
    }

    /// As [`Cluster::relay_with_tls`], listening (HTTP and tunnel) on `ip` instead of loopback.
    pub async fn relay_on(ip: &str, extra_toml: &str, tls: bool, tls_section: &str) -> Self {
        Self::relay_at(&format!("{ip}:0"), &format!("{ip}:0"), extra_toml, tls, tls_section).await
    }

    /// A relay with HTTP and tunnel on the given addresses (`IP:0` for any port).
    pub async fn relay_at(http: &str, tunnel: &str, extra_toml: &str, tls: bool, tls_section: &str) -> Self {
        Self::relay_full(http, tunnel, extra_toml, "", "", tls, tls_section).await
    }

    /// A loopback relay with extra lines for its `[http]` and `[tunnel]` sections too.
    pub async fn relay_sections(extra_toml: &str, http_toml: &str, tunnel_toml: &str, tls: bool) -> Self {
        Self::relay_full(
            "127.0.0.1:0",
            "127.0.0.1:0",
            extra_toml,
            http_toml,
            tunnel_toml,
            tls,
            "self_signed = true",
        )
        .await
    }

    async fn relay_full(
        http: &str,
        tunnel: &str,
        extra_toml: &str,
        http_toml: &str,
        tunnel_toml: &str,
        tls: bool,
        tls_section: &str,
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("relay.toml");
        std::fs::write(
            &config,
            format!(
                "relay_id = \"test-relay\"\n{extra_toml}\n[http]\nlisten = \"{http}\"\ntls = {tls}\n{http_toml}\n[tunnel]\nlisten = \"{tunnel}\"\nsecret = \"{SECRET}\"\n{tunnel_toml}\n[tls]\n{tls_section}\n"
            ),
        )
        .expect("write relay config");
        let ready = dir.path().join("relay.ready");
        let log = dir.path().join("relay.log");
        let child = spawn(
            "relay",
            &config,
            &log,
            &["--ready-file", ready.to_str().expect("utf-8 path")],
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let info: serde_json::Value = loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                break serde_json::from_str(&text).expect("ready file is JSON");
            }
            assert!(
                Instant::now() < deadline,
                "relay did not start:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let addr = |k: &str| info[k].as_str().expect("address").parse().expect("socket address");
        let relay = RelayProc {
            child,
            http: addr("http"),
            tunnel: addr("tunnel"),
            fingerprint: info["fingerprint"].as_str().expect("fingerprint").to_owned(),
            log,
        };
        Self {
            dir,
            relay,
            workers: Vec::new(),
            worker_ice: format!("include_loopback = true\n{TEST_NETWORKS}"),
        }
    }

    /// Stop the relay the way systemd does (SIGTERM) and wait for it to exit.
    pub fn stop_relay(&mut self) -> std::process::ExitStatus {
        signal(&self.relay.child, "TERM");
        self.relay.child.wait().expect("relay exits")
    }

    /// Start the relay again with its config, on the same HTTP and tunnel ports, logging to a
    /// fresh file; waits until it is listening.
    pub async fn restart_relay(&mut self) {
        let original = std::fs::read_to_string(self.dir.path().join("relay.toml")).expect("relay config");
        let any_port = "listen = \"127.0.0.1:0\"";
        let config = original
            .replacen(any_port, &format!("listen = \"{}\"", self.relay.http), 1)
            .replacen(any_port, &format!("listen = \"{}\"", self.relay.tunnel), 1);
        let restarts = std::fs::read_dir(self.dir.path())
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("relay-restart"))
                    .count()
            })
            .unwrap_or(0);
        let path = self.dir.path().join(format!("relay-restart-{restarts}.toml"));
        std::fs::write(&path, config).expect("write relay config");
        let ready = self.dir.path().join(format!("relay-restart-{restarts}.ready"));
        let log = self.dir.path().join(format!("relay-restart-{restarts}.log"));
        let child = spawn(
            "relay",
            &path,
            &log,
            &["--ready-file", ready.to_str().expect("utf-8 path")],
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            assert!(
                Instant::now() < deadline,
                "relay did not restart:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = self.relay.child.kill();
        let _ = self.relay.child.wait();
        self.relay.child = child;
        self.relay.log = log;
    }

    /// Start a worker and wait until it reports its registration with the relay.
    pub async fn add_worker(&mut self, id: &str, capacity: u32, extra_toml: &str) -> usize {
        let trust = format!("fingerprint = \"{}\"", self.relay.fingerprint);
        let log = self.spawn_worker(id, capacity, SECRET, &trust, extra_toml);
        self.wait_for_log(&log, "registered with relay", Duration::from_secs(15))
            .await;
        self.workers.len() - 1
    }

    /// Start a worker with the given secret and trust setting (a TOML line for its `[[relays]]`
    /// entry, e.g. `fingerprint = "…"`), and return its log path without waiting.
    pub fn spawn_worker(&mut self, id: &str, capacity: u32, secret: &str, trust: &str, extra_toml: &str) -> PathBuf {
        self.spawn_worker_in(None, id, capacity, secret, trust, extra_toml)
    }

    /// As [`Cluster::spawn_worker`], inside the network namespace of process `netns` if given.
    pub fn spawn_worker_in(
        &mut self,
        netns: Option<u32>,
        id: &str,
        capacity: u32,
        secret: &str,
        trust: &str,
        extra_toml: &str,
    ) -> PathBuf {
        self.spawn_worker_env(netns, id, capacity, secret, trust, extra_toml, &[])
    }

    /// As [`Cluster::spawn_worker_in`], with environment variables set for the worker (as a
    /// unit's `Environment=` lines do).
    #[allow(clippy::too_many_arguments)]
    pub fn spawn_worker_env(
        &mut self,
        netns: Option<u32>,
        id: &str,
        capacity: u32,
        secret: &str,
        trust: &str,
        extra_toml: &str,
        env: &[(&str, String)],
    ) -> PathBuf {
        let config = self.dir.path().join(format!("{id}.toml"));
        // `trust` may name the server itself (a certificate for a real domain).
        let server_name = if trust.contains("server_name") {
            ""
        } else {
            "server_name = \"localhost\"\n"
        };
        std::fs::write(
            &config,
            format!(
                "worker_id = \"{id}\"\ncapacity = {capacity}\nsecret = \"{secret}\"\n{extra_toml}\n[ice]\n{}\n[[relays]]\naddress = \"{}\"\n{server_name}{trust}\n",
                self.worker_ice, self.relay.tunnel
            ),
        )
        .expect("write worker config");
        // A restarted worker logs to a fresh file of its own.
        let log = self.dir.path().join(format!("{id}-{}.log", self.workers.len()));
        let child = spawn_in(netns, "worker", &config, &log, &[], env);
        self.workers.push(WorkerProc {
            child,
            log: log.clone(),
        });
        log
    }

    /// Wait until the file at `path` contains `needle`; panic with its content after `timeout`.
    pub async fn wait_for_log(&self, path: &Path, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if text.contains(needle) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "`{needle}` never appeared in {}:\n{text}",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Registered workers according to the relay's `/healthz`.
    pub async fn worker_count(&self) -> u64 {
        match http_get(self.relay.http, "/healthz").await {
            Ok((_, body)) => serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["workers"].as_u64())
                .unwrap_or(0),
            Err(_) => 0,
        }
    }

    /// Kill a worker abruptly (SIGKILL): no goodbye reaches the relay.
    pub fn kill_worker(&mut self, index: usize) {
        let w = &mut self.workers[index];
        let _ = w.child.kill();
        let _ = w.child.wait();
    }

    pub fn ws_url(&self, session_id: &str) -> String {
        format!("ws://{}/ws/{session_id}", self.relay.http)
    }

    /// All logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = format!(
            "--- relay ---\n{}",
            std::fs::read_to_string(&self.relay.log).unwrap_or_default()
        );
        for (i, w) in self.workers.iter().enumerate() {
            out += &format!(
                "\n--- worker {i} ---\n{}",
                std::fs::read_to_string(&w.log).unwrap_or_default()
            );
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for w in &mut self.workers {
            let _ = w.child.kill();
            let _ = w.child.wait();
        }
        let _ = self.relay.child.kill();
        let _ = self.relay.child.wait();
        if std::thread::panicking() || std::env::var_os("AE_SHOW_LOGS").is_some() {
            eprintln!("{}", self.logs());
        }
    }
}

/// A fresh self-signed certificate for `localhost` written as `cert.pem` and `key.pem` in `dir`,
/// the way certbot replaces its files (written aside, then renamed over). Returns the body of a
/// relay's `[tls]` section naming them, and the certificate's SHA-256 fingerprint (hex).
pub fn write_certificate(dir: &Path) -> (String, String) {
    use sha2::Digest;
    let pair = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    for (name, pem) in [
        ("cert.pem", pair.cert.pem()),
        ("key.pem", pair.signing_key.serialize_pem()),
    ] {
        let tmp = dir.join(format!("{name}.new"));
        std::fs::write(&tmp, pem).expect("write");
        std::fs::rename(&tmp, dir.join(name)).expect("rename");
    }
    let tls = format!(
        "cert = \"{}\"\nkey = \"{}\"",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display()
    );
    (tls, hex::encode(sha2::Sha256::digest(pair.cert.der())))
}

/// Send signal `name` (`TERM`, `HUP` ...) to a child process.
pub fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{name} {}", child.id());
}

/// A minimal HTTP/1.1 GET (status, body) over a fresh TCP connection. Reads until the
/// connection closes or `Content-Length` bytes of body arrived (Chromium's DevTools server keeps
/// connections open), with a 5 s limit.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, &[], b"").await
}

/// One HTTP/1.1 request with `headers` and `body`; the status and the body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method != "GET" {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).await?;
        s.write_all(body).await?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().to_owned())
                    })
                    .and_then(|v| v.parse::<usize>().ok());
                if len.is_some_and(|len| body.len() >= len) {
                    break;
                }
            }
        }
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "HTTP request timed out"))??;
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// POST `pieces` to `path` with chunked transfer encoding, `gap` apart: the status, the body,
/// and when the last piece was sent. A server that answers before the end (a refusal) stops the
/// sending; its answer is still read.
pub async fn http_upload(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    pieces: &[&[u8]],
    gap: Duration,
) -> (u16, String, Instant) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new(), Instant::now());
    };
    let mut head =
        format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut last = Instant::now();
    if s.write_all(head.as_bytes()).await.is_ok() {
        for (i, piece) in pieces.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(gap).await;
            }
            let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
            chunk.extend_from_slice(piece);
            chunk.extend_from_slice(b"\r\n");
            if s.write_all(&chunk).await.is_err() {
                break;
            }
            last = Instant::now();
        }
        let _ = s.write_all(b"0\r\n\r\n").await;
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body, last)
}

/// A log file's text without its ANSI colours.
pub fn log_text(path: &Path) -> String {
    let raw = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Skip the escape sequence up to its final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Wait until the log at `path` has `count` occurrences of `needle`; how long it took, or `None`
/// after `timeout`.
pub async fn wait_for_count(path: &Path, needle: &str, count: usize, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if log_text(path).matches(needle).count() >= count {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// An avatar directory under `root` with one 2-second test clip per `(id, display name)`, for a
/// worker's `avatar_dir`.
pub fn avatar_dir(root: &Path, avatars: &[(&str, &str)]) -> PathBuf {
    let dir = root.join("avatars");
    for (id, name) in avatars {
        let clip = dir.join(id);
        std::fs::create_dir_all(&clip).expect("mkdir");
        let status = Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i"])
            .arg("testsrc=size=320x240:rate=25:duration=2")
            .args(["-pix_fmt", "yuv420p", "-c:v", "libx264", "-y"])
            .arg(clip.join("idle.mp4"))
            .status()
            .expect("ffmpeg CLI (scripts/test installs it)");
        assert!(status.success());
        std::fs::write(
            clip.join("avatar.toml"),
            format!("name = \"{name}\"\nvideo = \"idle.mp4\"\nface_box = [100, 40, 120, 150]\n"),
        )
        .expect("avatar.toml");
    }
    dir
}
