// The Chat tab: model, system prompt, sampling, streamed answers with a stop
// button, the token-probability view, documents answers with citations,
// conversations from the log, and the context gauge.

import { api, stream } from "./api.js";
import { citationHook, extractedNote } from "./citations.js";
import { h, render } from "./markdown.js";
import { sampling } from "./sampling.js";
import { tokenView } from "./tokens.js";

const $ = (id) => document.getElementById(id);
const SAVED = "lanner-conversation";
const chat = { conversation: null, messages: [], controller: null, windows: {} };

function settings() {
  const probs = $("show-probs").checked ? { logprobs: true, top_logprobs: 5 } : {};
  return { ...sampling(), ...probs };
}

function bubble(role, label) {
  const body = h("div", { class: "body" });
  const el = h("article", { class: `msg ${role}` }, h("div", { class: "who" }, label), body);
  $("thread").append(el);
  return { el, body };
}

function showUser(text) {
  bubble("user", "You").body.textContent = text;
}

/** An assistant message: markdown, and a toggle to its tokens when it has them. */
function showAnswer(text, { model, tokens = [], citations = null, meta = "" } = {}) {
  const { el, body } = bubble("assistant", model || "Assistant");
  const markdown = () => body.replaceChildren(render(text, citations ? citationHook(citations) : null));
  markdown();
  const extracted = citations && extractedNote(citations);
  if (extracted) el.append(extracted);
  const footer = h("div", { class: "meta" }, meta);
  if (tokens.length) {
    const toggle = h("button", { type: "button", class: "secondary", "aria-pressed": "false" },
      "Token probabilities");
    toggle.addEventListener("click", () => {
      const on = toggle.getAttribute("aria-pressed") !== "true";
      toggle.setAttribute("aria-pressed", String(on));
      if (on) body.replaceChildren(tokenView(tokens)); else markdown();
    });
    footer.prepend(toggle, " ");
  }
  el.append(footer);
  return el;
}

function scroll() { $("thread").scrollTop = $("thread").scrollHeight; }

async function gauge(usage) {
  const model = $("model").value;
  if (!chat.windows[model]) {
    const { data } = await api("/v1/lanner/models");
    for (const m of data) if (m.context_window) chat.windows[m.id] = m.context_window;
  }
  const size = chat.windows[model];
  const used = usage ? usage.total_tokens : 0;
  $("context-gauge").value = size ? Math.min(used / size, 1) : 0;
  $("context-text").textContent = size ? `${used} / ${size} tokens` : `${used} tokens`;
}

async function ensureConversation() {
  if (chat.conversation) return;
  const made = await api("/v1/lanner/conversations", { model: $("model").value });
  chat.conversation = made.id;
  localStorage.setItem(SAVED, made.id);
}

function requestMessages() {
  const system = $("system").value.trim();
  return [...(system ? [{ role: "system", content: system }] : []), ...chat.messages];
}

/** Stream an answer into ``live``. A documents answer (``base.collection``)
 *  streams the same way; its last choice chunk carries the checked
 *  ``citations``, whose ``marked_answer`` (unverified citations as [n?])
 *  replaces the text as written. Stop aborts it; the server logs what came. */
async function streamAnswer(base, live) {
  let text = "";
  let usage = null;
  let citations = null;
  const tokens = [];
  let pending = false;
  const paint = () => { pending = false; live.body.replaceChildren(render(text)); scroll(); };
  chat.controller = new AbortController();
  try {
    await stream("/v1/chat/completions", { ...base, stream: true, stream_options: { include_usage: true } },
      (chunk) => {
        if (chunk.usage) usage = chunk.usage;
        if (chunk.citations) citations = chunk.citations;
        const choice = chunk.choices?.[0];
        if (!choice) return;
        text += choice.delta?.content || "";
        tokens.push(...(choice.logprobs?.content || []));
        if (!pending) { pending = true; requestAnimationFrame(paint); }
      }, chat.controller.signal);
    return { text: citations ? citations.marked_answer : text, usage, tokens, citations, stopped: false };
  } catch (err) {
    if (err.name === "AbortError") return { text, usage, tokens, stopped: true };
    throw err;
  }
}

async function sendMessage(text) {
  const model = $("model").value;
  const collection = $("chat-collection").value;
  chat.messages.push({ role: "user", content: text });
  showUser(text);
  setBusy(true);
  const live = bubble("assistant", model);
  live.body.textContent = "…";
  scroll();
  try {
    await ensureConversation();
    const base = { model, messages: requestMessages(), conversation_id: chat.conversation, ...settings(),
                   ...(collection ? { collection } : {}) };
    const answer = await streamAnswer(base, live);
    live.el.remove();
    chat.messages.push({ role: "assistant", content: answer.text });
    const meta = answer.stopped ? "stopped" : answer.usage ? `${answer.usage.completion_tokens} tokens` : "";
    showAnswer(answer.text, { model, tokens: answer.tokens, citations: answer.citations, meta });
    await gauge(answer.usage);
    loadConversations();
  } catch (err) {
    live.el.classList.add("error");
    live.body.textContent = `Error: ${err.message}`;
  } finally {
    setBusy(false);
    scroll();
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  if (busy) $("stop").focus(); else $("prompt").focus();
}

function startNew() {
  chat.conversation = null;
  chat.messages = [];
  localStorage.removeItem(SAVED);
  $("thread").replaceChildren();
  gauge(null);
  markCurrent();
}

async function openConversation(id) {
  const { messages } = await api(`/v1/lanner/conversations/${encodeURIComponent(id)}`);
  chat.conversation = id;
  localStorage.setItem(SAVED, id);
  const system = messages.find((m) => m.role === "system");
  $("system").value = system ? system.content : "";
  const thread = messages.filter((m) => m.role !== "system");
  chat.messages = thread.map(({ role, content }) => ({ role, content }));
  $("thread").replaceChildren();
  for (const m of thread) {
    if (m.role === "user") showUser(m.content); else showAnswer(m.content, { citations: m.citations });
  }
  markCurrent();
  scroll();
}

function markCurrent() {
  for (const b of $("conversations").querySelectorAll("button")) {
    b.setAttribute("aria-current", String(b.dataset.id === chat.conversation));
  }
}

async function loadConversations() {
  const { data } = await api("/v1/lanner/conversations?limit=30");
  $("conversations").replaceChildren(...data.map((c) => h("li", {},
    h("button", { type: "button", "data-id": c.id, title: c.title || "",
                  onclick: () => openConversation(c.id) },
      `${c.title || "(untitled)"}`))));
  markCurrent();
}

export async function initChat(models) {
  $("model").replaceChildren(...models.map((m) => h("option", { value: m.id }, m.id)));
  $("chat-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || $("send").disabled) return;
    $("prompt").value = "";
    sendMessage(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => chat.controller?.abort());
  $("new-chat").addEventListener("click", startNew);
  await loadConversations();
  const saved = localStorage.getItem(SAVED);
  if (saved) await openConversation(saved).catch(() => localStorage.removeItem(SAVED));
  gauge(null);
}

/** Called by the Documents tab when a collection appears. */
export function addCollection(name) {
  const select = $("chat-collection");
  if (![...select.options].some((o) => o.value === name)) select.append(h("option", { value: name }, name));
}
