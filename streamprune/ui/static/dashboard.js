// streamprune dashboard: renders the JSON states pushed on /events (polling /state.json as a fallback).
"use strict";

const POLL_MS = 1000; // fallback polling period while the event stream is down or silent
const STALE_MS = 2500; // no event for this long: poll instead
const KEPT_COLOR = "#39ff14";
const KV_COLOR = "#4ea1ff";

const $ = (id) => document.getElementById(id);

// ---- formatting ----------------------------------------------------------------------------------------

const int = (v) => Math.round(v).toLocaleString("en-US");
const pct = (part, whole) => (whole > 0 ? ((100 * part) / whole).toFixed(1) + "%" : "–");

// Value formatters return [number, unit]; the unit is set in smaller type.
const count = (v) => [int(v), ""];
const fixed = (digits, unit) => (v) => [v.toFixed(digits), unit];

function bytes(v) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return [i === 0 ? String(v) : v.toFixed(v < 10 ? 2 : 1), units[i]];
}

function clock(seconds) {
  const m = Math.floor(seconds / 60);
  const s = seconds - 60 * m;
  return String(m).padStart(2, "0") + ":" + s.toFixed(1).padStart(4, "0");
}

// Known counters, in display order: label, value format, optional sub-line computed from all stats.
const KNOWN = {
  frames_in: { label: "Frames in", fmt: count },
  frames_skipped: { label: "Skipped", fmt: count, sub: (s) => pct(s.frames_skipped, s.frames_in) + " of frames in" },
  frames_encoded: { label: "Encoded", fmt: count, sub: (s) => pct(s.frames_encoded, s.frames_in) + " of frames in" },
  tokens_encoded: {
    label: "Tokens encoded", fmt: count,
    sub: (s) => (s.frames_encoded > 0 ? int(s.tokens_encoded / s.frames_encoded) + " per frame" : ""),
  },
  tokens_kept: { label: "Tokens kept", fmt: count, sub: (s) => pct(s.tokens_kept, s.tokens_encoded) + " of encoded" },
  patches_computed: {
    label: "Patches computed", fmt: count,
    sub: (s) => pct(s.patches_computed, s.patches_total) + " of encoded frames' patches",
  },
  segments: { label: "Segments", fmt: count },
  kv_tokens: { label: "KV tokens", fmt: count },
  kv_bytes: { label: "KV cache", fmt: bytes },
  stream_time_s: { label: "Stream time", fmt: (v) => [clock(v), ""] },
  fps: { label: "Throughput", fmt: fixed(1, "fps") },
  ms_per_frame: { label: "Latency", fmt: fixed(1, "ms/frame") },
};
const SHOWN_ELSEWHERE = new Set(["answer", "source", "patches_total"]);

function genericLabel(key) {
  const words = key.replace(/_/g, " ");
  return words.charAt(0).toUpperCase() + words.slice(1);
}

// Unknown keys: the unit is guessed from the name's suffix, otherwise the value's type decides.
function genericFormat(key, v) {
  if (typeof v === "number") {
    if (key.endsWith("_bytes")) return bytes(v);
    if (key.endsWith("_ms")) return fixed(1, "ms")(v);
    if (key.endsWith("_s")) return fixed(2, "s")(v);
    return [Number.isInteger(v) ? int(v) : v.toPrecision(4), ""];
  }
  if (v === null || v === undefined) return ["–", ""];
  return [typeof v === "object" ? JSON.stringify(v) : String(v), ""];
}

// ---- counters ------------------------------------------------------------------------------------------

function card(key, label) {
  let el = $("card-" + key);
  if (!el) {
    el = document.createElement("div");
    el.className = "card";
    el.id = "card-" + key;
    el.innerHTML =
      '<div class="label"></div><div class="value"><span class="num"></span><span class="unit"></span></div>' +
      '<div class="sub"></div>';
    el.querySelector(".label").textContent = label;
    el.querySelector(".num").id = "stat-" + key;
    $("cards").appendChild(el);
  }
  return el;
}

function renderStats(stats) {
  const keys = Object.keys(KNOWN).filter((k) => k in stats)
    .concat(Object.keys(stats).filter((k) => !(k in KNOWN) && !SHOWN_ELSEWHERE.has(k)));
  keys.forEach((key) => {
    const v = stats[key];
    const known = KNOWN[key];
    const el = card(key, known ? known.label : genericLabel(key));
    const [value, unit] = known && typeof v === "number" ? known.fmt(v) : genericFormat(key, v);
    el.classList.toggle("text", typeof v !== "number");
    el.querySelector(".num").textContent = value;
    el.querySelector(".unit").textContent = unit;
    el.querySelector(".value").title = unit ? value + " " + unit : value;
    el.querySelector(".sub").textContent = known && known.sub && typeof v === "number" ? known.sub(stats) : "";
  });
  // Cards are appended as keys first appear; keep them in the order computed above.
  keys.forEach((key) => $("cards").appendChild($("card-" + key)));

  $("source").textContent = stats.source || "no source yet";
  $("clock").textContent = typeof stats.stream_time_s === "number" ? clock(stats.stream_time_s) : "--:--";
  const answer = $("answer");
  const hasAnswer = typeof stats.answer === "string" && stats.answer.length > 0;
  answer.textContent = hasAnswer ? stats.answer : "no answer yet";
  answer.classList.toggle("muted", !hasAnswer);
}

// ---- frame + kept-token overlay ------------------------------------------------------------------------

let latest = null; // the newest state received
let shown = null; // {seq, w, h, kept} of the frame in the <img>
let loading = false;

// The X-Kept header ("GHxGW:" + 0/1 cells, row-major) in the same shape as a state's `kept`.
function parseKept(header) {
  if (!header) return null;
  const [size, cells] = header.split(":");
  const [gh, gw] = size.split("x").map(Number);
  const rows = [];
  for (let r = 0; r < gh; r += 1) rows.push(cells.slice(r * gw, (r + 1) * gw));
  return { gh, gw, rows };
}

// The latest frame as a decoded <img>, with the seq and kept mask the server sent along with it: the
// server always serves its newest frame, which may be newer than the state that asked for it.
async function loadFrame(seq) {
  const response = await fetch("/frame.jpg?seq=" + seq, { cache: "no-store" });
  if (!response.ok) throw new Error("frame.jpg: HTTP " + response.status);
  const img = new Image();
  img.src = URL.createObjectURL(await response.blob());
  await img.decode();
  const headers = response.headers;
  return { img, seq: Number(headers.get("X-Frame-Seq")), kept: parseKept(headers.get("X-Kept")) };
}

function showFrame(img, seq) {
  const old = $("frame");
  img.id = "frame";
  img.alt = old.alt;
  img.dataset.seq = seq;
  old.replaceWith(img); // swap in the decoded image: no flash, no second request
  if (old.src.startsWith("blob:")) URL.revokeObjectURL(old.src);
  $("frame-wrap").style.display = "block";
  $("no-frame").style.display = "none";
}

// Fetch a frame only when the previous one is shown, so fast streams never pile up requests.
function syncFrame() {
  if (!latest || !latest.frame || loading) return;
  if (shown && shown.seq === latest.frame.seq) {
    shown.kept = latest.kept; // a mask-only update of the frame shown
    drawOverlay();
    return;
  }
  const want = latest.frame;
  loading = true;
  loadFrame(want.seq)
    .then(({ img, seq, kept }) => {
      showFrame(img, seq);
      shown = { seq, w: want.w, h: want.h, kept };
      layoutFrame();
    })
    .catch(() => new Promise((resolve) => setTimeout(resolve, POLL_MS)))
    .finally(() => {
      loading = false;
      syncFrame();
    });
}

// Fit the frame into its box, keeping its aspect ratio (small frames are scaled up).
function layoutFrame() {
  if (!shown) return;
  const box = $("frame-box");
  const scale = Math.min(box.clientWidth / shown.w, box.clientHeight / shown.h);
  const wrap = $("frame-wrap");
  wrap.style.width = Math.floor(shown.w * scale) + "px";
  wrap.style.height = Math.floor(shown.h * scale) + "px";
  drawOverlay();
}

function sizeCanvas(canvas) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth;
  const h = canvas.clientHeight;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  return { ctx, w, h };
}

// Kept cells outlined in bright green, the others dimmed.
function drawOverlay() {
  const { ctx, w, h } = sizeCanvas($("overlay"));
  ctx.clearRect(0, 0, w, h);
  const kept = shown && shown.kept;
  let info = shown ? shown.w + "×" + shown.h : "no frame yet";
  if (kept) {
    const cw = w / kept.gw;
    const ch = h / kept.gh;
    let count = 0;
    ctx.fillStyle = "rgba(6, 8, 12, 0.62)";
    ctx.strokeStyle = KEPT_COLOR;
    ctx.lineWidth = 2;
    kept.rows.forEach((row, r) => {
      for (let c = 0; c < kept.gw; c += 1) {
        const x = Math.round(c * cw);
        const y = Math.round(r * ch);
        const cellW = Math.round((c + 1) * cw) - x;
        const cellH = Math.round((r + 1) * ch) - y;
        if (row[c] === "1") {
          count += 1;
          ctx.strokeRect(x + 1.5, y + 1.5, cellW - 3, cellH - 3);
        } else {
          ctx.fillRect(x, y, cellW, cellH);
        }
      }
    });
    const total = kept.gw * kept.gh;
    info += ` · kept ${count} / ${total} tokens (${pct(count, total)}) on a ${kept.gw}×${kept.gh} grid`;
  }
  $("frame-info").textContent = info;
}

// ---- chart ---------------------------------------------------------------------------------------------

// One series on its own y-scale; null points break the line.
function drawSeries(ctx, points, x, y, color) {
  ctx.strokeStyle = color;
  ctx.lineWidth = 2;
  ctx.beginPath();
  let pen = false;
  points.forEach((v, i) => {
    if (v === null) {
      pen = false;
      return;
    }
    if (pen) ctx.lineTo(x(i), y(v));
    else ctx.moveTo(x(i), y(v));
    pen = true;
  });
  ctx.stroke();
}

// The smallest "round" axis maximum (4 ticks of 1, 2, 2.5 or 5 × 10^k) that fits every value.
function niceMax(values) {
  const tick = Math.max(1, ...values.filter((v) => v !== null)) / 4;
  const power = Math.pow(10, Math.floor(Math.log10(tick)));
  const step = [1, 2, 2.5, 5, 10].find((m) => m * power >= tick) * power;
  return 4 * step;
}

const tickLabel = (v) => (Number.isInteger(v) ? int(v) : v.toFixed(1));

function drawChart() {
  const { ctx, w, h } = sizeCanvas($("chart"));
  ctx.clearRect(0, 0, w, h);
  const history = (latest && latest.history) || [];
  const pad = { l: 52, r: 64, t: 8, b: 18 };
  const pw = w - pad.l - pad.r;
  const ph = h - pad.t - pad.b;
  const kept = history.map((p) => p.kept);
  const kv = history.map((p) => p.kv);
  const keptMax = niceMax(kept);
  const kvMax = niceMax(kv);
  const n = Math.max(history.length - 1, 1);
  const x = (i) => pad.l + (pw * i) / n;

  ctx.font = "11px 'Liberation Sans', sans-serif";
  ctx.textBaseline = "middle";
  for (let k = 0; k <= 4; k += 1) {
    const yy = pad.t + ph - (ph * k) / 4;
    ctx.strokeStyle = "#252b36";
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(pad.l, Math.round(yy) + 0.5);
    ctx.lineTo(pad.l + pw, Math.round(yy) + 0.5);
    ctx.stroke();
    ctx.fillStyle = KEPT_COLOR;
    ctx.textAlign = "right";
    ctx.fillText(tickLabel((keptMax * k) / 4), pad.l - 8, yy);
    ctx.fillStyle = KV_COLOR;
    ctx.textAlign = "left";
    ctx.fillText(tickLabel((kvMax * k) / 4), pad.l + pw + 8, yy);
  }
  if (history.length === 0) {
    ctx.fillStyle = "#8a93a6";
    ctx.textAlign = "center";
    ctx.fillText("waiting for updates…", pad.l + pw / 2, pad.t + ph / 2);
    return;
  }
  ctx.fillStyle = "#8a93a6";
  ctx.textAlign = "left";
  ctx.fillText("update #" + history[0].seq, pad.l, h - 7);
  ctx.textAlign = "right";
  ctx.fillText("#" + history[history.length - 1].seq, pad.l + pw, h - 7);
  drawSeries(ctx, kv, x, (v) => pad.t + ph - (ph * v) / kvMax, KV_COLOR);
  drawSeries(ctx, kept, x, (v) => pad.t + ph - (ph * v) / keptMax, KEPT_COLOR);
}

// ---- transport -----------------------------------------------------------------------------------------

let lastEventAt = 0;

// `via` ("sse" or "poll") is recorded on <body data-transport> to show how the page is being fed.
function render(state, via) {
  if (latest && state.seq <= latest.seq) return; // an older state from the other transport
  latest = state;
  document.body.dataset.transport = via;
  if (state.title) document.title = state.title + " · " + int(state.stats.frames_in || 0) + " frames";
  renderStats(state.stats || {});
  drawChart();
  syncFrame();
}

function setConn(kind, text) {
  const el = $("conn");
  el.className = "conn " + kind;
  el.textContent = text;
}

function connect() {
  const events = new EventSource("/events");
  events.onopen = () => setConn("live", "live");
  events.onmessage = (msg) => {
    lastEventAt = Date.now();
    setConn("live", "live");
    render(JSON.parse(msg.data), "sse");
  };
  events.onerror = () => setConn("polling", "reconnecting…");
}

// Fallback: while the stream is silent (down, or buffered by a proxy), poll the same state.
async function poll() {
  if (Date.now() - lastEventAt < STALE_MS) return;
  try {
    const response = await fetch("/state.json", { cache: "no-store" });
    render(await response.json(), "poll");
  } catch (err) {
    setConn("offline", "offline");
  }
}

window.addEventListener("resize", () => {
  layoutFrame();
  drawChart();
});
drawChart();
connect();
poll();
setInterval(poll, POLL_MS);
