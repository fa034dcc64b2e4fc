// The chat page: one WebSocket to /ws, answers streamed token by token, sources shown under each answer; with
// feedback on (serve feedback_db=...), thumbs and an edit box under each answer, and blind two-answer comparisons.
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

// ---- feedback: each vote is a `feedback` message; its reply marks the button that sent it
const votes = new Map(); // completion id (or "a b" for a pair) -> the button waiting for its reply

function vote(button, key, body) {
  votes.set(key, button);
  socket.send(JSON.stringify({ type: "feedback", ...body }));
}

let feedbackOn = false; // the server keeps votes (feedback_db set): /health says, and the controls show only then

function feedbackBar(el, completionId, text) {
  if (!feedbackOn) return;
  const bar = document.createElement("div");
  bar.className = "feedback";
  for (const [label, rating] of [["Good", "up"], ["Bad", "down"]]) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = `rate-${rating}`;
    b.dataset.group = "rate";
    b.textContent = label;
    b.addEventListener("click", () => vote(b, completionId, { id: completionId, rating }));
    bar.appendChild(b);
  }
  const edit = document.createElement("button");
  edit.type = "button";
  edit.className = "edit";
  edit.textContent = "Edit";
  edit.addEventListener("click", () => {
    const box = document.createElement("textarea");
    box.className = "edit-text";
    box.value = text;
    const save = document.createElement("button");
    save.type = "button";
    save.className = "save-edit";
    save.dataset.group = "edit";
    save.textContent = "Save better answer";
    save.addEventListener("click", () => vote(save, completionId, { kind: "edit", id: completionId, text: box.value }));
    bar.append(box, save);
    edit.disabled = true;
  });
  bar.appendChild(edit);
  el.appendChild(bar);
}

function showPair(answers) {
  const pair = document.createElement("div");
  pair.className = "compare";
  answers.forEach((a, i) => {
    const b = bubble("assistant", a.text);
    meta(b.el, `${"AB"[i]} · ${a.finish_reason} · ${a.usage.completion_tokens} tokens`);
    pair.appendChild(b.el);
  });
  const ids = answers.map((a) => a.id);
  const bar = document.createElement("div");
  bar.className = "feedback";
  for (const [label, choice] of [["A is better", "a"], ["B is better", "b"], ["Tie", "tie"], ["Both bad", "both_bad"]]) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = `choose-${choice}`;
    b.dataset.group = "choose";
    b.textContent = label;
    b.addEventListener("click", () => vote(b, ids[0], { kind: "compare", ids, choice }));
    bar.appendChild(b);
  }
  pair.appendChild(bar);
  log.appendChild(pair);
  log.scrollTop = log.scrollHeight;
}

function voted(msg) {
  const key = msg.ids ? msg.ids[0] : msg.id;
  const button = votes.get(key);
  if (!button) return;
  votes.delete(key);
  // a new vote of a kind replaces the last one of that kind: only its buttons change
  const group = `button[data-group="${button.dataset.group}"]`;
  for (const other of button.parentElement.querySelectorAll(group)) other.classList.remove("voted");
  button.classList.add("voted");
}

function handle(msg) {
  if (msg.type === "feedback") { voted(msg); return; }
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
    if (msg.completion_id) feedbackBar(current.el, msg.completion_id, current.text);
    finish();
  } else if (msg.type === "answers") {
    current.el.remove(); // the placeholder: a comparison shows its two answers side by side
    history.push({ role: "assistant", content: msg.answers[0].text });
    showPair(msg.answers);
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
  const compare = $("compare").checked;
  const b = bubble("assistant", compare ? "…" : "");
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
    ...(compare ? { compare: true } : {}),
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
  feedbackOn = Boolean(h.feedback);
  $("compare").parentElement.hidden = !feedbackOn;
}).catch(() => {});
connect();
