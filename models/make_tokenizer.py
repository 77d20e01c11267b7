"""Writes the generated tokenizer shipped in each model folder (no hub access on the GPU machine).

A byte-level BPE trained on a small synthetic English corpus; any text round-trips. The model
configs keep their public vocab sizes (larger than this tokenizer), which vLLM accepts.
Run: python3 models/make_tokenizer.py
"""

import json
import os
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = ("the of and to in is was that for on with as by at from it an be this are or which his "
         "her they we you he she not but have had has one all were when there can more will an "
         "memory page block cache token request model attention kernel virtual physical address "
         "server client stream batch prefill decode sequence length layer head value key query "
         "hello world question answer story time day year people way water long little very").split()


def corpus(n=20000, seed=0):
    rng = random.Random(seed)
    for _ in range(n):
        yield " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) + rng.choice([".", "?", "!"])


def main():
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "model_max_length": 131072, "clean_up_tokenization_spaces": False,
        "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}",
    }
    for name in sorted(os.listdir(HERE)):
        folder = os.path.join(HERE, name)
        if os.path.isfile(os.path.join(folder, "config.json")):
            tok.save(os.path.join(folder, "tokenizer.json"))
            with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
                json.dump(cfg, f, indent=1)
            print("wrote", folder)


if __name__ == "__main__":
    main()
