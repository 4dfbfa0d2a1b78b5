// The chat page's conversation memory, kept apart from the page so it can be tested without a
// browser (tests/inference/test_web_history.py runs it under node).
"use strict";

// Drop the oldest exchange (a user turn and the replies after it), keeping a leading system turn.
// Returns false when only the newest user turn is left: nothing more can go.
function dropOldestTurn(history) {
  const first = history.length && history[0].role === "system" ? 1 : 0;
  let next = first + 1;
  while (next < history.length && history[next].role !== "user") next++;
  if (next >= history.length) return false;
  history.splice(first, next - first);
  return true;
}

// After a reply: would the next request leave less than `minReply` tokens for its answer? Then the
// page drops old turns before sending it, as the terminal chat does, instead of failing.
function nearlyFull(usage, maxModelLen, minReply) {
  if (!usage || !maxModelLen) return false;
  return usage.prompt_tokens + usage.completion_tokens + minReply > maxModelLen;
}

// A user turn's content: the text alone, or (an attached image, as a data URL) OpenAI content parts
// with the image first, which the server turns into the model's image tokens.
function userContent(text, imageUrl) {
  if (!imageUrl) return text;
  return [{ type: "image_url", image_url: { url: imageUrl } }, { type: "text", text: text }];
}

if (typeof module !== "undefined") module.exports = { dropOldestTurn, nearlyFull, userContent };
