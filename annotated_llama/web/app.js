// The chat page: talks to our own /v1/chat/completions with stream: true and renders the
// server-sent events as they arrive. No framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), prompt = $("prompt"), errorBox = $("error"), statusText = $("status");
let history = [];        // the messages sent with the next request: [{role, content}]
let controller = null;   // AbortController of the request in flight (Stop aborts it)

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

function requestBody() {
  const body = {
    messages: history,
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
  history.push({ role: "user", content: text });
  const userBox = addMessage("user", text);
  prompt.value = "";
  const answer = addMessage("assistant", "");
  const content = answer.querySelector(".content");
  answer.dataset.finish = "";
  controller = new AbortController();
  setState("generating");
  statusText.textContent = "Generating…";
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers["Authorization"] = "Bearer " + key;
  let finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers, body: JSON.stringify(requestBody()), signal: controller.signal,
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
    history.push({ role: "assistant", content: content.textContent });
    statusText.textContent = finish === "length" ? "Stopped at the token limit." : "";
  } catch (err) {
    if (err.name === "AbortError") {  // Stop: keep what arrived; the server frees the slot
      answer.dataset.finish = "stopped";
      note(answer, "(stopped)");
      history.push({ role: "assistant", content: content.textContent });
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
}).catch(() => {});
setState("idle");
prompt.focus();
