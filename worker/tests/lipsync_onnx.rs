//! The ONNX lip-sync path against Python's onnxruntime: the same model, the same input, the same
//! output. `scripts/install-deps` generates the model and the reference run
//! (`scripts/talk_fixtures.py model .tools/models`) and unpacks the runtime library from the
//! onnxruntime wheel into `.tools/onnxruntime/`.

use avatar_worker::config::LipSyncConfig;
use avatar_worker::talk::face::FACE_LEN;
use avatar_worker::talk::lipsync::{FrameInput, LipSyncModel, LipSyncService, OnnxLipSync, MEL_LEN};
use std::path::PathBuf;

fn tools() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.tools"))
}

fn read_f32(path: PathBuf) -> Vec<f32> {
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run scripts/install-deps)", path.display()));
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn config() -> LipSyncConfig {
    LipSyncConfig {
        backend: avatar_worker::config::LipSyncBackend::Onnx,
        model: Some(tools().join("models/lipsync-test.onnx")),
        onnxruntime: tools().join("onnxruntime/libonnxruntime.so"),
        runners: 2,
        ..LipSyncConfig::default()
    }
}

fn inputs() -> (Vec<FrameInput>, Vec<f32>) {
    let mel = read_f32(tools().join("models/lipsync_mel.f32"));
    let video = read_f32(tools().join("models/lipsync_video.f32"));
    let expected = read_f32(tools().join("models/lipsync_expected.f32"));
    assert_eq!(
        (mel.len(), video.len(), expected.len()),
        (2 * MEL_LEN, 2 * 6 * 96 * 96, 2 * FACE_LEN)
    );
    // Python fed random (B,6,96,96) frames; the wrapper builds both halves from one face. The test
    // model reads only the reference half (channels 3..6), so that half is the face to give it.
    let frames = (0..2)
        .map(|b| {
            let mut m = [0.0f32; MEL_LEN];
            m.copy_from_slice(&mel[b * MEL_LEN..(b + 1) * MEL_LEN]);
            let v = &video[b * 6 * 96 * 96..(b + 1) * 6 * 96 * 96];
            FrameInput {
                mel: m,
                face: v[3 * 96 * 96..].to_vec(),
            }
        })
        .collect();
    (frames, expected)
}

#[test]
fn onnx_output_matches_python_onnxruntime() {
    let (frames, expected) = inputs();
    let mut model = OnnxLipSync::load(&config()).expect("load model");
    let faces = model.infer(&frames).expect("infer");
    let max_err = faces
        .iter()
        .flatten()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!("max abs difference vs Python onnxruntime: {max_err:.2e}");
    assert!(max_err < 1e-5, "max error {max_err}");
    // The loud frame's mouth is dark, the silent frame's is not changed there.
    let mouth = |f: &[f32]| f[66 * 96 + 47];
    assert!(mouth(&faces[0]) < 0.35, "loud frame mouth {}", mouth(&faces[0]));
}

#[test]
fn the_service_batches_across_callers_and_keeps_answers_apart() {
    let service = LipSyncService::start(&config()).expect("service");
    let (frames, expected) = inputs();
    let faces: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let service = &service;
                let frame = FrameInput {
                    mel: frames[i % 2].mel,
                    face: frames[i % 2].face.clone(),
                };
                s.spawn(move || service.infer(vec![frame]).expect("infer").remove(0))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    for (i, face) in faces.iter().enumerate() {
        let want = &expected[(i % 2) * FACE_LEN..(i % 2 + 1) * FACE_LEN];
        let err = face.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(err < 1e-5, "caller {i} got another caller's face (error {err})");
    }
    service.shutdown();
    assert!(service.infer(vec![]).expect("empty").is_empty());
}

#[test]
fn a_missing_runtime_or_model_or_tensor_name_is_a_clear_error() {
    let mut c = config();
    c.model = Some(tools().join("models/does-not-exist.onnx"));
    let err = OnnxLipSync::load(&c).err().expect("missing model").to_string();
    assert!(err.contains("does-not-exist.onnx"), "{err}");
    let mut c = config();
    c.input_mel = "mel".into();
    let err = OnnxLipSync::load(&c).err().expect("wrong name").to_string();
    assert!(
        err.contains("no input `mel`") && err.contains("mel_spectrogram"),
        "{err}"
    );
    let mut c = config();
    c.execution_provider = avatar_worker::config::ExecutionProvider::Cuda;
    // No GPU here: registering CUDA must fail loudly, never fall back to the CPU in silence.
    match OnnxLipSync::load(&c) {
        Err(e) => println!("cuda refused as expected: {e}"),
        Ok(m) => assert!(m.name().contains("cuda"), "a CUDA session that loaded must say so"),
    }
}
