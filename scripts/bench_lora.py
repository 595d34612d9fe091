"""LoRA against full fine-tuning: peak memory and tokens/s of the same DPO train job.

    python scripts/bench_lora.py                 # what `make bench` runs
    python scripts/bench_lora.py --repeats 5 --threads 2

One run builds, locally, the word-level tokenizer and preference pairs of
scripts/training_bench.py and its Llama of about 60M parameters (hidden 768, 8
layers), with the reference log-probs of the round (iteralign's reference job).
Then, each in a fresh process and interleaved, it runs round 1 of DPO from that
SFT model on the same pairs and batches, float32:

- full: training.lora null, AdamW over every weight;
- lora: training.lora {r: 16, alpha: 32} on every linear projection, AdamW over
  the adapter, FINAL saved merged with the adapter and its optimizer state, the
  reference log-probs read from the reference job's table;
- lora-adapter-off: the same with training.lora.reference adapter_off: the train job
  computes the reference log-probs itself with the adapter switched off, and no
  reference job runs (the reference job is timed too: its process's wall time).

Printed: tokens/s over the training steps, and the job's peak RSS above what the
process held before ``train_round`` (loading the model, training and saving count;
the libraries, peft included, are imported before), as medians over the repeats,
with each ratio taken within a repeat. Both jobs use gradient checkpointing and
micro-batches of one pair, so that weights, gradients and optimizer state, which
LoRA cuts, dominate over activations, which it does not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training_bench import LARGE_MODEL as BENCH_MODEL  # noqa: E402
from training_bench import TRAINING, add_job_arguments, peak_rss_mb, rss_mb, setup  # noqa: E402
from training_bench import run_worker as run_in_process  # noqa: E402

LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": None}
KINDS = ("full", "lora", "lora-adapter-off")
JOBS = (*KINDS, "reference")


def worker(kind: str, workdir: Path) -> dict:
    import peft  # noqa: F401  (imported before the baseline in both jobs: its ~120 MB of code is not training memory)
    import yaml

    from iteralign import config as cfg
    from iteralign.train.trainer import train_round

    raw = yaml.safe_load((workdir / "config.yaml").read_text())
    lora = kind.startswith("lora")
    raw["training"]["lora"] = {**LORA, "reference": "adapter_off" if kind == "lora-adapter-off" else "job"} \
        if lora else None
    config = cfg.validate(raw)
    baseline = rss_mb()
    out = Path(tempfile.mkdtemp(dir=workdir))
    sft = workdir / "reference"  # ckpt_r0/FINAL: round 1 starts from it (and, with LoRA, it is the base)
    if kind == "reference":  # what the reference job does
        from iteralign.artifacts import write_parquet
        from iteralign.reference import reference_logps

        write_parquet(reference_logps(config, workdir / "feedback_r1.json", sft), out / "reflogps.parquet")
        return {"seconds": 0.0, "tokens": 0, "first_loss": float("nan"), "last_loss": float("nan"),
                "baseline_rss_mb": baseline}
    tables = [] if kind == "lora-adapter-off" else [workdir / "reflogps_r1.parquet"]
    train_round(config, 1, [workdir / "feedback_r1.json"], tables, sft, out / "FINAL", out / "train.jsonl",
                base_checkpoint=sft if lora else None)
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    return {"seconds": sum(r["seconds"] for r in rows), "tokens": sum(r["tokens"] for r in rows),
            "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"], "baseline_rss_mb": baseline}


def run_worker(kind: str, workdir: Path, threads: int) -> dict:
    """One train job in a fresh process, so that its peak RSS is its own."""
    measured = run_in_process(__file__, kind, workdir, threads)
    measured["above_start_mb"] = measured.pop("peak_rss_mb") - measured["baseline_rss_mb"]
    return measured


def worker_main(kind: str, workdir: Path, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    result = worker(kind, workdir)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    add_job_arguments(parser, JOBS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker, Path(args.workdir), args.threads)
        return

    # gradient checkpointing in both, as LoRA runs of large models use it: what remains is
    # weights, gradients and optimizer state, which LoRA cuts (activations would be alike)
    training = {**TRAINING, "micro_batch_size": 1, "gradient_checkpointing": True}
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as tmp:
        workdir = Path(tmp)
        info = setup(workdir, args.pairs, args.seed, BENCH_MODEL, training)
        print(f"model: Llama, {info['parameters'] / 1e6:.1f}M parameters ({BENCH_MODEL['num_layers']} layers, hidden "
              f"{BENCH_MODEL['hidden_size']}); DPO round 1 on {args.pairs} pairs, batch {training['batch_size']}, "
              f"micro-batch {training['micro_batch_size']}, gradient checkpointing, float32, {args.threads} threads; "
              f"LoRA r {LORA['r']} "
              f"alpha {LORA['alpha']} on every linear projection", flush=True)
        results: dict[str, list[dict]] = {kind: [] for kind in JOBS}
        for repeat in range(args.repeats):
            for kind in JOBS if repeat % 2 == 0 else JOBS[::-1]:
                r = run_worker(kind, workdir, args.threads)
                results[kind].append(r)
                speed = f"{r['tokens'] / r['seconds']:7.0f} tokens/s, " if r["tokens"] else ""
                print(f"  repeat {repeat + 1} {kind:16s} {speed}job {r['job_seconds']:5.1f} s, peak RSS above start "
                      f"{r['above_start_mb']:6.0f} MB", flush=True)
    report(results, args.repeats)


def report(results: dict[str, list[dict]], repeats: int) -> None:
    def median(kind, value) -> float:
        return statistics.median(value(r) for r in results[kind])

    def ratio(a, b, value) -> float:
        """Median over repeats of a/b within a repeat."""
        return statistics.median(value(x) / value(y) for x, y in zip(results[a], results[b], strict=True))

    def speed(r):
        return r["tokens"] / r["seconds"]

    def memory(r):
        return r["above_start_mb"]

    print(f"\n{'job':16s} {'tokens/s':>9s} {'job wall s':>11s} {'peak RSS above start MB':>24s}   "
          f"(medians of {repeats})")
    for kind in JOBS:
        tokens = f"{median(kind, speed):9.0f}" if kind in KINDS else f"{'-':>9s}"
        print(f"{kind:16s} {tokens} {median(kind, lambda r: r['job_seconds']):11.1f} {median(kind, memory):24.0f}")
    for kind in ("lora", "lora-adapter-off"):
        print(f"{'' if kind == 'lora-adapter-off' else chr(10)}{kind} / full: peak RSS above start "
              f"{ratio(kind, 'full', memory):.2f}x (goal <= 0.4x), tokens/s {ratio(kind, 'full', speed):.2f}x "
              "(goal >= 0.9x)")
    with_job = statistics.median(r["job_seconds"] + t["job_seconds"]
                                 for r, t in zip(results["reference"], results["lora"], strict=True))
    print(f"LoRA reference: reference job + train job {with_job:.1f} s of jobs, train job with the adapter off "
          f"{median('lora-adapter-off', lambda r: r['job_seconds']):.1f} s; peak RSS above start "
          f"{median('lora-adapter-off', memory):.0f} MB against {median('lora', memory):.0f} MB")


if __name__ == "__main__":
    main()
