"""Fault injection: kills, corrupted bytes, bad input, sandbox escapes, divergence. One run.

    python bench/bench_faults.py [--kills 25] [--trials 50] [--ddp 0] [--only kills,corrupt,...]

Each part measures against a reference taken in the same run:
  kills      pretraining (0.8M parameters, a checkpoint every step) SIGKILLed, every other time while a
             save is in progress and otherwise at a random moment, and restarted until it finishes:
             kills survived, unfinished saves found and removed, whether the newest checkpoint loads
             (checksums verified) after each kill, and whether the final weights equal an
             uninterrupted run's, bit for bit.
  corrupt    bits flipped in a checkpoint's weights (tensor bytes) and train state: how many loads
             the checksums stop, against how many load silently with LLM_VERIFY_CHECKSUMS=0.
  verify     what verifying costs: loading a ~100 MB checkpoint with and without the checksum.
  cases      bad input through the real commands, as a user types them: each must exit 2 with one
             "error:" paragraph, no traceback, and no final/ or half-written output.
  sandbox    the HumanEval escapes (tests/eval/test_humaneval_exec.py) in each available layer.
  diverge    lr=1e6 and a slow loss climb: where the run stops, against the z-score alone.
  ddp        (--ddp N) N interrupted-and-resumed 2-rank DDP pretraining runs under torchrun:
             exit codes and aborts at shutdown.
The commands run with OMP_NUM_THREADS=1 (other jobs may share the cores).
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from utils.cli import main_guard

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
RECIPE = str(ROOT / "configs/examples/pretrain_tiny.yaml")


def tiny_data(folder: Path) -> list[str]:
    """A data directory as the pipeline lays it out (a 300-token BPE tokenizer, synthetic SFT chats,
    pretraining bins of a learnable 7-token cycle) and pretrain/train.py overrides for a
    ~50k-parameter model over it."""
    from data_pipeline.synthetic.sft import generate_conversations
    from data_pipeline.tokenizer.tokenizer import file_hash
    from data_pipeline.tokenizer.train_tokenizer import row_text, train_hf

    rng = random.Random(0)
    (folder / "raw").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 60), ("val", 8)):
        rows = generate_conversations(rng, n, "sft" if split == "train" else "val")
        (folder / "raw" / f"sft_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = folder / "tokenizer" / "tokenizer.json"
    tok.parent.mkdir(exist_ok=True)
    texts = [row_text(json.loads(line)) for line in (folder / "raw" / "sft_train.jsonl").read_text().splitlines()]
    train_hf(texts, 300, False).save(str(tok))
    bins = folder / "bins" / "pretrain"
    bins.mkdir(parents=True, exist_ok=True)
    cycle = np.array([3, 9, 4, 1, 7, 2, 5], dtype=np.uint16)
    for split, n in (("train", 20000), ("val", 4000)):
        np.tile(cycle, n // 7 + 1)[:n].tofile(bins / f"{split}.bin")
    (bins / "meta.json").write_text(json.dumps({"format": "pretrain", "dtype": "uint16", "vocab_size": 32,
                                                "n_tokens": {"train": 20000, "val": 4000},
                                                "tokenizer_hash": file_hash(tok)}))
    over = {"data.train_bin": bins / "train.bin", "data.val_bin": bins / "val.bin", "data.tokenizer": tok,
            "model.vocab_size": 320, "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4,
            "model.n_kv_heads": 2, "model.max_seq_len": 256, "train.batch_size": 4, "train.seq_len": 32,
            "train.global_batch_tokens": None, "train.eval_every": 0, "train.eval_batches": 2,
            "train.device": "cpu", "train.progress": False, "optim.lr": 1e-2, "optim.warmup_steps": 5}
    return [f"{k}={'null' if v is None else v}" for k, v in over.items()]


def pretrain(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "pretrain/train.py"), "--config_path", RECIPE, *args],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- kills


def kills(work: Path, n_kills: int, steps: int) -> dict:
    from safetensors.torch import load_file

    from utils.checkpoint import CheckpointManager, load_train_state, load_weights

    data = tiny_data(work / "data")
    # ~0.8M parameters: a save (weights + AdamW state, ~10 MB, fsynced) is a fair share of a step
    run = [*data, "model.d_model=128", "model.n_layers=4", f"train.max_steps={steps}", "train.save_every=1",
           "train.keep_last=2", "train.log_every=1000"]
    ref = pretrain(run + [f"train.out_dir={work / 'reference'}"])
    assert ref.returncode == 0, ref.stderr[-2000:]
    out, rng = work / "killed", random.Random(0)
    killed = orphans = orphan_bytes = removed = loadable = 0
    for _ in range(n_kills):
        before = _latest(out)
        proc = subprocess.Popen([sys.executable, str(ROOT / "pretrain/train.py"), "--config_path", RECIPE, *run,
                                 f"train.out_dir={out}"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        while proc.poll() is None and _latest(out) == before:  # start-up (imports) is not the point
            time.sleep(0.02)
        if killed % 2:  # every other kill aims at a save in progress, the rest at a random moment
            deadline = time.time() + 5
            while proc.poll() is None and time.time() < deadline and not any(out.glob(".step_*.tmp-*")):
                time.sleep(0.001)
        else:
            time.sleep(rng.uniform(0.0, 1.0))
        if proc.poll() is not None:
            break  # finished before the kill
        proc.send_signal(signal.SIGKILL)
        removed += _removed_count(proc.communicate()[1])
        killed += 1
        left = list(out.glob(".step_*.tmp-*"))
        orphans += len(left)
        orphan_bytes += sum(f.stat().st_size for d in left for f in d.rglob("*") if f.is_file())
        latest = CheckpointManager(out).latest()
        if latest is not None:
            load_weights(latest), load_train_state(latest)  # verified: raises if damaged
            loadable += 1
    last = pretrain(run + [f"train.out_dir={out}"])
    assert last.returncode == 0, last.stderr[-2000:]
    removed += _removed_count(last.stderr)
    a, b = load_file(str(work / "reference/final/model.safetensors")), load_file(str(out / "final/model.safetensors"))
    return {"kills": killed, "latest loadable after each kill": f"{loadable}/{killed}",
            "kills inside a save (orphans left)": orphans, "orphan MB": round(orphan_bytes / 1e6, 1),
            "orphans removed at the next start": removed, "orphans left at the end": len(list(out.glob(".step_*"))),
            "final == uninterrupted, bitwise": all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()}


def _latest(out: Path) -> str:
    marker = out / "latest"
    return marker.read_text() if marker.is_file() else ""


def _removed_count(stderr: str) -> int:
    for line in stderr.splitlines():
        if "unfinished checkpoint save(s)" in line:
            return int(line.split("removed ")[1].split()[0])
    return 0


# ----------------------------------------------------------------------------- corruption


def corrupt(work: Path, trials: int) -> list[dict]:
    from model import ModelConfig, Transformer
    from utils.checkpoint import load_train_state, load_weights, save_checkpoint
    from utils.errors import UserError

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, max_seq_len=128))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 512, (2, 16))).sum().backward()
    opt.step()
    clean = save_checkpoint(work / "clean", model, train_state={"optimizer": opt.state_dict(), "step": 1})
    header = 8 + struct.unpack("<Q", (clean / "model.safetensors").read_bytes()[:8])[0]
    rows = []
    for name, start, load in (("model.safetensors", header, load_weights), ("train_state.pt", 0, load_train_state)):
        for n_bytes in (1, 8, 64):
            caught = silent = 0
            for t in range(trials):
                bad = work / f"bad_{t}"
                shutil.rmtree(bad, ignore_errors=True)
                shutil.copytree(clean, bad)
                _flip(bad / name, n_bytes, random.Random(f"{name}{n_bytes}{t}"), start)
                caught += _raises(load, bad, UserError)
                os.environ["LLM_VERIFY_CHECKSUMS"] = "0"
                silent += not _raises(load, bad, Exception)
                del os.environ["LLM_VERIFY_CHECKSUMS"]
            rows.append({"file": name, "bytes flipped": n_bytes, "trials": trials, "caught with checksums": caught,
                         "loaded silently without": silent})
    return rows


def _flip(file: Path, n: int, rng: random.Random, start: int) -> None:
    data = bytearray(file.read_bytes())
    for i in rng.sample(range(start, len(data)), n):
        data[i] ^= 1 << rng.randrange(8)
    file.write_bytes(bytes(data))


def _raises(fn, arg, kind) -> bool:
    try:
        fn(arg)
    except kind:
        return True
    return False


def verify_cost(work: Path, rounds: int = 5) -> dict:
    from safetensors.torch import save_file

    from utils.checkpoint import META, WEIGHTS, file_sha256, load_weights

    folder = work / "big"
    folder.mkdir(exist_ok=True)
    save_file({f"w{i}": torch.randn(1024, 1024) for i in range(25)}, str(folder / WEIGHTS))  # 25M params, 105 MB
    (folder / META).write_text(json.dumps({"checksums": {WEIGHTS: file_sha256(folder / WEIGHTS)}}))
    model = {f"w{i}": torch.empty(1024, 1024) for i in range(25)}
    times = {}
    for label, flag in (("load", "0"), ("load + verify", "1")):
        os.environ["LLM_VERIFY_CHECKSUMS"] = flag
        load_weights(folder)  # warm the page cache
        samples = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for k, v in load_weights(folder).items():  # safetensors maps the file; loading into a model copies
                model[k].copy_(v)
            samples.append(time.perf_counter() - t0)
        times[label] = statistics.median(samples)
    del os.environ["LLM_VERIFY_CHECKSUMS"]
    mb = (folder / WEIGHTS).stat().st_size / 1e6
    return {"MB": round(mb), "load into a model s": round(times["load"], 3),
            "with verification s": round(times["load + verify"], 3),
            "ratio": round(times["load + verify"] / times["load"], 2),
            "sha256 MB/s": round(mb / (times["load + verify"] - times["load"]))}


# ----------------------------------------------------------------------------- bad input


def cases(work: Path) -> list[dict]:
    """Each case: (name, argv, output path that must not appear)."""
    data = tiny_data(work / "data")
    base = [*data, "train.max_steps=4", "train.save_every=2"]
    good = work / "good"
    assert pretrain(base + [f"train.out_dir={good}"]).returncode == 0
    damaged = {}
    for name, damage in (("config", lambda d: (d / "model_config.json").write_text('{"d_model": "big"}')),
                         ("meta", lambda d: (d / "meta.json").write_text("\x00garbage{")),
                         ("weights", lambda d: _flip(d / "model.safetensors", 8, random.Random(0),
                                                     8 + struct.unpack("<Q", (d / "model.safetensors").read_bytes()[:8])[0]))):
        run = work / f"resume_{name}"
        shutil.copytree(good, run)
        for ckpt in (run / "step_00000004", run / "final"):
            damage(ckpt)
        damaged[name] = run
    a_file = work / "a_file"
    a_file.write_text("x")
    (work / "fake.parquet").write_text("not parquet")
    pre = [sys.executable, "pretrain/train.py", "--config_path", RECIPE, *base]
    built = subprocess.run([sys.executable, "data_pipeline/processing/build_sft_bins.py", "--data_dir",
                            str(work / "data"), "--num_workers", "1"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    sft = [sys.executable, "finetune/sft_train.py", "--config_path", "configs/examples/sft_full_tiny.yaml",
           f"data.bin_dir={work / 'data/bins/sft'}", f"data.tokenizer={work / 'data/tokenizer/tokenizer.json'}",
           "train.max_steps=2", "train.batch_size=2", "train.seq_len=256", "train.device=cpu", "train.progress=false",
           "format_eval_prompts=0"]
    (work / "held.jsonl").write_text(json.dumps({"text": "the cat sat on the mat"}) + "\n")
    ppl = [sys.executable, "eval/perplexity.py", f"--text_path={work / 'held.jsonl'}", "progress=false",
           f"--out_dir={work / 'ppl'}"]
    tried = [
        ("seq_len > max_seq_len", pre + ["train.seq_len=512", f"train.out_dir={work / 'r1'}"], work / "r1"),
        ("sft: prompts longer than seq_len", sft + ["train.seq_len=16", f"model.init_from={good / 'final'}",
                                                    f"train.out_dir={work / 'sft_short'}"], work / "sft_short" / "final"),
        ("eval_batches=0", pre + ["train.eval_batches=0", f"train.out_dir={work / 'r2'}"], work / "r2"),
        ("out_dir is a file", pre + [f"train.out_dir={a_file}"], None),
        ("out_dir under a file", pre + [f"train.out_dir={a_file}/run"], None),
        ("out_dir unwritable", pre + ["train.out_dir=/sys/llm_run"], None),
        ("save_every=-1", pre + ["train.save_every=-1", f"train.out_dir={work / 'r3'}"], work / "r3"),
        ("keep_last=-1", pre + ["train.keep_last=-1", f"train.out_dir={work / 'r4'}"], work / "r4"),
        ("weight_decay<0", pre + ["optim.weight_decay=-0.1", f"train.out_dir={work / 'r5'}"], work / "r5"),
        ("--config_path a directory", [sys.executable, "pretrain/train.py", "--config_path", "configs"], None),
        ("optim.lr=1e6 (diverges)", pre + ["optim.lr=1e6", "train.max_steps=40", f"train.out_dir={work / 'r6'}"],
         work / "r6" / "final"),
        *[(f"resume: damaged {n}", pre + ["train.max_steps=6", f"train.out_dir={d}"], d / "step_00000006")
          for n, d in damaged.items()],
        ("control: eval, intact", ppl + [f"--checkpoint={good / 'final'}"], None),
        *[(f"eval: damaged {n}", ppl + [f"--checkpoint={d / 'final'}"], None) for n, d in damaged.items()],
        ("control: sft, intact base", sft + [f"model.init_from={good / 'final'}", f"train.out_dir={work / 'sft_ok'}"],
         None),
        *[(f"sft: damaged base {n}", sft + [f"model.init_from={d / 'final'}", f"train.out_dir={work / ('sft_' + n)}"],
           work / f"sft_{n}") for n, d in damaged.items()],
        ("download: fake .parquet", [sys.executable, "data_pipeline/download/download_tinystories.py", "--source", "local",
                                     "--local_path", str(work / "fake.parquet"), "--parts", "stories",
                                     "--data_dir", str(work / "d1")], work / "d1" / "raw"),
        ("tokenizer: vocab 1e9", [sys.executable, "data_pipeline/tokenizer/train_tokenizer.py", "--vocab_size",
                                  "1000000000", "--data_dir", str(work / "d2")], work / "d2" / "tokenizer"),
    ]
    rows = []
    for name, argv, must_not_exist in tried:
        res = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        rows.append({"case": name, "exit": res.returncode, "one error paragraph": len(errors) == 1,
                     "traceback": "Traceback" in res.stderr,
                     "output written": bool(must_not_exist and must_not_exist.exists()),
                     "message": errors[0][:110] if errors else res.stderr[-200:]})
    return rows


# ----------------------------------------------------------------------------- sandbox and divergence


def sandbox(work: Path) -> list[dict]:
    from eval.humaneval_exec import bwrap_usable, evaluate_completions
    from tests.eval.test_humaneval_exec import PROBLEM, escapes

    outside = work / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("s3cret")
    (outside / "evil.py").write_text(f"open('{outside}/imported', 'w').write('x')\n")
    tries = escapes(outside)
    rows = []
    for layer in ["python"] + (["bwrap"] if bwrap_usable() else []):
        completions = {"Test/0": [body + "    return a + b\n" for body in tries.values()]}
        summary, records = evaluate_completions([PROBLEM], completions, k_list=[1], n_workers=2, timeout_s=10,
                                                sandbox=layer)
        rows.append({"layer": summary["sandbox"], "escapes tried": len(tries),
                     "blocked": sum(not r["passed"] for r in records),
                     "host files intact": sorted(p.name for p in outside.iterdir()) == ["evil.py", "secret.txt"]})
    return rows


def diverge(work: Path) -> list[dict]:
    from tests.utils.helpers import StreamLoader, ce_loss, tiny_model
    from utils.optim import OptimConfig
    from utils.spike import Diverged, SpikeConfig
    from utils.train_loop import TrainConfig, train

    def climbing(model, batch):  # +5% of the loss per step from step 20: a slow divergence
        loss, m = ce_loss(model, batch)
        climbing.calls += 1
        return loss * (1 + 0.05 * max(0, climbing.calls - 20)), m

    rows = []
    for label, loss_fn, opt, ratio in (
            ("lr=1e6", ce_loss, OptimConfig(lr=1e6, warmup_steps=0), 2.0),
            ("slow climb, ratio + z-score", climbing, OptimConfig(lr=1e-2, warmup_steps=1), 2.0),
            ("slow climb, z-score only (before)", climbing, OptimConfig(lr=1e-2, warmup_steps=1), None)):
        climbing.calls = 0
        cfg = TrainConfig(out_dir=str(work / label.replace(" ", "_")), max_steps=200, batch_size=2, seq_len=16,
                          device="cpu", progress=False, log_every=10**6, save_every=5, keep_last=2, resume="never",
                          spike=SpikeConfig(warmup_steps=10, max_loss_ratio=ratio))
        try:
            res = train(tiny_model(), StreamLoader(2), loss_fn, cfg, opt)
            outcome, step, final = "ran to the end", res.final_step, True
        except Diverged:
            outcome, final = "stopped (exit 2)", False
            step = max(json.loads(x)["step"] for x in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines())
        records = [json.loads(x) for x in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in records if "loss" in r and "event" not in r]
        rows.append({"run": label, "outcome": outcome, "at step": step, "final/ written": final,
                     "best loss": round(min(losses), 3), "last loss": round(losses[-1], 3)})
    return rows


def ddp(work: Path, n: int) -> dict:
    """n pairs: a 2-rank DDP run stopped by SIGTERM after its 10th step, then resumed to the end."""
    data = tiny_data(work / "data")
    runs = {"resumed exit 0": 0, "aborts at shutdown": 0, "final written": 0}
    for i in range(n):
        out = work / f"ddp{i}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29400 + i),
               "pretrain/train.py", "--config_path", RECIPE, *data, f"train.out_dir={out}", "train.distributed=ddp",
               "train.save_every=5"]
        first = subprocess.Popen(cmd + ["train.max_steps=400"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        while first.poll() is None and not (out / "step_00000010").exists():
            time.sleep(0.2)
        first.send_signal(signal.SIGTERM)
        first.wait()
        res = subprocess.run(cmd + ["train.max_steps=40"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
        runs["resumed exit 0"] += res.returncode == 0
        runs["aborts at shutdown"] += "terminate called" in res.stdout + res.stderr
        runs["final written"] += (out / "final").is_dir()
    return {"pairs": n, **runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=25)
    p.add_argument("--steps", type=int, default=60, help="steps of the killed pretraining run")
    p.add_argument("--trials", type=int, default=50, help="corruption trials per file and flip count")
    p.add_argument("--ddp", type=int, default=0, help="interrupted+resumed 2-rank DDP runs (slow; 0: skip)")
    p.add_argument("--only", default="kills,corrupt,verify,cases,sandbox,diverge,ddp")
    args = p.parse_args()
    torch.set_num_threads(1)
    parts = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="bench_faults_") as tmp:
        work = Path(tmp)
        jobs = {"kills": lambda: kills(work / "kills", args.kills, args.steps),
                "corrupt": lambda: corrupt(work / "corrupt", args.trials),
                "verify": lambda: verify_cost(work / "verify"),
                "cases": lambda: cases(work / "cases"), "sandbox": lambda: sandbox(work / "sandbox"),
                "diverge": lambda: diverge(work / "diverge"),
                "ddp": lambda: ddp(work / "ddp", args.ddp) if args.ddp else None}
        for name, job in jobs.items():
            if name not in parts:
                continue
            (work / name).mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            result = job()
            if result is None:
                continue
            print(f"\n== {name} ({time.time() - t0:.0f} s)")
            for row in result if isinstance(result, list) else [result]:
                print(json.dumps(row))


if __name__ == "__main__":
    main_guard(main)
