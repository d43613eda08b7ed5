#!/usr/bin/env python3
"""Export Wav2Lip (Prajwal et al., 2020) to ONNX with the tensor names the worker expects.

    python3 scripts/export_wav2lip.py OUT.onnx [--checkpoint wav2lip_gan.pth] [--fp16]

With --checkpoint, the official weights are loaded (the `module.` prefix of DataParallel checkpoints is
stripped). Without it the network keeps random weights: the output is noise, but the compute is the real
model's, which is what `worker --self-test` needs to measure a GPU or a CPU (see docs/models.md).

Needs PyTorch (not installed by scripts/install-deps; a GPU box usually has it). The architecture below is
Wav2Lip's `models/wav2lip.py`, layer for layer, so its state_dict keys match the checkpoint's.
"""
import argparse
import sys

import torch
from torch import nn


class Conv2d(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride, padding, residual=False):
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel_size, stride, padding), nn.BatchNorm2d(cout))
        self.act = nn.ReLU()
        self.residual = residual

    def forward(self, x):
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return self.act(out)


class Conv2dTranspose(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride, padding, output_padding=0):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ConvTranspose2d(cin, cout, kernel_size, stride, padding, output_padding), nn.BatchNorm2d(cout)
        )
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv_block(x))


def res(c):
    return Conv2d(c, c, 3, 1, 1, residual=True)


class Wav2Lip(nn.Module):
    def __init__(self):
        super().__init__()
        S = nn.Sequential
        self.face_encoder_blocks = nn.ModuleList([
            S(Conv2d(6, 16, 7, 1, 3)),  # 96
            S(Conv2d(16, 32, 3, 2, 1), res(32), res(32)),  # 48
            S(Conv2d(32, 64, 3, 2, 1), res(64), res(64), res(64)),  # 24
            S(Conv2d(64, 128, 3, 2, 1), res(128), res(128)),  # 12
            S(Conv2d(128, 256, 3, 2, 1), res(256), res(256)),  # 6
            S(Conv2d(256, 512, 3, 2, 1), res(512)),  # 3
            S(Conv2d(512, 512, 3, 1, 0), Conv2d(512, 512, 1, 1, 0)),  # 1
        ])
        self.audio_encoder = S(
            Conv2d(1, 32, 3, 1, 1), res(32), res(32),
            Conv2d(32, 64, 3, (3, 1), 1), res(64), res(64),
            Conv2d(64, 128, 3, 3, 1), res(128), res(128),
            Conv2d(128, 256, 3, (3, 2), 1), res(256),
            Conv2d(256, 512, 3, 1, 0), Conv2d(512, 512, 1, 1, 0),
        )
        self.face_decoder_blocks = nn.ModuleList([
            S(Conv2d(512, 512, 1, 1, 0)),
            S(Conv2dTranspose(1024, 512, 3, 1, 0), res(512)),  # 3
            S(Conv2dTranspose(1024, 512, 3, 2, 1, 1), res(512), res(512)),  # 6
            S(Conv2dTranspose(768, 384, 3, 2, 1, 1), res(384), res(384)),  # 12
            S(Conv2dTranspose(512, 256, 3, 2, 1, 1), res(256), res(256)),  # 24
            S(Conv2dTranspose(320, 128, 3, 2, 1, 1), res(128), res(128)),  # 48
            S(Conv2dTranspose(160, 64, 3, 2, 1, 1), res(64), res(64)),  # 96
        ])
        self.output_block = S(Conv2d(80, 32, 3, 1, 1), nn.Conv2d(32, 3, 1, 1, 0), nn.Sigmoid())

    def forward(self, mel_spectrogram, video_frames):
        x = self.audio_encoder(mel_spectrogram)
        feats = []
        f = video_frames
        for block in self.face_encoder_blocks:
            f = block(f)
            feats.append(f)
        for block in self.face_decoder_blocks:
            x = block(x)
            x = torch.cat((x, feats.pop()), dim=1)
        return self.output_block(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--checkpoint")
    args = ap.parse_args()
    model = Wav2Lip()
    if args.checkpoint:
        ckpt = torch.load(args.checkpoint, map_location="cpu")
        state = ckpt.get("state_dict", ckpt)
        model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    model.eval()
    mel = torch.randn(2, 1, 80, 16)
    video = torch.rand(2, 6, 96, 96)
    with torch.no_grad():
        expected = model(mel, video)
    names = dict(input_names=["mel_spectrogram", "video_frames"], output_names=["predicted_frames"])
    axes = {"mel_spectrogram": {0: "B"}, "video_frames": {0: "B"}, "predicted_frames": {0: "B"}}
    try:
        torch.onnx.export(model, (mel, video), args.out, opset_version=17, dynamic_axes=axes, dynamo=False, **names)
    except TypeError:  # a PyTorch without the `dynamo` argument
        torch.onnx.export(model, (mel, video), args.out, opset_version=17, dynamic_axes=axes, **names)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: Wav2Lip, {params / 1e6:.1f} M parameters, output {tuple(expected.shape)}", file=sys.stderr)


if __name__ == "__main__":
    main()
