"""CaseOps shards from raw documents (frontier spec 1.2): the lossless case transform and its inverse,
[BOS] + encode(transform(text)) per document, and the validation byte sidecar counted by walking
the encoded pieces' surfaces (each doc's sidecar sum == len(text.encode('utf-8'))).

    python3 tests/tools/caseops_data.py --docs DOCS.jsonl --tokenizer MODEL --out DIR [--val-docs 50000]

DOCS.jsonl: one {"text": ...} per line; the first --val-docs documents are validation. Writes
DIR/fineweb_val_000000.bin, DIR/fineweb_val_bytes_000000.bin and DIR/fineweb_train_000000.bin.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import train_gpt  # noqa: E402

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
CONTROLS = (TITLE, ALLCAPS, CAPNEXT, ESC)
BOS = 1


def _is_letter(c: str) -> bool:
    return ("a" <= c <= "z") or ("A" <= c <= "Z")


def _run(run: str) -> str:
    if run.islower():
        return run
    if len(run) >= 2 and run.isupper():
        return ALLCAPS + run.lower()
    out = [TITLE] if run[0].isupper() else []
    out.append(run[0].lower())
    for c in run[1:]:
        out.append(CAPNEXT + c.lower() if c.isupper() else c)
    return "".join(out)


def transform(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if _is_letter(c):
            j = i
            while j < len(text) and _is_letter(text[j]):
                j += 1
            out.append(_run(text[i:j]))
            i = j
            continue
        out.append(ESC + c if c in CONTROLS else c)
        i += 1
    return "".join(out)


def inverse(text: str) -> str:
    """The decoder state machine; ValueError on a malformed marker placement."""
    out, i, mode = [], 0, None  # mode: None, "title" (next letter upper), "all" (run upper)
    while i < len(text):
        c = text[i]
        if c == ESC:
            if i + 1 >= len(text):
                raise ValueError("ESC at the end of the text")
            out.append(text[i + 1])
            i, mode = i + 2, None
            continue
        if c in (TITLE, ALLCAPS, CAPNEXT):
            if i + 1 >= len(text) or not ("a" <= text[i + 1] <= "z"):
                raise ValueError(f"marker U+{ord(c):04X} not followed by a lowercase ASCII letter at {i}")
            if c == ALLCAPS:
                j = i + 1
                while j < len(text) and _is_letter(text[j]):
                    j += 1
                out.append(text[i + 1:j].upper())
                i = j
            else:
                out.append(text[i + 1].upper())
                i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def encode_with_bytes(sp, text: str) -> tuple[list[int], list[int]]:
    """(ids, bytes per id) of transform(text), walking each piece's surface (the exact input
    substring, from the proto encoding; needs the `protobuf` package): TITLE/ALLCAPS/CAPNEXT and ESC
    count 0, an escaped character and any other character its UTF-8 length. The tokenizer's
    normalizer collapses whitespace, so decode(ids) is not the text; the surfaces are. Checked:
    inverse(surfaces) == text and the sum is len(text.encode('utf-8')), else ValueError."""
    t = transform(text)
    pieces = sp.encode(t, out_type="proto").pieces
    # the whitespace the normalizer dropped (a leading or trailing run) goes to the next/last piece
    # (offsets are UTF-8 byte offsets; a character split into byte pieces counts on its last one)
    tb = t.encode("utf-8")
    cuts = [0] + [p.end for p in pieces[:-1]] + [len(tb)]
    surfaces = [tb[cuts[k]:cuts[k + 1]].decode("utf-8") for k in range(len(pieces))]
    counts, escaped = [], False
    for surface in surfaces:
        n = 0
        for c in surface:
            if escaped:
                n, escaped = n + len(c.encode("utf-8")), False
            elif c == ESC:
                escaped = True
            elif c not in (TITLE, ALLCAPS, CAPNEXT):
                n += len(c.encode("utf-8"))
        counts.append(n)
    if inverse("".join(surfaces)) != text or sum(counts) != len(text.encode("utf-8")):
        raise ValueError(f"CaseOps round trip or byte count failed for a document starting {text[:40]!r}")
    return [p.id for p in pieces], counts


def build(docs: list[str], sp, out: str, val_docs: int = 50000) -> None:
    os.makedirs(out, exist_ok=True)
    val, val_bytes, train = [], [], []
    for k, text in enumerate(docs):
        ids, counts = encode_with_bytes(sp, text)
        if k < val_docs:
            val += [BOS] + ids
            val_bytes += [0] + counts
        else:
            train += [BOS] + ids
    train_gpt.write_shard(os.path.join(out, "fineweb_val_000000.bin"), np.asarray(val, dtype=np.uint16))
    train_gpt.write_shard(os.path.join(out, "fineweb_val_bytes_000000.bin"), np.asarray(val_bytes, dtype=np.uint16))
    train_gpt.write_shard(os.path.join(out, "fineweb_train_000000.bin"), np.asarray(train, dtype=np.uint16))


class ToolError(Exception):
    """Bad input: one `error:` line on stderr, exit 2."""


def read_docs(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ToolError(f"--docs {path}: cannot read: {e}") from None
    texts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ToolError(f"--docs {path} line {n}: not a JSON object with a \"text\" string ({e!r})") from None
        if not isinstance(text, str):
            raise ToolError(f"--docs {path} line {n}: \"text\" is {type(text).__name__}, not a string")
        texts.append(text)
    return texts


def load_caseops_tokenizer(path: str):
    import sentencepiece as spm
    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
        raise ToolError(f"--tokenizer {path}: not a SentencePiece model ({str(e).splitlines()[0][:120]})") from None
    missing = train_gpt.caseops_pieces_missing(sp)
    if missing:
        raise ToolError(f"--tokenizer {path}: not a CaseOps tokenizer (control pieces {missing} missing)")
    return sp


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--val-docs", type=int, default=50000)
    a = ap.parse_args(argv)
    try:
        texts = read_docs(a.docs)
        if not 0 < a.val_docs < len(texts):
            raise ToolError(f"--val-docs {a.val_docs}: must be at least 1 and below the {len(texts)} documents "
                            "of --docs (the rest are training documents)")
        build(texts, load_caseops_tokenizer(a.tokenizer), a.out, a.val_docs)
    except (ToolError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
