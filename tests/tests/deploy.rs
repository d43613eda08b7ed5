//! The deployment files: systemd's own checker accepts the units with the built binaries in place.

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
