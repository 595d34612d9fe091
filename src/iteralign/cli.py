"""``iteralign <step>``: one subcommand per rule, so every step can be re-run by hand.

Each step reads the experiment config (``--config``, validated and completed
against the schema), its inputs by path, and writes its outputs atomically with
provenance. Errors that a user can fix print one clear line and exit with 2.

Who writes what: the CLI makes every step's Provenance (config hash, seed, inputs by
name). A step whose artefact is a table or a JSON document (plan, sample, score,
feedback, reference, evaluate, prune) returns it, and the CLI writes it with
``prov.record(...)``. A step whose artefact is a checkpoint folder (sft, link-sft,
train) is handed the Provenance and writes the folder and its metrics itself, while it
runs and checkpoint first, so that metrics on disk mean a complete checkpoint. Pages
for a person (audit.tsv, report.html, round_r{n}.txt) carry no provenance; the CLI
writes them (:func:`_write_text`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from iteralign import tracking
from iteralign.errors import UserError, user_message

log = logging.getLogger("iteralign")


def _setup_logging(level: str) -> None:
    from iteralign.cluster import is_main_process

    if not is_main_process():  # the other processes of an `accelerate launch` only warn
        level = "warning"
    from iteralign.redaction import RedactingFilter

    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for handler in logging.getLogger().handlers:  # every log line passes the secret filter
        handler.addFilter(RedactingFilter())
    for noisy in ("httpx", "httpx2", "openai", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _log_job_environment(step: str) -> None:
    """One line with the scheduler job and visible GPUs (JSON), so a job's log shows its grant."""
    import json

    from iteralign.cluster import job_environment

    log.info("%s: job environment %s", step, json.dumps(job_environment(), sort_keys=True))


# Steps that read no scorer leave its environment (reward module, API key) unchecked.
_STEPS_WITHOUT_SCORER = ("feedback", "reference", "old-policy", "train", "prune", "report")


def _config(args):
    from iteralign import config as cfg

    config = cfg.load(args.config)
    if args.step not in _STEPS_WITHOUT_SCORER:
        cfg.check_environment(config, args.config)
    args.loaded_config = config  # kept for the job's tracking (main)
    return config


def _provenance(step: str, config: dict, inputs: dict):
    from iteralign.artifacts import Provenance
    from iteralign.config import config_hash

    return Provenance(step, config_hash(config), config["seed"], {k: v for k, v in inputs.items() if v})


def _write_text(path: str, text: str) -> None:
    """A page for a person (no provenance), written atomically."""
    from iteralign.artifacts import atomic_path

    with atomic_path(Path(path)) as tmp:
        tmp.write_text(text)


def _threads(args) -> None:
    if getattr(args, "threads", None):
        from iteralign.modeling import set_threads

        set_threads(args.threads)


# ---------------------------------------------------------------- steps
def cmd_plan(args) -> None:
    from iteralign.artifacts import write_parquet
    from iteralign.prompts import load_prompts, plan_rounds

    config = _config(args)
    prompts = load_prompts(config)  # first: a missing or bad source is named with its key
    prov = _provenance("plan", config, {"source": None if config["prompts"]["source"].startswith("demo:")
                                        else config["prompts"]["source"]})
    plan = plan_rounds(prompts, config)
    if config["policy"]["sft_checkpoint"]:  # its tokenizer is known now: check the prompts before any job
        from iteralign.sample import check_planned_prompts

        check_planned_prompts(config["policy"]["sft_checkpoint"], plan, config, config["prompts"]["source"])
    rounds = int(plan["round"].max())
    log.info("plan: %d distinct prompts, %d eval, %d rounds of up to %d", len(prompts),
             (plan["split"] == "eval").sum(), rounds, config["prompts"]["per_round"])
    write_parquet(plan, args.output, prov.record(rounds=rounds, distinct_prompts=len(prompts)))


def cmd_sft(args) -> None:
    from iteralign.sft import run_sft

    config = _config(args)
    _threads(args)
    data = config["sft"]["data"]
    prov = _provenance("sft", config, {"data": None if data.startswith("demo:") else data})
    run_sft(config, args.output, args.metrics, prov)


def cmd_link_sft(args) -> None:
    from iteralign.sft import link_sft

    config = _config(args)
    inputs = {"stamp": args.stamp} if args.stamp else {}
    link_sft(config, args.output, _provenance("link_sft", config, inputs), stamp=args.stamp)


def cmd_sample(args) -> None:
    from iteralign.artifacts import read_parquet, write_parquet
    from iteralign.config import round_seed
    from iteralign.prompts import messages_from_cell
    from iteralign.sample import generate, sample_frame

    config = _config(args)
    _threads(args)
    prov = _provenance("sample", config, {"prompts": args.prompts, "checkpoint": args.checkpoint})
    plan = read_parquet(args.prompts)
    todo = plan[(plan["split"] == "train") & (plan["round"] == args.round)]
    if todo.empty:
        raise UserError(f"{args.prompts}: no training prompts planned for round {args.round}")
    sampler = _sampling_round(config, args.round, args.checkpoint)
    scfg = config["sampling"]
    seed = round_seed(config, args.round)
    prompts = [messages_from_cell(p) for p in todo["prompt"]]
    decoding = {k: scfg[k] for k in ("num_samples", "temperature", "top_p", "max_new_tokens", "stop")}
    log.info("round %d: sampling %d x %d completions from %s", args.round, len(prompts), scfg["num_samples"],
             args.checkpoint)
    generation = generate(args.checkpoint, prompts, decoding, config, seed, progress=f"sample r{args.round}",
                          prompt_ids=[f"{pid} ({args.prompts})" for pid in todo["prompt_id"]])
    frame = sample_frame(args.round, list(todo["prompt_id"]), prompts, generation.texts, generation.completions,
                         args.checkpoint, seed)
    write_parquet(frame, args.output, prov.record(round=args.round, backend=generation.backend, rows=len(frame),
                                                  sampling_round=sampler, lag=scfg["lag"]))


def _sampling_round(config: dict, round_n: int, checkpoint: str) -> int | None:
    """The round of the checkpoint that samples round ``round_n``, checked against sampling.lag
    when the checkpoint is one of the experiment's (ckpt_r{m}/FINAL); None for another folder."""
    from iteralign.config import sampling_round
    from iteralign.layout import round_of_checkpoint

    found, expected = round_of_checkpoint(Path(checkpoint)), sampling_round(config, round_n)
    if found is not None and found != expected:
        raise UserError(f"sample --checkpoint {checkpoint}: round {round_n} samples from ckpt_r{expected} with "
                        f"sampling.lag {config['sampling']['lag']}, found ckpt_r{found}")
    return found


def cmd_score(args) -> None:
    from iteralign.artifacts import check_columns, read_parquet, write_parquet
    from iteralign.cluster import is_main_process
    from iteralign.score import score_samples

    config = _config(args)
    scoring, inputs = config["scoring"], {"samples": args.samples}
    if scoring["scorer"] == "reward_model":  # the one scorer that runs torch here: others never import it
        from iteralign.score.reward_model import check_checkpoint

        _threads(args)
        rm = scoring["reward_model"]
        inputs["reward_model"] = check_checkpoint(rm["path"], rm["trust_remote_code"])
    main = is_main_process()  # under accelerate launch, every process scores a share; rank 0 writes
    prov = _provenance("score", config, inputs) if main else None
    samples = read_parquet(args.samples)
    check_columns(samples, ["prompt_id", "sample_id", "prompt", "output"], args.samples)
    rewards, result = score_samples(samples, config)
    if not main:
        return
    failed = int(rewards["reward"].isna().sum())
    log.info("round %d: scored %d samples with %s, mean reward %.4f, %d failed", args.round, len(rewards),
             scoring["scorer"], rewards["reward"].mean(), failed)
    if result.usage:
        log.info("round %d: scorer usage %s", args.round, result.usage)
    write_parquet(rewards, args.output, prov.record(round=args.round, failed=failed, usage=result.usage))


def cmd_feedback(args) -> None:
    from iteralign.artifacts import check_columns, read_parquet, write_json
    from iteralign.feedback import (
        build_feedback,
        check_finite_sample_rewards,
        check_one_row_per_sample,
        check_some_feedback,
    )
    from iteralign.prompts import messages_from_cell

    config = _config(args)
    prov = _provenance("feedback", config, {"samples": args.samples, "rewards": args.rewards})
    samples, rewards = read_parquet(args.samples), read_parquet(args.rewards)
    check_columns(rewards, ["prompt_id", "sample_id", "reward"], args.rewards)
    check_one_row_per_sample(rewards, args.rewards)
    merged = samples.merge(rewards[["prompt_id", "sample_id", "reward"]], on=["prompt_id", "sample_id"],
                           how="left", validate="one_to_one")
    if len(merged) != len(rewards):
        raise UserError(f"{args.rewards} has {len(rewards)} rows but {args.samples} has {len(samples)}; "
                        "they must describe the same samples")
    records = [
        {"prompt_id": r.prompt_id, "sample_id": int(r.sample_id), "prompt": messages_from_cell(r.prompt),
         "output": r.output, "reward": float(r.reward)}
        for r in merged.itertuples(index=False)
    ]
    check_finite_sample_rewards(records, args.rewards)
    items, stats = build_feedback(records, config, args.round)
    log.info("round %d: %s feedback: %s", args.round, config["feedback"]["type"], stats)
    check_some_feedback(items, stats, args.rewards)
    write_json(items, args.output, prov.record(round=args.round, stats=stats))
    tracking.log_round(config, "feedback", args.round, stats)


def cmd_reference(args) -> None:
    from iteralign.reference import reference_logps

    _write_logps_table(args, "reference", reference_logps)


def cmd_old_policy(args) -> None:
    from iteralign.reference import old_policy_logps

    _write_logps_table(args, "old_policy", old_policy_logps)


def _write_logps_table(args, step: str, compute) -> None:
    """A table of log-probs of a round's feedback under one checkpoint (the reference or old_policy step)."""
    from iteralign.artifacts import write_parquet
    from iteralign.cluster import is_main_process

    config = _config(args)
    _threads(args)
    main = is_main_process()  # under accelerate launch, every process computes a share; rank 0 writes
    prov = _provenance(step, config, {"feedback": args.feedback, "checkpoint": args.checkpoint}) if main else None
    frame = compute(config, args.feedback, args.checkpoint)
    if main:
        log.info("round %d: %s log-probs of %d sequences under %s", args.round, step.replace("_", "-"), len(frame),
                 args.checkpoint)
        write_parquet(frame, args.output, prov.record(round=args.round, rows=len(frame)))


def cmd_train(args) -> None:
    from iteralign.train.trainer import train_round

    config = _config(args)
    _threads(args)
    inputs = {"checkpoint": args.checkpoint, **({"base": args.base} if args.base else {})}
    inputs.update({f"feedback_{i}": p for i, p in enumerate(args.feedback)})
    inputs.update({f"reference_{i}": p for i, p in enumerate(args.reference)})
    inputs.update({f"old_policy_{i}": p for i, p in enumerate(args.old_policy)})
    prov = _provenance("train", config, inputs)
    train_round(config, args.round, args.feedback, args.reference, args.checkpoint, args.output, args.metrics, prov,
                base_checkpoint=args.base, old_policy_paths=args.old_policy)


def cmd_evaluate(args) -> None:
    from iteralign.artifacts import read_parquet, read_provenance, write_json, write_parquet
    from iteralign.evaluate import check_comparable, decoding_settings, evaluate

    config = _config(args)
    _threads(args)
    prov = _provenance("evaluate", config, {"prompts": args.prompts, "checkpoint": args.checkpoint,
                                            "reference_checkpoint": args.reference_checkpoint,
                                            "baseline": args.baseline, "previous": args.previous})
    if args.round > 0 and (args.baseline is None or args.previous is None):
        raise UserError("evaluate: rounds after 0 need --baseline (eval_r0.parquet) and --previous "
                        "(eval_r{n-1}.parquet) for the win rates")
    plan = read_parquet(args.prompts)
    eval_ids = plan.loc[plan["split"] == "eval", "prompt_id"]
    decoding = decoding_settings(config)
    needs = ["eval_scorer_reward"] if config["evaluation"]["scorer"] is not None else []
    others = {}
    for name, path in (("baseline", args.baseline), ("previous", args.previous)):
        if path:  # checked before generating: a mismatch fails in seconds, not after the model ran
            others[name] = read_parquet(path)
            recorded = (read_provenance(path) or {}).get("decoding")
            check_comparable(others[name], path, eval_ids, decoding, recorded, needs)
    frame, summary = evaluate(config, args.round, plan, args.checkpoint, args.reference_checkpoint,
                              others.get("baseline"), others.get("previous"))
    log.info("round %d eval: mean reward %.4f CI %s, win rate vs r0 %.3f, vs previous %.3f, "
             "length-controlled reward %.4f, KL %.4f", args.round, summary["mean_reward"],
             [round(x, 4) for x in summary["reward_ci95"]], summary["win_rate_vs_r0"],
             summary["win_rate_vs_previous"], summary["length_controlled_reward"], summary["kl_to_reference"])
    record = prov.record(round=args.round, decoding=decoding)
    write_parquet(frame, args.table, record)
    write_json(summary, args.summary, record)
    tracking.log_round(config, "eval", args.round, summary)


def cmd_prune(args) -> None:
    from iteralign.artifacts import write_json
    from iteralign.retention import prune_checkpoint

    config = _config(args)
    prov = _provenance("prune", config, {})
    record = prune_checkpoint(config, args.round, args.checkpoint)
    write_json(record, args.output, prov.record(round=args.round))


def cmd_audit(args) -> int:
    import json

    from iteralign.audit import audit_rows, format_problems, format_table, to_tsv, verify_provenance

    rows = audit_rows(args.results, args.benchmarks)
    checked, problems = verify_provenance(args.results, deep=args.deep)
    if args.output:
        _write_text(args.output, to_tsv(rows))
    if args.json:
        provenance = {"checked": checked, "problems": [p._asdict() for p in problems]}
        print(json.dumps({"rounds": rows, "provenance": provenance}, indent=2, default=str))
    else:
        print(format_table(rows))
        print()
        print(format_problems(checked, problems))
    return 1 if problems and args.strict else 0


def cmd_restore(args) -> None:
    from iteralign.artifacts import lock_experiment
    from iteralign.last_good import STORE, restore

    lock_experiment(args.results)  # never while a run of the experiment is going on
    restored = restore(args.results)
    for unit in restored:
        print(f"restored {Path(args.results) / unit}")
    if not restored:
        print(f"nothing to restore: every artefact kept in {Path(args.results) / STORE} is in place")


def cmd_report(args) -> None:
    from iteralign.report import build_report

    _write_text(args.output, build_report(args.results, _config(args), args.benchmarks))
    log.info("report: %s", args.output)


def cmd_export(args) -> None:
    from iteralign.export import export

    for path in export(args.results, args.format, args.output):
        print(path)


def cmd_show(args) -> None:
    from iteralign.show import show

    print(show(args.path, n=args.n, start=args.start, prompt_id=args.prompt_id))


def cmd_round_summary(args) -> None:
    from iteralign.console import round_summary

    line = round_summary(args.evaluation, args.feedback)
    print(line, flush=True)
    _write_text(args.output, line + "\n")


# ---------------------------------------------------------------- parser
def _required(*flags: str) -> list[tuple[str, dict]]:
    return [(flag, {"required": True}) for flag in flags]


_RESULTS = ("results", {"help": "results/<experiment>"})
_BENCHMARKS = ("--benchmarks", {"default": None, "help": "Snakemake benchmark folder (default: benchmarks/<exp> "
                                "in the folder that holds results/)"})
_ROUND = ("--round", {"type": int, "required": True})
_THREADS = ("--threads", {"type": int, "default": None, "help": "torch CPU threads"})

# (name, function, help, takes --config, its arguments): one subcommand per rule, then the tools.
_COMMANDS = [
    ("plan", cmd_plan, "shuffle prompts once, hold out eval, deal the rest into rounds", True, _required("--output")),
    ("sft", cmd_sft, "build/fine-tune the SFT policy (ckpt_r0/FINAL)", True,
     [_THREADS, *_required("--output", "--metrics")]),
    ("link-sft", cmd_link_sft, "point ckpt_r0/FINAL at an existing SFT checkpoint", True,
     [*_required("--output"), ("--stamp", {"default": None, "help": "its content stamp "
                                           "(results/<exp>/inputs/policy.sft_checkpoint.json)"})]),
    ("sample", cmd_sample, "sample k completions per prompt of a round", True,
     [_ROUND, _THREADS, *_required("--prompts", "--checkpoint", "--output")]),
    ("score", cmd_score, "score a round's samples", True, [_ROUND, _THREADS, *_required("--samples", "--output")]),
    ("feedback", cmd_feedback, "turn rewards into feedback items", True,
     [_ROUND, *_required("--samples", "--rewards", "--output")]),
    ("reference", cmd_reference, "reference log-probs of a round's feedback", True,
     [_ROUND, _THREADS, *_required("--feedback"),
      ("--checkpoint", {"required": True, "help": "the SFT checkpoint (ckpt_r0/FINAL)"}), *_required("--output")]),
    ("old-policy", cmd_old_policy, "log-probs of a round's feedback under the checkpoint that sampled it "
     "(GRPO under sampling.lag)", True,
     [_ROUND, _THREADS, *_required("--feedback"),
      ("--checkpoint", {"required": True, "help": "the round's sampling checkpoint"}), *_required("--output")]),
    ("train", cmd_train, "train the policy one round", True,
     [_ROUND, _THREADS,
      ("--feedback", {"required": True, "nargs": "+", "help": "feedback files (several with training.history)"}),
      ("--reference", {"default": [], "nargs": "*",
                       "help": "their reference tables, in any order (none for reference-free losses)"}),
      ("--checkpoint", {"required": True, "help": "policy of the previous round"}),
      ("--base", {"default": None, "help": "the SFT checkpoint under the adapter (training.lora)"}),
      ("--old-policy", {"default": [], "nargs": "*", "help": "the old-policy table of GRPO's ratio under "
                        "sampling.lag (oldlogps_r{n}.parquet)"}),
      *_required("--output", "--metrics")]),
    ("evaluate", cmd_evaluate, "held-out evaluation of a round's policy", True,
     [_ROUND, _THREADS, *_required("--prompts", "--checkpoint", "--reference-checkpoint"),
      ("--baseline", {"default": None, "help": "eval_r0.parquet (rounds > 0)"}),
      ("--previous", {"default": None, "help": "eval_r{n-1}.parquet (rounds > 0)"}),
      ("--table", {"required": True, "help": "eval_r{n}.parquet"}),
      ("--summary", {"required": True, "help": "eval_r{n}.json"})]),
    ("prune", cmd_prune, "delete a policy checkpoint no job reads any more (checkpoints.keep_last)", True,
     [_ROUND, ("--checkpoint", {"required": True, "help": "results/<exp>/ckpt_r{n}/FINAL"}),
      ("--output", {"required": True, "help": "ckpt_r{n}/pruned.json: what was deleted"})]),
    ("audit", cmd_audit, "per-round table of an experiment's artefacts; verifies provenance", False,
     [_RESULTS, ("--json", {"action": "store_true", "help": "print {rounds, provenance} as JSON"}),
      ("--output", {"default": None, "help": "also write the table as TSV"}), _BENCHMARKS,
      ("--strict", {"action": "store_true", "help": "exit with 1 when provenance does not verify"}),
      ("--deep", {"action": "store_true", "help": "also re-hash checkpoint folders against their sidecars"})]),
    ("restore", cmd_restore, "put back the last good version of every artefact missing from an experiment "
     "(what a failed or killed run removed)", False, [_RESULTS]),
    ("report", cmd_report, "one self-contained HTML report of an experiment", True,
     [_RESULTS, ("--output", {"required": True, "help": "report.html"}), _BENCHMARKS]),
    ("round-summary", cmd_round_summary, "print one line per evaluated round: reward, win rates, KL, feedback", False,
     [("--evaluation", {"required": True, "help": "eval_r{n}.json"}),
      ("--feedback", {"default": None, "help": "feedback_r{n}.json (its sidecar's kept/dropped counts)"}),
      ("--output", {"required": True, "help": "where the line is kept too"})]),
    ("export", cmd_export, "the rounds' feedback as TRL datasets (parquet, one file per round)", False,
     [_RESULTS, ("--format", {"required": True, "choices": ["trl"], "help": "trl: preference (prompt/chosen/"
                              "rejected) or unpaired preference (prompt/completion/label)"}),
      ("--output", {"default": None, "help": "folder for the parquet files (default: results/<exp>/export/trl)"})]),
    ("show", cmd_show, "pretty-print a few items of a feedback, samples, rewards or eval file", False,
     [("path", {"help": "feedback_r{n}.json, samples_r{n}.parquet, rewards_r{n}.parquet, eval_r{n}.parquet ..."}),
      ("--n", {"type": int, "default": 5, "help": "how many items (prompts for per-sample files)"}),
      ("--start", {"type": int, "default": 0, "help": "index of the first item"}),
      ("--prompt-id", {"default": None, "help": "only this prompt"})]),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iteralign", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("ITERALIGN_LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="step", required=True, metavar="<step>")
    for name, func, help_text, takes_config, arguments in _COMMANDS:
        command = sub.add_parser(name, help=help_text)
        command.set_defaults(func=func)
        if takes_config:
            command.add_argument("--config", required=True, help="experiment config (YAML)")
        for flag, options in arguments:
            command.add_argument(flag, **options)
    return parser


def _track_job_seconds(args, seconds: float) -> None:
    """A finished job's wall time to the experiment's trackers: steps of a round at the
    round, the steps before round 1 at round 0."""
    config = getattr(args, "loaded_config", None)
    round_n = getattr(args, "round", 0 if args.step in ("plan", "sft", "link-sft") else None)
    if config is not None and round_n is not None:
        tracking.log_job_seconds(config, args.step, round_n, seconds)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    if args.step not in ("show", "export", "restore") and not (args.step == "audit" and args.output is None):  # not for a person's query
        _log_job_environment(args.step)
    started = time.monotonic()
    try:
        status = args.func(args)
        _track_job_seconds(args, time.monotonic() - started)
    except (UserError, FileNotFoundError) as exc:
        # Input a user can fix (errors.py): one line naming the problem, and a hint line
        # when there is one. Anything else is a bug and keeps its traceback.
        if os.environ.get("ITERALIGN_DEBUG"):
            raise
        print(user_message(args.step, exc), file=sys.stderr)
        return 2
    except Exception:  # a bug: its traceback, with any secret in it redacted
        if os.environ.get("ITERALIGN_DEBUG"):
            raise
        import traceback

        from iteralign.redaction import redact

        print(redact(traceback.format_exc()), file=sys.stderr, end="")
        return 1
    finally:
        tracking.close()
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
