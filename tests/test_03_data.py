"""Data: the shard format (round trip and every header rule), shard globbing, the sequential
loader's world-size-invariant stream, batch_geometry, and the coprime multi-shard loader.

    python3 -m pytest -q tests/test_03_data.py
"""

import shutil

import numpy as np
import pytest
import torch

import train_gpt as tg


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


def test_truncated_last_train_shard_fails_before_step_1(tiny_data, tmp_path, monkeypatch, capsys):
    from conftest import tiny_env
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    last = sorted(data.glob("fineweb_train_*.bin"))[-1]
    last.write_bytes(last.read_bytes()[:-2])  # one token short of what its header promises
    monkeypatch.chdir(tmp_path)
    assert tg.main(tiny_env(data, RUN_ID="cut", DEVICE="cpu")) == 2
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {last}: file is") and "header promises" in err[0], err
    assert "step:1/" not in out.out and "train_shards:" not in out.out


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
