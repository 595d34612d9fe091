"""What the training benchmarks share: the locally built models, tokenizer, preference
pairs and reference log-probs, the DPO configuration, the worker processes they time,
and the float32 matmul peak and FLOP/s estimate their throughputs are set against.

Not a benchmark itself (``make bench`` runs scripts/bench_*.py, hence the name): imported by
scripts/bench_training.py and scripts/bench_lora.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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
# about 60M parameters: 8 layers, hidden 768 (62.8M with the tied 8007-word embedding)
LARGE_MODEL = {**MODEL, "hidden_size": 768, "intermediate_size": 2048, "num_layers": 8, "num_heads": 12}


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


# ---------------------------------------------------------------- workers
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



def add_job_arguments(parser: argparse.ArgumentParser, kinds: tuple[str, ...]) -> None:
    """The options of every training bench: threads, pairs, seed, and the worker call that runs one job."""
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per job (1: least disturbed by other load on a shared machine)")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=kinds, help=argparse.SUPPRESS)
    parser.add_argument("workdir", nargs="?", help=argparse.SUPPRESS)


def run_worker(script: str | Path, kind: str, workdir: Path, threads: int) -> dict:
    """Run ``script --worker kind workdir`` in a fresh process (so that its peak RSS is its own) and
    return the JSON of its last stdout line, with ``job_seconds``: the whole process's wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(script), "--worker", kind, str(workdir), "--threads", str(threads)],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{kind} worker failed ({result.returncode}):\n{result.stderr[-3000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    measured["job_seconds"] = time.monotonic() - started
    return measured


# ---------------------------------------------------------------- FLOP/s
MATMUL_SIZES = (256, 512, 1024, 2048)


def matmul_peak(threads: int, sizes: tuple[int, ...] = MATMUL_SIZES, seconds: float = 1.0) -> dict[int, float]:
    """Float32 FLOP/s of torch.mm of square matrices of each size, on ``threads`` threads: the best of
    repeated runs of about ``seconds`` each (2 n^3 FLOPs per product)."""
    import torch

    torch.set_num_threads(threads)
    best = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm-up
        per_call = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(per_call) < 3:
            started = time.perf_counter()
            torch.mm(a, b)
            per_call.append(time.perf_counter() - started)
        best[n] = 2 * n**3 / min(per_call)
    return best


def training_flops(parameters: int, tokens_per_second: float) -> float:
    """The estimate of a training job's FLOP/s: 6 x parameters x tokens/s (forward 2N, backward 4N
    per token; attention's own products not counted, padding positions not counted)."""
    return 6 * parameters * tokens_per_second


def peak_worker_main() -> None:
    """``python training_bench.py --peak THREADS``: print the matmul peak as JSON (a fresh process)."""
    threads = int(sys.argv[sys.argv.index("--peak") + 1])
    print(json.dumps({str(n): flops for n, flops in matmul_peak(threads).items()}))


def measure_peak(threads: int) -> dict[int, float]:
    """The matmul peak, measured in a fresh process with the jobs' thread count."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run([sys.executable, __file__, "--peak", str(threads)], capture_output=True, text=True,
                            env=env, check=True)
    return {int(n): flops for n, flops in json.loads(result.stdout.strip().splitlines()[-1]).items()}


if __name__ == "__main__":
    peak_worker_main()
