"""Cut the real-text sample shipped under tests/data/ from the stand-in shards (../shared/data).

The first DOCS documents of each stand-in shard (the same documents in both vocabularies: the
stand-ins hold them in one order), cut on the BOS that starts document DOCS, written in the real
shard format, plus both real tokenizers. The sample itself is committed: this records how it was
made and rebuilds it where ../shared/data exists.

    python3 tests/tools/make_sample_data.py [--src ../shared/data] [--out tests/data]
"""

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

DOCS = {"train": 60, "val": 60}
BOS = 1


def first_documents(tokens: np.ndarray, n: int) -> np.ndarray:
    """The stream up to the BOS that opens document n (documents are [BOS] + tokens)."""
    starts = np.flatnonzero(tokens == BOS)
    if starts.size == 0 or starts[0] != 0 or starts.size <= n:
        raise SystemExit(f"error: a stream of {starts.size} documents (need more than {n}, starting with BOS)")
    return tokens[:starts[n]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(ROOT / "tests" / "data"))
    a = ap.parse_args(argv)
    src, out = Path(a.src), Path(a.out)
    for vocab in (1024, 8192):
        (out / f"sp{vocab}").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "tokenizers" / f"fineweb_{vocab}_bpe.model", out / f"fineweb_{vocab}_bpe.model")
        for split, n in DOCS.items():
            name = f"fineweb_{split}_000000.bin"
            cut = first_documents(np.asarray(tg.read_shard(str(src / f"standin_sp{vocab}" / name))), n)
            tg.write_shard(str(out / f"sp{vocab}" / name), cut)
            print(f"sp{vocab}/{name}: {n} documents, {cut.size} tokens")
    # PREFLIGHT=plan's document lengths (train_gpt.PLAN_LENGTHS_NAME): the whole stand-in train shard's,
    # a FineWeb-like distribution the 60-document cut is too small to give (no token ships, only lengths)
    train = np.asarray(tg.read_shard(str(src / "standin_sp8192" / "fineweb_train_000000.bin")))
    lengths = tg.document_spans(train, 1)[:, 1].astype(np.uint32)
    np.save(out / "sp8192" / tg.PLAN_LENGTHS_NAME, lengths)
    print(f"sp8192/{tg.PLAN_LENGTHS_NAME}: {len(lengths)} document lengths, {int(lengths.sum())} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
