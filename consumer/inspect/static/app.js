// The console's page: the live feed (server-sent events), its filters, pause and resume, and the charts.
// Every string from the stream is set with textContent (never innerHTML): a caption is text, whatever it holds.
"use strict";

const MAX_CARDS = 400; // cards kept on the page; older ones leave from the bottom
const LABELS = ["negative", "neutral", "positive"];
const LABEL_COLORS = { negative: "#c0392b", neutral: "#7f8c8d", positive: "#27ae60" };

const state = { paused: false, buffered: [], cards: new Map(), models: new Set(), languages: new Set() };
const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function fmtProbability(p) {
  return typeof p === "number" ? p.toFixed(2) : "-";
}

function reasonText(reason) {
  if (!reason || typeof reason !== "object") return "on the alert topic (the event names no rule)";
  const parts = [`rule ${reason.rule ?? "?"}`, `${reason.label ?? "?"} ${fmtProbability(reason.probability)}`,
    `>= threshold ${fmtProbability(reason.threshold)}`];
  if (reason.min_precision !== null && reason.min_precision !== undefined) {
    parts.push(`for precision ${fmtProbability(reason.min_precision)}`);
  }
  if (reason.calibration) parts.push(`calibration ${String(reason.calibration).slice(0, 12)}`);
  return parts.join(" · ");
}

function metaRow(list, name, value) {
  const item = el("span", "meta-item");
  item.append(el("b", null, name + " "), el("span", null, value ?? "absent"));
  list.append(item);
}

function detail(card) {
  const box = el("details", "detail");
  box.append(el("summary", null, "event, headers, trace"));
  box.append(el("p", "trace", "trace id: " + (card.trace_id || "none")));
  const table = el("table", "headers");
  for (const [name, value] of card.headers || []) {
    const row = el("tr");
    row.append(el("th", null, name), el("td", null, value));
    table.append(row);
  }
  box.append(table, el("pre", "json", JSON.stringify(card.event, null, 2)));
  return box;
}

function render(card) {
  const item = el("li", "card");
  item.dataset.id = card.id;
  if (card.alert) item.classList.add("alert");
  if (card.kind === "dead_letter") item.classList.add("dead");
  if (card.image_url) {
    const img = el("img", "thumb");
    img.alt = "";
    img.addEventListener("error", () => img.classList.add("missing"));
    img.src = "/thumb/" + encodeURIComponent(card.id);
    item.append(img);
  } else {
    item.append(el("div", "thumb none", card.kind === "dead_letter" ? "DLQ" : "no image"));
  }
  const body = el("div", "body");
  const top = el("div", "top");
  if (card.kind === "dead_letter") {
    top.append(el("span", "code", card.error_code || "unknown"));
  } else {
    top.append(el("span", "label label-" + (LABELS.includes(card.label) ? card.label : "x"), card.label),
      el("span", "prob", fmtProbability(card.probability)));
  }
  if (card.alert) top.append(el("span", "badge badge-alert", "ALERT"));
  if (card.agree === false) top.append(el("span", "badge badge-disagree", "text and image disagree"));
  top.append(el("span", "post-id", card.post_id || ""));
  body.append(top);
  body.append(el("p", "caption" + (card.joined ? "" : " unjoined"),
    card.joined ? card.caption ?? "" : "(post not in the join cache)"));
  if (card.alert) body.append(el("p", "reason", reasonText(card.reason)));
  if (card.kind === "dead_letter") body.append(el("p", "error", card.error_message || ""));
  const meta = el("div", "meta");
  metaRow(meta, "text", card.text_label);
  metaRow(meta, "image", card.image_label);
  metaRow(meta, "image_status", card.image_status);
  metaRow(meta, "model", card.model_version ? `${card.model}:${card.model_version}` : null);
  metaRow(meta, "language", !card.has_language ? null :
    (card.language ?? "unsure") + (card.language_supported === false ? " (unsupported)" : ""));
  metaRow(meta, "latency", card.latency_ms === null ? null : card.latency_ms + " ms");
  metaRow(meta, "source", card.source ? `${card.source.partition}@${card.source.offset}` : null);
  metaRow(meta, "at", `${card.at.topic}[${card.at.partition}]@${card.at.offset}`);
  body.append(meta, detail(card));
  item.append(body);
  return item;
}

function filters() {
  return {
    label: $("f-label").value, alerts: $("f-alerts").checked, disagree: $("f-disagree").checked,
    min: parseFloat($("f-min").value) || 0, model: $("f-model").value, language: $("f-language").value,
    words: $("f-words").value.toLowerCase().split(/\s+/).filter(Boolean),
  };
}

function matches(card, f) {
  if (f.label && card.label !== f.label) return false;
  if (f.alerts && !card.alert) return false;
  if (f.disagree && card.agree !== false) return false;
  if (f.min > 0 && !(card.probability >= f.min)) return false;
  if (f.model && card.model_version !== f.model) return false;
  if (f.language && card.language !== f.language) return false;
  const caption = (card.caption || "").toLowerCase();
  return f.words.every((word) => caption.includes(word));
}

function addOption(select, seen, value) {
  if (value === null || value === undefined || seen.has(value)) return;
  seen.add(value);
  const option = el("option", null, value);
  option.value = value;
  select.append(option);
}

function show(cards) { // cards: newest first
  const feed = $("feed");
  const f = filters();
  for (const card of [...cards].reverse()) {
    addOption($("f-model"), state.models, card.model_version);
    addOption($("f-language"), state.languages, card.language);
    const node = render(card);
    node.hidden = !matches(card, f);
    const old = state.cards.get(card.id);
    if (old) old.node.replaceWith(node); else feed.prepend(node); // an alert joins its event's card in place
    state.cards.set(card.id, { card, node });
  }
  while (feed.children.length > MAX_CARDS) {
    const last = feed.lastElementChild;
    state.cards.delete(last.dataset.id);
    last.remove();
  }
  $("counts").textContent = `${state.cards.size} cards`;
}

function applyFilters() {
  const f = filters();
  for (const { card, node } of state.cards.values()) node.hidden = !matches(card, f);
}

function receive(cards) { // cards: oldest first, as they were written
  if (state.paused) {
    state.buffered.push(...cards);
    $("buffered").hidden = false;
    $("buffered").textContent = `${state.buffered.length} new while paused`;
    return;
  }
  show([...cards].reverse());
}

function togglePause() {
  state.paused = !state.paused;
  $("pause").textContent = state.paused ? "Resume" : "Pause";
  document.body.classList.toggle("paused", state.paused);
  if (!state.paused) {
    const waiting = state.buffered;
    state.buffered = [];
    $("buffered").hidden = true;
    show(waiting.reverse()); // show() takes newest first
  }
}

function connect() {
  const source = new EventSource("/api/stream");
  source.addEventListener("open", () => { $("status").textContent = "live"; $("status").className = "status live"; });
  source.addEventListener("error", () => { $("status").textContent = "reconnecting"; $("status").className = "status"; });
  source.addEventListener("snapshot", (e) => { // a (re)connection: the newest cards, newest first
    for (const { node } of state.cards.values()) node.remove();
    state.cards.clear();
    show(JSON.parse(e.data));
  });
  source.addEventListener("cards", (e) => receive(JSON.parse(e.data)));
}

async function refreshCharts() {
  const response = await fetch("/api/charts?window=" + $("window").value, { cache: "no-store" });
  if (!response.ok) return;
  const data = await response.json();
  const xs = data.points.map((p) => p.t);
  const draw = window.mmsentCharts.drawLines;
  draw($("c-labels"), xs, LABELS.map((label) => ({
    name: label, color: LABEL_COLORS[label], values: data.points.map((p) => p.labels[label] || 0),
  })));
  draw($("c-throughput"), xs, [
    { name: "events/s", values: data.points.map((p) => p.events / data.bucket_s) },
    { name: "alerts/s", color: "#d35400", values: data.points.map((p) => p.alerts / data.bucket_s) },
  ]);
  draw($("c-latency"), xs, [
    { name: "p50", values: data.points.map((p) => p.p50_ms) },
    { name: "p95", values: data.points.map((p) => p.p95_ms) },
  ]);
  draw($("c-lag"), xs, [{ name: "lag", values: data.points.map((p) => p.lag) }]);
  const codes = [...new Set(data.points.flatMap((p) => Object.keys(p.dead_letters)))];
  draw($("c-dead"), xs, codes.map((code) => ({ name: code, values: data.points.map((p) => p.dead_letters[code] || 0) })));
  $("charts").dataset.events = String(data.totals.events || 0); // what the charts last drew (tests wait on it)
}

document.addEventListener("DOMContentLoaded", () => {
  $("pause").addEventListener("click", togglePause);
  $("filters").addEventListener("input", applyFilters);
  $("filters").addEventListener("change", applyFilters); // a <select> chosen by Selenium fired only this (Chromium 156)
  $("filters").addEventListener("submit", (e) => e.preventDefault());
  $("window").addEventListener("change", refreshCharts);
  connect();
  refreshCharts();
  setInterval(refreshCharts, 5000);
});
