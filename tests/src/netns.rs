//! Run a test inside a network namespace that holds only loopback.
//!
//! [`isolated`] checks `/proc/net/dev` (which, unlike `/sys/class/net`, always shows the calling
//! process's namespace). If anything but `lo` is visible, it re-runs the current test binary for
//! just this test under `unshare -n`, brings `lo` up there, and asserts that the child passed.
//! WebRTC in such a namespace needs loopback candidates on both sides; that is what the tests
//! configure.

use std::process::Command;

/// Interface names in this process's network namespace.
pub fn interfaces() -> Vec<String> {
    let text = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
    text.lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(|s| s.trim().to_owned())
        .collect()
}

pub fn loopback_only() -> bool {
    interfaces() == ["lo"]
}

/// Returns `true` when the caller is inside a loopback-only namespace and should run the test
/// body; `false` after the body ran (and passed) in a child process.
pub fn isolated(test_name: &str) -> bool {
    if loopback_only() {
        return true;
    }
    let exe = std::env::current_exe().expect("current exe");
    let status = Command::new("unshare")
        .args([
            "-n",
            "--",
            "sh",
            "-c",
            r#"ip link set lo up && exec "$0" "$1" --exact --nocapture --test-threads=1"#,
        ])
        .arg(&exe)
        .arg(test_name)
        .status()
        .expect("run unshare (util-linux) to create a network namespace; tests need root or CAP_SYS_ADMIN");
    assert!(
        status.success(),
        "{test_name} failed inside its network namespace: {status}"
    );
    false
}

/// For binaries (benchmarks): if this process is not in a loopback-only namespace, run this
/// same program with the same arguments under `unshare -n` and exit with its status.
pub fn reexec_isolated() {
    if loopback_only() {
        return;
    }
    let exe = std::env::current_exe().expect("current exe");
    let status = Command::new("unshare")
        .args(["-n", "--", "sh", "-c", r#"ip link set lo up && exec "$@""#, "sh"])
        .arg(&exe)
        .args(std::env::args_os().skip(1))
        .status()
        .expect("run unshare (util-linux); benchmarks need root or CAP_SYS_ADMIN");
    std::process::exit(status.code().unwrap_or(1));
}

/// Run an async test body in a loopback-only namespace on a fresh multi-thread runtime.
pub fn run<F: std::future::Future<Output = ()>>(test_name: &str, body: impl FnOnce() -> F) {
    if !isolated(test_name) {
        return;
    }
    crate::init_logging();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(body());
}

/// A network namespace inside the test's own, held open by a sleeping child process; it dies with
/// the holder (on drop). Commands run in it through `nsenter`. Used to build NAT topologies from
/// veth pairs, with addresses from the documentation ranges only (192.0.2.0/24, 198.51.100.0/24,
/// 203.0.113.0/24).
pub struct ChildNs {
    holder: std::process::Child,
}

impl ChildNs {
    pub fn new() -> Self {
        assert!(
            loopback_or_test_links(),
            "child namespaces are only made inside a test's own namespace"
        );
        let ours = std::fs::read_link("/proc/self/ns/net").expect("own netns");
        let holder = Command::new("unshare")
            .args(["-n", "--", "sleep", "600"])
            .spawn()
            .expect("unshare");
        let ns = format!("/proc/{}/ns/net", holder.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::fs::read_link(&ns).ok().is_none_or(|n| n == ours) {
            assert!(std::time::Instant::now() < deadline, "namespace holder never unshared");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let ns = Self { holder };
        ns.sh("ip link set lo up");
        ns
    }

    /// The holder's pid: `ip link set DEV netns PID`, `nsenter -t PID -n`.
    pub fn pid(&self) -> u32 {
        self.holder.id()
    }

    /// Run a shell command inside this namespace; panics if it fails.
    pub fn sh(&self, script: &str) {
        let status = Command::new("nsenter")
            .args(["-t", &self.pid().to_string(), "-n", "--", "sh", "-c", script])
            .status()
            .expect("nsenter (util-linux)");
        assert!(status.success(), "in namespace {}: {script}", self.pid());
    }
}

impl Default for ChildNs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ChildNs {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// Run a shell command in the test's own namespace (never the host's); panics if it fails.
pub fn sh(script: &str) {
    assert!(loopback_or_test_links(), "refusing to configure the host's network");
    let status = Command::new("sh").args(["-c", script]).status().expect("sh");
    assert!(status.success(), "{script}");
}

/// Inside a test's namespace: `lo` plus links the test made (named `ae-*`).
fn loopback_or_test_links() -> bool {
    interfaces().iter().all(|i| i == "lo" || i.starts_with("ae-"))
}
