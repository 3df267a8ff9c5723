"""The data stage: masks on the real chat templates of every family in ../shared/templates, every format and source
kind against its messages-JSONL equivalent, mixtures, bad samples (fuzzed), the token cache and --preview."""

import json
import random

import numpy as np
import pytest

import sampler
import tokenize_data
from conftest import QS_CONFIG, QS_MODEL, ROOT, TEMPLATES, family_tokenizer, write_jsonl
from tokenize_data import BadSample, DataConfig, DataError, Source, TokenCache, build_cache, tokenize_sample

# What the model generates for an assistant turn, around its content, per family (from tokens.json and the
# templates' documentation, not from our code): (before the content, after it).
WRAP = {"llama3_1": ("", "<|eot_id|>"), "llama3_2": ("", "<|eot_id|>"), "qwen2_5": ("", "<|im_end|>"),
        "qwen3": ("<think>\n\n</think>\n\n", "<|im_end|>"), "mistral_v0_3": (" ", "</s>"),
        "granite3": ("", "<|end_of_text|>"), "phi3_5": ("", "<|end|>"), "gemma2": ("", "<end_of_turn>"),
        "smollm2": ("", "<|im_end|>"), "llama2_chat": (" ", " </s>"), "deepseek_r1_distill_llama":
        ("", "<｜end▁of▁sentence｜>"), "harmony": ("<|channel|>final<|message|>", "<|return|>")}
VARIANTS = {"granite3_0": "granite3", "granite3_2": "granite3", "granite3_3": "granite3",
            "qwen3_initial_release": "qwen3"}
# how each family renders a turn's reasoning before its content, where it renders reasoning at all
REASONING = {"qwen3": "<think>\n{}\n</think>\n\n",
             "harmony": "<|channel|>analysis<|message|>{}<|end|><|start|>assistant<|channel|>final<|message|>"}
TOOLS = ("qwen2_5", "qwen3", "llama3_1", "llama3_2", "mistral_v0_3")

SYSTEM = {"role": "system", "content": "Be brief."}
CHATS = {
    "single": [{"role": "user", "content": "Reverse: a b c"}, {"role": "assistant", "content": "c b a"}],
    "multi": [{"role": "user", "content": "Reverse: a b c"}, {"role": "assistant", "content": "c b a"},
              {"role": "user", "content": "And: x y"}, {"role": "assistant", "content": "y x"},
              {"role": "user", "content": "And: 1 2 3"}, {"role": "assistant", "content": "3 2 1"}],
}
CALL = {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_DEFS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_CHAT = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [CALL]},
             {"role": "tool", "content": "18 C, sunny", "tool_call_id": "call00001"},
             {"role": "assistant", "content": "It is 18 C and sunny."}]


def trained_runs(tok, samples) -> list[str]:
    """The decoded contiguous trained spans of the samples, in order."""
    runs = []
    for s in samples if isinstance(samples, list) else [samples]:
        assert len(s["input_ids"]) == len(s["labels"])
        current = []
        for i, lab in zip(s["input_ids"] + [None], s["labels"] + [-100]):
            if lab != -100:
                assert lab == i
                current.append(i)
            elif current:
                runs.append(tok.decode(current))
                current = []
    return runs


def check_sample_texts(tok, chat, samples):
    """Each sample is exactly the inference prompt of its last trained turn plus that turn's trained answer, and
    every message up to it is in the text: nothing lost, nothing added."""
    turns = [i for i, m in enumerate(chat) if m["role"] == "assistant"]
    samples = samples if isinstance(samples, list) else [samples]
    ends = []
    for s in samples:
        text = tok.decode(s["input_ids"])
        last = next(i for i in reversed(turns) if any(
            text.startswith(tok.apply_chat_template(chat[:i], tokenize=False, add_generation_prompt=True))
            and m["content"] in text for m in [chat[i]]))
        ends.append(last)
        for m in chat[:last + 1]:
            assert m["content"].strip() in text, (m, text)
    assert ends == sorted(ends) and ends[-1] == turns[-1]


FAMILIES = sorted(WRAP) + sorted(VARIANTS)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chat", ["single", "multi", "single+system", "multi+system"])
def test_masks_are_exact_on_real_templates(family, chat):
    tok = family_tokenizer(family)
    messages = ([SYSTEM] if "system" in chat else []) + CHATS[chat.split("+")[0]]
    if family == "gemma2" and "system" in chat:  # its template raises on a system role: refused, never dropped
        with pytest.raises(BadSample, match="System role not supported"):
            tokenize_sample({"messages": messages}, tok)
        return
    out = tokenize_sample({"messages": messages}, tok)
    before, after = WRAP[VARIANTS.get(family, family)]
    expected = [before + m["content"] + after for m in messages if m["role"] == "assistant"]
    assert trained_runs(tok, out) == expected
    check_sample_texts(tok, messages, out)


@pytest.mark.parametrize("family", FAMILIES)
def test_render_is_apply_chat_template(family):
    """_render calls the template transformers compiles, not apply_chat_template: same text, same errors."""
    tok = family_tokenizer(family)
    chats = [([SYSTEM] + CHATS["multi"], None), (TOOL_CHAT, TOOL_DEFS),
             ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "reasoning": "R"}], None)]
    for chat, tools in chats:
        for cut in range(1, len(chat) + 1):
            for gen in (False, True):
                try:
                    expected = tok.apply_chat_template(chat[:cut], tools=tools, tokenize=False,
                                                       add_generation_prompt=gen)
                except Exception:
                    with pytest.raises(BadSample, match="the chat template raised"):
                        tokenize_data._render(tok, tokenize_data.normalize(chat[:cut] + [chat[-1]])[:cut], tools, gen)
                    continue
                got = tokenize_data._render(tok, tokenize_data.normalize(chat[:cut] + [chat[-1]])[:cut], tools, gen)
                assert got == expected


@pytest.mark.parametrize("family", ["qwen3", "qwen3_initial_release", "harmony"])
def test_reasoning_is_trained_in_its_own_turn(family):
    chat = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1", "reasoning_content": "R one"},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2", "reasoning_content": "R two"}]
    tok = family_tokenizer(family)
    out = tokenize_sample({"messages": chat}, tok)
    template = REASONING[VARIANTS.get(family, family)]
    after = WRAP[VARIANTS.get(family, family)][1]
    assert trained_runs(tok, out) == [template.format("R one") + "A1" + after, template.format("R two") + "A2" + after]
    assert len(out) == 2  # the template strips past reasoning: each turn is its own sample, as inference sees it


@pytest.mark.parametrize("family", ["llama3_1", "mistral_v0_3", "phi3_5"])
def test_reasoning_a_template_cannot_render_is_refused_not_lost(family):
    chat = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "reasoning_content": "R"}]
    with pytest.raises(BadSample, match="does not render its reasoning") as e:
        tokenize_sample({"messages": chat}, family_tokenizer(family))
    assert e.value.reason == "template_drops_message"


@pytest.mark.parametrize("family", TOOLS)
def test_tool_calls_are_trained_and_tool_results_are_not(family):
    tok = family_tokenizer(family)
    out = tokenize_sample({"messages": TOOL_CHAT, "tools": TOOL_DEFS}, tok)
    runs = trained_runs(tok, out)
    after = WRAP[family][1]
    assert len(runs) == 2 and all(r.endswith(after) for r in runs)
    assert "get_weather" in runs[0] and "Paris" in runs[0] and runs[1].endswith("It is 18 C and sunny." + after)
    assert not any("18 C, sunny" in r for r in runs)
    assert all("18 C, sunny" in tok.decode(s["input_ids"]) for s in (out if isinstance(out, list) else [out])[-1:])


def test_template_that_drops_a_tool_call_is_refused():
    """Granite 3.1's template renders an assistant turn's content but not its tool_calls."""
    with pytest.raises(BadSample, match="leaves it .or its tool call. out"):
        tokenize_sample({"messages": TOOL_CHAT, "tools": TOOL_DEFS}, family_tokenizer("granite3"))


def test_train_false_and_content_parts():
    tok = family_tokenizer("qwen2_5")
    chat = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "skip me", "train": False},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": [{"type": "text", "text": "d"}]}]
    out = tokenize_sample({"messages": chat}, tok)
    assert trained_runs(tok, out) == ["d<|im_end|>"]
    assert "a\nb" in tok.decode(out["input_ids"]) and "skip me" in tok.decode(out["input_ids"])


def test_no_end_of_turn_is_refused(tmp_path):
    tok = family_tokenizer("qwen2_5")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                        "{% if add_generation_prompt %}assistant: {% endif %}"
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHATS["single"]}])
    with pytest.raises(DataError, match="no sample trains the end-of-turn token '<|im_end|>'"):
        build_cache([path], tok, DataConfig(cache_dir=str(tmp_path / "c")))


# ---- formats and source kinds ----

QS_LINES = (ROOT / "data/quickstart/train.jsonl").read_text().splitlines()[:60]
QS = [json.loads(line) for line in QS_LINES]
NO_SYSTEM = [{"messages": r["messages"][-2:]} for r in QS]  # alpaca has no system turn


def as_format(record: dict, fmt: str) -> dict:
    msgs = record["messages"]
    if fmt == "conversations":
        return {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                                   "value": m["content"]} for m in msgs]}
    if fmt == "alpaca":
        return {"instruction": msgs[0]["content"], "input": "", "output": msgs[1]["content"]}
    if fmt == "prompt_completion":
        return {"prompt": msgs[:-1] if len(msgs) > 2 else msgs[0]["content"], "completion": msgs[-1]["content"]}
    return record


def arrays(path):
    c = TokenCache(path)
    return c.input_ids.tolist(), c.loss_mask.tolist(), c.offsets.tolist()


@pytest.mark.parametrize("fmt", ["conversations", "alpaca", "prompt_completion"])
def test_each_format_tokenizes_as_its_messages_equivalent(tmp_path, fmt):
    tok = family_tokenizer("llama3_1")
    records = NO_SYSTEM if fmt == "alpaca" else QS
    cfg = DataConfig(cache_dir=str(tmp_path / "c"))
    ref = build_cache([write_jsonl(tmp_path / "m.jsonl", records)], tok, cfg)
    got = build_cache([write_jsonl(tmp_path / "f.jsonl", [as_format(r, fmt) for r in records])], tok, cfg)
    assert ref != got and arrays(ref) == arrays(got)
    assert TokenCache(got).meta["sources"][0]["format"] == fmt


def test_each_source_kind_tokenizes_as_jsonl(tmp_path):
    import datasets

    tok = family_tokenizer("qwen2_5")
    cfg = DataConfig(cache_dir=str(tmp_path / "c"))
    ref = arrays(build_cache([write_jsonl(tmp_path / "m.jsonl", QS)], tok, cfg))
    ds = datasets.Dataset.from_list(QS)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "array.json").write_text(json.dumps(QS))
    (tmp_path / "dir").mkdir()
    write_jsonl(tmp_path / "dir/a.jsonl", QS[:25]), write_jsonl(tmp_path / "dir/b.jsonl", QS[25:])
    for src in ("d.parquet", "saved", "array.json", "dir"):
        assert arrays(build_cache([str(tmp_path / src)], tok, cfg)) == ref, src


def test_text_format_trains_every_token_and_appends_eos(tmp_path):
    tok = family_tokenizer("llama3_1")
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}, {"text": "more text"}])
    cache = TokenCache(build_cache([path], tok, DataConfig(cache_dir=str(tmp_path / "c"))))
    ids, mask = cache[0]
    assert tok.decode(ids.tolist()) == "hello world<|eot_id|>" and mask.all()


def test_format_is_detected_and_can_be_set(tmp_path):
    tok = family_tokenizer("qwen2_5")
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="cannot detect the format of the source .cannot tell the format from the keys"):
        build_cache([path], tok, DataConfig(cache_dir=str(tmp_path / "c")))
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "x", "messages": CHATS["single"]}])
    cfg = DataConfig(cache_dir=str(tmp_path / "c"))
    assert TokenCache(build_cache([path], tok, cfg)).meta["sources"][0]["format"] == "messages"
    cache = TokenCache(build_cache([Source(path=path, format="text")], tok, cfg))
    assert cache.meta["sources"][0]["format"] == "text" and cache.loss_mask.all()


# ---- mixtures ----

def test_mixture_counts_are_exact_and_fractions_vary_by_epoch():
    sources = np.repeat([0, 1, 2], [100, 60, 40])
    plan = sampler.MultipackPlan(np.ones(200, int), sampler.SamplerConfig(batch_size=16), 1, 7, sources,
                                 [2.0, 0.5, 1.5])
    halves = []
    for epoch in range(3):
        s = plan.epoch_samples(epoch)
        assert np.bincount(sources[s]).tolist() == [200, 30, 60]
        assert (np.bincount(s[sources[s] == 0], minlength=100) == 2).all()  # weight 2: each sample twice
        third = np.bincount(s[sources[s] == 2], minlength=200)[160:]
        assert np.bincount(third).tolist() == [0, 20, 20]  # weight 1.5: each once, a seeded half twice
        halves.append(set(s[sources[s] == 1].tolist()))
        assert len(halves[-1]) == 30  # weight 0.5: a half, without repeats
    assert halves[0] != halves[1] != halves[2]
    assert plan.steps_per_epoch == -(-290 // 16)
    steps = np.concatenate([plan.step_samples(0, k) for k in range(plan.steps_per_epoch)])
    assert sorted(steps.tolist()) == sorted(plan.epoch_samples(0).tolist())


# ---- bad samples ----

def corrupt(line: str, rng: random.Random) -> tuple[str, str]:
    """One random corruption of a valid chat line -> (the line, the kind)."""
    record = json.loads(line)
    kind = rng.choice(["truncate", "bad_bytes", "wrong_type", "delete_key"])
    if kind == "truncate":
        return line[:rng.randrange(1, len(line) - 1)], kind
    if kind == "bad_bytes":
        k = rng.randrange(len(line))
        return line[:k] + "\udcff" + line[k:], kind  # written as the single byte 0xff
    msgs = record["messages"]
    j = rng.randrange(len(msgs))
    if kind == "wrong_type":
        target = rng.choice(["content", "role", "messages", "record"])
        if target == "record":
            return json.dumps([record]), kind
        if target == "messages":
            return json.dumps({"messages": {"0": msgs[0]}}), kind
        msgs[j][target] = rng.choice([3, None, ["x"], {"a": 1}]) if target == "content" else 7
    else:
        key = rng.choice(["content", "role", "messages"])
        if key == "messages":
            record = {"msgs": msgs}
        else:
            del msgs[j][key]
    return json.dumps(record), kind


def test_fuzzed_files_give_an_error_or_a_counted_skip(tmp_path):
    """200 random corruptions of a valid file: with `error`, a one-line error naming file:line; with `skip`,
    exactly the corrupted lines are skipped and counted, and the rest tokenize as the clean file does."""
    tok = family_tokenizer("qwen2_5")
    rng = random.Random(0)
    lines = QS_LINES[:20]
    clean = arrays(build_cache([write_jsonl(tmp_path / "clean.jsonl", lines)], tok,
                               DataConfig(cache_dir=str(tmp_path / "c"))))
    kinds = set()
    for case in range(200):
        k = rng.randrange(len(lines))
        bad, kind = corrupt(lines[k], rng)
        kinds.add(kind)
        path = tmp_path / f"f{case}.jsonl"
        path.write_bytes("\n".join(lines[:k] + [bad] + lines[k + 1:]).encode("utf-8", "surrogateescape") + b"\n")
        try:
            build_cache([str(path)], tok, DataConfig(cache_dir=str(tmp_path / "c")))
            raise AssertionError(f"case {case} ({kind}): no error for {bad!r}")
        except DataError as e:
            assert str(e).startswith(f"{path}:{k + 1}: ") and "\n" not in str(e), (case, kind, str(e))
        if case % 10:
            continue  # the skip path is the same code; every tenth case also runs it
        cache = TokenCache(build_cache([str(path)], tok, DataConfig(cache_dir=str(tmp_path / "c"),
                                                                    on_bad_sample="skip")))
        assert sum(cache.meta["skipped"].values()) == 1 and cache.meta["samples"] == len(lines) - 1
        ref_ids, _, ref_off = clean
        assert cache.input_ids.tolist() == ref_ids[:ref_off[k]] + ref_ids[ref_off[k + 1]:]
    assert kinds == {"truncate", "bad_bytes", "wrong_type", "delete_key"}


def test_every_bad_kind_is_counted_by_reason(tmp_path):
    tok = family_tokenizer("gemma2")
    good = {"messages": CHATS["single"]}
    rows = [good, "{oops", {"messages": []}, {"messages": [{"role": "robot", "content": "x"}]},
            {"messages": [{"role": "user", "content": "x"}]}, {"messages": [SYSTEM] + CHATS["single"]},
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}, good]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with open(path, "ab") as f:
        f.write(b'{"messages": "\xff"}\n')
    cache = TokenCache(build_cache([path], tok, DataConfig(cache_dir=str(tmp_path / "c"), on_bad_sample="skip")))
    assert cache.meta["skipped"] == {"invalid_json": 1, "empty_conversation": 1, "unknown_role": 1,
                                     "no_assistant_turn": 1, "template_error": 1, "wrong_type": 1, "invalid_utf8": 1}
    assert cache.meta["samples"] == 2
    assert "skipped 7 (" in tokenize_data.summary(cache)


def test_cli_error_is_one_line_and_preview_marks_trained_tokens(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = write_jsonl(tmp_path / "bad.jsonl", QS_LINES[:2] + ['{"messages": ['])
    """`python tokenize_data.py`'s main, in this process (the command's imports are test_import_graph's)."""
    with pytest.raises(SystemExit) as e:
        tokenize_data.main(["--config", QS_CONFIG, f"--data.train_files=[{path}]", f"--data.cache_dir={tmp_path}"])
    assert e.value.code == (f"error: {path}:3: not valid JSON (Expecting value at column 15) "
                            "(data.on_bad_sample: skip counts and skips such samples)")
    tokenize_data.main(["--config", QS_CONFIG, f"--data.train_files=[{path}]", f"--data.cache_dir={tmp_path}",
                        "--data.on_bad_sample=skip", "--preview", "1", "--data.eval_files=[]"])
    out = capsys.readouterr().out
    assert "bad (messages): 3 records -> 2 samples; skipped 1 (invalid_json: 1)" in out
    sample = out.split("--- sample 0 (bad, 37 tokens, 12 trained) ---\n")[1]
    assert sample == ("<|im_start|>system\nAnswer with the letters only.<|im_end|>\n<|im_start|>user\n"
                      "Count from d to n.<|im_end|>\n<|im_start|>assistant\n[[d e f g h i j k l m n<|im_end|>]]\n")


def test_cache_counts_drops_and_is_keyed_by_content(tmp_path):
    tok = tokenize_data.load_tokenizer(QS_MODEL)
    long = {"messages": [{"role": "user", "content": "z " * 200}, {"role": "assistant", "content": "ok"}]}
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [QS[0], long, QS[1]])
    cfg = DataConfig(max_seq_len=64, cache_dir=str(tmp_path / "cache"))
    first = build_cache([str(path)], tok, cfg)
    cache = TokenCache(first)
    assert cache.meta["samples"] == 2 and cache.meta["dropped"] == {"longer_than_max_seq_len": 1}
    for i, record in enumerate((QS[0], QS[1])):
        expected = tokenize_sample(record, tok)
        ids, mask = cache[i]
        assert ids.tolist() == expected["input_ids"]
        assert mask.tolist() == [int(x != -100) for x in expected["labels"]]
    assert cache.meta["trained_tokens"] == sum(int(cache[i][1].sum()) for i in range(len(cache)))
    assert build_cache([str(path)], tok, cfg) == first  # reused
    write_jsonl(path, [QS[0]])
    assert build_cache([str(path)], tok, cfg) != first  # changed input: never stale
    other = DataConfig(max_seq_len=4096, cache_dir=str(tmp_path / "cache"))
    assert build_cache([str(path)], family_tokenizer("llama3_1"), other) != build_cache([str(path)], tok, other)
    skip = DataConfig(max_seq_len=64, cache_dir=str(tmp_path / "cache"), on_bad_sample="skip")
    assert build_cache([str(path)], tok, skip) != build_cache([str(path)], tok, cfg)


def test_parallel_tokenization_of_one_file_matches(tmp_path):
    tok = family_tokenizer("qwen3")
    path = write_jsonl(tmp_path / "one.jsonl", QS * 3)
    one = arrays(build_cache([path], tok, DataConfig(cache_dir=str(tmp_path / "a"))))
    two = arrays(build_cache([path], tok, DataConfig(cache_dir=str(tmp_path / "b"), num_proc=2)))
    assert one == two


def test_templates_fixture_is_complete():
    files = {p.stem for p in TEMPLATES.glob("*.jinja")} | {p.stem for p in (TEMPLATES / "variants").glob("*.jinja")}
    assert files == set(FAMILIES) - {"harmony"}
