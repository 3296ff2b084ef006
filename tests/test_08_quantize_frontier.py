"""Frontier quantization and serialization (issue 10 items 1-5, issue 8's serialization items;
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
- the process group's timeout; bad input (compressor, bits, LQER_TOP_K) -> one error line, exit 2;
- an artifact written with every option on loads with EVAL_ARTIFACT alone.

Run: python3 -m pytest -q tests/test_08_quantize_frontier.py   (CPU only)
"""

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import quant_spec, tiny_env
from helpers import ALL_OPTIONS, trained_like_state


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
    built = tg.build_artifact(state, {}, tg.dataclasses.replace(hparams, quant_compressor="auto"), 10**9)
    assert sorted(calls) == sorted(tg.COMPRESSORS)  # no extra pass for the log line or the cap check
    sizes = {m: n for m, (n, _) in built.compressed.items()}
    assert built.compressor == min(sizes, key=sizes.get) and len(built.blob) == min(sizes.values())
    calls.clear()
    one = tg.build_artifact(state, {}, tg.dataclasses.replace(hparams, quant_compressor="zstd"), 10**9)
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
