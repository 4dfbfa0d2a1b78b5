// Chat page: keeps the conversation in memory, sends it to /v1/chat/completions with
// stream=true and appends the streamed deltas (Server-Sent Events read via fetch) as they come.
// When the conversation outgrows the model's context, the oldest turns are dropped (as the
// terminal chat does) and the page says so; a failed turn shows its error inline and leaves the
// history as it was, so the next message goes on from there.
"use strict";

const MIN_REPLY = 16;        // tokens a reply should have room for before old turns are dropped

const $ = (id) => document.getElementById(id);
const history = [];          // [{role, content}] sent with every request
let modelName = null;
let maxModelLen = null;      // the model's context in tokens (GET /v1/models)
let lastUsage = null;        // token counts of the last reply
let controller = null;       // AbortController of the request in flight

const keyBox = $("api-key");
keyBox.value = localStorage.getItem("apiKey") || "";
keyBox.addEventListener("change", () => localStorage.setItem("apiKey", keyBox.value));

function headers() {
  const h = { "Content-Type": "application/json" };
  if (keyBox.value) h["Authorization"] = "Bearer " + keyBox.value;
  return h;
}

function addMessage(role, text, imageUrl) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  if (imageUrl) {
    const img = document.createElement("img");
    img.src = imageUrl;
    img.className = "thumb";
    div.prepend(img);
  }
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function errorOf(resp) {
  try {
    const e = (await resp.json()).error;
    return Object.assign(new Error(e.message), { code: e.code });
  } catch (e) {
    return new Error(resp.status + " " + resp.statusText);
  }
}

async function loadModel() {
  const resp = await fetch("/v1/models", { headers: headers() });
  if (!resp.ok) { addMessage("error", "Could not list models: " + (await errorOf(resp)).message); return; }
  const card = (await resp.json()).data[0];
  modelName = card.id;
  maxModelLen = card.max_model_len || null;
  $("model").textContent = modelName;
}

// Yields the JSON payload of each `data: ...` SSE event until `data: [DONE]`.
async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function requestBody() {
  const body = { model: modelName, messages: history, stream: true, temperature: Number($("temperature").value),
                 stream_options: { include_usage: true } };
  const maxTokens = $("max-tokens").value;
  if (maxTokens) body.max_tokens = Number(maxTokens);  // empty: as much as the context allows
  return body;
}

// One streamed reply into `bubble`; returns its text. Throws the server's error (with its code).
async function stream(bubble) {
  const resp = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: headers(),
    signal: controller.signal,
    body: JSON.stringify(requestBody()),
  });
  if (!resp.ok) throw await errorOf(resp);
  let reply = "";
  for await (const chunk of sseEvents(resp.body)) {
    if (chunk.error) throw Object.assign(new Error(chunk.error.message), { code: chunk.error.code });
    if (chunk.usage) lastUsage = chunk.usage;
    const choice = chunk.choices && chunk.choices[0];
    if (choice && choice.delta && choice.delta.content) {
      reply += choice.delta.content;
      bubble.textContent = reply;
      bubble.scrollIntoView({ block: "end" });
    }
    if (choice && choice.finish_reason) bubble.dataset.finishReason = choice.finish_reason;
  }
  return reply;
}

function dropOld(why) {
  if (!dropOldestTurn(history)) return false;
  addMessage("notice", why);
  return true;
}

// The attached image as a data URL (null when none), read once and then cleared from the form.
function takeImage() {
  const file = $("image").files[0];
  if (!file) return Promise.resolve(null);
  $("image").value = "";
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function send(text) {
  if (!modelName) await loadModel();
  if (!modelName) return;
  const imageUrl = await takeImage();
  if (nearlyFull(lastUsage, maxModelLen, MIN_REPLY)) dropOld("(older turns dropped to leave the reply room in the context)");
  history.push({ role: "user", content: userContent(text, imageUrl) });
  addMessage("user", text, imageUrl);
  const bubble = addMessage("assistant", "");
  bubble.dataset.state = "streaming";
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").hidden = false;
  let reply = null;
  try {
    for (;;) {
      try {
        reply = await stream(bubble);
        break;
      } catch (err) {
        if (err.code !== "context_length_exceeded" || !dropOld("(older turns dropped to fit the context)")) throw err;
      }
    }
  } catch (err) {
    if (err.name !== "AbortError") {
      bubble.remove();  // no empty reply left behind
      addMessage("error", String(err.message || err));
    }
  } finally {
    if (reply === null && history.length && history[history.length - 1].role === "user") {
      history.pop();  // the failed turn leaves the conversation as it was
    } else if (reply !== null) {
      history.push({ role: "assistant", content: reply });
    }
    bubble.dataset.state = "done";
    controller = null;
    $("send").disabled = false;
    $("stop").hidden = true;
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("reset").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  lastUsage = null;
  $("messages").replaceChildren();
});
loadModel();
