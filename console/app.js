// The autopoiesis console: a client of the public API only (SPEC B13).
//
// Safe by construction: every text from the server or a model goes into the
// page through `textContent` (never parsed as markup), the API key lives in this
// tab's sessionStorage only and is sent as a header (WebSocket and SSE get a
// single-use ticket instead, never the key in a URL), and nothing is loaded
// from another origin (the server's Content-Security-Policy says 'self').

const KEY_ITEM = "autopoiesis.api-key";
const $ = (id) => document.getElementById(id);

const state = {
  key: sessionStorage.getItem(KEY_ITEM),
  // The page says whether the API needs the key, so no call has to fail
  // (a 401) to find out.
  authOn: document.querySelector('meta[name="autopoiesis-auth"]')?.content === "key",
  version: "",
  status: null,
  stream: "connecting",
  session: null,
  sessions: new Map(),
  socket: null,
  deleting: null, // the session being deleted: no stream opens for it
  outbox: [], // messages sent while the socket was not open yet
  lastSeq: 0,
  listShown: "", // what the session list shows, to rebuild it only on change
  // While the stream replays what the history shows already: { upto, frames }.
  catchUp: null,
  running: false,
  turns: new Map(), // turn_id -> the <li> of its answer
  prompts: new Set(), // turn_ids whose prompt is shown
  uptime: null, // { seconds, at }: the server's uptime when asked
  retry: 0,
  dashboard: null,
  booted: false,
};

/** One element, its text set as text. */
function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

/** A call to the API with the key, when there is one. */
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.key) headers.set("X-API-Key", state.key);
  if (options.json !== undefined) {
    headers.set("Content-Type", "application/json");
    options = { ...options, body: JSON.stringify(options.json) };
  }
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch {
    // The server is unreachable (restarting, say): callers see a failed
    // answer, and the stream's own state says "reconnecting…".
    return new Response(null, { status: 503 });
  }
  if (response.status === 401 && path !== "/api/status") signOut("The key was refused; sign in again.");
  return response;
}

/** `?ticket=` for a URL a browser opens without headers, when auth is on. */
async function ticketQuery() {
  if (!state.authOn) return "";
  const response = await api("/api/auth/ticket", { method: "POST" });
  if (!response.ok) throw new Error(`ticket: ${response.status}`);
  const { ticket } = await response.json();
  return `ticket=${encodeURIComponent(ticket)}`;
}

function renderStatus() {
  const parts = [];
  if (state.status) {
    parts.push(`agent ${state.status.agent_name}`);
    parts.push(`shell ${state.status.shell_tier}`);
    parts.push(state.status.approval_unlocked ? "approvals unlocked" : "approvals locked");
  }
  if (state.version) parts.push(`v${state.version}`);
  if (state.uptime) {
    const seconds = state.uptime.seconds + (Date.now() - state.uptime.at) / 1000;
    parts.push(`up ${duration(seconds)}`);
  }
  parts.push(state.stream);
  $("status").textContent = parts.join(" · ");
}

/** 3 d 4 h, 5 h 6 min, 7 min, 42 s. */
function duration(seconds) {
  const s = Math.floor(seconds);
  const [d, h, m] = [Math.floor(s / 86400), Math.floor(s / 3600) % 24, Math.floor(s / 60) % 60];
  if (d) return `${d} d ${h} h`;
  if (h) return `${h} h ${m} min`;
  if (m) return `${m} min`;
  return `${s} s`;
}

async function fetchUptime() {
  const response = await api("/api/tools/system.info", { method: "POST", json: {} });
  if (!response.ok) return;
  const info = (await response.json()).data || {};
  if (typeof info.uptime_seconds === "number") {
    state.uptime = { seconds: info.uptime_seconds, at: Date.now() };
    renderStatus();
  }
}

function signOut(why) {
  sessionStorage.removeItem(KEY_ITEM);
  state.key = null;
  closeSocket();
  if (state.dashboard) state.dashboard.close();
  $("app").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = why || "";
  $("key").focus();
}

async function boot() {
  try {
    const health = await (await fetch("/api/health")).json();
    state.version = health.version || "";
  } catch {
    state.stream = "server unreachable";
    renderStatus();
    setTimeout(boot, 2000);
    return;
  }
  if (state.authOn && !state.key) {
    signOut("");
    renderStatus();
    return;
  }
  const status = await api("/api/status");
  if (status.status === 401) {
    signOut("The key was refused.");
    renderStatus();
    return;
  }
  if (status.ok) state.status = (await status.json()).data;
  $("signin").hidden = true;
  $("app").hidden = false;
  renderStatus();
  await refreshSessions();
  fetchUptime();
  if (!state.booted) {
    state.booted = true;
    setInterval(pollSessions, 3000);
    setInterval(renderStatus, 30000);
  }
  openDashboard();
  const wanted = decodeURIComponent(location.hash.replace(/^#\/s\//, ""));
  if (wanted && location.hash.startsWith("#/s/")) openSession(wanted);
}

$("signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = $("key").value;
  const response = await fetch("/api/status", { headers: { "X-API-Key": key } });
  if (response.status === 401) {
    $("signin-error").textContent = "That key was refused.";
    return;
  }
  sessionStorage.setItem(KEY_ITEM, key);
  state.key = key;
  $("key").value = "";
  boot();
});

// ---- sessions ------------------------------------------------------------

async function refreshSessions() {
  const response = await api("/api/sessions");
  if (!response.ok) return;
  const list = await response.json();
  state.sessions = new Map(list.map((s) => [s.id, s]));
  // Rebuilt only when what it shows changed, and then with the keyboard
  // left on the session it was on: a poll must not move the focus.
  const shown = JSON.stringify([state.session, list.map((s) => [s.id, s.created_at, s.message_count])]);
  if (shown === state.listShown) return;
  state.listShown = shown;
  const ul = $("session-list");
  const focused = ul.contains(document.activeElement) ? document.activeElement.dataset.session : undefined;
  ul.replaceChildren(
    ...list.map((s) => {
      const li = el("li");
      const button = el("button", s.id);
      button.type = "button";
      button.dataset.session = s.id;
      if (s.id === state.session) button.setAttribute("aria-current", "true");
      const created = new Date(s.created_at);
      button.append(el("small", `${created.toLocaleString()} · ${s.message_count} messages`));
      button.addEventListener("click", () => openSession(s.id));
      li.append(button);
      return li;
    }),
  );
  if (focused !== undefined) {
    [...ul.querySelectorAll("button")].find((b) => b.dataset.session === focused)?.focus();
  }
}

/** The 3 s poll of the list, skipped while the tab is hidden. */
function pollSessions() {
  if (document.visibilityState !== "hidden") refreshSessions();
}
document.addEventListener("visibilitychange", pollSessions);

$("new-session").addEventListener("click", async () => {
  const response = await api("/api/sessions", { method: "POST" });
  if (!response.ok) return;
  const created = await response.json();
  await refreshSessions();
  openSession(created.id);
});

async function openSession(id) {
  closeSocket();
  state.outbox = [];
  state.session = id;
  location.hash = `#/s/${encodeURIComponent(id)}`;
  $("session-title").textContent = `Session ${id}`;
  $("message").disabled = false;
  $("send").disabled = false;
  $("delete-session").hidden = false;
  await refreshSessions();
  await showHistory();
  // The stream is read from the start of its window, not from its last
  // seq: a turn running now (sent from another device before this tab
  // opened the session) then shows from its prompt and first token. What
  // the history holds already is skipped (caughtUp; docs/websocket.md,
  // "Opening a session that may be mid-turn").
  const last = state.sessions.get(id)?.last_seq ?? 0;
  state.lastSeq = 0;
  state.catchUp = last > 0 ? { upto: last, frames: [] } : null;
  connect();
  $("message").focus();
}

function closeSession() {
  closeSocket();
  state.catchUp = null;
  state.outbox = [];
  state.session = null;
  history.replaceState(null, "", location.pathname);
  $("session-title").textContent = "No session open";
  $("messages").replaceChildren();
  $("message").disabled = true;
  $("send").disabled = true;
  $("delete-session").hidden = true;
  setRunning(false);
  setStream("live");
}

// Two steps, so one stray click deletes nothing.
let deleteArmed = null;
$("delete-session").addEventListener("click", async () => {
  const button = $("delete-session");
  if (!deleteArmed) {
    button.textContent = "Confirm delete";
    deleteArmed = setTimeout(() => {
      deleteArmed = null;
      button.textContent = "Delete session";
    }, 4000);
    return;
  }
  clearTimeout(deleteArmed);
  deleteArmed = null;
  button.textContent = "Delete session";
  const id = state.session;
  // The stream's socket makes the session again if its upgrade reaches the
  // server after the delete: no new one starts, one connecting settles,
  // and then it closes.
  state.deleting = id;
  await settled(state.socket);
  closeSocket();
  const response = await api(`/api/sessions/${encodeURIComponent(id)}`, { method: "DELETE" });
  state.deleting = null;
  if (response.ok || response.status === 404) {
    if (state.session === id) closeSession();
    await refreshSessions();
  } else if (state.session === id) {
    connect();
  }
});

/** Resolves once `socket` is no longer connecting. */
function settled(socket) {
  if (!socket || socket.readyState !== WebSocket.CONNECTING) return Promise.resolve();
  return new Promise((resolve) => {
    socket.addEventListener("open", resolve, { once: true });
    socket.addEventListener("close", resolve, { once: true });
  });
}

// ---- history ---------------------------------------------------------------

function partsOf(message) {
  return Array.isArray(message.parts) ? message.parts : [];
}

function responseItem() {
  const li = el("li", undefined, "assistant");
  li.append(el("span", "", "text"));
  return li;
}

function addThinking(li, content) {
  let details = li.querySelector("details");
  if (!details) {
    details = el("details");
    details.append(el("summary", "Thinking"), el("span", "", "thinking"));
    li.prepend(details);
  }
  details.querySelector(".thinking").textContent += content;
}

function addToolCall(li, name, args) {
  const pre = el("pre", `${name}(${JSON.stringify(args, null, 2)})`, "tool-call");
  li.append(pre);
}

async function showHistory() {
  const id = state.session;
  const response = await api(`/api/sessions/${encodeURIComponent(id)}/history`);
  const ol = $("messages");
  state.turns.clear();
  state.prompts.clear();
  if (!response.ok) {
    ol.replaceChildren();
    return;
  }
  const { messages } = await response.json();
  if (id !== state.session) return;
  ol.replaceChildren(
    ...messages.map((message) => {
      if (message.kind === "request") {
        const text = partsOf(message)
          .filter((p) => p.part_kind === "user-prompt")
          .map((p) => p.content)
          .join("\n");
        return el("li", text, "user");
      }
      const li = responseItem();
      for (const part of partsOf(message)) {
        if (part.part_kind === "text") li.querySelector(".text").textContent += part.content;
        else if (part.part_kind === "thinking") addThinking(li, part.content);
        else if (part.part_kind === "tool-call") addToolCall(li, part.tool_name, part.args);
      }
      return li;
    }),
  );
  ol.scrollTop = ol.scrollHeight;
}

// ---- the live stream ---------------------------------------------------------

function setStream(text) {
  state.stream = text;
  $("stream-state").textContent = text === "live" ? "" : text;
  renderStatus();
}

function closeSocket() {
  if (state.socket) {
    state.socket.onclose = null;
    state.socket.close();
    state.socket = null;
  }
}

async function connect() {
  const id = state.session;
  // Shown until the socket opens: a first connection, not a lost one.
  if (state.stream !== "reconnecting…") setStream("connecting…");
  let query;
  try {
    query = await ticketQuery();
  } catch {
    return reconnectLater(id);
  }
  if (id !== state.session || state.deleting === id) return;
  // A replay cut short starts again (lastSeq stays 0 until it is read).
  if (state.catchUp) state.catchUp.frames = [];
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  // `events=prompt`: turns sent from another device show their prompt.
  const params = [`after_seq=${state.lastSeq}`, "events=prompt", query].filter(Boolean).join("&");
  const socket = new WebSocket(`${proto}//${location.host}/api/ws/${encodeURIComponent(id)}?${params}`);
  state.socket = socket;
  socket.onopen = () => {
    state.retry = 0;
    setStream("live");
    // What was sent while connecting goes now, in order.
    for (const text of state.outbox.splice(0)) {
      socket.send(JSON.stringify({ op: "message", data: { content: text } }));
    }
  };
  socket.onmessage = (event) => {
    try {
      onFrame(JSON.parse(event.data));
    } catch (error) {
      console.warn("unreadable frame", error);
    }
  };
  socket.onclose = (event) => {
    if (state.socket !== socket) return;
    if (event.code === 1000) {
      // The session was deleted (here or on another device): reconnecting
      // would make it again.
      closeSession();
      refreshSessions();
      return;
    }
    reconnectLater(id);
  };
}

function reconnectLater(id) {
  if (id !== state.session) return;
  state.socket = null;
  state.retry = Math.min(state.retry + 1, 6);
  setStream("reconnecting…");
  setTimeout(() => {
    if (id === state.session && !state.socket) connect();
  }, 500 * 2 ** (state.retry - 1));
}

function answerFor(turnId) {
  let li = state.turns.get(turnId);
  if (!li) {
    li = responseItem();
    // Read out once it is whole (see onFrame's endings), not token by token.
    li.setAttribute("aria-busy", "true");
    state.turns.set(turnId, li);
    $("messages").append(li);
  }
  return li;
}

/** A turn's prompt, once: the one this tab sent is shown already. */
function showPrompt(turnId, content) {
  if (state.prompts.has(turnId)) return;
  state.prompts.add(turnId);
  const mine = [...document.querySelectorAll("#messages li.user.pending")].find(
    (li) => li.textContent === content,
  );
  if (mine) {
    mine.classList.remove("pending");
    $("messages").append(mine);
  } else {
    $("messages").append(el("li", content, "user"));
  }
  answerFor(turnId);
}

function setRunning(running) {
  state.running = running;
  $("stop").disabled = !running;
}

const ENDINGS = new Set(["done", "cancelled", "error"]);

/**
 * Takes the frames the stream replays up to `catchUp.upto` (the session's
 * last seq when it was opened) and, once that seq is read, shows only the
 * turn among them that has not ended: the ended ones are in the history.
 * Answers whether it took `frame`.
 */
function caughtUp(frame) {
  const pending = state.catchUp;
  const numbered = typeof frame.seq === "number";
  if (frame.op === "gap" || frame.op === "reset") {
    state.catchUp = null; // the history is read again anyway
    return false;
  }
  if (!numbered && frame.op !== "prompt") return false; // not of the stream
  if (numbered && frame.seq > pending.upto) {
    finishCatchUp();
    return false;
  }
  pending.frames.push(frame);
  if (numbered && frame.seq === pending.upto) finishCatchUp();
  return true;
}

function finishCatchUp() {
  const { upto, frames } = state.catchUp;
  state.catchUp = null;
  const ended = new Set(frames.filter((f) => ENDINGS.has(f.op) && typeof f.seq === "number").map((f) => f.turn_id));
  for (const frame of frames) {
    if (frame.turn_id && !ended.has(frame.turn_id)) onFrame(frame);
  }
  state.lastSeq = Math.max(state.lastSeq, upto);
}

function onFrame(frame) {
  if (state.catchUp && caughtUp(frame)) return;
  if (typeof frame.seq === "number") state.lastSeq = Math.max(state.lastSeq, frame.seq);
  if (ENDINGS.has(frame.op) && typeof frame.seq === "number") {
    state.turns.get(frame.turn_id)?.removeAttribute("aria-busy");
  }
  const data = frame.data || {};
  const ol = $("messages");
  switch (frame.op) {
    case "prompt":
      setRunning(true);
      showPrompt(frame.turn_id, data.content);
      break;
    case "token":
      setRunning(true);
      answerFor(frame.turn_id).querySelector(".text").textContent += data.content;
      break;
    case "thinking":
      setRunning(true);
      addThinking(answerFor(frame.turn_id), data.content);
      break;
    case "tool_call":
      addToolCall(answerFor(frame.turn_id), data.name, data.details);
      break;
    case "done":
    case "cancelled":
      setRunning(false);
      // The stored history is the whole truth once the turn has ended.
      showHistory();
      break;
    case "error":
      if (frame.seq === undefined) {
        setStream(data.message || "error");
        setTimeout(() => setStream("live"), 3000);
        break;
      }
      setRunning(false);
      ol.append(el("li", data.message || "The turn failed.", "error"));
      break;
    case "gap":
    case "reset":
      if (frame.op === "reset") state.lastSeq = 0;
      showHistory();
      break;
    default:
      break;
  }
  ol.scrollTop = ol.scrollHeight;
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("message").value;
  if (!text.trim() || !state.session) return;
  if (state.socket && state.socket.readyState === WebSocket.OPEN) {
    state.socket.send(JSON.stringify({ op: "message", data: { content: text } }));
  } else {
    // Still connecting (or reconnecting): it goes once the socket opens.
    state.outbox.push(text);
  }
  // Shown at once; its `prompt` event, when the turn starts, places it.
  $("messages").append(el("li", text, "user pending"));
  $("message").value = "";
  setRunning(true);
});

$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", async () => {
  if (state.session) await api(`/api/sessions/${encodeURIComponent(state.session)}/cancel`, { method: "POST" });
});

// ---- approvals and status, live through /api/stream ---------------------------

async function openDashboard() {
  let query;
  try {
    query = await ticketQuery();
  } catch {
    setTimeout(openDashboard, 3000);
    return;
  }
  const source = new EventSource(`/api/stream${query ? `?${query}` : ""}`);
  state.dashboard = source;
  // With no session open, this is the connection the status line tells of.
  source.onopen = () => {
    if (!state.session) setStream("live");
  };
  source.addEventListener("dashboard.status", (event) => {
    state.status = JSON.parse(event.data).data;
    renderStatus();
  });
  source.addEventListener("approval.list", (event) => renderApprovals(JSON.parse(event.data).data));
  // A ticket opens one connection: come back with a new one.
  source.onerror = () => {
    source.close();
    if (state.dashboard === source) setTimeout(openDashboard, 2000);
  };
}

/**
 * The queue, kept item by item: an approval that stays keeps its element
 * (a reason half typed, the focus), new ones are made, decided ones go.
 */
function renderApprovals(list) {
  const items = list.items || [];
  $("approvals-empty").hidden = items.length > 0;
  const ul = $("approval-list");
  const ids = new Set(items.map((item) => item.id));
  // The decided ones go first, so those that stay are in place already
  // and are not moved: moving a focused field would take its focus.
  for (const li of [...ul.children]) if (!ids.has(li.dataset.approval)) li.remove();
  const kept = new Map([...ul.children].map((li) => [li.dataset.approval, li]));
  items.forEach((item, index) => {
    const li = kept.get(item.id) || approvalItem(item);
    if (ul.children[index] !== li) ul.insertBefore(li, ul.children[index] || null);
  });
}

function approvalItem(item) {
  const li = el("li");
  li.dataset.approval = item.id;
  for (const request of item.requests || []) {
    li.append(el("pre", `${request.tool_name}(${JSON.stringify(request.args, null, 2)})`));
  }
  const expires = new Date(item.expires_at * 1000).toLocaleString();
  li.append(el("p", `plan ${item.plan_hash_prefix} · expires ${expires}`, "meta"));
  const reasonId = `reason-${item.id}`;
  const label = el("label", "Reason");
  label.htmlFor = reasonId;
  const reason = el("input");
  reason.id = reasonId;
  const decide = el("div", undefined, "decide");
  for (const [action, text] of [["approve", "Approve"], ["reject", "Reject"]]) {
    const button = el("button", text);
    button.type = "button";
    button.addEventListener("click", async () => {
      const body = { action, approval_id: item.id };
      if (reason.value) body.reason = reason.value;
      await api("/api/actions", { method: "POST", json: body });
    });
    decide.append(button);
  }
  li.append(label, reason, decide);
  return li;
}

boot();
