//! Test recordings for `worker avatar prepare`: the built-in avatar's figure drawn moving along a
//! known path, so every frame's true face box and mouth are known.

use avatar_worker::media::avatar::{draw, Pose};
use avatar_worker::media::file::Mp4Writer;
use std::path::Path;
use std::process::Command;

/// `worker avatar prepare`, with the face detector and ONNX Runtime that scripts/install-deps put
/// in .tools/ (tests run from the crate's directory, where the binary would not find them).
pub fn prepare_command() -> Command {
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools");
    let mut command = Command::new(crate::bin_path("worker"));
    command
        .args(["avatar", "prepare", "--detector"])
        .arg(tools.join("models/centerface.onnx"))
        .arg("--onnxruntime")
        .arg(tools.join("onnxruntime/libonnxruntime.so"));
    command
}

/// The path of the standard test recording at `t` seconds, in a 512×512 picture: the face
/// sways 60 px left and right (a 3 s period), 16 px up and down and 12 % nearer and farther (6 s
/// periods); after `face_seconds` it is gone (`None`).
pub fn pose_at(t: f32, face_seconds: f32) -> Option<Pose> {
    if t >= face_seconds {
        return None;
    }
    let tau = std::f32::consts::TAU;
    Some(Pose {
        cx: 256.0 + 60.0 * (tau * t / 3.0).sin(),
        dy: -20.0 + 16.0 * (tau * t / 6.0).sin(),
        size: 512.0 * (1.0 + 0.12 * (tau * t / 6.0).sin()),
    })
}

/// The face of `pose` as drawn: (centre x, centre y, width, height) of its ellipse.
pub fn face_of(pose: Pose) -> (f32, f32, f32, f32) {
    (pose.cx, pose.dy + 0.46 * pose.size, 0.40 * pose.size, 0.50 * pose.size)
}

/// The centre of the drawn mouth of `pose`.
pub fn mouth_of(pose: Pose) -> (f32, f32) {
    (pose.cx, pose.dy + 0.59 * pose.size)
}

/// Write `seconds` of the figure at `pose(t)` to an MP4 at `path` (`side`×`side`, 25 fps); returns
/// each frame's pose.
pub fn write_recording(
    path: &Path,
    side: u32,
    seconds: f32,
    pose: impl Fn(f32) -> Option<Pose>,
) -> anyhow::Result<Vec<Option<Pose>>> {
    write_recording_sized(path, (side, side), seconds, pose)
}

/// [`write_recording`] at `width`×`height` (a 16:9 studio recording, a 9:16 phone one).
pub fn write_recording_sized(
    path: &Path,
    (width, height): (u32, u32),
    seconds: f32,
    pose: impl Fn(f32) -> Option<Pose>,
) -> anyhow::Result<Vec<Option<Pose>>> {
    avatar_worker::media::encoder::init()?;
    let mut writer = Mp4Writer::create(path, width, height, 25)?;
    let mut poses = Vec::new();
    for i in 0..(seconds * 25.0).round() as usize {
        let t = i as f32 / 25.0;
        let p = pose(t);
        writer.write(&draw(width, height, (t / 4.0).fract(), p))?;
        poses.push(p);
    }
    writer.finish()?;
    Ok(poses)
}
