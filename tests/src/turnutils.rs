//! coturn's client tools and server as independent references for our TURN server.
//!
//! `turnutils_uclient` allocates, binds channels and streams messages to an echo peer
//! (`turnutils_peer`) and back, then prints its loss; `turnserver` is the baseline the embedded
//! server is compared with. Debian's `coturn` package (installed by `scripts/install-deps`).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `[turn]` secret of [`embedded_toml`].
pub const EMBEDDED_SECRET: &str = "embedded-turn-secret-for-tests";

/// `[turn]` for an embedded server on loopback: UDP and TCP on `port`, TLS on `tls_port`, peers
/// allowed from `allow` (TOML strings, e.g. `"\"127.0.0.0/8\""`). Relayed ports lie above Linux's
/// ephemeral range (32768–60999), so the peers' ports never fall in it.
pub fn embedded_toml(port: u16, tls_port: u16, allow: &str) -> String {
    format!(
        "[turn]\nmode = \"embedded\"\nsecret = \"{EMBEDDED_SECRET}\"\nttl_s = 300\n\
         [turn.embedded]\nlisten_udp = \"127.0.0.1:{port}\"\nlisten_tcp = \"127.0.0.1:{port}\"\n\
         listen_tls = \"127.0.0.1:{tls_port}\"\nrelay_ip = \"127.0.0.1\"\nrelay_port_min = 61000\n\
         relay_port_max = 63999\nallow_peers = [{allow}]\nmax_allocations_per_credential = 64\n"
    )
}

/// A free port on `ip` for both UDP and TCP (bound and released; good enough on a quiet machine).
pub fn free_port(ip: &str) -> u16 {
    for _ in 0..50 {
        let Ok(udp) = std::net::UdpSocket::bind((ip, 0)) else {
            continue;
        };
        let Ok(addr) = udp.local_addr() else { continue };
        if std::net::TcpListener::bind(addr).is_ok() {
            return addr.port();
        }
    }
    panic!("no free port on {ip}");
}

/// Run a tool to completion or until `timeout`; returns (exited by itself, stdout + stderr).
pub fn run(program: &str, args: &[String], timeout: Duration) -> (bool, String) {
    let out = tempfile::NamedTempFile::new().expect("temp file");
    let mut child = Command::new(program)
        .args(args)
        .stdout(out.reopen().expect("reopen"))
        .stderr(out.reopen().expect("reopen"))
        .spawn()
        .unwrap_or_else(|e| panic!("{program} (scripts/install-deps installs coturn): {e}"));
    let deadline = Instant::now() + timeout;
    let finished = loop {
        if let Ok(Some(_)) = child.try_wait() {
            break true;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (finished, std::fs::read_to_string(out.path()).unwrap_or_default())
}

/// What `turnutils_uclient` reported.
#[derive(Debug, Clone, PartialEq)]
pub struct UclientReport {
    pub sent: u64,
    pub received: u64,
    pub lost_percent: f64,
    pub avg_rtt_ms: f64,
    pub wall_s: f64,
}

/// Parse the summary lines of `turnutils_uclient`.
pub fn parse_uclient(output: &str) -> Option<UclientReport> {
    let after = |line: &str, key: &str| -> Option<f64> {
        let rest = &line[line.find(key)? + key.len()..];
        let num: String = rest
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        num.parse().ok()
    };
    let (mut sent, mut received, mut lost, mut rtt) = (None, None, None, None);
    for line in output.lines() {
        if line.contains("start_mclient: tot_send_msgs=") {
            sent = after(line, "tot_send_msgs=");
            received = after(line, "tot_recv_msgs=");
        }
        if line.contains("Total lost packets") {
            lost = line
                .split('(')
                .nth(1)
                .and_then(|s| s.split('%').next())
                .and_then(|s| s.parse().ok());
        }
        if line.contains("Average round trip delay") {
            rtt = after(line, "Average round trip delay");
        }
    }
    Some(UclientReport {
        sent: sent? as u64,
        received: received? as u64,
        lost_percent: lost?,
        avg_rtt_ms: rtt.unwrap_or(0.0),
        wall_s: 0.0,
    })
}

/// Options of one `turnutils_uclient` run with REST-API credentials (`-W`).
pub struct Uclient<'a> {
    pub server_ip: &'a str,
    pub port: u16,
    pub secret: &'a str,
    pub peer_ip: &'a str,
    pub peer_port: u16,
    pub clients: u32,
    pub messages: u32,
    pub bytes: u32,
    pub interval_ms: u32,
    /// `""` (UDP), `"tcp"` or `"tls"`.
    pub transport: &'a str,
}

impl Uclient<'_> {
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        match self.transport {
            "tcp" => a.push("-t".into()),
            "tls" => a.extend(["-t".into(), "-S".into()]),
            _ => {}
        }
        for (flag, v) in [
            ("-W", self.secret.to_string()),
            ("-u", "uclient".into()),
            ("-p", self.port.to_string()),
            ("-e", self.peer_ip.into()),
            ("-r", self.peer_port.to_string()),
            ("-n", self.messages.to_string()),
            ("-m", self.clients.to_string()),
            ("-l", self.bytes.to_string()),
            ("-z", self.interval_ms.to_string()),
        ] {
            a.extend([flag.to_string(), v]);
        }
        // -X: IPv4 relayed address; -c: no RTCP companion allocations.
        a.extend(["-X".into(), "-c".into(), self.server_ip.into()]);
        a
    }

    /// Run it; `None` if it did not finish in `timeout` or printed no summary (the output is in
    /// the error).
    pub fn run(&self, timeout: Duration) -> Result<UclientReport, String> {
        let started = Instant::now();
        let (finished, out) = run("turnutils_uclient", &self.args(), timeout);
        let wall = started.elapsed().as_secs_f64();
        match parse_uclient(&out) {
            Some(mut r) if finished => {
                r.wall_s = wall;
                Ok(r)
            }
            _ => Err(out),
        }
    }
}

/// A background process killed on drop.
pub struct Background(pub Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `turnutils_peer`: a UDP echo server on `ip:port`.
pub fn echo_peer(ip: &str, port: u16) -> Background {
    Background(
        Command::new("turnutils_peer")
            .args(["-L", ip, "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("turnutils_peer (scripts/install-deps installs coturn)"),
    )
}

/// coturn on `ip:port` with settings equivalent to the embedded server's test settings: REST-API
/// secret, loopback peers allowed, `quota` allocations per user, UDP and TCP on one port.
pub fn coturn(ip: &str, port: u16, secret: &str, quota: u32, log: &std::path::Path) -> Background {
    Background(
        Command::new("turnserver")
            .args([
                "-n",
                "--no-cli",
                "--no-tls",
                "--no-dtls",
                "--simple-log",
                "--allow-loopback-peers",
            ])
            .args([
                "--listening-ip",
                ip,
                "--relay-ip",
                ip,
                "--listening-port",
                &port.to_string(),
            ])
            .args(["--min-port", "40000", "--max-port", "44999"])
            .args([
                "--use-auth-secret",
                "--static-auth-secret",
                secret,
                "--realm",
                "avatar-edge",
            ])
            .args(["--user-quota", &quota.to_string()])
            .args(["--log-file", &log.display().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("turnserver (scripts/install-deps installs coturn)"),
    )
}

/// Wait until something accepts TCP on `ip:port`.
pub fn wait_tcp(ip: &str, port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect((ip, port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uclient_summary_is_parsed() {
        let out = "6: : start_mclient: tot_send_msgs=1000, tot_recv_msgs=998\n\
                   6: : Total lost packets 2 (0.200000%), total send dropped 0 (0.000000%)\n\
                   6: : Average round trip delay 0.174140 ms; min = 0 ms, max = 17 ms\n";
        let r = parse_uclient(out).expect("parsed");
        assert_eq!((r.sent, r.received), (1000, 998));
        assert!((r.lost_percent - 0.2).abs() < 1e-9);
        assert!((r.avg_rtt_ms - 0.17414).abs() < 1e-9);
        assert_eq!(parse_uclient("ERROR: Cannot complete Allocation"), None);
    }
}
