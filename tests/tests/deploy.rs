//! The deployment files: systemd's own checker accepts the units with the built binaries in place;
//! the GPU runtime installer resolves pinned, hashed wheels for the CUDA the driver supports.

use std::path::Path;

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().expect("tempdir");
    let bin_dir = avatar_edge_tests::bin_path("relay")
        .parent()
        .expect("bin dir")
        .to_path_buf();
    for unit in [
        "avatar-edge-relay.service",
        "avatar-edge-worker.service",
        "avatar-edge-worker@.service",
    ] {
        let text = std::fs::read_to_string(root.join("deploy/systemd").join(unit)).expect("unit");
        assert!(
            text.contains("ExecStart=/usr/bin/"),
            "{unit} runs the binary its package installs"
        );
        // The same unit, pointing at this build's binaries instead of the installed ones.
        let local = text
            .replace("/usr/bin/relay", &format!("{}/relay", bin_dir.display()))
            .replace("/usr/bin/worker", &format!("{}/worker", bin_dir.display()));
        std::fs::write(dir.path().join(unit), local).expect("write");
    }
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("avatar-edge-relay.service"))
        .arg(dir.path().join("avatar-edge-worker.service"))
        // The template, as the instance for GPU 0.
        .arg(dir.path().join("avatar-edge-worker@0.service"))
        .output()
        .expect("systemd-analyze (scripts/install-deps installs systemd)");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "systemd-analyze verify failed:\n{report}");
    assert!(report.trim().is_empty(), "systemd-analyze verify warns:\n{report}");
}

/// `deploy/install-gpu-runtime ARGS --dry-run` with `nvidia_smi` as the host's `nvidia-smi`
/// (a script printing that driver version, or none): its exit status, stdout and stderr.
fn gpu_runtime_dry_run(args: &[&str], nvidia_smi: Option<&str>) -> (bool, String, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = tempfile::tempdir().expect("tempdir");
    // The host's own nvidia-smi (a GPU CI machine) must not answer: PATH holds the fake one,
    // or one that fails as nvidia-smi does without a loaded driver.
    let script = match nvidia_smi {
        Some(version) => format!("#!/bin/sh\necho {version}\n"),
        None => "#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n".to_owned(),
    };
    let fake = bin.path().join("nvidia-smi");
    std::fs::write(&fake, script).expect("write");
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&fake)
        .status()
        .expect("chmod");
    let out = std::process::Command::new(root.join("deploy/install-gpu-runtime"))
        .args(args)
        .arg("--dry-run")
        .arg(bin.path().join("gpu"))
        .env("PATH", format!("{}:/usr/bin:/bin", bin.path().display()))
        .output()
        .expect("deploy/install-gpu-runtime");
    assert!(!bin.path().join("gpu").exists(), "a dry run writes nothing");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn gpu_runtime_dry_run_names_every_wheel_by_hash_for_cuda_12_and_13() {
    // (CUDA, its ONNX Runtime, a name only its CUDA libraries have, one only the other's have)
    for (cuda, onnxruntime, ours, theirs) in [
        (
            "12",
            "onnxruntime_gpu-1.26.",
            "nvidia_cuda_runtime_cu12-12.",
            "nvidia_cuda_runtime-13.",
        ),
        ("13", "onnxruntime_gpu-1.31.", "nvidia_cuda_runtime-13.", "_cu12-"),
    ] {
        let (ok, stdout, stderr) = gpu_runtime_dry_run(&["--cuda", cuda], None);
        assert!(ok, "--cuda {cuda} --dry-run failed:\n{stderr}");
        assert!(stdout.starts_with(&format!("# CUDA {cuda}: ")), "{stdout}");
        let files: Vec<Vec<&str>> = stdout
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert!(files.len() >= 5, "CUDA {cuda}: {stdout}");
        let mut total = 0u64;
        for file in &files {
            let [sha256, size, url] = file[..] else {
                panic!("CUDA {cuda}: a line is not `sha256 size url`: {file:?}");
            };
            assert!(
                sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()),
                "CUDA {cuda}: {sha256} is not a SHA-256"
            );
            total += size.parse::<u64>().expect("size");
            assert!(
                url.starts_with("https://files.pythonhosted.org/packages/") && url.ends_with(".whl"),
                "CUDA {cuda}: {url}"
            );
            // Wheels for x86_64 Linux that a glibc 2.31 system (Debian 11, Ubuntu 20.04) can load.
            assert!(url.contains("x86_64"), "{url}");
        }
        assert!(
            stdout.contains(&format!("{total} bytes")),
            "the header's total: {stdout}"
        );
        let urls: Vec<&str> = files.iter().map(|f| f[2]).collect();
        assert_eq!(
            urls.iter().filter(|u| u.contains(onnxruntime)).count(),
            1,
            "CUDA {cuda}: one ONNX Runtime wheel: {urls:#?}"
        );
        for library in ["cudnn", "cublas", "curand", "cufft", "nvrtc", ours] {
            assert!(
                urls.iter().any(|u| u.contains(library)),
                "CUDA {cuda}: no {library} wheel: {urls:#?}"
            );
        }
        assert!(
            !urls.iter().any(|u| u.contains(theirs)),
            "CUDA {cuda} lists the other CUDA's libraries: {urls:#?}"
        );
    }
}

#[test]
fn gpu_runtime_follows_the_driver_that_nvidia_smi_reports() {
    for (driver, cuda) in [
        ("550.54.15", "12"),
        ("525.60.13", "12"),
        ("579.9", "12"),
        ("580.65.06", "13"),
        ("590.1", "13"),
    ] {
        let (ok, stdout, stderr) = gpu_runtime_dry_run(&[], Some(driver));
        assert!(ok, "driver {driver}: {stderr}");
        assert!(
            stdout.starts_with(&format!("# CUDA {cuda}: ")),
            "driver {driver} must get CUDA {cuda}:\n{stdout}"
        );
        assert!(
            stderr.contains(&format!("CUDA {cuda} for NVIDIA driver {driver}")),
            "{stderr}"
        );
    }
    // Too old a driver, and none at all: refused, naming what to do.
    let (ok, _, stderr) = gpu_runtime_dry_run(&[], Some("470.256.02"));
    assert!(!ok && stderr.contains("older than 525"), "{stderr}");
    let (ok, _, stderr) = gpu_runtime_dry_run(&[], None);
    assert!(
        !ok && stderr.contains("--cuda 12") && stderr.contains("--cuda 13"),
        "{stderr}"
    );
    // An explicit choice wins over the driver, with a warning when the driver is too old for it.
    let (ok, stdout, stderr) = gpu_runtime_dry_run(&["--cuda", "13"], Some("550.54.15"));
    assert!(ok && stdout.starts_with("# CUDA 13: "), "{stdout}{stderr}");
    assert!(stderr.contains("needs NVIDIA driver 580"), "{stderr}");
    let (ok, _, stderr) = gpu_runtime_dry_run(&["--cuda", "11"], None);
    assert!(!ok && stderr.contains("12 or 13"), "{stderr}");
}

/// scripts/install-deps installs coturn for its programs only (the tests start their own
/// `turnserver` on ports of their own): Debian's coturn service, which would serve an open TURN
/// relay on port 3478 with the shipped configuration, is left disabled and stopped.
#[test]
fn coturn_is_installed_for_the_tests_with_its_service_off() {
    let status = |args: &[&str]| {
        std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    assert!(
        !status(&["sh", "-c", "command -v turnserver"]).is_empty(),
        "turnserver (scripts/install-deps installs coturn)"
    );
    // Someone's own coturn (a configuration that is no longer Debian's) is theirs to run.
    let shipped = status(&["dpkg-query", "-W", "-f=${Conffiles}", "coturn"]);
    let shipped_md5 = shipped
        .lines()
        .find_map(|l| l.trim().strip_prefix("/etc/turnserver.conf "))
        .unwrap_or("")
        .trim()
        .to_owned();
    let md5 = status(&["md5sum", "/etc/turnserver.conf"]);
    if shipped_md5.is_empty() || !md5.starts_with(&shipped_md5) {
        eprintln!("/etc/turnserver.conf is not Debian's: this machine's coturn is configured, not checked");
        return;
    }
    if !status(&["sh", "-c", "command -v systemctl"]).is_empty() {
        assert_ne!(status(&["systemctl", "is-enabled", "coturn.service"]), "enabled");
    }
    if Path::new("/run/systemd/system").exists() {
        assert_ne!(status(&["systemctl", "is-active", "coturn.service"]), "active");
    }
    assert_eq!(
        status(&["pgrep", "-u", "turnserver", "-x", "turnserver"]),
        "",
        "coturn's service runs (as its turnserver user)"
    );
}

#[test]
fn the_alert_rules_use_only_metrics_the_binaries_export_and_the_stop_timeout_covers_the_drain() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let rules = std::fs::read_to_string(root.join("deploy/prometheus/avatar-edge.rules.yml")).expect("rules");
    let documented = std::fs::read_to_string(root.join("docs/metrics.md")).expect("docs/metrics.md");
    let mut names: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .flat_map(|expr| {
            expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("relay_") || w.starts_with("worker_"))
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() >= 3, "the rules read metrics: {names:?}");
    for name in names {
        assert!(
            documented.contains(&format!("`{name}")),
            "{name} is not a metric the binaries document (docs/metrics.md)"
        );
    }
    // systemd must not kill a draining worker before its own limit ends the sessions.
    let config = avatar_worker::config::WorkerConfig::default();
    for unit in ["avatar-edge-worker.service", "avatar-edge-worker@.service"] {
        let text = std::fs::read_to_string(root.join("deploy/systemd").join(unit)).expect("unit");
        let stop: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("TimeoutStopSec="))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{unit}: TimeoutStopSec in seconds"));
        assert!(
            stop > config.drain_timeout_s && stop <= config.drain_timeout_s + 60,
            "{unit}: TimeoutStopSec={stop} must just cover drain_timeout_s ({})",
            config.drain_timeout_s
        );
    }
}
