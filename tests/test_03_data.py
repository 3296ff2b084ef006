"""Section 03 of train_gpt.py, data: shards, loaders, prefetch, byte tables, vocabularies, CaseOps, varlen.

Data: the shard format (round trip and every header rule), shard globbing, the sequential
loader's world-size-invariant stream, batch_geometry, and the coprime multi-shard loader.

LOADER_PREFETCH (issue 16 item 1): the prefetching loader gives bitwise the batches of the
synchronous loader (every TRAIN_LOADER, before and after close), re-raises a loader error in the
main thread, and leaves no thread behind after close.

Bits per byte: the tokenizer byte tables (build_byte_luts, ValidationData.target_bytes) against the
UTF-8 length of the decoded text (rules E1/E2), on the tiny tokenizer, on the real sp1024 tokenizer
and real validation documents (the sample shipped in tests/data, and the full stand-in shard when
../shared/data is present), and on a hand-made vocabulary;
EvalResult's val_loss/val_bpb arithmetic; and load_validation's truncation and errors.

Any SentencePiece vocabulary (issue 9 item 1): with VOCAB_SIZE=8192 and the 8192-token model, the
byte tables built from TOKENIZER_PATH satisfy rule E2 on the sp8192 stand-in validation documents
(sum of table bytes == UTF-8 bytes of the decoded documents, per document and over the stream, and
per piece); a VOCAB_SIZE that does not match the tokenizer stops the run with one ConfigError line
naming VOCAB_SIZE and nothing written. On the sp8192 sample shipped in tests/data (every clone), and
the E2 proof also on the full stand-in shard where ../shared/data is present.

CASEOPS_ENABLED: validation bytes from the fineweb_val_bytes_*.bin sidecar (one count per val token)
instead of the tokenizer's byte tables, on one road (ValidationData.token_bytes) for every scorer;
a missing, misaligned or short sidecar and a tokenizer/flag mismatch are one error line, exit 2.

Document masking's FA3 varlen path (issue 19 F1): segment starts against an independent walk,
cu_seqlens of a small static length (varlen_capacity) whose attention equals each segment run on
its own and the old B*T+1 padding, the host-side overflow check (a VarlenOverflow; the script's exit 2 is in
test_14_errors.py), the count at the record's shapes on the sp8192 stand-in train shard, and single-document
rows (doc phase, LoRA TTT, global TTT) that never reach the varlen kernel and score the same.
FA3 is replaced by a reference varlen function (per-segment SDPA), so all of it runs on CPU.

    python3 -m pytest -q tests/test_03_data.py -m "slow or not slow"
"""

import copy
import dataclasses
import json
import math
import shutil
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import (SAMPLE_SHARDS, REAL_SHARDS, REAL_TOKENIZER, SAMPLE_DOCS, SAMPLE_TOKENIZER, tiny_env,
    SHARED_DATA, assert_one_error_line, run_script)
from doc_streams import BOS, doc_env, noisy_model, random_ids
from helpers import check_every_piece, load_sp, lut_bytes, luts


# ==============================================================================================
# data


def fake_runtime(rank: int, world_size: int) -> tg.Runtime:
    """A rank of a world the loaders believe in; loaders never call all_reduce."""
    return tg.Runtime(False, rank, world_size, rank, torch.device("cpu"))


def write_raw(path, header_ints, payload: bytes = b""):
    header = np.zeros(256, dtype="<i4")
    header[:len(header_ints)] = header_ints
    path.write_bytes(header.tobytes() + payload)
    return path


# ---- shard format


def test_shard_round_trip(synthetic_shards):
    tokens = np.random.default_rng(0).integers(0, 65536, size=1001).astype(np.uint16)
    path = synthetic_shards("fineweb_train_000000.bin", tokens)
    assert path.stat().st_size == 1024 + 2 * 1001
    header = np.fromfile(path, dtype="<i4", count=3)
    assert header.tolist() == [20240520, 1, 1001]
    back = tg.read_shard(str(path))
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, tokens)


def test_empty_shard_round_trip(synthetic_shards):
    assert len(tg.read_shard(str(synthetic_shards("fineweb_train_000000.bin", [])))) == 0


@pytest.mark.parametrize("make,match", [
    (lambda p: write_raw(p, [20240521, 1, 4], b"\0" * 8), "bad shard header"),
    (lambda p: write_raw(p, [20240520, 2, 4], b"\0" * 8), "bad shard header"),
    (lambda p: write_raw(p, [20240520, 1, 4], b"\0" * 6), "file is 1030 bytes .* 4 tokens"),
    (lambda p: write_raw(p, [20240520, 1, 4], b"\0" * 9), "file is 1033 bytes .* 4 tokens"),
    (lambda p: write_raw(p, [20240520, 1, 4], b"\0" * 10), "file is 1034 bytes .* 4 tokens"),
    (lambda p: write_raw(p, [20240520, 1, -1]), "header promises -1 tokens"),
    (lambda p: p.write_bytes(np.array([20240520, 1, 0], dtype="<i4").tobytes()), "shorter than 1024 bytes"),
    (lambda p: p.write_bytes(b""), "shorter than 1024 bytes"),
    (lambda p: p, "not found"),
], ids=["magic", "version", "truncated", "odd-extra-byte", "extra-token", "negative-count", "short-header",
        "empty-file", "missing"])
def test_bad_shard_raises_naming_the_file(tmp_path, make, match):
    path = tmp_path / "fineweb_val_000007.bin"
    make(path)
    with pytest.raises(tg.ConfigError, match=match) as e:
        tg.read_shard(str(path))
    assert str(e.value).startswith(str(path))


def test_shard_paths_sorted_and_missing(tmp_path, synthetic_shards):
    for name in ("fineweb_train_000002.bin", "fineweb_train_000000.bin", "fineweb_train_000001.bin",
                 "fineweb_val_000000.bin"):
        synthetic_shards(name, [1, 2])
    found = tg.shard_paths(str(tmp_path / "fineweb_train_*.bin"))
    assert [p.rsplit("/", 1)[1] for p in found] == [f"fineweb_train_00000{i}.bin" for i in range(3)]
    with pytest.raises(tg.ConfigError, match="^DATA_PATH: no shards match .*nothing_here"):
        tg.shard_paths(str(tmp_path / "nothing_here" / "fineweb_train_*.bin"))
    h = tg.Hyperparameters.from_env({"DATA_PATH": str(tmp_path / "empty")})
    with pytest.raises(tg.ConfigError, match="^DATA_PATH: "):
        tg.make_train_loader(h, fake_runtime(0, 1))


# ---- sequential loader

SHARD_LENGTHS = (100, 157, 61)  # deliberately not multiples of any sequence length used below


@pytest.fixture
def stream_shards(synthetic_shards):
    """Three train shards written out of order; token value == position in the sorted stream."""
    stream = np.arange(sum(SHARD_LENGTHS), dtype=np.uint16)
    bounds = np.cumsum((0,) + SHARD_LENGTHS)
    written = [synthetic_shards(f"fineweb_train_00000{i}.bin", stream[bounds[i]:bounds[i + 1]]) for i in (2, 0, 1)]
    paths = tg.shard_paths(str(written[0].parent / "fineweb_train_*.bin"))
    return paths, stream.astype(np.int64)


@pytest.mark.parametrize("seqs,seq_len", [(2, 16), (3, 7), (1, 64)], ids=["2x16", "3x7", "1x64"])
def test_sequential_is_the_stream_in_order(stream_shards, seqs, seq_len):
    paths, stream = stream_shards
    loader = tg.SequentialLoader(paths, fake_runtime(0, 1))
    span = seqs * seq_len
    calls = 2 * len(stream) // span + 3  # wraps past the end of the last shard twice
    for k in range(calls):
        x, y = loader.next_batch(seqs, seq_len)
        assert x.shape == y.shape == (seqs, seq_len) and x.dtype == y.dtype == torch.int64
        idx = (k * span + np.arange(span + 1)) % len(stream)  # cyclic stream, shard 0 after the last
        want = torch.from_numpy(stream[idx])
        assert torch.equal(x.flatten(), want[:-1]), f"call {k}"
        assert torch.equal(y.flatten(), want[1:]), f"call {k}"
        assert torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize("seqs,seq_len", [(1, 16), (2, 9), (3, 32)], ids=["1x16", "2x9", "3x32"])
def test_sequential_is_world_size_invariant(stream_shards, seqs, seq_len):
    """Ranks 0 and 1 of two together hold exactly the one-rank batch of 2*seqs, rank 0 first."""
    paths, stream = stream_shards
    one = tg.SequentialLoader(paths, fake_runtime(0, 1))
    ranks = [tg.SequentialLoader(paths, fake_runtime(r, 2)) for r in (0, 1)]
    for k in range(2 * len(stream) // (2 * seqs * seq_len) + 3):
        x1, y1 = one.next_batch(2 * seqs, seq_len)
        (x0, y0), (xr, yr) = (loader.next_batch(seqs, seq_len) for loader in ranks)
        assert torch.equal(torch.cat([x0, xr]), x1), f"call {k}"
        assert torch.equal(torch.cat([y0, yr]), y1), f"call {k}"
        # token value == stream position (mod wrap), so disjoint values mean disjoint positions
        assert not set(x0.flatten().tolist()) & set(xr.flatten().tolist())


# ---- batch geometry


@pytest.mark.parametrize("tokens,seq_len,world,micro,expected", [
    (786_432, 2048, 8, 48, (48, 1)),
    (786_432, 2048, 1, 48, (48, 8)),
    (786_432, 2048, 2, 48, (48, 4)),
    (786_432, 2048, 4, 48, (48, 2)),
    (786_432, 2048, 8, 32, (24, 2)),   # 48 per rank, at most 32: two micro-steps of 24
    (786_432, 2048, 3, 48, (32, 4)),   # 128 per rank: 128/4 = 32 is the first divisor <= 48
    (4096, 128, 1, 32, (32, 1)),
    (4096, 128, 2, 32, (16, 1)),
    (4096, 128, 1, 5, (4, 8)),          # 32 sequences, at most 5: 8 micro-steps of 4
    (7 * 64, 64, 1, 3, (1, 7)),         # prime count: one sequence per micro-step
], ids=["record-8gpu", "record-1gpu", "record-2gpu", "record-4gpu", "micro32-8gpu", "record-3gpu", "tiny-1",
        "tiny-2", "tiny-micro5", "prime"])
def test_batch_geometry(tokens, seq_len, world, micro, expected):
    h = tg.Hyperparameters(train_batch_tokens=tokens, train_seq_len=seq_len, micro_batch_seqs=micro)
    seqs, accum = tg.batch_geometry(h, fake_runtime(0, world))
    assert (seqs, accum) == expected
    assert seqs * accum * world * seq_len == tokens  # the global batch does not depend on the world size
    assert seqs <= micro


@pytest.mark.parametrize("tokens,seq_len,world", [(786_432, 2048, 5), (4096, 128, 3), (3 * 128, 128, 2)],
                         ids=["384-over-5", "32-over-3", "3-over-2"])
def test_batch_geometry_rejects_uneven_split(tokens, seq_len, world):
    h = tg.Hyperparameters(train_batch_tokens=tokens, train_seq_len=seq_len)
    with pytest.raises(tg.ConfigError, match=f"^TRAIN_BATCH_TOKENS={tokens}: .* {world} ranks"):
        tg.batch_geometry(h, fake_runtime(0, world))


# ---- coprime loader

BASE = 1000  # shard i holds tokens i*BASE + [0, len): a value names its shard and offset


@pytest.fixture
def coprime_shards(tmp_path):
    """Four train shards of different lengths; returns their sorted paths."""
    folder = tmp_path / "a"
    folder.mkdir()
    for i, n in enumerate((300, 450, 200, 520)):
        tg.write_shard(str(folder / f"fineweb_train_00000{i}.bin"), i * BASE + np.arange(n))
    return tg.shard_paths(str(folder / "fineweb_train_*.bin"))


def draw(paths, seed, calls=6, seqs=4, seq_len=16, rank=0, world=1):
    loader = tg.CoprimeLoader(paths, fake_runtime(rank, world), seed)
    return [loader.next_batch(seqs, seq_len) for _ in range(calls)]


def same(a, b) -> bool:
    return all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_coprime_deterministic_and_seeded(coprime_shards):
    assert same(draw(coprime_shards, 1337), draw(coprime_shards, 1337))
    assert not same(draw(coprime_shards, 1337), draw(coprime_shards, 1338))


def test_coprime_order_ignores_the_folder(coprime_shards, tmp_path):
    other = tmp_path / "some" / "other" / "place"
    shutil.copytree(tmp_path / "a", other)
    moved = tg.shard_paths(str(other / "fineweb_train_*.bin"))
    assert same(draw(coprime_shards, 5), draw(moved, 5))
    dotted = [p.replace("/a/", "/a/./") for p in coprime_shards]
    assert same(draw(coprime_shards, 5), draw(dotted, 5))


def test_coprime_rows_are_real_slices(coprime_shards):
    shards = [tg.read_shard(p) for p in coprime_shards]
    seq_len = 16
    for x, y in draw(coprime_shards, 3, calls=8, seqs=5, seq_len=seq_len):
        assert x.shape == y.shape == (5, seq_len) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for xr, yr in zip(x.tolist(), y.tolist()):
            shard, offset = divmod(xr[0], BASE)
            want = shards[shard][offset:offset + seq_len + 1].astype(np.int64).tolist()
            assert len(want) == seq_len + 1  # the target of the last position is inside the shard
            assert xr + yr[-1:] == want


def test_coprime_one_pass_visits_each_window_once(tmp_path):
    """One shard of (B+1)*L tokens has B windows for every phase in [0, L): B draws are a permutation
    of phase + L*[0, B), the next B draws another one."""
    L, B = 16, 12  # 12 is not prime: the stride has to be picked coprime to it
    path = tmp_path / "fineweb_train_000000.bin"
    tg.write_shard(str(path), np.arange((B + 1) * L))
    for seed in range(4):
        starts = [x[:, 0].tolist() for x, _ in draw([str(path)], seed, calls=2 * B // 3, seqs=3, seq_len=L)]
        starts = sum(starts, [])
        for first in (starts[:B], starts[B:]):
            phase = first[0] % L
            assert sorted(first) == [phase + L * b for b in range(B)], f"seed {seed}"


def test_coprime_ranks_interleave_one_global_list(coprime_shards):
    """Two ranks draw the same global list and take alternate windows of it. With at most four
    ranks the mix sizes (8 -> 32 shards, clipped to the shard count) equal the one-rank ones, so
    the one-rank loader with twice the sequences draws that same global list."""
    seqs, seq_len, calls = 3, 16, 5
    glob = draw(coprime_shards, 11, calls, 2 * seqs, seq_len)
    r0 = draw(coprime_shards, 11, calls, seqs, seq_len, rank=0, world=2)
    r1 = draw(coprime_shards, 11, calls, seqs, seq_len, rank=1, world=2)
    seen = set()
    for (xg, yg), (x0, y0), (x1, y1) in zip(glob, r0, r1):
        assert torch.equal(x0, xg[0::2]) and torch.equal(y0, yg[0::2])
        assert torch.equal(x1, xg[1::2]) and torch.equal(y1, yg[1::2])
        windows0, windows1 = set(x0[:, 0].tolist()), set(x1[:, 0].tolist())
        assert len(windows0) == len(windows1) == seqs and not windows0 & windows1
        assert not (windows0 | windows1) & seen  # no window twice within the first pass
        seen |= windows0 | windows1


def test_start_up_shard_check_counts_tokens_and_digests_names_and_sizes(tiny_data):
    import glob, hashlib, os
    paths = sorted(glob.glob(str(tiny_data / "fineweb_train_*.bin")))
    assert len(paths) == 2
    tokens = sum((os.path.getsize(p) - tg.SHARD_HEADER_BYTES) // 2 for p in paths)
    digest = hashlib.sha256("".join(f"{os.path.basename(p)}:{os.path.getsize(p)}\n" for p in paths).encode())
    assert tg.check_train_shards(str(tiny_data / "fineweb_train_*.bin")) == \
        f"train_shards:2 train_tokens:{tokens} digest:{digest.hexdigest()[:16]}"


# ---- packed loader (the record's DocumentPackingLoader, issue 19 item 3)


@pytest.mark.parametrize("world,seqs,seq_len", [(1, 2, 16), (2, 1, 9), (3, 3, 7)], ids=["1gpu", "2gpu", "3gpu"])
def test_packed_is_the_records_span_arithmetic(stream_shards, world, seqs, seq_len):
    """Independent reading of frontier.md 1.3: call k of rank r is the slice of n + 1 tokens
    starting at (k * world + r) * (n + 1) of the cyclic stream of sorted shards, n = seqs * seq_len:
    inputs its first n as one row, targets the same shifted by one. No seed."""
    paths, stream = stream_shards
    n = seqs * seq_len
    loaders = [tg.PackedLoader(paths, fake_runtime(r, world), seed) for r, seed in zip(range(world), (1, 2, 3))]
    for k in range(2 * len(stream) // (world * (n + 1)) + 3):  # wraps past the last shard twice
        for r, loader in enumerate(loaders):
            x, y = loader.next_batch(seqs, seq_len)
            want = torch.from_numpy(stream[((k * world + r) * (n + 1) + np.arange(n + 1)) % len(stream)])
            assert x.shape == y.shape == (1, n) and x.dtype == torch.int64
            assert torch.equal(x[0], want[:-1]) and torch.equal(y[0], want[1:]), f"call {k} rank {r}"


def test_packed_one_gpu_with_accumulation_sees_what_two_gpus_see(stream_shards):
    paths, _ = stream_shards
    one = tg.PackedLoader(paths, fake_runtime(0, 1))
    two = [tg.PackedLoader(paths, fake_runtime(r, 2)) for r in (0, 1)]
    for k in range(20):
        a = [one.next_batch(2, 8) for _ in range(2)]  # 2 accumulation steps
        b = [loader.next_batch(2, 8) for loader in two]
        assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b)), f"step {k}"


def test_packed_rows_follow_document_masking_and_check_segments(stream_shards, tiny_data):
    from conftest import tiny_env
    plain = tg.Hyperparameters.from_env(tiny_env(tiny_data, TRAIN_LOADER="packed"))  # no DOC_MASKING: seqs rows
    x, y = tg.make_train_loader(plain, fake_runtime(0, 1)).next_batch(2, 8)
    one = tg.PackedLoader(tg.shard_paths(plain.train_files), fake_runtime(0, 1))
    x1, y1 = one.next_batch(2, 8)
    assert x.shape == (2, 8) and torch.equal(x.flatten(), x1[0]) and torch.equal(y.flatten(), y1[0])
    assert tg.packed_segment_len(plain) == 0
    h = tg.Hyperparameters.from_env(tiny_env(tiny_data, TRAIN_LOADER="packed", DOC_MASKING=1, BOS_ID=1))
    loader = tg.make_train_loader(h, fake_runtime(0, 1))
    assert isinstance(loader, tg.PackedLoader) and loader.varlen_check == (1, h.train_seq_len)
    assert tg.packed_segment_len(h) == h.train_seq_len
    assert tg.packed_segment_len(tg.dataclasses.replace(h, train_loader="sequential")) == 0


# ---- the real-text sample shipped in tests/data (PRESET=tiny's data, the E2 proofs in a fork)

SAMPLE_SHA256 = {1024: "4f5e8adb109c66b4886963bc75a7befd73bda36d27fd7102df8e9e66503b0e2a",  # ../shared/data/README.md
                 8192: "4e979c92754cc9d7bdebd9dfe5edf3fc0b41b38714b394e4297fa851e3afd516"}


def sample_documents(vocab: int, split: str) -> list[str]:
    import sentencepiece as spm
    from conftest import SAMPLE_SHARDS, SAMPLE_TOKENIZER
    sp = spm.SentencePieceProcessor(model_file=str(SAMPLE_TOKENIZER[vocab]))
    tokens = np.asarray(tg.read_shard(str(SAMPLE_SHARDS[vocab] / f"fineweb_{split}_000000.bin")), dtype=np.int64)
    assert tokens[0] == 1 and tokens.max() < vocab
    return [sp.decode(doc[1:].tolist()) for doc in np.split(tokens, np.flatnonzero(tokens == 1)[1:])]


@pytest.mark.parametrize("split", ["train", "val"])
def test_sample_is_the_same_real_documents_in_both_vocabularies(split):
    """Each sample shard reads in the real format and holds SAMPLE_DOCS whole documents ([BOS] + tokens):
    decoded, the sp1024 and sp8192 shards give the same texts (the stand-ins' re-encoding is lossless)."""
    from conftest import SAMPLE, SAMPLE_DOCS, SAMPLE_TOKENIZER
    import hashlib
    for vocab, sha in SAMPLE_SHA256.items():
        assert hashlib.sha256(SAMPLE_TOKENIZER[vocab].read_bytes()).hexdigest() == sha  # the real tokenizers
    docs = sample_documents(1024, split)
    assert len(docs) == SAMPLE_DOCS and sum(map(len, docs)) > 100_000 and all(docs)
    assert sample_documents(8192, split) == docs
    assert sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file()) < 1_500_000  # stays small in the repo


def test_sample_is_cut_from_the_stand_in_shards(tmp_path):
    """Where ../shared/data exists, tests/tools/make_sample_data.py rebuilds the shipped sample byte for byte:
    each shard is a prefix of the stand-in's, cut on a document boundary."""
    from conftest import SAMPLE, SHARED_DATA
    if not (SHARED_DATA / "standin_sp8192").is_dir():
        pytest.skip("../shared/data not present")
    import make_sample_data
    assert make_sample_data.main(["--src", str(SHARED_DATA), "--out", str(tmp_path)]) == 0
    shipped = sorted(p.relative_to(SAMPLE) for p in SAMPLE.rglob("*") if p.is_file() and p.name != "README.md")
    assert shipped == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for rel in shipped:
        assert (SAMPLE / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel


# ==============================================================================================
# data prefetch

RT = tg.Runtime(False, 0, 1, 0, torch.device("cpu"))
PATHS = tg.shard_paths(str(SAMPLE_SHARDS[1024] / "fineweb_train_*.bin"))


def prefetch_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "loader-prefetch" and t.is_alive()]


@pytest.mark.parametrize("name", sorted(tg.TRAIN_LOADERS))
@pytest.mark.parametrize("depth", [1, 3])
def test_same_batches_as_the_synchronous_loader_and_no_thread_left(name, depth):
    sync = tg.TRAIN_LOADERS[name](PATHS, RT, 7)
    pre = tg.PrefetchLoader(tg.TRAIN_LOADERS[name](PATHS, RT, 7), RT, depth, 4, 64)
    for _ in range(6):
        a, b = sync.next_batch(4, 64), pre.next_batch(4, 64)
        assert all(torch.equal(u, v) and u.dtype == v.dtype == torch.int64 for u, v in zip(a, b))
    pre.close()
    assert prefetch_threads() == []
    for _ in range(depth + 2):  # the prepared batches first, then the loader's own, in order
        a, b = sync.next_batch(4, 64), pre.next_batch(4, 64)
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_loader_error_is_raised_in_the_main_thread():
    class Broken(tg.SequentialLoader):
        calls = 0

        def host_batch(self, seqs, seq_len):
            self.calls += 1
            if self.calls == 3:
                raise tg.ConfigError("TRAIN_SEQ_LEN=64: broken shard")
            return super().host_batch(seqs, seq_len)
    pre = tg.PrefetchLoader(Broken(PATHS, RT), RT, 2, 4, 64)
    pre.next_batch(4, 64), pre.next_batch(4, 64)
    with pytest.raises(tg.ConfigError, match="^TRAIN_SEQ_LEN=64: broken shard$"):
        pre.next_batch(4, 64)
    pre.close()
    assert prefetch_threads() == []


def test_knob_is_validated():
    with pytest.raises(tg.ConfigError, match="^LOADER_PREFETCH=-1: must be >= 0"):
        tg.Hyperparameters.from_env({"LOADER_PREFETCH": "-1"})
    assert tg.Hyperparameters().loader_prefetch == 0


def test_train_closes_the_thread_and_keeps_the_stream(hparams, runtime):
    """train() with LOADER_PREFETCH=2: the same losses as without, no thread left after it, and the
    loader it hands to calibration continues the synchronous stream."""
    runs = {}
    for depth in (0, 2):
        h = tg.dataclasses.replace(hparams, loader_prefetch=depth, iterations=3, warmup_steps=0)
        torch.manual_seed(0)
        base = tg.build_model(tg.ModelConfig.of(h), runtime)
        result, _, loader = tg.train(base, base, h, runtime)
        assert prefetch_threads() == []
        x, y = loader.next_batch(tg.batch_geometry(h, runtime)[0], h.train_seq_len)
        runs[depth] = (torch.cat([p.detach().reshape(-1) for p in base.parameters()]), x, y, result.steps)
    assert all(torch.equal(a, b) for a, b in zip(runs[0][:3], runs[2][:3])) and runs[0][3] == runs[2][3] == 3


# ==============================================================================================
# data bpb

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


# ==============================================================================================
# data vocab

SP8192 = SAMPLE_TOKENIZER[8192]
SHARDS8192 = SAMPLE_SHARDS[8192]
SHARED_SP8192 = SHARED_DATA / "tokenizers" / "fineweb_8192_bpe.model"
SHARED_SHARDS8192 = SHARED_DATA / "standin_sp8192"
shared_data = pytest.mark.skipif(not (SHARED_SP8192.exists() and (SHARED_SHARDS8192 / "fineweb_val_000000.bin").exists()),
                                 reason="../shared/data (sp8192 tokenizer and stand-in shards) not present")
# (tokenizer, shard folder, documents in its val shard)
SOURCES = {"sample": (SP8192, SHARDS8192, SAMPLE_DOCS), "shared": (SHARED_SP8192, SHARED_SHARDS8192, 300)}


def env8192(source: str = "sample", **overrides) -> dict:
    tokenizer, shards, _ = SOURCES[source]
    env = {"PRESET": "tiny", "VOCAB_SIZE": "8192", "DATA_PATH": str(shards), "TOKENIZER_PATH": str(tokenizer)}
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def load_val8192(source: str, runtime):
    h = tg.Hyperparameters.from_env(env8192(source))
    sp = tg.load_tokenizer(h)
    return sp, tg.load_validation(h, sp, runtime, h.eval_seq_len)


@pytest.fixture(scope="module")
def val8192(runtime_module):
    return load_val8192("sample", runtime_module)


@pytest.fixture(scope="module")
def runtime_module():
    return tg.Runtime(distributed=False, rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.mark.parametrize("source", ["sample", pytest.param("shared", marks=shared_data)])
def test_rule_e2_on_every_sp8192_validation_document(source, runtime_module):
    sp, val = load_val8192(source, runtime_module)
    _, shards, n_docs = SOURCES[source]
    assert sp.vocab_size() == 8192 and val.base_bytes.numel() == 8192
    tokens = np.asarray(tg.read_shard(str(shards / "fineweb_val_000000.bin")), dtype=np.int64)
    assert tokens.max() < 8192 and tokens.max() >= 1024  # really uses the large vocabulary
    starts = np.flatnonzero(tokens == BOS)
    assert starts[0] == 0 and len(starts) == n_docs
    total = 0
    for k, doc in enumerate(np.split(tokens, starts[1:])):
        assert doc[0] == BOS and BOS not in doc[1:]
        n = len(sp.decode(doc[1:].tolist()).encode("utf-8"))
        assert lut_bytes(val, doc) == n, f"document {k}"
        total += n
    assert lut_bytes(val, tokens) == total  # the whole stream, with the tables load_validation gives scoring


def test_every_sp8192_piece_against_decoding(val8192):
    check_every_piece(val8192[0])


def test_vocab_mismatch_is_one_error_naming_vocab_size_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert tg.main(env8192(VOCAB_SIZE=1024, RUN_ID="mismatch")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: VOCAB_SIZE=1024 does not match the tokenizer's vocab_size=8192")
    assert list(tmp_path.iterdir()) == []  # no logs/, no artifact


def test_model_and_luts_at_vocab_8192(val8192):
    h = tg.Hyperparameters.from_env(env8192())
    model = tg.GPT(tg.ModelConfig.of(h))
    assert model.tok_emb.weight.shape == (8192, h.model_dim)
    x = val8192[1].tokens[:2 * h.train_seq_len].view(2, -1)
    loss = model(x, val8192[1].tokens[1:2 * h.train_seq_len + 1].view(2, -1))
    assert abs(loss.item() - np.log(8192)) < 0.5  # near-uniform at init over 8192 tokens


# ==============================================================================================
# data caseops

CASEOPS_TOKENIZER = SHARED_DATA / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"


def _tiny_sp(tiny_data):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(tiny_data / "tokenizer.model"))


def _caseops_dir(tmp_path, tiny_data, side=None):
    """A copy of the tiny val shard (tokens) plus a sidecar: `side` or the byte-table counts."""
    d = tmp_path / "data"
    d.mkdir()
    for p in tiny_data.glob("fineweb_*.bin"):
        shutil.copy(p, d / p.name)
    tokens = np.asarray(tg.read_shard(str(d / "fineweb_val_000000.bin")), dtype=np.int64)
    if side is None:
        base, space, bound = (t.numpy() for t in tg.build_byte_luts(_tiny_sp(tiny_data), 512))
        side = np.zeros(len(tokens), dtype=np.int64)
        side[1:] = base[tokens[1:]] + (space[tokens[1:]] & ~bound[tokens[:-1]])
    tg.write_shard(str(d / "fineweb_val_bytes_000000.bin"), np.asarray(side, dtype=np.uint16))
    return d, tokens


def test_val_glob_excludes_the_sidecar(tmp_path, tiny_data):
    d, tokens = _caseops_dir(tmp_path, tiny_data)
    h = tg.Hyperparameters.from_env(tiny_env(d, TOKENIZER_PATH=tiny_data / "tokenizer.model"))
    assert [p.rsplit("/", 1)[1] for p in tg.val_shard_paths(h)] == ["fineweb_val_000000.bin"]
    assert [p.rsplit("/", 1)[1] for p in tg.val_bytes_paths(h)] == ["fineweb_val_bytes_000000.bin"]
    assert tg.val_positions(h) == (len(tokens) - 1) // h.eval_seq_len * h.eval_seq_len


def _nll(x, y):  # a fixed per-token loss: the byte sum is what is under test
    return (y % 7).double() + 0.5


@pytest.mark.parametrize("kind", ["lut-equal", "random"])
def test_sidecar_bytes_drive_the_sums(tmp_path, tiny_data, runtime, kind):
    """Sidecar = the byte-table counts: the same sums as the tables; a random sidecar: the byte
    sum is exactly the sidecar's sum over the scored targets (independent numpy count)."""
    rng = np.random.default_rng(0)
    tokens = np.asarray(tg.read_shard(str(tiny_data / "fineweb_val_000000.bin")))
    side = None if kind == "lut-equal" else rng.integers(0, 9, size=len(tokens))
    d, tokens = _caseops_dir(tmp_path, tiny_data, side)
    sp = _tiny_sp(tiny_data)
    h0 = tg.Hyperparameters.from_env(tiny_env(d, TOKENIZER_PATH=tiny_data / "tokenizer.model"))
    h1 = tg.Hyperparameters.from_env(tiny_env(d, TOKENIZER_PATH=tiny_data / "tokenizer.model", CASEOPS_ENABLED=1))
    L = h0.eval_seq_len
    v0, v1 = tg.load_validation(h0, sp, runtime, L), tg.load_validation(h1, sp, runtime, L)
    assert v0.token_bytes is None and len(v1.token_bytes) == len(v1.tokens)
    wins = tg.sliding_windows(len(v1.tokens) - 1, L, L // 2)
    s0 = tg.score_windows(_nll, v0, wins, 4, runtime)
    s1 = tg.score_windows(_nll, v1, wins, 4, runtime)
    assert s0[0] == s1[0] and s0[1] == s1[1] == len(v1.tokens) - 1
    side_all = np.asarray(tg.read_shard(str(d / "fineweb_val_bytes_000000.bin")), dtype=np.int64)
    assert s1[2].item() == side_all[1:len(v1.tokens)].sum()
    if kind == "lut-equal":
        assert s0[2] == s1[2]
    else:
        assert s0[2] != s1[2]


def test_target_bytes_needs_positions_with_a_sidecar(tiny_data, runtime, tmp_path):
    d, _ = _caseops_dir(tmp_path, tiny_data)
    h = tg.Hyperparameters.from_env(tiny_env(d, TOKENIZER_PATH=tiny_data / "tokenizer.model", CASEOPS_ENABLED=1))
    v = tg.load_validation(h, _tiny_sp(tiny_data), runtime, h.eval_seq_len)
    with pytest.raises(ValueError, match="target positions"):
        v.target_bytes(v.tokens[:3], v.tokens[1:4])
    assert torch.equal(v.to(torch.device("cpu")).token_bytes, v.token_bytes)


def _bad(tmp_path, tiny_data, case):
    d, tokens = _caseops_dir(tmp_path, tiny_data)
    side = d / "fineweb_val_bytes_000000.bin"
    if case == "missing":
        side.unlink()
    elif case == "short":
        tg.write_shard(str(side), np.ones(len(tokens) - 1, dtype=np.uint16))
    elif case == "misaligned":
        tg.write_shard(str(side), np.ones(len(tokens) + 5, dtype=np.uint16))
    elif case == "extra-shard":
        tg.write_shard(str(d / "fineweb_val_bytes_000001.bin"), np.ones(10, dtype=np.uint16))
    return d


@pytest.mark.slow
@pytest.mark.parametrize("case,words", [
    ("missing", ["CASEOPS_ENABLED=1", "no byte sidecar"]),
    ("short", ["CASEOPS_ENABLED=1", "byte counts for", "fineweb_val_bytes_000000.bin"]),
    ("misaligned", ["CASEOPS_ENABLED=1", "byte counts for"]),
    ("extra-shard", ["CASEOPS_ENABLED=1", "2 byte sidecar shards for 1"]),
    ("flag-on-plain-tokenizer", ["CASEOPS_ENABLED=1", "no CaseOps control pieces"]),
])
def test_bad_sidecar_or_flag_is_one_error_line(tmp_path, tiny_data, case, words):
    d = _bad(tmp_path, tiny_data, case)
    env = dict(tiny_env(d, TOKENIZER_PATH=tiny_data / "tokenizer.model", CASEOPS_ENABLED=1), RUN_ID="err")
    if case != "flag-on-plain-tokenizer":  # the sidecar cases need a CaseOps tokenizer to get past the flag check
        if not CASEOPS_TOKENIZER.exists():
            pytest.skip("needs the CaseOps tokenizer under ../shared/data")
        env.update(TOKENIZER_PATH=str(CASEOPS_TOKENIZER), VOCAB_SIZE="8192")
    cwd = tmp_path / "run"
    cwd.mkdir()
    assert_one_error_line(run_script(env, cwd, timeout=120), words)
    assert list(cwd.iterdir()) == []


@pytest.mark.skipif(not CASEOPS_TOKENIZER.exists(), reason="needs the CaseOps tokenizer under ../shared/data")
def test_caseops_tokenizer_without_the_flag_is_an_error(tmp_path, tiny_data):
    d, _ = _caseops_dir(tmp_path, tiny_data)
    h = tg.Hyperparameters.from_env(tiny_env(d, TOKENIZER_PATH=CASEOPS_TOKENIZER, VOCAB_SIZE=8192))
    sp = tg.load_tokenizer(h)
    with pytest.raises(tg.ConfigError, match="is a CaseOps tokenizer: set CASEOPS_ENABLED=1"):
        tg.check_caseops_tokenizer(h, sp)
    tg.check_caseops_tokenizer(tg.dataclasses.replace(h, caseops_enabled=True), sp)  # consistent: no error
    plain = tg.Hyperparameters.from_env(tiny_env(d, TOKENIZER_PATH=tiny_data / "tokenizer.model"))
    tg.check_caseops_tokenizer(plain, tg.load_tokenizer(plain))


@pytest.mark.parametrize("lora", [False, True], ids=["doc", "lora+phases"])
def test_doc_and_lora_eval_count_the_sidecar(tiny_data, lora):
    """Doc eval and LoRA TTT (with global phases) read bytes from the sidecar: its sum over the
    positions they scored (an independent numpy count), and the table bytes for a table-equal one."""
    from doc_streams import doc_env, doc_stream, make_val, noisy_model, run_doc
    h = tg.Hyperparameters.from_env(doc_env(tiny_data))
    h = tg.dataclasses.replace(h, phased_ttt_num_phases=2)
    rt = tg.Runtime(False, 0, 1, 0, torch.device("cpu"))
    val = make_val(doc_stream(h.vocab_size), h.vocab_size)
    t = val.tokens
    lut = torch.zeros(len(t), dtype=torch.int64)
    lut[1:] = val.target_bytes(t[:-1], t[1:])
    rand = torch.from_numpy(np.random.default_rng(3).integers(0, 9, size=len(t)))
    model = noisy_model(h)
    r0, _ = run_doc(model, val, h, rt, lora=lora)
    for side in (lut, rand):
        sval = tg.ValidationData(t, val.stream_len, val.base_bytes, val.has_leading_space, val.is_boundary, side)
        r, losses = run_doc(model, sval, h, rt, lora=lora)
        scored = losses.hit.numpy() > 0
        assert r.bytes == side.numpy()[scored].sum() and r.tokens == r0.tokens == scored.sum()
        assert r.loss_sum == r0.loss_sum
    assert r0.bytes == lut.numpy()[scored].sum() != rand.numpy()[scored].sum()


# ----------------------------------------------------------------------------------------------
# tests/tools/caseops_data.py: the transform, its inverse and the sidecar on real text

def test_transform_examples_and_inverse_on_adversarial_strings():
    from caseops_data import ALLCAPS, CAPNEXT, ESC, TITLE, inverse, transform
    assert transform("The NASA Launch") == f"{TITLE}the {ALLCAPS}nasa {TITLE}launch"
    assert transform("iPhone") == f"i{CAPNEXT}phone" and transform("I") == f"{TITLE}i"
    assert transform("OpenAI") == f"{TITLE}open{CAPNEXT}a{CAPNEXT}i"
    assert transform(f"x{TITLE}") == f"x{ESC}{TITLE}" and transform("AB1cD") == f"{ALLCAPS}ab1c{CAPNEXT}d"
    rng = np.random.default_rng(0)
    alphabet = list("aBcDeFxyzXYZQ 019\n.-") + ["é", "É", "東", "🙂", TITLE, ALLCAPS, CAPNEXT, ESC]
    for _ in range(2000):
        s = "".join(rng.choice(alphabet, size=int(rng.integers(0, 20))))
        t = transform(s)
        assert inverse(t) == s, repr(s)
        assert t.lower() == t or not any("A" <= c <= "Z" for c in t)  # no ASCII capital survives
    with pytest.raises(ValueError, match="marker"):
        inverse(f"{TITLE}1")


def real_documents(shard: str, n: int) -> list[str]:
    """The first n whole documents of a plain sp8192 stand-in shard, decoded back to text."""
    import sentencepiece as spm
    plain = spm.SentencePieceProcessor(model_file=str(SHARED_DATA / "tokenizers" / "fineweb_8192_bpe.model"))
    stream = np.asarray(tg.read_shard(str(SHARED_DATA / "standin_sp8192" / shard)), dtype=np.int64)
    starts = np.flatnonzero(stream == plain.bos_id())
    return [plain.decode(stream[a + 1:b].tolist()) for a, b in zip(starts[:n + 1], starts[1:n + 1])]


@pytest.mark.skipif(not (CASEOPS_TOKENIZER.exists() and (SHARED_DATA / "standin_sp8192").exists()),
                    reason="needs ../shared/data (CaseOps tokenizer, sp8192 stand-in)")
def test_sidecar_bytes_on_real_text_and_bpb(tmp_path, runtime):
    """Real documents (the sp8192 stand-in decoded): per doc the sidecar sum is its UTF-8 length,
    and the bpb over the sidecar equals the bpb from the original texts' byte count."""
    pytest.importorskip("google.protobuf")
    import sentencepiece as spm
    from caseops_data import build, encode_with_bytes, inverse, transform
    docs = real_documents("fineweb_val_000000.bin", 40)
    sp = spm.SentencePieceProcessor(model_file=str(CASEOPS_TOKENIZER))
    for text in docs:
        assert inverse(transform(text)) == text
        ids, counts = encode_with_bytes(sp, text)
        assert sum(counts) == len(text.encode("utf-8")) and len(ids) == len(counts)
    build(docs, sp, str(tmp_path), val_docs=30)
    h = tg.Hyperparameters.from_env(tiny_env(tmp_path, TOKENIZER_PATH=CASEOPS_TOKENIZER, VOCAB_SIZE=8192,
                                             CASEOPS_ENABLED=1, EVAL_SEQ_LEN=64))
    tg.check_caseops_tokenizer(h, sp)
    val = tg.load_validation(h, sp, runtime, 1)  # seq len 1: every target scored
    side = np.asarray(tg.read_shard(str(tmp_path / "fineweb_val_bytes_000000.bin")), dtype=np.int64)
    assert len(side) == len(val.tokens) and side.sum() == sum(len(d.encode("utf-8")) for d in docs[:30])
    s = tg.score_windows(_nll, val, tg.sliding_windows(len(val.tokens) - 1, 64, 64), 4, runtime)
    y = val.tokens[1:].numpy()
    nll_sum = ((y % 7) + 0.5).sum()
    text_bytes = sum(len(d.encode("utf-8")) for d in docs[:30])
    assert s[0].item() == nll_sum and s[2].item() == text_bytes
    assert tg.to_result(s, runtime, 0.0).val_bpb == pytest.approx(nll_sum / math.log(2) / text_bytes, rel=1e-12)


@pytest.mark.skipif(not (CASEOPS_TOKENIZER.exists() and (SHARED_DATA / "standin_sp8192").exists()),
                    reason="needs ../shared/data (CaseOps tokenizer, sp8192 stand-in)")
@pytest.mark.slow  # about 4 minutes on the shared 2-core machine (vocab 8192 on CPU)
def test_tiny_caseops_run_scores_the_sidecar_bytes(tmp_path):
    """A tiny CASEOPS_ENABLED=1 training run on CaseOps shards of real text: every phase's bytes
    are the sidecar's sum over the scored targets (numpy), not the tokenizer tables' count."""
    pytest.importorskip("google.protobuf")
    import json

    import sentencepiece as spm
    from caseops_data import build
    docs = real_documents("fineweb_train_000000.bin", 120)
    sp = spm.SentencePieceProcessor(model_file=str(CASEOPS_TOKENIZER))
    data = tmp_path / "data"
    build(docs, sp, str(data), val_docs=20)
    env = dict(tiny_env(data, TOKENIZER_PATH=CASEOPS_TOKENIZER, VOCAB_SIZE=8192, CASEOPS_ENABLED=1,
                        ITERATIONS=3, WARMUP_STEPS=0), RUN_ID="caseops")
    cwd = tmp_path / "run"
    cwd.mkdir()
    proc = run_script(env, cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((cwd / "logs" / "caseops.json").read_text())
    h = tg.Hyperparameters.from_env(env)
    tokens = np.asarray(tg.read_shard(str(data / "fineweb_val_000000.bin")), dtype=np.int64)
    side = np.asarray(tg.read_shard(str(data / "fineweb_val_bytes_000000.bin")), dtype=np.int64)
    seq = max(h.train_seq_len, h.eval_seq_len)
    usable = (len(tokens) - 1) // seq * seq
    base, space, bound = (t.numpy() for t in tg.build_byte_luts(sp, 8192))
    lut = (base[tokens[1:usable + 1]] + (space[tokens[1:usable + 1]] & ~bound[tokens[:usable]])).sum()
    assert side[1:usable + 1].sum() != lut
    for phase, r in s["eval"].items():
        if r is None:  # skipped (EVAL_PHASES)
            continue
        assert (r["tokens"], r["bytes"]) == (usable, side[1:usable + 1].sum()), phase
        assert r["val_bpb"] == pytest.approx(r["val_loss"] * r["tokens"] / (math.log(2) * r["bytes"]), rel=1e-12)


# ==============================================================================================
# data varlen


def walk_starts(ids: np.ndarray, bos: int, seg_len: int) -> np.ndarray:
    """Independent reading of the rule: walk each row; a segment starts at the row start, at every
    BOS, and seg_len tokens after the current segment's start (seg_len 0: never)."""
    out = np.zeros(ids.shape, dtype=bool)
    for b, row in enumerate(ids):
        seg_start = 0
        for t, tok in enumerate(row):
            if t == 0 or tok == bos or (seg_len and t - seg_start == seg_len):
                out[b, t], seg_start = True, t
    return out


class ReferenceVarlen:
    """flash_attn_varlen_func's contract, in plain SDPA per segment; records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, cu_q, cu_k, max_q, max_k, causal):
        assert causal and torch.equal(cu_q, cu_k) and max_q == max_k and cu_q.dtype == torch.int32
        self.calls.append((cu_q.clone(), max_q, getattr(self, "tag", None)))
        out = torch.zeros_like(q)
        rep = q.size(1) // k.size(1)
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            assert 0 <= b - a <= max_q
            if b > a:
                kv = (k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))
                qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, *kv))
                out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1)
        return out


@pytest.mark.parametrize("seg_len", [0, 7, 50, 64], ids=["rows", "cut7", "cut_eq_T", "cut_gt_T"])
@pytest.mark.parametrize("bos_every", [3.0, 20.0, 1e9], ids=["dense_bos", "sparse_bos", "no_bos"])
def test_segment_starts_match_an_independent_walk(seg_len, bos_every):
    ids = random_ids((3, 50), bos_every, seed=int(bos_every) % 97 + seg_len)
    got = tg.segment_starts(ids, BOS, seg_len).numpy()
    np.testing.assert_array_equal(got, walk_starts(ids.numpy(), BOS, seg_len))
    assert tg.segment_count(ids.numpy(), BOS, seg_len) == tg.segment_count(ids, BOS, seg_len) == got.sum()


def test_capacity_is_small_static_and_a_multiple_of_64():
    for B, T, L in ((48, 2048, 0), (1, 98_304, 2048), (32, 2048, 0), (64, 2048, 0), (8, 2048, 0)):
        cap = tg.varlen_capacity(B, T, L)
        assert cap % 64 == 0 and tg.VARLEN_MIN_SEQS <= cap <= min(1024, B * T // 64)  # 65,535 is the grid limit
        assert cap >= B * -(-T // (L or T)) + B * T // tg.VARLEN_TOKENS_PER_SEQ
    assert tg.varlen_capacity(48, 2048) == tg.varlen_capacity(1, 98_304, 2048) == 448
    assert tg.varlen_capacity(2, 30) == 60  # never more than B*T


def old_cu_seqlens(starts: torch.Tensor) -> torch.Tensor:
    """The pre-fix layout: every start, then padding with the total to B*T+1 entries."""
    n = starts.numel()
    pos = starts.flatten().nonzero().flatten()
    return torch.cat((pos, pos.new_full((n + 1 - len(pos),), n))).int()


@pytest.mark.parametrize("shape,seg_len", [((4, 64), 0), ((1, 256), 40)], ids=["rows", "packed_row"])
def test_bounded_cu_seqlens_give_the_attention_of_each_segment_alone(shape, seg_len, monkeypatch):
    """Capacity below B*T: cu_seqlens has capacity + 1 entries, the starts then the total, and the
    attention equals the old B*T+1 padding and each segment computed alone (independent SDPA)."""
    monkeypatch.setattr(tg, "VARLEN_MIN_SEQS", 64)
    ids = random_ids(shape, 9.0, seed=3)
    B, T = shape
    cap = tg.varlen_capacity(B, T, seg_len)
    assert cap == 64 < B * T
    ref = ReferenceVarlen()
    monkeypatch.setitem(tg._ATTENTION, "varlen", ref)
    docs = tg.document_segments(ids, BOS, seg_len)
    starts = walk_starts(ids.numpy(), BOS, seg_len)
    cu = docs.cu_seqlens.tolist()
    assert len(cu) == cap + 1 and docs.max_seqlen == min(T, seg_len or T) and starts.sum() < cap
    assert cu[:starts.sum()] == np.flatnonzero(starts).tolist() and set(cu[starts.sum():]) == {B * T}
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, h, 8, generator=g) for h in (4, 2, 2))
    new = tg.document_attention(q, k, v, docs)
    old = tg.document_attention(q, k, v, tg.VarlenSegments(old_cu_seqlens(torch.from_numpy(starts)), T))
    torch.testing.assert_close(new, old, rtol=0, atol=0)
    flat = [t.flatten(0, 1) for t in (q, k, v)]
    edges = np.append(np.flatnonzero(starts), B * T)
    for a, b in zip(edges[:-1], edges[1:]):  # each segment alone, GQA by repetition
        qs, ks, vs = flat[0][a:b], flat[1][a:b].repeat_interleave(2, 1), flat[2][a:b].repeat_interleave(2, 1)
        alone = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (qs, ks, vs)), is_causal=True)
        torch.testing.assert_close(new.flatten(0, 1)[a:b], alone.transpose(0, 1), rtol=1e-5, atol=1e-6)
    monkeypatch.setitem(tg._ATTENTION, "varlen", None)  # the masked SDPA path: the same attention
    torch.testing.assert_close(tg.document_attention(q, k, v, tg.document_segments(ids, BOS, seg_len)), new,
                               rtol=1e-5, atol=1e-6)


def test_packed_row_model_forward_equals_on_both_paths(tiny_data, monkeypatch):
    """A packed (1, N) row with GPT.segment_len: the varlen path and the masked SDPA path agree."""
    h = tg.Hyperparameters.from_env(doc_env(tiny_data, DOC_MASKING=1, BOS_ID=BOS, SMEAR_GATE_ENABLED=1, GATE_WINDOW=8))
    model = noisy_model(h)
    model.segment_len = 24
    ids = random_ids((1, 160), 60.0, seed=5)
    with torch.no_grad():
        masked = model.forward_hidden(ids)
        ref = ReferenceVarlen()
        monkeypatch.setitem(tg._ATTENTION, "varlen", ref)
        got = model.forward_hidden(ids)
    assert ref.calls and all(L == 24 for _, L, _ in ref.calls)
    torch.testing.assert_close(got, masked, rtol=1e-5, atol=1e-5)


def test_overflow_is_caught_on_the_host_with_a_clear_error(monkeypatch):
    monkeypatch.setattr(tg, "VARLEN_MIN_SEQS", 64)
    ids = np.full((4, 64), 7)
    ids[:, ::2] = BOS  # 128 segments, capacity 64
    with pytest.raises(tg.VarlenOverflow, match=r"shape \(4, 64\) holds 128 attention segments, more than the "
                                                r"varlen capacity 64"):
        tg.check_varlen_rows(ids, BOS)
    with pytest.raises(tg.VarlenOverflow):
        tg.varlen_batch_size(ids, BOS)
    ids[:, ::2] = 7
    ids[:, ::4] = BOS  # 64 segments: fits exactly
    assert tg.varlen_batch_size(ids, BOS) == 64 and tg.segment_count(ids, BOS) == 64


# ----------------------------------------------------------------------------------------------
# The record's shapes on FineWeb-like documents (the sp8192 stand-in train shard, never val)

STANDIN_TRAIN = SHARED_DATA / "standin_sp8192" / "fineweb_train_000000.bin"


@pytest.mark.skipif(not STANDIN_TRAIN.exists(), reason="needs ../shared/data/standin_sp8192")
def test_record_shape_batches_get_a_few_hundred_sequences_not_98k():
    """Every 48 x 2048 micro-batch (and every packed (1, 98,304) row cut at 2048) of the train
    shard, at a stride of 8,192 tokens: the varlen batch is varlen_capacity (448), the segments fit
    with room, and both are far below FA3's 65,535 grid limit (the old layout: 98,304)."""
    tokens = np.asarray(tg.read_shard(str(STANDIN_TRAIN)))
    n, most = 98_304, 0
    for s in range(0, len(tokens) - n, 8192):
        window = tokens[s:s + n]
        for ids, seg_len in ((window.reshape(48, 2048), 0), (window[None], 2048)):
            assert tg.varlen_batch_size(ids, BOS, seg_len) == 448 < 65_535
            most = max(most, tg.segment_count(ids, BOS, seg_len))
    assert 48 < most < 448 // 2  # measured: at most 135 segments


# ----------------------------------------------------------------------------------------------
# F1(b): single-document rows use plain causal attention, with the same scores


@pytest.fixture(scope="module")
def masked_artifact(tiny_data, tmp_path_factory):
    """A doc-masked noisy tiny model as an artifact, next to the first 3,000 val tokens."""
    base = tmp_path_factory.mktemp("varlen_e2e")
    h = tg.Hyperparameters.from_env(doc_env(tiny_data, DOC_MASKING=1, BOS_ID=BOS))
    state = {k: v.detach() for k, v in noisy_model(h).state_dict().items()}
    blob = tg.pack_artifact(tg.quantize_state(state, {}, tg.QuantSpec.of(h)),
                            tg.ModelConfig.of(h), "zstd")
    (base / "model.ptz").write_bytes(blob)
    (base / "data").mkdir()
    tokens = tg.read_shard(str(tiny_data / "fineweb_val_000000.bin"))[:3000]
    tg.write_shard(str(base / "data" / "fineweb_val_000000.bin"), tokens)
    return base / "model.ptz"


def run_eval(tiny_data, artifact, tmp_path, monkeypatch, run_id: str, old_behaviour: bool) -> tuple[dict, list]:
    """The script's doc-mode eval (roundtrip, doc, LoRA TTT with 2 global phases) with the
    reference varlen as FA3; returns (summary, the phase of every varlen call). old_behaviour:
    every forward masked, as before the fix."""
    ref = ReferenceVarlen()
    ref.tag = "roundtrip"

    def tracked(name, fn):
        def run(*a, **k):
            ref.tag = name
            try:
                return fn(*a, **k)
            finally:
                ref.tag = "roundtrip"
        return run
    monkeypatch.setattr(tg, "select_attention_backend",
                        lambda requested, device_type: tg._ATTENTION.update(name="sdpa", fn=None, varlen=ref) or "sdpa")
    monkeypatch.setattr(tg, "evaluate_docs", tracked("doc", tg.evaluate_docs))
    monkeypatch.setattr(tg, "lora_ttt_evaluate", tracked("ttt", tg.lora_ttt_evaluate))
    if old_behaviour:
        real = tg.GPT.forward_hidden
        monkeypatch.setattr(tg.GPT, "forward_hidden", lambda self, ids, doc_mask=True: real(self, ids, True))
    monkeypatch.chdir(tmp_path)
    env = dict(doc_env(tiny_data, RUN_ID=run_id, EVAL_ARTIFACT=artifact, TTT_BATCH_SIZE=8, TTT_CHUNK_SIZE=16,
                       PHASED_TTT_NUM_PHASES=2, PHASED_TTT_PREFIX_DOCS=16, GLOBAL_TTT_CHUNK_TOKENS=512,
                       GLOBAL_TTT_BATCH_SEQS=8), DATA_PATH=str(artifact.parent / "data"))
    assert tg.main(env) == 0
    return json.loads((tmp_path / "logs" / f"{run_id}.json").read_text()), [tag for *_, tag in ref.calls]


def test_single_document_rows_never_reach_varlen_and_score_the_same(tiny_data, masked_artifact, tmp_path, monkeypatch):
    new, phases = run_eval(tiny_data, masked_artifact, tmp_path, monkeypatch, "new", old_behaviour=False)
    assert set(phases) == {"roundtrip"}  # multi-document windows still go through varlen
    with monkeypatch.context() as m:
        old, old_phases = run_eval(tiny_data, masked_artifact, tmp_path, m, "old", old_behaviour=True)
    assert {"doc", "ttt"} <= set(old_phases)  # the check has teeth: before the fix they did
    assert new["eval"]["ttt"]["phases_run"] == 2
    for phase in ("roundtrip", "doc", "ttt"):
        a, b = new["eval"][phase], old["eval"][phase]
        assert (a["tokens"], a["bytes"]) == (b["tokens"], b["bytes"])
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6, abs=0), phase


def test_packed_training_gives_varlen_one_row_cut_at_train_seq_len(tiny_data, monkeypatch):
    """TRAIN_LOADER=packed: each micro-step is one (1, 4096) row, segments at most TRAIN_SEQ_LEN;
    masked calibration goes the same way, dense calibration never reaches varlen."""
    from conftest import tiny_env
    h = tg.Hyperparameters.from_env(tiny_env(tiny_data, TRAIN_LOADER="packed", DOC_MASKING=1, BOS_ID=BOS,
                                             ITERATIONS=2, WARMUP_STEPS=0, GPTQ_CALIB_BATCHES=1))
    ref = ReferenceVarlen()
    monkeypatch.setitem(tg._ATTENTION, "varlen", ref)
    base = tg.GPT(tg.ModelConfig.of(h))
    result, _, loader = tg.train(base, base, h, RT)
    assert base.segment_len == h.train_seq_len == 128 and ref.calls
    cap = tg.varlen_capacity(1, 4096, 128)
    assert all(L == 128 and cu[-1] == 4096 and len(cu) == cap + 1 for cu, L, _ in ref.calls)
    n = len(ref.calls)
    tg.calibrate(base, loader, h, RT, result.train_time_ms)
    assert len(ref.calls) > n
    n = len(ref.calls)
    dense = tg.calibrate(base, loader, dataclasses.replace(h, gptq_calib_attention="dense"), RT).hessians
    assert len(ref.calls) == n and "blocks.0.attn.c_q.weight" in dense


def test_frontier_preset_follows_the_record_here():
    """PRESET=frontier: the record's loader, no EMA warm-up, skip_gates fp16, dense calibration (issue 19)."""
    h = tg.Hyperparameters.from_env({"PRESET": "frontier"})
    assert (h.train_loader, h.ema_warmup, h.gate_patterns) == ("packed", False, ("attn_gate",))
    assert h.gptq_calib_attention == "dense"
    assert tg.Hyperparameters.from_env({"PRESET": "frontier", "TRAIN_LOADER": "coprime", "EMA_WARMUP": "1"}).ema_warmup


@pytest.mark.parametrize("varlen", [False, True], ids=["sdpa_mask", "cu_seqlens"])
def test_segments_compile_in_one_graph_and_equal_eager(varlen, monkeypatch):
    """Inductor, fullgraph, static shapes: the packed cut (cummax) and nonzero_static at the capacity."""
    monkeypatch.setitem(tg._ATTENTION, "varlen", ReferenceVarlen() if varlen else None)
    ids = random_ids((2, 256), 37.0, seed=4)
    torch._dynamo.reset()
    got = torch.compile(tg.document_segments, fullgraph=True, dynamic=False)(ids, BOS, 40)
    want = tg.document_segments(ids, BOS, 40)
    if varlen:
        assert torch.equal(got.cu_seqlens, want.cu_seqlens) and got.max_seqlen == want.max_seqlen == 40
    else:
        assert torch.equal(got, want)


def test_eval_windows_are_checked_before_scoring(tiny_data, monkeypatch):
    """Multi-document eval windows (roundtrip, sliding) with DOC_MASKING: the largest batch's
    segments, counted here batch by batch from the windows, are reported before any forward."""
    h = tg.Hyperparameters.from_env(doc_env(tiny_data, DOC_MASKING=1, BOS_ID=BOS, EVAL_SEQ_LEN=128, EVAL_STRIDE=64,
                                            EVAL_BATCH_SEQS=8))
    model = noisy_model(h)
    tokens = np.tile(np.array([BOS, 40, 41, 42], dtype=np.int64), 700)
    tokens[:1000:3] = BOS  # a denser stretch: the first batches hold more segments
    from doc_streams import make_val
    val = make_val(tokens[:len(tokens) // 128 * 128 + 1], h.vocab_size)
    wins = tg.sliding_windows(len(val.tokens) - 1, 128, 64)
    x = [val.tokens[w0:w0 + 128] for w0 in wins[:, 0]]
    x += [x[-1]] * (-len(x) % 8)
    most = max(tg.segment_count(torch.stack(x[b:b + 8]), BOS) for b in range(0, len(x), 8))
    assert most > tg.varlen_capacity(8, 128) == 256
    calls = []
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(tg.VarlenOverflow, match=f"eval batch of shape \\(8, 128\\) holds {most} attention segments"):
        tg.evaluate(tg.nll_function(model), val, h, RT, 64)
    assert not calls
    tg.evaluate(tg.nll_function(noisy_model(h)), val, dataclasses.replace(h, doc_masking=False), RT, 64)  # unchecked


@pytest.mark.parametrize("seg_len", [0, 1, 7, 50, 64])
@pytest.mark.parametrize("bos_every", [1.5, 6.0, 40.0])
def test_numpy_segment_count_equals_the_walk(seg_len, bos_every):
    """The loaders' host count (numpy, every micro-step) equals the independent walk and the
    tensor path of segment_starts."""
    for seed in range(3):
        ids = random_ids((5, 50), bos_every, seed).numpy().astype(np.uint16)
        want = int(walk_starts(ids, BOS, seg_len).sum())
        assert tg.segment_count(ids, BOS, seg_len) == want
        assert tg.segment_count(torch.from_numpy(ids.astype(np.int64)), BOS, seg_len) == want


FA3_BLOCK_M = 128  # hopper/flash_bwd_launch_template.h: kBlockM for hdim 64, causal
CUDA_GRID_Z_MAX = 65_535
H100_BYTES = 80 * 10**9


def fa3_varlen_backward_scratch(total_q: int, batch: int, heads: int, kv_heads: int, head_dim: int) -> int:
    """FA3 mha_bwd's varlen scratch (review F1, from hopper/flash_api.cpp): total_q + batch*kBlockM
    padded rows of fp32 dq_accum (heads x head_dim), dk/dv accum (kv heads x head_dim each, GQA),
    softmax_d and lse (heads each)."""
    rows = total_q + batch * FA3_BLOCK_M
    return rows * 4 * (heads * head_dim + 2 * kv_heads * head_dim + 2 * heads)


@pytest.mark.parametrize("shape,seg_len", [((48, 2048), 0), ((1, 98_304), 2048), ((32, 2048), 0)],
                         ids=["train_rows", "train_packed", "eval_batch"])
def test_fa3_backward_scratch_and_grid_fit_an_h100_at_the_record_shapes(shape, seg_len):
    """A CPU model of the GPU limits the varlen call must respect at the frontier's shapes (8 heads,
    4 KV heads, head dim 64): the grid's z dimension (= sequences) under 65,535 and the backward
    scratch a small part of 80 GB. The same model reproduces the review's crash for B*T+1 padding
    (98,304 sequences, ~53 GB), so it can tell the two apart."""
    B, T = shape
    cap = tg.varlen_capacity(B, T, seg_len)
    assert cap <= CUDA_GRID_Z_MAX
    # this model: 0.65 GB at the training shapes, 0.44 GB at the eval batch
    assert fa3_varlen_backward_scratch(B * T, cap, 8, 4, 64) < H100_BYTES // 20
    old = fa3_varlen_backward_scratch(98_304, 98_304, 8, 4, 64)
    assert 98_304 > CUDA_GRID_Z_MAX and 52e9 < old < 54e9

