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
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

VOCAB_WORDS = 8000
MODEL = {"hidden_size": 256, "intermediate_size": 688, "num_layers": 4, "num_heads": 4,
         "max_position_embeddings": 512}
TRAINING = {"loss": "dpo", "beta": 0.1, "lr": 1.0e-5, "warmup_steps": 0, "schedule": "constant",
            "batch_size": 8, "micro_batch_size": 8, "epochs": 1, "max_grad_norm": 10.0,
            "max_length": 512, "max_prompt_length": 256, "weight_decay": 0.0}
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}user : {{ m['content'] }} "
                 "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")
KINDS = ("iteralign", "iteralign+ref", "trl", "trl-precomputed")


# ---------------------------------------------------------------- set-up (no download)
def build_tokenizer():
    """Word-level: tokens never merge across the prompt/completion boundary, so TRL's joint
    tokenization of prompt+completion gives the ids iteralign's separate one gives."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, "user": 4, "assistant": 5, ":": 6}
    for i in range(VOCAB_WORDS):
        vocab[f"w{i}"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_feedback(pairs: int, seed: int) -> list[dict]:
    """Pairwise feedback items: prompts of 8-40 words, completions of 4-80 words."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def text(low, high):
        return " ".join(f"w{i}" for i in rng.integers(0, VOCAB_WORDS, size=int(rng.integers(low, high))))

    items = []
    for p in range(pairs):
        items.append({"type": "pairwise_feedback", "prompt_id": f"p{p}",
                      "prompt": [{"role": "user", "content": text(8, 40)}],
                      "output_A": [{"role": "assistant", "content": " " + text(4, 80)}],
                      "output_B": [{"role": "assistant", "content": " " + text(4, 80)}], "label": int(p % 2)})
    return items


def setup(workdir: Path, pairs: int, seed: int, model: dict = MODEL, training: dict = TRAINING) -> dict:
    import torch
    import yaml

    from iteralign import config as cfg
    from iteralign.artifacts import write_json, write_parquet
    from iteralign.reference import reference_logps
    from iteralign.tiny import build_llama

    tokenizer = build_tokenizer()
    reference = build_llama(tokenizer, seed=seed, **model)
    reference.save_pretrained(workdir / "reference")
    tokenizer.save_pretrained(workdir / "reference")
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # the policy of a later round: near the reference, not equal to it
        for param in reference.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    reference.save_pretrained(workdir / "policy")
    tokenizer.save_pretrained(workdir / "policy")
    write_json(make_feedback(pairs, seed), workdir / "feedback_r1.json")
    raw = {"experiment": "bench", "seed": seed, "training": training}
    (workdir / "config.yaml").write_text(yaml.safe_dump(raw))
    config = cfg.validate(raw)
    write_parquet(reference_logps(config, workdir / "feedback_r1.json", workdir / "reference"),
                  workdir / "reflogps_r1.parquet")
    return {"parameters": sum(p.numel() for p in reference.parameters())}


# ---------------------------------------------------------------- workers (one process each)
def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    """This process's resident memory now."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started its program (VmHWM). Not
    getrusage's ru_maxrss: that survives exec, so a worker would inherit the peak of the
    benchmark process that forked it."""
    return _status_mb("VmHWM")


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
                     "length": max(len(chosen.input_ids), len(rejected.input_ids))})
    order = plan_batches([r["length"] for r in rows], tcfg["batch_size"], [config["seed"], 1, 0], False)
    return [rows[i] for batch in order for i in batch]


def worker_iteralign(workdir: Path, with_reference: bool) -> dict:
    from iteralign import config as cfg
    from iteralign.train.trainer import train_round

    config = cfg.load(workdir / "config.yaml")
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
            "baseline_rss_mb": baseline}


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


def run_worker(kind: str, workdir: Path, threads: int) -> dict:
    """Run one measurement in a fresh process (so peak RSS is that job's alone)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, __file__, "--worker", kind, str(workdir), "--threads", str(threads)],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{kind} worker failed ({result.returncode}):\n{result.stderr[-3000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    return measured


def worker_main(kind: str, workdir: Path, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    if kind.startswith("iteralign"):
        result = worker_iteralign(workdir, with_reference=kind == "iteralign+ref")
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
def add_job_arguments(parser: argparse.ArgumentParser, kinds: tuple[str, ...]) -> None:
    """The options of every training bench: threads, pairs, seed, and the worker call that runs one job."""
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per job (1: least disturbed by other load on a shared machine)")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=kinds, help=argparse.SUPPRESS)
    parser.add_argument("workdir", nargs="?", help=argparse.SUPPRESS)


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
    parser.add_argument("--memory-model", default="768,8", metavar="HIDDEN,LAYERS",
                        help="the larger model of the memory comparison (weights, not the process, dominate)")
    add_job_arguments(parser, KINDS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker, Path(args.workdir), args.threads)
        return

    import trl

    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        workdir = Path(tmp)
        info = setup(workdir, args.pairs, args.seed)
        print(f"model: Llama, {info['parameters'] / 1e6:.1f}M parameters ({MODEL['num_layers']} layers, hidden "
              f"{MODEL['hidden_size']}, vocab {VOCAB_WORDS + 7}); {args.pairs} pairs, batch "
              f"{TRAINING['batch_size']}, float32, {args.threads} threads; trl {trl.__version__}")
        results: dict[str, list[dict]] = {kind: [] for kind in KINDS}
        for repeat in range(args.repeats):
            order = KINDS if repeat % 2 == 0 else KINDS[::-1]  # interleaved, alternating order
            for kind in order:
                results[kind].append(run_worker(kind, workdir, args.threads))
                r = results[kind][-1]
                print(f"  repeat {repeat + 1} {kind:16s} {r['tokens'] / r['seconds']:8.0f} tokens/s "
                      f"peak RSS {r['peak_rss_mb']:6.0f} MB  first loss {r['first_loss']:.6f}", flush=True)
            if repeat == 0:
                check_same_first_loss({kind: results[kind][0]["first_loss"] for kind in KINDS})

        throughput = {kind: statistics.median(r["tokens"] / r["seconds"] for r in results[kind]) for kind in KINDS}

        def paired_ratio(a, b, value):
            """Median over repeats of a/b, each repeat's two runs having been made back to back."""
            return statistics.median(value(x) / value(y) for x, y in zip(results[a], results[b], strict=True))

        def speed(r):
            return r["tokens"] / r["seconds"]

        def cpu_speed(r):
            return r["tokens"] / r["cpu_seconds"]

        def peak(r):
            return r["peak_rss_mb"]

        def above_start(r):
            return r["peak_rss_mb"] - r["baseline_rss_mb"]

        print(f"\n{'job':16s} {'tokens/s':>9s} {'tokens/CPU-s':>13s} {'peak RSS MB':>12s} {'above start MB':>15s}"
              f"   (medians of {args.repeats})")
        for kind in KINDS:
            print(f"{kind:16s} {throughput[kind]:9.0f} {statistics.median(map(cpu_speed, results[kind])):13.0f} "
                  f"{statistics.median(map(peak, results[kind])):12.0f} "
                  f"{statistics.median(map(above_start, results[kind])):15.0f}")
        print("\nratios (median over repeats of the ratio within a repeat):")
        for label, value in (("tokens/s", speed), ("tokens/CPU-s", cpu_speed)):
            print(f"  {label:12s} iteralign / trl {paired_ratio('iteralign', 'trl', value):.2f}x (goal >= 1.5x), "
                  f"iteralign / trl-precomputed {paired_ratio('iteralign', 'trl-precomputed', value):.2f}x")
        for label, value in (("peak RSS", peak), ("RSS above start", above_start)):
            print(f"  {label} iteralign / iteralign+ref {paired_ratio('iteralign', 'iteralign+ref', value):.2f}x  "
                  f"(goal <= 0.6x), iteralign / trl {paired_ratio('iteralign', 'trl', value):.2f}x")
        print("\npadding waste (share of forward positions that are padding):")
        for label, waste in padding_waste(workdir, args.seed).items():
            print(f"  {label:32s} {100 * waste:5.1f}%")
    memory_comparison(args)


def memory_comparison(args) -> None:
    """Peak RSS of the train job against the same job holding the reference model, on a model
    large enough that its weights and optimizer state, not the imported libraries, dominate."""
    hidden, layers = (int(v) for v in args.memory_model.split(","))
    model = {**MODEL, "hidden_size": hidden, "intermediate_size": int(hidden * 8 / 3) // 16 * 16,
             "num_layers": layers, "num_heads": max(1, hidden // 64)}
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        workdir = Path(tmp)
        # one optimizer step, one pair per forward: weights and optimizer state, not activations, dominate
        info = setup(workdir, TRAINING["batch_size"], args.seed, model, {**TRAINING, "micro_batch_size": 1})
        weights_mb = info["parameters"] * 4 / 2**20
        print(f"\nmemory: Llama, {info['parameters'] / 1e6:.1f}M parameters ({layers} layers, hidden {hidden}; "
              f"{weights_mb:.0f} MB of float32 weights), one step of {TRAINING['batch_size']} pairs, micro-batch 1")
        runs = {kind: run_worker(kind, workdir, args.threads) for kind in ("iteralign", "iteralign+ref")}
        for kind, r in runs.items():
            print(f"  {kind:16s} peak RSS {r['peak_rss_mb']:6.0f} MB, above start {r['peak_rss_mb'] - r['baseline_rss_mb']:6.0f} MB")
        own, held = runs["iteralign"], runs["iteralign+ref"]
        print(f"  peak RSS iteralign / iteralign+ref {own['peak_rss_mb'] / held['peak_rss_mb']:.2f}x, above start "
              f"{(own['peak_rss_mb'] - own['baseline_rss_mb']) / (held['peak_rss_mb'] - held['baseline_rss_mb']):.2f}x "
              "(goal <= 0.6x; fp32 AdamW keeps weights + gradients + 2 moments = 4x the weights, so holding "
              "a 1x reference can add at most 1/4: the floor is about 0.8x)")


if __name__ == "__main__":
    main()
