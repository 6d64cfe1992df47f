"""A live web dashboard for the streaming engine: counters, the current frame with its kept-token grid, a chart.

The engine calls `WebDashboard.update(stats, frame, kept)` from its own thread; a `ThreadingHTTPServer` in a
daemon thread serves the page and pushes each new state to every open tab by Server-Sent Events.

Endpoints (all GET, all on 127.0.0.1 by default):
    /            the page (static/index.html + dashboard.css + dashboard.js, no external resources)
    /events      text/event-stream, one JSON state per event, at most `MAX_PUSH_HZ` per client
    /state.json  the same JSON state as the latest event (the page's polling fallback)
    /stats.json  the latest `stats` dict as given to `update`
    /frame.jpg   the latest frame as a JPEG (`?seq=N` only busts caches; the latest frame is always served),
                 with headers X-Frame-Seq and X-Kept ("GHxGW:" + the mask's 0/1 cells, row-major), so the page
                 pairs the image with exactly its own mask however fast frames arrive

Only the latest frame is kept (as an array, JPEG-encoded lazily on the first request for it), so memory does
not grow with the stream; the chart history is a fixed-length deque.
"""

from __future__ import annotations

import html
import io
import json
import math
import socket
import threading
from collections import deque
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from types import TracebackType
from typing import Any, TextIO
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

MAX_PUSH_HZ = 10.0
HISTORY_LEN = 100
JPEG_QUALITY = 80
JPEG_MAX_SIDE = 960  # larger frames are downscaled: the overlay is drawn relative to the image size
KEEPALIVE_S = 15.0  # an idle SSE stream gets a comment line this often, which also detects dead clients
CLIENT_TIMEOUT_S = 10.0  # a client that stops reading is dropped after this long instead of pinning a thread

_STATIC = ("index.html", "dashboard.css", "dashboard.js")
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
}


@dataclass
class _Frame:
    """The latest frame: the array as given (copied), its kept mask, and its JPEG once someone asked for it."""

    seq: int
    pixels: np.ndarray
    kept: np.ndarray | None
    jpeg: bytes | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.pixels.shape[0], self.pixels.shape[1]


@dataclass
class _State:
    """Everything the page shows, guarded by `cond`'s lock; `seq` counts updates."""

    cond: threading.Condition = field(default_factory=threading.Condition)
    seq: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    frame: _Frame | None = None
    history: deque[dict[str, int | None]] = field(default_factory=lambda: deque(maxlen=HISTORY_LEN))
    payload: tuple[int, bytes] | None = None  # (seq, JSON) cache, so N clients serialize once per update


class WebDashboard:
    """Serve a live dashboard of the engine's counters, current frame and kept tokens on `host:port`.

    `port=0` picks a free ephemeral port; `start()` returns the URL. Usable as a context manager.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, title: str = "streamprune") -> None:
        self.host, self.port, self.title = host, port, title
        self._state = _State()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()  # open client connections, shut down by stop()
        self._connections_lock = threading.Lock()
        self._static: dict[str, bytes] = {}

    # ---- lifecycle --------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The page's URL; only meaningful once started."""
        return f"http://{self.host}:{self.port}/"

    def start(self) -> str:
        """Bind, start serving in a daemon thread and return the page's URL."""
        if self._server is not None:
            raise RuntimeError("WebDashboard already started")
        self._static = _load_static(self.title)
        self._stopping.clear()
        server = ThreadingHTTPServer((self.host, self.port), _make_handler(self))
        server.daemon_threads = True  # a stuck client never keeps the process alive
        self._server, self.port = server, server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="streamprune-web", daemon=True
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stop serving: end event streams, close the listening socket and every client connection, join."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        with self._state.cond:
            self._state.cond.notify_all()  # wake the SSE loops so they see _stopping
        server.shutdown()
        with self._connections_lock:
            # Unblocks handlers stuck writing to a client that stopped reading, or waiting on an idle keep-alive.
            for conn in self._connections:
                _shutdown_quietly(conn)
        server.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> WebDashboard:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- the engine's side ------------------------------------------------------------------------------

    def show(self, line: str, out: TextIO) -> None:
        """A line for the person at the console (a periodic answer; the page shows it in its counters)."""
        print(line, file=out, flush=True)

    def update(self, stats: dict, frame: np.ndarray | None = None, kept: np.ndarray | None = None) -> None:
        """Publish new counters, and optionally a new frame (uint8 [H, W, 3] RGB) and its kept mask [gh, gw].

        A new frame without `kept` is shown without overlay; `kept` without a frame replaces the mask of the
        frame already shown. Cheap and non-blocking: arrays are copied, the JPEG is only encoded when requested.
        """
        frame = _check_frame(frame) if frame is not None else None
        kept = _check_kept(kept) if kept is not None else None
        st = self._state
        with st.cond:
            if frame is None and kept is not None and st.frame is None:
                raise ValueError("kept given before any frame: there is nothing to overlay it on")
            st.seq += 1
            st.stats = {str(k): _clean(v) for k, v in stats.items()}
            if frame is not None:
                st.frame = _Frame(st.seq, frame, kept)
            elif kept is not None:  # a new object, not a mutation: handlers may be reading the old one
                st.frame = replace(st.frame, kept=kept)
            st.history.append(
                {
                    "seq": st.seq,
                    "kept": int(kept.sum()) if kept is not None else None,
                    "kv": _as_int(st.stats.get("kv_tokens")),
                }
            )
            st.cond.notify_all()

    # ---- what the handlers read -------------------------------------------------------------------------

    def _payload(self) -> tuple[int, bytes]:
        """The latest state as (seq, JSON bytes): what /events pushes and /state.json returns."""
        st = self._state
        with st.cond:
            if st.payload is None or st.payload[0] != st.seq:
                st.payload = (st.seq, _dumps(_state_dict(self.title, st)))
            return st.payload

    def _stats_json(self) -> bytes:
        with self._state.cond:
            return _dumps(self._state.stats)

    def _latest_frame(self) -> tuple[_Frame, bytes] | None:
        """The latest frame and its JPEG, encoded once; None before the first frame."""
        with self._state.cond:
            current = self._state.frame
        if current is None:
            return None
        if current.jpeg is None:  # encoded outside the lock; a race only encodes the same frame twice
            current.jpeg = _encode_jpeg(current.pixels)
        return current, current.jpeg

    def _wait_for_update(self, after_seq: int, timeout: float) -> int:
        """Block until an update newer than `after_seq`, a stop, or `timeout`; return the current seq."""
        st = self._state
        with st.cond:
            st.cond.wait_for(lambda: st.seq > after_seq or self._stopping.is_set(), timeout)
            return st.seq

    def _track(self, conn: socket.socket, is_open: bool) -> None:
        with self._connections_lock:
            if is_open:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _serve_events(self, wfile: io.BufferedIOBase) -> None:
        """Stream states to one client until it disconnects or the dashboard stops."""
        try:
            wfile.write(b"retry: 1000\n\n")  # reconnect quickly after a dropped stream
            sent = -1
            while not self._stopping.is_set():
                seq = self._wait_for_update(sent, KEEPALIVE_S)
                if self._stopping.is_set():
                    break
                if seq == sent:
                    wfile.write(b": keepalive\n\n")
                else:
                    sent, body = self._payload()
                    wfile.write(b"id: %d\ndata: %s\n\n" % (sent, body))
                wfile.flush()
                self._stopping.wait(1.0 / MAX_PUSH_HZ)  # throttle: later updates coalesce into the next push
        except OSError:  # the client went away (broken pipe, reset, timeout) or stop() shut the socket
            pass


def _make_handler(dashboard: WebDashboard) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to `dashboard` (http.server instantiates one per request)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive for the page's polling; SSE responses close at the end
        timeout = CLIENT_TIMEOUT_S
        server_version = "streamprune-web"

        def setup(self) -> None:
            super().setup()
            dashboard._track(self.connection, is_open=True)

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                dashboard._track(self.connection, is_open=False)

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            try:
                self._route(path)
            except OSError:  # client disconnected mid-response: nothing to answer
                self.close_connection = True

        def _route(self, path: str) -> None:
            if path in ("/", "/index.html"):
                self._send(dashboard._static["index.html"], _CONTENT_TYPES[".html"])
            elif path.startswith("/static/") and path[len("/static/") :] in dashboard._static:
                name = path[len("/static/") :]
                self._send(dashboard._static[name], _CONTENT_TYPES[name[name.rindex(".") :]])
            elif path == "/events":
                self._start_stream()
                dashboard._serve_events(self.wfile)
            elif path == "/state.json":
                self._send(dashboard._payload()[1], "application/json")
            elif path == "/stats.json":
                self._send(dashboard._stats_json(), "application/json")
            elif path == "/frame.jpg":
                self._send_frame()
            else:
                self.send_error(HTTPStatus.NOT_FOUND)

        def _send(self, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def _send_frame(self) -> None:
            latest = dashboard._latest_frame()
            if latest is None:
                self.send_error(HTTPStatus.NOT_FOUND, "no frame yet")
                return
            frame, jpeg = latest
            headers = {"X-Frame-Seq": str(frame.seq)}
            if frame.kept is not None:
                gh, gw = frame.kept.shape
                headers["X-Kept"] = f"{gh}x{gw}:" + "".join(_mask_rows(frame.kept))
            self._send(jpeg, "image/jpeg", headers)

        def _start_stream(self) -> None:
            self.close_connection = True  # the stream has no length: it ends when the connection does
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.flush()

        def log_message(self, format: str, *args: Any) -> None:
            """Silence per-request logging: the page polls and streams constantly."""

    return Handler


# ---- helpers ----------------------------------------------------------------------------------------------


def _load_static(title: str) -> dict[str, bytes]:
    """Read the page's files once, with the title filled into the HTML."""
    folder = resources.files("streamprune.ui") / "static"
    files = {name: (folder / name).read_bytes() for name in _STATIC}
    files["index.html"] = files["index.html"].replace(b"{{title}}", html.escape(title).encode())
    return files


def _state_dict(title: str, st: _State) -> dict[str, Any]:
    """The JSON the page renders. `kept.rows` is one '0'/'1' string per grid row, to keep events small."""
    frame = st.frame
    return {
        "title": title,
        "seq": st.seq,
        "stats": st.stats,
        "frame": None if frame is None else {"seq": frame.seq, "h": frame.shape[0], "w": frame.shape[1]},
        "kept": None if frame is None else _mask_dict(frame.kept),
        "history": list(st.history),
    }


def _mask_dict(kept: np.ndarray | None) -> dict[str, Any] | None:
    return None if kept is None else {"gh": kept.shape[0], "gw": kept.shape[1], "rows": _mask_rows(kept)}


def _mask_rows(kept: np.ndarray) -> list[str]:
    return ["".join("1" if v else "0" for v in row) for row in kept.tolist()]


def _dumps(obj: Any) -> bytes:
    """Compact JSON; values `_clean` did not cover (lists, objects) fall back to their str()."""
    return json.dumps(obj, separators=(",", ":"), default=str).encode()


def _clean(value: Any) -> Any:
    """A stats value as JSON can carry it: numpy scalars as Python numbers, NaN/inf as null."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _as_int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _check_frame(frame: np.ndarray) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frame must be uint8 [H, W, 3] RGB, got {frame.dtype} {frame.shape}")
    return frame.copy()  # the engine may reuse its buffer


def _check_kept(kept: np.ndarray) -> np.ndarray:
    kept = np.asarray(kept)
    if kept.ndim != 2:
        raise ValueError(f"kept must be a 2-D [gh, gw] mask, got shape {kept.shape}")
    return kept.astype(bool)


def _encode_jpeg(pixels: np.ndarray) -> bytes:
    image = Image.fromarray(pixels, "RGB")
    image.thumbnail((JPEG_MAX_SIDE, JPEG_MAX_SIDE))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _shutdown_quietly(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed by the client
        pass
