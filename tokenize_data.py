"""Data sources -> memory-mapped token cache. Only what the model generates at inference is trained
(each assistant turn's content and the end-of-turn token(s) the template writes after it); all else
gets label -100. InstructLab's and mini_trainer's data reads as they read it (`unmask: true`, their
pretraining roles, pre-tokenized input_ids/labels, documents): README, "Coming from InstructLab".

    python tokenize_data.py --config configs/quickstart.yaml [--preview N]

A source (a JSONL/JSON/Parquet file or a directory of them, a `datasets.save_to_disk` directory,
a hub id) has one of the FORMATS below, detected from its first record. `datasets` reads it and does
the parallel, batched work (Arrow, memory-mapped), never as a Python list. The cache directory's
name hashes the inputs' contents, tokenizer, chat template and options, so a changed input is never
served stale. It holds flat `input_ids` (int32) and `loss_mask` (uint8), per-sample `offsets`
(int64, n+1) and `source` ids, and `meta.json` (counts per source, skips and drops by reason).
"""

import functools
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np

import config

CACHE_VERSION = 5  # bump when the tokenization logic changes, so old caches are not reused
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"} | {r: r for r in ROLES}
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class Source:
    path: str = ""  # a JSONL/JSON/Parquet file or directory, a save_to_disk directory, or a hub id
    weight: Annotated[float, config.gt(0)] = 1.0  # samples per epoch, as a multiple of its size:
    #   2.0 = each twice, 0.5 = a seeded half (another half each epoch); a fractional part likewise
    format: Literal["auto", "messages", "conversations", "alpaca", "prompt_completion", "text",
                    "document", "tokens"] = "auto"


@config.section("data")
@dataclass
class DataConfig:
    train_files: list[str | Source] = field(default_factory=list)  # path or {path, weight, format}
    eval_files: list[str | Source] = field(default_factory=list)  # for train.eval_every_steps
    max_seq_len: Annotated[int, config.ge(2)] = 4096  # longest sample kept, in tokens; longer ones
    #   are dropped and counted, except documents (text, document, input_ids without labels): blocks
    on_bad_sample: Literal["error", "skip"] = "error"  # error: stop, naming the first; skip: count
    cache_dir: str = ".cache/tokens"  # where token caches live (one subdirectory per hash)
    num_proc: Annotated[int, config.ge(1)] = 1  # tokenizer processes over each source's records


class DataError(ValueError):
    pass


class BadSample(ValueError):
    """A sample that cannot be trained; `reason` keys its count under on_bad_sample: skip."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    if not path:
        raise DataError("model.path is empty: set it to an HF model directory (or hub id)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        raise DataError(f"{path}: the tokenizer has no chat template; add `chat_template` to its "
                        "tokenizer_config.json (or chat_template.jinja)")
    return tokenizer


# ---- record formats -> OpenAI chat messages, one small function each (a fork adds one here) ----

def _need(record: dict, key: str, types) -> object:
    if not isinstance(record.get(key), types):
        got = type(record[key]).__name__ if key in record else "nothing"
        want = getattr(types, "__name__", "a string or a list")
        raise BadSample("wrong_type", f'"{key}" must be {want}, got {got}')
    return record[key]


def from_messages(record: dict) -> list[dict]:
    return _need(record, "messages", list)


# InstructLab's data generator wrote a chat as one "pretraining" message until early 2025. Its
# training library parses it back into turns: a role tag, a newline, the content up to the next "<"
# (data_process.py, extract_messages_from_pretraining_text, instructlab/training fa5b53b)
_PRETRAINING = {True: re.compile(r"<\|(user|assistant)\|>\n([^<]+)"),
                False: re.compile(r"<\|start_of_role\|>(user|assistant)<\|end_of_role\|>\n([^<]+)")}


def _from_pretraining(messages: list) -> list[dict]:
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") != "pretraining":
            out.append(m)
            continue
        text = m.get("content")
        if not isinstance(text, str):
            raise BadSample("wrong_type", 'a "pretraining" message\'s content must be a string')
        legacy = "<|user|>" in text or "<|assistant|>" in text
        turns = [{"role": r, "content": c} for r, c in _PRETRAINING[legacy].findall(text)]
        if not turns:
            raise BadSample("wrong_type",
                            'a "pretraining" message holds no <|user|> or <|assistant|> turn')
        out += turns
    return out


def from_conversations(record: dict) -> list[dict]:  # ShareGPT
    turns = _need(record, "conversations", list)
    if not all(isinstance(t, dict) for t in turns):
        raise BadSample("wrong_type", '"conversations" must be a list of {"from", "value"} objects')
    for t in turns:
        if t.get("from") not in SHAREGPT_ROLES:
            raise BadSample("unknown_role", f"conversation turn from {t.get('from')!r}; "
                            f"expected one of {', '.join(SHAREGPT_ROLES)}")
    return [{"role": SHAREGPT_ROLES[t["from"]], "content": t.get("value")} for t in turns]


def from_alpaca(record: dict) -> list[dict]:
    user = _need(record, "instruction", str)
    if record.get("input"):
        user += "\n\n" + _need(record, "input", str)
    answer = _need(record, "output", str)
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def from_prompt_completion(record: dict) -> list[dict]:
    turns = []
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        part = _need(record, key, (str, list))
        turns += [{"role": role, "content": part}] if isinstance(part, str) else part
    return turns


# format: (record -> messages; None: text/document, no template, all trained, blocks if long;
# tokens: input_ids (+ labels) as given), the keys that identify it (tried in this order), the other
# keys it reads (a record's remaining keys are reported as unused)
FORMATS = {"tokens": (None, {"input_ids"}, {"labels", "len", "num_loss_counted_tokens"}),
           "messages": (from_messages, {"messages"}, {"tools", "unmask"}),
           "conversations": (from_conversations, {"conversations"}, {"tools"}),
           "alpaca": (from_alpaca, {"instruction", "output"}, {"input"}),
           "prompt_completion": (from_prompt_completion, {"prompt", "completion"}, {"tools"}),
           "document": (None, {"document"}, set()), "text": (None, {"text"}, set())}


def detect_format(record) -> str:
    keys = record.keys() if isinstance(record, dict) else ()
    if fmt := next((f for f, (_, need, _) in FORMATS.items() if need <= keys), None):
        return fmt
    raise BadSample("unknown_format", f"cannot tell the format from the keys {sorted(keys)}: "
                    "expected input_ids, messages, conversations, instruction/output, "
                    "prompt/completion, document or text; or set format:")


def _content(m: dict, j: int) -> str:
    c = m.get("content")
    if c is None and any(m.get(k) for k in ("tool_calls", *REASONING_KEYS)):
        return ""  # a turn of tool calls or of reasoning alone
    if isinstance(c, list):  # OpenAI content parts; text parts are joined by newlines
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in c):
            raise BadSample("wrong_type", f"messages[{j}].content: only parts of type text are supported")
        return "\n".join(p["text"] for p in c)
    if not isinstance(c, str):
        raise BadSample("wrong_type", f"messages[{j}].content must be a string or a list of text "
                        f"parts, got {type(c).__name__}")
    return c


def normalize(messages) -> list[dict]:
    """Checks roles and types; returns template-ready copies: content a string, None-valued keys
    (Arrow's filler for absent fields) removed, `train: false` kept for the masking."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise BadSample("wrong_type", "messages must be a list of objects")
    if not messages:
        raise BadSample("empty_conversation", "the conversation is empty")
    out = []
    for j, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise BadSample("unknown_role", f"messages[{j}] has role {m.get('role')!r}; "
                            f"expected one of {', '.join(ROLES)}")
        m = {k: v for k, v in m.items() if v is not None} | {"content": _content(m, j)}
        reasoning = next((m[k] for k in REASONING_KEYS if k in m), None)
        if reasoning is not None:  # both names templates read, as apply_chat_template passes it
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        for key, tp in (("tool_calls", list), ("reasoning_content", str), ("train", bool)):
            if key in m and not isinstance(m[key], tp):
                raise BadSample("wrong_type", f"messages[{j}].{key} must be a {tp.__name__}")
        if not all(isinstance(c, dict) for c in m.get("tool_calls", [])):
            raise BadSample("wrong_type", f"messages[{j}].tool_calls must be a list of objects")
        out.append(m)
    if not any(m["role"] == "assistant" and m.get("train", True) for m in out):
        raise BadSample("no_assistant_turn", "no assistant message to train; add one or remove the sample")
    return out


# ---- masks for any chat template ----

_FOOTERS: dict[str, str] = {}  # chat template -> its text after the last message only (Phi's EOS)


def _render(tokenizer, messages, tools, generation_prompt=False) -> str:
    """apply_chat_template(messages, tokenize=False) of `normalize`d messages, from the compiled
    (cached) template, without re-checking and copying them on each of a conversation's renders."""
    from transformers.utils.chat_template_utils import _compile_jinja_template
    try:
        return _compile_jinja_template(tokenizer.chat_template).render(
            messages=[{k: v for k, v in m.items() if k != "train"} for m in messages], tools=tools,
            documents=None, add_generation_prompt=generation_prompt, **tokenizer.special_tokens_map)
    except Exception as e:  # jinja's TemplateError, or any error the template's own code raises
        raise BadSample("template_error", f"the chat template raised: {e}") from None


def _footer(tokenizer) -> str:
    """Text a template writes after a finished chat's last message, not before a generation prompt
    (Phi-3.5: its EOS): it follows no turn at inference, so no answer holds it. Probed after a user
    turn: some templates end a last assistant turn otherwise (gpt-oss: <|return|>, not <|end|>)."""
    if tokenizer.chat_template not in _FOOTERS:
        probe = [{"role": "user", "content": "1"}]
        try:
            done, more = _render(tokenizer, probe, None), _render(tokenizer, probe, None, True)
        except BadSample:
            done = more = ""
        k = len(os.path.commonprefix([done, more]))
        enc = tokenizer(done, add_special_tokens=False, return_offsets_mapping=True)
        starts = [a for a, b in enc["offset_mapping"] if b > k]  # back off to a token boundary
        _FOOTERS[tokenizer.chat_template] = done[starts[0]:] if starts else ""
    return _FOOTERS[tokenizer.chat_template]


def _finished(tokenizer, messages, tools) -> str:
    """The conversation rendered as finished, without the template's end-of-conversation footer."""
    text, footer = _render(tokenizer, messages, tools), _footer(tokenizer)
    return text[:-len(footer)] if footer and text.endswith(footer) else text


def _turn(tokenizer, messages, i, tools) -> tuple[str, str]:
    """(prompt, answer) of assistant turn i as inference sees it. The prompt: the history and the
    generation prompt. The answer: what the template then writes for this turn when last (content,
    reasoning, tool calls, end-of-turn tokens), less trailing whitespace, which is not generated."""
    prompt = _render(tokenizer, messages[:i], tools, True)
    done = _finished(tokenizer, messages[:i + 1], tools)
    if done.startswith(prompt):
        return prompt, done[len(prompt):].rstrip()
    # The template rewrites the history when an assistant turn is last (Mistral moves the system
    # text into the last user turn, or drops it): the answer is the same without the system text.
    kept = [m for m in messages[:i + 1] if m["role"] != "system"]
    if len(kept) <= i:
        p, d = _render(tokenizer, kept[:-1], tools, True), _finished(tokenizer, kept, tools)
        if d.startswith(p):
            return prompt, d[len(p):].rstrip()
    # DeepSeek-R1's generation prompt opens "<think>\n", which a finished turn never renders: the
    # answer is the finished turn after what it shares with the generation prompt.
    history = _render(tokenizer, messages[:i], tools)
    if done.startswith(history) and prompt.startswith(history):
        header, rendered = prompt[len(history):], done[len(history):]
        return prompt, rendered[len(os.path.commonprefix([header, rendered])):].rstrip()
    raise BadSample("template_error", f"messages[{i}]: the chat template renders this turn's "
                    "history differently from its generation prompt; the answer cannot be located")


def _visible(text: str, haystack: str) -> bool:
    text = text.strip()
    return not text or text in haystack or json.dumps(text, ensure_ascii=False)[1:-1] in haystack


def _check_nothing_lost(messages, last: int, text: str, answers: dict[int, str]):
    """Every message up to `last` must be in the sample's text, and each trained turn's reasoning in
    its answer; else the template dropped it and the turn would be trained without it."""
    for j, m in enumerate(messages[:last + 1]):
        content = m["content"].split("</think>")[-1] if m["role"] == "assistant" else m["content"]
        calls = [c["function"].get("name", "") for c in m.get("tool_calls", []) if isinstance(c.get("function"), dict)]
        if not all(_visible(x, answers.get(j, text)) for x in calls) or not _visible(content, text):
            raise BadSample("template_drops_message", f"messages[{j}] ({m['role']}) is not in "
                            "the rendered text: the chat template leaves it (or its tool call) "
                            "out; it would be lost")
        if j in answers:
            inline = m["content"].split("</think>")[0].replace("<think>", "") if "</think>" in m["content"] else ""
            if not _visible(m.get("reasoning_content", inline), answers[j]):
                raise BadSample("template_drops_message", f"messages[{j}]: the chat template "
                                "does not render its reasoning in the answer; it would be lost")


def _unmasked(context: str, messages: list[dict]) -> list[tuple[str, bool]]:
    """`context` as pieces, each message's content trained, as InstructLab's `unmask: true` trains
    user and tool turns: the tokens between the markers it wraps each content in, not role headers
    or end-of-turn tokens (data_process.py, unmask_messages, instructlab/training fa5b53b)."""
    pieces, at = [], 0
    for m in messages:
        content = m["content"].strip()
        k = context.find(content, at)
        if not content:
            continue
        if k < 0:
            raise BadSample("template_drops_message", f"a {m['role']} message is not in the "
                            "rendered text as written, so unmask: true cannot train it")
        pieces += [(context[at:k], False), (content, True)]
        at = k + len(content)
    return pieces + [(context[at:], False)]


def conversation_pieces(messages: list[dict], tokenizer, tools=None, unmask: bool = False
                        ) -> list[list[tuple[str, bool]]]:
    """The masking rule: each trained assistant turn is trained once, on its inference view
    (`_turn`). A sample holds the last trained turn's view and, in place, each earlier turn whose
    view is a prefix of it; a turn rendered differently once later turns follow (stripped reasoning,
    a moved system text, another end token) starts its own sample. Returns samples as lists of
    (text, trained) pieces, without messages after the last trained turn. `unmask`: each user and
    tool message's content is trained too, once, in the next trained turn's sample."""
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("train", True)]
    own = {i: [m for m in messages[before + 1:i] if m["role"] in ("user", "tool")]
           for before, i in zip([-1] + trained, trained)} if unmask else {}
    views = [(i, *_turn(tokenizer, messages, i, tools)) for i in trained]
    samples = []
    while views:
        chosen = [views.pop()]
        text = chosen[0][1] + chosen[0][2]
        for j in range(len(views) - 1, -1, -1):
            _, prompt, answer = views[j]
            if text.startswith(prompt + answer) and len(prompt + answer) <= len(chosen[-1][1]):
                chosen.append(views.pop(j))
        chosen.reverse()
        _check_nothing_lost(messages, chosen[-1][0], text, {i: answer for i, _, answer in chosen})
        pieces, done = [], 0
        for i, prompt, answer in chosen:
            if not answer:
                raise BadSample("template_error", "the chat template renders an empty assistant turn")
            pieces += _unmasked(prompt[done:], own[i]) if unmask else [(prompt[done:], False)]
            pieces.append((answer, True))
            done = len(prompt) + len(answer)
        samples.append([(t, trained) for t, trained in pieces if t])
    return samples[::-1]


def _document(text: str, tokenizer, bos: bool) -> list[list[tuple[str, bool]]]:
    """A document, every token trained: its text and EOS, after a BOS where `bos`."""
    if not text.strip():
        raise BadSample("empty_conversation", "the document is empty")
    return [[(tokenizer.bos_token, True)] * bos + [(text, True), (tokenizer.eos_token, True)]]


def _pieces(record, tokenizer, fmt: str) -> list[list[tuple[str, bool]]]:
    if not isinstance(record, dict):
        raise BadSample("wrong_type", f"expected a JSON object, got {type(record).__name__}")
    if fmt == "text":
        return _document(_need(record, "text", str), tokenizer, False)
    # InstructLab's continual pretraining (data_process.py, process_documents_for_pretraining)
    if fmt == "document":
        return _document(_need(record, "document", str), tokenizer, _adds_bos(tokenizer))
    tools = record.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise BadSample("wrong_type", '"tools" must be a list of tool definitions')
    messages = FORMATS[fmt][0](record)
    roles = [m.get("role") for m in messages if isinstance(m, dict)]
    if "pretrain" in roles:  # mini_trainer's (process_data.py): its content and EOS, all trained
        if len(messages) != 1 or not isinstance(messages[0].get("content"), str):
            raise BadSample("wrong_type", 'a "pretrain" message must be the only one, with a string content')
        return _document(messages[0]["content"], tokenizer, False)
    # InstructLab trains every role but system in a record with a truthy `unmask` (unmask_sample)
    # or that had a "pretraining" message (ensure_dataset_is_compatible_with_legacy_format)
    unmask = bool(record.get("unmask")) or "pretraining" in roles
    return conversation_pieces(normalize(_from_pretraining(messages)), tokenizer, tools, unmask)


@functools.cache  # per tokenizer object, which the cache keeps alive (a run has one or two)
def _adds_bos(tokenizer) -> bool:
    """Whether encoding with special tokens starts with BOS."""
    return tokenizer.bos_token is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]


def _pretokenized(record, vocab: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(input_ids, loss_mask, is a document) of a pre-tokenized record, exactly as given: labels
    aligned with input_ids (-100: not trained, else the input id), as InstructLab's and
    mini_trainer's processed data hold them; without labels, a document, every token trained."""
    if not isinstance(record, dict):
        raise BadSample("wrong_type", f"expected a JSON object, got {type(record).__name__}")
    ids = np.asarray(_need(record, "input_ids", list))
    if ids.ndim != 1 or not len(ids) or ids.dtype.kind not in "iu":
        raise BadSample("wrong_type", '"input_ids" must be a non-empty list of integers')
    outside = np.flatnonzero((ids < 0) | (ids >= vocab))
    if len(outside):
        i = int(outside[0])
        raise BadSample("outside_vocabulary", f"input_ids[{i}] = {ids[i]} is outside the tokenizer's "
                        f"vocabulary (0-{vocab - 1}); was it tokenized for another model?")
    if record.get("len") is not None and record["len"] != len(ids):
        raise BadSample("wrong_length", f'"len" is {record["len"]} but input_ids holds {len(ids)} tokens')
    if record.get("labels") is None:
        return ids, np.ones(len(ids), np.uint8), True
    labels = np.asarray(_need(record, "labels", list))
    if labels.shape != ids.shape or labels.dtype.kind not in "iu":
        raise BadSample("wrong_labels", f'"labels" must be {len(ids)} integers, one per input id')
    trained = labels != -100
    wrong = np.flatnonzero(trained & (labels != ids))
    if len(wrong):
        i, shifted = int(wrong[0]), trained[:-1] & (labels[:-1] == ids[1:])
        hint = ("the file holds next-token labels (labels[i] = input_ids[i + 1]); write them "
                "aligned, labels[i] = input_ids[i]" if shifted.sum() >= trained[:-1].sum()
                else "each label must be -100 or its input id")
        raise BadSample("wrong_labels", f"labels[{i}] = {labels[i]} is neither -100 nor "
                        f"input_ids[{i}] = {ids[i]}: {hint}")
    counted = record.get("num_loss_counted_tokens")
    if counted is not None and counted != trained.sum():
        raise BadSample("wrong_length", f'"num_loss_counted_tokens" is {counted} but the '
                        f"labels train {trained.sum()} tokens")
    return ids, trained.astype(np.uint8), False


def _encode(samples: list[list[tuple[str, bool]]], tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pieces -> (input_ids, loss_mask) of all samples end to end and their offsets (n + 1), from
    one batch call of the tokenizer (a fast one's own: no offsets, no per-text wrappers). Pieces are
    tokenized apart, so token boundaries are inference's (prompt tokenized, answer generated)."""
    texts = [text for s in samples for text, _ in s]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        pieces = tokenizer(texts, add_special_tokens=False)["input_ids"]
    else:
        pieces = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    n = np.array([len(p) for p in pieces], np.int64)
    ids = np.fromiter(itertools.chain.from_iterable(pieces), np.int32, int(n.sum()))
    mask = np.repeat(np.array([trained for s in samples for _, trained in s], np.uint8), n)
    piece_offsets = np.concatenate([[0], np.cumsum(n)])
    return ids, mask, piece_offsets[np.concatenate([[0], np.cumsum([len(s) for s in samples])])]


def tokenize_sample(sample: dict, tokenizer) -> dict | list[dict]:
    """One record (any format in FORMATS) -> {"input_ids": [...], "labels": [...]}, labels aligned
    with input_ids (not shifted), -100 where not trained; a list of them when the masking rule makes
    several samples of one conversation. Raises BadSample."""
    fmt = detect_format(sample)
    if fmt == "tokens":  # already tokenized: checked, as given
        ids, mask, _ = _pretokenized(sample, len(tokenizer))
        offsets = [0, len(ids)]
    else:
        ids, mask, offsets = _encode(_pieces(sample, tokenizer, fmt), tokenizer)
    labels = np.where(mask.view(bool), ids, -100)
    out = [{"input_ids": ids[a:b].tolist(), "labels": labels[a:b].tolist()} for a, b in zip(offsets, offsets[1:])]
    return out[0] if len(out) == 1 else out


# ---- sources -> token cache ----

def sources(entries: list) -> list[Source]:
    """data.train_files / eval_files entries as Sources (a bare path is a Source of weight 1)."""
    return [e if isinstance(e, Source) else Source(path=e) for e in entries]


def is_hub_id(path: str) -> bool:
    """Whether a path that does not exist here reads as a Hugging Face Hub id (owner/name)."""
    return (not Path(path).exists() and path.count("/") == 1
            and not path.startswith((".", "/", "~")) and Path(path).suffix not in FILE_TYPES)


def check_paths(entries: list, key: str) -> list[str]:
    """Problems with `key`'s sources seen before reading them: local paths that do not exist."""
    return [f"{key}: {src.path} does not exist (and is not a hub dataset id, owner/name)"
            for src in sources(entries) if not Path(src.path).exists() and not is_hub_id(src.path)]


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in FILE_TYPES and p.is_file())
    if not files:
        raise DataError(f"{path}: no .jsonl, .json or .parquet files in this directory")
    return files


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists())


def _is_json_lines(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return path.suffix == ".jsonl" or not head.startswith(b"[")


def _load(src: Source, tmp: Path):
    """-> (datasets.Dataset, line_based). JSON lines are read as lines (latin-1: every byte
    survives, a bad line is reported by number, not as a failed file); others as Arrow rows."""
    import datasets
    path, cache = Path(src.path), str(tmp / "hf")
    try:
        if _is_saved_dataset(path):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict) and "train" not in ds:
                raise DataError(f"{path}: a DatasetDict without a 'train' split ({', '.join(ds)})")
            return (ds["train"] if isinstance(ds, datasets.DatasetDict) else ds), False
        if not path.exists():
            if not is_hub_id(src.path):
                raise DataError(f"{src.path}: no such file or directory")
            print(f"{src.path}: not a local path; loading it from the Hugging Face Hub", flush=True)
            return datasets.load_dataset(src.path, split="train", cache_dir=cache), False
        files = _files(path)
        kinds = {"jsonl" if f.suffix != ".parquet" and _is_json_lines(f) else FILE_TYPES[f.suffix] for f in files}
        if len(kinds) > 1:
            raise DataError(f"{path}: mixes {' and '.join(sorted(kinds))} files; list them "
                            "as separate sources")
        kind, paths = kinds.pop(), [str(f) for f in files]
        if kind == "jsonl":
            return datasets.load_dataset("text", data_files=paths, split="train",
                                         encoding="latin-1", cache_dir=cache), True
        return datasets.load_dataset(kind, data_files=paths, split="train", cache_dir=cache), False
    except DataError:
        raise
    except Exception as e:  # pyarrow or datasets cannot read it: name the file, keep their reason
        raise DataError(f"{src.path}: cannot be read ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from None


def _parse(raw, line_based: bool):
    if not line_based:
        return raw
    try:
        text = raw.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSample("invalid_utf8", f"not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadSample("invalid_json", f"not valid JSON ({e.msg} at column {e.colno})") from None


def _map_batch(batch: dict, indices: list[int], tokenizer, fmt: str, line_based: bool, eot: int, max_len: int):
    """datasets.map function: records -> an Arrow table from flat arrays of the whole batch, a row
    per sample (a bad record's has no tokens and its reason; each names the record keys the format
    does not read). Documents longer than `max_len` become blocks (`_blocks`)."""
    import pyarrow as pa
    keys, used = list(batch), FORMATS[fmt][1] | FORMATS[fmt][2]  # the record keys the format reads
    rows, reasons, messages, samples, unused, tokens = [], [], [], [], [], []
    for n, values in zip(indices, zip(*batch.values())):
        raw = values[0] if line_based else dict(zip(keys, values))
        if line_based and not raw.strip():
            continue  # a blank line is no sample
        reason = message = keys_unused = ""
        try:
            record = _parse(raw, line_based)
            if fmt == "tokens":
                tokens.append(_pretokenized(record, len(tokenizer)))
                pieces = [[]]
            else:
                pieces = _pieces(record, tokenizer, fmt)
        except BadSample as e:
            pieces, reason, message = [[]], e.reason, str(e)
            tokens += [(np.zeros(0, np.int64), np.zeros(0, np.uint8), False)] * (fmt == "tokens")
        else:  # Arrow rows hold every column, None where a record has no such key
            keys_unused = ",".join(sorted(k for k, v in record.items() if v is not None and k not in used))
        for col, v in ((rows, n), (reasons, reason), (messages, message), (unused, keys_unused)):
            col.extend([v] * len(pieces))
        samples += pieces
    if fmt == "tokens":
        lengths = [len(t[0]) for t in tokens]
        ids = np.concatenate([t[0] for t in tokens] or [np.zeros(0)]).astype(np.int32)
        mask = np.concatenate([t[1] for t in tokens] or [np.zeros(0)]).astype(np.uint8)
        offsets, documents = np.concatenate([[0], np.cumsum(lengths)]), [t[2] for t in tokens]
    else:
        ids, mask, offsets = _encode(samples, tokenizer)
        documents = [all(trained for _, trained in s) for s in samples]
    ids, mask, offsets, rows, reasons, messages, unused = _blocks(
        ids, mask, offsets, documents, max_len, rows, reasons, messages, unused)
    offsets = offsets.astype(np.int32)
    eots = np.concatenate([[0], np.cumsum((ids == eot) & mask.view(bool))])
    return pa.table({"input_ids": pa.ListArray.from_arrays(offsets, ids),
                     "loss_mask": pa.ListArray.from_arrays(offsets, mask),
                     "row": pa.array(rows, pa.int64()), "reason": pa.array(reasons, pa.string()),
                     "message": pa.array(messages, pa.string()),
                     "trains_eot": pa.array(eots[offsets[1:]] > eots[offsets[:-1]]),
                     "unused": pa.array(unused, pa.string())})


def _blocks(ids, mask, offsets, documents, max_len, *per_sample):
    """Documents (every token trained) longer than `max_len` -> blocks of at most `max_len` tokens,
    each a sample (attending within itself) overlapping the one before by a token, its context only:
    each document token is a target once. InstructLab's blocks, cut from all documents joined, cross
    their boundaries (sampler.py, PretrainingBlockDataset). `per_sample` lists follow the blocks."""
    lengths = np.diff(offsets)
    if not any(d and n > max_len for d, n in zip(documents, lengths)):
        return (ids, mask, offsets, *per_sample)
    spans, owner = [], []
    for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        split = documents[i] and b - a > max_len
        starts = range(a, b - 1, max_len - 1) if split else [a]
        spans += [(s, min(s + max_len, b)) for s in starts] if split else [(a, b)]
        owner += [i] * len(starts)
    index = np.concatenate([np.arange(s, e) for s, e in spans])
    context = np.concatenate([[s > offsets[i]] + [False] * (e - s - 1) for (s, e), i in zip(spans, owner)])
    new_offsets = np.concatenate([[0], np.cumsum([e - s for s, e in spans])])
    return (ids[index], np.where(context, 0, mask[index]).astype(np.uint8), new_offsets,
            *([values[i] for i in owner] for values in per_sample))


def _detect(ds, line_based: bool) -> str:
    """The format of the first record that has one (the map reports the bad records before it)."""
    problem = "it has no records"
    for i in range(min(len(ds), 1000)):
        raw = ds[i]["text"] if line_based else ds[i]
        if line_based and not raw.strip():
            continue
        try:
            return detect_format(_parse(raw, line_based))
        except BadSample as e:
            problem = str(e)
    raise DataError(f"cannot detect the format of the source ({problem})")


def _eot_token(tokenizer) -> tuple[int, str]:
    """The end-of-turn token: the last the template writes after a probe answer, else the EOS."""
    probe = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]
    try:
        text = _turn(tokenizer, probe, 1, None)[1].removeprefix("2").strip()
    except BadSample:
        text = ""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    token = ids[-1] if ids else tokenizer.eos_token_id
    return token, tokenizer.convert_ids_to_tokens(token)


def _hash_source(h, src: Source):
    h.update(f"{src.path}|{src.format}".encode())
    path = Path(src.path)
    if not path.exists():  # a hub id: its name (datasets keeps its own revision cache)
        return
    for f in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
        h.update(str(f).encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)


def _fingerprint(srcs: list[Source], tokenizer, cfg: DataConfig) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION} max_seq_len={cfg.max_seq_len} {cfg.on_bad_sample}".encode())
    for src in srcs:
        _hash_source(h, src)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend else json.dumps(tokenizer.get_vocab(), sort_keys=True)).encode())
    h.update(f"{tokenizer.chat_template}|{tokenizer.special_tokens_map}".encode())
    return h.hexdigest()[:16]


def build_cache(entries: list, tokenizer, cfg: DataConfig, key: str = "data.train_files") -> Path:
    """Tokenizes the sources (once) into the cache; returns its directory. `data.num_proc` processes
    map each source in batches to Arrow files, copied batch by batch into the flat arrays (bounded
    memory). Written to a temporary directory, then renamed: no half-written cache after a crash."""
    srcs = sources(entries)
    if not srcs:
        raise DataError(f"no input: set {key} to a list of data sources (paths or hub ids)")
    out = Path(cfg.cache_dir) / _fingerprint(srcs, tokenizer, cfg)
    if (out / "meta.json").exists():
        return out
    import datasets
    import pyarrow.compute as pc
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False  # no request per load (a 3 s timeout offline)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    eot, eot_text = _eot_token(tokenizer)
    mapped, meta_sources, names = [], [], []
    for s, src in enumerate(srcs):
        ds, line_based = _load(src, tmp)
        name = Path(src.path).stem if Path(src.path).exists() else src.path
        names.append(name if name not in names else f"{name}#{len(names)}")
        try:
            fmt = _detect(ds, line_based) if src.format == "auto" else src.format
        except DataError as e:
            raise DataError(f"{src.path}: {e}") from None
        m = ds.map(_map_batch, batched=True, with_indices=True, remove_columns=ds.column_names,
                   num_proc=min(cfg.num_proc, len(ds)) if cfg.num_proc > 1 else None,
                   fn_kwargs={"tokenizer": tokenizer, "fmt": fmt, "line_based": line_based,
                              "eot": eot, "max_len": cfg.max_seq_len},
                   cache_file_name=str(tmp / "hf" / f"mapped-{s}.arrow"),
                   new_fingerprint=f"{out.name}-{s}", features=datasets.Features({
                       "input_ids": datasets.List(datasets.Value("int32")),
                       "loss_mask": datasets.List(datasets.Value("uint8")),
                       "row": datasets.Value("int64"), "reason": datasets.Value("string"),
                       "message": datasets.Value("string"), "trains_eot": datasets.Value("bool"),
                       "unused": datasets.Value("string")}))
        table = m.data.table
        reasons = table["reason"].to_numpy(zero_copy_only=False)
        lengths = pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(reasons != "")
        if len(bad) and cfg.on_bad_sample == "error":
            i = int(bad[0])
            row = int(table["row"][i].as_py())
            where = f"{src.path}:{row + 1}" if line_based else f"{src.path}:row {row}"
            raise DataError(f"{where}: {table['message'][i].as_py()} (data.on_bad_sample: skip "
                            "counts and skips such samples)")
        ok = reasons == ""
        too_long = ok & (lengths > cfg.max_seq_len)
        mapped.append((table, ok & ~too_long, lengths))
        skipped = {str(r): int(n) for r, n in zip(*np.unique(reasons[bad], return_counts=True))}
        unused = {k for u in pc.unique(table["unused"]).to_pylist() if u for k in u.split(",")}
        meta_sources.append({"name": names[-1], "path": src.path, "format": fmt,
                             "records": len(np.unique(table["row"].to_numpy())), "skipped": skipped,
                             "longer_than_max_seq_len": int(too_long.sum()),
                             "samples": int(mapped[-1][1].sum()), "unused_keys": sorted(unused),
                             "trains_eot": int(pc.sum(table["trains_eot"]).as_py() or 0)})
    meta = _meta(meta_sources, *_write(tmp, mapped, cfg), key, eot_text)
    shutil.rmtree(tmp / "hf", ignore_errors=True)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        tmp.rename(out)
    except OSError:  # another process finished the same cache first; its result is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write(tmp: Path, mapped: list, cfg: DataConfig) -> tuple[np.ndarray, int]:
    """Writes the kept samples in order to the flat arrays; returns (lengths, trained tokens)."""
    lengths = np.concatenate([n[keep] for _, keep, n in mapped]).astype(np.int64)
    if not len(lengths):
        raise DataError("no sample left to train (all skipped or longer than "
                        f"data.max_seq_len={cfg.max_seq_len})")
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    trained = 0
    with _npy_file(tmp / "input_ids.npy", np.int32, int(offsets[-1])) as ids, \
            _npy_file(tmp / "loss_mask.npy", np.uint8, int(offsets[-1])) as mask:
        for table, keep, _ in mapped:
            start = 0
            for batch in table.to_batches(max_chunksize=4096):
                start += len(batch)
                batch = batch.filter(keep[start - len(batch):start])
                flat_ids = batch["input_ids"].flatten().to_numpy()
                flat_mask = batch["loss_mask"].flatten().to_numpy()
                ids.write(flat_ids.astype(np.int32, copy=False).tobytes())
                mask.write(flat_mask.astype(np.uint8, copy=False).tobytes())
                trained += int(flat_mask.sum())
    np.save(tmp / "offsets.npy", offsets)
    kept = [keep.sum() for _, keep, _ in mapped]
    np.save(tmp / "source.npy", np.repeat(np.arange(len(mapped), dtype=np.int32), kept))
    return lengths, trained


def _npy_file(path: Path, dtype, n: int):
    """An open .npy file of n values, its header written: the values are appended as they come
    (written, not memory-mapped, so they do not stay resident in this process)."""
    f = open(path, "wb")
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": (n,)})
    return f


def _meta(sources: list[dict], lengths: np.ndarray, trained: int, key: str, eot_text: str) -> dict:
    chats = [s for s in sources if s["format"] not in ("text", "document", "tokens")]
    if chats and not sum(s["trains_eot"] for s in chats):
        raise DataError(f"{key}: no sample trains the end-of-turn token {eot_text!r}, so the model "
                        "would never learn to stop; check the chat template (it must write an "
                        "end-of-turn token after each assistant message)")
    skipped = dict(sum((Counter(s["skipped"]) for s in sources), Counter()))
    dropped = sum(s["longer_than_max_seq_len"] for s in sources)
    percentiles = {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 95, 99, 100)}
    return {"sources": sources, "samples": len(lengths), "skipped": skipped,
            "dropped": {"longer_than_max_seq_len": dropped}, "tokens": int(lengths.sum()),
            "trained_tokens": trained, "end_of_turn": eot_text, "length_percentiles": percentiles}


class TokenCache:
    """Memory-mapped cache directory; `cache[i]` -> read-only (input_ids, loss_mask) numpy views."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.input_ids = np.load(self.path / "input_ids.npy", mmap_mode="r")
        self.loss_mask = np.load(self.path / "loss_mask.npy", mmap_mode="r")
        self.offsets = np.load(self.path / "offsets.npy")
        self.lengths = np.diff(self.offsets)
        self.source = np.load(self.path / "source.npy")  # (n,) index into meta["sources"]
        self.source_names = [s["name"] for s in self.meta["sources"]]

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[a:b], self.loss_mask[a:b]

    def by_source(self, epoch: np.ndarray) -> dict:
        """Each source's counts from meta.json and its samples in `epoch` (after the weights)."""
        per_epoch = np.bincount(self.source[epoch], None, len(self.source_names))
        kept = ("samples", "skipped", "longer_than_max_seq_len", "unused_keys")
        return {s["name"]: {k: s[k] for k in kept} | {"per_epoch": int(n)}
                for s, n in zip(self.meta["sources"], per_epoch)}


def summary(cache: TokenCache) -> str:
    m = cache.meta
    percentiles = " ".join(f"{k}={v}" for k, v in m["length_percentiles"].items())
    lines = [f"tokenized {len(m['sources'])} source(s): {m['samples']:,} samples, {m['tokens']:,} "
             f"tokens, {m['trained_tokens']:,} trained; lengths {percentiles}"]
    for s in m["sources"]:
        skipped, unused = sum(s["skipped"].values()), ", ".join(s["unused_keys"])
        reasons = ", ".join(f"{k}: {v}" for k, v in s["skipped"].items())
        lines.append(f"  {s['name']} ({s['format']}): {s['records']:,} records -> {s['samples']:,} "
                     f"samples; skipped {skipped}" + (f" ({reasons})" if skipped else "")
                     + f"; longer than max_seq_len {s['longer_than_max_seq_len']}"
                     + (f"; unused keys: {unused}" if s["unused_keys"] else ""))
    return "\n".join(lines + [f"cache: {cache.path}"])


def preview(cache: TokenCache, tokenizer, n: int, color: bool) -> str:
    """The first n samples as text, trained tokens in green (color) or in [[...]]."""
    out = []
    for i in range(min(n, len(cache))):
        ids, mask = cache[i]
        cuts, runs = [0, *(np.flatnonzero(np.diff(mask)) + 1), len(ids)], []  # trained or not
        for a, b in zip(cuts, cuts[1:]):
            text = tokenizer.decode(ids[a:b].tolist())
            runs.append((f"\033[32m{text}\033[0m" if color else f"[[{text}]]") if mask[a] else text)
        out.append(f"--- sample {i} ({cache.source_names[cache.source[i]]}, {len(ids)} tokens, "
                   f"{int(mask.sum())} trained) ---\n" + "".join(runs))
    return "\n".join(out)


def main(argv: list[str]):
    n_preview = 0
    if "--preview" in argv:
        i = argv.index("--preview")
        n_preview, argv = int(argv[i + 1]), argv[:i] + argv[i + 2:]
    cfg = config.cli(argv, ("data", "model"))
    try:
        tokenizer = load_tokenizer(cfg.model.path)
        for key in ("train_files", "eval_files") if cfg.data.eval_files else ("train_files",):
            cache = TokenCache(build_cache(getattr(cfg.data, key), tokenizer, cfg.data, f"data.{key}"))
            print(summary(cache))
            if n_preview and key == "train_files":
                print(preview(cache, tokenizer, n_preview, sys.stdout.isatty()))
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
