//! Slow networks (issue 33): avatar-edge beside a reference aiortc sender, under the same `tc tbf`
//! limits and the same independent viewer, in one run.
//!
//! ```text
//! cargo build --release -p avatar-relay -p avatar-worker -p avatar-edge-tests --bin bench-slow-network
//! target/release/bench-slow-network          # SLOW_SECONDS=S per probe (default 12)
//! ```
//!
//! The link of the tests (`slow_link.rs`): the servers in this namespace on 198.51.100.1, the
//! viewer (aiortc, `tests/py/webrtc_probe.py`, which sends REMB and receiver reports as browsers
//! do) in a child namespace behind a veth link whose server side `tc tbf` limits. For each limit
//! (none, 2 Mbit/s, 1 Mbit/s, 400 kbit/s, 200 kbit/s) the viewer plays one session from
//! avatar-edge (a relay and a worker with their defaults) for SLOW_SECONDS, asking a question at
//! 7/12 of it, and then one from the reference: `tests/py/aiortc_sender.py`, an aiortc WebRTC
//! server as the customer's old stack was (a synthetic 512×512 picture at 25 fps through aiortc's
//! own REMB-following H.264 encoder, and a loud tone at once on a question). Prints one table:
//! frames a second received from 3 s to the end, question → first loud audio, the seconds of
//! freeze (gaps between frames over 200 ms) from 3 s to the end, and socket open → first frame.

use avatar_edge_tests::cluster::Cluster;
use avatar_edge_tests::slow_link::{self, Report, SlowLink, SERVER_IP};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Link limits, kbit/s (`None`: unlimited).
const LIMITS: [Option<u32>; 5] = [None, Some(2000), Some(1000), Some(400), Some(200)];
/// The window the frame rate and the freezes are measured over starts here (probe seconds).
const FROM: f64 = 3.0;

struct Row {
    limit: Option<u32>,
    ours: Report,
    theirs: Report,
}

fn main() {
    avatar_edge_tests::netns::reexec_isolated();
    let seconds: f64 = std::env::var("SLOW_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s: &f64| *s > FROM + 1.0)
        .unwrap_or(12.0);
    let text_at = seconds * 7.0 / 12.0;
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let link = Arc::new(SlowLink::new());
    let cluster = rt.block_on(async {
        let mut cluster = Cluster::relay_on(SERVER_IP, "", false, "self_signed = true").await;
        cluster.add_worker("bench-slow-worker", 2, "").await;
        cluster
    });
    let (mut sender, sender_url) = reference_sender();

    let mut rows = Vec::new();
    for limit in LIMITS {
        if let Some(k) = limit {
            link.limit(Some(k));
        }
        let name = limit.map_or("none".to_owned(), |k| k.to_string());
        let ours = probe(&link, &cluster.ws_url(&format!("bench-slow-{name}")), seconds, text_at);
        eprintln!("{} avatar-edge: {}", label(limit), ours.summary(FROM, seconds));
        detail(&ours, seconds);
        settle();
        let theirs = probe(&link, &format!("{sender_url}/ws/ref-{name}"), seconds, text_at);
        eprintln!("{} aiortc:      {}", label(limit), theirs.summary(FROM, seconds));
        detail(&theirs, seconds);
        settle();
        rows.push(Row { limit, ours, theirs });
    }
    let _ = sender.kill();
    let _ = sender.wait();
    drop(cluster);

    print_table(&rows, seconds, text_at);
    println!("\n({:.0} s in all)", started.elapsed().as_secs_f64());
}

/// Start `aiortc_sender.py` on the servers' address and wait for it to listen; its base URL.
fn reference_sender() -> (Child, String) {
    let port = avatar_edge_tests::turnutils::free_port(SERVER_IP);
    let mut child = Command::new(slow_link::python())
        .arg(slow_link::script("aiortc_sender.py"))
        .args(["--listen", &format!("{SERVER_IP}:{port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run the aiortc reference sender (scripts/install-deps makes .tools/rtcpy)");
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let _ = out.read_line(&mut line);
    assert!(
        line.trim() == "listening",
        "the aiortc reference sender did not start: {line:?}"
    );
    (child, format!("ws://{SERVER_IP}:{port}"))
}

/// One probe; a failed one (its panic is printed) gives an empty report, so the row shows it.
fn probe(link: &SlowLink, url: &str, seconds: f64, text_at: f64) -> Report {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| link.probe(url, seconds, Some(text_at))))
        .unwrap_or_default()
}

/// On stderr: frames received in each second, and every `video_quality` event.
fn detail(r: &Report, seconds: f64) {
    let per_second: Vec<String> = (0..seconds.ceil() as usize)
        .map(|s| r.frames.iter().filter(|(t, ..)| *t as usize == s).count().to_string())
        .collect();
    eprintln!("  frames per second: {}", per_second.join(" "));
    for (t, q) in r.qualities() {
        eprintln!("  {t:.2}: {q}");
    }
}

/// Let the last session's packets leave the bottleneck's queue before the next one starts.
fn settle() {
    std::thread::sleep(Duration::from_millis(500));
}

fn label(limit: Option<u32>) -> String {
    match limit {
        None => "none".into(),
        Some(k) if k >= 1000 && k % 1000 == 0 => format!("{} Mbit/s", k / 1000),
        Some(k) => format!("{k} kbit/s"),
    }
}

/// Seconds without a new frame, counting only gaps over 200 ms, from `from` to `to`, the window's
/// edges included (a picture that stops for good, or never starts, counts as frozen).
fn frozen(r: &Report, from: f64, to: f64) -> f64 {
    let mut marks = vec![from];
    marks.extend(r.frames.iter().map(|(t, ..)| *t).filter(|t| *t >= from && *t < to));
    marks.push(to);
    marks
        .windows(2)
        .map(|w| w[1] - w[0])
        .filter(|gap| *gap > 0.2)
        .fold(0.0, |a, b| a + b)
}

fn ms(v: Option<f64>) -> String {
    v.map_or("never".into(), |s| format!("{:.0}", s * 1000.0))
}

fn cells(r: &Report, seconds: f64) -> String {
    format!(
        "{:.1} | {} | {:.2} | {}",
        r.fps(FROM, seconds),
        ms(r.answer_delay()),
        frozen(r, FROM, seconds),
        ms(r.first_frame())
    )
}

fn print_table(rows: &[Row], seconds: f64, text_at: f64) {
    println!(
        "\nSlow networks: avatar-edge beside a reference aiortc sender, each limit in turn on one veth link (tc tbf on the \
         servers' side, 200 ms queue), the same aiortc viewer (REMB) for {seconds:.0} s, a question at {text_at:.1} s.\n\
         fps and freeze over {FROM:.0}-{seconds:.0} s (freeze: the sum of the gaps between frames over 200 ms). Answer delay: \
         question -> first loud audio; the reference's tone starts the moment the question arrives, so its delay is the \
         network's only, while avatar-edge's includes its built-in LLM, TTS and lip-sync. First frame: socket open -> \
         first decoded frame.\n"
    );
    println!(
        "| limit | avatar-edge fps | answer delay ms | freeze s | first frame ms | aiortc ref. fps | answer delay ms (network only) | freeze s | first frame ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        println!(
            "| {} | {} | {} |",
            label(row.limit),
            cells(&row.ours, seconds),
            cells(&row.theirs, seconds)
        );
    }
    println!("\nWhat each sent at the end (last decoded frame size; avatar-edge's last video_quality event):\n");
    println!("| limit | avatar-edge size | avatar-edge video_quality | aiortc ref. size |");
    println!("|---|---|---|---|");
    let size = |r: &Report| r.frames.last().map_or("-".into(), |(_, w, h)| format!("{w}x{h}"));
    for row in rows {
        let quality = row.ours.qualities().last().map_or("-".into(), |(t, q)| {
            let mut q = q.clone();
            if let Some(o) = q.as_object_mut() {
                o.remove("type");
                o.remove("timestamp");
            }
            format!("{t:.1} s: {q}")
        });
        println!(
            "| {} | {} | `{quality}` | {} |",
            label(row.limit),
            size(&row.ours),
            size(&row.theirs)
        );
    }
}
