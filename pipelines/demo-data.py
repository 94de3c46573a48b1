#!/usr/bin/env python3
"""demo-data.py - the default model's text: training chunks, held-out sample, story cloze.

    demo-data.py train  MAXCHARS TEXT...   > train.jsonl
    demo-data.py sample  N TEXT [SKIP]     > sample.jsonl
    demo-data.py cloze   N SEED SKIP TEXT  > cloze.jsonl

Standard library only.  TinyStories files are paragraphs separated by blank
lines (V2: also
<|endoftext|> lines).  train: paragraphs packed into {"text"} records of at most MAXCHARS
characters (a longer paragraph is a record alone; moe-tune cuts it at
--max-length tokens).  sample: the first N paragraphs of at least 200
characters (after the first SKIP of them), as {"text"}.  cloze: story cloze from the paragraphs of at least
200 characters after the first SKIP (so disjoint from a sample of SKIP), those
of at least 4 sentences whose last sentence has 20 to 160 characters: the
query is the paragraph up to its last sentence, the choices the true last
sentence and the last sentences of 3 other paragraphs, of about the same
length (within an eighth), drawn with random.Random(SEED), in MosaicML's
{"query","choices","gold"} shape, the gold position drawn too.
"""
import json
import random
import re
import sys

SENTENCE_END = re.compile(r'(?:(?<=[.!?])|(?<=[.!?]["\']))\s+(?=[A-Z"])')


def paragraphs(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"^<\|endoftext\|>$", "", text, flags=re.M)  # V2's story separator
    for p in re.split(r"\n\s*\n", text):
        p = " ".join(p.split())
        if p:
            yield p


def emit(obj):
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")


def train(maxchars, paths):
    chunk = ""
    for path in paths:
        for p in paragraphs(path):
            if chunk and len(chunk) + 1 + len(p) > maxchars:
                emit({"text": chunk})
                chunk = ""
            chunk = p if not chunk else chunk + "\n" + p
    if chunk:
        emit({"text": chunk})


def long_paragraphs(path):
    return [p for p in paragraphs(path) if len(p) >= 200]


def cloze(n, seed, skip, path):
    rest = long_paragraphs(path)[skip:]
    stories = []
    for p in rest:
        s = SENTENCE_END.split(p)
        if len(s) >= 4 and 20 <= len(s[-1]) <= 160:
            stories.append(s)
    rng = random.Random(seed)
    made = 0
    for i, s in enumerate(stories):
        if made == n:
            break
        # distractors of about the gold sentence's length (within 1/8 of it, at least
        # 4 characters): else a model that merely prefers short sentences scores
        # above chance, and one that reads the story is not told apart from it
        length = len(s[-1])
        near = [j for j in range(len(stories))
                if j != i and abs(len(stories[j][-1]) - length) <= max(4, length // 8)]
        if len(near) < 3:
            continue
        wrong = [stories[j][-1] for j in rng.sample(near, 3)]
        gold = rng.randrange(4)
        choices = wrong[:gold] + [s[-1]] + wrong[gold:]
        emit({"query": " ".join(s[:-1]), "choices": choices, "gold": gold})
        made += 1


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__.split("\n\n")[1])
    mode = sys.argv[1]
    if mode == "train":
        train(int(sys.argv[2]), sys.argv[3:])
    elif mode == "sample":
        skip = int(sys.argv[4]) if len(sys.argv) > 4 else 0
        for p in long_paragraphs(sys.argv[3])[skip:skip + int(sys.argv[2])]:
            emit({"text": p})
    elif mode == "cloze":
        cloze(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        sys.exit(f"demo-data.py: unknown mode {mode}")


if __name__ == "__main__":
    main()
