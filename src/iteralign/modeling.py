"""Loading policies and tokenizers, and rendering prompts through the chat template.

Every step that turns messages into tokens (sample, reference, train, evaluate)
goes through :func:`render_prompt`, so the text a model is trained on is the
text it was sampled with. torch and transformers are imported inside functions:
steps that do not need them (plan, score with Python, feedback, audit) stay fast.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from iteralign.errors import UserError

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


# One of these makes a folder's tokenizer loadable without a download.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken")


def check_tokenizer_files(path: Path, key: str | None = None) -> None:
    """Raise UserError naming the folder (and the config ``key`` that points at it) when it holds no tokenizer file."""
    if path.is_dir() and not any((path / name).exists() for name in TOKENIZER_FILES):
        raise UserError(
            f"{key + ' ' if key else ''}{path}: no tokenizer files; expected one of "
            f"{', '.join(TOKENIZER_FILES)} beside the weights",
            hint="save the tokenizer into the folder (tokenizer.save_pretrained(folder))",
        )


def load_tokenizer(path: str | Path, trust_remote_code: bool = False, padding_side: str = "right"):
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    check_config_json(path)
    if not trust_remote_code:  # remote code may build its tokenizer from files of its own
        check_tokenizer_files(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: the tokenizer does not load ({type(exc).__name__}: {_first_line(exc)})",
                        hint="check the folder's tokenizer files, or re-create them") from None
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
    model = load_pretrained(AutoModelForCausalLM, path, trust_remote_code=trust_remote_code,
                            dtype=dtype or torch.float32)
    if device is not None:
        model.to(device)
    return model


def check_config_json(path: Path) -> None:
    """A checkpoint's config.json, when it has one, is valid JSON (else UserError naming it)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        return
    try:
        json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{config_file}: not valid JSON ({exc})", hint=_RECREATE.format(path=path)) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def load_pretrained(auto_class, path: Path, **kwargs):
    """``auto_class.from_pretrained(path)``; damaged weights or config name the file that failed."""
    from safetensors import SafetensorError

    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    check_config_json(path)
    if not weights:
        raise UserError(f"{path}: no weights (model.safetensors or pytorch_model.bin); expected a saved model",
                        hint=_RECREATE.format(path=path))
    try:
        return auto_class.from_pretrained(str(path), **kwargs)
    except (SafetensorError, OSError, EOFError) as exc:
        named = ", ".join(str(w) for w in weights)
        raise UserError(f"{named}: damaged weights ({type(exc).__name__}: {_first_line(exc)})",
                        hint=_RECREATE.format(path=path)) from None


_RECREATE = "re-create {path} by re-running the step that wrote it (snakemake --forcerun), or restore it from a copy"


def default_device(use_gpu: bool = True):
    """The GPU when ``use_gpu`` and CUDA is present, else the CPU (a torch.device)."""
    import torch

    return torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")


def set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
