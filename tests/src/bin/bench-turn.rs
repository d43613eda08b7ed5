//! The embedded TURN server beside coturn, in the same run, under `turnutils_uclient` stress.
//!
//! ```text
//! cargo build --release --workspace
//! target/release/bench-turn [CLIENTS] [MESSAGES] [ROUNDS]
//! ```
//!
//! Both servers on loopback with equivalent settings (REST-API secret, same realm, loopback echo
//! peer allowed, 200 allocations per credential, UDP and TCP on one port); each round runs the same
//! `turnutils_uclient` load (CLIENTS clients × MESSAGES messages × 1200 B every 1 ms, through
//! channels, echoed by `turnutils_peer`) against one server, then the other. Prints a table: loss
//! and wall time per server and transport.

use avatar_edge_tests::cluster::Cluster;
use avatar_edge_tests::turnutils::{self, Uclient, UclientReport};
use std::time::Duration;

const SECRET: &str = "bench-turn-secret-0123456789";

fn main() {
    let args: Vec<u32> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let clients = args.first().copied().unwrap_or(50);
    let messages = args.get(1).copied().unwrap_or(2000);
    let rounds = args.get(2).copied().unwrap_or(2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let ours = turnutils::free_port("127.0.0.1");
    let theirs = turnutils::free_port("127.0.0.1");
    let peer_port = turnutils::free_port("127.0.0.1");
    let toml = format!(
        "[turn]\nmode = \"embedded\"\nsecret = \"{SECRET}\"\n[turn.embedded]\nlisten_udp = \"127.0.0.1:{ours}\"\n\
         listen_tcp = \"127.0.0.1:{ours}\"\nrelay_ip = \"127.0.0.1\"\nrelay_port_min = 61000\nrelay_port_max = 63999\n\
         allow_peers = [\"127.0.0.0/8\"]\nmax_allocations_per_credential = 200\nmax_allocations_per_ip = 400\nrealm = \"avatar-edge\"\n"
    );
    let cluster = rt.block_on(Cluster::relay_only(&toml));
    let log = tempfile::NamedTempFile::new().expect("log");
    let _coturn = turnutils::coturn("127.0.0.1", theirs, SECRET, 200, log.path());
    assert!(
        turnutils::wait_tcp("127.0.0.1", theirs, Duration::from_secs(10)),
        "coturn did not start"
    );
    let _peer = turnutils::echo_peer("127.0.0.1", peer_port);
    std::thread::sleep(Duration::from_millis(300));

    println!(
        "\nTURN stress: {clients} clients x {messages} messages x 1200 B every 1 ms, echoed back (turnutils_uclient)\n"
    );
    println!("| server | transport | round | sent | received | loss % | wall s | avg RTT ms |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let mut totals: Vec<(&str, &str, Vec<UclientReport>)> = Vec::new();
    for transport in ["udp", "tcp"] {
        for round in 1..=rounds {
            for (name, port) in [("avatar-edge embedded", ours), ("coturn 4.6", theirs)] {
                let run = Uclient {
                    server_ip: "127.0.0.1",
                    port,
                    secret: SECRET,
                    peer_ip: "127.0.0.1",
                    peer_port,
                    clients,
                    messages,
                    bytes: 1200,
                    interval_ms: 1,
                    transport,
                };
                match run.run(Duration::from_secs(300)) {
                    Ok(r) => {
                        println!(
                            "| {name} | {transport} | {round} | {} | {} | {:.3} | {:.2} | {:.3} |",
                            r.sent, r.received, r.lost_percent, r.wall_s, r.avg_rtt_ms
                        );
                        match totals.iter_mut().find(|(n, t, _)| *n == name && *t == transport) {
                            Some((_, _, v)) => v.push(r),
                            None => totals.push((name, transport, vec![r])),
                        }
                    }
                    Err(out) => {
                        let tail: String = out.lines().rev().take(5).collect::<Vec<_>>().join(" / ");
                        println!("| {name} | {transport} | {round} | failed | | | | {tail} |");
                    }
                }
            }
        }
    }
    println!("\n| server | transport | mean loss % | mean wall s |");
    println!("|---|---|---:|---:|");
    for (name, transport, runs) in &totals {
        let n = runs.len() as f64;
        let loss = runs.iter().map(|r| r.lost_percent).sum::<f64>() / n;
        let wall = runs.iter().map(|r| r.wall_s).sum::<f64>() / n;
        println!("| {name} | {transport} | {loss:.3} | {wall:.2} |");
    }
    drop(cluster);
}
