#!/usr/bin/env python3
"""train-tokenizer.py - the default model's tokenizer: a small byte-level BPE.

    train-tokenizer.py --vocab N -o tokenizer.json TEXT...

Trained with Hugging Face `tokenizers` (a reference tool; the product only
reads the tokenizer.json it writes, with lib/tokenizer) on plain text files.
GPT-2's pipeline: the ByteLevel pre-tokenizer with its split regex, so any
byte sequence is encodable; the 256 byte symbols come first, then the merges,
then <|begin_of_text|> and <|end_of_text|> (BOS / EOS); the post-processor
prepends BOS.  TinyStories V2's "<|endoftext|>" separator lines are left out.  Deterministic: the
trainer is single-threaded here (RAYON_NUM_THREADS=1) and its ties are broken
by the pair's order, so the same text gives the same file.
"""
import argparse
import os
import sys

os.environ.setdefault("RAYON_NUM_THREADS", "1")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def lines(paths):
    """The files' lines, without TinyStories V2's <|endoftext|> separator lines."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip() != "<|endoftext|>":
                    yield line


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=1024, help="total ids, specials included")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("text", nargs="+")
    a = ap.parse_args()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=a.vocab - 2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines(a.text), trainer)
    tok.add_special_tokens([BOS, EOS])
    # every sequence starts with BOS, as the models this toolkit condenses do
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    if tok.get_vocab_size() != a.vocab:
        sys.exit(f"train-tokenizer.py: got {tok.get_vocab_size()} ids, not {a.vocab}")
    tmp = a.output + ".tmp"
    tok.save(tmp, pretty=False)
    os.replace(tmp, a.output)


if __name__ == "__main__":
    main()
