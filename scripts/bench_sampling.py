"""Sampling throughput: vLLM (the CPU build in .venv-vllm), the hf backend, and a naive loop.

Three ways to draw k completions for each of the same prompts from the same checkpoint:

- vllm: iteralign's vLLM backend (``sample/vllm.py``: one engine, one request per prompt
  with n = k), run in .venv-vllm's Python; engine start-up (import + ``LLM(...)``) is
  reported apart from generation;
- hf: iteralign's transformers backend (``sample/hf.py``: length-sorted, left-padded
  batches of ``--batch-size`` prompts, each expanded to k sequences, KV cache);
- naive: one ``model.generate(prompt, num_return_sequences=k)`` per prompt, the loop of
  HALOs' and RLHFlow's CPU/HF fallbacks.

Each at the demo's size (330k parameters, 2 layers of 128) and at about 60M parameters
(12 layers of 640, heads of 64), random weights (so nearly every completion runs to
``--max-new-tokens``: the same work for every way), float32, ``--threads`` threads each.
Samples/s counts generation only; model loading is left out for hf and naive too.

    python scripts/bench_sampling.py [--prompts 64] [--samples 4] [--max-new-tokens 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
SIZES = {
    "demo (330k)": {"hidden_size": 128, "intermediate_size": 256, "num_layers": 2, "num_heads": 4},
    "60M": {"hidden_size": 640, "intermediate_size": 1728, "num_layers": 12, "num_heads": 10},
}

# Run by .venv-vllm's Python: times the import, the engine start and the generation.
VLLM_WORKER = """
import json, sys, time
started = time.perf_counter()
if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    import torch
    torch.set_num_threads(spec["threads"])
    from iteralign.modeling import load_tokenizer, render_prompt
    from iteralign.sample import vllm as backend
    backend.prepare_environment(False, spec["threads"])
    from vllm import LLM, SamplingParams
    imported = time.perf_counter()
    tokenizer = load_tokenizer(spec["checkpoint"])
    texts = [render_prompt(tokenizer, m) for m in spec["prompts"]]
    prompts = [{"prompt_token_ids": tokenizer(t, add_special_tokens=False).input_ids} for t in texts]
    params = [SamplingParams(**backend.sampling_arguments(spec["decoding"], 0, i)) for i in range(len(prompts))]
    llm = LLM(**backend.engine_arguments(spec["checkpoint"], spec["config"], 0, on_gpu=False))
    ready = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    done = time.perf_counter()
    tokens = sum(len(o.token_ids) for r in outputs for o in r.outputs)
    print("RESULT " + json.dumps({"import_s": imported - started, "engine_s": ready - imported,
                                  "generate_s": done - ready, "tokens": tokens}))
"""


def build_checkpoint(folder: Path, shape: dict) -> int:
    from iteralign.demo import ALPHABET
    from iteralign.tiny import build_char_tokenizer, build_llama

    tokenizer = build_char_tokenizer(ALPHABET)
    model = build_llama(tokenizer, max_position_embeddings=512, seed=0, **shape)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def make_prompts(count: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"{10 + (7 * i) % 90}+{10 + (13 * i) % 90}"}] for i in range(count)]


def run_vllm(checkpoint: Path, prompts, decoding: dict, threads: int) -> dict:
    from iteralign import config as cfg

    config = cfg.validate({"sampling": {"backend": "vllm", "max_model_len": 512}})
    spec = {"checkpoint": str(checkpoint), "prompts": prompts, "decoding": decoding, "threads": threads,
            "config": config}
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(VLLM_WORKER)
    result = subprocess.run([str(VLLM_PYTHON), script.name, json.dumps(spec)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    os.unlink(script.name)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM worker failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(lines[0].removeprefix("RESULT "))


def run_hf(checkpoint: Path, prompts, decoding: dict, batch_size: int) -> dict:
    from iteralign.modeling import load_causal_lm, load_tokenizer, render_prompt
    from iteralign.sample import hf

    tokenizer = load_tokenizer(checkpoint, padding_side="left")
    model = load_causal_lm(checkpoint)
    texts = [render_prompt(tokenizer, m) for m in prompts]
    started = time.perf_counter()
    completions = hf.generate(model, tokenizer, texts, decoding["num_samples"], decoding["temperature"],
                              decoding["top_p"], decoding["max_new_tokens"], batch_size, 0)
    return {"generate_s": time.perf_counter() - started,
            "tokens": sum(c.num_tokens for row in completions for c in row)}


def run_naive(checkpoint: Path, prompts, decoding: dict) -> dict:
    import torch

    from iteralign.modeling import load_causal_lm, load_tokenizer, render_prompt

    tokenizer = load_tokenizer(checkpoint)
    model = load_causal_lm(checkpoint).eval()
    started, tokens = time.perf_counter(), 0
    with torch.no_grad():
        for messages in prompts:
            ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False,
                            return_tensors="pt").input_ids
            out = model.generate(ids, do_sample=True, temperature=decoding["temperature"], top_k=0,
                                 max_new_tokens=decoding["max_new_tokens"],
                                 num_return_sequences=decoding["num_samples"],
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            tokens += int((out[:, ids.shape[1]:] != tokenizer.pad_token_id).sum())
    return {"generate_s": time.perf_counter() - started, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    if not VLLM_PYTHON.exists():
        raise SystemExit(f"{VLLM_PYTHON} does not exist: run `make vllm` first")
    prompts = make_prompts(args.prompts)
    decoding = {"num_samples": args.samples, "temperature": 1.0, "top_p": 1.0,
                "max_new_tokens": args.max_new_tokens, "stop": []}
    count = args.prompts * args.samples
    print(f"{args.prompts} prompts x {args.samples} samples, up to {args.max_new_tokens} new tokens, float32, "
          f"threads {args.threads}; samples/s over generation only")
    for name, shape in SIZES.items():
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = Path(folder) / "ckpt"
            parameters = build_checkpoint(checkpoint, shape)
            runs = {"vllm": run_vllm(checkpoint, prompts, decoding, args.threads),
                    "hf": run_hf(checkpoint, prompts, decoding, args.batch_size),
                    "naive": run_naive(checkpoint, prompts, decoding)}
        print(f"\n{name}: {parameters / 1e6:.2f}M parameters")
        for kind, run in runs.items():
            start = (f"  (start-up: import {run['import_s']:.1f} s + engine {run['engine_s']:.1f} s)"
                     if "engine_s" in run else "")
            print(f"  {kind:6s} {count / run['generate_s']:9.1f} samples/s  {run['tokens'] / run['generate_s']:9.1f} "
                  f"tokens/s  ({run['generate_s']:.2f} s){start}")
        print(f"  vllm / hf {runs['hf']['generate_s'] / runs['vllm']['generate_s']:.2f}x, "
              f"hf / naive {runs['naive']['generate_s'] / runs['hf']['generate_s']:.2f}x")


if __name__ == "__main__":
    main()
