"""Build a character tokenizer and a small Llama locally (no download of any kind).

Used by the embedded demo and by the tests. The tokenizer is a `tokenizers`
WordLevel model over single characters, wrapped for transformers, with a chat
template in which a user turn ends with "=" and an assistant turn with EOS.
"""

from __future__ import annotations

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"

TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ m['content'] }}={% endif %}"
    "{% endfor %}"
)


def build_char_tokenizer(alphabet: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, BOS: 1, EOS: 2}
    for char in sorted(set(alphabet) | {"="}):
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def llama_config(
    tokenizer,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 64,
    **extra,
):
    """A LlamaConfig sized as asked, with the tokenizer's vocabulary and special tokens."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def build_llama(tokenizer, seed: int = 0, **shape):
    """A randomly initialised LlamaForCausalLM with tied embeddings. ``shape``: llama_config's sizes."""
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(tokenizer, tie_word_embeddings=True, **shape)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def build_llama_classifier(tokenizer, num_labels: int = 1, seed: int = 0, **shape):
    """A randomly initialised LlamaForSequenceClassification: a stand-in reward model
    (1 label: Bradley-Terry head, 2 labels: two-class head). ``shape``: llama_config's sizes."""
    import torch
    from transformers import LlamaForSequenceClassification

    config = llama_config(tokenizer, num_labels=num_labels, **shape)
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config)
