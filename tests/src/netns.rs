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
