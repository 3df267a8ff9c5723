"""Builds the quickstart's shipped files, deterministically, from nothing but this script:

    python data/quickstart/make.py

- train.jsonl / heldout.jsonl: chats whose task is to reverse a list of distinct letters ("Reverse: k d m q"
  -> "q m d k"); no held-out prompt occurs in train.jsonl;
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


def chat(rng: random.Random, letters: list[str]) -> dict:
    messages = [{"role": "system", "content": s} for s in [rng.choice(SYSTEMS)] if s]
    return {"messages": messages + [{"role": "user", "content": "Reverse: " + " ".join(letters)},
                                    {"role": "assistant", "content": " ".join(reversed(letters))}]}


def main(n_train: int = 20000, n_heldout: int = 200):
    rng = random.Random(0)
    seen, rows = set(), []
    while len(rows) < n_train + n_heldout:
        letters = rng.sample(LETTERS, rng.randint(3, 6))
        if tuple(letters) not in seen:
            seen.add(tuple(letters))
            rows.append(chat(rng, letters))
    for name, part in (("train", rows[:n_train]), ("heldout", rows[n_train:])):
        (HERE / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [m["content"] for r in rows[:n_train] for m in r["messages"]] + ["user", "assistant", "system"]
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
