"""Section 08 of train_gpt.py, quantize and pack: GPTQ and int6, the frontier quantizer, pergroup,
the packed script.

Quantization and serialization (train_gpt.py section "Quantization and serialization";
spec/stack.md section 7; rules D1/D2).

Covers:
- gptq_quantize with H=None against round-to-nearest computed here in numpy: one clip candidate
  (scale = fp16(max(clip/31, 1/31)) per row), and the full candidate list (each row keeps the
  candidate with the least squared error), on rows above and below the 1/31 scale floor;
- full-Hessian GPTQ beats RTN in output error ||X (W - Wq)^T||^2 on correlated activations (on a tiny
  GPT with Hessians from collect_hessians: test_07_calibrate.py);
  dead inputs (diag(H) = 0) quantize to 0;
- error bounds of the int6 and int8 row quantizers, value ranges and dtypes;
- quantize_state classification (int6 / int8 / fp16), pack/unpack bitwise exactness with both
  compressors, exact round trip of on-grid weights, the format check;
- the decimal 16,000,000-byte cap in write_artifact and code_bytes (D1/D2);
- a GPT rebuilt from the artifact alone gives the same per-token NLL as the dequantized weights.

Frontier quantization and serialization (issue 10 items 1-5, issue 8's serialization items;
frontier.md section 4).

Covers:
- SDClip: the stored step is fp16(k * std(row) / qmax) with k per tensor type, and the round-to-
  nearest error is at most half a step inside the clip (numpy reference);
- GPTQ of the tied embedding at EMBED_BITS=7: codes within +-63, error bound, head Hessian used;
- LQER: it lowers ||W - W_hat||_F of the tensors it corrects (the largest residuals) and leaves
  every other tensor bit-identical;
- the quant gate: gate weights (GATE_PARAM_PATTERNS, GATE_NUMEL_RANGE) as int8 rows, half-step bound;
- each compressor round-trips bit-exactly and decompress() tells them apart; every option packs and
  unpacks bit for bit; QUANT_COMPRESSOR=auto compresses once per compressor and keeps the smallest;
- pruning to fit lands under the budget with the new formats in a few compressions (counted);
- GPTQ's Cholesky fallback: more damping, then the identity Hessian, logged with the matrix name;
- the process group's timeout (bad input, one error line and exit 2: test_14_errors.py);
- an artifact written with every option on loads with EVAL_ARTIFACT alone.

QUANT_COMPRESSOR=pergroup (issue 19 finding 4): #1855's per-group layout with zpaq for its lrzip,
and the compressed-size projection from code entropy (project_model_bytes).

Covers: the round trip is bit-exact and the reader tells the container by its magic; the grouped
matrices are stored by role, layer by layer in numeric order, transposed; without the zpaq package
the setting and the reader are one ConfigError naming the variable and `pip install zpaq`; on i.i.d.
int6 codes of a known distribution the container is under brotli-11 and within 1% of the exact
entropy; the projection is within a few percent of a real compression of a small model.

The packed, self-extracting train_gpt.py (tests/tools/pack.py; issue 10 item 6, rule D2; issue 17 item 8).

Covers: the literal escapes exactly NUL, CR, LF, the quote and the backslash, and Python's own parser
reads every byte value back; the packed file is small, stdlib-only Python that unpacks to the exact
source and runs as the script itself (`__name__`, `__file__`, the source's line numbers in a
traceback); run on the tiny CPU path it gives the same scores as the source (bit for bit), logs as
code bytes its own size on disk and the source inside as the logged code, and counts artifact total =
that + model bytes (the usage error: test_14_errors.py).

    python3 -m pytest -q tests/test_08_quantize.py -m "slow or not slow"
"""

import dataclasses
import importlib.util
import inspect
import io
import json
import lzma
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import pack
import train_gpt as tg
from conftest import ROOT, quant_spec, tiny_env, script_env
from helpers import (BLOCK_LINEAR, output_error, realistic_model, token_batches, ALL_OPTIONS,
    trained_like_state)


# ==============================================================================================
# quantize


# ---------------------------------------------------------------------------------------------
# Independent reference: round-to-nearest int6 with a per-row clip, in numpy (float64 clip)

def rtn_reference(W: np.ndarray, quantile: float) -> tuple[np.ndarray, np.ndarray]:
    """(q, scale) with scale = fp16(max(clip/31, 1/31)), q = clamp(round(W/scale), -31, 31)."""
    a = np.abs(W.astype(np.float64))
    clip = a.max(axis=1) if quantile >= 1.0 else np.quantile(a, quantile, axis=1)
    scale = np.maximum(clip / 31.0, 1.0 / 31.0).astype(np.float16).astype(np.float32)
    q = np.clip(np.round(W.astype(np.float32) / scale[:, None]), -31, 31)
    return q, scale


def sample_rows(seed: int = 0) -> np.ndarray:
    """48 x 256 weights: 32 heavy-tailed rows with max |w| > 1 (clip choice matters) and 16 rows
    with max |w| < 1 (every candidate hits the 1/31 floor)."""
    rng = np.random.default_rng(seed)
    big = (0.3 * rng.standard_t(df=3, size=(32, 256))).astype(np.float32)
    small = rng.uniform(-0.6, 0.6, size=(16, 256)).astype(np.float32)
    W = np.concatenate([big, small])
    assert (np.abs(W[:32]).max(axis=1) > 1.0).all() and (np.abs(W[32:]).max(axis=1) < 1.0).all()
    return W


# ---------------------------------------------------------------------------------------------
# GPTQ with the identity Hessian is round-to-nearest with the clip search

@pytest.mark.parametrize("quantile", [1.0, 0.999], ids=["clip_max", "clip_q0.999"])
def test_identity_gptq_single_clip_equals_rtn(quantile):
    W = sample_rows()
    q, s = tg.gptq_quantize(torch.from_numpy(W), None, clip_quantiles=(quantile,))
    q_ref, s_ref = rtn_reference(W, quantile)
    assert q.dtype == torch.int8 and s.dtype == torch.float16
    assert q.shape == W.shape and s.shape == (W.shape[0],)
    np.testing.assert_array_equal(s.float().numpy(), s_ref)
    np.testing.assert_array_equal(q.numpy().astype(np.float32), q_ref)
    # the floor is the step only for the small rows; large rows have distinct, larger steps
    floor = np.float32(np.float16(1 / 31))
    assert (s_ref[32:] == floor).all() and (s_ref[:32] > floor).all()


def test_identity_gptq_default_candidates_pick_least_error_per_row():
    W = sample_rows(seed=3)
    q, s = tg.gptq_quantize(torch.from_numpy(W), None)
    cands = [rtn_reference(W, c) for c in tg.CLIP_QUANTILES]
    errs = np.stack([((W.astype(np.float64) - qc * sc[:, None].astype(np.float64)) ** 2).sum(1)
                     for qc, sc in cands])  # (K, rows)
    best = errs.argmin(0)
    chosen = []
    for r in range(W.shape[0]):
        # a near-tie (relative gap < 1e-6) may go either way in float32; accept any tied candidate
        tied = [k for k in range(len(cands)) if errs[k, r] <= errs[best[r], r] * (1 + 1e-6)]
        ok = [k for k in tied if np.array_equal(q[r].numpy().astype(np.float32), cands[k][0][r])
              and s[r].float().item() == cands[k][1][r]]
        assert ok, f"row {r}: result is not the least-error RTN candidate {best[r]}"
        chosen.append(best[r])
    # the selection is exercised: large rows do not all keep the same clip level
    assert len(set(int(k) for k in np.array(chosen)[:32])) >= 2


def test_gptq_dead_inputs_quantize_to_zero():
    """An input that is never active (diag(H) = 0) has no effect on the output: its weight column
    is stored as 0 (spec 7.4 step 1) and the factorisation still succeeds."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(512, 32, generator=g) @ torch.randn(32, 32, generator=g)
    X[:, [3, 17]] = 0
    W = torch.randn(16, 32, generator=g)
    q, s = tg.gptq_quantize(W, X.T @ X)
    assert (q[:, [3, 17]] == 0).all()
    live = [c for c in range(32) if c not in (3, 17)]
    assert (q[:, live] != 0).float().mean() > 0.8  # the live columns are not zeroed with them
    q_r, s_r = tg.gptq_quantize(W, None)
    assert output_error(X, W, q, s) < output_error(X, W, q_r, s_r)


# ---------------------------------------------------------------------------------------------
# Full-Hessian GPTQ beats round-to-nearest in output error

def test_gptq_beats_rtn_on_correlated_activations():
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(2048, 64, generator=g)
    A = torch.randn(64, 64, generator=g)
    X = Z @ A  # correlated inputs: the case GPTQ's error feedback is for
    H = X.T @ X
    W = 1.5 * torch.randn(32, 64, generator=g)
    assert (W.abs().amax(1) > 1).all()
    q_g, s_g = tg.gptq_quantize(W, H)
    q_r, s_r = tg.gptq_quantize(W, None)
    assert q_g.abs().max() <= 31 and q_g.dtype == torch.int8 and s_g.dtype == torch.float16
    err_g, err_r = output_error(X, W, q_g, s_g), output_error(X, W, q_r, s_r)
    assert err_g < 0.7 * err_r, (err_g, err_r)
    # lazy block updates are a reordering of the same arithmetic: block size barely matters
    q_b, s_b = tg.gptq_quantize(W, H, block_size=16)
    assert (q_b == q_g).float().mean() > 0.98
    assert output_error(X, W, q_b, s_b) < 0.7 * err_r


# ---------------------------------------------------------------------------------------------
# Error bounds, ranges, dtypes

@pytest.mark.parametrize("quantile", [1.0, 0.999], ids=["clip_max", "clip_q0.999"])
def test_int6_rtn_error_at_most_half_step(quantile):
    W = torch.from_numpy(sample_rows(seed=5))
    q, s = tg.gptq_quantize(W, None, clip_quantiles=(quantile,))
    assert q.dtype == torch.int8 and s.dtype == torch.float16
    assert q.abs().max() <= 31
    sf = s.float()[:, None]
    deq = tg.dequantize_rows(q, s)
    a = W.double().abs().numpy()
    clip = torch.from_numpy(a.max(1) if quantile == 1.0 else np.quantile(a, quantile, axis=1)).float()
    inside = W.abs() <= clip[:, None]
    err = (deq - W).abs()
    assert (err[inside] <= (sf / 2).expand_as(W)[inside] + 1e-6).all()
    if quantile == 1.0:
        assert inside.all()
    else:  # entries beyond the representable range saturate at +-31 with their own sign
        sat = W.abs() > 31.5 * sf
        assert sat.any() and (~inside).any()
        assert torch.equal(q[sat].long(), 31 * torch.sign(W[sat]).long())


def int8_case():
    g = torch.Generator().manual_seed(6)
    W = 0.8 * torch.randn(300, 256, generator=g)
    W[:20] *= 0.05  # rows whose clip is below 1: step = the 1/127 floor
    W[25, 7] = 40.0  # an outlier far beyond the clip quantile
    q, s = tg.quantize_int8_rows(W)
    clip = torch.from_numpy(np.quantile(W.double().abs().numpy(), 0.9999984, axis=1)).float()
    return W, q, s, clip


def test_int8_rows_range_dtype_and_clip():
    W, q, s, clip = int8_case()
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (300,)
    assert q.abs().max() <= 127
    expected_s = torch.maximum(clip / 127, torch.tensor(1 / 127)).half()
    assert torch.equal(s, expected_s)
    assert (s[:20].float() == torch.tensor(1 / 127).half().float()).all()
    Wc = torch.maximum(torch.minimum(W, clip[:, None]), -clip[:, None])
    deq = tg.dequantize_rows(q, s)
    # half a step, plus what storing the scale in fp16 (unit roundoff 2^-11) costs at |q| <= 127
    sf = s.float()[:, None]
    assert ((deq - Wc).abs() <= sf / 2 + q.abs().float() * sf * 2.0 ** -11 + 1e-6).all()
    assert abs(deq[25, 7].item() - clip[25].item()) <= s[25].item()  # the outlier is clipped


def test_int8_rows_error_at_most_half_stored_step():
    """Rounding uses the fp16 scale that is stored, so the bound holds for the stored step."""
    W, q, s, clip = int8_case()
    Wc = torch.maximum(torch.minimum(W, clip[:, None]), -clip[:, None])
    err = (tg.dequantize_rows(q, s) - Wc).abs()
    assert (err <= s.float()[:, None] / 2 + 1e-6).all(), int((err > s.float()[:, None] / 2 + 1e-6).sum())


def numpy_row_codes(x: np.ndarray, stat: np.ndarray, levels: float, floor: float, lo: int, hi: int):
    """The row quantizers' rule computed in numpy float32: step = fp16(max(stat / levels, floor)),
    codes = clip(round-half-even(x / step), lo, hi)."""
    step = np.maximum(stat.astype(np.float32) / np.float32(levels), np.float32(floor)).astype(np.float16)
    codes = np.clip(np.round(x.astype(np.float32) / step.astype(np.float32)[:, None]), lo, hi).astype(np.int8)
    return codes, step


def row_case() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    W = torch.randn(12, 40, generator=g) * torch.logspace(-6, 1, 12)[:, None]
    W[3] = 0.0  # a zero row: the floor step, all codes 0
    W[5, :5] = torch.tensor([31.75, 0.125, 0.375, -0.625, 0.875])  # step 0.25 exactly: ties round half to even
    return W


def test_row_quantizers_match_a_numpy_reference_bit_for_bit():
    """quantize_gate_rows, quantize_groups (LQER) and quantize_int8_rows are one rule (stored_step +
    quantize_rows) with their own statistic, levels, floor and range: each equals numpy's codes and
    fp16 steps exactly, zero rows included."""
    W = row_case()
    a = W.numpy()
    q, s = tg.quantize_gate_rows(W)
    rq, rs = numpy_row_codes(a, np.abs(a).max(1), 127, tg.SDCLIP_SCALE_FLOOR, -127, 127)
    assert q.dtype == torch.int8 and s.dtype == torch.float16
    assert np.array_equal(q.numpy(), rq) and np.array_equal(s.numpy(), rs)
    assert (q[3] == 0).all() and s[3].item() == np.float16(tg.SDCLIP_SCALE_FLOOR)
    assert s[5].item() == 0.25 and q[5, :5].tolist() == [127, 0, 2, -2, 4]
    for bits, asked, group in ((2, a.size, a.size), (4, 64, 60), (4, 7, 7)):  # 480 entries: 8 groups of 60
        flat = np.pad(a.ravel(), (0, -a.size % group)).reshape(-1, group)
        half = 2 ** (bits - 1)
        rq, rs = numpy_row_codes(flat, np.abs(flat).max(1), half - 0.5, tg.SDCLIP_SCALE_FLOOR, -half, half - 1)
        q, s = tg.quantize_groups(W, bits, asked)
        assert q.shape == W.shape and np.array_equal(q.numpy().ravel(), rq.ravel()[:a.size])
        assert np.array_equal(s.numpy(), rs), (bits, group)
    clip = torch.quantile(W.abs(), tg.INT8_CLIP_QUANTILE, dim=1).numpy()
    rq, rs = numpy_row_codes(np.clip(a, -clip[:, None], clip[:, None]), clip, 127, tg.INT8_SCALE_FLOOR, -127, 127)
    q, s = tg.quantize_int8_rows(W)
    assert np.array_equal(q.numpy(), rq) and np.array_equal(s.numpy(), rs)


def test_dequantize_groups_is_codes_times_group_step():
    """When the group divides the entries (LQER's B at every preset), dequantize_groups is each code
    times its group's stored step."""
    W = row_case()
    q, s = tg.quantize_groups(W, 4, 60)
    expect = (q.numpy().reshape(-1, 60).astype(np.float32) * s.numpy().astype(np.float32)[:, None]).reshape(W.shape)
    assert np.array_equal(tg.dequantize_groups(q, s).numpy(), expect)
    q, s = tg.quantize_gate_rows(W[0])  # a 1-D tensor is one row
    assert np.array_equal(tg.dequantize_rows(q, s).numpy(), q.numpy().astype(np.float32) * np.float32(s.item()))


def test_quant_spec_is_the_hyperparameters_fields_by_name():
    """QuantSpec's fields are Hyperparameters fields (same name and type, no defaults of its own);
    from_hparams copies each; the derived values follow from them."""
    hyper = {f.name: f for f in tg.dataclasses.fields(tg.Hyperparameters)}
    fields = tg.dataclasses.fields(tg.QuantSpec)
    assert all(f.name in hyper and f.type == hyper[f.name].type for f in fields), [f.name for f in fields]
    assert all(f.default is tg.dataclasses.MISSING and f.default_factory is tg.dataclasses.MISSING for f in fields)
    h = tg.Hyperparameters(gptq_block_size=32, int6_scale_floor=0.01, quant_embed="gptq", quant_clip="sdclip",
                           matrix_bits=5, embed_bits=7, matrix_clip_sigmas=1.0, mlp_clip_sigmas=2.0,
                           attn_clip_sigmas=3.0, embed_clip_sigmas=4.0, gated_attn_quant_gate=True,
                           quant_gate_patterns="attn_gate", lqer_enabled=True, lqer_rank=2, lqer_top_k=5,
                           lqer_factor_bits=3, lqer_asym_group=16)
    spec = tg.QuantSpec.of(h)
    assert all(getattr(spec, f.name) == getattr(h, f.name) for f in fields)
    assert spec.embed_gptq and spec.lqer_tensors == 5 and spec.gate_patterns == ("attn_gate",)
    assert (spec.bits("tok_emb.weight"), spec.bits("blocks.0.mlp.fc.weight")) == (7, 5)
    off = tg.QuantSpec.of(tg.Hyperparameters(lqer_top_k=5))
    assert not off.embed_gptq and off.lqer_tensors == 0  # LQER_TOP_K counts only with LQER_ENABLED=1


# ---------------------------------------------------------------------------------------------
# Classification, pack/unpack, compressors, format

def classification_state(hparams) -> dict[str, torch.Tensor]:
    model = realistic_model(hparams, vocab_size=1152)  # tok_emb 1152 x 64 = 73,728 > 65,536
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    g = torch.Generator().manual_seed(7)
    state["extra.at_limit"] = torch.randn(256, 256, generator=g)  # exactly 65,536: fp16
    state["extra.over_limit"] = torch.randn(257, 256, generator=g)  # 2-D, > 65,536: int8
    state["extra.long_vector"] = torch.randn(70_000, generator=g)  # 1-D, > 65,536: fp16
    return state


def test_quantize_state_classification(hparams):
    state = classification_state(hparams)
    qstate = tg.quantize_state(state, {})
    int6 = {n for n in state if BLOCK_LINEAR.match(n)}
    int8 = {"tok_emb.weight", "extra.over_limit"}
    assert set(qstate["gptq"]) == int6 and len(int6) == 6 * hparams.num_layers
    assert set(qstate["int8"]) == int8
    assert set(qstate["fp16"]) == set(state) - int6 - int8
    assert {"blocks.0.resid_mix", "extra.at_limit", "extra.long_vector", "ve_embed.weight",
            "bigram.proj.weight"} <= set(qstate["fp16"])
    assert state["blocks.0.resid_mix"].ndim == 2
    for kind in ("gptq", "int8"):
        for n, (q, s) in qstate[kind].items():
            assert q.dtype == torch.int8 and q.shape == state[n].shape
            assert s.dtype == torch.float16 and s.shape == (state[n].size(0),)
            assert q.abs().max() <= (31 if kind == "gptq" else 127)
    for n, t in qstate["fp16"].items():
        assert t.dtype == torch.float16 and torch.equal(t, state[n].half())


@pytest.mark.parametrize("compressor,magic", [("zstd", b"\x28\xb5\x2f\xfd"), ("lzma", b"\xfd7zXZ\x00")])
def test_pack_unpack_bitwise(hparams, compressor, magic):
    state = classification_state(hparams)
    hessians = {n: torch.eye(state[n].size(1)) * 2 for n in list(state) if BLOCK_LINEAR.match(n)}
    qstate = tg.quantize_state(state, hessians, quant_spec(gptq_block_size=32))
    cfg = dataclasses.replace(tg.ModelConfig.of(hparams), vocab_size=1152)
    blob = tg.pack_artifact(qstate, cfg, compressor)
    assert blob.startswith(magic)
    cfg_back, state_back = tg.unpack_artifact(blob)
    assert cfg_back == cfg
    expected = tg.dequantize_state(qstate)
    assert set(state_back) == set(expected) == set(state)
    for n, t in expected.items():
        assert state_back[n].dtype == t.dtype == torch.float32
        assert torch.equal(state_back[n], t), n
    # decompress() tells the formats apart by magic, whatever the method that made the blob
    raw = b"pack me " * 1000
    for method in ("zstd", "lzma"):
        assert tg.decompress(tg.compress(raw, method)) == raw


TINY_CFG = tg.ModelConfig.of(tg.Hyperparameters())  # any config: these tests read the weights back


def test_on_grid_weights_round_trip_exactly():
    """W = q * s with s fp16-representable and >= 1/31, each row reaching |q| = 31: int6 (with and
    without a Hessian) and int8 (|q| = 127 twice per row) come back bit for bit."""
    g = torch.Generator().manual_seed(8)
    steps = torch.tensor([0.05, 0.0625, 0.1, 0.3, 1 / 31, 0.04]).half().float()
    q6 = torch.randint(-31, 32, (6, 64), generator=g).float()
    q6[:, 0], q6[:, 1] = 31, -31
    W6 = q6 * steps[:, None]
    q8 = torch.randint(-127, 128, (300, 256), generator=g).float()
    q8[:, 3], q8[:, 9] = 127, -127
    s8 = (0.008 + torch.rand(300, generator=g) / 50).half().float()
    assert (s8 > 1 / 127).all()
    W8 = q8 * s8[:, None]
    X = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)
    state = {"blocks.0.attn.c_q.weight": W6, "blocks.0.attn.c_k.weight": W6.clone(),
             "tok_emb.weight": W8, "blocks.0.attn_scale": torch.randn(64, generator=g).half().float()}
    qstate = tg.quantize_state(state, {"blocks.0.attn.c_q.weight": X.T @ X}, quant_spec(gptq_block_size=16))
    assert set(qstate["int8"]) == {"tok_emb.weight"}
    _, back = tg.unpack_artifact(tg.pack_artifact(qstate, TINY_CFG, "zstd"))
    for n, t in state.items():
        assert torch.equal(back[n], t), n


def test_unknown_artifact_format_raises():
    """An older format (a torch.save zip of pg-int6-v1) and a payload with another format name."""
    buf = io.BytesIO()
    torch.save({"format": "pg-int6-v1", "config": {}, "fp16": {}, "int6": {}, "int8": {}}, buf)
    header = b'{"format": "pg-int6-v0", "config": {}, "tensors": []}'
    for raw, name in ((buf.getvalue(), "None"), (len(header).to_bytes(4, "little") + header, "pg-int6-v0")):
        for blob in (tg.compress(raw, "zstd"), lzma.compress(raw)):
            with pytest.raises(tg.ConfigError, match=name):
                tg.unpack_artifact(blob)


def test_corrupt_or_truncated_artifact_is_a_config_error():
    """Random bytes, a cut compressed blob (each compressor) and a cut payload recompressed whole:
    each a ConfigError saying so, never the decompressor's or numpy's exception."""
    g = torch.Generator().manual_seed(3)
    state = {"tok_emb.weight": torch.randn(32, 16, generator=g), "blocks.0.attn_scale": torch.randn(16, generator=g)}
    qstate = tg.quantize_state(state, {}, quant_spec(gptq_block_size=16))
    tg.unpack_artifact(tg.pack_artifact(qstate, TINY_CFG, "zstd"))  # the uncut artifact loads
    raw = tg.decompress(tg.pack_artifact(qstate, TINY_CFG, "zstd"))
    blobs = [bytes(torch.randint(0, 256, (4000,), generator=g, dtype=torch.uint8).tolist())]
    blobs += [(b := tg.pack_artifact(qstate, TINY_CFG, c))[:len(b) // 2] for c in ("zstd", "lzma", "brotli")]
    for blob in blobs:
        with pytest.raises(tg.ConfigError, match=r"^EVAL_ARTIFACT: the artifact \(\d+ bytes\) does not decompress"):
            tg.unpack_artifact(blob)
    for cut in (len(raw) - 1, len(raw) - 300):
        with pytest.raises(tg.ConfigError, match=r"^EVAL_ARTIFACT: the artifact's payload \(\d+ bytes\) is corrupt"):
            tg.unpack_artifact(tg.compress(raw[:cut], "zstd"))


# ---------------------------------------------------------------------------------------------
# The decimal size cap (D1) and the code bytes (D2)

def test_size_limit_is_decimal_and_code_bytes_is_file_size():
    assert tg.SIZE_LIMIT_BYTES == 16_000_000 != 16 * 2**20
    assert inspect.signature(tg.write_artifact).parameters["limit"].default == 16_000_000
    script = ROOT / "train_gpt.py"
    assert tg.code_bytes() == os.path.getsize(script) == len(script.read_bytes())


def test_write_artifact_under_cap_writes_exact_bytes(tmp_path):
    blob = os.urandom(5000)
    path = tmp_path / "final_model.int6.ptz"
    limit = tg.code_bytes() + len(blob) + 1  # total is strictly below the limit
    sizes = tg.write_artifact(blob, str(path), limit)
    assert path.read_bytes() == blob and os.path.getsize(path) == len(blob)
    assert sizes["total_bytes"] == tg.code_bytes() + len(blob) and sizes["limit_bytes"] == limit
    assert os.listdir(tmp_path) == [path.name]  # no temp file left


@pytest.mark.parametrize("slack", [0, -1], ids=["at_limit", "over_limit"])
def test_write_artifact_over_cap_raises_and_writes_nothing(tmp_path, slack):
    blob = os.urandom(5000)
    code = tg.code_bytes()
    total = code + len(blob)
    limit = total + slack  # total >= limit: not under the cap
    with pytest.raises(tg.ConfigError) as exc:
        tg.write_artifact(blob, str(tmp_path / "final_model.int6.ptz"), limit)
    msg = str(exc.value)
    for number in (code, len(blob), total, limit):
        assert str(number) in msg, (number, msg)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# A model rebuilt from the artifact alone

def test_reloaded_model_matches_dequantized_weights(hparams, runtime):
    model = realistic_model(hparams, vocab_size=1152).eval()
    cfg = model.cfg
    batches = token_batches(cfg.vocab_size, n=2)
    hessians = tg.collect_hessians(model, batches, runtime)
    state = {n: t.detach() for n, t in model.state_dict().items()}
    qstate = tg.quantize_state(state, hessians, tg.QuantSpec.of(hparams))
    assert qstate["gptq"] and qstate["int8"] and qstate["fp16"]
    blob = tg.pack_artifact(qstate, cfg, "zstd")

    cfg_back, state_back = tg.unpack_artifact(blob)
    reloaded = tg.GPT(cfg_back).eval()
    reloaded.load_state_dict(state_back, strict=True)
    reference = tg.GPT(cfg).eval()
    reference.load_state_dict(tg.dequantize_state(qstate), strict=True)

    x, y = token_batches(cfg.vocab_size, n=1, seed=9)[0]
    with torch.no_grad():
        nll_reloaded = reloaded(x, y, reduction="none")
        nll_reference = reference(x, y, reduction="none")
        nll_original = model(x, y, reduction="none")
    assert nll_reloaded.shape == y.shape and torch.isfinite(nll_reloaded).all()
    assert torch.equal(nll_reloaded, nll_reference)
    assert not torch.equal(nll_reloaded, nll_original)  # the weights really were quantized


def test_embed_gptq_puts_the_tied_embedding_in_int6(hparams, tiny_model):
    state = {n: p.detach() for n, p in tiny_model.state_dict().items()}
    H = torch.eye(hparams.model_dim)
    default = tg.quantize_state(state, {"tok_emb.weight": H})
    embed = tg.quantize_state(state, {"tok_emb.weight": H}, quant_spec(quant_embed="gptq"))
    assert "tok_emb.weight" not in default["gptq"] and "tok_emb.weight" in embed["gptq"]
    q, s = embed["gptq"]["tok_emb.weight"]
    assert torch.equal((q, s)[0], tg.gptq_quantize(state["tok_emb.weight"], H)[0])
    assert set(embed["gptq"]) - {"tok_emb.weight"} == set(default["gptq"])


def test_int6_scale_floor_is_a_knob(tiny_model):
    """INT6_SCALE_FLOOR: the records' 1/31 puts every small row on the step 1/31; a lower floor
    keeps the row's own step max|w|/31 and a smaller error."""
    state = {n: p.detach() for n, p in tiny_model.state_dict().items()}
    name = "blocks.0.attn.c_q.weight"
    W = state[name]
    assert W.abs().amax() < 1.0  # a small matrix: the default floor binds on every row
    records = tg.quantize_state({name: W}, {})["gptq"][name]
    fine = tg.quantize_state({name: W}, {}, quant_spec(int6_scale_floor=1e-6))["gptq"][name]
    assert torch.all(records[1].float() == torch.tensor(1 / 31).half().float())
    assert torch.all(fine[1].float() <= (W.abs().amax(1) / 31).half().float())  # the row's own clip, never the floor
    assert torch.all(fine[1].float() < 1 / 31)
    err = lambda qs: (tg.dequantize_rows(*qs) - W).pow(2).sum()  # noqa: E731
    assert err(fine) < 0.2 * err(records)  # steps about 3x finer: squared error about 9x smaller
    assert tg.Hyperparameters.from_env({"INT6_SCALE_FLOOR": "0.001"}).int6_scale_floor == 0.001
    with pytest.raises(tg.ConfigError, match="^INT6_SCALE_FLOOR=0.0"):
        tg.Hyperparameters.from_env({"INT6_SCALE_FLOOR": "0"})


def test_gptq_beats_rtn_on_a_trained_model(tiny_data, runtime, tmp_path, monkeypatch):
    """Train the tiny model for real (20 steps on tiny_data), collect Hessians from training
    batches, and compare the output error X (W - Wq)^T on those calibration activations."""
    from conftest import tiny_env
    monkeypatch.chdir(tmp_path)
    tg.select_attention_backend("sdpa", "cpu")
    h = tg.Hyperparameters.from_env(tiny_env(tiny_data, ITERATIONS=20, WARMUP_STEPS=0))
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.of(h))
    _, averager, loader = tg.train(model, model, h, runtime)
    tg.apply_weight_average(model, averager, "ema")
    batches = [loader.next_batch(8, h.train_seq_len) for _ in range(3)]
    captured: dict[str, list] = {}
    handles = [mod.register_forward_pre_hook(lambda m, a, key=name + ".weight": captured.setdefault(key, []).append(
        a[0].detach().double().reshape(-1, a[0].size(-1))))
        for name, mod in model.named_modules() if isinstance(mod, tg.CastedLinear) and name.startswith("blocks.")]
    hessians = tg.collect_hessians(model, batches, runtime)
    for hd in handles:
        hd.remove()
    err_g = err_r = 0.0
    for name, chunks in captured.items():
        X, W = torch.cat(chunks), model.state_dict()[name]
        err_g += output_error(X, W, *tg.gptq_quantize(W, hessians[name]))
        err_r += output_error(X, W, *tg.gptq_quantize(W, None, clip_quantiles=(1.0,)))
    assert len(captured) == 6 * h.num_layers
    assert err_g < 0.8 * err_r, (err_g, err_r)


# ==============================================================================================
# quantize frontier


def gaussian_rows(rows: int = 24, cols: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * (0.02 + torch.rand(rows, 1, generator=g))


# ---------------------------------------------------------------------------------------------
# SDClip and the int7 embedding

@pytest.mark.parametrize("bits,k", [(6, 12.85), (7, 14.0), (4, 2.5)], ids=["int6", "int7", "int4"])
def test_sdclip_scale_and_half_step_bound(bits, k):
    W = gaussian_rows()
    qmax = 2 ** (bits - 1) - 1
    q, s = tg.gptq_quantize(W, None, bits=bits, sdclip_k=k)
    Wn = W.numpy().astype(np.float64)
    step = (k * Wn.std(axis=1, ddof=1) / qmax).astype(np.float16).astype(np.float32)  # unbiased std, fp16 as stored
    assert np.array_equal(s.float().numpy(), step)
    expect = np.clip(np.round(W.numpy() / step[:, None]), -qmax, qmax)
    assert np.array_equal(q.numpy(), expect) and q.abs().max() <= qmax
    err = (W - tg.dequantize_rows(q, s)).abs().numpy()
    inside = np.abs(W.numpy()) <= qmax * step[:, None]
    assert (err[inside] <= step[:, None].repeat(W.size(1), 1)[inside] / 2 + 1e-7).all()
    assert (~inside).any() == (k < 4)  # clip at 2.5 sigma: some Gaussian entries clip; at 12.85 or 14: none


def test_sdclip_k_per_tensor_type():
    spec = quant_spec(quant_clip="sdclip", matrix_clip_sigmas=1.0, mlp_clip_sigmas=2.0,
                      attn_clip_sigmas=3.0, embed_clip_sigmas=4.0)
    assert [spec.sigmas(n) for n in ("blocks.0.mlp.fc.weight", "blocks.3.attn.c_q.weight", "tok_emb.weight",
                                     "blocks.0.other.weight")] == [2.0, 3.0, 4.0, 1.0]
    state = trained_like_state()
    qstate = tg.quantize_state(state, {}, spec)
    for name in ("blocks.1.mlp.proj.weight", "blocks.0.attn.c_v.weight"):
        W = state[name].double()
        expect = (spec.sigmas(name) * W.std(dim=1) / 31).half()
        assert torch.equal(qstate["gptq"][name][1], expect), name


@pytest.mark.parametrize("clip", ["search", "sdclip"])
def test_int7_embedding_gptq_bounds_and_hessian(clip):
    state = trained_like_state()
    W = state["tok_emb.weight"]
    spec = quant_spec(quant_embed="gptq", embed_bits=7, quant_clip=clip, int6_scale_floor=1e-6)
    qstate = tg.quantize_state(state, {}, spec)
    q, s = qstate["gptq"]["tok_emb.weight"]
    assert q.dtype == torch.int8 and q.abs().max() <= 63
    if clip == "search":  # the row max is a candidate: 7 bits really used
        assert q.abs().max() > 31
    else:  # SDClip's step with the embedding's k, over 63 levels
        assert torch.equal(s, (spec.sigmas("tok_emb.weight") * W.double().std(dim=1) / 63).half())
    assert all(qstate["gptq"][n][0].abs().max() <= 31 for n in qstate["gptq"] if n != "tok_emb.weight")
    deq = tg.dequantize_rows(q, s)
    clip_at = 63 * s.float()[:, None]
    inside = W.abs() <= clip_at
    assert torch.all((W - deq).abs()[inside] <= (s.float()[:, None] / 2 + 1e-7).expand_as(W)[inside])
    # with the head's Hessian, GPTQ lowers the output error on correlated hidden states
    g = torch.Generator().manual_seed(3)
    X = torch.randn(2048, 64, generator=g) @ torch.randn(64, 64, generator=g)
    with_h = tg.quantize_state(state, {"tok_emb.weight": X.T @ X}, spec)["gptq"]["tok_emb.weight"]
    out_err = lambda qs: (X @ (W - tg.dequantize_rows(*qs)).T).pow(2).sum()  # noqa: E731
    assert out_err(with_h) < 0.8 * out_err((q, s))


# ---------------------------------------------------------------------------------------------
# LQER and the quant gate

def test_lqer_lowers_error_of_the_worst_tensors_and_leaves_others():
    state = trained_like_state()
    base_spec = quant_spec(matrix_bits=6)
    plain = tg.quantize_state(state, {}, base_spec)
    spec = tg.dataclasses.replace(base_spec, lqer_enabled=True, lqer_top_k=3, lqer_rank=4,
                                  lqer_factor_bits=4, lqer_asym_group=64)
    corrected = tg.quantize_state(state, {}, spec)
    resid = {n: (state[n] - tg.dequantize_rows(*qs)).norm().item() for n, qs in plain["gptq"].items()}
    worst = sorted(resid, key=resid.get, reverse=True)[:3]
    assert set(corrected["lqer"]) == set(worst)
    d_plain, d_corr = tg.dequantize_state(plain), tg.dequantize_state(corrected)
    for name in state:
        if name in worst:
            assert (state[name] - d_corr[name]).norm() < 0.98 * (state[name] - d_plain[name]).norm(), name
        else:
            assert torch.equal(d_plain[name], d_corr[name]), name
    qa, sa, qb, sb = corrected["lqer"][worst[0]]
    assert qa.shape == (state[worst[0]].size(0), 4) and sa.numel() == 1 and qa.min() >= -2 and qa.max() <= 1
    assert qb.shape == (4, state[worst[0]].size(1)) and sb.numel() == -(-qb.numel() // 64)
    assert qb.min() >= -8 and qb.max() <= 7


def test_quant_gate_int8_rows_by_name_and_size():
    state = trained_like_state()
    off = tg.quantize_state(state, {})
    on = tg.quantize_state(state, {}, quant_spec(gated_attn_quant_gate=True))
    gates = {"blocks.0.attn.attn_gate_w", "blocks.1.attn.attn_gate_w", "blocks.1.attn.attn_gate.weight",
             "skip_gates"}  # smear_gate: 12 < 32 entries, fp16
    assert set(on["gate"]) == gates and not off["gate"] and gates - set(off["gptq"]) <= set(off["fp16"])
    assert "smear_gate.weight" in on["fp16"]
    for name in gates:
        q, s = on["gate"][name]
        W = state[name]
        assert q.shape == W.shape and q.dtype == torch.int8 and s.shape == (W.size(0),)
        assert torch.equal(s, (W.abs().amax(dim=1) / 127).half())
        err = (W - tg.dequantize_rows(q, s)).abs()
        assert torch.all(err <= s.float()[:, None] / 2 + 1e-6)
    assert tg.is_gate_param("x.attn_gate_w", torch.zeros(32)) and not tg.is_gate_param("x.attn_gate_w", torch.zeros(8193))
    assert not tg.is_gate_param("blocks.0.attn.c_q.weight", torch.zeros(64, 64))


# ---------------------------------------------------------------------------------------------
# LQER's groupwise codes round-trip for any LQER_ASYM_GROUP: the artifact stores codes and scales
# only, so the group size must follow from their counts (stored_group)

def reference(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Groupwise asymmetric-range quantization written out: groups of `group`, step max|g| / (2^(b-1) - 0.5)."""
    n, half = x.numel(), 2 ** (bits - 1)
    flat = torch.nn.functional.pad(x.flatten(), (0, -n % group)).view(-1, group)
    step = (flat.abs().amax(1) / (half - 0.5)).clamp_min(tg.SDCLIP_SCALE_FLOOR).half().float()
    return (torch.clamp(torch.round(flat / step[:, None]), -half, half - 1) * step[:, None]).flatten()[:n]


@pytest.mark.parametrize("n,group,used", [(2048, 64, 64), (384, 64, 64), (10, 6, 5), (2000, 48, 48), (300, 100, 100),
                                          (310, 100, 78), (7, 64, 7)])
def test_groups_round_trip_with_the_size_the_counts_give(n, group, used):
    assert tg.stored_group(n, group) == used
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    q, s = tg.quantize_groups(x, 4, group)
    assert s.numel() == -(-n // used)
    assert torch.equal(tg.dequantize_groups(q, s), reference(x, 4, used))


def test_a_dividing_group_is_kept_and_every_size_is_recoverable():
    for n in range(1, 400):
        for group in (1, 3, 6, 16, 48, 64, 100):
            used = tg.stored_group(n, group)
            assert used <= group and -(-n // -(-n // used)) == used
            if n % group == 0:
                assert used == group


# ---------------------------------------------------------------------------------------------
# Payload, compressors, auto, pruning

@pytest.mark.parametrize("method", tg.COMPRESSORS)
def test_each_compressor_roundtrips_bit_exactly(method):
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(-31, 32, (40_000,), generator=g, dtype=torch.int8).numpy().tobytes() + b"\x00" * 5000
    blob = tg.compress(raw, method)
    assert tg.decompress(blob) == raw and len(blob) < len(raw)
    state = trained_like_state()
    qstate = tg.quantize_state(state, {}, ALL_OPTIONS)
    assert qstate["lqer"] and qstate["gate"] and "tok_emb.weight" in qstate["gptq"]
    cfg = tg.ModelConfig.of(tg.Hyperparameters(vocab_size=320, ve_layers="0,1"))
    cfg_back, back = tg.unpack_artifact(tg.pack_artifact(qstate, cfg, method))
    assert cfg_back == cfg
    expected = tg.dequantize_state(qstate)
    assert set(back) == set(expected) == set(state)
    for n, t in expected.items():
        assert torch.equal(back[n], t), n


def test_auto_compresses_once_per_compressor_and_keeps_the_smallest(hparams, tiny_model, monkeypatch):
    calls = []
    real = tg.compress
    monkeypatch.setattr(tg, "compress", lambda raw, m: calls.append(m) or real(raw, m))
    state = {n: p.detach() for n, p in tiny_model.state_dict().items()}
    built = tg.build_artifact(state, {}, tg.ModelConfig.of(hparams), tg.dataclasses.replace(hparams, quant_compressor="auto"),
                              10**9)
    assert sorted(calls) == sorted(tg.COMPRESSORS)  # no extra pass for the log line or the cap check
    sizes = {m: n for m, (n, _) in built.compressed.items()}
    assert built.compressor == min(sizes, key=sizes.get) and len(built.blob) == min(sizes.values())
    calls.clear()
    one = tg.build_artifact(state, {}, tg.ModelConfig.of(hparams), tg.dataclasses.replace(hparams, quant_compressor="zstd"),
                            10**9)
    assert calls == ["zstd"] and one.blob == real(tg.artifact_payload(one.qstate, tg.ModelConfig.of(hparams)), "zstd")


@pytest.mark.parametrize("slack", [300, 1000, 2500])
def test_prune_to_fit_new_formats_few_compressions(tiny_model, monkeypatch, slack):
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.normal_(0, 0.5)
    state = {n: p.detach() for n, p in tiny_model.state_dict().items()}
    spec = quant_spec(quant_clip="sdclip", quant_embed="gptq", embed_bits=7, gated_attn_quant_gate=True,
                      lqer_enabled=True, lqer_top_k=2)
    qstate = tg.quantize_state(state, {}, spec)
    cfg = tg.GPT(tiny_model.cfg).cfg
    full = tg.pack_artifact(qstate, cfg, "brotli")
    calls = []
    real = tg.compress
    monkeypatch.setattr(tg, "compress", lambda raw, m: calls.append(m) or real(raw, m))
    budget = len(full) - slack
    blob, pruned = tg.prune_to_fit(qstate, {}, cfg, "brotli", budget, full)
    assert len(blob) <= budget and pruned > 0
    assert 1 <= len(calls) <= tg.PRUNE_MAX_COMPRESSIONS + 1 and set(calls) == {"brotli"}
    _, deq = tg.unpack_artifact(blob)
    changed = 0
    for name, (q, s) in qstate["gptq"].items():
        base = tg.dequantize_rows(q, s) + (tg.lqer_delta(qstate["lqer"][name]) if name in qstate["lqer"] else 0)
        diff = (deq[name] - base).abs() > 1e-6
        changed += int(diff.sum())
        assert torch.all(q[diff].abs() == 1)
    assert changed == pruned


def test_next_prune_count_secant_and_extrapolation():
    # nothing measured: the prior rate; after one overshoot: the measured rate; bracketed: the secant
    assert tg.next_prune_count((0, 1000), None, 1000, 900, 10**6) == int(100 / tg.PRUNE_PRIOR_BYTES_PER_ENTRY)
    assert tg.next_prune_count((100, 950), None, 1000, 900, 10**6) == 100 + 100
    assert tg.next_prune_count((100, 950), (300, 850), 1000, 900, 10**6) == 200
    assert tg.next_prune_count((100, 950), (101, 850), 1000, 900, 10**6) == 100  # clamped inside (lo, hi)
    assert tg.next_prune_count((0, 1000), None, 1000, 0, 50) == 50  # never beyond the candidates


# ---------------------------------------------------------------------------------------------
# GPTQ's Cholesky fallback

def test_cholesky_fallback_to_identity_is_logged(monkeypatch):
    lines = []
    monkeypatch.setattr(tg, "log", lambda msg, console=True: lines.append(msg))
    W = gaussian_rows(cols=32)
    H = torch.eye(32)
    H[3, 3] = float("nan")
    q, s = tg.gptq_quantize(W, H, name="blocks.0.mlp.fc.weight")
    q_id, s_id = tg.gptq_quantize(W, None)
    assert torch.equal(q, q_id) and torch.equal(s, s_id)
    assert any(ln.startswith("gptq:cholesky_failed name:blocks.0.mlp.fc.weight") for ln in lines)
    lines.clear()
    q, _ = tg.gptq_quantize(W, -torch.eye(32) * 5, name="neg")  # negative definite: every damping fails
    assert torch.equal(q, q_id) and any("cholesky_failed name:neg" in ln for ln in lines)


def test_cholesky_retry_with_more_damping(monkeypatch):
    lines = []
    monkeypatch.setattr(tg, "log", lambda msg, console=True: lines.append(msg))
    g = torch.Generator().manual_seed(0)
    Qm, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    eig = torch.ones(32)
    eig[-1] = -0.05  # 1% damping (of mean diag ~0.97) leaves it indefinite, 10% does not
    H = Qm @ torch.diag(eig) @ Qm.T
    W = gaussian_rows(cols=32)
    q, s = tg.gptq_quantize(W, H, name="blocks.1.attn.c_q.weight")
    assert lines == ["gptq:cholesky_retry name:blocks.1.attn.c_q.weight damp:0.1 ok"]
    assert not torch.equal(q, tg.gptq_quantize(W, None)[0])  # the real Hessian was used


# ---------------------------------------------------------------------------------------------
# Runtime, configuration and the whole path

def test_process_group_gets_the_timeout(monkeypatch):
    seen = {}
    monkeypatch.setattr(tg.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(tg.dist, "init_process_group", lambda **kw: seen.update(kw))
    rt = tg.setup_runtime("cpu", {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert rt.distributed and seen["backend"] == "gloo"
    assert seen["timeout"] == tg.PROCESS_GROUP_TIMEOUT >= tg.datetime.timedelta(minutes=20)


@pytest.mark.slow
def test_every_option_artifact_loads_with_eval_artifact_alone(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = dict(QUANT_CLIP="sdclip", QUANT_EMBED="gptq", EMBED_BITS=7, MATRIX_BITS=5, LQER_ENABLED=1,
                   LQER_TOP_K=2, GATED_ATTN_QUANT_GATE=1, QUANT_COMPRESSOR="auto")
    assert tg.main(tiny_env(tiny_data, RUN_ID="opts", ITERATIONS=6, TTT_ENABLED=0, **options)) == 0
    first = tg.json.load(open("logs/opts.json"))
    log_text = open("logs/opts.txt").read()
    assert "lqer:" in log_text and "chosen:" in log_text and "Serialized model int5+" in log_text
    assert tg.main(tiny_env(tiny_data, RUN_ID="eval", TTT_ENABLED=0, EVAL_ARTIFACT=tg.ARTIFACT_NAME)) == 0
    again = tg.json.load(open("logs/eval.json"))
    for phase in ("roundtrip", "sliding"):
        assert again["eval"][phase]["val_bpb"] == first["eval"][phase]["val_bpb"]


def test_quant_gate_patterns_choose_which_gates_are_int8():
    """QUANT_GATE_PATTERNS=attn_gate (PRESET=frontier, the record's): skip_gates stay fp16."""
    state = trained_like_state()
    attn_only = tg.quantize_state(state, {}, quant_spec(gated_attn_quant_gate=True, quant_gate_patterns="attn_gate"))
    assert set(attn_only["gate"]) == {"blocks.0.attn.attn_gate_w", "blocks.1.attn.attn_gate_w",
                                      "blocks.1.attn.attn_gate.weight"}
    assert torch.equal(attn_only["fp16"]["skip_gates"], state["skip_gates"].half())
    h = tg.Hyperparameters.from_env({"PRESET": "frontier"})
    assert tg.QuantSpec.of(h).gate_patterns == ("attn_gate",)
    assert tg.QuantSpec.of(tg.Hyperparameters()).gate_patterns == tg.GATE_PARAM_PATTERNS
    with pytest.raises(tg.ConfigError, match="^QUANT_GATE_PATTERNS=attn_gate,skip: must be a comma-separated subset"):
        tg.Hyperparameters.from_env({"QUANT_GATE_PATTERNS": "attn_gate,skip"})


# ==============================================================================================
# quantize pergroup

# was pytest.importorskip("zpaq") at the top of the pergroup tests' own file
NEEDS_ZPAQ = pytest.mark.skipif(importlib.util.find_spec("zpaq") is None, reason="could not import 'zpaq'")
CFG = tg.ModelConfig.of(tg.Hyperparameters(vocab_size=320, ve_layers="0,1"))


@NEEDS_ZPAQ
def test_roundtrip_is_bit_exact_and_the_reader_detects_the_container():
    state = trained_like_state()
    qstate = tg.quantize_state(state, {}, ALL_OPTIONS)
    blob = tg.pack_artifact(qstate, CFG, "pergroup")
    assert blob.startswith(tg.PERGROUP_MAGIC) and not tg.pack_artifact(qstate, CFG, "brotli").startswith(tg.PERGROUP_MAGIC)
    cfg_back, raw_back = tg.pergroup_unpack(blob)
    assert cfg_back == CFG
    for kind, group in qstate.items():
        assert set(raw_back[kind]) == set(group), kind
        for name, ts in group.items():
            for a, b in zip(ts if isinstance(ts, tuple) else (ts,), raw_back[kind][name] if isinstance(ts, tuple) else (raw_back[kind][name],)):
                assert a.dtype == b.dtype and torch.equal(a, b), name
    cfg2, deq = tg.unpack_artifact(blob)  # the same reader as every other format
    expected = tg.dequantize_state(qstate)
    assert cfg2 == CFG and set(deq) == set(expected) == set(state)
    assert all(torch.equal(deq[n], expected[n]) for n in expected)
    assert tg.pack_artifact(qstate, CFG, "pergroup") == blob  # deterministic
    with pytest.raises(tg.ConfigError, match="^EVAL_ARTIFACT: the pergroup artifact .* corrupt or truncated"):
        tg.unpack_artifact(blob[:len(blob) - 7])


@NEEDS_ZPAQ
def test_groups_by_role_then_layer_transposed():
    state = {f"blocks.{i}.{r}.weight": torch.randn(8, 16) for i in (10, 2) for r in ("mlp.fc", "attn.c_q")}
    state["tok_emb.weight"] = torch.randn(70_000 // 16, 16)
    qstate = tg.quantize_state(state, {}, quant_spec(quant_clip="sdclip", quant_embed="gptq", embed_bits=7))
    blob = tg.pack_artifact(qstate, CFG, "pergroup")
    n = int(np.frombuffer(blob, "<u4", count=1, offset=4)[0])
    lengths = np.frombuffer(blob, "<u4", count=n, offset=8)
    start = 8 + 4 * n + int(lengths[0])
    table = json.loads(tg.decompress(blob[start:start + int(lengths[1])]))
    assert [t[0] for t in table] == ["tok_emb.weight", "blocks.2.attn.c_q.weight", "blocks.10.attn.c_q.weight",
                                     "blocks.2.mlp.fc.weight", "blocks.10.mlp.fc.weight"]
    codes = b"".join(tg.zpaq_module().decompress(blob[e - k:e]) for e, k in zip(
        (8 + 4 * n + np.cumsum(lengths)).tolist()[2:], lengths.tolist()[2:]))
    expected = b"".join(qstate["gptq"][name][0].T.contiguous().numpy().tobytes() for name, _ in table)
    assert codes == expected


@NEEDS_ZPAQ
def test_without_zpaq_one_error_naming_the_variable(monkeypatch):
    blob = tg.pack_artifact(tg.quantize_state(trained_like_state(), {}, ALL_OPTIONS), CFG, "pergroup")
    monkeypatch.setattr(tg, "zpaq_module", lambda: None)
    with pytest.raises(tg.ConfigError, match=r"^QUANT_COMPRESSOR=pergroup: pergroup needs the zpaq package: pip install zpaq$"):
        tg.Hyperparameters.from_env({"QUANT_COMPRESSOR": "pergroup"})
    with pytest.raises(tg.ConfigError, match=r"^QUANT_COMPRESSOR=pergroup: pergroup needs the zpaq package"):
        tg.Hyperparameters.from_env({"PRESET": "frontier", "COMPRESSOR": "pergroup"})  # the record's name
    with pytest.raises(tg.ConfigError, match=r"^EVAL_ARTIFACT: a QUANT_COMPRESSOR=pergroup artifact needs the zpaq "
                                             r"package: pip install zpaq$"):
        tg.unpack_artifact(blob)


@NEEDS_ZPAQ
def test_record_name_means_ours():
    h = tg.Hyperparameters.from_env({"PRESET": "frontier", "COMPRESSOR": "pergroup"})
    assert h.quant_compressor == "pergroup"
    assert "env_alias:COMPRESSOR=pergroup -> QUANT_COMPRESSOR=pergroup" in tg.env_aliases({"PRESET": "frontier", "COMPRESSOR": "pergroup"})[1]


@NEEDS_ZPAQ
def test_iid_int6_codes_under_brotli_and_near_their_entropy():
    """Codes drawn i.i.d. from a discretised Gaussian (SDClip k=11.5, int6): the exact entropy of
    that distribution (computed from its probabilities, not from the sample) bounds every coder."""
    levels = np.arange(-31, 32)
    sigma = 31 / 11.5
    cdf = lambda x: 0.5 * (1 + np.vectorize(math.erf)(x / (sigma * math.sqrt(2))))  # noqa: E731
    p = cdf(levels + 0.5) - cdf(levels - 0.5)
    p[0] += cdf(-31.5)
    p[-1] += 1 - cdf(31.5)
    entropy_bits = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
    rows, cols = 256, 2048
    q = torch.from_numpy(np.random.default_rng(0).choice(levels, size=(rows, cols), p=p).astype(np.int8))
    qstate = {"gptq": {"blocks.0.mlp.fc.weight": (q, torch.ones(rows, dtype=torch.float16))},
              "int8": {}, "gate": {}, "fp16": {}, "lqer": {}}
    bound = rows * cols * entropy_bits / 8
    pergroup = len(tg.pack_artifact(qstate, CFG, "pergroup"))
    brotli = len(tg.pack_artifact(qstate, CFG, "brotli"))
    assert bound < pergroup < brotli and pergroup < 1.01 * bound, (pergroup, brotli, bound)
    assert abs(tg.payload_entropy_bytes(qstate) - bound - 2 * rows) < 0.002 * bound  # the sample's entropy


@NEEDS_ZPAQ
@pytest.mark.parametrize("method", ["brotli", "pergroup"])
def test_projection_against_a_real_compression(tiny_model, method):
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.normal_(0, 0.5)
    state = {n: p.detach() for n, p in tiny_model.state_dict().items()}
    qstate = tg.quantize_state(state, {}, ALL_OPTIONS)
    real = len(tg.pack_artifact(qstate, tiny_model.cfg, method))
    # fp16 bytes count at face value (they compress a little): the projection errs high, by < 8% at this size
    assert -0.01 < tg.project_model_bytes(qstate, method) / real - 1 < 0.08, (tg.project_model_bytes(qstate, method), real)


# ==============================================================================================
# quantize pack

ESCAPED_BYTES = b'\x00\r\n"\\'


def run(script, cwd, env) -> dict:
    cwd.mkdir()
    proc = subprocess.run([sys.executable, str(script)], cwd=cwd, env=script_env(env), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(summary=json.loads((cwd / "logs" / f"{env['RUN_ID']}.json").read_text()),
                log=(cwd / "logs" / f"{env['RUN_ID']}.txt").read_text(encoding="utf-8"))


def literal(packed: bytes) -> bytes:
    """The body of the packed file's string literal."""
    head, tail = pack.WRAPPER.split(b"%s")
    assert packed.startswith(head) and packed.endswith(tail)
    return packed[len(head):len(packed) - len(tail)]


@pytest.mark.slow
def test_escape_covers_every_byte_value_and_only_the_five():
    data = bytes(range(256)) + b"".join(b"\x00" + bytes([c]) for c in b"0123456789\\\x00") + b"\r\n\\\""
    body = pack.escape(data)
    assert not any(c in body.replace(b"\\\\", b"").replace(b'\\"', b"") for c in b'\x00\r\n"')
    octal_after_nul = sum(1 for a, b in zip(data, data[1:]) if a == 0 and b in b"01234567")
    assert len(body) == len(data) + sum(data.count(c) for c in ESCAPED_BYTES) + 2 * octal_after_nul
    assert body.count(b"\\") == sum(data.count(c) for c in ESCAPED_BYTES) + data.count(b"\\")  # one escape each
    source = b"# coding: latin-1\nX = \"" + body + b"\".encode(\"latin-1\")\n"
    scope = {}
    exec(compile(source, "lit.py", "exec"), scope)  # the interpreter's tokenizer, not pack.unpack
    assert scope["X"] == data


@pytest.mark.slow
def test_packed_file_is_the_lzma_bytes_and_runs_as_the_script(tmp_path):
    source = b'import sys\nprint(__name__, __file__)\n\n\ndef f():\n    raise ValueError("line 6")\n\n\nf()\n'
    packed = pack.pack(source)
    stream = lzma.compress(source, preset=9 | lzma.PRESET_EXTREME)
    assert pack.unpack(packed) == source
    assert len(packed) == len(pack.WRAPPER) - 2 + len(stream) + sum(stream.count(c) for c in ESCAPED_BYTES) \
        + 2 * len(re.findall(rb"\x00(?=[0-7])", stream))
    path = tmp_path / "p.py"
    path.write_bytes(packed)
    proc = subprocess.run([sys.executable, str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.stdout == f"__main__ {path}\n"
    frames = re.findall(r'File "(.*)", line (\d+), in (\S+)', proc.stderr)
    assert frames[-2:] == [(str(path), "9", "<module>"), (str(path), "6", "f")], proc.stderr
    assert proc.stderr.strip().endswith("ValueError: line 6")
    if sys.version_info < (3, 13):  # 3.13 quotes every line of the multi-line exec(...) call
        assert "    exec(compile(lzma.decompress(\n" in proc.stderr and len(proc.stderr) < 500, proc.stderr


@pytest.mark.slow
def test_packed_script_runs_identically_and_counts_its_own_size(tiny_data, tmp_path):
    source = (ROOT / "train_gpt.py").read_bytes()
    packed_path = tmp_path / "record" / "train_gpt.py"
    packed_path.parent.mkdir()
    assert pack.main(["pack.py", str(ROOT / "train_gpt.py"), str(packed_path)]) == 0
    packed = packed_path.read_bytes()
    assert pack.unpack(packed) == source and len(packed) < 0.3 * len(source)
    assert set(re.findall(rb"^import (.*)$", packed, re.M)) == {b"lzma"}  # stdlib only
    compile(packed, "train_gpt.py", "exec")

    env = tiny_env(tiny_data, RUN_ID="pk", ITERATIONS=6, TTT_ENABLED=0)
    ran = {name: run(script, tmp_path / name, env) for name, script in (("src", ROOT / "train_gpt.py"),
                                                                        ("packed", packed_path))}
    src, pk = ran["src"]["summary"], ran["packed"]["summary"]
    for phase in ("prequant", "roundtrip", "sliding"):
        assert pk["eval"][phase]["val_bpb"] == src["eval"][phase]["val_bpb"], phase
    assert src["artifact"]["code_bytes"] == len(source)
    assert pk["artifact"]["code_bytes"] == len(packed) == packed_path.stat().st_size
    assert pk["artifact"]["model_bytes"] == (tmp_path / "packed" / tg.ARTIFACT_NAME).stat().st_size
    assert pk["artifact"]["total_bytes"] == len(packed) + pk["artifact"]["model_bytes"]
    assert f"Code size: {len(packed)} bytes" in ran["packed"]["log"]
    assert re.search(rf"code: bytes:{len(packed)} sha256:", ran["packed"]["log"])
    rule = "=" * 100 + "\n"  # the logged code: the source that ran, also from inside the packed file
    for name in ("src", "packed"):
        assert ran[name]["log"].split(rule)[1] == source.decode("utf-8") + "\n"

