"""Quantization and serialization (train_gpt.py section "Quantization and serialization";
spec/stack.md section 7; rules D1/D2).

Covers:
- gptq_quantize with H=None against round-to-nearest computed here in numpy: one clip candidate
  (scale = fp16(max(clip/31, 1/31)) per row), and the full candidate list (each row keeps the
  candidate with the least squared error), on rows above and below the 1/31 scale floor;
- full-Hessian GPTQ beats RTN in output error ||X (W - Wq)^T||^2 on correlated activations, and on
  a tiny GPT with Hessians from collect_hessians (checked against X^T X from our own hooks);
  dead inputs (diag(H) = 0) quantize to 0;
- error bounds of the int6 and int8 row quantizers, value ranges and dtypes;
- quantize_state classification (int6 / int8 / fp16), pack/unpack bitwise exactness with both
  compressors, exact round trip of on-grid weights, the format check;
- the decimal 16,000,000-byte cap in write_artifact and code_bytes (D1/D2);
- a GPT rebuilt from the artifact alone gives the same per-token NLL as the dequantized weights.

Run: cd /work/main && python3 -m pytest -q tests/test_08_quantize.py   (CPU only, a few seconds)
"""

import dataclasses
import inspect
import io
import lzma
import os
import re

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import ROOT, quant_spec, tiny_env


BLOCK_LINEAR = re.compile(r"^blocks\.\d+\.(attn\.(c_q|c_k|c_v|proj)|mlp\.(fc|proj))\.weight$")


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


def output_error(X: torch.Tensor, W: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> float:
    D = (W.double() - tg.dequantize_rows(q, s).double())
    return float((X.double() @ D.T).pow(2).sum())


def realistic_model(hparams, vocab_size: int | None = None, seed: int = 1) -> tg.GPT:
    """A tiny GPT whose weights have trained-like magnitudes: block matrices with rows above the
    1/31 floor, nonzero zero-initialised projections and bigram table."""
    cfg = tg.ModelConfig.of(hparams)
    if vocab_size is not None:
        cfg = dataclasses.replace(cfg, vocab_size=vocab_size)
    torch.manual_seed(seed)
    model = tg.GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if tg.is_int6_matrix(name, p) or name == "tok_emb.weight":
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.add_(0.05 * torch.randn_like(p))
    return model


def token_batches(vocab: int, n: int = 3, B: int = 4, T: int = 64, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (B, T + 1), generator=g)
        out.append((ids[:, :-1], ids[:, 1:]))
    return out


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


def test_collect_hessians_matches_own_hooks_and_gptq_beats_rtn(hparams, runtime):
    model = realistic_model(hparams)
    state = model.state_dict()
    names = {n for n, t in state.items() if tg.is_int6_matrix(n, t)}
    assert names == {n for n in state if BLOCK_LINEAR.match(n)}
    assert len(names) == 6 * hparams.num_layers

    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []
    for mname, mod in model.named_modules():
        if mname + ".weight" in names:
            def hook(m, args, out, key=mname + ".weight"):
                captured[key].append(args[0].detach().double().reshape(-1, args[0].size(-1)))
            handles.append(mod.register_forward_hook(hook))
    batches = token_batches(hparams.vocab_size)
    try:
        hessians = tg.collect_hessians(model, batches, runtime)
    finally:
        for h in handles:
            h.remove()
    assert set(hessians) == names | {"tok_emb.weight"}
    assert all(not m._forward_pre_hooks for m in model.modules()), "calibration hooks left behind"
    with torch.no_grad():  # the tied head's input: final hidden states
        hid = torch.cat([model.forward_hidden(x).double().reshape(-1, hparams.model_dim) for x, _ in batches])
    torch.testing.assert_close(hessians["tok_emb.weight"].double(), hid.T @ hid, rtol=1e-4, atol=1e-3)

    err_g = err_r = 0.0
    wins = 0
    for name in sorted(names):
        W, H = state[name], hessians[name]
        X = torch.cat(captured[name])
        assert X.size(0) == sum(x.numel() for x, _ in batches)
        assert H.shape == (W.size(1), W.size(1))
        torch.testing.assert_close(H.double(), X.T @ X, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(H, H.T, rtol=1e-5, atol=1e-4)
        ev = torch.linalg.eigvalsh(H.double())
        assert ev.min() >= -1e-6 * ev.max()
        q_g, s_g = tg.gptq_quantize(W, H)
        q_r, s_r = tg.gptq_quantize(W, None)
        eg, er = output_error(X, W, q_g, s_g), output_error(X, W, q_r, s_r)
        err_g, err_r, wins = err_g + eg, err_r + er, wins + (eg < er)
    assert wins >= 0.75 * len(names), (wins, len(names))
    assert err_g < 0.8 * err_r, (err_g, err_r)


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
    for bits, group in ((2, a.size), (4, 64), (4, 7)):
        flat = np.pad(a.ravel(), (0, -a.size % group)).reshape(-1, group)
        half = 2 ** (bits - 1)
        rq, rs = numpy_row_codes(flat, np.abs(flat).max(1), half - 0.5, tg.SDCLIP_SCALE_FLOOR, -half, half - 1)
        q, s = tg.quantize_groups(W, bits, group)
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
