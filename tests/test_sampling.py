"""Batched transformers sampling on a locally built model."""

import pytest

from iteralign.modeling import DEFAULT_CHAT_TEMPLATE, load_causal_lm, load_tokenizer, render_prompt
from iteralign.sample import cut_at_stop, hf

PROMPTS = ["1+2", "10+20", "3+4", "99+99", "5+55", "7+8"]


@pytest.fixture(scope="module")
def policy(tiny_checkpoint):
    tokenizer = load_tokenizer(tiny_checkpoint, padding_side="left")
    model = load_causal_lm(tiny_checkpoint)
    texts = [render_prompt(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    return model, tokenizer, texts


def test_left_padded_batches_give_the_same_greedy_text_as_one_prompt_at_a_time(policy):
    model, tokenizer, texts = policy
    batched = hf.generate(model, tokenizer, texts, 1, 0.0, 1.0, 6, batch_size=6, seed=0)
    single = hf.generate(model, tokenizer, texts, 1, 0.0, 1.0, 6, batch_size=1, seed=0)
    assert [c[0].text for c in batched] == [c[0].text for c in single]


def test_k_samples_per_prompt_are_seeded(policy):
    model, tokenizer, texts = policy
    a = hf.generate(model, tokenizer, texts, 4, 1.0, 1.0, 6, batch_size=4, seed=11)
    b = hf.generate(model, tokenizer, texts, 4, 1.0, 1.0, 6, batch_size=4, seed=11)
    c = hf.generate(model, tokenizer, texts, 4, 1.0, 1.0, 6, batch_size=4, seed=12)
    assert all(len(outs) == 4 for outs in a)
    assert a == b
    assert a != c
    assert len({o.text for outs in a for o in outs}) > len(PROMPTS)  # samples differ within a prompt


def test_finish_reason_and_token_counts(policy):
    model, tokenizer, texts = policy
    outs = hf.generate(model, tokenizer, texts, 2, 1.0, 1.0, 3, batch_size=6, seed=0)
    completions = [o for group in outs for o in group]
    assert {c.finish_reason for c in completions} == {"stop", "length"}  # both token counts are checked
    for completion in completions:
        if completion.finish_reason == "length":
            assert completion.num_tokens == 3
        else:
            assert completion.num_tokens == len(tokenizer(completion.text, add_special_tokens=False).input_ids) + 1


def test_stop_strings_cut_the_text():
    assert cut_at_stop("12+34=5", ["=", "+"]) == "12"
    assert cut_at_stop("123", ["="]) is None


def test_greedy_with_several_samples_is_refused(policy):
    model, tokenizer, texts = policy
    with pytest.raises(ValueError, match="identical samples"):
        hf.generate(model, tokenizer, texts, 2, 0.0, 1.0, 3, batch_size=2, seed=0)


def test_tokenizer_without_template_gets_the_default(tmp_path, tiny_checkpoint):
    import shutil

    folder = tmp_path / "no_template"
    shutil.copytree(tiny_checkpoint, folder)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        path = folder / name
        if path.exists() and name.endswith(".jinja"):
            path.unlink()
        elif path.exists():
            import json

            data = json.loads(path.read_text())
            data.pop("chat_template", None)
            path.write_text(json.dumps(data))
    tokenizer = load_tokenizer(folder)
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    text = render_prompt(tokenizer, [{"role": "user", "content": "hi"}])
    assert text.endswith("User: hi\n\nAssistant:")


LONG = [[{"role": "user", "content": "1+2" * 100}], [{"role": "user", "content": "3+4"}]]
GREEDY = {"num_samples": 1, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 4, "stop": []}


def test_a_prompt_longer_than_the_context_is_refused_naming_it(tiny_checkpoint):
    from iteralign.config import validate
    from iteralign.errors import UserError
    from iteralign.sample import generate

    with pytest.raises(UserError, match=r"prompt_id long-one: prompt of \d+ tokens .* expected at most 60"):
        generate(str(tiny_checkpoint), LONG, GREEDY, validate({"sampling": {"backend": "hf"}}), seed=0,
                 prompt_ids=["long-one", "short-one"])


def test_long_prompts_truncate_keeps_the_last_tokens_that_fit(tiny_checkpoint):
    from iteralign.config import validate
    from iteralign.sample import generate

    config = validate({"sampling": {"backend": "hf", "long_prompts": "truncate"}})
    generation = generate(str(tiny_checkpoint), LONG, GREEDY, config, seed=0)
    tokenizer = load_tokenizer(tiny_checkpoint)
    full = render_prompt(tokenizer, LONG[0])
    kept = tokenizer(generation.texts[0], add_special_tokens=False).input_ids
    assert len(tokenizer(full, add_special_tokens=False).input_ids) > 60 >= len(kept)  # 64 positions - 4 new
    assert full.endswith(generation.texts[0]) and generation.texts[1] == render_prompt(tokenizer, LONG[1])
    assert [len(c) for c in generation.completions] == [1, 1]
