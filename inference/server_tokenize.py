"""The server's tokenizer over HTTP, in vLLM's shapes, so clients (lm-evaluation-harness's
``RemoteTokenizer``, token counters) use the very ids the server does:

    POST /tokenize         {"prompt": str} or {"messages": [...]}  ->  {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize       {"tokens": [int]}                       ->  {"prompt": str}
    GET  /tokenizer_info   special tokens, chat template, context length

A text prompt is encoded as /v1/completions encodes it (no special tokens added; with
``add_special_tokens`` the document prefix first: BOS, or EOS for the project's own tokenizers).
The project's tokenizers keep special-token *text* as plain text (user text cannot forge
``<|im_end|>``); an imported model's tokenizer reads it as transformers does. Messages are
rendered by the chat template exactly as /v1/chat/completions renders them.
"""
from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request

from inference import api_protocol as P
from inference.server_http import ApiError, check_auth, check_token_ids, parse, read_json
from utils.errors import UserError


async def _body(request: Request, model: type) -> tuple[Any, Any]:
    """(the server's state, the parsed request) after auth and the model-name check."""
    srv = request.app.state.server
    check_auth(request, srv.settings)
    req = parse(model, await read_json(request, srv.settings.max_body_bytes))
    if req.model is not None:
        srv.check_model(req.model)
    return srv, req


async def tokenize(request: Request) -> dict:
    srv, req = await _body(request, P.TokenizeRequest)
    tok = srv.tokenizer
    if (req.prompt is None) == (req.messages is None):
        raise ApiError(400, "send either prompt (text) or messages (a chat), not both or neither.", param="prompt")
    if req.prompt is not None:
        ids = (list(tok.document_prefix) if req.add_special_tokens else []) + await asyncio.to_thread(tok.encode, req.prompt)
    else:
        from data_pipeline.tokenizer.chat_template import render_chat

        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            ids, _ = await asyncio.to_thread(render_chat, tok, messages, add_generation_prompt=req.add_generation_prompt)
        except UserError as err:
            raise ApiError(400, str(err), param="messages") from None
    strs = [tok.id_to_token(t) for t in ids] if req.return_token_strs else None  # vocabulary entries, as vLLM
    return P.TokenizeResponse(count=len(ids), max_model_len=srv.settings.max_model_len, tokens=list(ids), token_strs=strs).model_dump()


async def detokenize(request: Request) -> dict:
    srv, req = await _body(request, P.DetokenizeRequest)
    ids = check_token_ids(req.tokens, srv.tokenizer, "tokens")
    return P.DetokenizeResponse(prompt=srv.tokenizer.decode(ids)).model_dump()


async def tokenizer_info(request: Request) -> dict:
    """Special tokens (text), the Jinja chat template when the tokenizer has one in that form, the
    context length and the document prefix ids (lm-eval: custom_prefix_token_id)."""
    srv = request.app.state.server
    check_auth(request, srv.settings)
    tok = srv.tokenizer
    from data_pipeline.tokenizer.chat_template import HF_CHAT_TEMPLATE
    from data_pipeline.tokenizer.tokenizer import Tokenizer

    template = HF_CHAT_TEMPLATE if isinstance(tok, Tokenizer) else getattr(tok, "chat_template", None)
    return {"tokenizer_class": type(tok).__name__, **{k: tok.special_tokens.get(k) for k in ("bos_token", "eos_token", "pad_token")},
            "chat_template": template, "model_max_length": srv.settings.max_model_len, "vocab_size": tok.vocab_size,
            "document_prefix": list(tok.document_prefix)}
