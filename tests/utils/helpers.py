"""Tiny pieces shared by the training-loop tests, and a torchrun worker.

``StreamLoader`` stands in for a rank-sharded data loader: micro-batch i of rank r holds
rows [(i*world + r)*B, ... + B) of a fixed random token stream, so one process with
grad-accum W sees exactly the rows that W processes see in one step.

Run as a worker:  torchrun --nproc_per_node 2 tests/utils/helpers.py OUT ddp:adamw,fsdp:adamw STEPS GLOBAL_ROWS
(``launch`` starts the same processes without the torchrun agent, to save an interpreter start-up).
A run's flags choose model parallelism and the model: tp2 / pp2 (train.parallel), gpipe (the
pipeline schedule), moe (the MoE config), and term / resume / long (see ``_worker``).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo root

import torch
import torch.nn.functional as F

from model import ModelConfig, Transformer

TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
SEQ = 16
# A dense first layer, then DeepSeekMoE (1 shared + 8 routed experts, top-2) with both balancing terms.
MOE = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48, ffn="moe", max_seq_len=64,
                  moe=dict(n_routed_experts=8, n_shared_experts=1, n_experts_per_tok=2, moe_d_ff=16, first_k_dense=1,
                           aux_free_bias_update_rate=0.01, seq_aux_loss_coef=0.01))


class StreamLoader:
    def __init__(self, batch_size: int, seq_len: int = SEQ, rank: int = 0, world_size: int = 1, seed: int = 0,
                 n_rows: int = 4096, vocab: int = 64):
        g = torch.Generator().manual_seed(seed)
        self.rows = torch.randint(0, vocab, (n_rows, seq_len + 1), generator=g)
        self.B, self.rank, self.world, self.i = batch_size, rank, world_size, 0

    def __iter__(self):
        return self

    def __next__(self):
        start = ((self.i * self.world + self.rank) * self.B) % (len(self.rows) - self.B)
        self.i += 1
        rows = self.rows[start:start + self.B]
        return rows[:, :-1].clone(), rows[:, 1:].clone()

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = int(state["i"])


def tiny_model(seed: int = 0, cfg: ModelConfig = TINY) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg)


def ce_loss(model, batch):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()), {}


def held_out_loss(model) -> dict:
    """An eval_fn: the loss on fixed rows that training never reads (every rank sees the same rows)."""
    x, y = next(StreamLoader(4, seed=99))
    return {"val_loss": float(ce_loss(model, (x, y))[0])}


def _worker() -> None:
    """argv: OUT RUNS STEPS GLOBAL_ROWS with RUNS like "ddp:adamw,fsdp:muon"; each run trains
    a fresh tiny model and rank 0 writes OUT/<kind>_<optim>/history.json."""
    import json

    from utils.distributed import setup
    from utils.optim import OptimConfig
    from utils.train_config import ParallelConfig
    from utils.train_loop import TrainConfig, train

    out, runs, steps, global_rows = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    _probe_process_group_at_exit(Path(out))
    if runs[0].startswith("exit:"):
        return _exit_worker(Path(out), runs[0].split(":")[1], steps, global_rows)
    for run in runs:
        # flags: "term" = SIGTERM on rank 1 in step 2; "resume" = continue the "term" run's
        # directory; both (and "long") train 2 steps more than the plain runs.
        kind, optim, *flags = run.split(":")
        run_dir = Path(out) / "_".join([kind, optim, *[("term" if f == "resume" else f) for f in flags]])
        lengthen = {"term", "resume", "long"} & set(flags)
        parallel = ParallelConfig(tp=2 if "tp2" in flags else 1, pp=2 if "pp2" in flags else 1,
                                  pp_schedule="gpipe" if "gpipe" in flags else "1f1b")
        cfg = TrainConfig(out_dir=str(run_dir), max_steps=steps + 2 if lengthen else steps, batch_size=2, seq_len=SEQ,
                          global_batch_size=global_rows, distributed=kind, device="cpu", parallel=parallel,
                          resume="auto" if "resume" in flags else "never", progress=False, log_every=100)
        env = setup(cfg.distributed, cfg.device, cfg.parallel)
        loader_cls = TermOnRank1 if "term" in flags else StreamLoader
        loader = loader_cls(cfg.batch_size, rank=env.dp_rank, world_size=env.dp_size)
        model = tiny_model(cfg=MOE if "moe" in flags else TINY)
        eval_fn = held_out_loss if "eval" in flags else None
        try:
            result = train(model, loader, ce_loss, cfg, OptimConfig(name=optim, lr=1e-2, warmup_steps=1), eval_fn=eval_fn)
        except KeyboardInterrupt:  # "term": every rank must stop at the same step
            (run_dir / f"stopped_rank{env.rank}").write_text(str(loader.i))
            continue
        if env.rank == 0:
            (run_dir / "history.json").write_text(json.dumps([h["loss"] for h in result.history]))
            (run_dir / "final_eval.json").write_text(json.dumps(result.final_eval))
            (run_dir / "grad_norms.json").write_text(json.dumps([h["grad_norm"] for h in result.history]))


def _probe_process_group_at_exit(out: Path) -> None:
    """Write whether the process group is still alive when the interpreter starts to shut down.
    Registered before ``utils.distributed.setup``'s handler, so it runs after it (atexit is LIFO)."""
    import atexit
    import os

    import torch.distributed as dist

    rank = os.environ.get("RANK", "0")
    atexit.register(lambda: (out / f"pg_alive_at_exit_rank{rank}").write_text(str(dist.is_initialized())))


def _exit_worker(out: Path, how: str, steps: int, global_rows: int) -> None:
    """Train a few DDP steps, then leave the way a stage script can: return, a UserError or
    Ctrl-C through ``main_guard`` (exit 0, 2, 130). No stage calls destroy_process_group itself."""
    from utils.cli import main_guard
    from utils.errors import UserError
    from utils.optim import OptimConfig
    from utils.train_loop import TrainConfig, train

    def main():
        cfg = TrainConfig(out_dir=str(out / "run"), max_steps=steps, batch_size=2, seq_len=SEQ,
                          global_batch_size=global_rows, distributed="ddp", device="cpu", resume="never",
                          progress=False, log_every=100)
        from utils.distributed import setup

        env = setup("ddp", "cpu")
        train(tiny_model(), StreamLoader(2, rank=env.rank, world_size=env.world_size), ce_loss, cfg,
              OptimConfig(lr=1e-2, warmup_steps=1))
        if how == "usererror":
            raise UserError("a recipe mistake found after training")
        if how == "interrupt":
            raise KeyboardInterrupt

    main_guard(main)


class TermOnRank1(StreamLoader):
    """Only rank 1 gets SIGTERM (as from a scheduler), while fetching its second micro-batch."""

    def __next__(self):
        import os

        if os.environ.get("RANK") == "1" and self.i == 1:  # the process, not the data shard (tp ranks share one)
            import signal

            os.kill(os.getpid(), signal.SIGTERM)
        return super().__next__()


def launch(out: str, runs: str, steps: int, global_rows: int, world: int = 2, timeout: float = 300):
    """Start ``world`` worker processes with the variables torchrun would set."""
    import os
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, __file__, out, runs, str(steps), str(global_rows)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], outputs


if __name__ == "__main__":
    _worker()
