"""The reference sender for the slow-network benchmark: a WebRTC server built on aiortc, as the
customer's old stack was, speaking the subset of avatar-edge's signaling the probe uses.

A WebSocket server (any path, e.g. /ws/s1). On `{"type":"webrtc_offer","sdp":...}` it answers
`{"type":"webrtc_answer","sdp":...,"timestamp":...}` from an aiortc RTCPeerConnection (ICE gathered
before the answer: aiortc does that in setLocalDescription) that sends:

* video: a synthetic 512x512 picture at 25 fps (yuv420p; a slowly panning diagonal pattern and a
  bouncing block, so the encoder has motion to code). aiortc's own H.264 (or VP8) encoder follows
  the viewer's REMB by itself (between its own floor and ceiling).
* audio: 48 kHz, 20 ms frames of silence; right after a `{"type":"text_webrtc",...}` arrives, a
  loud 440 Hz tone for 2 s. There is no answer to compute, so the delay a viewer measures from
  its question to the first loud audio is the network's (and the sender's queues') alone.

Prints "listening" on stdout once bound.

    python aiortc_sender.py --listen 198.51.100.1:8700
"""

import argparse
import array
import asyncio
import datetime
import fractions
import json
import math
import sys
import time

import websockets
from av import AudioFrame, VideoFrame
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

WIDTH = HEIGHT = 512
FPS = 25
VIDEO_CLOCK = 90000
RATE = 48000
SAMPLES = 960  # 20 ms
TONE_SECONDS = 2.0
BLOCK = 64


def _plane_bytes(plane, rows):
    """Rows of `plane`'s visible width, padded to its line size."""
    pad = plane.line_size - len(rows[0])
    if pad:
        rows = [r + bytes(pad) for r in rows]
    return b"".join(rows)


class PatternTrack(MediaStreamTrack):
    """A moving 512x512 test picture at 25 fps."""

    kind = "video"

    def __init__(self):
        super().__init__()
        self._n = 0
        self._start = None
        # A diagonal ramp: row y of frame n is base[(y + n) % 256 : ... + WIDTH].
        self._base = bytes(16 + ((x * 3) % 224) for x in range(WIDTH + 256))
        cw = WIDTH // 2
        self._cbase = bytes(96 + ((x * 2) % 64) for x in range(cw + 128))

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            wait = self._start + self._n / FPS - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        n = self._n
        self._n += 1

        frame = VideoFrame(width=WIDTH, height=HEIGHT, format="yuv420p")
        # Luma: the panning ramp, with a bright block bouncing across it.
        shift = n % 256
        rows = [self._base[(y + shift) % 256 : (y + shift) % 256 + WIDTH] for y in range(HEIGHT)]
        span = WIDTH - BLOCK
        bx = abs((n * 7) % (2 * span) - span)
        by = abs((n * 5) % (2 * span) - span)
        white = bytes([235]) * BLOCK
        for y in range(by, by + BLOCK):
            r = rows[y]
            rows[y] = r[:bx] + white + r[bx + BLOCK :]
        frame.planes[0].update(_plane_bytes(frame.planes[0], rows))
        # Chroma: two ramps panning the other way.
        cw, ch = WIDTH // 2, HEIGHT // 2
        cs = (2 * n) % 128
        u = [self._cbase[(y + cs) % 128 : (y + cs) % 128 + cw] for y in range(ch)]
        v = [self._cbase[(128 - (y + cs) % 128) : (128 - (y + cs) % 128) + cw] for y in range(ch)]
        frame.planes[1].update(_plane_bytes(frame.planes[1], u))
        frame.planes[2].update(_plane_bytes(frame.planes[2], v))
        frame.pts = n * (VIDEO_CLOCK // FPS)
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        return frame


class ToneTrack(MediaStreamTrack):
    """Silence in 20 ms frames at 48 kHz; `speak()` makes the next 2 s a loud 440 Hz tone."""

    kind = "audio"

    def __init__(self):
        super().__init__()
        self._n = 0
        self._start = None
        self._tone_left = 0
        self._tone_pos = 0
        total = int(RATE * TONE_SECONDS)
        self._tone = array.array(
            "h", (int(0.5 * 32767 * math.sin(2 * math.pi * 440 * i / RATE)) for i in range(total))
        ).tobytes()
        self._silence = bytes(SAMPLES * 2)

    def speak(self):
        self._tone_pos = 0
        self._tone_left = int(RATE * TONE_SECONDS) // SAMPLES

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            wait = self._start + self._n * SAMPLES / RATE - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        n = self._n
        self._n += 1
        if self._tone_left > 0:
            data = self._tone[self._tone_pos * 2 : (self._tone_pos + SAMPLES) * 2]
            self._tone_pos += SAMPLES
            self._tone_left -= 1
        else:
            data = self._silence
        frame = AudioFrame(format="s16", layout="mono", samples=SAMPLES)
        frame.planes[0].update(data)
        frame.sample_rate = RATE
        frame.pts = n * SAMPLES
        frame.time_base = fractions.Fraction(1, RATE)
        return frame


def stamp():
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


async def session(ws):
    pcs = []
    audio = None
    try:
        async for msg in ws:
            try:
                ev = json.loads(msg)
            except ValueError:
                continue
            kind = ev.get("type")
            if kind == "webrtc_offer":
                pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
                pcs.append(pc)
                await pc.setRemoteDescription(RTCSessionDescription(sdp=ev["sdp"], type="offer"))
                audio = ToneTrack()
                pc.addTrack(PatternTrack())
                pc.addTrack(audio)
                await pc.setLocalDescription(await pc.createAnswer())
                await ws.send(
                    json.dumps(
                        {"type": "webrtc_answer", "sdp": pc.localDescription.sdp, "timestamp": stamp()}
                    )
                )
            elif kind == "text_webrtc" and audio is not None:
                audio.speak()
    except websockets.ConnectionClosed:
        pass
    finally:
        for pc in pcs:
            await pc.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True, help="HOST:PORT")
    args = ap.parse_args()
    host, port = args.listen.rsplit(":", 1)
    async with websockets.serve(session, host, int(port), max_size=None):
        print("listening", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
