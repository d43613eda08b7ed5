"""An independent WebRTC viewer for the slow-network tests: aiortc, as the customer's old stack
used, receiving the avatar over the relay's signaling and reporting what a viewer gets.

aiortc's receiver sends REMB (its delay-based estimate, from the abs-send-time extension) and
receiver reports, as browsers do. The probe offers H.264 only (what avatar-edge sends), records
the arrival time and size of every decoded video frame and the loudness of every decoded audio
frame, sends one `text_webrtc` at --text-at seconds, and prints one JSON object on stdout (with
the NACKs and PLIs it sent, and when each audio packet arrived).

Times are seconds since the probe started (time.monotonic based); `t0_unix` is that start on
the wall clock, so a test can place its own actions (a link that narrows) on the probe's clock.

    python webrtc_probe.py --ws ws://198.51.100.1:8080/ws/s1 --seconds 12 --text-at 6
"""

import argparse
import asyncio
import json
import math
import sys
import time

import websockets

try:  # C speed for the loudness of 50 audio frames a second (Python 3.11; gone in 3.13)
    import audioop
except ImportError:  # pragma: no cover
    audioop = None
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.rtcrtpreceiver import RTCRtpReceiver

T0 = time.monotonic()
T0_UNIX = time.time()


def now():
    return time.monotonic() - T0


# What the viewer asked of the sender, for failure reports: (time, NACKed sequence numbers) and
# the times of picture-loss requests. And when each audio RTP packet arrived, with its sequence
# number: what the network delivered, before aiortc's jitter buffer (which holds every later
# packet back for 16 packets, 320 ms, behind one that was lost; a browser conceals 20 ms).
NACKS, PLIS, AUDIO_RTP = [], [], []
_send_nack, _send_pli = RTCRtpReceiver._send_rtcp_nack, RTCRtpReceiver._send_rtcp_pli
_handle_rtp = RTCRtpReceiver._handle_rtp_packet


async def _logged_rtp(self, packet, arrival_time_ms):
    if self._RTCRtpReceiver__kind == "audio":
        AUDIO_RTP.append([round(now(), 4), packet.sequence_number])
    await _handle_rtp(self, packet, arrival_time_ms)


async def _logged_nack(self, media_ssrc, lost):
    NACKS.append([round(now(), 4), list(lost)[:64]])
    await _send_nack(self, media_ssrc, lost)


async def _logged_pli(self, media_ssrc):
    PLIS.append(round(now(), 4))
    await _send_pli(self, media_ssrc)


RTCRtpReceiver._send_rtcp_nack = _logged_nack
RTCRtpReceiver._send_rtcp_pli = _logged_pli
RTCRtpReceiver._handle_rtp_packet = _logged_rtp


async def consume_video(track, out):
    while True:
        try:
            frame = await track.recv()
        except Exception:
            return
        out.append([round(now(), 4), frame.width, frame.height])


async def consume_audio(track, out):
    while True:
        try:
            frame = await track.recv()
        except Exception:
            return
        # s16 interleaved: RMS of the samples, scaled to 0..1.
        data = bytes(frame.planes[0])[: frame.samples * 2 * len(frame.layout.channels)]
        if audioop is not None:
            rms = audioop.rms(data, 2) / 32768.0
        else:
            n = len(data) // 2
            total = sum(v * v for v in memoryview(data).cast("h"))
            rms = math.sqrt(total / max(n, 1)) / 32768.0
        out.append([round(now(), 4), round(rms, 5)])


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ws", required=True)
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--text-at", type=float, default=None)
    ap.add_argument("--text", default="Please say something about the sea.")
    args = ap.parse_args()

    pc = RTCPeerConnection()
    video, audio, events = [], [], []
    tasks = []

    @pc.on("track")
    def on_track(track):
        sink = video if track.kind == "video" else audio
        fn = consume_video if track.kind == "video" else consume_audio
        tasks.append(asyncio.ensure_future(fn(track, sink)))

    vt = pc.addTransceiver("video", direction="recvonly")
    h264 = [c for c in RTCRtpReceiver.getCapabilities("video").codecs if c.mimeType == "video/H264"]
    vt.setCodecPreferences(h264)
    pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())

    result = {"video": video, "audio": audio, "events": events, "t0_unix": T0_UNIX, "nacks": NACKS, "plis": PLIS, "audio_rtp": AUDIO_RTP}
    async with websockets.connect(args.ws, max_size=None) as ws:
        result["connected_at"] = now()
        await ws.send(json.dumps({"type": "webrtc_offer", "sdp": pc.localDescription.sdp}))
        text_sent = False
        deadline = T0 + args.seconds
        while time.monotonic() < deadline:
            if args.text_at is not None and not text_sent and now() >= args.text_at:
                await ws.send(json.dumps({"type": "text_webrtc", "message": args.text}))
                result["text_sent_at"] = now()
                text_sent = True
            timeout = deadline - time.monotonic()
            if args.text_at is not None and not text_sent:
                timeout = min(timeout, max(args.text_at - now(), 0.0))
            try:
                msg = await asyncio.wait_for(ws.recv(), timeout=max(timeout, 0.001))
            except asyncio.TimeoutError:
                continue
            ev = json.loads(msg)
            events.append([round(now(), 4), ev])
            if ev.get("type") == "webrtc_answer":
                result["answer_at"] = now()
                await pc.setRemoteDescription(RTCSessionDescription(sdp=ev["sdp"], type="answer"))
    await pc.close()
    for t in tasks:
        t.cancel()
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    asyncio.run(main())
