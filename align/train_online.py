"""Online RL: PPO (actor + critic, GAE), GRPO, GSPO and rejection-sampling finetuning (rft).

    python align/train_online.py --config_path configs/examples/align_grpo.yaml [key=value ...]

Rollout phase -> optimisation phase, on the one training loop: the batch iterator
(align/online.py::RolloutBatches) runs a rollout phase through the inference engine whenever
its buffer is used up, then serves the buffer for rl.epochs passes. The optimizer, schedule,
logging, checkpoints and resume are the loop's; the checkpoint's data state carries the
rollout counter and the current buffer.

Rewards: a rule by name (reward.function, align/rewards.py) or a reward-model checkpoint
(reward.model_path, from align/train_offline.py algorithm=reward). Exact-answer accuracy on
held-out prompts is measured before training, at train.eval_every and at the end, and
written to {out_dir}/rl_eval.json. {out_dir}/final holds the policy (LoRA: its adapters);
PPO also writes the critic to {out_dir}/critic.
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import contextlib  # noqa: E402
import json  # noqa: E402
from dataclasses import replace  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

import torch  # noqa: E402

from align.online import ActorCritic, RolloutBatches, RolloutPhase, make_rl_loss  # noqa: E402
from align.policy import frozen_copy, load_policy, load_tokenizer, make_trainable, quantize_base  # noqa: E402
from align.recipe import OnlineRecipe  # noqa: E402
from align.rewards import get_reward_fn  # noqa: E402
from align.rollout import check_rollout_length, encode_prompts, load_prompts, rule_rewards  # noqa: E402
from inference.answers import exact_answer_check  # noqa: E402
from model.heads import ScalarHeadModel, save_scalar_model  # noqa: E402
from model.load import load_model  # noqa: E402
from model.loss import with_aux_loss  # noqa: E402
from utils.checkpoint import save_checkpoint  # noqa: E402
from utils.cli import main_guard  # noqa: E402
from utils.config import parse_args  # noqa: E402
from utils.distributed import setup  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.fs import atomic_file  # noqa: E402
from utils.train_loop import grad_accum_steps, train  # noqa: E402


def _autocast(train_dtype: str, device: torch.device):
    """The loop's mixed precision for the rollout-phase forwards, so old log-probs match the
    ones the loss recomputes (ratio exactly 1 before the first update)."""
    bf16 = device.type == "cuda" and (train_dtype == "bf16" or (train_dtype == "auto" and torch.cuda.is_bf16_supported()))
    if bf16 or train_dtype == "fp16":
        dtype = torch.bfloat16 if bf16 else torch.float16
        return lambda: torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext


def _score_fn(cfg: OnlineRecipe, policy_cfg, device: torch.device, chunk: int):
    """(rollout, reference answers) -> (N,) scores: a reward model, or a rule by name."""
    if not cfg.reward.model_path:
        fn = get_reward_fn(cfg.reward.function)
        return lambda ro, answers: rule_rewards(ro.texts, answers, fn)
    rm = load_model(cfg.reward.model_path, device=device, expect="scalar_head")
    if rm.cfg.vocab_size != policy_cfg.vocab_size:
        raise UserError(f"reward model {cfg.reward.model_path} has vocab_size {rm.cfg.vocab_size}, the policy "
                        f"{policy_cfg.vocab_size}; it must be trained with the same tokenizer.")
    for p in rm.parameters():
        p.requires_grad_(False)

    @torch.no_grad()
    def score(ro, answers):
        tokens, lengths = ro.tokens.to(device), ro.lengths.to(device)
        return torch.cat([rm.score(tokens[i : i + chunk], lengths[i : i + chunk]) for i in range(0, len(tokens), chunk)]).cpu()

    return score


def run(cfg: OnlineRecipe) -> dict:
    """Train as the recipe says; returns {"before", "after", "train", ...}."""
    if cfg.train.distributed == "fsdp":
        raise UserError("online RL generates with the whole policy on each process; use train.distributed=ddp "
                        "(FSDP would need every rank to run the same number of generation forwards).")
    env = setup(cfg.train.distributed, cfg.train.device)
    ro_cfg, rl = cfg.rollout, cfg.rl
    tokenizer, tokenizer_path = load_tokenizer(cfg.model)
    from data_pipeline.tokenizer.chat_template import chat_stop_ids
    from inference.sampling_params import SamplingParams

    rows = load_prompts(ro_cfg.train_prompts, ro_cfg.fields)
    prompt_ids = encode_prompts(tokenizer, [r["question"] for r in rows])
    test_rows = (load_prompts(ro_cfg.test_prompts, ro_cfg.fields)[: ro_cfg.eval_prompts]
                 if ro_cfg.test_prompts and ro_cfg.eval_prompts else [])
    test_ids = encode_prompts(tokenizer, [r["question"] for r in test_rows])

    # Bad input is refused here, before a model is trained.
    accum = grad_accum_steps(cfg.train, env.world_size)
    rows_per_step = cfg.train.batch_size * accum
    if cfg.buffer_rows % rows_per_step:
        raise UserError(f"a rollout buffer holds {cfg.buffer_rows} rows per process "
                        f"(rollout.prompts_per_rollout x group_size{'' if cfg.algorithm != 'rft' else ' / group_size'}) but "
                        f"an optimizer step takes {rows_per_step} (train.batch_size x grad accumulation); make the "
                        "buffer a multiple of the step so no step mixes two rollouts.")
    policy = load_policy(cfg.model, env.device)
    max_len = policy.cfg.max_seq_len
    check_rollout_length(prompt_ids, ro_cfg.max_new_tokens, max_len, ro_cfg.train_prompts)
    if test_ids:
        check_rollout_length(test_ids, ro_cfg.max_new_tokens, max_len, ro_cfg.test_prompts)
    longest = max(len(p) for p in prompt_ids + test_ids) + ro_cfg.max_new_tokens
    steps_per_rollout = rl.epochs * cfg.buffer_rows // rows_per_step

    quantized = quantize_base(policy, cfg.model)
    reference = frozen_copy(policy)  # before adapters: the reference is the starting policy
    trainable = make_trainable(policy, cfg.model, quantized)
    critic = None
    if cfg.algorithm == "ppo":
        critic = (load_model(rl.critic_init, device=env.device, train=True, expect="scalar_head") if rl.critic_init
                  else ScalarHeadModel(load_policy(cfg.model, env.device)))
        critic = critic.to(env.device).train()
    chunk = max(cfg.train.batch_size, 8)
    engine_kwargs = {"block_size": ro_cfg.block_size, "max_num_seqs": ro_cfg.max_num_seqs, "max_model_len": longest}
    sampling = SamplingParams(max_tokens=ro_cfg.max_new_tokens, temperature=ro_cfg.temperature, top_k=ro_cfg.top_k, top_p=ro_cfg.top_p)
    autocast = _autocast(cfg.train.dtype, env.device)
    phase = RolloutPhase(
        algorithm=cfg.algorithm, policy=policy, reference=reference, critic=critic,
        score_fn=_score_fn(cfg, policy.cfg, env.device, chunk), prompts=prompt_ids, answers=[r["answer"] for r in rows],
        sampling=sampling, group_size=ro_cfg.group_size, prompts_per_rollout=ro_cfg.prompts_per_rollout,
        stop_ids=chat_stop_ids(tokenizer), tokenizer=tokenizer, engine_kwargs=engine_kwargs, rl=rl, chunk=chunk,
        seed=cfg.train.seed, device=env.device, autocast=autocast, rank=env.rank, world_size=env.world_size,
        log=(print if env.is_main else (lambda s: None)), on_policy=steps_per_rollout == 1)
    batches = RolloutBatches(phase, cfg.train.batch_size, rl.epochs, seed=cfg.train.seed, one_step=steps_per_rollout == 1)
    clip, clip_high = rl.clip(cfg.algorithm)
    loss_fn = make_rl_loss(cfg.algorithm, clip_eps=clip, clip_eps_high=clip_high, kl_beta=rl.kl_beta,
                           aggregation=rl.aggregation, vf_coef=rl.vf_coef, vf_clip=rl.vf_clip,
                           temperature=ro_cfg.temperature)
    loss_fn = with_aux_loss(loss_fn, cfg.train.aux_loss, print if env.is_main else (lambda s: None))

    def policy_weights(actor: torch.nn.Module) -> dict:
        return trainable.weights_fn(actor) if trainable.weights_fn else actor.weights(live=True)

    if critic is not None:
        model = ActorCritic(policy, critic)
        weights_fn = lambda m: {**policy_weights(m.actor), **{"critic." + k: v for k, v in m.critic.weights(live=True).items()}}  # noqa: E731
    else:
        model, weights_fn = policy, trainable.weights_fn

    def eval_fn(m: torch.nn.Module) -> dict:
        if not test_rows:
            return {}
        actor = m.actor if isinstance(m, ActorCritic) else m
        out = exact_answer_check(actor, tokenizer, test_rows, ro_cfg.max_new_tokens, **engine_kwargs)
        return {"val_accuracy": out["accuracy"], "val_format": out["format_rate"], "val_response_len": out["mean_response_tokens"]}

    meta = {**trainable.meta, "stage": f"align_{cfg.algorithm}"}
    train_cfg = replace(cfg.train, seq_len=longest)
    before = eval_fn(model)
    if env.is_main:
        print(f"{cfg.algorithm}: {len(rows)} train prompts, {len(test_rows)} held-out | buffer {cfg.buffer_rows} rows/process | "
              f"{steps_per_rollout} optimizer step(s) per rollout | {-(-cfg.train.max_steps // steps_per_rollout)} rollouts")
        print(f"before: {json.dumps(before)}")
    result = train(model, batches, loss_fn, train_cfg, cfg.optim, eval_fn=eval_fn if test_rows else None, recipe=cfg,
                   params=trainable.params, weights_fn=weights_fn, checkpoint_meta=meta, tokenizer_path=tokenizer_path)
    out_dir = pathlib.Path(cfg.train.out_dir)
    if critic is not None and env.is_main:
        # final/ is the policy alone (loadable by the next stage); the critic goes beside it.
        weights = {k: v.detach().cpu().contiguous() for k, v in policy_weights(policy).items()}
        save_checkpoint(out_dir / "final", policy, recipe=cfg, weights=weights, tokenizer_path=tokenizer_path,
                        meta={"step": result.final_step, **meta})
        save_scalar_model(out_dir / "critic", critic, meta={"step": result.final_step})
    after = result.final_eval
    rollout_keys = ("reward_mean", "accuracy", "kl_ref", "response_len", "clipfrac", "kl")
    curve = [{"step": h["step"], **{k: h[k] for k in rollout_keys if k in h}} for h in result.history if "reward_mean" in h]
    summary = {"algorithm": cfg.algorithm, "n_eval_prompts": len(test_rows), "before": before, "after": after,
               "steps": result.final_step, "checkpoint": str(result.checkpoint), "curve": curve}
    if env.is_main:
        print(f"after:  {json.dumps(after)}")
        with atomic_file(out_dir / "rl_eval.json") as f:
            json.dump(summary, f, indent=2)
    return {**summary, "train": result}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cfg, _ = parse_args(OnlineRecipe, "PPO / GRPO / GSPO / rejection-sampling finetuning with engine rollouts.", argv)
    return run(cfg)


if __name__ == "__main__":
    main_guard(main)
