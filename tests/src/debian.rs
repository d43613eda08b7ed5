//! Fresh Debian 12 machines for the deploy tests: a root filesystem made by debootstrap (the
//! base `scripts/release --images` keeps in `target/release-work/`), copied per machine, the
//! release's packages installed into it with apt, and its systemd units started the way systemd
//! would start them.
//!
//! systemd cannot run as PID 1 here (`systemd-nspawn` fails in this sandbox), so [`Service`]
//! does what the unit file says by hand: it reads `User`, `Group`, `EnvironmentFile`,
//! `AmbientCapabilities`, `StateDirectory`, `ExecStartPre` and `ExecStart` from the unit the
//! package installed, and runs the commands in the machine's root as that user, with that
//! environment and those capabilities, inside the machine's network namespace. The units
//! themselves are checked by `systemd-analyze verify` (`tests/tests/deploy.rs`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// Where `scripts/release --images` keeps the debootstrap tree.
pub fn base_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release-work/bookworm-root")
}

/// A debootstrap tree of Debian `suite` (`bullseye`, `bookworm`, `trixie`): nothing but Debian's
/// minimal base. Bookworm's is [`base_root`]; the others are made once here, next to it, from
/// Debian's archive (about a minute each; this needs the network, so call it outside the test's
/// namespace).
pub fn suite_root(suite: &str) -> PathBuf {
    if suite == "bookworm" {
        return base_root();
    }
    let path = base_root().with_file_name(format!("{suite}-root"));
    if !path.join(".complete").exists() {
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        run(Command::new("debootstrap")
            .args(["--variant=minbase", suite])
            .arg(&path)
            .arg("http://deb.debian.org/debian"));
        std::fs::write(path.join(".complete"), b"").expect("mark the root complete");
    }
    path
}

/// The newest `dist/` package whose file name starts with `prefix` (e.g. `avatar-edge-relay_`).
pub fn dist_package(prefix: &str) -> PathBuf {
    dist_file(prefix, "_amd64.deb")
}

/// The newest `dist/` file whose name starts with `prefix` and ends with `suffix`.
pub fn dist_file(prefix: &str, suffix: &str) -> PathBuf {
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dist)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    found.retain(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix))
    });
    found.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    found
        .pop()
        .unwrap_or_else(|| panic!("no {prefix}*{suffix} in {}: run scripts/release first", dist.display()))
}

/// One machine's root filesystem.
pub struct Root {
    pub path: PathBuf,
}

impl Root {
    /// A fresh copy of the debootstrap base at `path` (replacing what was there).
    pub fn fresh(path: &Path) -> Self {
        Self::fresh_from(&base_root(), path)
    }

    /// A fresh copy at `path` of the debootstrap tree at `base` (see [`suite_root`]).
    pub fn fresh_from(base: &Path, path: &Path) -> Self {
        assert!(
            base.join(".complete").exists(),
            "no Debian base at {}: run scripts/release --images first",
            base.display()
        );
        let _ = std::fs::remove_dir_all(path);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        run(Command::new("cp").arg("-a").arg(base).arg(path));
        let _ = std::fs::remove_file(path.join(".complete"));
        std::fs::copy("/etc/resolv.conf", path.join("etc/resolv.conf")).expect("resolv.conf");
        Self {
            path: path.to_path_buf(),
        }
    }

    /// An existing root (prepared by [`fresh`](Self::fresh) and [`apt_install`](Self::apt_install)).
    pub fn at(path: &Path) -> Self {
        assert!(
            path.join("etc/debian_version").exists(),
            "no root filesystem at {}",
            path.display()
        );
        Self {
            path: path.to_path_buf(),
        }
    }

    /// The file at `path` inside this machine.
    pub fn file(&self, path: &str) -> PathBuf {
        self.path.join(path.trim_start_matches('/'))
    }

    pub fn read(&self, path: &str) -> String {
        std::fs::read_to_string(self.file(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
    }

    pub fn write(&self, path: &str, text: &str) {
        std::fs::write(self.file(path), text).unwrap_or_else(|e| panic!("writing {path}: {e}"));
    }

    /// Run a command inside this machine as root (chroot), in the caller's network namespace,
    /// with /proc mounted (in a mount namespace of its own) as on a running system: the
    /// packaged binaries find their libraries through `$ORIGIN`, which the loader reads there.
    pub fn chroot(&self, args: &[&str]) -> Output {
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(r#"mount -t proc proc "$0/proc" && exec chroot "$0" "$@""#)
            .arg(&self.path)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .expect("chroot")
    }

    /// `apt-get install` local package files (copied in), with their dependencies from Debian.
    /// With `update`, the package lists are fetched first (that needs the network). Unattended,
    /// as deploy.md's step 9 says: a config file the operator changed is kept, even where the
    /// new version ships a different one (no question asked).
    pub fn apt_install(&self, debs: &[&Path], update: bool) {
        let mut args = vec![
            "apt-get",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "-o",
            "Dpkg::Options::=--force-confold",
        ];
        let names: Vec<String> = debs
            .iter()
            .map(|deb| {
                let name = deb.file_name().and_then(|n| n.to_str()).expect("name");
                std::fs::copy(deb, self.file("/tmp").join(name)).expect("copy package");
                format!("/tmp/{name}")
            })
            .collect();
        args.extend(names.iter().map(String::as_str));
        if update {
            ok(&self.chroot(&["apt-get", "update", "-q"]), "apt-get update");
        }
        ok(&self.chroot(&args), "apt-get install");
    }

    /// Every package installed in this machine (dpkg's view), by name.
    pub fn packages(&self) -> std::collections::BTreeSet<String> {
        let out = self.chroot(&["dpkg-query", "-W", "-f=${Package} ${Status}\n"]);
        ok(&out, "dpkg-query");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.ends_with(" installed"))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }

    /// The installed version of a package.
    pub fn package_version(&self, package: &str) -> String {
        let out = self.chroot(&["dpkg-query", "-W", "-f=${Version}", package]);
        ok(&out, "dpkg-query");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A systemd service of a [`Root`], started as its unit says, in the network namespace of the
/// process `netns_pid`. Stopped (SIGTERM, as `systemctl stop`) on drop.
pub struct Service {
    child: Option<Child>,
    pub log: PathBuf,
}

/// What a unit file says about how to run its service.
#[derive(Debug, Default)]
pub struct Unit {
    pub user: String,
    pub group: String,
    pub environment_files: Vec<String>,
    pub ambient_capabilities: Vec<String>,
    pub state_directories: Vec<String>,
    pub exec_start_pre: Vec<String>,
    pub exec_start: String,
}

impl Unit {
    pub fn parse(text: &str) -> Self {
        let mut unit = Self::default();
        for line in text.lines().map(str::trim) {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let value = value.trim().to_owned();
            match key.trim() {
                "User" => unit.user = value,
                "Group" => unit.group = value,
                // A leading '-': the file may be missing.
                "EnvironmentFile" => unit.environment_files.push(value),
                "AmbientCapabilities" => unit
                    .ambient_capabilities
                    .extend(value.split_whitespace().map(str::to_owned)),
                "StateDirectory" => unit
                    .state_directories
                    .extend(value.split_whitespace().map(str::to_owned)),
                "ExecStartPre" => unit.exec_start_pre.push(value),
                "ExecStart" => unit.exec_start = value,
                _ => {}
            }
        }
        unit
    }

    /// `KEY=VALUE` pairs from the environment files, as systemd reads them.
    fn environment(&self, root: &Root) -> Vec<(String, String)> {
        let mut vars = Vec::new();
        for file in &self.environment_files {
            let (optional, path) = match file.strip_prefix('-') {
                Some(p) => (true, p),
                None => (false, file.as_str()),
            };
            let text = match std::fs::read_to_string(root.file(path)) {
                Ok(t) => t,
                Err(_) if optional => continue,
                Err(e) => panic!("EnvironmentFile {path}: {e}"),
            };
            for line in text.lines().map(str::trim) {
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                if let Some((k, v)) = line.split_once('=') {
                    vars.push((k.trim().to_owned(), v.trim().trim_matches('"').to_owned()));
                }
            }
        }
        vars
    }

    /// The command that runs `exec` (a unit's Exec line) in `root` as the unit's user, in the
    /// network namespace of `netns_pid`, with /proc and /dev mounted in a mount namespace of its own.
    fn command(&self, root: &Root, netns_pid: u32, exec: &str) -> Command {
        let caps: Vec<String> = self
            .ambient_capabilities
            .iter()
            .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
            .collect();
        let mut setpriv = format!("setpriv --reuid={} --regid={} --init-groups", self.user, self.group);
        if !caps.is_empty() {
            setpriv += &format!(" --inh-caps={0} --ambient-caps={0}", caps.join(","));
        }
        let env: Vec<String> = self
            .environment(root)
            .into_iter()
            .map(|(k, v)| format!("{k}={}", shell_quote(&v)))
            .collect();
        let script = format!(
            "mount -t proc proc {r}/proc && mount --rbind /dev {r}/dev && \
             exec chroot {r} {setpriv} -- env -i PATH=/usr/bin:/bin {env} {exec}",
            r = root.path.display(),
            env = env.join(" "),
        );
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &netns_pid.to_string(), "-n", "--"])
            .args(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(script);
        cmd
    }
}

impl Service {
    /// Start the unit at `unit_path` (inside `root`) as systemd would: state directories owned by
    /// the user, each ExecStartPre (a failure fails the start, with its output), then ExecStart.
    pub fn start(root: &Root, unit_path: &str, netns_pid: u32, log: &Path) -> Result<Self, String> {
        let unit = Unit::parse(&root.read(unit_path));
        assert!(
            !unit.user.is_empty() && !unit.exec_start.is_empty(),
            "{unit_path}: {unit:?}"
        );
        for dir in &unit.state_directories {
            let owner = format!("{}:{}", unit.user, unit.group);
            ok(
                &root.chroot(&[
                    "install",
                    "-d",
                    "-o",
                    &unit.user,
                    "-g",
                    &unit.group,
                    &format!("/var/lib/{dir}"),
                ]),
                &format!("StateDirectory {dir} for {owner}"),
            );
        }
        for pre in &unit.exec_start_pre {
            let out = unit.command(root, netns_pid, pre).output().expect("ExecStartPre");
            if !out.status.success() {
                return Err(format!(
                    "ExecStartPre={pre} exited with {}:\n{}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        let file = std::fs::File::create(log).expect("log");
        let child = unit
            .command(root, netns_pid, &unit.exec_start)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("ExecStart");
        Ok(Self {
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `systemctl stop`: SIGTERM, then wait.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    ok(&out, &format!("{cmd:?}"));
}

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The code block that follows `<!-- deploy-test: NAME -->` in a Markdown document: the edits
/// the docs tell the reader to make, taken verbatim by the tests that prove them.
pub fn doc_block(markdown: &str, name: &str) -> String {
    let marker = format!("<!-- deploy-test: {name} -->");
    let after = markdown
        .split_once(&marker)
        .unwrap_or_else(|| panic!("no {marker} in the document"))
        .1;
    let fence_start = after.find("```").expect("a code block after the marker");
    let body = &after[fence_start + 3..];
    let body = &body[body.find('\n').expect("fence line") + 1..];
    body[..body.find("```").expect("closing fence")].to_owned()
}

/// The file a `doc_block` writes, as `cat > FILE <<'EOF'` … `EOF` (or `>>`) does: its
/// here-document.
pub fn heredoc(block: &str) -> String {
    let body = block
        .split_once("<<'EOF'\n")
        .expect("the block writes a file: <<'EOF'")
        .1;
    body[..body.find("\nEOF").expect("the here-document's end") + 1].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_doc_block_is_found_by_its_marker() {
        let md = "text\n<!-- deploy-test: a -->\n```toml\nx = 1\n```\n<!-- deploy-test: b -->\n```sh\necho\n```\n";
        assert_eq!(doc_block(md, "a"), "x = 1\n");
        assert_eq!(doc_block(md, "b"), "echo\n");
    }

    #[test]
    fn a_heredoc_is_the_file_the_block_writes() {
        let block = "cat > /etc/x.toml <<'EOF'\na = 1\n\n[b]\nc = 2\nEOF\nsystemctl reload x\n";
        assert_eq!(heredoc(block), "a = 1\n\n[b]\nc = 2\n");
    }

    #[test]
    fn a_unit_is_read_as_systemd_reads_it() {
        let unit = Unit::parse(
            "[Service]\nUser=avatar-edge\nGroup=avatar-edge\nEnvironmentFile=-/etc/avatar-edge/relay.env\n\
             ExecStartPre=/usr/bin/relay --check-config\nExecStart=/usr/bin/relay\n\
             AmbientCapabilities=CAP_NET_BIND_SERVICE\nStateDirectory=avatar-edge\n",
        );
        assert_eq!(unit.user, "avatar-edge");
        assert_eq!(unit.environment_files, ["-/etc/avatar-edge/relay.env"]);
        assert_eq!(unit.exec_start_pre, ["/usr/bin/relay --check-config"]);
        assert_eq!(unit.ambient_capabilities, ["CAP_NET_BIND_SERVICE"]);
        assert_eq!(unit.state_directories, ["avatar-edge"]);
    }
}
