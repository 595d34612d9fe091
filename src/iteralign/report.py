"""``iteralign report``: one self-contained HTML page of an experiment.

Plots over rounds (held-out reward with CIs and its length-controlled value, win
rates, output length, max-length hits, KL, feedback kept/dropped), per-step
training curves, reward histograms per round, held-out examples that changed
between round 0 and the last round, then the audit table, provenance
verification and the config. Every image is a PNG embedded as a data URI, so
the file can be mailed or archived alone. Plot functions take plain data and
return a matplotlib figure; :func:`build_report` puts them together.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from iteralign import layout
from iteralign.audit import format_cell

# Bookkeeping fields of train_r{n}.jsonl; every other numeric field is a curve.
_STEP_BOOKKEEPING = {"round", "step", "round_step", "epoch", "examples", "examples_seen"}
_CURVE_ORDER = ["loss", "margin", "accuracy", "reward_chosen", "reward_rejected", "kl", "reward_desirable",
                "reward_undesirable", "desirable_fraction", "logp_chosen", "logp_rejected", "grad_norm", "lr"]
_EVAL_COLUMNS = ["prompt_id", "prompt", "output", "reward", "eval_scorer_reward", "num_output_tokens",
                 "finish_reason"]
_EXAMPLE_CHARS = 400  # longer prompts and outputs are cut in the examples table (iteralign show has them whole)


@dataclass
class ExperimentData:
    """Everything the report shows, read from results/<exp>."""

    name: str
    evaluations: list[dict] = field(default_factory=list)  # eval_r{n}.json, by round
    eval_tables: dict = field(default_factory=dict)  # round -> frame with _EVAL_COLUMNS that exist
    steps: list[dict] = field(default_factory=list)  # every train_r{n}.jsonl line, by round then step
    feedback: dict = field(default_factory=dict)  # round -> feedback sidecar stats


def load_experiment(results: str | Path) -> ExperimentData:
    """Read the evaluation, training and feedback artefacts that exist (a run may be partial)."""
    import pandas as pd

    from iteralign.artifacts import read_jsonl, read_sidecar

    results = Path(results)
    if not results.is_dir():
        raise FileNotFoundError(f"{results} is not a results folder")
    data = ExperimentData(results.name)
    for _, path in layout.round_files(results, "eval", "json"):
        data.evaluations.append(json.loads(path.read_text()))
    for n, path in layout.round_files(results, "eval", "parquet"):
        present = _parquet_columns(path)
        columns = [c for c in _EVAL_COLUMNS if c in present]
        data.eval_tables[n] = pd.read_parquet(path, columns=columns)
    for _, path in layout.round_files(results, "train", "jsonl"):
        data.steps.extend(read_jsonl(path))
    for n, path in layout.round_files(results, "feedback", "json"):
        meta = read_sidecar(path)
        if meta and "stats" in meta:
            data.feedback[n] = meta["stats"]
    return data


def _parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return list(pq.read_schema(path).names)


# ---------------------------------------------------------------- plots
def _pyplot():
    """matplotlib.pyplot on the Agg backend: files only, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(width: float = 6.4, height: float = 3.6, ncols: int = 1):
    fig, axes = _pyplot().subplots(1, ncols, figsize=(width, height), squeeze=False)
    return fig, list(axes[0])


def _interval_errors(values: list[float], intervals: list[list[float]]) -> np.ndarray:
    """Matplotlib's yerr (distances below and above) from [lo, hi] intervals; 0 where undefined."""
    values = np.asarray(values, dtype=float)
    lo = np.array([i[0] if i else math.nan for i in intervals], dtype=float)
    hi = np.array([i[1] if i else math.nan for i in intervals], dtype=float)
    return np.nan_to_num(np.vstack([values - lo, hi - values]), nan=0.0).clip(min=0.0)


# The interval of a metric in eval_r{n}.json is `<metric>_ci95`, except for these two.
_CI_KEYS = {"mean_reward": "reward_ci95", "win_rate_vs_r0": "win_rate_ci95"}


def _series(evaluations: list[dict], key: str, section: str | None = None):
    """(rounds, values, intervals) of one metric over the rounds that have it; ``section``: e.g. eval_scorer."""
    rows = [(e["round"], (e.get(section) or {}) if section else e) for e in evaluations]
    rows = [(n, e) for n, e in rows if e.get(key) is not None]
    ci_key = _CI_KEYS.get(key, f"{key}_ci95")
    return [n for n, _ in rows], [e[key] for _, e in rows], [e.get(ci_key) for _, e in rows]


def _rounds_axis(ax, rounds) -> None:
    ax.set_xlabel("round (0 = SFT)")
    if rounds:
        ax.set_xticks(sorted(set(rounds)))
    ax.grid(alpha=0.3)


def plot_reward(evaluations: list[dict], section: str | None = None, title: str = "Held-out reward"):
    """Mean held-out reward per round with its 95% CI, and the length-controlled reward."""
    fig, (ax,) = _figure()
    rounds, values, intervals = _series(evaluations, "mean_reward", section)
    ax.errorbar(rounds, values, yerr=_interval_errors(values, intervals), marker="o", capsize=4,
                label="mean reward (95% CI)")
    lc_rounds, lc_values, lc_intervals = _series(evaluations, "length_controlled_reward", section)
    if lc_rounds:
        shifted = [r + 0.08 for r in lc_rounds]  # side by side, so both CIs stay visible
        ax.errorbar(shifted, lc_values, yerr=_interval_errors(lc_values, lc_intervals), marker="s", capsize=4,
                    linestyle="--", label="length-controlled (at round 0 length)")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.legend(fontsize=8)
    _rounds_axis(ax, rounds)
    return fig


def plot_win_rates(evaluations: list[dict]):
    """Win rate against round 0 and against the previous round, with 95% CIs; 0.5 is a draw."""
    fig, (ax,) = _figure()
    for key, label, shift in (("win_rate_vs_r0", "vs round 0", 0.0), ("win_rate_vs_previous", "vs previous round",
                                                                         0.08)):
        rounds, values, intervals = _series(evaluations, key)
        ax.errorbar([r + shift for r in rounds], values, yerr=_interval_errors(values, intervals), marker="o",
                    capsize=4, label=label)
    ax.axhline(0.5, color="grey", linewidth=1, linestyle=":")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("win rate (ties count half)")
    ax.set_title("Win rates on the held-out prompts")
    ax.legend(fontsize=8)
    _rounds_axis(ax, [e["round"] for e in evaluations])
    return fig


def plot_length(eval_tables: dict, evaluations: list[dict]):
    """Output length per round (box: quartiles, whiskers: 5-95%, dot: mean) and the fraction cut at max length."""
    fig, (left, right) = _figure(width=9.6, ncols=2)
    rounds = sorted(n for n, t in eval_tables.items() if "num_output_tokens" in t)
    if rounds:
        left.boxplot([eval_tables[n]["num_output_tokens"].to_numpy(dtype=float) for n in rounds],
                     positions=rounds, whis=(5, 95), showfliers=False, showmeans=True)
    left.set_ylabel("output tokens")
    left.set_title("Output length")
    _rounds_axis(left, rounds)
    fractions = [(e["round"], e["max_length_fraction"]) for e in evaluations if e.get("max_length_fraction") is not None]
    frac_rounds = [n for n, _ in fractions]
    bars = right.bar(frac_rounds, [f for _, f in fractions], color="tab:red", width=0.6)
    right.bar_label(bars, labels=[f"{f:.0%}" for _, f in fractions], fontsize=8)  # 0% stays readable
    right.set_ylim(0, 1)
    right.set_ylabel("fraction")
    right.set_title("Generations that hit max_new_tokens")
    _rounds_axis(right, frac_rounds)
    fig.tight_layout()
    return fig


def plot_kl(evaluations: list[dict]):
    """Mean log pi_n(y) - log pi_ref(y) on the round's own held-out generations, with its 95% CI."""
    fig, (ax,) = _figure()
    rounds, values, intervals = _series(evaluations, "kl_to_reference")
    ax.errorbar(rounds, values, yerr=_interval_errors(values, intervals), marker="o", capsize=4, color="tab:purple")
    ax.set_ylabel("nats per sequence")
    ax.set_title("KL to the reference (SFT)")
    _rounds_axis(ax, rounds)
    return fig


def plot_feedback(feedback: dict):
    """Prompts of each round kept as feedback and dropped, by reason (stacked)."""
    fig, (ax,) = _figure()
    rounds = sorted(feedback)
    reasons = sorted({k for s in feedback.values() for k in s if k.startswith("prompts_dropped_")})
    bottom = np.zeros(len(rounds))
    kept = np.array([feedback[n].get("prompts_kept", 0) for n in rounds], dtype=float)
    ax.bar(rounds, kept, bottom=bottom, label="kept", color="tab:green", width=0.6)
    bottom += kept
    for reason in reasons:
        counts = np.array([feedback[n].get(reason, 0) for n in rounds], dtype=float)
        ax.bar(rounds, counts, bottom=bottom, label=f"dropped: {reason.removeprefix('prompts_dropped_')}",
               width=0.6)
        bottom += counts
    for n, total in zip(rounds, bottom, strict=True):
        items = feedback[n].get("pairs", feedback[n].get("items"))
        if items is not None:
            ax.annotate(f"{items} items", (n, total), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("training prompts")
    ax.set_ylim(0, 1.12 * max(bottom.max(), 1.0))  # room for the item counts on top
    ax.set_title("Feedback: prompts kept and dropped")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _rounds_axis(ax, rounds)
    return fig


def training_curves(steps: list[dict]) -> list[str]:
    """The per-step metrics to plot: numeric fields that are not bookkeeping, in a fixed order."""
    present = {k for s in steps for k, v in s.items()
               if k not in _STEP_BOOKKEEPING and isinstance(v, int | float) and not isinstance(v, bool)}
    return [k for k in _CURVE_ORDER if k in present] + sorted(present - set(_CURVE_ORDER))


def plot_training(steps: list[dict], metrics: list[str]):
    """One panel per metric over the global optimizer step, coloured by round."""
    ncols = 3
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = _pyplot().subplots(nrows, ncols, figsize=(12, 2.8 * nrows), squeeze=False)
    rounds = sorted({s["round"] for s in steps})
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for n in rounds:
            points = [(s["step"], s[metric]) for s in steps if s["round"] == n and s.get(metric) is not None]
            if points:
                x, y = zip(*points, strict=True)
                ax.plot(x, y, linewidth=1.2, label=f"round {n}")
        ax.set_title(metric)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_reward_histograms(eval_tables: dict):
    """Histogram of held-out rewards, one panel per round, on shared bins."""
    rounds = sorted(n for n, t in eval_tables.items() if "reward" in t)
    values = {n: eval_tables[n]["reward"].to_numpy(dtype=float) for n in rounds}
    finite = np.concatenate([v[~np.isnan(v)] for v in values.values()]) if values else np.array([])
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 21)
    ncols = max(len(rounds), 1)
    fig, axes = _pyplot().subplots(1, ncols, figsize=(max(2.4 * ncols, 4.8), 2.8), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], rounds, strict=False):
        v = values[n]
        ax.hist(v[~np.isnan(v)], bins=bins, color="tab:blue")
        ax.set_title(f"round {n}" + (f" ({int(np.isnan(v).sum())} failed)" if np.isnan(v).any() else ""),
                     fontsize=9)
        ax.set_xlabel("reward")
    axes[0][0].set_ylabel("prompts")
    fig.tight_layout()
    return fig


def figure_png(fig) -> bytes:
    """The figure as PNG bytes (the figure is closed)."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    _pyplot().close(fig)
    return buffer.getvalue()


# ---------------------------------------------------------------- HTML
def _fmt(value) -> str:
    return format_cell(value, missing="–", whole_from=math.inf)


def _with_interval(value, ci) -> str:
    """``0.605 [0.535, 0.675]``: a metric and its 95% CI in one cell."""
    return f"{_fmt(value)} [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else _fmt(value)


def html_table(header: list[str], rows: list[list], text_columns: frozenset[int] | set[int] = frozenset()) -> str:
    """A table of escaped cells; ``text_columns`` hold free text (left-aligned, wrapped, monospace)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    def cell(i: int, value) -> str:
        opening = '<td class="text">' if i in text_columns else "<td>"
        return opening + html.escape(value if isinstance(value, str) else _fmt(value)) + "</td>"

    body = "".join("<tr>" + "".join(cell(i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def evaluation_rows(evaluations: list[dict]) -> tuple[list[str], list[list]]:
    """The per-round evaluation table: every metric with its 95% CI."""
    header = ["round", "prompts", "mean reward [95% CI]", "length-controlled [95% CI]", "win vs r0 [95% CI]",
              "win vs previous [95% CI]", "mean tokens [95% CI]", "p50 / p95 tokens", "hit max length",
              "KL to ref [95% CI]", "failed scores"]
    rows = []
    for e in evaluations:
        quantiles = e.get("output_tokens_quantiles") or {}
        rows.append([
            e["round"], e["num_prompts"], _with_interval(e["mean_reward"], e.get("reward_ci95")),
            _with_interval(e.get("length_controlled_reward"), e.get("length_controlled_reward_ci95")),
            _with_interval(e["win_rate_vs_r0"], e.get("win_rate_ci95")),
            _with_interval(e.get("win_rate_vs_previous"), e.get("win_rate_vs_previous_ci95")),
            _with_interval(e["mean_output_tokens"], e.get("mean_output_tokens_ci95")),
            f"{_fmt(quantiles.get('p50'))} / {_fmt(quantiles.get('p95'))}", e.get("max_length_fraction"),
            _with_interval(e["kl_to_reference"], e.get("kl_to_reference_ci95")), e["failed_scores"]])
    return header, rows


def tie_margin_text(evaluations: list[dict]) -> str:
    """Which tie margin the win rates used, as eval_r{n}.json recorded it."""
    recorded = next((e for e in evaluations if "tie_margin" in e), None)
    if recorded is None:
        return "win-rate tie margin: not recorded (strict comparison)"
    return (f"win-rate tie margin: {recorded['tie_margin']:g} x round-0 reward std "
            f"= {recorded['tie_margin_reward']:.4g} reward")


def _clip(text: str) -> str:
    return text if len(text) <= _EXAMPLE_CHARS else text[:_EXAMPLE_CHARS] + " …"


def changed_examples(first, last, n: int = 5) -> tuple[list, list]:
    """Held-out prompts where the last round's reward beats round 0's, and where it loses: at most ``n`` of
    each, the largest changes first (ties broken by prompt_id). Rows: prompt, round-0 output and reward,
    last-round output and reward."""
    from iteralign.prompts import messages_from_cell

    merged = first.merge(last, on="prompt_id", suffixes=("_first", "_last"))
    merged["change"] = merged["reward_last"] - merged["reward_first"]
    merged = merged.dropna(subset=["change"]).sort_values(["prompt_id"])

    def rows(frame) -> list[list]:
        return [[_clip(messages_from_cell(r.prompt_first)[-1]["content"]), _clip(str(r.output_first)),
                 r.reward_first, _clip(str(r.output_last)), r.reward_last] for r in frame.itertuples(index=False)]

    wins = merged[merged["change"] > 0].sort_values("change", ascending=False, kind="stable").head(n)
    losses = merged[merged["change"] < 0].sort_values("change", kind="stable").head(n)
    return rows(wins), rows(losses)


def examples_html(eval_tables: dict) -> str:
    """Round 0 against the last round on the same held-out prompts, as text: what changed."""
    rounds = sorted(n for n, t in eval_tables.items() if {"prompt", "output", "reward"} <= set(t.columns))
    if len(rounds) < 2:
        return "<p>Fewer than two evaluated rounds: nothing to compare yet.</p>"
    first, last = rounds[0], rounds[-1]
    wins, losses = changed_examples(eval_tables[first], eval_tables[last])
    header = ["prompt (last turn)", f"round {first} output", "reward", f"round {last} output", "reward"]
    parts = []
    for title, rows in ((f"Round {last} beats round {first}", wins), (f"Round {last} loses to round {first}", losses)):
        parts.append(f"<h3>{html.escape(title)} ({len(rows)} shown)</h3>")
        parts.append(html_table(header, rows, text_columns={0, 1, 3}) if rows else "<p>None.</p>")
    return "\n".join(parts)


_STEP_ORDER = ["plan", "sft", "link_sft", "sample", "score", "feedback", "reference", "train", "evaluate"]


def _pipeline_order(path: Path, meta: dict) -> tuple:
    """Sort key: by round (the plan and SFT first), then by the step's place in a round."""
    from_name = layout.round_of(path)
    round_n = meta.get("round", -1 if from_name is None else from_name)
    step = meta.get("step")
    return (round_n, _STEP_ORDER.index(step) if step in _STEP_ORDER else len(_STEP_ORDER), str(path))


def provenance_rows(results: Path, hashes: dict[Path, str] | None = None) -> list[list]:
    """One row per artefact in pipeline order: its step, round, config hash, commit, finish time, hash
    (from ``hashes``, what verify_provenance already computed, where it has it)."""
    from iteralign.artifacts import artifact_sha256, read_provenance
    from iteralign.audit import provenance_artefacts

    hashes = {} if hashes is None else hashes

    records = [(path, read_provenance(path) or {}) for path in provenance_artefacts(results)]
    rows = []
    for path, meta in sorted(records, key=lambda record: _pipeline_order(*record)):
        rows.append([str(path.relative_to(results)), meta.get("step", "no provenance"), meta.get("round", "–"),
                     meta.get("config_hash", "–"), (meta.get("git_commit") or "–")[:10], meta.get("finished", "–"),
                     meta.get("seconds"), (hashes.get(path.resolve()) or artifact_sha256(path))[:12]])
    return rows


def provenance_html(results: Path, config_hash: str) -> str:
    """The verification verdict, which config hashes made the artefacts, and the per-artefact table."""
    from iteralign.audit import verify_provenance

    hashes: dict[Path, str] = {}  # each artefact is hashed once, for the check and for the table
    checked, problems = verify_provenance(results, hashes=hashes)
    if problems:
        parts = [f'<div class="problem"><b>{len(problems)} provenance problem(s)</b> in {checked} artefacts:<ul>'
                 + "".join(f"<li>{html.escape(p.kind)}: {html.escape(p.message)}</li>" for p in problems)
                 + "</ul></div>"]
    else:
        parts = [f'<div class="ok">Provenance verified: every recorded input of the {checked} artefacts with '
                 "provenance matches the file on disk.</div>"]
    rows = provenance_rows(results, hashes)
    hashes = sorted({row[3] for row in rows if row[3] != "–"})
    others = [h for h in hashes if h != config_hash]
    if others:
        parts.append(f'<p class="problem">Artefacts were made by config hash(es) {html.escape(", ".join(others))}, '
                     f"not only by this config ({html.escape(config_hash)}): a config changed during the run, "
                     "or the report was built with another config. The table says which artefact came from which."
                     "</p>")
    header = ["artefact", "step", "round", "config hash", "git commit", "finished", "seconds", "sha256"]
    return "\n".join([*parts, html_table(header, rows)])


_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1500px; }
h1 { margin-bottom: 4px; } h2 { margin-top: 32px; border-bottom: 1px solid #ddd; }
.meta { color: #555; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(640px, 1fr)); gap: 16px; }
figure { margin: 0; border: 1px solid #e3e3e3; border-radius: 6px; padding: 8px; background: #fff; }
figure.wide { grid-column: 1 / -1; }
figure img { max-width: 100%; display: block; }
figcaption { font-size: 13px; color: #444; margin-top: 6px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; white-space: normal; } td:first-child, th:first-child { text-align: left; }
td.text { text-align: left; white-space: pre-wrap; max-width: 380px; font-family: monospace; font-size: 12px; }
.ok { background: #e8f5e9; border: 1px solid #a5d6a7; padding: 8px; border-radius: 6px; }
.problem { background: #fdecea; border: 1px solid #f5a8a0; padding: 8px; border-radius: 6px; }
pre { background: #f7f7f7; padding: 10px; overflow-x: auto; font-size: 12px; }
#render-check { display: none; }
"""

# Marks every plot that the browser could not decode, so a broken report says so on its face.
_SCRIPT = """
window.addEventListener("load", function () {
  var plots = document.querySelectorAll("img.plot"), broken = 0;
  plots.forEach(function (img) {
    var ok = img.complete && img.naturalWidth > 0 && img.naturalHeight > 0 && img.width > 0;
    var r = img.getBoundingClientRect();
    img.dataset.rendered = ok ? "yes" : "no";
    // where the plot was drawn (page pixels: left, top, width, height), for checks of a screenshot
    img.dataset.box = [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height].map(Math.round).join(",");
    if (!ok) { broken += 1; }
  });
  var box = document.getElementById("render-check");
  box.dataset.plots = plots.length; box.dataset.broken = broken;
  box.dataset.pageHeight = document.documentElement.scrollHeight;
  if (broken) { box.style.display = "block"; box.textContent = broken + " plot(s) failed to render."; }
});
"""


def _figure_html(title: str, png: bytes, caption: str, wide: bool = False) -> str:
    data = base64.b64encode(png).decode()
    return (f'<figure class="{"wide" if wide else ""}"><img class="plot" alt="{html.escape(title)}" '
            f'src="data:image/png;base64,{data}"><figcaption><b>{html.escape(title)}.</b> '
            f"{html.escape(caption)}</figcaption></figure>")


def plots(data: ExperimentData) -> list[tuple[str, object, str, bool]]:
    """(title, figure, caption, wide) for every plot the data supports."""
    evaluations = data.evaluations
    out = []
    if evaluations:
        out.append(("Held-out reward", plot_reward(evaluations),
                    "Mean reward of the training scorer on the same held-out prompts every round, with a "
                    "bootstrap 95% CI over prompts; dashed: the reward a linear fit of reward on length predicts "
                    "at round 0's mean length. A gap between the two is reward bought with length.", False))
        if any(e.get("eval_scorer") for e in evaluations):
            name = next(e["eval_scorer"]["name"] for e in evaluations if e.get("eval_scorer"))
            out.append(("Evaluation scorer", plot_reward(evaluations, "eval_scorer", f"Evaluation scorer: {name}"),
                        "The same generations scored by evaluation.scorer, which training never saw. Training "
                        "reward rising while this one stays flat is reward hacking.", False))
        out.append(("Win rates", plot_win_rates(evaluations),
                    "Per prompt 1 if this round's reward is higher by more than the tie margin (see the header), "
                    "0 if lower by more than it, 0.5 otherwise, against round 0 and against the round before; "
                    "mean over prompts with a bootstrap 95% CI.", False))
        out.append(("KL to the reference", plot_kl(evaluations),
                    "Mean over held-out prompts of log pi_n(y) - log pi_ref(y) on the round's own generation y "
                    "(docs/evaluation.md: with greedy decoding this is the log-ratio on the policy's answer).",
                    False))
    if data.eval_tables or evaluations:
        out.append(("Output length", plot_length(data.eval_tables, evaluations),
                    "Left: tokens per held-out generation (box: quartiles, whiskers: 5th-95th percentile, "
                    "triangle: mean). Right: fraction of generations cut at evaluation.max_new_tokens.", True))
    if data.feedback:
        out.append(("Feedback kept and dropped", plot_feedback(data.feedback),
                    "Training prompts of each round that produced feedback, and those dropped by reason "
                    "(from feedback_r{n}.meta.json); the label on top is the number of feedback items.", False))
    if any("reward" in t for t in data.eval_tables.values()):
        out.append(("Reward histograms", plot_reward_histograms(data.eval_tables),
                    "Held-out rewards of each round on shared bins.", True))
    metrics = training_curves(data.steps)
    if metrics:
        out.append(("Training curves", plot_training(data.steps, metrics),
                    "Per optimizer step, from train_r{n}.jsonl: loss, implicit-reward margin and accuracy "
                    "(DPO) or KL and desirable/undesirable rewards (KTO), gradient norm and learning rate.", True))
    return out


def build_report(results: str | Path, config: dict, benchmarks: str | Path | None = None) -> str:
    """The HTML text of the report of ``results`` (results/<exp>)."""
    import yaml

    from iteralign.audit import AUDIT_COLUMNS, audit_rows
    from iteralign.config import config_hash

    results = Path(results)
    this_hash = config_hash(config)
    data = load_experiment(results)
    figures = "".join(_figure_html(title, figure_png(fig), caption, wide)
                      for title, fig, caption, wide in plots(data))
    eval_header, eval_rows = evaluation_rows(data.evaluations)
    rows = audit_rows(results, benchmarks)
    audit_columns = [c for c in AUDIT_COLUMNS if any(c in r for r in rows)]
    decoding = next((e["decoding"] for e in data.evaluations if e.get("decoding")), None)
    generated = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    meta = (f"{len(data.evaluations)} evaluated rounds · held-out prompts: "
            f"{data.evaluations[0]['num_prompts'] if data.evaluations else '–'} · decoding: "
            f"{html.escape(json.dumps(decoding)) if decoding else '–'} · bootstrap resamples: "
            f"{config['evaluation']['bootstrap_samples']} · {tie_margin_text(data.evaluations)} · generated {generated}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>iteralign report: {html.escape(data.name)}</title>
<style>{_CSS}</style></head>
<body>
<h1>iteralign report: {html.escape(data.name)}</h1>
<p class="meta">{meta}</p>
<div id="render-check" class="problem"></div>
<h2>Held-out evaluation</h2>
<p>Every round is evaluated on the same held-out prompts with the same decoding; intervals are percentile
bootstrap 95% CIs over prompts; – marks a value that is undefined (e.g. the length-controlled reward of a
round whose outputs all have one length, other than round 0's mean). Definitions: docs/evaluation.md.</p>
{html_table(eval_header, eval_rows)}
<div class="grid">{figures}</div>
<h2>What changed: held-out examples</h2>
<p>The same held-out prompts answered by the first and the last evaluated round, where their rewards differ
(largest changes first). <code>iteralign show results/&lt;exp&gt;/eval_r{{n}}.parquet</code> prints any round.</p>
{examples_html(data.eval_tables)}
<h2>Audit</h2>
<p>One row per round, read from the artefacts (<code>iteralign audit</code>).</p>
{html_table(audit_columns, [[r.get(c) for c in audit_columns] for r in rows])}
<h2>Provenance</h2>
{provenance_html(results, this_hash)}
<h2>Config</h2>
<p>The validated config with every default filled in (config hash {html.escape(this_hash)}).</p>
<pre>{html.escape(yaml.safe_dump(config, sort_keys=False))}</pre>
<script>{_SCRIPT}</script>
</body></html>
"""

