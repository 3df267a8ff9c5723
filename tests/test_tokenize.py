"""Label masks for three template families, bad-input errors with line numbers, and the token cache."""

import subprocess
import sys

import numpy as np
import pytest
from transformers import AutoTokenizer

import tokenize_data
from conftest import QS_CONFIG, QS_MODEL, ROOT, write_jsonl
from tokenize_data import DataConfig, DataError, TokenCache, build_cache, read_jsonl, tokenize_sample

LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
INST = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse: a b c"},
        {"role": "assistant", "content": "c b a"}, {"role": "user", "content": "And: x y"},
        {"role": "assistant", "content": "y x"}]


def tokenizer(style: str):
    tok = AutoTokenizer.from_pretrained(QS_MODEL)
    if style == "llama3":
        tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]})
        tok.chat_template = LLAMA3
    elif style == "inst":
        tok.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
        tok.chat_template = INST
    return tok


# what each assistant turn must train: its content and the end-of-turn token(s) the template writes after it
# (the [INST] template writes a space before the answer, which the model also generates)
EXPECTED = {"chatml": ["c b a<|im_end|>", "y x<|im_end|>"], "llama3": ["c b a<|eot_id|>", "y x<|eot_id|>"],
            "inst": [" c b a</s>", " y x</s>"]}


@pytest.mark.parametrize("style", ["chatml", "llama3", "inst"])
def test_only_assistant_content_and_end_of_turn_are_trained(style):
    tok = tokenizer(style)
    chat = CHAT[1:] if style == "inst" else CHAT  # that template has no system role
    out = tokenize_sample({"messages": chat}, tok)
    ids, labels = out["input_ids"], out["labels"]
    assert len(ids) == len(labels)
    assert tok.decode(ids) == tok.apply_chat_template(chat, tokenize=False)  # nothing lost or added
    runs, current = [], []  # contiguous trained spans
    for i, lab in zip(ids, labels):
        if lab != -100:
            assert lab == i
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    assert [tok.decode(r) for r in runs] == EXPECTED[style]


def test_template_that_rewrites_history_is_refused():
    tok = tokenizer("chatml")  # a template that renders only the last turn cannot be masked by prefixes
    tok.chat_template = "{{ messages[-1]['content'] }}"
    with pytest.raises(DataError, match="prefixes"):
        tokenize_sample({"messages": CHAT}, tok)


BAD = [
    ('{"messages": [', "line 2: not valid JSON"),
    ('{"text": "hi"}', 'line 2: expected an object with a "messages" list'),
    ('{"messages": "hi"}', 'line 2: expected an object with a "messages" list'),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "line 2: messages[0] has role 'robot'"),
    ('{"messages": [{"role": "user", "content": 3}]}', "line 2: messages[0].content must be a string, got int"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2: no assistant message"),
]
GOOD = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]}'


@pytest.mark.parametrize("line,message", BAD, ids=[m.split(": ", 1)[1][:20] for _, m in BAD])
def test_bad_input_names_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, line, GOOD])
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    assert str(e.value).startswith(f"{path}:2: ") and message.split(": ", 1)[1] in str(e.value)


def test_empty_file(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match="empty.jsonl: the file has no samples"):
        read_jsonl(path)


def test_cli_error_is_one_line_not_a_traceback(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, '{"messages": ['])
    p = subprocess.run([sys.executable, "tokenize_data.py", "--config", QS_CONFIG, f"--data.train_files=[{path}]",
                        f"--data.cache_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode != 0
    assert p.stderr.strip() == f"error: {path}:3: not valid JSON (Expecting value at column 15)"


def test_cache_counts_drops_and_is_keyed_by_content(tmp_path):
    tok = tokenizer("chatml")
    long = {"messages": [{"role": "user", "content": "z " * 200}, {"role": "assistant", "content": "ok"}]}
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"messages": CHAT}, long, {"messages": CHAT[1:3]}])
    cfg = DataConfig(max_seq_len=64, cache_dir=str(tmp_path / "cache"))
    first = build_cache([str(path)], tok, cfg)
    cache = TokenCache(first)
    assert cache.meta["samples_read"] == 3 and cache.meta["samples_kept"] == 2
    assert cache.meta["dropped"] == {"longer_than_max_seq_len": 1}
    expected = [tokenize_sample({"messages": c}, tok) for c in (CHAT, CHAT[1:3])]
    for i, e in enumerate(expected):
        ids, mask = cache[i]
        assert ids.tolist() == e["input_ids"]
        assert mask.tolist() == [int(x != -100) for x in e["labels"]]
        assert cache.loss_tokens[i] == sum(x != -100 for x in e["labels"][1:])
    assert cache.meta["loss_tokens"] == cache.loss_tokens.sum()
    assert build_cache([str(path)], tok, cfg) == first  # reused
    write_jsonl(path, [{"messages": CHAT}])
    assert build_cache([str(path)], tok, cfg) != first  # changed input: never stale
    tok.chat_template = INST
    assert build_cache([str(path)], tok, cfg) != build_cache([str(path)], tokenizer("chatml"), cfg)
    assert "longer_than_max_seq_len: 1" in tokenize_data.summary(cache)


def test_parallel_tokenization_matches(tmp_path):
    tok = tokenizer("chatml")
    files = [write_jsonl(tmp_path / f"{i}.jsonl", [{"messages": CHAT}] * (i + 1)) for i in range(3)]
    one = TokenCache(build_cache(files, tok, DataConfig(cache_dir=str(tmp_path / "a"))))
    two = TokenCache(build_cache(files, tok, DataConfig(cache_dir=str(tmp_path / "b"), num_proc=2)))
    assert np.array_equal(one.input_ids, two.input_ids) and np.array_equal(one.loss_mask, two.loss_mask)
