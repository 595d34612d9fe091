"""README.md's SLURM commands run as written, from a fresh shell at the repository root: the
dry runs of the Llama-3 example with `--profile slurm` and `--profile profiles/slurm`, after
the README's own steps have put the inputs in place (here: local stand-ins for the downloads)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from helpers import REPO, fresh_shell_env, stub_workdir

pytestmark = pytest.mark.workflow
LEFT_OUT = {".git", "results", "logs", "benchmarks", ".snakemake", "data", "models"}


def readme_block(heading: str) -> list[str]:
    """The command lines of the first bash block under a README heading."""
    section = (REPO / "README.md").read_text().split(f"## {heading}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"README.md: no bash block under {heading!r}"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """The repository (every top-level entry linked) with the downloads' paths filled by stand-ins."""
    root = tmp_path_factory.mktemp("checkout")
    for entry in REPO.iterdir():
        if entry.name not in LEFT_OUT:
            (root / entry.name).symlink_to(entry)
    return stub_workdir(root)


def run_in_fresh_shell(checkout: Path, lines: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-e", "-c", "\n".join(lines)], cwd=checkout, capture_output=True, text=True,
                          env=fresh_shell_env())


def test_the_readme_downloads_the_paths_the_example_configs_name():
    lines = readme_block("On a SLURM cluster")
    downloads = " ".join(line for line in lines if line.startswith(("hf download", "python -c")))
    for path in ("models/llama3-8b-sft", "models/ArmoRM-Llama3-8B-v0.1", "data/ultrafeedback-binarized"):
        assert path in downloads and path in (REPO / "configs/llama3-8b-dpo-online.yaml").read_text()


@pytest.mark.parametrize("profile", ["slurm", "profiles/slurm"])
def test_the_readme_cluster_dry_run_works_as_written(checkout, profile):
    lines = readme_block("On a SLURM cluster")
    activate = [line for line in lines if line.startswith("source ")]
    dry_runs = [line.split("#")[0] for line in lines if line.startswith("snakemake ") and " -n" in line]
    assert activate and dry_runs == ["snakemake --profile slurm --configfile configs/llama3-8b-dpo-online.yaml -n   "]
    command = dry_runs[0].replace("--profile slurm ", f"--profile {profile} ")
    result = run_in_fresh_shell(checkout, [*activate, command])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rule train:" in result.stdout + result.stderr
    planned = re.findall(r"^rule (\w+):", result.stdout + result.stderr, re.M)
    assert planned.count("train") == 4 and planned.count("sample") == 4
    assert "tasks_per_gpu=0" in result.stdout + result.stderr  # profiles/slurm's default-resources applied
