// The chat page: talks to our own /v1/chat/completions with stream: true and renders the
// server-sent events as they arrive. No framework, no build step.
// A conversation longer than the model's context is not an error here: before each request the
// page counts the prompt with /tokenize and leaves out the oldest turns until the system prompt,
// the newest turns and max_tokens fit, and says so (as llama.cpp's and ollama's front ends do).
// The API itself keeps OpenAI's semantics: an over-long request is a 400 context_length_exceeded.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), prompt = $("prompt"), errorBox = $("error"), statusText = $("status");
let history = [];        // the conversation: [{role, content, box}] (box: its element on the page)
let controller = null;   // AbortController of the request in flight (Stop aborts it)
let contextTokens = null;  // the model's context, from /health

function setState(state) {  // "idle" | "generating"; tests and CSS read body[data-state]
  document.body.dataset.state = state;
  $("send").disabled = state === "generating";
  $("stop").disabled = state !== "generating";
}

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = !message;
}

function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = "msg " + role;
  box.dataset.role = role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role === "user" ? "You" : "Assistant";
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  box.append(label, content);
  log.append(box);
  log.scrollTop = log.scrollHeight;
  return box;
}

function note(box, text) {
  const n = document.createElement("div");
  n.className = "note";
  n.textContent = text;
  box.append(n);
}

function numberOr(id, parse, fallback) {
  const v = $(id).value.trim();
  if (v === "") return fallback;
  const x = parse(v);
  return Number.isFinite(x) ? x : fallback;
}

function systemMessages() {
  const text = $("system").value.trim();
  return text ? [{ role: "system", content: text }] : [];
}

function apiHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers["Authorization"] = "Bearer " + key;
  return headers;
}

// The newest turns that fit: drop the oldest user/assistant pair while the prompt (as /tokenize
// counts it under the chosen template) plus max_tokens exceeds the context. The last user message
// always stays; if it alone does not fit, the server's error says so.
async function fitHistory(maxTokens) {
  let start = 0;
  for (const m of history) m.box.classList.remove("dropped");
  if (!contextTokens) return { start, dropped: 0 };
  for (;;) {
    const messages = systemMessages().concat(history.slice(start).map(({ role, content }) => ({ role, content })));
    let count = null;
    try {
      const r = await fetch("/tokenize", { method: "POST", headers: apiHeaders(),
        body: JSON.stringify({ messages, template: $("template").value }) });
      if (r.ok) count = (await r.json()).count;
    } catch (e) { /* no count: send as it is */ }
    if (count === null || count + maxTokens <= contextTokens || history.length - start <= 1) break;
    start += history[start].role === "user" && history.length - start > 2 ? 2 : 1;
  }
  for (const m of history.slice(0, start)) m.box.classList.add("dropped");
  return { start, dropped: start };
}

function requestBody(start = 0) {
  const body = {
    messages: systemMessages().concat(history.slice(start).map(({ role, content }) => ({ role, content }))),
    stream: true,
    template: $("template").value,
    temperature: numberOr("temperature", parseFloat, 0.7),
    top_p: numberOr("top-p", parseFloat, 0.9),
    max_tokens: numberOr("max-tokens", (v) => parseInt(v, 10), 128),
  };
  const seed = numberOr("seed", (v) => parseInt(v, 10), null);
  if (seed !== null) body.seed = seed;
  return body;
}

function errorText(status, data) {  // OpenAI's error object, or whatever came back
  if (data && data.error && data.error.message) {
    return `Error ${status}: ${data.error.message}`;
  }
  return `Error ${status}: the server answered in an unexpected way`;
}

async function send() {
  const text = prompt.value;
  if (!text.trim() || document.body.dataset.state === "generating") return;
  showError("");
  const userBox = addMessage("user", text);
  history.push({ role: "user", content: text, box: userBox });
  prompt.value = "";
  const answer = addMessage("assistant", "");
  const content = answer.querySelector(".content");
  answer.dataset.finish = "";
  controller = new AbortController();
  setState("generating");
  statusText.textContent = "Generating…";
  let finish = null, fitted = { start: 0, dropped: 0 };
  try {
    const body = requestBody();
    fitted = await fitHistory(body.max_tokens);
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: apiHeaders(), body: JSON.stringify(requestBody(fitted.start)),
      signal: controller.signal,
    });
    if (!response.ok) {
      let data = null;
      try { data = await response.json(); } catch (e) { /* not JSON */ }
      throw new Error(errorText(response.status, data));
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {  // one server-sent event per blank line
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error("Error: " + chunk.error.message);
          for (const choice of chunk.choices || []) {
            if (choice.delta && choice.delta.content) {
              content.textContent += choice.delta.content;
              log.scrollTop = log.scrollHeight;
            }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
    }
    answer.dataset.finish = finish || "stop";
    history.push({ role: "assistant", content: content.textContent, box: answer });
    const parts = [];
    if (fitted.dropped) {
      parts.push(`Left out the ${fitted.dropped} oldest message${fitted.dropped > 1 ? "s" : ""} to fit the ` +
                 `model's context of ${contextTokens} tokens.`);
    }
    if (finish === "length") parts.push("Stopped at the token limit.");
    statusText.textContent = parts.join(" ");
  } catch (err) {
    if (err.name === "AbortError") {  // Stop: keep what arrived; the server frees the slot
      answer.dataset.finish = "stopped";
      note(answer, "(stopped)");
      history.push({ role: "assistant", content: content.textContent, box: answer });
      statusText.textContent = "Stopped.";
    } else {
      answer.dataset.finish = "error";
      answer.remove();
      userBox.classList.add("failed");
      history.pop();  // the failed message is not part of the conversation
      showError(err.message || String(err));
      statusText.textContent = "";
    }
  } finally {
    controller = null;
    setState("idle");
    prompt.focus();
  }
}

function transcript() {
  return history.map((m) => (m.role === "user" ? "You: " : "Assistant: ") + m.content).join("\n\n");
}

async function copyConversation() {
  const text = transcript();
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {  // no clipboard permission (plain http, headless): the old way
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  document.body.dataset.copied = text;
  statusText.textContent = "Conversation copied.";
}

$("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
document.addEventListener("keydown", (e) => {  // Escape stops, wherever the focus is
  if (e.key === "Escape" && controller) { e.preventDefault(); controller.abort(); }
});
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  log.replaceChildren();
  showError("");
  statusText.textContent = "";
  prompt.focus();
});
$("copy").addEventListener("click", copyConversation);

// The server's model name and default template.
fetch("/health").then((r) => r.json()).then((h) => {
  $("model-name").textContent = h.model ? "· " + h.model : "";
  if (h.template) $("template").value = h.template;
  if (h.n_ctx) contextTokens = h.n_ctx;
}).catch(() => {});
setState("idle");
prompt.focus();
