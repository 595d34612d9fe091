"""DPO training on CPU: iteralign's train job against TRL's DPOTrainer, and the memory a
reference model costs.

    python scripts/bench_training.py            # what `make bench` runs
    python scripts/bench_training.py --repeats 5 --threads 1

One run builds, locally, a word-level tokenizer and a small Llama (the policy: the
reference with its weights perturbed, so the first DPO loss is not log 2), a set of
preference pairs of varied lengths, and the reference log-probs (iteralign's
reference job). Then, each in a fresh process and interleaved so that other load on
the machine falls on both alike, it runs one epoch of DPO on the same pairs, in the
same batches (TRL reads them in iteralign's batch order), with the same batch size,
optimizer and precision:

- iteralign: the train job as the pipeline runs it (reference log-probs precomputed);
- iteralign+ref: the same job also loading the reference model and computing the
  reference log-probs itself, holding the model as a trainer with a reference does;
- trl: DPOTrainer as configured by default, with its reference model in memory;
- trl-precomputed: DPOTrainer with precompute_ref_log_probs=True (steps only).

It first checks that iteralign and TRL give the same first-step loss, then prints
tokens/s (prompt+completion tokens of chosen and rejected, over the training steps),
tokens per CPU-second of the job's process over the same steps (steadier than wall
time when other jobs share the cores), and peak RSS, as medians over the repeats,
with each ratio taken within a repeat; and the padding waste of the batching.
TRL is installed only for this benchmark (`make bench`, scripts/bench-requirements.txt).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training_bench import (  # noqa: E402
    LARGE_MODEL,
    MODEL,
    TRAINING,
    VOCAB_WORDS,
    add_job_arguments,
    measure_peak,
    peak_rss_mb,
    rss_mb,
    run_worker,
    setup,
    training_flops,
)

KINDS = ("iteralign", "iteralign padding-free", "iteralign+ref", "trl", "trl-precomputed")


# ---------------------------------------------------------------- workers (one process each)
def ordered_pairs(workdir: Path, config: dict) -> list[dict]:
    """The pairs in the order of iteralign's batches, with the prompt as the model sees it."""
    from iteralign.feedback import load_feedback
    from iteralign.modeling import load_tokenizer
    from iteralign.tokens import PromptRenderer, encode
    from iteralign.train.data import pairs_from_feedback, plan_batches

    tokenizer = load_tokenizer(workdir / "policy")
    render = PromptRenderer(tokenizer)
    tcfg = config["training"]
    pairs = pairs_from_feedback(load_feedback(workdir / "feedback_r1.json"))
    rows = []
    for pair in pairs:
        prompt = render(pair.prompt_id, pair.prompt)
        chosen = encode(tokenizer, prompt, pair.chosen, tcfg["max_length"], tcfg["max_prompt_length"])
        rejected = encode(tokenizer, prompt, pair.rejected, tcfg["max_length"], tcfg["max_prompt_length"])
        rows.append({"prompt": prompt, "chosen": pair.chosen, "rejected": pair.rejected,
                     "tokens": len(chosen.input_ids) + len(rejected.input_ids),
                     "targets": sum(len(e.input_ids) - e.completion_start for e in (chosen, rejected)),
                     "length": max(len(chosen.input_ids), len(rejected.input_ids))})
    order = plan_batches([r["length"] for r in rows], tcfg["batch_size"], [config["seed"], 1, 0], False)
    return [rows[i] for batch in order for i in batch]


def worker_iteralign(workdir: Path, with_reference: bool, padding_free: bool = False) -> dict:
    from iteralign import config as cfg
    from iteralign.train.trainer import train_round

    config = cfg.load(workdir / "config.yaml")
    config["training"]["padding_free"] = padding_free
    baseline = rss_mb()
    held = None
    if with_reference:  # the job variant that holds a reference model and runs it itself
        from iteralign.artifacts import write_parquet
        from iteralign.modeling import load_causal_lm
        from iteralign.reference import reference_logps

        held = load_causal_lm(workdir / "reference")
        for param in held.parameters():  # resident, as a reference run at every step is (not lazily mmapped)
            param.data = param.data.clone()
        write_parquet(reference_logps(config, workdir / "feedback_r1.json", workdir / "reference"),
                      workdir / "reflogps_held.parquet")
    tables = [workdir / ("reflogps_held.parquet" if with_reference else "reflogps_r1.parquet")]
    out = Path(tempfile.mkdtemp(dir=workdir))
    cpu = CpuClock()
    trainer_log = logging.getLogger("iteralign.train.trainer")
    trainer_log.setLevel(logging.INFO)
    trainer_log.addHandler(cpu)
    train_round(config, 1, [workdir / "feedback_r1.json"], tables, workdir / "policy", out / "FINAL",
                out / "train.jsonl")
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    del held
    return {"first_loss": rows[0]["loss"], "seconds": sum(r["seconds"] for r in rows),
            "cpu_seconds": cpu.marks[-1] - cpu.start, "tokens": sum(r["tokens"] for r in rows), "steps": len(rows),
            "positions": sum(r["tokens"] / (1 - r["padding"]) for r in rows), "baseline_rss_mb": baseline}


class CpuClock(logging.Handler):
    """Process CPU time at the trainer's log lines: the one before the first step, and each step's."""

    def __init__(self):
        super().__init__(level=logging.INFO)
        self.start, self.marks = None, []

    def emit(self, record):
        if record.msg.startswith("round %d step %d"):
            self.marks.append(time.process_time())
        elif record.msg.startswith("round %d: %d examples from"):
            self.start = time.process_time()


def worker_trl(workdir: Path, precompute: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from iteralign import config as cfg
    from iteralign.modeling import load_tokenizer

    config = cfg.load(workdir / "config.yaml")
    tcfg = config["training"]
    baseline = rss_mb()
    rows = ordered_pairs(workdir, config)
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    tokenizer = load_tokenizer(workdir / "policy")
    model = AutoModelForCausalLM.from_pretrained(workdir / "policy", dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(workdir / "reference", dtype=torch.float32)
    args = DPOConfig(
        output_dir=str(workdir / "trl_out"), per_device_train_batch_size=tcfg["batch_size"],
        gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=tcfg["lr"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, max_grad_norm=tcfg["max_grad_norm"], beta=tcfg["beta"], loss_type=["sigmoid"],
        max_length=tcfg["max_length"], bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        train_sampling_strategy="sequential", precompute_ref_log_probs=precompute, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=config["seed"],
    )
    timing: dict = {"steps": []}

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            timing["start"], timing["cpu_start"] = time.monotonic(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            timing["steps"].append(time.monotonic())
            timing["cpu_end"] = time.process_time()

    class FirstLoss(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            timing.setdefault("first_loss", (loss[0] if return_outputs else loss).item())
            return loss

    trainer = FirstLoss(model=model, ref_model=reference, args=args, train_dataset=dataset,
                        processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.train()
    return {"first_loss": timing["first_loss"], "seconds": timing["steps"][-1] - timing["start"],
            "cpu_seconds": timing["cpu_end"] - timing["cpu_start"], "tokens": sum(r["tokens"] for r in rows), "steps": len(timing["steps"]), "baseline_rss_mb": baseline}



def worker_main(kind: str, workdir: Path, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    if kind.startswith("iteralign"):
        result = worker_iteralign(workdir, with_reference=kind == "iteralign+ref",
                                  padding_free=kind.endswith("padding-free"))
    else:
        result = worker_trl(workdir, precompute=kind == "trl-precomputed")
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


# ---------------------------------------------------------------- padding
def padding_waste(workdir: Path, seed: int) -> dict[str, float]:
    """Share of forward positions that are padding, for the bench's pairs, by batching."""
    from iteralign import config as cfg
    from iteralign.train.data import plan_batches

    config = cfg.load(workdir / "config.yaml")
    rows = ordered_pairs(workdir, config)
    lengths = [r["length"] for r in rows]
    tokens = sum(r["tokens"] for r in rows)
    out = {}
    for micro in (8, 2):
        for grouped in (False, True):
            batches = plan_batches(lengths, 8, seed, grouped)
            # chosen and rejected of a micro-batch pad to its longest sequence
            positions = sum(2 * len(b[i : i + micro]) * max(lengths[j] for j in b[i : i + micro])
                            for b in batches for i in range(0, len(b), micro))
            out[f"micro {micro}, {'group_by_length' if grouped else 'random batches'}"] = 1 - tokens / positions
    return out


# ---------------------------------------------------------------- main
def check_same_first_loss(first: dict[str, float]) -> None:
    """Same model, pairs, batch and reference log-probs: the first-step DPO losses must agree."""
    gap = max(abs(loss - first["trl"]) for loss in first.values())
    print("first-step loss: " + ", ".join(f"{kind} {loss:.6f}" for kind, loss in first.items())
          + f" (largest |diff| {gap:.1e})", flush=True)
    if gap > 1e-4 * abs(first["trl"]):
        raise SystemExit("the jobs disagree on the first-step loss: the comparison would not be like for like")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--large-repeats", type=int, default=3, help="repeats of the ~60M model's train jobs")
    add_job_arguments(parser, KINDS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker, Path(args.workdir), args.threads)
        return

    import trl

    from iteralign import config as cfg

    peaks = [measure_peak(args.threads)]
    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        workdir = Path(tmp)
        info = setup(workdir, args.pairs, args.seed)
        print(f"model: Llama, {info['parameters'] / 1e6:.1f}M parameters ({MODEL['num_layers']} layers, hidden "
              f"{MODEL['hidden_size']}, vocab {VOCAB_WORDS + 7}); {args.pairs} pairs, batch "
              f"{TRAINING['batch_size']}, float32, {args.threads} threads; trl {trl.__version__}")
        results = interleaved(KINDS, workdir, args.threads, args.repeats, check_first_loss=True)
        report_comparison(results, args.repeats)
        pairs = ordered_pairs(workdir, cfg.load(workdir / "config.yaml"))
        targets = sum(r["targets"] for r in pairs) / sum(r["tokens"] for r in pairs)
        print("\npadding waste (share of forward positions that are padding):")
        for label, waste in padding_waste(workdir, args.seed).items():
            print(f"  {label:32s} {100 * waste:5.1f}%")
    large, large_info = large_model_runs(args)
    peaks.append(measure_peak(args.threads))
    report_flops({"5.2M": (info["parameters"], results), "~60M": (large_info["parameters"], large)}, peaks,
                 args.threads, targets)
    memory_comparison(args)


def interleaved(kinds: tuple[str, ...], workdir: Path, threads: int, repeats: int,
                check_first_loss: bool = False) -> dict[str, list[dict]]:
    """Each kind's job ``repeats`` times, each in a fresh process, interleaved in alternating order so that
    other load on the machine falls on all alike."""
    results: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for repeat in range(repeats):
        for kind in kinds if repeat % 2 == 0 else kinds[::-1]:
            results[kind].append(run_worker(__file__, kind, workdir, threads))
            r = results[kind][-1]
            print(f"  repeat {repeat + 1} {kind:24s} {r['tokens'] / r['seconds']:8.0f} tokens/s "
                  f"peak RSS {r['peak_rss_mb']:6.0f} MB  first loss {r['first_loss']:.6f}", flush=True)
        if repeat == 0 and check_first_loss:
            check_same_first_loss({kind: results[kind][0]["first_loss"] for kind in kinds})
    return results


def speed(r: dict) -> float:
    return r["tokens"] / r["seconds"]


def paired_ratio(results: dict[str, list[dict]], a: str, b: str, value=speed) -> float:
    """Median over repeats of a/b, each repeat's two runs having been made back to back."""
    return statistics.median(value(x) / value(y) for x, y in zip(results[a], results[b], strict=True))


def report_comparison(results: dict[str, list[dict]], repeats: int) -> None:
    def cpu_speed(r):
        return r["tokens"] / r["cpu_seconds"]

    def peak(r):
        return r["peak_rss_mb"]

    def above_start(r):
        return r["peak_rss_mb"] - r["baseline_rss_mb"]

    print(f"\n{'job':24s} {'tokens/s':>9s} {'tokens/CPU-s':>13s} {'peak RSS MB':>12s} {'above start MB':>15s}"
          f"   (medians of {repeats})")
    for kind, runs in results.items():
        print(f"{kind:24s} {statistics.median(map(speed, runs)):9.0f} {statistics.median(map(cpu_speed, runs)):13.0f} "
              f"{statistics.median(map(peak, runs)):12.0f} {statistics.median(map(above_start, runs)):15.0f}")
    print("\nratios (median over repeats of the ratio within a repeat):")
    for label, value in (("tokens/s", speed), ("tokens/CPU-s", cpu_speed)):
        for job in ("iteralign", "iteralign padding-free"):
            print(f"  {label:12s} {job} / trl {paired_ratio(results, job, 'trl', value):.2f}x (goal >= 1.5x), "
                  f"/ trl-precomputed {paired_ratio(results, job, 'trl-precomputed', value):.2f}x (goal >= 2.0x)")
    for label, value in (("peak RSS", peak), ("RSS above start", above_start)):
        print(f"  {label} iteralign / iteralign+ref {paired_ratio(results, 'iteralign', 'iteralign+ref', value):.2f}x  "
              f"(goal <= 0.6x), iteralign / trl {paired_ratio(results, 'iteralign', 'trl', value):.2f}x")


def large_model_runs(args) -> tuple[dict[str, list[dict]], dict]:
    """The train job, padded and padding-free, on the ~60M-parameter model with the comparison's pairs
    and batches (micro-batch 8, no gradient checkpointing)."""
    with tempfile.TemporaryDirectory(prefix="bench_training_large_") as tmp:
        workdir = Path(tmp)
        info = setup(workdir, args.pairs, args.seed, LARGE_MODEL)
        print(f"\nthe ~60M model: Llama, {info['parameters'] / 1e6:.1f}M parameters ({LARGE_MODEL['num_layers']} "
              f"layers, hidden {LARGE_MODEL['hidden_size']}), the same pairs and batches", flush=True)
        kinds = ("iteralign", "iteralign padding-free")
        return interleaved(kinds, workdir, args.threads, args.large_repeats), info


def report_flops(models: dict[str, tuple[int, dict[str, list[dict]]]], peaks: list[dict[int, float]],
                 threads: int, targets_share: float) -> None:
    """Achieved FLOP/s of each train job against the float32 matmul peak measured in this run."""
    best = {n: max(p[n] for p in peaks) for n in peaks[0]}
    size = max(best, key=best.get)
    peak = best[size]
    print(f"\nfloat32 matmul peak, {threads} thread(s), best of torch.mm before and after the jobs: "
          + ", ".join(f"{n}: {f / 1e9:.1f}" for n, f in best.items()) + f" GFLOP/s; peak {peak / 1e9:.1f} (n={size})")
    print("training FLOP/s, estimated as 6 x parameters x tokens/s (real prompt+completion tokens of chosen and "
          "rejected; padding and attention's own products not counted; the reference log-probs come from the "
          "reference job, so no forward-only pass is in these jobs' time; TRL's precomputation is outside its "
          "timed steps):")
    print(f"  {'model':12s} {'job':24s} {'tokens/s':>8s} {'GFLOP/s':>8s} {'of peak':>8s}   per CPU-second "
          "(steadier when other jobs share the cores):")
    for label, (parameters, results) in models.items():
        for kind, runs in results.items():
            flops = training_flops(parameters, statistics.median(map(speed, runs)))
            cpu_flops = training_flops(parameters, statistics.median(r["tokens"] / r["cpu_seconds"] for r in runs))
            print(f"  {label:5s} {parameters / 1e6:5.1f}M {kind:24s} {flops / 6 / parameters:8.0f} {flops / 1e9:8.1f} "
                  f"{100 * flops / peak:7.1f}%   {cpu_flops / 1e9:7.1f} GFLOP/CPU-s {100 * cpu_flops / peak:5.1f}%")
    parameters, large = models["~60M"]
    print(f"  ~60M padding-free / padded tokens/s {paired_ratio(large, 'iteralign padding-free', 'iteralign'):.2f}x; "
          "goal: >= 50% of peak on the ~60M model")
    for label, (parameters, results) in models.items():
        padded, packed = (1 - r["tokens"] / r["positions"] for r in (results["iteralign"][0],
                                                                      results["iteralign padding-free"][0]))
        hidden = (MODEL if label == "5.2M" else LARGE_MODEL)["hidden_size"]
        skipped = hidden * (VOCAB_WORDS + 7) * (1 - targets_share) / parameters
        print(f"  {label}: padding {100 * padded:.1f}% of forward positions padded, {100 * packed:.1f}% padding-free; "
              f"padding-free runs the output layer at completion targets only, so {100 * skipped:.1f}% of the "
              "6 x parameters x tokens estimate is not computed there")


def memory_comparison(args) -> None:
    """Peak RSS of the train job against the same job holding the reference model, on a model
    large enough that its weights and optimizer state, not the imported libraries, dominate."""
    model = LARGE_MODEL
    hidden, layers = model["hidden_size"], model["num_layers"]
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        workdir = Path(tmp)
        # one optimizer step, one pair per forward: weights and optimizer state, not activations, dominate
        info = setup(workdir, TRAINING["batch_size"], args.seed, model, {**TRAINING, "micro_batch_size": 1})
        weights_mb = info["parameters"] * 4 / 2**20
        print(f"\nmemory: Llama, {info['parameters'] / 1e6:.1f}M parameters ({layers} layers, hidden {hidden}; "
              f"{weights_mb:.0f} MB of float32 weights), one step of {TRAINING['batch_size']} pairs, micro-batch 1")
        runs = {kind: run_worker(__file__, kind, workdir, args.threads) for kind in ("iteralign", "iteralign+ref")}
        for kind, r in runs.items():
            print(f"  {kind:16s} peak RSS {r['peak_rss_mb']:6.0f} MB, above start {r['peak_rss_mb'] - r['baseline_rss_mb']:6.0f} MB")
        own, held = runs["iteralign"], runs["iteralign+ref"]
        print(f"  peak RSS iteralign / iteralign+ref {own['peak_rss_mb'] / held['peak_rss_mb']:.2f}x, above start "
              f"{(own['peak_rss_mb'] - own['baseline_rss_mb']) / (held['peak_rss_mb'] - held['baseline_rss_mb']):.2f}x "
              "(goal <= 0.6x; fp32 AdamW keeps weights + gradients + 2 moments = 4x the weights, so holding "
              "a 1x reference can add at most 1/4: the floor is about 0.8x)")


if __name__ == "__main__":
    main()
