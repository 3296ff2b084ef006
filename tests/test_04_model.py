"""Section 04 of train_gpt.py, model: the seed model, the frontier options, FA3 through kernels,
Triton kernels.

Model tests (stack.md sections 3-5): parameter counts of the record configs, causality of the
whole stack, the loss and its reductions, BigramHash buckets, partial RoPE, XSA, the U-Net skips,
determinism, attention-backend selection and causal GQA attention against an explicit reference.

CPU only, about a second:

The frontier architecture options (frontier.md section 2, issue 9): each off gives the seed
model bit for bit, each on against an independent computation, the recurrence index table, the
parameter count of the 1.0611 record, the optimizer/quantizer routing of the new parameters,
document isolation (flip test across documents, with teeth), and bad settings.

In-process and CPU-only, about 15 s:

FlashAttention 3 through the Hugging Face `kernels` package (issue 8): used only for an explicit
ATTN_BACKEND=fa3 when no local `flash_attn_interface` exists, never by `auto`, and optional (no
`kernels` package: the usual clear error). A stand-in `kernels` module replaces the Hub download.

The Triton kernels of FUSED_MLP_ENABLED / FUSED_CE_ENABLED (frontier.md 6.1, 6.2) against the eager
math, forward and backward, under Triton's CPU interpreter (TRITON_INTERPRET=1 must precede the
triton import, so the kernels run in one child process whose figures the tests check); and the
knobs' eager fallback off CUDA without the interpreter.

    python3 -m pytest -q tests/test_04_model.py -m "slow or not slow"
"""

import copy
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import TINY_DATA_VOCAB
from helpers import frontier_param_count


# ==============================================================================================
# model

GQA_SHAPES = [(4, 2), (4, 4), (4, 1)]
GQA_IDS = ["h4kv2", "h4kv4", "h4kv1"]


def build(h: tg.Hyperparameters, **overrides) -> tg.GPT:
    return tg.GPT(tg.ModelConfig.of(dataclasses.replace(h, **overrides)))


@torch.no_grad()
def perturb(model: torch.nn.Module, std: float = 0.05, seed: int = 1) -> torch.nn.Module:
    """Add noise to every parameter: at init the block output projections, the bigram table and
    the SmearGate logits are zero, so without this most of the model would be invisible."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def random_ids(vocab: int, B: int, T: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- parameter counts of the full-size configs ----------------------------------------------

@pytest.mark.parametrize("env, expected", [
    ({"BIGRAM_VOCAB_SIZE": "2048", "BIGRAM_DIM": "128", "XSA_LAST_N": "4"}, 26_993_756),
    ({}, 27_038_812),
], ids=["record414_bigram2048x128", "defaults_bigram2816x112"])
def test_full_model_parameter_count(env, expected):
    # Built on the meta device: identical parameter shapes, none of the seconds of orthogonal init.
    h = tg.Hyperparameters.from_env(env)
    with torch.device("meta"):
        model = tg.GPT(tg.ModelConfig.of(h))
    assert sum(p.numel() for p in model.parameters()) == expected


# ---- causality and the loss ------------------------------------------------------------------

@pytest.mark.parametrize("xsa_last_n", [2, 0], ids=["xsa_on", "xsa_off"])
@pytest.mark.parametrize("heads, kv_heads", GQA_SHAPES, ids=GQA_IDS)
def test_changing_a_token_leaves_earlier_losses_bit_identical(hparams, heads, kv_heads, xsa_last_n):
    model = perturb(build(hparams, num_heads=heads, num_kv_heads=kv_heads, xsa_last_n=xsa_last_n))
    assert model.bigram is not None and model.ve_layers == [0, 1]  # bigram and VE are in the path
    assert [b.attn.xsa for b in model.blocks] == [xsa_last_n > 0] * 2
    assert float(model.smear_gate.detach().abs().min()) > 0
    V, T = hparams.vocab_size, 16
    x, y = random_ids(V, 2, T), random_ids(V, 2, T, seed=3)
    with torch.no_grad():
        base = model(x, y, reduction="none")
        for t in (1, 6, 11, 15):
            x2 = x.clone()
            x2[:, t] = (x2[:, t] + 1 + torch.arange(2)) % V
            nll = model(x2, y, reduction="none")
            assert torch.equal(nll[:, :t], base[:, :t]), f"position < {t} saw token {t}"
            assert not torch.equal(nll[:, t], base[:, t])  # the change is visible where allowed


def test_mean_loss_is_mean_of_per_token_nll(hparams):
    model = perturb(build(hparams))
    x, y = random_ids(hparams.vocab_size, 3, 20), random_ids(hparams.vocab_size, 3, 20, seed=5)
    with torch.no_grad():
        nll, mean = model(x, y, reduction="none"), model(x, y)
    assert nll.shape == (3, 20) and bool((nll > 0).all())
    torch.testing.assert_close(mean, nll.mean(), rtol=1e-6, atol=0)


def test_loss_at_init_is_close_to_log_vocab(tiny_model, hparams):
    x, y = random_ids(hparams.vocab_size, 4, 64), random_ids(hparams.vocab_size, 4, 64, seed=7)
    with torch.no_grad():
        loss = tiny_model(x, y).item()
    assert abs(loss - math.log(hparams.vocab_size)) < 0.1


# ---- BigramHash ------------------------------------------------------------------------------

def test_bigram_buckets_match_the_hash_formula(tiny_model, hparams):
    V = hparams.bigram_vocab_size
    ids = random_ids(hparams.vocab_size, 4, 33)
    ids[3] = hparams.vocab_size - 1  # a row of the largest id: the products are largest there
    got = tiny_model.bigram.bucket_ids(ids).numpy()
    a = ids.numpy().astype(np.int64)
    expected = np.empty_like(a)
    expected[:, 0] = V - 1
    expected[:, 1:] = np.bitwise_xor(36313 * a[:, 1:], 27191 * a[:, :-1]) % (V - 1)
    np.testing.assert_array_equal(got, expected)
    assert (got[:, 1:] < V - 1).all()  # bucket V-1 is reserved for "no previous token"


# ---- partial RoPE ----------------------------------------------------------------------------

def test_rotary_leaves_the_tail_and_the_norm_alone():
    x = torch.randn(2, 12, 3, 16, dtype=torch.float64)
    out = tg.rotary(x, 8, 10000.0)
    assert torch.equal(out[..., 8:], x[..., 8:])
    torch.testing.assert_close(out[..., :8].norm(dim=-1), x[..., :8].norm(dim=-1), rtol=1e-6, atol=0)
    torch.testing.assert_close(out[:, 0], x[:, 0], rtol=0, atol=0)  # position 0: no rotation
    assert not torch.allclose(out[:, 1:, :, :8], x[:, 1:, :, :8])


def test_rotary_dot_product_depends_only_on_relative_position():
    T, D, rope = 24, 16, 8
    q, k = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    qr = tg.rotary(q.expand(1, T, 1, D).contiguous(), rope, 10000.0)[0, :, 0]
    kr = tg.rotary(k.expand(1, T, 1, D).contiguous(), rope, 10000.0)[0, :, 0]
    scores = qr @ kr.T  # scores[m, n] = <q at m, k at n>
    for delta in (-5, 0, 3, 11):
        diag = torch.diagonal(scores, offset=-delta)  # entries with m - n == delta
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), rtol=0, atol=1e-5)
    torch.testing.assert_close(scores[7, 7], q @ k, rtol=0, atol=1e-6)
    assert abs(scores[3, 0] - scores[0, 3]) > 1e-3  # it does depend on the (signed) difference


# ---- exclusive self-attention ----------------------------------------------------------------

@pytest.mark.parametrize("heads, kv_heads", GQA_SHAPES, ids=GQA_IDS)
def test_xsa_output_is_orthogonal_to_own_value(hparams, heads, kv_heads):
    cfg = tg.ModelConfig.of(dataclasses.replace(hparams, num_heads=heads, num_kv_heads=kv_heads))
    d, hd = cfg.model_dim, cfg.model_dim // heads
    B, T = 2, 10
    x = torch.randn(B, T, d)
    ve = torch.randn(B, T, kv_heads * hd)  # v includes the value embedding (stack.md 3.5)
    outs = {}
    for xsa in (True, False):
        torch.manual_seed(3)
        attn = tg.Attention(cfg, xsa=xsa)
        seen = []
        attn.proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
        with torch.no_grad():
            attn(x, ve)
            v = (attn.c_v(x) + ve).view(B, T, kv_heads, hd)
        outs[xsa] = seen[0].view(B, T, heads, hd)
    vhat = v / v.norm(dim=-1, keepdim=True)
    group = torch.arange(heads) // (heads // kv_heads)  # query head h -> KV head h // (H/Hkv)
    vh = vhat[:, :, group]  # (B,T,H,D)
    dots = (outs[True] * vh).sum(-1)
    assert dots.abs().max() < 1e-5
    plain = outs[False]
    assert (plain * vh).sum(-1).abs().max() > 1e-2  # without XSA the component is there
    expected = plain - (plain * vh).sum(-1, keepdim=True) * vh
    torch.testing.assert_close(outs[True], expected, rtol=1e-5, atol=1e-6)


# ---- U-Net skips -----------------------------------------------------------------------------

@pytest.mark.parametrize("layers", [1, 2, 3, 4, 5, 11])
def test_number_of_skip_weights(hparams, layers):
    model = build(hparams, num_layers=layers, xsa_last_n=min(2, layers), ve_layers="0")
    assert model.skip_weights.shape == (min(layers // 2, layers - layers // 2), hparams.model_dim)


@pytest.mark.parametrize("layers", [4, 5])
def test_skip_pairing_decoder_takes_mirrored_encoder_output(hparams, layers):
    """Decoder block L//2 + j gets x + skip_weights[j] * (output of encoder block L//2 - 1 - j)."""
    model = perturb(build(hparams, num_layers=layers, xsa_last_n=2, ve_layers="0"))
    ins, outs = {}, {}
    for i, b in enumerate(model.blocks):
        b.register_forward_pre_hook(lambda m, args, i=i: ins.__setitem__(i, args[0].detach()))
        b.register_forward_hook(lambda m, args, out, i=i: outs.__setitem__(i, out.detach()))
    with torch.no_grad():
        model.forward_hidden(random_ids(hparams.vocab_size, 2, 8))
    enc = layers // 2
    for j, i in enumerate(range(enc, layers)):
        expected = outs[i - 1]
        if j < enc:
            expected = expected + model.skip_weights[j].detach() * outs[enc - 1 - j]
        torch.testing.assert_close(ins[i], expected, rtol=0, atol=0)


# ---- determinism and backends ----------------------------------------------------------------

def test_same_seed_same_model_and_outputs(hparams):
    def run(seed):
        torch.manual_seed(seed)
        model = perturb(build(hparams), seed=seed)
        with torch.no_grad():
            x, y = random_ids(hparams.vocab_size, 2, 16), random_ids(hparams.vocab_size, 2, 16, seed=4)
            return model, model(x, y, reduction="none")
    (m1, a), (m2, b), (_, c) = run(11), run(11), run(12)
    for (n1, p1), (n2, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.equal(a, c)


def test_select_attention_backend_on_cpu():
    assert tg.select_attention_backend("auto", "cpu") == "sdpa"
    assert tg.select_attention_backend("sdpa", "cpu") == "sdpa"
    for name in ("fa3", "fa2"):
        with pytest.raises(tg.ConfigError, match=f"ATTN_BACKEND={name}"):
            tg.select_attention_backend(name, "cpu")


@pytest.mark.parametrize("heads, kv_heads", GQA_SHAPES, ids=GQA_IDS)
def test_causal_attention_matches_explicit_reference(heads, kv_heads):
    tg.select_attention_backend("sdpa", "cpu")
    B, T, D = 2, 9, 8
    q, k, v = torch.randn(B, T, heads, D), torch.randn(B, T, kv_heads, D), torch.randn(B, T, kv_heads, D)
    out = tg.causal_attention(q, k, v)
    assert out.shape == (B, T, heads, D)
    q64, k64, v64 = q.double(), k.double(), v.double()
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    ref = torch.empty(B, T, heads, D, dtype=torch.float64)
    for h in range(heads):
        g = h // (heads // kv_heads)
        scores = q64[:, :, h] @ k64[:, :, g].transpose(1, 2) / math.sqrt(D) + mask
        ref[:, :, h] = torch.softmax(scores, dim=-1) @ v64[:, :, g]
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


# ==============================================================================================
# model frontier

BOS = 1
# PRESET=frontier at tiny dims: 5 layers, loop 1-2 once more, parallel lanes from layer 3.
TINY_FRONTIER = dict(PRESET="frontier", VOCAB_SIZE="512", NUM_LAYERS="5", MODEL_DIM="64", NUM_HEADS="4",
                     NUM_KV_HEADS="2", ROPE_DIMS="8", XSA_LAST_N="5", GATE_WINDOW="8", LOOP_START="1", LOOP_END="2",
                     NUM_LOOPS="1", PARALLEL_START_LAYER="3", BOS_ID=str(BOS), EVAL_SEQ_LEN="64", EVAL_STRIDE="16",
                     EVAL_BATCH_SEQS="4", TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="512", DEVICE="cpu", COMPILE="0")


def hp(**env) -> tg.Hyperparameters:
    if env.get("PRESET") == "tiny":  # the pinned numbers below are at the tiny dataset's vocab
        env = {"VOCAB_SIZE": TINY_DATA_VOCAB, **env}
    return tg.Hyperparameters.from_env({k: str(v) for k, v in env.items()})


def noisy(h: tg.Hyperparameters, seed: int = 1, scale: float = 0.1) -> tg.GPT:
    """The model of h with noise on every parameter: zero-initialised projections and gates
    would otherwise hide most of what the options do."""
    torch.manual_seed(seed)
    m = tg.GPT(tg.ModelConfig.of(h))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return m


def doc_stream(n_docs: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """BOS-delimited documents of 3-30 random non-BOS tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_docs):
        out += [BOS] + rng.integers(4, vocab, rng.integers(3, 31)).tolist()
    return torch.tensor(out)


# ----------------------------------------------------------------------------------------------
# Every option off: the seed model, bit for bit


def test_options_off_reproduce_the_seed_model():
    """Per-token NLL sum of a noisy 5-layer tiny seed model (bigram, VE, XSA, old SmearGate), as
    computed by the code before the frontier options (commit e14a097) with this same recipe."""
    h = hp(PRESET="tiny", NUM_LAYERS=5, XSA_LAST_N=2, VE_LAYERS="3,4")
    torch.manual_seed(1234)
    m = tg.GPT(tg.ModelConfig.of(h))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, h.vocab_size, (3, 40))
    ids[:, 7] = BOS
    nll = m(ids[:, :-1], ids[:, 1:], reduction="none")
    # Bitwise equal on this machine (sha256 of the NLL bytes matched); the tolerance only allows
    # for another BLAS.
    assert nll.double().sum().item() == pytest.approx(738.6921968460083, rel=1e-6)
    names = [n for n, _ in m.named_parameters()]
    assert not any(k in n for n in names for k in ("skip_gates", "parallel_", "smear.", "attn_gate_w"))
    assert tuple(m.skip_weights.shape) == (2, 64) and "smear_gate" in names


def test_looped_model_with_looping_off_is_the_plain_model():
    """NUM_LOOPS>0 before the switch-on runs exactly the plain layer sequence."""
    plain = noisy(hp(PRESET="tiny", NUM_LAYERS=5, XSA_LAST_N=2, VE_LAYERS="3,4"))
    looped = tg.GPT(tg.ModelConfig.of(hp(PRESET="tiny", NUM_LAYERS=5, XSA_LAST_N=2, VE_LAYERS="3,4", NUM_LOOPS=2,
                                       LOOP_START=1, LOOP_END=2)))
    state = dict(plain.state_dict())
    state["skip_weights"] = torch.cat((state["skip_weights"], looped.skip_weights[2:].detach()))
    looped.load_state_dict(state)
    ids = torch.randint(0, 512, (2, 24))
    looped.looping = False
    assert torch.equal(looped.forward_hidden(ids), plain.forward_hidden(ids))
    looped.looping = True
    assert not torch.allclose(looped.forward_hidden(ids), plain.forward_hidden(ids))


# ----------------------------------------------------------------------------------------------
# Depth recurrence


def test_recurrence_index_table_of_the_final_record():
    """frontier.md 2.3: 11 layers, loop 3-5, NUM_LOOPS=2 -> 17 virtual layers."""
    order = tg.loop_layer_order(11, 3, 5, 2)
    assert order[:len(order) // 2] == [0, 1, 2, 3, 4, 5, 3, 4]
    assert order[len(order) // 2:] == [5, 3, 4, 5, 6, 7, 8, 9, 10]
    m = tg.GPT(tg.ModelConfig.of(hp(PRESET="frontier", BOS_ID=1, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2,
                                  ROPE_DIMS=8, VOCAB_SIZE=64, MLP_MULT=1)))
    assert m.loop_order == order and m.plain_order == list(range(11))
    assert m.skip_weights.shape[0] == 8 and m.looping  # min(8 encoder, 9 decoder); built looped (eval)


def test_switch_on_by_fraction_of_the_budget():
    m = tg.GPT(tg.ModelConfig.of(hp(PRESET="tiny", NUM_LOOPS=1, LOOP_START=0, LOOP_END=1, ITERATIONS=100,
                                  ENABLE_LOOPING_AT=0.35)))
    h = hp(PRESET="tiny", NUM_LOOPS=1, LOOP_START=0, LOOP_END=1, ITERATIONS=100, ENABLE_LOOPING_AT=0.35)
    uncapped, capped = tg.Schedule(h), tg.Schedule(dataclasses.replace(h, max_wallclock_seconds=10.0,
                                                                        gptq_reserve_seconds=0.0))
    assert (uncapped.cap_ms, capped.cap_ms) == (0.0, 10_000.0)
    m.looping = False
    uncapped.update_looping(m, 34, 1e9)  # no cap: steps count, 34/100 < 0.35
    assert not m.looping
    uncapped.update_looping(m, 35, 0.0)
    assert m.looping
    m.looping = False
    capped.update_looping(m, 1, 3400.0)  # capped: the wall clock counts, not the step
    assert not m.looping
    capped.update_looping(m, 1, 3500.0)
    assert m.looping


def test_compiled_model_follows_the_looping_switch():
    """torch.compile guards on `looping`: one graph per mode, each equal to eager."""
    m = noisy(hp(**TINY_FRONTIER))
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    ids = doc_stream(6, 512)[None, :40]
    for looping in (False, True, False):
        m.looping = looping
        with torch.no_grad():
            assert torch.equal(compiled.forward_hidden(ids), m.forward_hidden(ids))


def test_hessians_accumulate_over_every_pass():
    m = noisy(hp(**TINY_FRONTIER))
    ids = doc_stream(8, 512)[None, :48]
    seen = []
    hook = m.blocks[1].attn.c_q.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        m.forward_hidden(ids)
    hook.remove()
    assert len(seen) == 2  # layer 1 runs twice with NUM_LOOPS=1
    rt = tg.Runtime(False, 0, 1, 0, torch.device("cpu"))
    H = tg.collect_hessians(m, [(ids, None)], rt)
    expected = sum(x.reshape(-1, x.size(-1)).T @ x.reshape(-1, x.size(-1)) for x in seen)
    torch.testing.assert_close(H["blocks.1.attn.c_q.weight"], expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The units against independent computations


def test_window_smear_gate_formula_and_bos_fix():
    h = hp(**TINY_FRONTIER)
    gate = tg.WindowSmearGate(tg.ModelConfig.of(h))
    e = torch.randn(2, 10, 64)
    ids = torch.randint(4, 512, (2, 10))
    ids[0, 4] = ids[1, 0] = BOS
    assert torch.equal(gate(e, ids), e)  # zero init: the identity
    with torch.no_grad():
        gate.gate_w.normal_()
        gate.lam.fill_(0.7)
    out = gate(e, ids)
    for b in range(2):
        for t in range(10):
            want = e[b, t].clone()
            if t > 0 and ids[b, t] != BOS:
                want += 0.7 * torch.sigmoid(e[b, t, :8] @ gate.gate_w[0]) * e[b, t - 1]
            torch.testing.assert_close(out[b, t], want)
    assert torch.equal(out[0, 4], e[0, 4])  # BOS takes nothing from the previous document


def test_sparse_attention_gate_scales_each_head():
    h = hp(**TINY_FRONTIER)
    on = tg.Attention(tg.ModelConfig.of(h), xsa=True)
    off = tg.Attention(tg.ModelConfig.of(dataclasses.replace(h, sparse_attn_gate_enabled=False)), xsa=True)
    off.load_state_dict({k: v for k, v in on.state_dict().items() if k != "attn_gate_w"})
    x = torch.randn(2, 12, 64)
    with torch.no_grad():
        on.proj.weight.copy_(torch.eye(64))
        off.proj.weight.copy_(torch.eye(64))
        torch.testing.assert_close(on(x, None), 0.5 * off(x, None))  # zero init: every gate 0.5
        on.attn_gate_w.normal_()
        g = torch.sigmoid(0.5 * x[..., :8] @ on.attn_gate_w.T)  # (B,T,H), SPARSE_ATTN_GATE_SCALE=0.5
        want = (off(x, None).view(2, 12, 4, 16) * g[..., None]).view(2, 12, 64)
        torch.testing.assert_close(on(x, None), want)


def test_gated_skip_is_a_lerp_from_the_skip_to_x():
    m = noisy(hp(**TINY_FRONTIER))
    x, skip = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    s = torch.sigmoid(m.skip_gates[1])
    torch.testing.assert_close(m.add_skip(x, 1, skip), s * x + (1 - s) * m.skip_weights[1] * skip)


def test_parallel_block_against_form_d():
    m = noisy(hp(**TINY_FRONTIER))
    blk, i = m.blocks[3], 3
    lane0, lane1, x0 = torch.randn(3, 1, 6, 64).unbind(0)
    out0, out1 = blk.forward_parallel((lane0, lane1), x0, None, None, m.parallel_resid_lambdas[i],
                                      m.parallel_post_lambdas[i])
    mix, s = blk.resid_mix, blk.norm_scale
    a = blk.attn_scale * blk.attn(F.rms_norm(mix[0] * lane0 + mix[1] * x0, (64,)) * s, None)
    mm = blk.mlp_scale * blk.mlp(F.rms_norm(lane1, (64,)) * s)
    r, P = m.parallel_resid_lambdas[i], m.parallel_post_lambdas[i]
    torch.testing.assert_close(out0, r[0] * lane0 + P[0, 0] * a + P[1, 0] * mm)
    torch.testing.assert_close(out1, r[1] * lane1 + P[0, 1] * a + P[1, 1] * mm)


def test_document_masked_attention_equals_each_document_alone():
    """The masked SDPA path gives each document the hidden states it gets when run on its own
    (RoPE is relative, so the absolute offset in the packed row does not matter)."""
    m = noisy(hp(**TINY_FRONTIER))
    stream = doc_stream(4, 512)
    starts = (stream == BOS).nonzero().flatten().tolist() + [len(stream)]
    with torch.no_grad():
        packed = m.forward_hidden(stream[None])[0]
        for a, b in zip(starts[:-1], starts[1:]):
            torch.testing.assert_close(packed[a:b], m.forward_hidden(stream[None, a:b])[0], rtol=1e-4, atol=1e-4)


def reference_varlen(calls: list):
    """A stand-in for FA3's varlen call: causal attention per cu_seqlens segment; records cu_q."""
    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal):
        calls.append(cu_q)
        out = torch.zeros_like(q)
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            if b > a:
                out[a:b] = tg.causal_attention(q[None, a:b], k[None, a:b], v[None, a:b])[0]
        return out
    return varlen


def test_varlen_path_gets_cu_seqlens_at_every_bos_and_row_start(monkeypatch):
    """The FA3 branch, with a reference varlen function: segments cut at BOS and row starts,
    padded with empty segments to a static size, give the masked path's numbers."""
    calls = []
    varlen = reference_varlen(calls)
    m = noisy(hp(**TINY_FRONTIER))
    ids = doc_stream(5, 512)[:60].view(2, 30)
    with torch.no_grad():
        masked = m.forward_hidden(ids)
        monkeypatch.setitem(tg._ATTENTION, "varlen", varlen)
        got = m.forward_hidden(ids)
    starts = sorted({0, 30} | {int(p) for p in (ids.flatten() == BOS).nonzero()})
    cu = calls[0].tolist()
    assert calls[0].dtype == torch.int32 and len(cu) == 61
    assert cu[:len(starts)] == starts and set(cu[len(starts):]) == {60}
    torch.testing.assert_close(got, masked, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Flip test across documents: change a token of document k, no other document's NLL moves


def _doc_losses(model, val, h, rt):
    losses = tg.TokenLosses(val.stream_len, rt.device)
    tg.evaluate(tg.nll_function(model), val, h, rt, h.eval_stride, losses)
    return losses.nll.numpy().copy()


@pytest.mark.parametrize("doc_masking,smear_bos_fix", [(True, True), (False, True), (True, False)])
def test_flip_a_token_of_one_document_leaves_every_other_document_bit_identical(doc_masking, smear_bos_fix):
    """Sliding-window eval (the TOKEN_LOSSES_DIR numbers) with looping, lanes, SmearGate and
    gates on. Target t belongs to the document of its input token t-1. Without document masking,
    or without the SmearGate's BOS fix, later documents' NLLs move: the test has teeth."""
    h = dataclasses.replace(hp(**TINY_FRONTIER), doc_masking=doc_masking)
    model = noisy(h, scale=0.2)
    if not smear_bos_fix:
        model.smear.bos_id = -1  # no token is BOS for the gate: #1667's leak
    isolated = doc_masking and smear_bos_fix
    rt = tg.Runtime(False, 0, 1, 0, torch.device("cpu"))
    stream = doc_stream(14, h.vocab_size, seed=3)
    n = (len(stream) - 1) // h.eval_seq_len * h.eval_seq_len + 1
    stream = stream[:n]
    V = h.vocab_size
    val = tg.ValidationData(stream, n, torch.ones(V, dtype=torch.int64), torch.zeros(V, dtype=torch.bool),
                            torch.zeros(V, dtype=torch.bool))
    doc_of_input = torch.cumsum(stream == BOS, 0).numpy()  # document id of each position
    base = _doc_losses(model, val, h, rt)
    k = int(doc_of_input[n // 2])
    positions = np.flatnonzero((doc_of_input == k) & (stream.numpy() != BOS))
    other = np.ones(n, dtype=bool)
    other[0] = False  # target 0 is never scored
    other[1:] = doc_of_input[:-1] != k
    changed_elsewhere = False
    for t in positions[[0, len(positions) // 2, -1]]:  # first, middle and last token of document k
        tokens = stream.clone()
        tokens[t] = 4 + (tokens[t] - 3) % (V - 4)  # another non-BOS token
        flipped = _doc_losses(model, dataclasses.replace(val, tokens=tokens), h, rt)
        assert flipped[t] != base[t] or t == positions[0]  # its own document sees the change
        same = flipped[other].tobytes() == base[other].tobytes()
        changed_elsewhere |= not same
        if isolated:
            assert same, f"flipping token {t} of document {k} moved another document's NLL"
    assert changed_elsewhere != isolated


# ----------------------------------------------------------------------------------------------
# Parameter count and routing


def test_frontier_preset_has_the_records_35945671_parameters(monkeypatch):
    monkeypatch.setattr(tg.nn.init, "orthogonal_", lambda w, *a, **k: w)  # shapes only: skip the slow QR
    h = hp(PRESET="frontier", BOS_ID=1)
    m = tg.GPT(tg.ModelConfig.of(h))
    count = sum(p.numel() for p in m.parameters())
    assert count == frontier_param_count(8192, 11, 512, 8, 4, 4.0, 12, 17) == 35_945_671
    groups = tg.param_groups(m)
    assert sum(p.numel() for p in groups["matrix"]) == 31_719_424
    assert sum(p.numel() for p in groups["embed"]) == 4_194_304
    assert sum(p.numel() for p in groups["scalar"]) == 23_672 + 8_192 + 66 + 13


def test_tiny_frontier_count_and_routing():
    h = hp(**TINY_FRONTIER)
    m = tg.GPT(tg.ModelConfig.of(h))
    assert sum(p.numel() for p in m.parameters()) == frontier_param_count(512, 5, 64, 4, 2, 4.0, 8, 7)
    groups = {id(p): g for g, ps in tg.param_groups(m).items() for p in ps}
    names = dict(m.named_parameters())
    for n in ("skip_gates", "parallel_resid_lambdas", "parallel_post_lambdas", "smear.gate_w", "smear.lam",
              "blocks.0.attn.attn_gate_w"):
        assert groups[id(names[n])] == "scalar", n
    int6 = {n for n, p in names.items() if tg.is_int6_matrix(n, p)}
    assert int6 == {f"blocks.{i}.{k}.weight" for i in range(5)
                    for k in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")}


# ----------------------------------------------------------------------------------------------
# Bad settings


@pytest.mark.parametrize("env,var", [
    (dict(NUM_LOOPS=1, LOOP_START=1, LOOP_END=2, NUM_LAYERS=2), "LOOP_END"),
    (dict(NUM_LOOPS=1, LOOP_START=2, LOOP_END=1), "LOOP_START"),
    (dict(NUM_LOOPS=-1), "NUM_LOOPS"),
    (dict(ENABLE_LOOPING_AT=1.5), "ENABLE_LOOPING_AT"),
    (dict(PARALLEL_START_LAYER=2), "PARALLEL_START_LAYER"),
    (dict(PARALLEL_FINAL_LANE="sum"), "PARALLEL_FINAL_LANE"),
    (dict(GATE_WINDOW=65), "GATE_WINDOW"),
    (dict(SPARSE_ATTN_GATE_INIT_STD=-1), "SPARSE_ATTN_GATE_INIT_STD"),
    (dict(SKIP_GATES_ENABLED="yes"), "SKIP_GATES_ENABLED"),
])
def test_bad_frontier_settings_name_the_variable(env, var):
    with pytest.raises(tg.ConfigError, match=f"^{var}="):
        hp(PRESET="tiny", **env)


def test_tokenizer_without_bos_is_refused_when_documents_matter():
    class NoBos:
        def bos_id(self):
            return -1
    h = hp(PRESET="tiny", DOC_MASKING=1)
    with pytest.raises(tg.ConfigError, match="^BOS_ID=-1"):
        tg.resolve_bos_id(h, NoBos())
    assert tg.resolve_bos_id(hp(PRESET="tiny"), NoBos()).bos_id == -1
    assert tg.resolve_bos_id(copy.copy(h), type("Sp", (), {"bos_id": lambda self: 1})()).bos_id == 1


# ==============================================================================================
# model fa3 kernels


@pytest.fixture
def fake_kernels(monkeypatch):
    """A `kernels` module whose get_kernel records the repo asked for and returns an FA3 stand-in
    (SDPA with repeated KV heads, FA layout, (out, lse) like some FA3 builds)."""
    asked = []

    def flash_attn_func(q, k, v, causal):
        rep = q.size(2) // k.size(2)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.repeat_interleave(rep, 2).transpose(1, 2), v.repeat_interleave(rep, 2).transpose(1, 2),
            is_causal=causal).transpose(1, 2)
        return out, None

    def get_kernel(repo):
        asked.append(repo)
        return types.SimpleNamespace(flash_attn_func=flash_attn_func)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # no local FA3 build
    monkeypatch.setitem(sys.modules, "kernels", types.SimpleNamespace(get_kernel=get_kernel))
    return asked


def test_explicit_fa3_uses_the_hub_kernel_and_matches_sdpa(fake_kernels, tiny_model, hparams):
    x = torch.randint(0, hparams.vocab_size, (2, 16))
    ref = tiny_model(x, x, reduction="none")
    assert tg.select_attention_backend("fa3", "cuda") == "fa3"
    assert fake_kernels == ["kernels-community/flash-attn3"]
    torch.testing.assert_close(tiny_model(x, x, reduction="none"), ref)


def test_auto_never_downloads(fake_kernels):
    assert tg.select_attention_backend("auto", "cuda") in ("fa2", "sdpa")
    assert fake_kernels == []


def test_without_kernels_package_fa3_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # no local FA3 build
    monkeypatch.setitem(sys.modules, "kernels", None)  # import kernels -> ImportError
    with pytest.raises(tg.ConfigError, match="ATTN_BACKEND=fa3: not importable"):
        tg.select_attention_backend("fa3", "cuda")


# ==============================================================================================
# model triton kernels

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

# Run in the child: each case prints max |kernel - eager| per output. Odd sizes, 16-wide blocks: every
# matmul dimension and the vocab end inside a partial block (masking).
CHILD = r'''
import dataclasses, json, torch, torch.nn.functional as F
import train_gpt as tg
torch.manual_seed(0)
out = {}

def diffs(a, b):
    return [float((x - y).abs().max()) for x, y in zip(a, b)]

for slope in (0.5, 0.0):
    x = torch.randn(2, 19, 24, dtype=torch.float64).float().requires_grad_()
    w_up = (0.3 * torch.randn(40, 24)).requires_grad_()
    w_down = (0.3 * torch.randn(24, 40)).requires_grad_()
    g = torch.randn(2, 19, 24)
    eager = F.linear(F.leaky_relu(F.linear(x, w_up), slope).square(), w_down)
    ref = [eager, *torch.autograd.grad(eager, (x, w_up, w_down), g)]
    fused = tg.FusedLeakyReLU2MLP.apply(x, w_up, w_down, slope, (16, 16, 16))
    got = [fused, *torch.autograd.grad(fused, (x, w_up, w_down), g)]
    out[f"mlp_{slope}"] = dict(diff=diffs(got, ref), scale=[float(r.abs().max()) for r in ref])

logits = (40 * torch.randn(7, 50)).requires_grad_()
targets = torch.tensor([0, 49, 17, 3, 48, 16, 31])
g = torch.rand(7)
ref_loss = F.cross_entropy(30 * torch.tanh(logits / 30), targets, reduction="none")
ref = [ref_loss, *torch.autograd.grad(ref_loss, logits, g)]
loss = tg.FusedSoftcapCE.apply(logits, targets, 30.0, 16)
got = [loss, *torch.autograd.grad(loss, logits, g)]
out["ce"] = dict(diff=diffs(got, ref), scale=[float(r.abs().max()) for r in ref])

def both(x, w_up, w_down, logits, targets):
    return (tg.FusedLeakyReLU2MLP.apply(x, w_up, w_down, 0.5, (16, 16, 16)).square().mean()
            + tg.FusedSoftcapCE.apply(logits, targets, 30.0, 16).mean())
args = (x, w_up, w_down, logits, targets)
ref = [both(*args), *torch.autograd.grad(both(*args), args[:4])]
compiled = torch.compile(both, backend="aot_eager", fullgraph=True)
got = [compiled(*args), *torch.autograd.grad(compiled(*args), args[:4])]
out["compiled"] = dict(diff=diffs(got, ref), scale=[float(r.abs().max()) for r in ref])

h = dataclasses.replace(tg.Hyperparameters.from_env(dict(PRESET="tiny", VOCAB_SIZE="97")),
                        fused_mlp_enabled=True, fused_ce_enabled=True)
out["line"] = tg.select_train_kernels(h, "cpu")
model = tg.GPT(tg.ModelConfig.of(h))
for p in model.parameters():  # zero-init projections would hide the MLP's gradient paths
    torch.nn.init.normal_(p, std=0.05)
ids, tgt = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 9))
eager = model(ids, tgt)
ref = [eager, *torch.autograd.grad(eager, list(model.parameters()))]
with tg.training_kernels(model):
    out["routed"] = [model.blocks[0].mlp.fused, model.fused_ce]
    fused = model(ids, tgt)
    got = [fused, *torch.autograd.grad(fused, list(model.parameters()))]
out["after"] = [model.blocks[0].mlp.fused, model.fused_ce]
out["model"] = dict(diff=[max(diffs(got[:1], ref[:1])), max(diffs(got[1:], ref[1:]))],
                    scale=[float(ref[0].abs()), max(float(r.abs().max()) for r in ref[1:])])
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])


def close(case: dict, rel: float = 1e-5):
    return all(d <= rel * max(s, 1.0) for d, s in zip(case["diff"], case["scale"]))


@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize("slope", ["0.5", "0.0"])
def test_fused_mlp_forward_and_grads_match_eager(interpreted, slope):
    """out, dx, dW_up, dW_down of proj(leaky_relu(fc(x), slope)^2): f'(u) = 2u / 2 slope^2 u in the epilogue."""
    case = interpreted[f"mlp_{slope}"]
    assert close(case), case


@pytest.mark.slow
@needs_triton
def test_fused_softcap_ce_loss_and_grad_match_eager(interpreted):
    """Per-row CE of 30 tanh(x/30) (the kernel's 2C sigmoid(2x/C) shift form) and dL/dx, vocab 50 in blocks of 16."""
    assert close(interpreted["ce"]), interpreted["ce"]


@pytest.mark.slow
@needs_triton
def test_kernels_compile_fullgraph(interpreted):
    """torch.compile(fullgraph=True) takes both (custom ops inside autograd Functions): the compiled
    loss and its gradients equal the uncompiled kernels' (aot_eager: the interpreter has no Inductor path)."""
    assert interpreted["compiled"]["diff"] == [0.0] * 5, interpreted["compiled"]


@pytest.mark.slow
@needs_triton
def test_training_kernels_route_the_model_and_match_eager(interpreted):
    """Both knobs on (interpreter): the tiny model's mean loss and every parameter gradient match the
    eager forward; the kernels are in force only inside training_kernels."""
    assert interpreted["line"] == "train_kernels: mlp:triton ce:triton"
    assert interpreted["routed"] == [True, True] and interpreted["after"] == [False, False]
    assert close(interpreted["model"], 1e-4), interpreted["model"]


def test_knobs_on_cpu_without_interpreter_run_eager_and_bit_identical(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # FUSED_CE_ENABLED in the environment needs a frontier PRESET (record_line_problems); the field does not
    h = dataclasses.replace(tg.Hyperparameters.from_env(dict(PRESET="tiny", VOCAB_SIZE="97", FUSED_MLP_ENABLED="1")),
                            fused_ce_enabled=True)
    line = tg.select_train_kernels(h, "cpu")
    assert line.startswith("train_kernels: mlp:eager ce:eager (fallback: FUSED_*_ENABLED=1 but the cpu device is not CUDA")
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.of(h))
    ids, tgt = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 9))
    off = model(ids, tgt)
    with tg.training_kernels(model):
        assert not model.blocks[0].mlp.fused and not model.fused_ce
        on = model(ids, tgt)
    assert torch.equal(on, off)
    assert tg.select_train_kernels(dataclasses.replace(h, fused_mlp_enabled=False, fused_ce_enabled=False),
                                   "cpu") == "train_kernels: mlp:eager ce:eager"


def test_knob_on_cuda_without_triton_logs_the_fallback(monkeypatch):
    """No CUDA call: select_train_kernels only reads the device type and whether the kernels build."""
    monkeypatch.setitem(tg._TRITON, "lib", None)  # as when `import triton` fails
    h = dataclasses.replace(tg.Hyperparameters.from_env({}), fused_mlp_enabled=True)
    assert tg.select_train_kernels(h, "cuda") == ("train_kernels: mlp:eager ce:eager (fallback: FUSED_*_ENABLED=1 "
                                                 "but triton is not importable; the eager path runs)")
    assert tg._TRAIN_KERNELS == {"mlp": False, "ce": False}


def test_the_fused_mlp_fits_the_cuda_limits_at_the_records_per_gpu_shape():
    """The GPU limits the fused MLP matmul could break (int32 offsets, gridDim.y), modelled from the
    frontier preset's per-GPU micro-batch: forward x @ W_up^T and the backward d_pre product."""
    h = tg.Hyperparameters.from_env({"PRESET": "frontier"})
    M, hidden = h.micro_batch_seqs * h.train_seq_len, int(h.mlp_mult * h.model_dim)
    assert (M, hidden, h.model_dim) == (98_304, 2048, 512)  # 48 x 2048 tokens per GPU, the record's shape
    assert tg.mlp_kernel_problems(M, hidden, h.model_dim) == []  # forward: (M,d) @ (d,hidden)
    assert tg.mlp_kernel_problems(M, hidden, h.model_dim) == tg.mlp_kernel_problems(M, hidden, hidden) == []
    # 11x the rows puts the (M, hidden) output past int32 offsets (8x still fits); a 4.2M-wide N past gridDim.y
    assert tg.mlp_kernel_problems(8 * M, hidden, h.model_dim) == []
    assert tg.mlp_kernel_problems(11 * M, hidden, h.model_dim) == ["the (M,N) output has 2,214,592,512 elements, "
                                                                   "over int32 offsets"]
    assert "over gridDim.y 65535" in tg.mlp_kernel_problems(1, 64 * 65_536, 1)[0]

