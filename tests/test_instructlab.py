"""Data in the formats of InstructLab's training library and mini_trainer trains as they train it. The expected masks
come from reading their code (instructlab/training fa5b53b, src/instructlab/training/data_process.py and
sampler.py; mini_trainer 80f6355, process_data.py), cited at each case."""

import json

import numpy as np
import pytest

import sampler
from conftest import family_tokenizer, in_process, metrics, run_args, write_jsonl
from tokenize_data import DataConfig, DataError, Source, TokenCache, build_cache, tokenize_sample

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
USER = {"role": "user", "content": "For the word dream, give a rhyme."}
ANSWER = {"role": "assistant", "content": "Stream rhymes with dream."}


QWEN = family_tokenizer("qwen2_5")  # ChatML: <|im_start|>role\n ... <|im_end|>\n; its EOS is <|im_end|>


@pytest.fixture
def tok():
    return QWEN


def cache_of(tmp_path, records, **cfg) -> TokenCache:
    path = write_jsonl(tmp_path / "d.jsonl", records)
    return TokenCache(build_cache([path], QWEN, DataConfig(cache_dir=str(tmp_path / "c"), **cfg)))


def trained(cache: TokenCache, i: int, tokenizer) -> list[str]:
    """The trained runs of sample i, decoded."""
    ids, mask = cache[i]
    runs, start = [], None
    for k in range(len(ids) + 1):
        if k < len(ids) and mask[k] and start is None:
            start = k
        elif (k == len(ids) or not mask[k]) and start is not None:
            runs.append(tokenizer.decode(ids[start:k].tolist()))
            start = None
    return runs


def test_unmask_true_trains_every_role_but_system_and_false_only_the_assistant(tmp_path, tok):
    """unmask_sample: unmask true -> every role present but system; unmask_messages: the content between the
    markers (no role header, no end-of-turn) for user turns, and for the assistant its content and what follows up
    to the first EOS (<|im_end|>). Both kinds in one file, each trained its own way."""
    chat = [SYSTEM, USER, ANSWER, {"role": "user", "content": "And for night?"},
            {"role": "assistant", "content": "Light."}]
    cache = cache_of(tmp_path, [{"messages": chat, "unmask": True}, {"messages": chat, "unmask": False},
                                {"messages": chat}])
    assert trained(cache, 0, tok) == [USER["content"], ANSWER["content"] + "<|im_end|>", "And for night?",
                                      "Light.<|im_end|>"]
    for i in (1, 2):
        assert trained(cache, i, tok) == [ANSWER["content"] + "<|im_end|>", "Light.<|im_end|>"]


def test_a_tool_turn_is_trained_under_unmask(tmp_path, tok):
    chat = [USER, {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"type": "function", "function": {"name": "lookup", "arguments": {"word": "dream"}}}]},
        {"role": "tool", "content": "stream, cream"}, {"role": "assistant", "content": "Stream."}]
    runs = trained(cache_of(tmp_path, [{"messages": chat, "unmask": True}]), 0, tok)
    assert runs[0] == USER["content"] and "stream, cream" in runs and runs[-1] == "Stream.<|im_end|>"


def test_a_reasoning_only_assistant_turn_is_accepted_and_trains_its_reasoning(tmp_path):
    qwen3 = family_tokenizer("qwen3")
    for key in ("reasoning_content", "thinking"):
        path = write_jsonl(tmp_path / f"{key}.jsonl", [{"messages": [USER, {"role": "assistant", key: "Dream, stream."}]}])
        cache = TokenCache(build_cache([path], qwen3, DataConfig(cache_dir=str(tmp_path / "c"))))
        [run] = trained(cache, 0, qwen3)
        assert "Dream, stream." in run and run.endswith("<|im_end|>") and "<think>" in run


def test_legacy_pretraining_role_is_parsed_into_turns_and_trained_unmasked(tmp_path, tok):
    """ensure_dataset_is_compatible_with_legacy_format: a "pretraining" message -> its <|user|>/<|assistant|>
    turns (content up to the next "<", <|endoftext|> removed), and the record trains as unmask: true."""
    legacy = {"messages": [{"role": "pretraining",
                            "content": "<|user|>\nWhat is X?\n<|assistant|>\nX is Y.<|endoftext|>"}]}
    twin = {"messages": [{"role": "user", "content": "What is X?\n"}, {"role": "assistant", "content": "X is Y."}],
            "unmask": True}
    generic = {"messages": [{"role": "pretraining", "content": "<|start_of_role|>user<|end_of_role|>\nWhat is X?\n"
                                                               "<|start_of_role|>assistant<|end_of_role|>\nX is Y."}]}
    cache = cache_of(tmp_path, [legacy, twin, generic])
    assert trained(cache, 0, tok) == ["What is X?", "X is Y.<|im_end|>"]
    for i in (1, 2):
        assert [x.tolist() for x in cache[i]] == [x.tolist() for x in cache[0]]


def test_mini_trainer_pretrain_role_trains_its_content_and_eos(tmp_path, tok):
    """process_data.py: input_ids = encode(content + eos, no special tokens), labels = input_ids."""
    cache = cache_of(tmp_path, [{"messages": [{"role": "pretrain", "content": "Plain text to learn."}]}])
    ids, mask = cache[0]
    assert tok.decode(ids.tolist()) == "Plain text to learn." + tok.eos_token and mask.all()


def test_a_pretokenized_file_trains_exactly_its_labels(tmp_path, tok):
    """TokenDataset: input_ids and labels aligned (-100: not trained), len and num_loss_counted_tokens optional;
    never re-tokenized or re-masked, even where a template would mask otherwise."""
    ids = tok("Hello there, general Kenobi.", add_special_tokens=False)["input_ids"]
    labels = [-100, -100] + ids[2:5] + [-100] * (len(ids) - 6) + ids[-1:]
    records = [{"input_ids": ids, "labels": labels, "len": len(ids), "num_loss_counted_tokens": 4, "id": "a1"},
               {"input_ids": ids, "labels": labels}]
    cache = cache_of(tmp_path, records)
    for i in (0, 1):
        got_ids, mask = cache[i]
        assert got_ids.tolist() == ids and mask.tolist() == [int(x != -100) for x in labels]
    assert cache.meta["sources"][0]["format"] == "tokens" and cache.meta["sources"][0]["unused_keys"] == ["id"]
    assert tokenize_sample(records[0], tok) == {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("record,message", [
    ({"input_ids": [1, 2, 10 ** 6], "labels": [-100, 2, 10 ** 6]}, "d.jsonl:2: input_ids[2] = 1000000 is outside "
                                                                   "the tokenizer's vocabulary"),
    ({"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "len": 4}, 'd.jsonl:2: "len" is 4 but input_ids holds 3'),
    ({"input_ids": [5, 6, 7, 8], "labels": [6, 7, 8, -100]}, "d.jsonl:2: labels[0] = 6 is neither -100 nor "
                                                             "input_ids[0] = 5: the file holds next-token labels"),
    ({"input_ids": [5, 6, 7], "labels": [-100, 9, 7]}, "labels[1] = 9 is neither -100 nor input_ids[1] = 6: each"),
])
def test_a_bad_pretokenized_record_is_a_file_line_error(tmp_path, tok, record, message):
    good = {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cache_of(tmp_path, [good, record])
    cache = cache_of(tmp_path, [good, record], on_bad_sample="skip")
    assert len(cache) == 1 and sum(cache.meta["skipped"].values()) == 1


@pytest.mark.parametrize("kind", ["document", "text", "input_ids"])
def test_a_long_document_becomes_blocks_that_train_every_token_once(tmp_path, tok, kind):
    """Never dropped: blocks of at most data.max_seq_len tokens, each its own sample, that together predict every
    token of the document (but its first, as any sample) exactly once."""
    text = " ".join(f"word{i}" for i in range(300))
    full = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    record = {"input_ids": full} if kind == "input_ids" else {kind: text}
    cache = cache_of(tmp_path, [record, {kind: "short"} if kind != "input_ids" else {"input_ids": full[:5]}],
                     max_seq_len=64)
    blocks = [cache[i] for i in range(len(cache) - 1)]
    assert len(blocks) > 2 and all(len(ids) <= 64 for ids, _ in blocks)
    assert cache.meta["dropped"] == {"longer_than_max_seq_len": 0}
    _, targets, _, _ = sampler.targets(blocks)
    assert targets.tolist() == full[1:]  # in order, each once
    assert np.concatenate([ids[1:] if i else ids for i, (ids, _) in enumerate(blocks)]).tolist() == full


def test_unused_record_keys_are_reported_once_per_source(tmp_path, tok):
    records = [{"messages": [USER, ANSWER], "id": 1, "metadata": {"s": "x"}}, {"messages": [USER, ANSWER], "id": 2}]
    cache = cache_of(tmp_path, records)
    assert cache.meta["sources"][0]["unused_keys"] == ["id", "metadata"]
    import tokenize_data

    assert "unused keys: id, metadata" in tokenize_data.summary(cache)


def test_a_messages_file_and_its_pretokenized_twin_train_identically(tmp_path, small_data):
    """The twin is written from our own token cache (labels = input ids where the mask trains): same losses."""
    from conftest import QS_MODEL
    from tokenize_data import load_tokenizer

    cache = TokenCache(build_cache([small_data], load_tokenizer(QS_MODEL), DataConfig(cache_dir=str(tmp_path / "c"),
                                                                                      max_seq_len=128)))
    twin = write_jsonl(tmp_path / "twin.jsonl", [
        {"input_ids": ids.tolist(), "labels": np.where(mask > 0, ids, -100).tolist(), "len": len(ids)}
        for ids, mask in (cache[i] for i in range(len(cache)))])
    losses = []
    for name, data in (("chats", small_data), ("twin", twin)):
        in_process(run_args(tmp_path / name, data, **{"sharding.strategy": "none", "train.max_steps": 3}))
        losses.append([m["loss"] for m in metrics(tmp_path / name / "run")])
    assert losses[0] == losses[1]


def test_format_can_be_set_for_instructlab_sources(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"document": "Some text.", "text": "other"}])
    cache = TokenCache(build_cache([Source(path=path, format="document")], tok,
                                   DataConfig(cache_dir=str(tmp_path / "c"))))
    assert cache.meta["sources"][0]["unused_keys"] == ["text"]
    assert json.loads((cache.path / "meta.json").read_text())["sources"][0]["format"] == "document"
