#!/usr/bin/env python3
"""The demo's offline speech recognition: an OpenAI-compatible transcription server.

    POST /v1/audio/transcriptions   multipart/form-data: file (WAV), model, language, prompt, response_format
                                    -> {"text": "..."}
    GET  /health                    -> {"status": "ok", "model": "..."}

It runs Whisper (faster-whisper on CTranslate2, int8 on the CPU) with the multilingual Whisper base
model that scripts/install-deps puts in .tools/asr/whisper-base. The worker's `[talk.asr]` speaks the
same protocol to whisper.cpp's server, faster-whisper servers, vLLM or a hosted API; this one is the
stand-in that needs no network and no GPU. It binds loopback only.

Usage: asr-server.py [--listen 127.0.0.1:8780] [--model DIR] [--threads 2]
"""

import argparse
import email.parser
import email.policy
import io
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 16 * 1024 * 1024  # 16 MiB: over 8 minutes of 16 kHz 16-bit mono


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
    args = ap.parse_args()

    from faster_whisper import WhisperModel

    model = WhisperModel(args.model, device="cpu", compute_type="int8", cpu_threads=args.threads)
    lock = threading.Lock()  # one transcription at a time: the model's threads are the limit

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
            started = time.monotonic()
            try:
                with lock:
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
            except Exception as e:  # a bad file: tell the client, keep serving
                self.error(400, f"could not transcribe: {e}")
                return
            took = time.monotonic() - started
            print(f"asr-server: {info.language} {took:.2f}s {text!r}", file=sys.stderr, flush=True)
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
