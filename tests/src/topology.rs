//! Network-namespace topologies for media tests: a worker and a browser, each behind its own NAT,
//! the relay (with its embedded TURN) in the "public" namespace between them. Used by
//! `tests/tests/topologies.rs` with headless Chromium (`chromium-probe`) in the browser namespace.

use crate::cluster::{Cluster, SECRET};
use crate::netns::{self, ChildNs};

/// The relay's address in the "public" namespace.
pub const PUBLIC: &str = "203.0.113.1";

/// A relay on [`PUBLIC`] as an operator deploys one: HTTPS on 443 (which also takes tunnels over
/// TLS/TCP), QUIC tunnels on 4433, embedded TURN on 3478 (UDP and TCP) and 5349 (TLS), with the
/// test ranges allowed as TURN peers.
pub async fn public_relay() -> Cluster {
    let turn = format!(
        "[turn]\nmode = \"embedded\"\nttl_s = 300\n\
         urls = [\"turn:{PUBLIC}:3478?transport=udp\", \"turn:{PUBLIC}:3478?transport=tcp\", \"turns:{PUBLIC}:5349?transport=tcp\"]\n\
         [turn.embedded]\nlisten_udp = \"{PUBLIC}:3478\"\nlisten_tcp = \"{PUBLIC}:3478\"\nlisten_tls = \"{PUBLIC}:5349\"\n\
         relay_ip = \"{PUBLIC}\"\nallow_peers = [\"192.0.2.0/24\", \"198.51.100.0/24\", \"203.0.113.0/24\"]\n"
    );
    Cluster::relay_at(
        &format!("{PUBLIC}:443"),
        &format!("{PUBLIC}:4433"),
        &turn,
        true,
        "self_signed = true",
    )
    .await
}

/// Start worker `gpu-1` (capacity 2) in the GPU namespace, naming only the relay's QUIC address,
/// with `tunnel_toml` in its `[tunnel]` section; its log path.
pub fn spawn_gpu_worker(cluster: &mut Cluster, topo: &Topology, tunnel_toml: &str) -> std::path::PathBuf {
    let trust = format!("fingerprint = \"{}\"", cluster.relay.fingerprint);
    cluster.spawn_worker_in(
        Some(topo.gpu.pid()),
        "gpu-1",
        2,
        SECRET,
        &trust,
        &format!("[tunnel]\n{tunnel_toml}\n"),
    )
}

/// A worker and a browser, each behind its own NAT; the relay and its TURN in the middle.
///
/// ```text
///  gpu ns                 worker NAT ns                 public (test ns)                browser NAT ns           browser ns
///  worker  198.51.100.2 ─ lan0 .1 | wan0 203.0.113.2 ─ ae-wpub 203.0.113.1            ae-bpub 192.0.2.1 ─ wan0 192.0.2.2 | lan0 198.51.100.129 ─ 198.51.100.130 probe-client
///                         MASQUERADE                   relay + TURN on 203.0.113.1                        MASQUERADE
/// ```
///
/// A symmetric NAT maps every new destination to a random port (`--random-fully`), so that side's
/// server-reflexive candidates are useless and only TURN reaches it. Otherwise the NAT keeps ports
/// (port-restricted cone) and hole punching may work.
pub struct Topology {
    wnat: ChildNs,
    pub gpu: ChildNs,
    _bnat: ChildNs,
    pub browser: ChildNs,
}

impl Topology {
    pub fn new(worker_symmetric: bool, browser_symmetric: bool) -> Self {
        let (wnat, gpu, bnat, browser) = (ChildNs::new(), ChildNs::new(), ChildNs::new(), ChildNs::new());
        netns::sh(&format!(
            "echo 1 > /proc/sys/net/ipv4/ip_forward && \
             ip link add ae-wpub type veth peer name ae-wwan && ip link set ae-wwan netns {w} && \
             ip addr add 203.0.113.1/24 dev ae-wpub && ip link set ae-wpub up && \
             ip link add ae-bpub type veth peer name ae-bwan && ip link set ae-bwan netns {b} && \
             ip addr add 192.0.2.1/24 dev ae-bpub && ip link set ae-bpub up && \
             ip link add ae-wlan type veth peer name ae-gpu && ip link set ae-wlan netns {w} && ip link set ae-gpu netns {g} && \
             ip link add ae-blan type veth peer name ae-web && ip link set ae-blan netns {b} && ip link set ae-web netns {br}",
            w = wnat.pid(),
            b = bnat.pid(),
            g = gpu.pid(),
            br = browser.pid(),
        ));
        let masquerade = |symmetric| {
            if symmetric {
                "MASQUERADE --random-fully"
            } else {
                "MASQUERADE"
            }
        };
        for (ns, wan, wan_ip, gw, lan_ip, masquerade) in [
            (
                &wnat,
                "ae-wwan",
                "203.0.113.2/24",
                "203.0.113.1",
                "198.51.100.1/25",
                masquerade(worker_symmetric),
            ),
            (
                &bnat,
                "ae-bwan",
                "192.0.2.2/24",
                "192.0.2.1",
                "198.51.100.129/25",
                masquerade(browser_symmetric),
            ),
        ] {
            let lan = if wan == "ae-wwan" { "ae-wlan" } else { "ae-blan" };
            ns.sh(&format!(
                "ip link set {wan} name wan0 && ip addr add {wan_ip} dev wan0 && ip link set wan0 up && \
                 ip link set {lan} name lan0 && ip addr add {lan_ip} dev lan0 && ip link set lan0 up && \
                 ip route add default via {gw} && echo 1 > /proc/sys/net/ipv4/ip_forward && \
                 iptables -t nat -A POSTROUTING -o wan0 -j {masquerade}"
            ));
        }
        gpu.sh("ip link set ae-gpu name eth0 && ip addr add 198.51.100.2/25 dev eth0 && ip link set eth0 up && ip route add default via 198.51.100.1");
        browser.sh("ip link set ae-web name eth0 && ip addr add 198.51.100.130/25 dev eth0 && ip link set eth0 up && ip route add default via 198.51.100.129");
        // Unsolicited packets from outside never reach either LAN, as with a home router.
        for ns in [&wnat, &bnat] {
            ns.sh(
                "iptables -A FORWARD -i wan0 -o lan0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT && \
                 iptables -A FORWARD -i wan0 -o lan0 -j DROP",
            );
        }
        Self {
            wnat,
            gpu,
            _bnat: bnat,
            browser,
        }
    }

    /// Firewall the browser: no UDP at all, TCP only to `allowed` (the relay's HTTP port and its
    /// TURN-over-TLS port), as on a corporate network that only lets HTTPS out.
    pub fn block_browser_udp(&self, allowed: &[(&str, u16)]) {
        let mut rules = String::from(
            "iptables -A OUTPUT -o lo -j ACCEPT && \
             iptables -A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT && ",
        );
        for (ip, port) in allowed {
            rules += &format!("iptables -A OUTPUT -p tcp -d {ip} --dport {port} -j ACCEPT && ");
        }
        rules += "iptables -A OUTPUT -j DROP";
        self.browser.sh(&rules);
    }

    /// Firewall the GPU box at its NAT: no UDP out at all (flows already open included), and TCP
    /// only to `allowed` (the relay's HTTPS port), as on a network that lets only HTTPS out.
    /// Calling it again replaces the rules; [`Topology::unblock_worker`] lifts them.
    pub fn block_worker_udp(&self, allowed: &[(&str, u16)]) {
        self.firewall_worker(&[], allowed);
    }

    /// Firewall the GPU box at its NAT: UDP only to `udp`, TCP only to `tcp`.
    pub fn firewall_worker(&self, udp: &[(&str, u16)], tcp: &[(&str, u16)]) {
        let mut rules = String::from(
            "(iptables -N AE-GPU-FW 2>/dev/null || true) && \
             (iptables -C FORWARD -i lan0 -j AE-GPU-FW 2>/dev/null || iptables -I FORWARD 1 -i lan0 -j AE-GPU-FW) && \
             iptables -F AE-GPU-FW && ",
        );
        for (proto, allowed) in [("udp", udp), ("tcp", tcp)] {
            for (ip, port) in allowed {
                rules += &format!("iptables -A AE-GPU-FW -p {proto} -d {ip} --dport {port} -j RETURN && ");
            }
        }
        rules += "iptables -A AE-GPU-FW -p udp -j DROP && iptables -A AE-GPU-FW -p tcp -j DROP";
        self.wnat.sh(&rules);
    }

    /// Lift [`Topology::block_worker_udp`].
    pub fn unblock_worker(&self) {
        self.wnat.sh("iptables -F AE-GPU-FW");
    }

    /// Run `script` in the worker's NAT namespace (e.g. `tc` on `wan0`, its link to the relay).
    pub fn worker_nat_sh(&self, script: &str) {
        self.wnat.sh(script);
    }

    /// `chromium-probe URL FRAMES` in the browser namespace with `env` set: its JSON line (or
    /// `{"error": …}` with whatever it printed).
    pub fn chromium_probe(&self, url: &str, frames: u32, env: &[(&str, String)]) -> serde_json::Value {
        let out = std::process::Command::new("nsenter")
            .args(["-t", &self.browser.pid().to_string(), "-n", "--"])
            .arg(crate::bin_path("chromium-probe"))
            .arg(url)
            .arg(frames.to_string())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .expect("nsenter chromium-probe");
        let line = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(line.trim()).unwrap_or_else(|_| serde_json::json!({ "error": line.trim() }))
    }

    /// Run a workspace binary inside the browser namespace; its stdout.
    pub fn run_in_browser(&self, bin: &str, args: &[&str]) -> String {
        let out = std::process::Command::new("nsenter")
            .args(["-t", &self.browser.pid().to_string(), "-n", "--"])
            .arg(crate::bin_path(bin))
            .args(args)
            .output()
            .expect("nsenter");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
