"""Model tests (stack.md sections 3-5): parameter counts of the record configs, causality of the
whole stack, the loss and its reductions, BigramHash buckets, partial RoPE, XSA, the U-Net skips,
determinism, attention-backend selection and causal GQA attention against an explicit reference.

CPU only, about a second:
    python3 -m pytest -q tests/test_04_model.py
"""

import dataclasses
import math

import numpy as np
import pytest
import torch

import train_gpt as tg

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
