// adtr-run line view: a tile per camera (state, latest frame, score); a click opens that camera's own page.
// Everything from the run (names, sources, errors) is shown with textContent, never as HTML.
"use strict";

const POLL_MS = 1000;
const $ = (id) => document.getElementById(id);
const LINE_CLASS = {
  "OK": "ok", "ALARM": "alarm", "DRIFT": "drift", "NO SIGNAL": "nosignal", "PAUSED": "paused",
  "STARTING": "starting", "FINISHED": "finished", "SERVER LOST": "lost",
};
const tiles = new Map(); // name -> {el, parts, frameSeq, busy}

function el(tag, cls, textValue) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (textValue !== undefined) e.textContent = textValue;
  return e;
}

function fmt(x, digits) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}

async function control(path, body) {
  const msg = $("control-msg");
  try {
    const r = await fetch(path, {
      method: "POST",
      headers: { "X-ADTR-Token": $("token").value || "-", "Content-Type": "application/json" },
      body: body ? JSON.stringify(body) : "",
    });
    const answer = await r.json();
    msg.textContent = r.ok ? "" : answer.error;
  } catch (e) {
    msg.textContent = "no answer from the server";
  }
}

function makeTile(cam) {
  const root = el("article", "tile");
  const h2 = el("h2");
  const name = el("span", "", cam.name);
  const src = el("span", "src", cam.source);
  h2.append(name, src);
  const banner = el("div", "line starting");
  const state = el("span", "line-state", "…");
  const detail = el("span", "line-detail", "");
  banner.append(state, detail);
  const pic = el("div", "pic");
  const img = el("img");
  img.alt = "latest frame of " + cam.name;
  pic.append(img);
  const facts = el("div", "facts");
  const score = el("b", "", "–");
  const rate = el("b", "", "–");
  const count = el("b", "", "–");
  for (const [label, value] of [["score ", score], ["images/s ", rate], ["images ", count]]) {
    const pair = el("span", "", label);
    pair.append(value);
    facts.append(pair);
  }
  const acts = el("div", "acts");
  const pause = el("button", "", "pause");
  const resume = el("button", "", "resume");
  const remove = el("button", "", "remove");
  acts.append(pause, resume, remove);
  const q = encodeURIComponent(cam.name);
  pause.addEventListener("click", (ev) => { ev.stopPropagation(); control("/api/cameras/" + q + "/pause"); });
  resume.addEventListener("click", (ev) => { ev.stopPropagation(); control("/api/cameras/" + q + "/resume"); });
  remove.addEventListener("click", (ev) => { ev.stopPropagation(); control("/api/cameras/" + q + "/remove"); });
  root.addEventListener("click", () => { location.href = cam.url; });
  root.append(h2, banner, pic, facts, acts);
  $("grid").append(root);
  return { el: root, banner, state, detail, img, score, rate, count, frameSeq: -1, busy: false, url: cam.url };
}

async function showFrame(t, seq) {
  if (t.busy || seq === t.frameSeq) return;
  t.busy = true;
  try {
    const r = await fetch(t.url + "frame.jpg?seq=" + seq, { cache: "no-store" });
    if (r.status !== 200) return;
    const url = URL.createObjectURL(await r.blob());
    const old = t.img.src;
    t.img.src = url;
    if (old && old.startsWith("blob:")) URL.revokeObjectURL(old);
    t.frameSeq = Number(r.headers.get("X-Frame-Seq"));
  } catch (e) {
    // the next poll tries again
  } finally {
    t.busy = false;
  }
}

function show(status) {
  $("line-name").textContent = status.line || "line";
  const states = status.cameras.map((c) => c.line.state);
  $("summary").textContent = status.cameras.length + " cameras, " + states.filter((s) => s === "ALARM").length + " in alarm";
  const seen = new Set();
  for (const cam of status.cameras) {
    seen.add(cam.name);
    let t = tiles.get(cam.name);
    if (!t) { t = makeTile(cam); tiles.set(cam.name, t); }
    t.banner.className = "line " + (LINE_CLASS[cam.line.state] || "starting");
    t.state.textContent = cam.line.state;
    t.detail.textContent = cam.error ? cam.error : cam.line.reason;
    t.score.textContent = fmt(cam.last.normalized_score, 3);
    t.rate.textContent = fmt(cam.images_per_s, 1);
    t.count.textContent = String(cam.counts.images === undefined ? 0 : cam.counts.images);
    showFrame(t, cam.frame_seq);
  }
  for (const [name, t] of tiles) {
    if (!seen.has(name)) { t.el.remove(); tiles.delete(name); }
  }
}

async function poll() {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), 3000);
  try {
    const r = await fetch("/api/status", { cache: "no-store", signal: abort.signal });
    if (r.ok) show(await r.json());
  } catch (e) {
    $("summary").textContent = "SERVER LOST";
  } finally {
    clearTimeout(timer);
  }
  setTimeout(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("add").addEventListener("click", () => control("/api/cameras", { name: $("new-name").value, source: $("new-source").value }));
  poll();
});
