// outpost status page: reads the admin API of the listener that served it, follows /events
// with fetch streaming (EventSource cannot send the Authorization header), and acts through
// the same API. No third-party code.
"use strict";

const TOKEN_KEY = "outpost-admin-token";
const WINDOW_MS = 30 * 60 * 1000;
const RECENT_MAX = 100;

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  lastId: null,          // the id of the last event seen (Last-Event-ID on reconnect)
  online: null,
  transitions: [],       // [{at, online}] from events, oldest first
  outageSince: null,
  knownFrom: Date.now(), // before this (the page's load, or the oldest event), state unknown
  refreshTimer: null,
  streaming: false,
};

const $ = (id) => document.getElementById(id);

class Unauthorized extends Error {}

async function api(method, path, body) {
  const headers = {};
  if (state.token) headers["Authorization"] = "Bearer " + state.token;
  let payload;
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const resp = await fetch(path, { method, headers, body: payload, cache: "no-store" });
  if (resp.status === 401) throw new Unauthorized();
  let doc = null;
  try { doc = await resp.json(); } catch (_) { /* not JSON */ }
  if (!resp.ok) {
    const msg = (doc && (doc.message || doc.error)) || resp.statusText;
    throw new Error(method + " " + path + ": " + resp.status + " " + msg);
  }
  return doc;
}

function askForToken(message) {
  $("main").hidden = true;
  $("token-form").hidden = false;
  $("token-error").textContent = message || "";
  $("token-input").focus();
}

function text(el, value) { el.textContent = value; }

function ago(ms) {
  if (ms == null) return "–";
  const s = Math.floor(ms / 1000);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

function when(rfc3339) {
  if (!rfc3339) return "–";
  const t = new Date(rfc3339);
  return isNaN(t) ? rfc3339 : t.toLocaleString();
}

function bytes(n) {
  if (n == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

// `at`: the time of an online/offline event; without it, the state as /status reports it.
function setOnline(online, at) {
  if (at !== undefined) {
    state.transitions.push({ at, online });
    state.transitions.sort((a, b) => a.at - b.at);
    state.outageSince = online ? null : at;
  } else if (state.online !== online && state.online !== null) {
    state.transitions.push({ at: Date.now(), online });
    state.outageSince = online ? null : Date.now();
  }
  state.online = online;
  const badge = $("upstream-state");
  badge.className = "badge " + (online ? "online" : "offline");
  text(badge, online ? "upstream online" : "upstream offline");
}

function setPaused(paused) {
  $("paused-state").hidden = !paused;
  $("pause").hidden = paused;
  $("resume").hidden = !paused;
}

async function refresh() {
  try {
    const [status, queue, dead] = await Promise.all([
      api("GET", "/status"),
      api("GET", "/queue?limit=200"),
      api("GET", "/dead-letters?limit=200"),
    ]);
    $("token-form").hidden = true;
    $("main").hidden = false;
    $("forget-token").hidden = !state.token;
    if (state.online !== status.online) setOnline(status.online);
    setPaused(status.paused);
    text($("queue-depth"), String(status.queue_depth));
    text($("oldest"), ago(status.oldest_queued_age_ms));
    text($("dead-count"), String(status.dead_letters));
    text($("cache"), status.cache_entries + " entries, " + bytes(status.cache_bytes) +
      " (" + status.cache_memory_entries + " in memory)");
    renderQueue(queue.items || []);
    renderDead(dead.items || []);
    renderTimeline();
    if (!state.streaming) follow();
  } catch (e) {
    if (e instanceof Unauthorized) {
      askForToken(state.token ? "That token was refused." : "");
    } else {
      text($("stream-state"), "error: " + e.message);
    }
  }
}

function scheduleRefresh() {
  if (state.refreshTimer) return;
  state.refreshTimer = setTimeout(() => { state.refreshTimer = null; refresh(); }, 150);
}

function cell(tr, content, cls) {
  const td = document.createElement("td");
  if (cls) td.className = cls;
  if (content instanceof Node) td.appendChild(content); else td.textContent = content == null ? "–" : String(content);
  tr.appendChild(td);
  return td;
}

function code(s) { const c = document.createElement("code"); c.textContent = s; return c; }
function pre(s) { const p = document.createElement("pre"); p.textContent = s; return p; }

function button(label, cls, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.className = cls;
  b.addEventListener("click", onClick);
  return b;
}

function enc(key) { return encodeURIComponent(key); }

async function act(method, path, body) {
  try {
    await api(method, path, body);
  } catch (e) {
    if (e instanceof Unauthorized) askForToken("That token was refused."); else alert(e.message);
  }
  scheduleRefresh();
}

function renderQueue(items) {
  const tbody = $("queue").querySelector("tbody");
  tbody.replaceChildren();
  $("no-queue").hidden = items.length > 0;
  $("queue").hidden = items.length === 0;
  for (const d of items) {
    const tr = document.createElement("tr");
    tr.dataset.key = d.idempotency_key;
    cell(tr, code(d.idempotency_key));
    cell(tr, d.status + (d.outcome ? " (" + d.outcome + ")" : ""));
    cell(tr, d.attempts);
    cell(tr, d.partition);
    cell(tr, when(d.accepted_at));
    cell(tr, when(d.next_attempt_at));
    const actions = cell(tr, "", "actions");
    actions.textContent = "";
    actions.appendChild(button("Send now", "retry", () => act("POST", "/queue/" + enc(d.idempotency_key) + "/retry")));
    actions.appendChild(button("Drop", "drop danger", () => {
      if (confirm("Drop " + d.idempotency_key + "? It is kept as rejected and never sent.")) {
        act("DELETE", "/queue/" + enc(d.idempotency_key));
      }
    }));
    tbody.appendChild(tr);
  }
}

function describeBody(v) {
  if (v == null) return "";
  return typeof v === "string" ? v : JSON.stringify(v, null, 2);
}

function renderDead(items) {
  const tbody = $("dead-letters").querySelector("tbody");
  tbody.replaceChildren();
  $("no-dead").hidden = items.length > 0;
  $("dead-letters").hidden = items.length === 0;
  for (const d of items) {
    const tr = document.createElement("tr");
    tr.dataset.key = d.idempotency_key;
    cell(tr, code(d.idempotency_key));
    cell(tr, d.status + (d.outcome ? " (" + d.outcome + ")" : ""));
    const answer = document.createElement("div");
    answer.appendChild(document.createTextNode(d.upstream_status == null ? "no answer" : String(d.upstream_status)));
    if (d.upstream_body != null) answer.appendChild(pre(describeBody(d.upstream_body)));
    cell(tr, answer);
    cell(tr, d.partition + ", accepted " + when(d.accepted_at));
    const actions = cell(tr, "", "actions");
    actions.textContent = "";
    actions.appendChild(button("Retry", "retry", () => act("POST", "/dead-letters/" + enc(d.idempotency_key) + "/retry")));
    actions.appendChild(button("Edit and retry", "edit", () => openEditor(d)));
    actions.appendChild(button("Drop", "drop danger", () => {
      if (confirm("Drop " + d.idempotency_key + "? It is kept as rejected and never sent.")) {
        act("DELETE", "/dead-letters/" + enc(d.idempotency_key));
      }
    }));
    tbody.appendChild(tr);
  }
}

let editing = null;

function openEditor(d) {
  editing = d.idempotency_key;
  text($("editor-key"), d.idempotency_key);
  $("editor-body").value = "";
  $("editor-headers").value = "{}";
  text($("editor-error"), "");
  // The stored body is not in the status document; the operator writes the new one.
  $("editor-body").placeholder = "new body (leave empty to keep the stored one)";
  $("editor").showModal();
}

async function sendEdit(ev) {
  ev.preventDefault();
  const edit = {};
  const body = $("editor-body").value.trim();
  if (body) {
    try { edit.body = JSON.parse(body); } catch (_) { edit.body = body; }
  }
  try {
    const headers = JSON.parse($("editor-headers").value || "{}");
    if (Object.keys(headers).length) edit.headers = headers;
  } catch (e) {
    text($("editor-error"), "Headers must be a JSON object: " + e.message);
    return;
  }
  try {
    await api("POST", "/dead-letters/" + enc(editing) + "/retry", edit);
    $("editor").close();
  } catch (e) {
    text($("editor-error"), e.message);
  }
  scheduleRefresh();
}

function renderTimeline() {
  const el = $("timeline");
  el.replaceChildren();
  const now = Date.now();
  const start = now - WINDOW_MS;
  // State at the window's start: the last transition before it, else the first one's opposite.
  let before = state.transitions.filter((t) => t.at <= start).pop();
  let current = before ? before.online : (state.transitions.length ? !state.transitions[0].online : state.online);
  let from = Math.max(start, Math.min(state.knownFrom, now));
  const parts = [];
  if (from > start) parts.push({ from: start, to: from, online: null });
  for (const t of state.transitions.filter((t) => t.at > start)) {
    parts.push({ from, to: t.at, online: current });
    from = t.at;
    current = t.online;
  }
  parts.push({ from, to: now, online: current });
  for (const p of parts) {
    if (p.to <= p.from) continue;
    const div = document.createElement("div");
    div.className = p.online === null ? "unknown" : (p.online === false ? "down" : "up");
    div.style.width = ((p.to - p.from) / WINDOW_MS * 100) + "%";
    const what = p.online === null ? "no data " : (p.online === false ? "offline " : "online ");
    div.title = what + new Date(p.from).toLocaleTimeString() +
      "–" + new Date(p.to).toLocaleTimeString();
    el.appendChild(div);
  }
  text($("outage"), state.outageSince ? ago(now - state.outageSince) : "none");
}

function describeEvent(e) {
  switch (e.type) {
    case "online": return ["upstream online", "good"];
    case "offline": return ["upstream offline: " + e.reason, "bad"];
    case "queued": return ["queued " + e.key + " (" + e.partition + ")", ""];
    case "replay_attempt": return ["replaying " + e.key + ", attempt " + e.attempt, ""];
    case "classified": return [e.key + " → " + e.class + (e.status ? " (" + e.status + ")" : ""),
      e.class === "success" || e.class === "partial" ? "good" : (e.class === "retryable" ? "" : "bad")];
    case "dead_lettered": return ["dead-lettered " + e.key + " (" + e.status + ")", "bad"];
    case "auth_required": return [e.key + " waits for fresh credentials of " + e.principal, "bad"];
    case "expired": return ["expired " + e.key, "bad"];
    case "paused": return ["replay paused", ""];
    case "resumed": return ["replay resumed", ""];
    case "operator": return ["operator " + e.action + " " + e.key + (e.new_key ? " as " + e.new_key : ""), ""];
    default: return [e.type, ""];
  }
}

function onEvent(e) {
  if (e.type === "missed") return;
  if (e.at_ms < state.knownFrom) state.knownFrom = e.at_ms;
  if (e.type === "online") setOnline(true, e.at_ms);
  if (e.type === "offline") setOnline(false, e.at_ms);
  if (e.type === "paused") setPaused(true);
  if (e.type === "resumed") setPaused(false);
  if (e.type !== "replay_attempt") {
    const [msg, cls] = describeEvent(e);
    const li = document.createElement("li");
    if (cls) li.className = cls;
    const t = document.createElement("span");
    t.className = "t";
    t.textContent = new Date(e.at_ms).toLocaleTimeString();
    li.appendChild(t);
    li.appendChild(document.createTextNode(msg));
    const list = $("recent");
    list.insertBefore(li, list.firstChild);
    while (list.children.length > RECENT_MAX) list.removeChild(list.lastChild);
  }
  scheduleRefresh();
}

// One SSE message block (lines up to a blank line).
function parseBlock(block) {
  let id = null;
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("id: ")) id = line.slice(4);
    else if (line.startsWith("data: ")) data.push(line.slice(6));
  }
  if (id !== null) state.lastId = id;
  if (data.length) {
    try { onEvent(JSON.parse(data.join("\n"))); } catch (_) { /* ignore a bad message */ }
  }
}

async function follow() {
  state.streaming = true;
  for (;;) {
    try {
      const headers = { "Last-Event-ID": state.lastId === null ? "0" : state.lastId };
      if (state.token) headers["Authorization"] = "Bearer " + state.token;
      const resp = await fetch("/events", { headers, cache: "no-store" });
      if (resp.status === 401) { state.streaming = false; askForToken("That token was refused."); return; }
      if (!resp.ok || !resp.body) throw new Error("events: " + resp.status);
      text($("stream-state"), "live");
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let end;
        while ((end = buf.indexOf("\n\n")) >= 0) {
          parseBlock(buf.slice(0, end));
          buf = buf.slice(end + 2);
        }
      }
    } catch (e) {
      // Reconnect below.
    }
    text($("stream-state"), "reconnecting…");
    await new Promise((r) => setTimeout(r, 1000));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.token = $("token-input").value.trim();
    sessionStorage.setItem(TOKEN_KEY, state.token);
    $("token-input").value = "";
    refresh();
  });
  $("forget-token").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    askForToken("");
  });
  $("pause").addEventListener("click", () => act("POST", "/sync/pause"));
  $("resume").addEventListener("click", () => act("POST", "/sync/resume"));
  $("editor-form").addEventListener("submit", sendEdit);
  $("editor-cancel").addEventListener("click", () => $("editor").close());
  setInterval(renderTimeline, 5000);
  setInterval(refresh, 15000);
  refresh();
});
