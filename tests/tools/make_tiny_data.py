"""Make a tiny dataset in the challenge's format: a SentencePiece BPE tokenizer trained on
synthetic English-like text, and train/val shards (256 x int32 header, uint16 tokens, each
document written as [BOS] + tokens, as the real export does).

    python3 tests/tools/make_tiny_data.py OUT_DIR [--vocab 512] [--train-docs 3000] [--val-docs 300]

Writes OUT_DIR/tokenizer.model, OUT_DIR/fineweb_train_00000{0,1}.bin, OUT_DIR/fineweb_val_000000.bin.
Deterministic for a given seed. Used by the tests and the README's CPU quick start.
"""

import argparse
import os
import random
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import train_gpt  # noqa: E402

WORDS = ("the of and to in is was that for it with as his on be at by had are but from or have an they "
         "which one you were her all she there would their we him been has when who will more no if out so "
         "said what up its about into than them can only other new some could time these two may then do "
         "first any my now such like our over man me even most made after also did many before must through "
         "back years where much your way well down should because each just those people how too little "
         "state good very make world still own see men work long get here between both life being under "
         "never day same another know while last might us great old year off come since against go came "
         "right used take three river garden music number paper school water").split()
EXTRAS = ("Prices rose 12.5% in 2024.", "Café naïve — “quoted” text.", "東京 and Zürich.", "Emoji 🙂 test.")


def make_docs(n: int, rng: random.Random) -> list[str]:
    """Documents with some structure to learn: a topic word repeats, sentences follow a pattern."""
    docs = []
    for _ in range(n):
        topic = rng.choice(WORDS)
        sents = []
        for _ in range(rng.randint(2, 8)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
            words.insert(rng.randrange(len(words)), topic)
            sents.append(" ".join(words).capitalize() + ".")
        if rng.random() < 0.2:
            sents.append(rng.choice(EXTRAS))
        docs.append(" ".join(sents))
    return docs


def train_tokenizer(docs: list[str], prefix: str, vocab: int):
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_prefix=prefix, vocab_size=vocab, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
        character_coverage=0.999, pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=prefix + ".model")


def encode_docs(sp, docs: list[str]) -> np.ndarray:
    out = []
    for d in docs:
        out.append(1)
        out.extend(sp.encode(d))
    return np.asarray(out, dtype=np.uint16)


def make_dataset(out: str, vocab: int = 512, train_docs: int = 3000, val_docs: int = 300, seed: int = 0) -> str:
    os.makedirs(out, exist_ok=True)
    rng = random.Random(seed)
    train, val = make_docs(train_docs, rng), make_docs(val_docs, rng)
    sp = train_tokenizer(train, os.path.join(out, "tokenizer"), vocab)
    tokens = encode_docs(sp, train)
    half = len(tokens) // 2
    train_gpt.write_shard(os.path.join(out, "fineweb_train_000000.bin"), tokens[:half])
    train_gpt.write_shard(os.path.join(out, "fineweb_train_000001.bin"), tokens[half:])
    train_gpt.write_shard(os.path.join(out, "fineweb_val_000000.bin"), encode_docs(sp, val))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--train-docs", type=int, default=3000)
    ap.add_argument("--val-docs", type=int, default=300)
    a = ap.parse_args()
    make_dataset(a.out, a.vocab, a.train_docs, a.val_docs)
    print(f"wrote {a.out}")
