"""Optimizer tests (stack.md section 4): Muon's Newton-Schulz orthogonalization, Muon's update rule
(Nesterov momentum, shape scale, decoupled weight decay) against an independent computation, the
Muon/AdamW parameter partition, our AdamW against torch.optim.AdamW, the LR schedule (step-based
and wall-clock warmdown) and the Muon momentum warm-up.

CPU only, about a second:
    python3 -m pytest -q tests/test_05_optimizer.py
"""

import copy
import dataclasses

import pytest
import torch

import train_gpt as tg


# ---- Newton-Schulz ---------------------------------------------------------------------------

# Five steps of the quintic map s -> a s + b s^3 + c s^5 (a = 3.4445) scale a small singular value
# of G/||G||_F by at most a^5 ~ 484, so only those above ~2e-3 can reach 0.5; the map does not
# converge to 1 but oscillates: from there on every one lands in ~[0.68, 1.13] (plus bf16 noise).
# We assert [0.5, 1.5] on those directions. Square Gaussian matrices have a few below 2e-3.
REACHABLE = 2e-3


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (3, 48, 48)], ids=["tall", "wide", "batched_square"])
def test_newton_schulz_orthogonalizes_along_the_input_singular_vectors(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    O = tg.newton_schulz(G)
    assert O.shape == G.shape and O.dtype == G.dtype
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    O64 = O.double()
    # M = U^T O V: diagonal iff O shares G's singular vectors; its diagonal is what each of G's
    # singular directions was mapped to.
    M = U.mT @ O64 @ Vh.mT
    gains = torch.diagonal(M, dim1=-2, dim2=-1)
    off = M - torch.diag_embed(gains)
    assert (off.norm(dim=(-2, -1)) / M.norm(dim=(-2, -1))).max() < 0.1
    rel = S / G.double().norm(dim=(-2, -1)).unsqueeze(-1)
    reach = rel >= REACHABLE
    assert reach.float().mean() > 0.95
    assert gains[reach].min() > 0.5 and gains[reach].max() < 1.5
    assert (gains[~reach] > rel[~reach]).all()  # the unreachable ones still grow
    if len(shape) == 2:  # well-conditioned rectangular inputs: the whole spectrum is in range
        s = torch.linalg.svdvals(O64)
        assert s.min() > 0.5 and s.max() < 1.5
    polar = U @ Vh  # the exact orthogonalization U V^T
    err = (O64 - polar).norm(dim=(-2, -1)) / polar.norm(dim=(-2, -1))
    assert err.max() < 0.3


# ---- Muon ------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows, cols", [(8, 4), (4, 8)], ids=["tall_scaled", "wide_unscaled"])
def test_muon_first_update_and_momentum_buffer(runtime, rows, cols):
    lr, mu, wd = 0.05, 0.9, 0.2
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(rows, cols, generator=gen)
    g1, g2 = torch.randn(rows, cols, generator=gen), torch.randn(rows, cols, generator=gen)
    p = torch.nn.Parameter(w0.clone())
    opt = tg.Muon([p], lr=lr, momentum=mu, backend_steps=5, weight_decay=wd, rt=runtime)
    p.grad = g1.clone()
    opt.step()
    # Nesterov from a zero buffer: buf = g1, update direction g1 + mu * buf.
    ortho = tg.newton_schulz((g1 + mu * g1)[None], 5)[0]
    scale = max(1.0, rows / cols) ** 0.5
    expected = w0 * (1 - lr * wd) - lr * scale * ortho
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-6)
    if scale != 1.0:  # the tall shape's sqrt(rows/cols) is visible at this tolerance
        assert not torch.allclose(p.detach(), w0 * (1 - lr * wd) - lr * ortho, rtol=1e-6, atol=1e-6)
    p.grad = g2.clone()
    opt.step()
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], mu * g1 + g2, rtol=1e-6, atol=1e-7)


# ---- parameter groups and AdamW --------------------------------------------------------------

def test_param_groups_partition(tiny_model):
    groups = tg.param_groups(tiny_model)
    where = {}
    for group, ps in groups.items():
        for p in ps:
            assert id(p) not in where, "parameter in two groups"
            where[id(p)] = group
    named = dict(tiny_model.named_parameters())
    assert set(where) == {id(p) for p in named.values()}
    group_of = {name: where[id(p)] for name, p in named.items()}
    embed = {"tok_emb.weight", "bigram.embed.weight", "ve_embed.weight"}
    for name, group in group_of.items():
        if name in embed:
            assert group == "embed", name
        elif name.startswith("blocks.") and name.endswith(".weight"):
            assert group == "matrix" and named[name].ndim == 2, name
        else:
            assert group == "scalar", name
    must_be_scalar = ["blocks.0.resid_mix", "blocks.1.attn.q_gain", "blocks.0.attn_scale", "skip_weights",
                      "smear_gate", "bigram.proj.weight", "ve_proj.weight"]
    assert all(group_of[n] == "scalar" for n in must_be_scalar)
    assert {n for n, g in group_of.items() if g == "embed"} == embed
    assert group_of["blocks.0.attn.c_q.weight"] == group_of["blocks.1.mlp.proj.weight"] == "matrix"
    assert sum(g == "matrix" for g in group_of.values()) == 2 * 6  # Q, K, V, out, up, down per block


def test_adamw_matches_torch_adamw(tiny_model, hparams, runtime):
    h = dataclasses.replace(hparams, beta1=0.8, beta2=0.9, adam_eps=1e-3, adam_wd=0.1,
                            scalar_lr=0.02, tied_embed_lr=0.05)
    ours_model, ref_model = tiny_model, copy.deepcopy(tiny_model)
    adam = tg.build_optimizers(ours_model, h, runtime)[0]
    assert isinstance(adam, torch.optim.AdamW)
    ref_groups = tg.param_groups(ref_model)
    ref = torch.optim.AdamW([dict(params=ref_groups["embed"], lr=0.05), dict(params=ref_groups["scalar"], lr=0.02)],
                            betas=(0.8, 0.9), eps=1e-3, weight_decay=0.1)
    names = [n for n, p in ours_model.named_parameters() if not tg.is_int6_matrix(n, p)]
    ours_p, ref_p = dict(ours_model.named_parameters()), dict(ref_model.named_parameters())
    start = {n: p.detach().clone() for n, p in ours_p.items()}
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        for n in names:
            g = torch.randn(ours_p[n].shape, generator=gen)
            ours_p[n].grad, ref_p[n].grad = g.clone(), g.clone()
        adam.step()
        ref.step()
    for n in names:
        assert torch.equal(ours_p[n], ref_p[n]), n
        assert not torch.equal(ours_p[n], start[n]), n  # every AdamW parameter was trained


# ---- schedules -------------------------------------------------------------------------------

def test_lr_scale_step_based_without_cap(hparams):
    h = dataclasses.replace(hparams, iterations=100, warmdown_iters=20)
    expected = {0: 1.0, 50: 1.0, 79: 1.0, 80: 1.0, 85: 0.75, 90: 0.5, 99: 0.05, 100: 0.0, 120: 0.0}
    for step, want in expected.items():
        for elapsed in (0.0, 1e6):  # without a cap the clock does not matter
            assert tg.lr_scale(step, elapsed, 0.0, h) == pytest.approx(want, abs=1e-12), step


def test_lr_scale_wallclock_with_cap(hparams):
    h = dataclasses.replace(hparams, iterations=10_000, warmdown_iters=10)
    # 100 steps in 1000 ms: 10 ms per step, so the warmdown is the last 10 * 10 = 100 ms.
    cases = [(5000.0, 1.0), (1101.0, 1.0), (1100.0, 1.0), (1050.0, 0.5), (1010.0, 0.1), (1000.0, 0.0), (900.0, 0.0)]
    for cap_ms, want in cases:
        assert tg.lr_scale(100, 1000.0, cap_ms, h) == pytest.approx(want, abs=1e-12), cap_ms
    assert tg.lr_scale(9_999, 1000.0, 5000.0, h) == 1.0  # ITERATIONS does not matter with a cap
    assert tg.lr_scale(120, 1200.0, 1000.0, h) == 0.0  # past the cap


def test_muon_momentum_warmup(hparams):
    h = dataclasses.replace(hparams, muon_momentum_warmup_start=0.85, muon_momentum=0.95,
                            muon_momentum_warmup_steps=10)
    expected = {0: 0.85, 1: 0.86, 5: 0.90, 9: 0.94, 10: 0.95, 11: 0.95, 1000: 0.95}
    for step, want in expected.items():
        assert tg.muon_momentum(step, h) == pytest.approx(want, abs=1e-12), step
    assert tg.muon_momentum(0, dataclasses.replace(h, muon_momentum_warmup_steps=0)) == pytest.approx(0.95)
