"""Reward-model scoring throughput: length-sorted padded batches vs one sample at a time (HALOs).

Both runs use the same scorer code, model, samples and threads; one-at-a-time is
batch_size=1 (no padding, one forward per sample, as HALOs' train/label.py). Each
figure is the whole scorer call (tokenize, load the model, score), best of
--repeats runs, since other jobs may share the CPU. Prints samples/s of each, their
ratio, and the largest reward difference between the two, for each model width.

    python scripts/bench_scoring.py [--samples 512] [--batch-size 32] [--hidden 64,256]
                                    [--max-output-chars 64] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
import time
from pathlib import Path


def build_model(folder: Path, hidden: int) -> None:
    from iteralign.demo import ALPHABET
    from iteralign.tiny import build_char_tokenizer, build_llama_classifier

    tokenizer = build_char_tokenizer(ALPHABET)
    model = build_llama_classifier(tokenizer, num_labels=1, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_layers=2, num_heads=4, max_position_embeddings=512, seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def make_samples(count: int, max_chars: int, seed: int = 0):
    """Addition prompts with completions of 1 to ``max_chars`` digits: lengths as mixed as real samples."""
    rng = random.Random(seed)
    prompts = [[{"role": "user", "content": f"{rng.randint(10, 99)}+{rng.randint(10, 99)}"}] for _ in range(count)]
    outputs = ["".join(rng.choice("0123456789") for _ in range(rng.randint(1, max_chars))) for _ in range(count)]
    return prompts, outputs


def throughput(section: dict, prompts, outputs, repeats: int) -> tuple[float, list[float]]:
    """Best samples/s over ``repeats`` full scorer calls, and the rewards."""
    from iteralign.score.reward_model import RewardModelScorer

    best = 0.0
    for _ in range(repeats):
        scorer = RewardModelScorer(section)
        scorer.progress = False
        started = time.perf_counter()
        result = scorer.score(prompts, outputs)
        best = max(best, len(outputs) / (time.perf_counter() - started))
    return best, result.rewards


def main() -> None:
    import torch

    from iteralign import config as cfg

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", default="64,256", help="model widths to measure, comma-separated")
    parser.add_argument("--max-output-chars", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs each")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    prompts, outputs = make_samples(args.samples, args.max_output_chars)
    print(f"reward-model scoring on CPU: {args.samples} samples of 8-{args.max_output_chars + 8} tokens, "
          f"2-layer Llama reward models, {args.threads} thread(s), best of {args.repeats}")
    print(f"{'hidden':>6}  {'batched (bs ' + str(args.batch_size) + ')':>16}  {'one at a time':>14}  "
          f"{'ratio':>6}  max |diff|")
    for hidden in [int(h) for h in args.hidden.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            build_model(Path(tmp), hidden)
            base = cfg.validate({"scoring": {"scorer": "reward_model", "reward_model": {"path": tmp}}})
            section = base["scoring"]["reward_model"]
            throughput({**section, "batch_size": args.batch_size}, prompts[:64], outputs[:64], 1)  # warm-up
            batched, batched_rewards = throughput({**section, "batch_size": args.batch_size}, prompts, outputs,
                                                  args.repeats)
            single, single_rewards = throughput({**section, "batch_size": 1}, prompts, outputs, args.repeats)
        diff = max(abs(a - b) for a, b in zip(batched_rewards, single_rewards, strict=True))
        print(f"{hidden:>6}  {batched:>12.1f} /s  {single:>12.1f} /s  {batched / single:>5.2f}x  {diff:.1e}")


if __name__ == "__main__":
    main()
