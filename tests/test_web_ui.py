"""The live web dashboard: HTTP endpoints, the SSE stream, and the page as headless Chromium renders it.

Chromium is driven over the DevTools protocol on a pipe rather than with `--screenshot`/`--dump-dom`: those
only wait for the page's load event, and `--virtual-time-budget` never expires while the page holds its
EventSource open (virtual time pauses while any fetch is pending), so the test waits on the page's real state.
"""

from __future__ import annotations

import base64
import fcntl
import http.client
import io
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from streamprune.ui import WebDashboard

ENSURE_CHROMIUM = Path(__file__).resolve().parents[1] / "scripts" / "ensure_chromium.sh"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
)
VIEWPORT = (1280, 900)
GRID = (14, 14)
FRAME_H, FRAME_W = 240, 320
KEPT_GREEN = (57, 255, 20)  # the page's outline colour for kept cells (#39ff14)


# ---- synthetic engine output ------------------------------------------------------------------------------


def stats_at(i: int) -> dict[str, Any]:
    """Counters after update i: every key the engine sends, plus one the page does not know."""
    return {
        "frames_in": 4 * i,
        "frames_skipped": 3 * i,
        "frames_encoded": i,
        "tokens_encoded": 196 * i,
        "tokens_kept": int(mask_at(i).sum()) * i,
        "kv_tokens": 30 * i + 100,
        "kv_bytes": 1_234_567 * i,
        "segments": i // 5,
        "fps": 24.8,
        "ms_per_frame": 12.3,
        "answer": f"A grey box slides to the right (answer #{i}).",
        "source": "synthetic:moving-box",
        "stream_time_s": 0.25 * i,
        "queue_depth": i % 3,
    }


def mask_at(i: int) -> np.ndarray:
    """A known, asymmetric kept pattern (diagonal stripes plus a block), shifted one column per update."""
    r, c = np.indices(GRID)
    base = ((r + 2 * c) % 5 == 0) | ((r >= 2) & (r < 6) & (c >= 8) & (c < 12))
    return np.roll(base, i, axis=1)


def frame_at(i: int) -> np.ndarray:
    """A red/blue gradient with a moving grey box; green stays low so only the overlay is bright green."""
    y, x = np.indices((FRAME_H, FRAME_W))
    frame = np.stack([x * 255 // FRAME_W, np.full_like(x, 40), y * 255 // FRAME_H], axis=-1).astype(np.uint8)
    left = (8 * i) % (FRAME_W - 60)
    frame[90:150, left : left + 60] = 170
    return frame


def feed(dash: WebDashboard, first: int, last: int, interval: float) -> threading.Thread:
    """Send updates first..last from a thread, as the engine would."""

    def run() -> None:
        for i in range(first, last + 1):
            dash.update(stats_at(i), frame_at(i), mask_at(i))
            time.sleep(interval)

    thread = threading.Thread(target=run, name="test-feeder")
    thread.start()
    return thread


# ---- HTTP helpers -----------------------------------------------------------------------------------------


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def read_events(response: Any, until_seq: int) -> list[dict]:
    """Read SSE `data:` events until one with seq >= until_seq (the socket timeout bounds the wait)."""
    events: list[dict] = []
    while not events or events[-1]["seq"] < until_seq:
        line = response.readline()
        assert line, "event stream closed early"
        if line.startswith(b"data: "):
            events.append(json.loads(line[len(b"data: ") :]))
    return events


def open_stream(url: str) -> Any:
    response = urllib.request.urlopen(url + "events", timeout=5)
    assert response.headers["Content-Type"] == "text/event-stream"
    return response


@pytest.fixture
def dashboard() -> Iterator[WebDashboard]:
    dash = WebDashboard(title="streamprune test")
    dash.start()
    try:
        yield dash
    finally:
        dash.stop()


# ---- endpoints --------------------------------------------------------------------------------------------


def test_stats_json_returns_latest_counters(dashboard: WebDashboard) -> None:
    assert get(dashboard.url + "stats.json")[2] == b"{}"
    feed(dashboard, 1, 30, 0.002).join()
    status, headers, body = get(dashboard.url + "stats.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == stats_at(30)


def kept_header(mask: np.ndarray) -> str:
    return "14x14:" + "".join("1" if v else "0" for v in mask.ravel())


def test_frame_jpg_serves_the_latest_frame_with_its_mask(dashboard: WebDashboard) -> None:
    assert get(dashboard.url + "frame.jpg")[0] == 404
    feed(dashboard, 1, 3, 0).join()
    status, headers, body = get(dashboard.url + "frame.jpg?seq=1")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert headers["X-Frame-Seq"] == "3" and headers["X-Kept"] == kept_header(mask_at(3))
    image = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), np.int16)
    assert image.shape == (FRAME_H, FRAME_W, 3)
    assert np.abs(image - frame_at(3)).mean() < 4  # JPEG at modest quality, same picture

    dashboard.update(stats_at(4), kept=mask_at(4))  # a new mask for the frame already shown
    headers = get(dashboard.url + "frame.jpg")[1]
    assert headers["X-Frame-Seq"] == "3" and headers["X-Kept"] == kept_header(mask_at(4))
    state = json.loads(get(dashboard.url + "state.json")[2])
    assert (state["seq"], state["frame"]["seq"]) == (4, 3)
    assert "".join(state["kept"]["rows"]) == kept_header(mask_at(4)).partition(":")[2]


def test_page_and_assets_are_self_contained(dashboard: WebDashboard) -> None:
    status, headers, html = get(dashboard.url)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"<title>streamprune test</title>" in html
    for asset in (b"/static/dashboard.css", b"/static/dashboard.js"):
        assert asset in html
        assert get(dashboard.url + asset.decode().lstrip("/"))[0] == 200
    assert b"http://" not in html and b"https://" not in html  # offline: nothing external
    assert get(dashboard.url + "nope")[0] == 404


def test_events_stream_json_states_throttled(dashboard: WebDashboard) -> None:
    with open_stream(dashboard.url) as stream:
        assert read_events(stream, 0)[0]["seq"] == 0  # the current state right away
        start = time.monotonic()
        feeder = feed(dashboard, 1, 30, 0.01)
        events = read_events(stream, 30)
        elapsed = time.monotonic() - start
        feeder.join()
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs)) and seqs[-1] == 30
    assert len(events) <= 10 * elapsed + 2  # at most ~10 pushes a second: updates coalesce
    for event in events:
        assert event["stats"] == stats_at(event["seq"])
        assert event["frame"] == {"seq": event["seq"], "h": FRAME_H, "w": FRAME_W}
        rows = ["".join("1" if v else "0" for v in row) for row in mask_at(event["seq"])]
        assert event["kept"] == {"gh": 14, "gw": 14, "rows": rows}
    assert [p["kept"] for p in events[-1]["history"]] == [int(mask_at(i).sum()) for i in range(1, 31)]


def test_several_clients_and_dead_clients(dashboard: WebDashboard) -> None:
    dead = []
    for _ in range(3):  # clients that connect, then vanish with a reset
        sock = socket.create_connection(("127.0.0.1", dashboard.port), timeout=5)
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
        dead.append(sock)
    stalled = socket.create_connection(("127.0.0.1", dashboard.port), timeout=5)  # connects, never reads
    stalled.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
    for sock in dead:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    streams = [open_stream(dashboard.url) for _ in range(3)]
    try:
        start = time.monotonic()
        feed(dashboard, 1, 20, 0.01).join()
        assert time.monotonic() - start < 2.0  # update() never waits on clients
        for stream in streams:
            assert read_events(stream, 20)[-1]["stats"] == stats_at(20)
        assert json.loads(get(dashboard.url + "stats.json")[2]) == stats_at(20)
    finally:
        for stream in streams:
            stream.close()
        stalled.close()


def test_stop_closes_everything_and_is_idempotent() -> None:
    with WebDashboard() as dash:
        url, port = dash.url, dash.port
        assert url == f"http://127.0.0.1:{port}/" and port > 0
        stream = open_stream(url)
        idle = http.client.HTTPConnection("127.0.0.1", port, timeout=5)  # kept alive, then idle
        idle.request("GET", "/stats.json")
        assert idle.getresponse().read() == b"{}"
        start = time.monotonic()
    assert time.monotonic() - start < 2.0  # open connections do not hold up stop()
    assert stream.read().startswith(b"retry: 1000\n")  # read() returns: the stream was ended
    assert idle.sock is not None and idle.sock.recv(1) == b""  # closed by the server, not left to time out
    stream.close()
    idle.close()
    dash.stop()
    assert not [t for t in threading.enumerate() if t.name == "streamprune-web"]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_update_rejects_malformed_arrays() -> None:
    dash = WebDashboard()
    with pytest.raises(ValueError, match="frame"):
        dash.update({}, np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="frame"):
        dash.update({}, np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="kept"):
        dash.update({}, kept=np.zeros(14, bool))
    with pytest.raises(ValueError, match="before any frame"):
        dash.update({}, kept=np.zeros(GRID, bool))


# ---- the page in headless Chromium ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium_binary() -> str:
    """Chromium's path, installed with scripts/ensure_chromium.sh if missing; a failed install fails the test."""
    found = shutil.which("chromium") or shutil.which("chromium", path="/usr/bin")
    if found is None:
        result = subprocess.run(["bash", str(ENSURE_CHROMIUM)], capture_output=True, text=True, timeout=900)
        found = shutil.which("chromium")
        if found is None:
            pytest.fail(
                f"chromium is missing and {ENSURE_CHROMIUM.name} could not install it:\n"
                f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
            )
    return found


def _pipe() -> tuple[int, int]:
    """A pipe whose ends sit at fd >= 10, so the child can move them onto 3 and 4 without clobbering."""
    ends = []
    for fd in os.pipe():
        ends.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10))
        os.close(fd)
    return ends[0], ends[1]


class Chromium:
    """Headless Chromium over `--remote-debugging-pipe`: it reads DevTools commands on fd 3 and writes
    replies and events on fd 4, each one JSON message ended by a NUL byte."""

    def __init__(self, binary: str, profile: Path, log: Path) -> None:
        child_in, self._commands = _pipe()
        self._replies, child_out = _pipe()
        args = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe"]
        with log.open("wb") as log_file:
            self.proc = subprocess.Popen(
                ["bash", "-c", f'exec "$@" 3<&{child_in} 4>&{child_out}', "bash", *args],
                pass_fds=(child_in, child_out),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
            )
        os.close(child_in)
        os.close(child_out)
        self._buffer, self._last_id = b"", 0
        try:
            self._session = self._open_page()
        except BaseException:
            self.close()  # never leave a browser behind
            raise

    def _open_page(self) -> str:
        """A new tab of VIEWPORT size at 1 device pixel per CSS pixel; returns its session id."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        width, height = VIEWPORT
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        self.call("Emulation.setDeviceMetricsOverride", metrics, session)
        return session

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send one command and return its result; events in between are skipped."""
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 15
        while (reply := self._receive(deadline)).get("id") != self._last_id:
            pass
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._replies], [], [], remaining)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._replies, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium exited")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def page(self, method: str, params: dict | None = None) -> dict:
        return self.call(method, params, self._session)

    def evaluate(self, expression: str) -> Any:
        reply = self.page("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        """Poll a JS expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            assert time.monotonic() < deadline, f"timed out waiting for: {expression}"
            time.sleep(0.05)
        return value

    def screenshot(self, path: Path) -> np.ndarray:
        path.write_bytes(base64.b64decode(self.page("Page.captureScreenshot", {"format": "png"})["data"]))
        return np.asarray(Image.open(path).convert("RGB"))

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass  # it may exit before answering
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._commands)
        os.close(self._replies)


def text_of(element_id: str) -> str:
    return f"document.getElementById({element_id!r})?.textContent"


def kept_cells_seen(shot: np.ndarray, rect: dict[str, float]) -> np.ndarray:
    """Which grid cells of the frame area carry a bright green outline in the screenshot."""
    green = np.all(np.abs(shot.astype(np.int16) - KEPT_GREEN) < 40, axis=-1)
    gh, gw = GRID
    seen = np.zeros(GRID, bool)
    for r in range(gh):
        for c in range(gw):
            top, bottom = (round(rect["y"] + k * rect["height"] / gh) for k in (r, r + 1))
            left, right = (round(rect["x"] + k * rect["width"] / gw) for k in (c, c + 1))
            cell = green[top:bottom, left:right]
            seen[r, c] = cell.sum() > 3 * min(cell.shape)  # an outline: ~4 sides, 2 px thick
    return seen


def test_page_in_headless_chromium(chromium_binary: str, dashboard: WebDashboard, tmp_path: Path) -> None:
    feed(dashboard, 1, 30, 0.005).join()
    browser = Chromium(chromium_binary, tmp_path / "profile", tmp_path / "chromium.log")
    try:
        browser.page("Page.navigate", {"url": dashboard.url})
        browser.wait_for(f"{text_of('stat-frames_in')} === '120'")  # the latest state, not the placeholder
        # Live: new updates reach the open page through the event stream.
        feed(dashboard, 31, 40, 0.05).join()
        browser.wait_for(f"{text_of('stat-frames_in')} === '160'")
        browser.wait_for("document.getElementById('frame').dataset.seq === '40'")
        browser.wait_for(f"{text_of('frame-info')}.includes('kept {int(mask_at(40).sum())} / 196')")
        assert browser.evaluate("document.body.dataset.transport") == "sse"
        assert browser.evaluate(text_of("conn")) == "live"

        dom = browser.evaluate("document.documentElement.outerHTML")
        assert 'id="stat-frames_in">160<' in dom
        assert 'id="stat-kv_bytes">47.1</span><span class="unit">MiB' in dom  # 1_234_567 * 40 bytes
        assert browser.evaluate(text_of("answer")) == stats_at(40)["answer"]
        assert browser.evaluate(text_of("source")) == "synthetic:moving-box"
        assert browser.evaluate(text_of("stat-queue_depth")) == "1"  # unknown keys get a generic card

        rect = browser.evaluate("document.getElementById('frame-wrap').getBoundingClientRect().toJSON()")
        shot = browser.screenshot(tmp_path / "dashboard.png")
    finally:
        browser.close()
    print(f"screenshot: {tmp_path / 'dashboard.png'}")

    assert shot.shape == (VIEWPORT[1], VIEWPORT[0], 3)
    assert shot.std() > 20  # not blank
    assert rect["width"] > 2 * FRAME_W  # the frame is shown large (scaled up)
    np.testing.assert_array_equal(kept_cells_seen(shot, rect), mask_at(40))
