"""The vLLM adapter's pure parts: engine and sampling arguments, vLLM's outputs as rows, start-up failures.

Outputs are built as vLLM documents ``RequestOutput`` / ``CompletionOutput``: ``token_ids``
end with the EOS token when a completion stopped on it, ``text`` is detokenized without
special tokens and cut before a stop string (``stop_reason`` is then that string, else
None for EOS). The real engine runs in tests/test_vllm_engine.py.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest
import yaml
from helpers import dry_run

from iteralign.sample import Completion, select_backend
from iteralign.sample import vllm as vllm_backend

MESSAGES = [[{"role": "user", "content": p}] for p in ("1+2", "10+20", "99+99", "5+55", "7+8", "12+34", "3+3", "40+4")]


@dataclass
class CompletionOutput:  # the fields of vllm.outputs.CompletionOutput that the backend reads
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:  # vllm.outputs.RequestOutput
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: None
    outputs: list[CompletionOutput]
    finished: bool = True


@dataclass
class SamplingParams:  # the fields of vllm.SamplingParams that the backend sets
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = 16
    stop: str | list[str] | None = None
    seed: int | None = None


def config(**sampling) -> dict:
    from iteralign.config import validate

    return validate({"sampling": {"backend": "vllm", "tensor_parallel_size": 2, **sampling}})


DECODING = {"num_samples": 4, "temperature": 0.8, "top_p": 0.9, "max_new_tokens": 7, "stop": ["\n"]}


def test_engine_on_gpus_gets_the_checkpoint_tensor_parallel_size_seed_and_gpu_defaults():
    args = vllm_backend.engine_arguments("results/x/ckpt_r2/FINAL", config(enable_prefix_caching=False), seed=5,
                                         on_gpu=True)
    assert args == {"model": "results/x/ckpt_r2/FINAL", "tokenizer": "results/x/ckpt_r2/FINAL",
                    "tensor_parallel_size": 2, "seed": 5, "enable_prefix_caching": False,
                    "gpu_memory_utilization": 0.85, "dtype": "auto", "enforce_eager": False,
                    "trust_remote_code": False}


def test_engine_without_a_gpu_runs_in_process_in_float32_eager_with_a_tenth_of_host_memory():
    args = vllm_backend.engine_arguments("ckpt", config(), seed=0, on_gpu=False)
    assert (args["dtype"], args["enforce_eager"], args["gpu_memory_utilization"]) == ("float32", True, 0.1)
    assert args["distributed_executor_backend"] == "uni"
    assert "max_model_len" not in args and "kv_cache_memory_bytes" not in args


def test_engine_settings_from_the_config_win_over_the_defaults():
    chosen = config(dtype="bfloat16", enforce_eager=False, gpu_memory_utilization=0.3, max_model_len=256,
                    kv_cache_memory_gb=0.5)
    args = vllm_backend.engine_arguments("ckpt", chosen, seed=0, on_gpu=False)
    assert (args["dtype"], args["enforce_eager"], args["gpu_memory_utilization"]) == ("bfloat16", False, 0.3)
    assert args["max_model_len"] == 256 and args["kv_cache_memory_bytes"] == 2**29


@pytest.mark.parametrize(("error", "key"), [
    (RuntimeError("Unsupported CPU attention configuration: head_dim=16 isa=2"), "sampling.backend: hf"),
    (ValueError("To serve at least one request with the models's max seq len (2048), (1.0 GiB KV cache is "
                "needed, which is larger than the available KV cache memory (0.1 GiB)."),
     "sampling.gpu_memory_utilization"),
    (ValueError("User-specified max_model_len (9000) is greater than the derived max_model_len (1024)"),
     "sampling.max_model_len"),
    (ValueError("Model architectures ['FooForCausalLM'] are not supported for now."), "sampling.backend: hf"),
    (OSError("Can't load tokenizer for 'ckpt'"), "tokenizer"),
])
def test_a_failed_engine_start_is_one_line_naming_the_key_to_change(error, key):
    try:
        raise RuntimeError("Engine core initialization failed. See root cause above.") from error
    except RuntimeError as wrapped:
        message = vllm_backend.start_failure_message("results/x/ckpt_r1/FINAL", wrapped)
    assert "\n" not in message and message.startswith("vLLM failed on results/x/ckpt_r1/FINAL: ")
    assert key in message and str(error).split()[0] in message


def test_sampling_params_ask_num_samples_completions_with_a_seed_per_prompt():
    first = vllm_backend.sampling_arguments(DECODING, seed=3, prompt_index=0)
    second = vllm_backend.sampling_arguments(DECODING, seed=3, prompt_index=1)
    assert first == {"n": 4, "temperature": 0.8, "top_p": 0.9, "max_tokens": 7, "stop": ["\n"],
                     "seed": vllm_backend.request_seed(3, 0)}
    assert first["seed"] != second["seed"]
    assert set(first) <= set(SamplingParams.__dataclass_fields__)


def test_greedy_decoding_has_no_top_p_cut_and_no_stop_list_when_none_is_given():
    greedy = vllm_backend.sampling_arguments({**DECODING, "num_samples": 1, "temperature": 0.0, "stop": []}, 0, 0)
    assert greedy["top_p"] == 1.0 and greedy["stop"] is None


def test_greedy_decoding_with_several_samples_is_refused():
    with pytest.raises(ValueError, match="identical samples"):
        vllm_backend.sampling_arguments({**DECODING, "temperature": 0.0}, 0, 0)


def count_characters(text: str) -> int:
    return len(text)


def test_eos_stop_counts_the_eos_token_like_the_hf_backend():
    output = CompletionOutput(0, "12", [5, 6, 2], finish_reason="stop", stop_reason=None)  # 2 = EOS
    assert vllm_backend.to_completion(output, count_characters) == Completion("12", 3, "stop")


def test_stop_string_counts_the_tokens_of_the_kept_text():
    output = CompletionOutput(0, "12", [5, 6, 9, 9], finish_reason="stop", stop_reason="\n")
    assert vllm_backend.to_completion(output, count_characters) == Completion("12", 2, "stop")


def test_length_counts_every_generated_token():
    output = CompletionOutput(0, "1234", [5, 6, 7, 8], finish_reason="length")
    assert vllm_backend.to_completion(output, count_characters) == Completion("1234", 4, "length")


def test_an_aborted_completion_is_an_error():
    with pytest.raises(RuntimeError, match="finish_reason 'abort'"):
        vllm_backend.to_completion(CompletionOutput(0, "", [], finish_reason="abort"), count_characters)


def test_completions_follow_each_outputs_index():
    request = RequestOutput("0", None, [1], None, [CompletionOutput(1, "b", [3], finish_reason="length"),
                                                   CompletionOutput(0, "a", [4], finish_reason="length")])
    assert [c.text for c in vllm_backend.to_completions([request], 1, count_characters)[0]] == ["a", "b"]


def test_a_missing_request_output_is_an_error():
    with pytest.raises(RuntimeError, match="1 request outputs for 2 prompts"):
        vllm_backend.to_completions([RequestOutput("0", None, [1], None, [])], 2, count_characters)


def test_asking_for_vllm_where_it_is_not_installed_names_its_env(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # find_spec then reports it missing
    with pytest.raises(ValueError, match="make vllm"):
        select_backend("vllm")


def dry_run_commands(tmp_path, sampling: dict) -> subprocess.CompletedProcess:
    """``snakemake -n -p`` of a one-round experiment: the shell commands it would run."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"experiment": "x", "rounds": 1, "sampling": sampling}))
    return dry_run(tmp_path, tmp_path / "config.yaml", "-p")


def shell_commands(stdout: str) -> list[str]:
    return [line.removeprefix("Shell command: ") for line in stdout.splitlines() if " --config " in line]


def test_with_backend_vllm_sample_and_evaluate_run_with_the_vllm_environments_python(tmp_path):
    python = tmp_path / "vllm-env" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.touch()
    result = dry_run_commands(tmp_path, {"backend": "vllm", "vllm_python": str(python)})
    assert result.returncode == 0, result.stderr[-2000:]
    commands = shell_commands(result.stdout)
    steps = {line.split(" --config ")[0].split()[-1]: line for line in commands}
    assert {"sample", "evaluate", "score", "train"} <= set(steps), steps
    for step in ("sample", "evaluate"):
        assert steps[step].startswith(f"{python} -m iteralign.cli {step} ")
    for step in ("score", "train", "feedback"):
        assert steps[step].startswith(f"iteralign {step} ")


def test_with_backend_hf_every_step_runs_iteralign(tmp_path):
    result = dry_run_commands(tmp_path, {"backend": "hf"})
    assert result.returncode == 0, result.stderr[-2000:]
    samples = [line for line in shell_commands(result.stdout) if " sample --config " in line]
    assert samples and all(line.startswith("iteralign sample ") for line in samples)


def test_backend_vllm_without_its_environment_is_refused_at_parse_time(tmp_path):
    result = dry_run_commands(tmp_path, {"backend": "vllm", "vllm_python": str(tmp_path / "missing" / "python")})
    assert result.returncode != 0
    said = result.stdout + result.stderr
    assert f"the vLLM environment's Python {tmp_path / 'missing' / 'python'} does not exist" in said
    assert "make vllm" in said and "sampling.vllm_python" in said
    assert not (tmp_path / "results" / "x" / "prompts.parquet").exists()
