"""The vLLM sampling backend, checked without vLLM (it cannot be installed beside the CPU torch).

Requests are checked against the arguments of vLLM 0.33's ``LLM`` and ``SamplingParams``;
outputs are built as vLLM documents ``RequestOutput`` / ``CompletionOutput``: ``token_ids``
end with the EOS token when a completion stopped on it (vLLM's ``check_stop`` appends it
before stopping), ``text`` is detokenized without special tokens and cut before a stop
string (``stop_reason`` is then that string, else None for EOS). A fake ``vllm`` module
generates greedily with transformers under those conventions, so the backend can be run
end to end and compared with the transformers backend.
"""

from __future__ import annotations

import importlib.machinery
import logging
import sys
import types
from dataclasses import dataclass

import pytest

from iteralign.sample import Completion, generate, sample_frame, select_backend
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
class SamplingParams:  # vllm.SamplingParams, with the defaults of the fields the backend sets
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = 16
    stop: str | list[str] | None = None
    seed: int | None = None


class FakeLLM:
    """Greedy decoding with transformers, answering as ``vllm.LLM.generate`` does."""

    instances: list[FakeLLM] = []  # every engine made, for the tests to inspect

    def __init__(self, model: str, **kwargs):
        from iteralign.modeling import load_causal_lm, load_tokenizer

        self.kwargs = {"model": model, **kwargs}
        self.calls: list = []
        self.tokenizer = load_tokenizer(kwargs.get("tokenizer", model))
        self.lm = load_causal_lm(model)
        FakeLLM.instances.append(self)

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append((prompts, sampling_params))
        return [self._request(i, p, s) for i, (p, s) in enumerate(zip(prompts, sampling_params, strict=True))]

    def _request(self, i: int, prompt: dict, params: SamplingParams) -> RequestOutput:
        ids = prompt["prompt_token_ids"]
        outputs = [self._complete(ids, params, index) for index in range(params.n)]
        return RequestOutput(str(i), None, ids, None, outputs)

    def _complete(self, ids: list[int], params: SamplingParams, index: int) -> CompletionOutput:
        import torch

        eos = self.tokenizer.eos_token_id
        tokens: list[int] = []
        with torch.no_grad():
            while len(tokens) < params.max_tokens:
                logits = self.lm(torch.tensor([ids + tokens])).logits[0, -1]
                tokens.append(int(logits.argmax()))
                if tokens[-1] == eos:  # check_stop: EOS is in output_token_ids, then the request stops
                    return CompletionOutput(index, self._text(tokens), tokens, finish_reason="stop")
                text = self._text(tokens)
                for stop in params.stop or []:
                    if stop in text:  # the detokenizer cuts the text before the stop string
                        return CompletionOutput(index, text[: text.index(stop)], tokens, finish_reason="stop",
                                                stop_reason=stop)
        return CompletionOutput(index, self._text(tokens), tokens, finish_reason="length")

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.fixture
def fake_vllm(monkeypatch):
    """A `vllm` module exposing LLM and SamplingParams (importable: find_spec sees its spec)."""
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM = FakeLLM
    module.SamplingParams = SamplingParams
    FakeLLM.instances = []
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


@pytest.fixture(scope="module")
def varied_checkpoint(tmp_path_factory, tiny_tokenizer):
    """A random 1-layer Llama whose greedy outputs differ by prompt: some end on EOS, some hit the limit."""
    import torch

    from iteralign.tiny import build_llama

    model = build_llama(tiny_tokenizer, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, seed=1)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for weight in (p for p in model.parameters() if p.dim() == 2):
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.5)
    path = tmp_path_factory.mktemp("varied") / "ckpt"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def config(**sampling) -> dict:
    from iteralign.config import validate

    return validate({"sampling": {"backend": "vllm", "tensor_parallel_size": 2, **sampling}})


DECODING = {"num_samples": 4, "temperature": 0.8, "top_p": 0.9, "max_new_tokens": 7, "stop": ["\n"]}


def test_engine_gets_the_checkpoint_tensor_parallel_size_seed_and_prefix_caching():
    args = vllm_backend.engine_arguments("results/x/ckpt_r2/FINAL", config(enable_prefix_caching=False), seed=5)
    assert args == {"model": "results/x/ckpt_r2/FINAL", "tokenizer": "results/x/ckpt_r2/FINAL",
                    "tensor_parallel_size": 2, "seed": 5, "enable_prefix_caching": False,
                    "gpu_memory_utilization": 0.85, "trust_remote_code": False}


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


def test_prompts_go_to_vllm_as_the_chat_template_tokens_without_special_tokens(fake_vllm, tiny_checkpoint):
    from iteralign.modeling import load_tokenizer, render_prompt

    decoding = {**DECODING, "num_samples": 2, "temperature": 1.0}
    generate(str(tiny_checkpoint), MESSAGES, decoding, config(), seed=0)
    (llm,) = FakeLLM.instances
    prompts, params = llm.calls[0]
    tokenizer = load_tokenizer(tiny_checkpoint)
    expected = [tokenizer(render_prompt(tokenizer, m), add_special_tokens=False).input_ids for m in MESSAGES]
    assert [p["prompt_token_ids"] for p in prompts] == expected
    assert [p.n for p in params] == [2] * len(MESSAGES)
    assert llm.kwargs["tensor_parallel_size"] == 2 and llm.kwargs["model"] == str(tiny_checkpoint)


@pytest.mark.parametrize("stop", [[], ["+"]])
def test_vllm_backend_writes_the_rows_the_hf_backend_writes(fake_vllm, varied_checkpoint, stop):
    import pandas as pd

    decoding = {"num_samples": 1, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 6, "stop": stop}
    frames = {}
    for backend in ("vllm", "hf"):
        generation = generate(str(varied_checkpoint), MESSAGES, decoding, config(backend=backend), seed=0)
        assert generation.backend == backend
        frames[backend] = sample_frame(1, list("abcdefgh"), MESSAGES, generation.texts, generation.completions,
                                       str(varied_checkpoint), seed=0)
    pd.testing.assert_frame_equal(frames["vllm"], frames["hf"])
    assert set(frames["hf"]["finish_reason"]) == {"stop", "length"}  # both kinds of ending are compared
    if stop:
        assert not frames["hf"]["output"].str.contains("+", regex=False).any()


def test_auto_picks_transformers_when_no_gpu_is_visible_and_says_so(fake_vllm, caplog):
    with caplog.at_level(logging.INFO, logger="iteralign.sample"):
        assert select_backend("auto") == "hf"
    assert "chose hf (vllm importable: True, GPU visible: False)" in caplog.text


def test_asking_for_vllm_where_it_is_not_installed_names_its_env(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # find_spec then reports it missing
    with pytest.raises((RuntimeError, ValueError), match="vllm"):
        select_backend("vllm")
