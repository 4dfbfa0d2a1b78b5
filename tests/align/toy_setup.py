"""Tiny models, a character tokenizer and toy tasks shared by the alignment trainer tests."""
from __future__ import annotations

import random

import torch

from align.online import RolloutPhase
from align.preference import PreferencePair
from align.recipe import RLConfig
from inference.sampling_params import SamplingParams
from model.config import ModelConfig
from model.transformer import Transformer
from utils.spike import SpikeConfig
from utils.train_loop import TrainConfig

V = 16
STOP = 1  # end of turn
TARGET = 5  # the token the toy rewards ask for
AVOID = 6


class CharTok:
    """Token i <-> letter chr(97 + i); id 1 is the end-of-turn / EOS."""

    eos_id = STOP
    vocab_size = V

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 97 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(97 + int(i)) for i in ids)


USER, ASSISTANT = 2, 3  # turn markers of the character chat template


def render_char_chat(tok, messages: list[dict], add_generation_prompt: bool = True) -> tuple[list[int], list[int]]:
    """A stand-in for data_pipeline/tokenizer/chat_template.py's render_chat over CharTok: each turn is
    its marker, its text and STOP; the mask marks the assistant's text and STOP."""
    ids, mask = [], []
    for m in messages:
        body = tok.encode(m["content"]) + [STOP]
        ids += [ASSISTANT if m["role"] == "assistant" else USER] + body
        mask += [0] + [int(m["role"] == "assistant")] * len(body)
    if add_generation_prompt:
        ids, mask = ids + [ASSISTANT], mask + [0]
    return ids, mask


def tiny_policy(seed: int = 0, max_seq_len: int = 48) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=max_seq_len))


def toy_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, V) for _ in range(rng.randint(2, 4))] for _ in range(n)]


def target_fraction(ro, answers) -> torch.Tensor:
    """Reward = share of response tokens (stop token excluded) that are TARGET."""
    out = []
    for row, m in zip(ro.tokens, ro.response_mask):
        resp = [t for t in row[m].tolist() if t != STOP]
        out.append(sum(t == TARGET for t in resp) / max(1, len(resp)))
    return torch.tensor(out)


def make_phase(algorithm, policy, reference, prompts, *, critic=None, G=4, P=4, max_new=8, rl=None, seed=0, on_policy=False):
    return RolloutPhase(
        algorithm=algorithm, policy=policy, reference=reference, critic=critic, score_fn=target_fraction,
        prompts=prompts, answers=[""] * len(prompts), sampling=SamplingParams(max_tokens=max_new, temperature=1.0),
        group_size=G, prompts_per_rollout=P, stop_ids=[STOP], tokenizer=CharTok(),
        engine_kwargs={"block_size": 8, "max_num_seqs": 64, "max_model_len": 16 + max_new}, rl=rl or RLConfig(),
        chunk=16, seed=seed, device=torch.device("cpu"), log=lambda s: None, on_policy=on_policy)


def train_cfg(out_dir, max_steps: int, batch_size: int, **kw) -> TrainConfig:
    return TrainConfig(out_dir=str(out_dir), max_steps=max_steps, batch_size=batch_size, seq_len=32, device="cpu",
                       progress=False, log_every=1000, resume="never", spike=SpikeConfig(enabled=False), **kw)


def toy_pairs(n: int, seed: int = 0) -> list[PreferencePair]:
    """Chosen replies are mostly TARGET tokens, rejected mostly AVOID tokens (then STOP)."""
    rng = random.Random(seed)
    pairs = []
    for prompt in toy_prompts(n, seed):
        k = rng.randint(2, 5)
        noise = lambda: rng.randrange(2, V)  # noqa: E731
        chosen = [TARGET if rng.random() < 0.8 else noise() for _ in range(k)] + [STOP]
        rejected = [AVOID if rng.random() < 0.8 else noise() for _ in range(k)] + [STOP]
        pairs.append(PreferencePair(prompt, chosen, rejected))
    return pairs


def params_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_params(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
