"""CASEOPS_ENABLED: validation bytes from the fineweb_val_bytes_*.bin sidecar (one count per val token)
instead of the tokenizer's byte tables, on one road (ValidationData.token_bytes) for every scorer;
a missing, misaligned or short sidecar and a tokenizer/flag mismatch are one error line, exit 2."""

import math
import shutil

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import assert_one_error_line, SHARED_DATA, run_script, tiny_env

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
