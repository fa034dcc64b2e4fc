// The chat page: one WebSocket to /ws, answers streamed token by token, sources shown under each answer.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log");
const history = []; // the conversation sent with each request: [{role, content}]
let socket = null;
let current = null; // the request being answered: {id, el, textEl, text}
let counter = 0;

function connect() {
  const key = $("api-key").value.trim();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const query = key ? `?api_key=${encodeURIComponent(key)}` : "";
  const s = new WebSocket(`${scheme}://${location.host}/ws${query}`);
  socket = s;
  s.onopen = () => setStatus("connected");
  // a socket replaced by a reconnect (new API key) must not reset the page when it closes
  s.onclose = () => { if (socket === s) { setStatus("disconnected"); finish(); } };
  s.onmessage = (e) => handle(JSON.parse(e.data));
}

function setStatus(text) { $("status").textContent = text; }

function bubble(role, text) {
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  const textEl = document.createElement("span");
  textEl.className = "text";
  textEl.textContent = text;
  el.appendChild(textEl);
  log.appendChild(el);
  log.scrollTop = log.scrollHeight;
  return { el, textEl };
}

function meta(el, text) {
  const m = document.createElement("span");
  m.className = "meta";
  m.textContent = text;
  el.appendChild(m);
}

function handle(msg) {
  if (msg.type === "error" && (!current || msg.id !== current.id)) {
    meta(bubble("assistant error", "").el, `${msg.code}: ${msg.message}`);
    return;
  }
  if (!current || msg.id !== current.id) return;
  if (msg.type === "token") {
    current.text += msg.text;
    current.textEl.textContent = current.text;
    log.scrollTop = log.scrollHeight;
  } else if (msg.type === "sources") {
    const list = document.createElement("ol");
    list.className = "sources";
    for (const d of msg.docs) {
      const li = document.createElement("li");
      li.innerHTML = `<span class="score">[${d.score.toFixed(3)}]</span> <b></b> <span class="doc"></span>`;
      li.querySelector("b").textContent = d.id;
      li.querySelector(".doc").textContent = d.text;
      list.appendChild(li);
    }
    current.el.appendChild(list);
  } else if (msg.type === "done") {
    history.push({ role: "assistant", content: current.text });
    meta(current.el, `${msg.finish_reason} · ${msg.usage.completion_tokens} tokens`);
    finish();
  } else if (msg.type === "error") {
    current.el.classList.add("error");
    meta(current.el, msg.code === "cancelled" ? "stopped" : `${msg.code}: ${msg.message}`);
    if (current.text) history.push({ role: "assistant", content: current.text });
    finish();
  }
}

function finish() {
  current = null;
  $("send").disabled = false;
  $("stop").disabled = true;
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || current || !socket || socket.readyState !== WebSocket.OPEN) return;
  $("input").value = "";
  bubble("user", text);
  history.push({ role: "user", content: text });
  const id = `r${++counter}`;
  const b = bubble("assistant", "");
  current = { id, el: b.el, textEl: b.textEl, text: "" };
  $("send").disabled = true;
  $("stop").disabled = false;
  socket.send(JSON.stringify({
    type: "generate",
    id,
    messages: history,
    max_new_tokens: parseInt($("max-tokens").value, 10),
    temperature: parseFloat($("temperature").value),
    use_retrieval: $("retrieval").checked,
  }));
});

$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => {
  if (current) socket.send(JSON.stringify({ type: "cancel", id: current.id }));
});
$("new-chat").addEventListener("click", () => { history.length = 0; log.textContent = ""; });
$("api-key").addEventListener("change", () => { if (socket) socket.close(); connect(); });

// the box starts as the server's default: checked when it has a retrieval store (and only then can it be used)
fetch("/health").then((r) => r.json()).then((h) => {
  $("retrieval").checked = Boolean(h.retrieval);
  $("retrieval").disabled = !h.retrieval;
}).catch(() => {});
connect();
