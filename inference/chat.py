"""Streaming terminal chat with a checkpoint.

    python inference/chat.py --checkpoint runs/sft/step_00001000 [--system "You are terse."]   # full model or adapter

Type a message and the reply streams token by token. The conversation is kept (oldest turns
are dropped when it outgrows the context); ``/reset`` starts over, ``/exit`` or Ctrl-D quits,
Ctrl-C stops a reply mid-way. With a vision-language model, ``/image PATH`` attaches an image
file (PNG, JPEG, ...) to the next message. Prompts go through the project's one chat template and
generation through the engine, exactly as the server does.
"""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import time
from typing import Any, Optional, Sequence, TextIO

from data_pipeline.vision_chat import IMAGE_MARKER, render_with_images
from inference.sampling_params import SamplingParams
from inference.serve_recipe import ChatRecipe, load_serving, parse_serving_args
from inference.server import chat_format
from utils.errors import UserError


def fit_history(tok: Any, render_chat: Any, messages: list[dict], max_model_len: int, min_reply: int) -> list[int]:
    """Render ``messages``, dropping the oldest non-system turns until at least ``min_reply``
    tokens of context are left for the answer. Returns the prompt ids (messages is trimmed in place).
    ``render_chat(tok, messages, add_generation_prompt=True)`` -> (ids, mask)."""
    while True:
        ids, _ = render_chat(tok, messages, add_generation_prompt=True)
        if len(ids) + min_reply <= max_model_len:
            return list(ids)
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            raise UserError(f"the message is {len(ids)} tokens with the chat template; the context is {max_model_len}. Send something shorter.")
        del messages[first : first + 2 if len(messages) - first > 2 else first + 1]


def reply(engine: Any, prompt_ids: list[int], params: SamplingParams, out: TextIO,
          images: Optional[Any] = None) -> tuple[str, int]:
    """Generate and stream one answer to ``out``. Returns (text, generated tokens)."""
    request_id = engine.add_request(prompt_ids, params, images=images)
    text, n_tokens = "", 0
    try:
        while engine.has_unfinished():
            for o in engine.step():
                if o.request_id != request_id:
                    continue
                if o.finish_reason == "error":
                    raise UserError(o.error or "the engine could not run this request")
                text += o.new_text
                n_tokens = len(o.output_token_ids)
                out.write(o.new_text)
                out.flush()
    except KeyboardInterrupt:  # stop this answer, keep the chat
        engine.abort(request_id)
        while engine.has_unfinished():
            engine.step()
        out.write(" [stopped]")
    return text, n_tokens


class ChatImages:
    """The images of a terminal chat: ``/image PATH`` loads one for the next message, which then
    carries an ``<image>`` marker per image; the history's images are the markers still in it."""

    def __init__(self, model: Any):
        self.cfg = model.cfg
        self.pending: list = []  # loaded, waiting for the next message
        self.sent: list = []  # in the history, in marker order

    def attach(self, path: str) -> str:
        from data_pipeline.images import load_image_file

        if self.cfg.vision is None:
            raise UserError("this model has no vision encoder, so it cannot read images; chat with a vision-language model.")
        if not path:
            raise UserError("/image needs a file: /image pics/cat.png")
        self.pending.append(load_image_file(path))
        return f"(image {path} attached to your next message)"

    def user_message(self, text: str) -> dict:
        """The next user turn, a marker per pending image first (each on its own line)."""
        if IMAGE_MARKER in text:
            raise UserError(f"the text {IMAGE_MARKER} marks where an image goes; attach images with /image PATH instead.")
        markers = "".join(IMAGE_MARKER + "\n" for _ in self.pending)
        self.sent += self.pending
        self.pending = []
        return {"role": "user", "content": markers + text}

    def forget(self, message: dict) -> None:
        """A refused last message: its images leave with it."""
        n = message["content"].count(IMAGE_MARKER)
        self.sent = self.sent[: len(self.sent) - n]

    def render(self, tok: Any, messages: list[dict], add_generation_prompt: bool = True):
        """render_chat with the images still in ``messages`` (dropped turns take theirs along)."""
        n = sum(m["content"].count(IMAGE_MARKER) for m in messages if isinstance(m["content"], str))
        self.sent = self.sent[len(self.sent) - n:]
        v = self.cfg.vision
        return render_with_images(tok, messages, n, v["image_token_id"] if v else None, self.cfg.image_tokens,
                                  add_generation_prompt=add_generation_prompt)

    def pixels(self):
        from data_pipeline.images import to_pixels

        return to_pixels(self.sent, self.cfg.vision["image_size"]) if self.sent else None


def chat_loop(engine: Any, tok: Any, args: ChatRecipe, stdin: TextIO, out: TextIO, err: TextIO) -> None:
    _, chat_stop_ids = chat_format()
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    images = ChatImages(engine.model)
    interactive = stdin.isatty()
    while True:
        if interactive:
            out.write("\n> ")
            out.flush()
        line = stdin.readline()
        if not line:  # EOF
            break
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            messages, images = list(system), ChatImages(engine.model)
            out.write("(conversation reset)\n")
            continue
        if text.strip() == "/image" or text.startswith("/image "):
            try:
                out.write(images.attach(text[len("/image"):].strip()) + "\n")
            except UserError as e:
                err.write(f"error: {e}\n")
            continue
        if not text.strip():
            continue
        try:
            messages.append(images.user_message(text))
            prompt_ids = fit_history(tok, images.render, messages, engine.max_model_len, min(args.max_tokens, 16))
        except UserError as e:
            if messages and messages[-1]["role"] == "user":
                images.forget(messages.pop())
            err.write(f"error: {e}\n")
            continue
        params = SamplingParams(
            max_tokens=min(args.max_tokens, engine.max_model_len - len(prompt_ids)), temperature=args.temperature,
            top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
            stop_token_ids=list(chat_stop_ids(tok)),
        ).validate(engine.max_model_len)
        t0 = time.perf_counter()
        answer, n_tokens = reply(engine, prompt_ids, params, out, images.pixels())
        out.write("\n")
        out.flush()
        messages.append({"role": "assistant", "content": answer})
        if args.stats:
            dt = time.perf_counter() - t0
            rate = engine.acceptance_rate
            spec = f", draft acceptance {rate:.0%}" if rate is not None else ""
            err.write(f"[{len(prompt_ids)} prompt tokens, {n_tokens} generated, {n_tokens / max(dt, 1e-9):.1f} tok/s{spec}]\n")
            err.flush()


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_serving_args(ChatRecipe, "Streaming terminal chat with a checkpoint (/reset, /exit). Every key is "
                                          "a flag (--max-tokens 64) and a YAML key (--config_path chat.yaml).", argv)
    engine, tok = load_serving(args)
    if sys.stdin.isatty():
        images = " /image PATH attaches an image." if engine.model.cfg.vision is not None else ""
        print(f"chatting with {args.checkpoint} ({engine.max_model_len}-token context). /reset starts over, /exit quits.{images}")
    chat_loop(engine, tok, args, sys.stdin, sys.stdout, sys.stderr)


if __name__ == "__main__":
    from utils.cli import main_guard

    main_guard(main)
