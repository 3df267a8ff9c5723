"""Builds the quickstart's shipped files, deterministically, from nothing but this script:

    python data/quickstart/make.py

- train.jsonl / heldout.jsonl: chats whose task is to count through the alphabet ("Count from c to h."
  -> "c d e f g h"); the held-out (start, end) pairs never occur in train.jsonl, so exact match on them needs
  the rule (successor letter, stop at the end letter), not memory;
- model/: a byte-level BPE tokenizer trained on that text, with a ChatML chat template, and a tiny Llama config
  (random init at train time).
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
LETTERS = "abcdefghijklmnopqrstuvwxyz"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SYSTEMS = ["", "You are a helpful assistant.", "Answer with the letters only."]


def chat(rng: random.Random, a: int, b: int) -> dict:
    messages = [{"role": "system", "content": s} for s in [rng.choice(SYSTEMS)] if s]
    return {"messages": messages + [{"role": "user", "content": f"Count from {LETTERS[a]} to {LETTERS[b]}."},
                                    {"role": "assistant", "content": " ".join(LETTERS[a:b + 1])}]}


def main(n_train: int = 20000, n_heldout: int = 200):
    rng = random.Random(0)
    pairs = [(a, b) for a in range(26) for b in range(a + 1, min(a + 13, 26))]
    rng.shuffle(pairs)
    held, train = [], list(pairs)
    for a, b in pairs:  # hold out ~10%, keeping every start and end letter in training
        if len(held) < len(pairs) // 10 and sum(p[0] == a for p in train) > 2 and sum(p[1] == b for p in train) > 2:
            held.append((a, b))
            train.remove((a, b))
    rows = {"train": [chat(rng, *rng.choice(train)) for _ in range(n_train)],
            "heldout": [chat(rng, *rng.choice(held)) for _ in range(n_heldout)]}
    for name, part in rows.items():
        (HERE / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [m["content"] for r in rows["train"] for m in r["messages"]] + ["user", "assistant", "system"]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, chat_template=CHATML)
    fast.save_pretrained(HERE / "model")
    LlamaConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                bos_token_id=None, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                ).save_pretrained(HERE / "model")


if __name__ == "__main__":
    main()
