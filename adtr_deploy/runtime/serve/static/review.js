// adtr-run review: the newest kept frames (GET /api/review), each with its overlay and original, and buttons that label
// it (POST /api/review with the X-ADTR-Token header). Everything from the run is shown with textContent.
"use strict";

const $ = (id) => document.getElementById(id);

function button(label, item) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label === "defect" ? "Defect" : label === "false_alarm" ? "False alarm" : "Good";
  b.dataset.label = label;
  b.addEventListener("click", () => send(item, label));
  return b;
}

function picture(kind, item) {
  const img = document.createElement("img");
  img.src = "/api/review/" + kind + "?id=" + encodeURIComponent(item.id);
  img.alt = kind + " of " + item.id;
  img.loading = "lazy";
  return img;
}

function row(item) {
  const li = document.createElement("li");
  li.dataset.id = item.id;
  li.append(picture("overlay.jpg", item), picture("original.png", item));
  const about = document.createElement("p");
  const score = item.normalized_score === null ? "–" : item.normalized_score.toFixed(2);
  about.textContent = `${item.kind} · ${item.camera ? item.camera + " · " : ""}${item.source} #${item.frame} · score ${score}`;
  const state = document.createElement("p");
  state.className = "review-state";
  state.textContent = item.label ? `${item.label} by ${item.who}` : "not reviewed";
  li.append(about, state, button("defect", item), button(item.kind === "flagged" ? "false_alarm" : "good", item));
  return li;
}

async function send(item, label) {
  const body = { id: item.id, label: label, by: $("by").value || undefined, relabel: Boolean(item.label) };
  const r = await fetch("/api/review", {
    method: "POST", headers: { "X-ADTR-Token": $("token").value || "-", "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const answer = await r.json();
  $("review-msg").textContent = r.ok ? `${item.id}: ${label}` : answer.error;
  await load();
}

async function load() {
  const r = await fetch("/api/review", { cache: "no-store" });
  if (!r.ok) { $("review-msg").textContent = "the review list could not be read (" + r.status + ")"; return; }
  const data = await r.json();
  $("review-dir").textContent = data.review_dir;
  $("no-items").hidden = data.items.length > 0;
  $("items").replaceChildren(...data.items.map(row));
}

load();
