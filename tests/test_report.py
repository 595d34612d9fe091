"""The HTML report: built from a crafted experiment, checked as text and as Chromium renders it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from crafted import write_crafted_experiment
from helpers import micro_config

from iteralign.artifacts import write_json
from iteralign.config import validate
from iteralign.report import (
    ExperimentData,
    build_report,
    changed_examples,
    load_experiment,
    plots,
    training_curves,
)

PLOT_TITLES = ["Held-out reward", "Win rates", "KL to the reference", "Output length", "Feedback kept and dropped",
               "Reward histograms", "Training curves"]


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    """A crafted experiment and its report; the steps 'ran' in the module's folder."""
    workdir = tmp_path_factory.mktemp("report")
    previous = Path.cwd()
    os.chdir(workdir)
    try:
        results = write_crafted_experiment(workdir)
        html = build_report(results, validate(micro_config()))
    finally:
        os.chdir(previous)
    (results / "report.html").write_text(html)
    return results


def test_report_is_one_file_with_every_image_embedded(crafted):
    html = (crafted / "report.html").read_text()
    sources = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<link" not in html and "@import" not in html


def test_report_has_every_plot_the_issue_asks_for(crafted):
    html = (crafted / "report.html").read_text()
    for title in PLOT_TITLES:
        assert f'alt="{title}"' in html, title
    assert html.count('<img class="plot"') == len(PLOT_TITLES)


def test_report_has_the_evaluation_and_audit_tables_provenance_and_config(crafted):
    html = (crafted / "report.html").read_text()
    assert "<th>win vs previous [95% CI]</th>" in html and "<th>length-controlled [95% CI]</th>" in html
    assert "<th>win_rate_vs_previous</th>" in html  # the audit table
    assert "Provenance verified" in html and "ckpt_r2/FINAL" in html
    assert "per_round: 12" in html  # the config


def test_report_shows_a_provenance_problem_naming_both_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = write_crafted_experiment(tmp_path)
    write_json([], results / "feedback_r2.json", {"step": "feedback", "inputs": {}})
    html = build_report(results, validate(micro_config()))
    assert "1 provenance problem(s)" in html
    assert re.search(r"<li>changed: \S*ckpt_r2/FINAL was made from results/crafted/feedback_r2.json", html)


def test_the_evaluation_scorer_gets_its_own_plot(crafted):
    data = load_experiment(crafted)
    for evaluation in data.evaluations:
        evaluation["eval_scorer"] = {"name": "python:judge", "mean_reward": 0.5, "reward_ci95": [0.4, 0.6]}
    titles = [title for title, *_ in plots(data)]
    assert "Evaluation scorer" in titles


def test_examples_show_where_the_last_round_wins_and_loses_largest_change_first():
    def frame(rewards):
        return pd.DataFrame({"prompt_id": ["a", "b", "c", "d"], "prompt": [[{"role": "user", "content": p}]
                                                                           for p in "abcd"],
                             "output": [f"{p}{r}" for p, r in zip("abcd", rewards, strict=True)], "reward": rewards})

    wins, losses = changed_examples(frame([0.0, 1.0, 0.5, 0.0]), frame([1.0, 0.0, 0.5, 0.4]), n=5)
    assert [row[0] for row in wins] == ["a", "d"]  # a gained 1.0, d 0.4; the tie c is not shown
    assert losses == [["b", "b1.0", 1.0, "b0.0", 0.0]]


def test_report_shows_what_changed_on_held_out_prompts(crafted):
    html = (crafted / "report.html").read_text()
    assert "Round 2 beats round 0 (2 shown)" in html and "Round 2 loses to round 0 (0 shown)" in html


def test_training_curves_are_every_numeric_field_but_bookkeeping():
    steps = [{"round": 1, "step": 1, "round_step": 1, "epoch": 0, "examples": 8, "examples_seen": 8, "loss": 0.7,
              "accuracy": 0.5, "new_metric": 2.0, "note": "text", "flag": True}]
    assert training_curves(steps) == ["loss", "accuracy", "new_metric"]


def test_a_run_with_nothing_evaluated_yet_has_no_plots():
    assert plots(ExperimentData("empty")) == []


# ---------------------------------------------------------------- in a browser
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--force-device-scale-factor=1"]


def chromium() -> str:
    """Debian's chromium, installed with apt when missing (CI runs as root); skip where that cannot be."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get): "
                    "apt-get install chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "chromium"]
    result = subprocess.run(install, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    if result.returncode != 0:  # a fresh machine may have no package lists yet
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, stdin=subprocess.DEVNULL)
        result = subprocess.run(install, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    found = shutil.which("chromium")
    if result.returncode != 0 or not found:
        pytest.skip(f"chromium could not be installed with apt-get: {result.stderr.strip()[-500:]}")
    return found


def run_chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    # A fresh profile per run; the timeout only stops a hung browser, it asserts nothing.
    result = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                            text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.browser
def test_report_renders_every_plot_in_chromium(crafted, tmp_path):
    from PIL import Image

    browser = chromium()
    page = (crafted / "report.html").resolve().as_uri()
    dom = run_chromium(browser, tmp_path / "profile-dom", "--window-size=1400,1000", "--dump-dom", page).stdout
    check = re.search(r'id="render-check"[^>]*', dom)
    assert check, "the report's render check did not run"
    assert 'data-broken="0"' in check[0] and f'data-plots="{len(PLOT_TITLES)}"' in check[0]
    height = int(re.search(r'data-page-height="(\d+)"', check[0])[1])
    images = re.findall(r'<img class="plot" alt="([^"]+)"[^>]*data-rendered="(\w+)" data-box="([\d,.-]+)"', dom)
    assert sorted(title for title, *_ in images) == sorted(PLOT_TITLES)

    screenshot = tmp_path / "report.png"
    run_chromium(browser, tmp_path / "profile-shot", f"--window-size=1400,{height}", f"--screenshot={screenshot}",
                 page)
    shot = Image.open(screenshot).convert("RGB")
    for title, rendered, box in images:
        left, top, width, height = (int(v) for v in box.split(","))
        assert rendered == "yes" and width > 100 and height > 100, (title, rendered, box)
        region = shot.crop((left, top, left + width, top + height))
        colours = region.getcolors(maxcolors=1 << 16) or []
        # A drawn plot has axes, text and data in many colours; a blank or broken image has one or two.
        assert len(colours) > 20, f"plot {title!r} looks blank in the screenshot ({len(colours)} colours)"
