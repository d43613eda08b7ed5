//! `worker avatar prepare` on this machine: how long preparing takes per second of recording.
//! Prints one table.
//!
//! ```text
//! cargo run --release -p avatar-edge-tests --bin bench-prepare -- [SECONDS]
//! ```
//!
//! The recording is the test figure moving along `avatars::pose_at` (SECONDS long, default 10,
//! the last 2 s without a face), written at 512×512 and at 1280×720, 25 fps. Each is prepared
//! to a 512×512 avatar by the real `worker` binary (2 detection threads) and timed from the
//! outside; the stages come from its summary. The anchor in the same run is `ffmpeg` doing only
//! the decode, scale and x264 encode that prepare also does.

use avatar_edge_tests::avatars::{pose_at, prepare_command, write_recording};
use std::process::Command;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let seconds: f32 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(10.0);
    let dir = tempfile::tempdir()?;
    println!("| recording | seconds | prepare wall s | s per input s | decode ms | detect ms per frame | write ms | ffmpeg transcode s (anchor) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (label, side) in [("512×512", 512u32), ("1280×720", 0)] {
        let input = dir.path().join(format!("in-{label}.mp4"));
        if side == 512 {
            write_recording(&input, 512, seconds, |t| pose_at(t, seconds - 2.0))?;
        } else {
            // The same figure, scaled into a wide frame by ffmpeg (prepare crops it back).
            let square = dir.path().join("in-512×512.mp4");
            let ok = Command::new("ffmpeg")
                .args(["-loglevel", "error", "-y", "-i"])
                .arg(&square)
                .args([
                    "-vf",
                    "scale=720:720,pad=1280:720:280:0",
                    "-c:v",
                    "libx264",
                    "-crf",
                    "18",
                ])
                .arg(&input)
                .status()?
                .success();
            anyhow::ensure!(ok, "ffmpeg could not write the 1280×720 recording");
        }
        let out = dir.path().join(format!("out-{side}"));
        let started = Instant::now();
        let run = prepare_command()
            .arg(&input)
            .args(["--id", "bench", "--out"])
            .arg(&out)
            .output()?;
        let wall = started.elapsed().as_secs_f64();
        let summary = String::from_utf8_lossy(&run.stdout).into_owned();
        anyhow::ensure!(
            run.status.success(),
            "prepare failed: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let stage = |name: &str| -> f64 {
            summary
                .split(&format!("{name} "))
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.trim_start_matches('(').parse().ok())
                .unwrap_or(f64::NAN)
        };
        let per_frame: f64 = summary
            .split(" ms a frame")
            .next()
            .and_then(|s| s.rsplit('(').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN);
        let started = Instant::now();
        let ok = Command::new("ffmpeg")
            .args(["-loglevel", "error", "-y", "-i"])
            .arg(&input)
            .args([
                "-vf",
                "scale=512:512",
                "-c:v",
                "libx264",
                "-preset",
                "medium",
                "-crf",
                "18",
            ])
            .arg(dir.path().join("anchor.mp4"))
            .status()?
            .success();
        let anchor = started.elapsed().as_secs_f64();
        anyhow::ensure!(ok, "ffmpeg anchor failed");
        println!(
            "| {label} | {seconds:.0} | {wall:.2} | {:.3} | {:.0} | {per_frame:.1} | {:.0} | {anchor:.2} |",
            wall / f64::from(seconds),
            stage("decode"),
            stage("write"),
        );
    }
    Ok(())
}
