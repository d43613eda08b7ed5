#!/usr/bin/env python3
"""Fixtures for the talking pipeline, made with numpy and the Python `onnx`/`onnxruntime` packages.

    talk_fixtures.py mel   OUT_DIR   # Wav2Lip mel features of a fixed test signal
    talk_fixtures.py model OUT_DIR   # a small ONNX model with the Wav2Lip contract + a reference run

`mel` reimplements Wav2Lip's audio.py (librosa 0.7 defaults: centered STFT with reflect padding,
periodic Hann, Slaney mel scale and norm) in plain numpy, so the worker's Rust features can be
checked against it without librosa. `model` writes lipsync-test.onnx: inputs `mel_spectrogram`
(B,1,80,16) and `video_frames` (B,6,96,96), output `predicted_frames` (B,3,96,96) in [0,1]. Its
mouth region darkens and opens with the loudness of the mel window, so a face visibly follows the
audio. It carries no learned weights. It also runs the model with onnxruntime on a fixed input and
writes both, so the Rust side can check it computes the same thing.
"""
import sys
from pathlib import Path

import numpy as np

SR, N_FFT, HOP, WIN, N_MELS, FMIN, FMAX = 16000, 800, 200, 800, 80, 55.0, 7600.0


def hz_to_mel(f):
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz, min_log_mel, logstep = 200.0 / 3, 1000.0, 15.0, np.log(6.4) / 27.0
    mel = f / f_sp
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mel)


def mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz, min_log_mel, logstep = 200.0 / 3, 1000.0, 15.0, np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_basis():
    fftfreqs = np.linspace(0, SR / 2, 1 + N_FFT // 2)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(FMIN), hz_to_mel(FMAX), N_MELS + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fftfreqs[None, :]
    weights = np.zeros((N_MELS, len(fftfreqs)))
    for i in range(N_MELS):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2 : N_MELS + 2] - mel_f[:N_MELS]))[:, None]
    return weights


def melspectrogram(wav):
    y = np.append(wav[0], wav[1:] - 0.97 * wav[:-1])  # scipy.signal.lfilter([1, -0.97], [1], wav)
    pad = N_FFT // 2
    y = np.pad(y, pad, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WIN) / WIN)  # periodic Hann
    n_frames = 1 + (len(y) - N_FFT) // HOP
    frames = np.stack([y[t * HOP : t * HOP + N_FFT] * window for t in range(n_frames)], axis=1)
    mag = np.abs(np.fft.rfft(frames, axis=0))
    s = mel_basis() @ mag
    db = 20 * np.log10(np.maximum(1e-5, s)) - 20
    return np.clip(8 * ((db + 100) / 100) - 4, -4, 4)


def test_signal():
    """1.3 s: a chirp, a voiced-like harmonic tone with an envelope, noise bursts and a silent gap."""
    t = np.arange(int(1.3 * SR)) / SR
    chirp = 0.3 * np.sin(2 * np.pi * (100 * t + 1500 * t * t))
    voiced = sum(0.15 / k * np.sin(2 * np.pi * 180 * k * t) for k in range(1, 12)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    rng = np.random.default_rng(7)
    noise = 0.05 * rng.standard_normal(len(t)) * (np.sin(2 * np.pi * 1.5 * t) > 0.6)
    x = chirp + voiced + noise
    x[int(0.9 * SR) : int(1.0 * SR)] = 0.0
    return x.astype(np.float32)


def write_mel(out: Path):
    x = test_signal()
    m = melspectrogram(x.astype(np.float64)).astype(np.float32)
    x.tofile(out / "mel_input.f32")
    np.ascontiguousarray(m).tofile(out / "mel_expected.f32")  # row-major (80, frames)
    print(f"mel fixture: {len(x)} samples -> {m.shape}")


def write_model(out: Path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    # Soft ellipse over the mouth: in Wav2Lip's 96x96 crop (face box padded 10 px below), the mouth sits
    # around row 66, centred.
    yy, xx = np.mgrid[0:96, 0:96].astype(np.float32)
    d = ((xx - 47.5) / 17.0) ** 2 + ((yy - 66.0) / 9.0) ** 2
    mask = np.clip(1.5 - d, 0.0, 1.0).astype(np.float32)[None, None]  # (1,1,96,96)
    # A 3x3 smoothing of the reference face, channel by channel: the real compute of one conv layer.
    k = np.zeros((3, 3, 3, 3), np.float32)
    for c in range(3):
        k[c, c] = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 16.0
    colour = np.array([0.20, 0.12, 0.30], np.float32).reshape(1, 3, 1, 1)  # dark mouth interior (BGR)
    inits = [
        numpy_helper.from_array(mask, "mouth_mask"),
        numpy_helper.from_array(k, "smooth_w"),
        numpy_helper.from_array(colour, "mouth_colour"),
        numpy_helper.from_array(np.array([3], np.int64), "c3"),
        numpy_helper.from_array(np.array([6], np.int64), "c6"),
        numpy_helper.from_array(np.array([1], np.int64), "ax1"),
        numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
        numpy_helper.from_array(np.array(1.6, np.float32), "gain"),
        numpy_helper.from_array(np.array(2.2, np.float32), "bias"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
    ]
    nodes = [
        helper.make_node("Slice", ["video_frames", "c3", "c6", "ax1"], ["reference"]),
        helper.make_node("Conv", ["reference", "smooth_w"], ["smoothed"], pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["mel_spectrogram", "axes"], ["loudness"], keepdims=1),  # (B,1,1,1)
        helper.make_node("Mul", ["loudness", "gain"], ["l1"]),
        helper.make_node("Add", ["l1", "bias"], ["l2"]),
        helper.make_node("Sigmoid", ["l2"], ["openness"]),  # ~0 in silence, ~1 in speech
        helper.make_node("Mul", ["mouth_mask", "openness"], ["alpha"]),  # (B,1,96,96)
        helper.make_node("Sub", ["mouth_colour", "smoothed"], ["towards"]),
        helper.make_node("Mul", ["towards", "alpha"], ["delta"]),
        helper.make_node("Add", ["smoothed", "delta"], ["mixed"]),
        helper.make_node("Clip", ["mixed", "zero", "one"], ["predicted_frames"]),
    ]
    graph = helper.make_graph(
        nodes,
        "lipsync-test",
        [
            helper.make_tensor_value_info("mel_spectrogram", TensorProto.FLOAT, ["B", 1, 80, 16]),
            helper.make_tensor_value_info("video_frames", TensorProto.FLOAT, ["B", 6, 96, 96]),
        ],
        [helper.make_tensor_value_info("predicted_frames", TensorProto.FLOAT, ["B", 3, 96, 96])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="avatar-edge")
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, out / "lipsync-test.onnx")

    import onnxruntime as ort

    rng = np.random.default_rng(11)
    mel = rng.uniform(-4, 2, (2, 1, 80, 16)).astype(np.float32)
    mel[1] = -4.0  # silence: the mouth stays shut
    video = rng.uniform(0, 1, (2, 6, 96, 96)).astype(np.float32)
    sess = ort.InferenceSession(str(out / "lipsync-test.onnx"), providers=["CPUExecutionProvider"])
    (pred,) = sess.run(["predicted_frames"], {"mel_spectrogram": mel, "video_frames": video})
    mel.tofile(out / "lipsync_mel.f32")
    video.tofile(out / "lipsync_video.f32")
    pred.astype(np.float32).tofile(out / "lipsync_expected.f32")
    print(f"model: {out / 'lipsync-test.onnx'}; reference run {pred.shape}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("mel", "model"):
        sys.exit(__doc__)
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    (write_mel if sys.argv[1] == "mel" else write_model)(out)
