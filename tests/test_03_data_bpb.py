"""Bits per byte: the tokenizer byte tables (build_byte_luts, ValidationData.target_bytes) against the
UTF-8 length of the decoded text (rules E1/E2), on the tiny tokenizer, on the real sp1024 tokenizer
and real validation documents (the sample shipped in tests/data, and the full stand-in shard when
../shared/data is present), and on a hand-made vocabulary;
EvalResult's val_loss/val_bpb arithmetic; and load_validation's truncation and errors.

    python3 -m pytest -q tests/test_03_data_bpb.py
"""

import math

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import REAL_SHARDS, REAL_TOKENIZER, SAMPLE_DOCS, SAMPLE_SHARDS, SAMPLE_TOKENIZER, tiny_env
from helpers import BOS, check_every_piece, load_sp, lut_bytes, luts

# Texts for the tiny tokenizer: pieces it learned (é, —, 東京, 🙂, digits 0-2) and characters it never
# saw, which fall back to 2-, 3- and 4-byte UTF-8 sequences of byte tokens (日本語, Ω, 👍🏽, 3-9).
# SentencePiece normalizes (NFKC, whitespace runs collapsed, leading/trailing space dropped), and the
# metric counts the bytes of the text the tokenizer sees (stack.md 2.3), so every case compares with
# len(sp.decode(ids).encode()); NFKC_STABLE texts must also decode to themselves, so for them this is
# the raw len(text.encode("utf-8")) too.
NFKC_STABLE = ["Café naïve — “quoted” text.", "東京 and Zürich.", "Emoji 🙂 test.", "Prices rose 12.5% in 2024.",
               "日本語 text", "Ωμέγα ß Ñandú", "thumbs 👍🏽 up", "0123456789 digits", "the river garden",
               "x<unk>y <s> </s>", "a", "été vs été"]
NORMALIZED = ["ﬁne ＡＢＣ", "½ ² ™", "e\u0301te\u0301", "line one\nline two\ttab", "a  b   c", "  padded  ",
              "trailing space ", "\u2581 literal lower block", "non\u00a0breaking"]


@pytest.fixture(scope="module")
def tiny_sp(tiny_data):
    return load_sp(tiny_data / "tokenizer.model")


@pytest.mark.parametrize("text", NFKC_STABLE + NORMALIZED)
def test_tiny_tokenizer_bytes_equal_utf8_length(tiny_sp, text):
    vd = luts(tiny_sp)
    ids = tiny_sp.encode(text)
    decoded = tiny_sp.decode(ids)
    if text in NFKC_STABLE:
        assert decoded == text
    assert lut_bytes(vd, [BOS] + ids) == len(decoded.encode("utf-8"))


def test_tiny_tokenizer_stream_of_documents(tiny_sp):
    """Many documents as the shards hold them ([BOS] + ids each): targets that are BOS count 0,
    the first piece after BOS gets no space, so the total is the sum of the decoded lengths."""
    vd = luts(tiny_sp)
    texts = NFKC_STABLE + NORMALIZED
    stream = sum(([BOS] + tiny_sp.encode(t) for t in texts), [])
    assert lut_bytes(vd, stream) == sum(len(tiny_sp.decode(tiny_sp.encode(t)).encode()) for t in texts)
    assert any(tiny_sp.is_byte(i) for i in stream)  # byte fallback is exercised
    assert any(tiny_sp.id_to_piece(i).startswith("\u2581") for i in stream)


def test_tiny_shards_bytes_equal_decoded_length(tiny_data, tiny_sp):
    """The val shard of the tiny dataset, split at BOS: LUT bytes per document == decoded bytes."""
    vd = luts(tiny_sp)
    tokens = np.asarray(tg.read_shard(str(tiny_data / "fineweb_val_000000.bin")), dtype=np.int64)
    docs = np.split(tokens, np.flatnonzero(tokens == BOS)[1:])
    assert len(docs) == 300 and all(d[0] == BOS for d in docs)
    assert lut_bytes(vd, tokens) == sum(len(tiny_sp.decode(d[1:].tolist()).encode()) for d in docs)


def test_tiny_tokenizer_every_piece(tiny_sp):
    assert sum(tiny_sp.is_byte(i) for i in range(tiny_sp.vocab_size())) == 256
    check_every_piece(tiny_sp)


real_data = pytest.mark.skipif(not (REAL_TOKENIZER.exists() and (REAL_SHARDS / "fineweb_val_000000.bin").exists()),
                               reason="../shared/data (real sp1024 tokenizer and shards) not present")
# (tokenizer, val shard folder, documents checked): the shipped sample everywhere, the full stand-in where present.
REAL_SOURCES = [pytest.param((SAMPLE_TOKENIZER[1024], SAMPLE_SHARDS[1024], SAMPLE_DOCS), id="sample"),
                pytest.param((REAL_TOKENIZER, REAL_SHARDS, 120), id="shared", marks=real_data)]


def test_real_tokenizer_every_piece():
    sp = load_sp(SAMPLE_TOKENIZER[1024])  # the real sp1024 model, shipped (test_03_data.py checks it is the same file)
    assert sp.vocab_size() == 1024 and all(sp.is_byte(i) for i in range(4, 260))
    check_every_piece(sp)


@pytest.mark.parametrize("source", REAL_SOURCES)
def test_real_validation_documents(source):
    """The first 120 real FineWeb val documents (all 60 of the sample): per document and over the
    whole stream, LUT bytes == len(decoded text in UTF-8)."""
    tokenizer, shards, n_docs = source
    sp = load_sp(tokenizer)
    vd = luts(sp, 1024)
    tokens = np.asarray(tg.read_shard(str(shards / "fineweb_val_000000.bin")), dtype=np.int64)
    starts = np.flatnonzero(tokens == BOS)
    assert starts[0] == 0 and len(starts) >= n_docs
    stream = tokens[:starts[n_docs]] if n_docs < len(starts) else tokens
    docs = np.split(stream, starts[1:n_docs])
    total = 0
    for k, doc in enumerate(docs):
        assert doc[0] == BOS and BOS not in doc[1:]
        n = len(sp.decode(doc[1:].tolist()).encode("utf-8"))
        assert lut_bytes(vd, doc) == n, f"document {k}"
        total += n
    assert lut_bytes(vd, stream) == total
    assert any(sp.is_byte(int(i)) for i in stream)  # real text hits byte fallback too


class HandMadeSP:
    """A SentencePiece stand-in with a hand-made vocabulary (the methods build_byte_luts calls)."""
    PIECES = ["<pad>", "<s>", "</s>", "<unk>", "<0x41>", "<0xE6>", "\u2581", "\u2581the", "é", "東京", "\u2581東",
              "<reserved>"]
    KIND = {0: "control", 1: "control", 2: "control", 3: "unknown", 4: "byte", 5: "byte", 11: "unused"}

    def vocab_size(self):
        return len(self.PIECES)

    def id_to_piece(self, i):
        return self.PIECES[i]

    def is_control(self, i):
        return self.KIND.get(i) == "control"

    def is_unknown(self, i):
        return self.KIND.get(i) == "unknown"

    def is_byte(self, i):
        return self.KIND.get(i) == "byte"

    def is_unused(self, i):
        return self.KIND.get(i) == "unused"


def test_hand_made_vocabulary_tables():
    base, space, boundary = tg.build_byte_luts(HandMadeSP(), 14)  # ids 12, 13: beyond the tokenizer
    assert base.tolist() == [0, 0, 0, 0, 1, 1, 0, 3, 2, 6, 3, 0, 0, 0]
    assert space.tolist() == [False] * 6 + [True, True, False, False, True] + [False] * 3
    assert boundary.tolist() == [True] * 4 + [False] * 7 + [True] * 3


@pytest.mark.parametrize("prev,tgt,expected", [
    (8, 7, 4),    # "▁the" after a real piece: 3 + its space
    (1, 7, 3),    # after BOS: the space is not counted
    (0, 7, 3),    # after pad
    (2, 7, 3),    # after EOS
    (3, 7, 3),    # after unk
    (11, 7, 3),   # after an unused id
    (4, 7, 4),    # after a byte token (a real token)
    (9, 6, 1),    # bare "▁" after a real piece: just the space
    (1, 6, 0),    # bare "▁" after BOS
    (9, 10, 4),   # "▁東": 3 bytes + space
    (7, 5, 1),    # byte-fallback <0xE6>: 1 byte, never 3 (the length of its UTF-8 character) or 6 ("<0xE6>")
    (1, 4, 1),    # a byte token after BOS
    (7, 1, 0),    # BOS as target
    (7, 2, 0),    # EOS as target
    (7, 3, 0),    # unk as target
    (7, 0, 0),    # pad as target
    (7, 8, 2),    # "é": 2 bytes, no space
    (1, 9, 6),    # "東京"
], ids=["space-after-piece", "no-space-after-bos", "no-space-after-pad", "no-space-after-eos",
        "no-space-after-unk", "no-space-after-unused", "space-after-byte", "bare-space", "bare-space-after-bos",
        "space-cjk", "byte-is-1", "byte-after-bos", "bos-is-0", "eos-is-0", "unk-is-0", "pad-is-0", "e-acute",
        "cjk"])
def test_hand_made_target_bytes(prev, tgt, expected):
    vd = luts(HandMadeSP(), 14)
    assert vd.target_bytes(torch.tensor([prev]), torch.tensor([tgt])).item() == expected


def test_hand_made_sequence():
    """<s> ▁the ▁ <0xE6> é 東京 </s> <s> ▁東 ▁the: 3 + 1 + 1 + 2 + 6 + 0 + 0 + 3 + 4 = 20 bytes."""
    vd = luts(HandMadeSP(), 14)
    assert lut_bytes(vd, [1, 7, 6, 5, 8, 9, 2, 1, 10, 7]) == 20
    batch = torch.tensor([[1, 7, 6, 5, 8], [9, 2, 1, 10, 7]])  # same shape in, same shape out
    out = vd.target_bytes(batch[:, :-1], batch[:, 1:])
    assert out.shape == (2, 4) and out.dtype == torch.int64
    assert out.tolist() == [[3, 1, 1, 2], [0, 0, 3, 4]]


@pytest.mark.parametrize("loss_sum,tokens,nbytes,val_loss,val_bpb", [
    (2000 * math.log(2), 1000, 4000, 2 * math.log(2), 0.5),
    (3.0, 2, 5, 1.5, 0.8656170245333781),
    (1234.5, 1000, 2450, 1.2345, 0.7269416440724186),  # 0.5038776 nats/byte / ln 2,
], ids=["half-bit", "small", "sp1024-like"])
def test_eval_result_arithmetic(loss_sum, tokens, nbytes, val_loss, val_bpb):
    r = tg.EvalResult(loss_sum=loss_sum, tokens=tokens, bytes=nbytes, time_ms=12.34)
    assert r.val_loss == pytest.approx(val_loss, rel=1e-12)
    assert r.val_bpb == pytest.approx(val_bpb, rel=1e-12)
    assert r.val_bpb == pytest.approx(r.val_loss / math.log(2) * tokens / nbytes, rel=1e-12)
    d = r.as_dict()
    assert (d["val_loss"], d["val_bpb"], d["tokens"], d["bytes"]) == (r.val_loss, r.val_bpb, tokens, nbytes)


@pytest.mark.parametrize("lengths,seq_len,kept", [
    ((600, 400), 128, 897),    # N=1000: floor(999/128)*128 + 1
    ((300, 85), 128, 385),     # N-1 a multiple of L: nothing cut
    ((129,), 128, 129),        # exactly one sequence
    ((200, 1, 57), 64, 257),   # N=258: floor(257/64)*64 + 1
], ids=["truncated", "exact", "one-seq", "three-shards"])
def test_load_validation_truncates(tmp_path, tiny_data, tiny_sp, runtime, lengths, seq_len, kept):
    rng = np.random.default_rng(0)
    shards = [rng.integers(0, 512, size=n) for n in lengths]
    for i in reversed(range(len(shards))):  # written out of order: the stream is in sorted order
        tg.write_shard(str(tmp_path / f"fineweb_val_{i:06d}.bin"), shards[i])
    tg.write_shard(str(tmp_path / "fineweb_train_000000.bin"), np.full(50, 7))  # never part of val
    h = tg.Hyperparameters.from_env(tiny_env(tmp_path, TOKENIZER_PATH=tiny_data / "tokenizer.model"))
    vd = tg.load_validation(h, tiny_sp, runtime, seq_len)
    stream = np.concatenate(shards)
    assert vd.stream_len == len(stream)
    assert vd.tokens.dtype == torch.int64 and len(vd.tokens) == kept
    assert (len(vd.tokens) - 1) % seq_len == 0 and len(stream) - len(vd.tokens) < seq_len
    np.testing.assert_array_equal(vd.tokens.numpy(), stream[:kept])
    base, space, boundary = tg.build_byte_luts(tiny_sp, h.vocab_size)
    assert torch.equal(vd.base_bytes, base) and torch.equal(vd.has_leading_space, space)
    assert torch.equal(vd.is_boundary, boundary)


@pytest.mark.parametrize("n", [128, 1], ids=["one-short", "single-token"])
def test_load_validation_too_short(tmp_path, tiny_sp, runtime, n):
    tg.write_shard(str(tmp_path / "fineweb_val_000000.bin"), np.ones(n))
    h = tg.Hyperparameters.from_env(tiny_env(tmp_path))
    with pytest.raises(tg.ConfigError, match=f"fineweb_val_\\*\\.bin: validation stream \\({n} tokens\\) is shorter"):
        tg.load_validation(h, tiny_sp, runtime, 128)


def test_load_validation_needs_val_shards(tmp_path, tiny_sp, runtime):
    tg.write_shard(str(tmp_path / "fineweb_train_000000.bin"), np.ones(1000))
    h = tg.Hyperparameters.from_env(tiny_env(tmp_path))
    with pytest.raises(tg.ConfigError, match="^DATA_PATH: no shards match .*fineweb_val_"):
        tg.load_validation(h, tiny_sp, runtime, 128)
