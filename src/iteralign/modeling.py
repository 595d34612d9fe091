"""Loading policies and tokenizers, and rendering prompts through the chat template.

Every step that turns messages into tokens (sample, reference, train, evaluate)
goes through :func:`render_prompt`, so the text a model is trained on is the
text it was sampled with. torch and transformers are imported inside functions:
steps that do not need them (plan, score with Python, feedback, audit) stay fast.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

# Used when a tokenizer ships no chat template. Saved into every checkpoint we
# write, so vLLM and later rounds render prompts the same way.
DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        log.warning("tokenizer has no chat template; using iteralign's default template")
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt text the model sees: chat template with the generation prompt."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False, padding_side: str = "right"):
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    ensure_chat_template(tokenizer)
    if tokenizer.pad_token_id is None:
        # (a reward-model head that finds the last token by the pad id then reads the last non-EOS token)
        log.warning("tokenizer %s has no pad token: padding with EOS %r", path, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(path: str | Path, trust_remote_code: bool = False, dtype=None, device=None):
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(
        str(path), trust_remote_code=trust_remote_code, dtype=dtype or torch.float32
    )
    if device is not None:
        model.to(device)
    return model


def default_device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
