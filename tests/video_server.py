"""A local HTTP server for network-stream tests: serves one video on 127.0.0.1 with byte ranges, in
small slow chunks, and can be made to fail mid-transfer."""

from __future__ import annotations

import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = 2048
"""Bytes per write of the test server."""

CHUNK_DELAY_S = 0.002
"""Pause between writes: a slow transfer that is still under way when it gets cut."""


class VideoServer(ThreadingHTTPServer):
    """Serves one video on 127.0.0.1 like a real web server (byte ranges), in small slow chunks.

    Optionally a response that reaches absolute byte `cut_at` (not one the client hung up on before)
    is cut there by `fault`: "kill" aborts it and stops the server, so reconnecting is refused;
    "drop" aborts only the first such response; "stall" makes the first such response go silent,
    holding its connection open until `stop()`.
    """

    daemon_threads = True

    def __init__(self, data: bytes, cut_at: int | None = None, fault: str | None = None) -> None:
        super().__init__(("127.0.0.1", 0), VideoHandler)
        self.data, self.cut_at, self.fault = data, cut_at, fault
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def take_fault(self) -> str | None:
        with self._lock:
            fault = self.fault
            if fault != "kill":
                self.fault = None
            return fault

    def stop(self) -> None:
        """Stop listening and release stalled responses. Idempotent."""
        self.stopped.set()
        self.shutdown()
        self.server_close()


class VideoHandler(BaseHTTPRequestHandler):
    server: VideoServer

    def log_message(self, *args: object) -> None:
        pass  # keep pytest's output clean

    def do_GET(self) -> None:
        data, cut_at = self.server.data, self.server.cut_at
        match = re.fullmatch(r"bytes=(\d+)-\d*", self.headers.get("Range", ""))
        start = int(match.group(1)) if match else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        try:
            if cut_at is not None and start < cut_at < len(data):
                self._send(start, cut_at)
                if self._misbehave():
                    return
                start = cut_at
            self._send(start, len(data))
        except OSError:
            pass  # the client hung up: FFmpeg drops connections after probing and when seeking

    def _send(self, start: int, end: int) -> None:
        for offset in range(start, end, CHUNK):
            self.wfile.write(self.server.data[offset : min(offset + CHUNK, end)])
            time.sleep(CHUNK_DELAY_S)

    def _misbehave(self) -> bool:
        """Apply the server's fault to this response, which has reached `cut_at`; False if none is left."""
        fault = self.server.take_fault()
        if fault == "stall":
            self.server.stopped.wait()
        elif fault == "kill":
            self.server.stop()  # before the abort: the reconnection must find nothing listening
        if fault:
            self.connection.shutdown(socket.SHUT_RDWR)
        return fault is not None
