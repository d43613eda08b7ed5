//! The portable build (`scripts/portable-env`, `scripts/release`): the relay and the worker are
//! built once, against Debian 11's glibc 2.31, for the tests and the release alike. Their tarballs
//! carry every library the binaries load beyond glibc, libgcc_s and libstdc++ (FFmpeg, x264, Opus,
//! and espeak-ng with its voices), found through an `$ORIGIN` rpath.
//!
//! The proof: the tarballs are unpacked into fresh Debian 11, 12 and 13 root filesystems
//! (debootstrap's minimal base from Debian's archive, nothing else installed), `ldd` there finds
//! every library, and a relay and a worker from them, each running inside its root, serve a real
//! WebRTC receiver that watches the avatar and hears it answer with the tarball's own espeak-ng.
//! Ubuntu's archive cannot be reached from here; docs/deploy.md gives its coverage by glibc.

use avatar_edge_tests::debian::{self, Root};
use avatar_edge_tests::netns;
use avatar_edge_tests::rtc_client::RtcClient;
use avatar_edge_tests::signaling::Signaling;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Debian 11 (glibc 2.31, the oldest we support), 12 (2.36) and 13 (2.41).
const SUITES: [&str; 3] = ["bullseye", "bookworm", "trixie"];

/// What the binaries may load from the system: glibc's libraries, libgcc_s and libstdc++.
fn from_the_system(lib: &str) -> bool {
    let stem = lib.split(".so").next().unwrap_or(lib);
    [
        "ld-linux-x86-64",
        "libc",
        "libm",
        "libdl",
        "libpthread",
        "librt",
        "libresolv",
        "libutil",
        "libgcc_s",
        "libstdc++",
    ]
    .contains(&stem)
}

fn objdump(flag: &str, binary: &Path) -> String {
    let out = Command::new("objdump")
        .arg(flag)
        .arg(binary)
        .output()
        .expect("objdump (binutils)");
    assert!(out.status.success(), "objdump {flag} {}", binary.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The newest glibc symbol version `binary` needs, as (major, minor).
fn newest_glibc(binary: &Path) -> (u32, u32) {
    let text = objdump("-T", binary);
    text.split("GLIBC_")
        .skip(1)
        .filter_map(|rest| {
            let version: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
            let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
        })
        .max()
        .expect("a glibc symbol version")
}

fn dynamic_entries(binary: &Path, tag: &str) -> Vec<String> {
    objdump("-p", binary)
        .lines()
        .filter_map(|l| l.trim().strip_prefix(tag).map(|v| v.trim().to_owned()))
        .collect()
}

#[test]
fn the_build_needs_glibc_2_31_at_most_and_finds_every_other_library_beside_it() {
    for name in ["relay", "worker"] {
        let binary = avatar_edge_tests::bin_path(name);
        let glibc = newest_glibc(&binary);
        assert!(
            glibc <= (2, 31),
            "{name} needs GLIBC_{}.{}: it would not start on Debian 11 (built outside scripts/portable-env?)",
            glibc.0,
            glibc.1
        );
        let rpath = dynamic_entries(&binary, "RPATH");
        assert!(
            rpath.iter().any(|r| r.split(':').any(|d| d == "$ORIGIN/../lib")),
            "{name}: RPATH {rpath:?}"
        );
        let lib = binary.parent().expect("dir").join("lib");
        for needed in dynamic_entries(&binary, "NEEDED") {
            assert!(
                from_the_system(&needed) || lib.join(&needed).exists(),
                "{name} loads {needed}, which is neither glibc's nor in {} (scripts/bundle-libs)",
                lib.display()
            );
        }
        eprintln!("{name}: GLIBC_{}.{} at most, RPATH {rpath:?}", glibc.0, glibc.1);
    }
}

fn work() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/portable-test")
}

/// The newest `dist/avatar-edge-ROLE-*-x86_64-linux.tar.gz`.
fn tarball(role: &str) -> PathBuf {
    debian::dist_file(&format!("avatar-edge-{role}-"), "-x86_64-linux.tar.gz")
}

fn chroot_ok(root: &Root, args: &[&str]) -> String {
    let out = root.chroot(args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{args:?} in {}: {text}", root.path.display());
    text
}

/// Outside the test's namespace (debootstrap reaches Debian's archive): each suite's fresh root
/// with the two tarballs unpacked under /opt, as docs/deploy.md says, and nothing else.
fn prepare_roots() {
    for suite in SUITES {
        let root = Root::fresh_from(&debian::suite_root(suite), &work().join(suite));
        for role in ["relay", "worker"] {
            let dir = root.file(&format!("/opt/avatar-edge-{role}"));
            std::fs::create_dir_all(&dir).expect("mkdir");
            let out = Command::new("tar")
                .args(["-xzf"])
                .arg(tarball(role))
                .args(["--strip-components=1", "-C"])
                .arg(&dir)
                .output()
                .expect("tar");
            assert!(out.status.success(), "unpack: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// A process run inside `root` as root, in this test's network namespace, with /proc and /dev
/// mounted in a mount namespace of its own; its output goes to `log`.
fn spawn_in(root: &Root, command: &str, log: &Path) -> Child {
    let file = std::fs::File::create(log).expect("log");
    let script = format!(
        "mount -t proc proc {r}/proc && mount --rbind /dev {r}/dev && \
         exec chroot {r} env -i PATH=/usr/bin:/bin RUST_LOG=info,webrtc=warn,webrtc_ice=warn NO_COLOR=1 {command}",
        r = root.path.display(),
    );
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(script)
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .expect("unshare")
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool, logs: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what}:\n{}", logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// In `root`: the tarballs' relay and worker play the avatar to a WebRTC receiver, and it answers
/// a question aloud.
async fn plays_and_talks(suite: &str, root: &Root) {
    let glibc = chroot_ok(root, &["ldd", "--version"]);
    let glibc = glibc.lines().next().unwrap_or_default().to_owned();
    for binary in [
        "/opt/avatar-edge-relay/bin/relay",
        "/opt/avatar-edge-worker/bin/worker",
        "/opt/avatar-edge-worker/libexec/espeak-ng",
    ] {
        let ldd = chroot_ok(root, &["ldd", binary]);
        assert!(!ldd.contains("not found"), "{suite}: ldd {binary}:\n{ldd}");
    }
    assert!(
        !root.file("/usr/bin/espeak-ng").exists(),
        "{suite}: the fresh root has no espeak-ng of its own"
    );
    let logs_dir = work().join(format!("{suite}-logs"));
    let _ = std::fs::remove_dir_all(&logs_dir);
    std::fs::create_dir_all(&logs_dir).expect("mkdir");
    let (relay_log, worker_log) = (logs_dir.join("relay.log"), logs_dir.join("worker.log"));
    let logs = || {
        format!(
            "--- relay ({suite}) ---\n{}\n--- worker ({suite}) ---\n{}",
            read_log(&relay_log),
            read_log(&worker_log)
        )
    };
    root.write(
        "/opt/relay.toml",
        &format!(
            "relay_id = \"portable-{suite}\"\n[http]\nlisten = \"127.0.0.1:0\"\ntls = false\n\
             [tunnel]\nlisten = \"127.0.0.1:0\"\nsecret = \"{}\"\n[tls]\nself_signed = true\n",
            avatar_edge_tests::cluster::SECRET
        ),
    );
    let _ = std::fs::remove_file(root.file("/opt/relay.ready"));
    let _relay = Killed(spawn_in(
        root,
        "/opt/avatar-edge-relay/bin/relay --config /opt/relay.toml --ready-file /opt/relay.ready",
        &relay_log,
    ));
    let ready = root.file("/opt/relay.ready");
    wait_for("the relay starts", Duration::from_secs(15), || ready.exists(), logs).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let info: serde_json::Value = serde_json::from_str(&root.read("/opt/relay.ready")).expect("ready file");
    let field = |k: &str| info[k].as_str().expect("ready field").to_owned();
    root.write(
        "/opt/worker.toml",
        &format!(
            "worker_id = \"portable-{suite}\"\ncapacity = 2\nsecret = \"{}\"\n[ice]\ninclude_loopback = true\n\
             [[relays]]\naddress = \"{}\"\nserver_name = \"localhost\"\nfingerprint = \"{}\"\n",
            avatar_edge_tests::cluster::SECRET,
            field("tunnel"),
            field("fingerprint")
        ),
    );
    let _worker = Killed(spawn_in(
        root,
        "/opt/avatar-edge-worker/bin/worker --config /opt/worker.toml",
        &worker_log,
    ));
    wait_for(
        "the worker registers",
        Duration::from_secs(20),
        || read_log(&worker_log).contains("registered with relay"),
        logs,
    )
    .await;

    let mut sig = Signaling::connect(&format!("ws://{}/ws/portable-{suite}", field("http")))
        .await
        .unwrap_or_else(|e| panic!("{suite}: signaling: {e}\n{}", logs()));
    let client: RtcClient = avatar_edge_tests::play(&mut sig, "avatar_tutor_13")
        .await
        .unwrap_or_else(|e| panic!("{suite}: play: {e}\n{}", logs()));
    let stats = client.wait_frames(25, Duration::from_secs(15)).await;
    assert!(
        stats.frames_decoded >= 25,
        "{suite}: {} frames\n{}",
        stats.frames_decoded,
        logs()
    );
    sig.send_json(
        &json!({"type": "text_webrtc", "session_id": "s", "user_id": 5, "tutor_id": 1,
        "message": "What is the sea made of?", "avatar_id": "avatar_tutor_13"}),
    )
    .await
    .expect("send text");
    let started = sig
        .wait_for("speech_started", Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{suite}: speech_started: {e}\n{}", logs()));
    let from = Instant::now();
    sig.wait_for("speech_ended", Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{suite}: speech_ended after {started}: {e}\n{}", logs()));
    let audio = client.snapshot().audio_between(from, Instant::now());
    let loud = audio.iter().filter(|v| **v > 0.02).count();
    eprintln!(
        "{suite} ({glibc}): {} frames, answer {:?}: {loud}/{} loud audio packets",
        stats.frames_decoded,
        from.elapsed(),
        audio.len()
    );
    assert!(
        audio.len() >= 25 && loud * 3 >= audio.len(),
        "{suite}: the answer is speech from the bundled espeak-ng: {loud}/{} loud packets\n{}",
        audio.len(),
        logs()
    );
    client.close().await;
}

#[test]
fn tarballs_play_and_talk_on_fresh_debian_11_12_and_13() {
    if netns::loopback_only() {
        // Inside the namespace: the roots were prepared by the outer run.
    } else {
        prepare_roots();
    }
    netns::run("tarballs_play_and_talk_on_fresh_debian_11_12_and_13", || async {
        for suite in SUITES {
            plays_and_talks(suite, &Root::at(&work().join(suite))).await;
        }
    });
}
