"""Greedy evaluation of a finished experiment, redone with the transformers backend: same text as vLLM's?

For every round whose ``eval_r{n}.parquet`` and checkpoint exist, generates the held-out
prompts again with the hf backend (the experiment's own decoding settings) and counts the
prompts whose output, token count and finish reason equal the evaluation table's.

    python scripts/compare_backends.py results/demo-vllm
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    from iteralign.artifacts import read_parquet
    from iteralign.config import load
    from iteralign.evaluate import decoding_settings
    from iteralign.sample import generate

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", type=Path)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    (config_file,) = sorted((args.experiment / "config").glob("config_*.yaml"))[-1:]
    config = load(config_file)
    config["sampling"]["backend"] = "hf"
    decoding = decoding_settings(config)
    for table_file in sorted(args.experiment.glob("eval_r*.parquet"), key=lambda p: int(p.stem[6:])):
        n = int(table_file.stem[6:])
        checkpoint = args.experiment / f"ckpt_r{n}" / "FINAL"
        if not checkpoint.is_dir():
            print(f"round {n}: no checkpoint (pruned)")
            continue
        table = read_parquet(table_file)
        completions = generate(str(checkpoint), [list(p) for p in table["prompt"]], {**decoding, "num_samples": 1},
                               config, decoding["seed"]).completions
        same = [(c[0].text, c[0].num_tokens, c[0].finish_reason) == (row.output, row.num_output_tokens,
                                                                   row.finish_reason)
                for c, row in zip(completions, table.itertuples(), strict=True)]
        backend = json.loads(table_file.with_suffix(".json").read_text()).get("backend", "?")
        print(f"round {n}: {sum(same)} of {len(same)} held-out outputs of {backend} equal to hf's")


if __name__ == "__main__":
    main()
