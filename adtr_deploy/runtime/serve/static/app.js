// adtr-run live view. Polls /api/status and the shared latest frame; no libraries, nothing from other hosts.
// Everything that comes from the run (source names, errors, model names) is shown with textContent, never as HTML.
"use strict";

const POLL_MS = 500;
// Where this page's routes are: "/" for one camera, "/cam/NAME/" for one camera of a line (lineview.py).
const BASE = location.pathname.replace(/[^/]*$/, "");
const TIMELINE_MAX = 300;
const $ = (id) => document.getElementById(id);
let since = 0;
let points = []; // [seq, time, normalized score, is_anomaly]
let frameSeq = -1;
let frameBusy = false;
let galleryKey = "";
let modelShown = false;
let modelThreshold = null;
let lastIsError = false;
let inspecting = false; // the line is OK, ALARM or DRIFT: the last decision is current, not a leftover
let lastContact = 0; // Date.now() of the last answer from the server
let lastFrameAge = null; // the last record's age (s) at that answer
// The line's states (state.py line_state) and their banner class; SERVER LOST is the page's own.
const LINE_CLASS = {
  "OK": "ok", "ALARM": "alarm", "DRIFT": "drift", "NO SIGNAL": "nosignal", "PAUSED": "paused",
  "STARTING": "starting", "FINISHED": "finished", "SERVER LOST": "lost",
};

function text(id, value) {
  $(id).textContent = value === null || value === undefined ? "–" : String(value);
}

function fmt(x, digits) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}

function showModel(model, rollout) {
  const dl = $("model");
  dl.replaceChildren();
  const swap = rollout && rollout.last_swap;
  const refused = rollout ? Object.values(rollout.refused || {}) : [];
  const rows = [
    ["model", model.name], ...(model.version ? [["version", model.version]] : []),
    ["sha256", model.sha256 ? model.sha256.slice(0, 12) : "–"],
    ["threshold", model.threshold === undefined ? "–" : Number(model.threshold).toPrecision(4)],
    ["input", model.input_size ? model.input_size.join("×") : "–"], ["backend", model.backend], ["device", model.device],
    ...(swap ? [["switched", `v${swap.from} → v${swap.to} at ${swap.time} (${swap.why})`]] : []),
    ...refused.map((r) => [`refused v${r.version}`, r.reason]),
  ];
  for (const [k, v] of rows) {
    const div = document.createElement("div");
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = k;
    dd.textContent = v === null || v === undefined ? "–" : String(v);
    if (k === "sha256" && model.sha256) dd.title = model.sha256;
    if (k === "model" || k === "switched" || k.startsWith("refused")) dd.title = String(v);
    div.append(dt, dd);
    dl.append(div);
  }
  modelShown = true;
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 10) return seconds.toFixed(1) + " s";
  if (seconds < 120) return Math.round(seconds) + " s";
  if (seconds < 7200) return Math.round(seconds / 60) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}

function clock(unix) {
  return new Date(unix * 1000).toLocaleTimeString(undefined, { hour12: false });
}

function showLine(state, detail) {
  const line = $("line");
  line.className = "line " + (LINE_CLASS[state] || "starting");
  $("line-state").textContent = state;
  $("line-detail").textContent = detail;
  const pill = $("state");
  pill.textContent = state.toLowerCase();
  pill.className = "state " + (LINE_CLASS[state] || "");
  inspecting = state === "OK" || state === "ALARM" || state === "DRIFT";
  // Not inspecting: no leftover OK/ANOMALY, and the picture is shown as old.
  $("frame").classList.toggle("stale", !inspecting);
  if (!inspecting) {
    const badge = $("decision");
    badge.textContent = "–";
    badge.className = "badge stale";
    badge.title = "no current decision: " + state;
  }
}

function lineDetail(s) {
  const line = s.line || { state: String(s.state).toUpperCase(), reason: "" };
  const src = s.source || {};
  const age = "last frame " + ago(s.last_frame_age_s) + " ago";
  if (line.state === "NO SIGNAL") {
    const down = src.outage_start ? "source down since " + clock(src.outage_start) + " (" + ago(src.outage_s) + ")" : line.reason;
    return down + " · " + age + " · " + (src.reconnects || 0) + " reconnect attempts";
  }
  if (line.state === "PAUSED") return "paused since " + clock(line.since) + " · " + age;
  if (line.state === "FINISHED") return line.reason + " · " + age;
  if (line.state === "STARTING") return line.reason;
  return age + (line.state === "ALARM" ? " · " + line.reason : "");
}

function showLost() {
  // fetch failed: the server (the whole adtr-run) is gone, or the network to it.
  const since = lastContact ? new Date(lastContact).toLocaleTimeString(undefined, { hour12: false }) : "the start";
  const silent = lastContact ? (Date.now() - lastContact) / 1000 : null;
  const frame = lastFrameAge === null ? "" : " · last frame seen " + ago(lastFrameAge + (silent || 0)) + " ago";
  showLine("SERVER LOST", "no answer from adtr-run since " + since + (silent === null ? "" : " (" + ago(silent) + ")") + frame);
}

function showLast(last) {
  if (!last) return;
  const badge = $("decision");
  badge.title = "";
  if (!inspecting) {
    badge.textContent = "–";
    badge.className = "badge stale";
  } else if (last.status !== "ok") {
    badge.textContent = "ERROR";
    badge.className = "badge bad";
  } else {
    badge.textContent = last.is_anomaly ? "ANOMALY" : "OK";
    badge.className = "badge " + (last.is_anomaly ? "bad" : "ok");
  }
  text("score", fmt(last.normalized_score, 3));
  text("raw", last.score === null ? null : Number(last.score).toPrecision(4));
  $("where").textContent = last.source + (last.frame ? " #" + last.frame : "") + (last.error ? " — " + last.error : "");
}

async function showFrame(frame) {
  // Fetched as a blob so that the record it belongs to (header X-Frame-Info) captions it, whatever came in between.
  if (!frame || frame.seq === frameSeq || frame.seq === 0 || frameBusy) return;
  frameBusy = true;
  try {
    const r = await fetch(BASE + "frame.jpg?seq=" + frame.seq, { cache: "no-store" });
    if (r.status !== 200) return;
    const info = JSON.parse(decodeURIComponent(r.headers.get("X-Frame-Info") || "null"));
    const url = URL.createObjectURL(await r.blob());
    const img = $("frame");
    const old = img.src;
    img.src = url;
    if (old && old.startsWith("blob:")) URL.revokeObjectURL(old);
    frameSeq = Number(r.headers.get("X-Frame-Seq"));
    img.dataset.seq = String(frameSeq);
    $("no-frame").hidden = true;
    if (info && !lastIsError) showLast(info);
  } catch (e) {
    // the next poll tries again
  } finally {
    frameBusy = false;
  }
}

function showGallery(gallery) {
  const key = gallery.map((g) => g.id).join(",");
  if (key === galleryKey) return;
  galleryKey = key;
  $("no-anomaly").hidden = gallery.length > 0;
  const ol = $("gallery");
  ol.replaceChildren();
  for (const g of gallery) {
    const li = document.createElement("li");
    const img = document.createElement("img");
    img.src = BASE + "gallery/" + encodeURIComponent(g.id) + ".jpg";
    img.alt = "anomaly " + g.id;
    const score = document.createElement("div");
    score.className = "bad";
    score.textContent = "score " + fmt(g.normalized_score, 3) + "  (raw " + Number(g.score).toPrecision(4) + ")";
    const when = document.createElement("div");
    when.textContent = new Date(g.time * 1000).toLocaleTimeString(undefined, { hour12: false });
    const src = document.createElement("div");
    src.className = "src";
    src.textContent = g.source + (g.frame ? " #" + g.frame : "");
    src.title = g.source;
    li.append(img, score, when, src);
    ol.append(li);
  }
}

function drawTimeline() {
  const canvas = $("timeline");
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 1200;
  const h = canvas.clientHeight || 150;
  if (canvas.width !== Math.round(w * ratio)) canvas.width = Math.round(w * ratio);
  if (canvas.height !== Math.round(h * ratio)) canvas.height = Math.round(h * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const pad = 24;
  const top = Math.max(1, ...points.map((p) => p[2])) * 1.05;
  const y = (v) => h - pad / 2 - (Math.min(Math.max(v, 0), top) / top) * (h - pad);
  const n = Math.max(points.length, 2);
  const x = (i) => pad + (i / (n - 1)) * (w - 2 * pad);
  ctx.strokeStyle = "#2c343d";
  ctx.fillStyle = "#8b96a1";
  ctx.font = "11px system-ui, sans-serif";
  for (const v of [0, 0.25, 0.75, 1]) {
    ctx.beginPath(); ctx.moveTo(pad, y(v)); ctx.lineTo(w - pad, y(v)); ctx.stroke();
    ctx.fillText(v.toFixed(2), 0, y(v) + 4);
  }
  ctx.strokeStyle = "#fab005"; // the threshold
  ctx.setLineDash([6, 4]);
  ctx.beginPath(); ctx.moveTo(pad, y(0.5)); ctx.lineTo(w - pad, y(0.5)); ctx.stroke();
  ctx.setLineDash([]);
  ctx.fillStyle = "#fab005";
  ctx.fillText("threshold", w - pad - 52, y(0.5) - 4);
  if (!points.length) return;
  ctx.strokeStyle = "#4dabf7";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  points.forEach((p, i) => (i ? ctx.lineTo(x(i), y(p[2])) : ctx.moveTo(x(i), y(p[2]))));
  ctx.stroke();
  ctx.lineWidth = 1;
  for (let i = 0; i < points.length; i++) {
    if (!points[i][3]) continue;
    ctx.fillStyle = "#f03e3e";
    ctx.beginPath(); ctx.arc(x(i), y(points[i][2]), 3, 0, 2 * Math.PI); ctx.fill();
  }
}

// The whole population of scores moved (lamp, camera, dust): say so, with what to do; the threshold stays as it is.
function showDrift(d) {
  const el = $("drift");
  if (!el) return;
  el.hidden = !(d && d.active);
  if (el.hidden) return;
  const since = d.since ? new Date(d.since * 1000).toLocaleTimeString() : "?";
  el.textContent = "DRIFT since " + since + ": the median of the last " + d.window + " scores is " +
    fmt(d.shift_sigmas, 1) + " calibration sigmas from the good mean (" + fmt(100 * d.over_threshold_fraction, 0) +
    " % above the threshold). " + (d.hint ? d.hint[0].toUpperCase() + d.hint.slice(1) + ". " : "") +
    "If the parts are good, recalibrate: POST /api/recalibrate or adtr recalibrate.";
}

function show(s) {
  lastContact = Date.now();
  lastFrameAge = s.last_frame_age_s;
  showLine(s.line ? s.line.state : String(s.state).toUpperCase(), lineDetail(s));
  showDrift(s.drift);
  // shown again when a recalibration changed the threshold or a rollout the version
  const modelKey = s.model ? JSON.stringify([s.model.threshold, s.model.version, s.model.sha256, s.rollout]) : null;
  if (s.model && s.model.name && (!modelShown || modelKey !== modelThreshold)) {
    showModel(s.model, s.rollout);
    modelThreshold = modelKey;
  }
  const c = s.counts;
  text("c-images", c.images);
  text("c-anomalies", c.anomalies);
  text("c-errors", c.errors);
  text("c-dropped", c.dropped_frames);
  text("c-rate", fmt(s.images_per_s, 1));
  text("c-latency", fmt(s.latency_ms.p50, 1) + " / " + fmt(s.latency_ms.p99, 1));
  $("source").textContent = s.source.name || "";
  $("token").hidden = !s.control.needs_token;
  // The caption describes the picture shown (set when it loads); an error record has no picture: show it at once.
  lastIsError = !!s.last && s.last.status !== "ok";
  if (lastIsError || frameSeq < 0) showLast(s.last);
  showFrame(s.frame);
  if (s.timeline.length) {
    points = points.concat(s.timeline).slice(-TIMELINE_MAX);
    since = points[points.length - 1][0];
    drawTimeline();
  }
  showGallery(s.gallery);
  const sinks = $("sinks");
  sinks.replaceChildren();
  for (const k of s.sinks) {
    const li = document.createElement("li");
    li.textContent = k.name + ": " + k.sent + " sent, " + k.dropped + " dropped, " + k.failed + " failed";
    sinks.append(li);
  }
}

async function poll() {
  // An answer that does not come within 3 s counts as none: a hung server is as lost as a dead one.
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), 3000);
  try {
    const r = await fetch(BASE + "api/status?view=1&since=" + since, { cache: "no-store", signal: abort.signal });
    if (r.ok) show(await r.json());
    else if (r.status === 401) showLine("STARTING", "this server needs its token: reload the page and give it");
  } catch (e) {
    showLost();
  } finally {
    clearTimeout(timer);
  }
  setTimeout(poll, POLL_MS);
}

async function control(action) {
  const msg = $("control-msg");
  try {
    const r = await fetch(BASE + "api/" + action, { method: "POST", headers: { "X-ADTR-Token": $("token").value || "-" } });
    const body = await r.json();
    msg.textContent = r.ok ? "" : body.error;
  } catch (e) {
    msg.textContent = "no answer from the server";
  }
}

function showCamera() {
  // One camera of a line (served under /cam/NAME/): its name in the title and a way back to the line's grid.
  if (BASE === "/") return;
  const name = decodeURIComponent(BASE.split("/")[2] || "");
  document.title = name + " – adtr-run line";
  const back = document.createElement("a");
  back.href = "/";
  back.className = "back";
  back.textContent = "← line";
  const cam = document.createElement("span");
  cam.className = "camera-name";
  cam.textContent = name;
  $("state").before(back, " ", cam, " ");
}

document.addEventListener("DOMContentLoaded", () => {
  showCamera();
  $("pause").addEventListener("click", () => control("pause"));
  $("resume").addEventListener("click", () => control("resume"));
  window.addEventListener("resize", drawTimeline);
  drawTimeline();
  poll();
});
