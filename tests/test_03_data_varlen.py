"""Document masking's FA3 varlen path (issue 19 F1): segment starts against an independent walk,
cu_seqlens of a small static length (varlen_capacity) whose attention equals each segment run on
its own and the old B*T+1 padding, the host-side overflow check (a VarlenOverflow, and exit 2 from
the script), the count at the record's shapes on the sp8192 stand-in train shard, and single-document
rows (doc phase, LoRA TTT, global TTT) that never reach the varlen kernel and score the same.
FA3 is replaced by a reference varlen function (per-segment SDPA), so all of it runs on CPU.

    OMP_NUM_THREADS=1 python3 -m pytest -q tests/test_03_data_varlen.py
"""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import SHARED_DATA
from doc_streams import BOS, doc_env, noisy_model

RT = tg.Runtime(False, 0, 1, 0, torch.device("cpu"))


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


def random_ids(shape, bos_every: float, seed: int) -> torch.Tensor:
    g = np.random.default_rng(seed)
    ids = g.integers(4, 60, shape)
    ids[g.random(shape) < 1 / bos_every] = BOS
    return torch.from_numpy(ids)


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


def test_script_exits_2_naming_the_capacity_when_documents_are_too_short(tiny_data, tmp_path, monkeypatch, capsys):
    """Training shards of 3-token documents: the first batch holds 1,387 segments for 256 sequences."""
    data = tmp_path / "data"
    data.mkdir()
    tokens = np.tile(np.array([BOS, 40, 41], dtype=np.uint16), 6000)
    tg.write_shard(str(data / "fineweb_train_000000.bin"), tokens)
    tg.write_shard(str(data / "fineweb_val_000000.bin"), tokens[:3000])
    monkeypatch.chdir(tmp_path)
    env = dict(doc_env(tiny_data, DOC_MASKING=1, RUN_ID="overflow"), DATA_PATH=str(data))
    assert tg.main(env) == 2
    err = capsys.readouterr().err.strip().splitlines()
    first = tokens[:32 * 128].reshape(32, 128)  # the sequential loader's first batch
    segments = int((first == BOS).sum() + (first[:, 0] != BOS).sum())  # 1,366 BOS + 21 rows starting mid-document
    assert len(err) == 1 and err[0].startswith(f"error: DOC_MASKING: a batch of shape (32, 128) holds {segments} "
                                               "attention segments, more than the varlen capacity 256")
    assert not (tmp_path / tg.ARTIFACT_NAME).exists()


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


def test_calibration_attention_knob_picks_the_forward(tiny_data):
    """GPTQ_CALIB_ATTENTION=dense: the Hessians of the plain causal forward, masked: of the masked one."""
    h = tg.Hyperparameters.from_env(doc_env(tiny_data, DOC_MASKING=1, BOS_ID=BOS))
    model = noisy_model(h)
    ids = random_ids((2, 32), 5.0, seed=2)
    batches = [(ids, ids)]
    masked, dense = (tg.collect_hessians(model, batches, RT, doc_mask=m) for m in (True, False))
    unmasked = copy.deepcopy(model)
    unmasked.cfg = dataclasses.replace(unmasked.cfg, doc_masking=False)
    plain = tg.collect_hessians(unmasked, batches, RT)
    name = "blocks.1.attn.c_q.weight"  # layer 1's input depends on layer 0's attention
    torch.testing.assert_close(dense[name], plain[name])
    assert not torch.allclose(masked[name], dense[name])
    assert tg.Hyperparameters.from_env(doc_env(tiny_data)).gptq_calib_attention == "masked"
    with pytest.raises(tg.ConfigError, match="^GPTQ_CALIB_ATTENTION=causal: must be one of"):
        tg.Hyperparameters.from_env(doc_env(tiny_data, GPTQ_CALIB_ATTENTION="causal"))


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
