#!/usr/bin/env python3
"""The demo's offline speech recognition: an OpenAI-compatible transcription server.

    POST /v1/audio/transcriptions   multipart/form-data: file (WAV), model, language, prompt, response_format
                                    -> {"text": "..."}
    GET  /health                    -> {"status": "ok", "model": "..."}

It runs Whisper (faster-whisper on CTranslate2, int8 on the CPU) with the multilingual Whisper base
model that scripts/install-deps puts in .tools/asr/whisper-base. The worker's `[talk.asr]` speaks the
same protocol to whisper.cpp's server, faster-whisper servers, vLLM or a hosted API; this one is the
stand-in that needs no network and no GPU. It binds loopback only.

Two things make it fast enough to answer while a person waits:

* **Its cost follows the audio's length** (`--window fit`, the default). Whisper's encoder reads a
  fixed 30 s window, so a 2 s question cost as much as 30 s of speech (about 1 s on 2 cores).
  CTranslate2 accepts a shorter window; this server pads each utterance only to its own length
  plus `--margin-s` (and at least `--min-window-s`), the way whisper.cpp's `audio_ctx` does.
  `--window full` is the old 30 s path, kept to measure against (`bench-asr`).
* **The most urgent request goes first.** One transcription runs at a time (the model's threads
  are the limit). A waiting request for a whole utterance goes before a partial transcript (the
  worker marks those with `X-Avatar-Edge-Priority: low`), and among equals the shorter audio
  goes first, so no one waits behind another's long utterance. A partial that waited longer than
  `--stale-s` is answered 503 at once: by then the user has said more.

Usage: asr-server.py [--listen 127.0.0.1:8780] [--model DIR] [--threads 2] [--window fit|full]
"""

import argparse
import contextlib
import email.parser
import heapq
import itertools
import email.policy
import io
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 16 * 1024 * 1024  # 16 MiB: over 8 minutes of 16 kHz 16-bit mono
FULL_WINDOW = 3000  # Whisper's 30 s of 10 ms mel frames


class Stale(Exception):
    """A partial transcript that waited past --stale-s."""


class Gate:
    """One transcription at a time; the next is the most urgent waiting one: a whole utterance
    before a partial, then the shorter audio (in 2 s steps), then the one that came first."""

    def __init__(self):
        self.cv = threading.Condition()
        self.busy = False
        self.waiting = []
        self.order = itertools.count()

    @contextlib.contextmanager
    def turn(self, low, seconds, stale_s):
        key = (1 if low else 0, int(seconds // 2), next(self.order))
        deadline = time.monotonic() + stale_s
        with self.cv:
            heapq.heappush(self.waiting, key)
            while self.busy or self.waiting[0] != key:
                left = deadline - time.monotonic()
                if low and left <= 0:
                    self.waiting.remove(key)
                    heapq.heapify(self.waiting)
                    self.cv.notify_all()
                    raise Stale("a partial transcript waited too long: skipped")
                self.cv.wait(timeout=left if low else None)
            heapq.heappop(self.waiting)
            self.busy = True
        try:
            yield
        finally:
            with self.cv:
                self.busy = False
                self.cv.notify_all()


def fit_window(frames, margin_frames, min_frames):
    """The encoder window for `frames` of mel features: the audio plus a margin, at least the
    minimum, whole seconds, at most Whisper's 30 s."""
    want = max(frames + margin_frames, min_frames)
    return min(FULL_WINDOW, -(-want // 100) * 100)


def parse_multipart(content_type, body):
    """The form's fields: name -> bytes."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    fields = {}
    if not message.is_multipart():
        return fields
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[name] = part.get_payload(decode=True) or b""
    return fields


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    default_model = os.path.join(os.path.dirname(here), ".tools", "asr", "whisper-base")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", default="127.0.0.1:8780")
    ap.add_argument("--model", default=default_model)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--window", choices=["fit", "full"], default="fit",
                    help="fit: the encoder reads the audio plus a margin; full: always 30 s")
    ap.add_argument("--margin-s", type=float, default=1.0)
    ap.add_argument("--min-window-s", type=float, default=4.0)
    ap.add_argument("--stale-s", type=float, default=1.5)
    args = ap.parse_args()

    import faster_whisper.transcribe as fw
    from faster_whisper import WhisperModel

    model = WhisperModel(args.model, device="cpu", compute_type="int8", cpu_threads=args.threads)
    gate = Gate()
    full_pad = fw.pad_or_trim

    if args.window == "fit":
        margin, minimum = int(args.margin_s * 100), int(args.min_window_s * 100)

        def fitted(array, length=FULL_WINDOW, *, axis=-1):
            # faster-whisper pads every segment to 30 s here; an utterance is one segment.
            return full_pad(array, min(length, fit_window(array.shape[axis], margin, minimum)), axis=axis)

        fw.pad_or_trim = fitted

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def reply(self, status, payload):
            data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def error(self, status, message):
            self.reply(status, {"error": {"message": message, "type": "invalid_request_error"}})

        def do_GET(self):
            if self.path == "/health":
                self.reply(200, {"status": "ok", "model": os.path.basename(args.model)})
            else:
                self.error(404, "not found")

        def do_POST(self):
            if self.path.split("?")[0] != "/v1/audio/transcriptions":
                self.error(404, "not found")
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length <= 0 or length > MAX_BODY:
                self.error(413, f"the body must be 1..{MAX_BODY} bytes")
                return
            body = self.rfile.read(length)
            fields = parse_multipart(self.headers.get("Content-Type", ""), body)
            audio = fields.get("file")
            if not audio:
                self.error(400, "no `file` field")
                return
            language = (fields.get("language") or b"").decode("utf-8", "replace").strip() or None
            prompt = (fields.get("prompt") or b"").decode("utf-8", "replace").strip() or None
            low = (self.headers.get("X-Avatar-Edge-Priority") or "").strip().lower() == "low"
            seconds = max(0, len(audio) - 44) / 32000.0  # 16 kHz 16-bit mono, as the worker sends
            started = time.monotonic()
            try:
                with gate.turn(low, seconds, args.stale_s):
                    began = time.monotonic()
                    segments, info = model.transcribe(
                        io.BytesIO(audio),
                        beam_size=1,
                        language=language,
                        temperature=0.0,
                        condition_on_previous_text=False,
                        without_timestamps=True,
                        vad_filter=False,
                        initial_prompt=prompt,
                        # Small Whisper models can loop on one syllable ("天天天…") for seconds.
                        repetition_penalty=1.3,
                        no_repeat_ngram_size=3,
                    )
                    text = "".join(s.text for s in segments).strip()
            except Stale as e:
                self.error(503, str(e))
                return
            except Exception as e:  # a bad file: tell the client, keep serving
                self.error(400, f"could not transcribe: {e}")
                return
            took = time.monotonic() - began
            waited = began - started
            kind = "partial" if low else "whole"
            print(f"asr-server: {kind} {info.language} {seconds:.1f}s of audio in {took:.2f}s "
                  f"(waited {waited:.2f}s) {text!r}", file=sys.stderr, flush=True)
            self.reply(200, {"text": text, "language": info.language, "duration": info.duration})

        def log_message(self, *_):
            pass

    host, port = args.listen.rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), Handler)
    print(f"asr-server: listening on http://{host}:{port}/v1 ({args.model})", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
