"""Section 05 of train_gpt.py, optimizer and schedule: Muon, Adam groups, the frontier options.

Optimizer tests (stack.md section 4): Muon's Newton-Schulz orthogonalization, Muon's update rule
(Nesterov momentum, shape scale, decoupled weight decay) against an independent computation, the
Muon/AdamW parameter partition, our AdamW against torch.optim.AdamW, the LR schedule (step-based
and wall-clock warmdown) and the Muon momentum warm-up.

CPU only, about a second:

The frontier's optimizer options (frontier.md section 3, issue 9): Polar Express Newton-Schulz
coefficients (MUON_NS_COEFFS), MuonEq-R row normalization (MUON_ROW_NORMALIZE), the fractional
warmdown with a floor (WARMDOWN_FRAC, MIN_LR) and the embedding weight decay (EMBED_WD), each
against an independent computation; and, each option off, bitwise the code they were added to
(reference implementations of the previous Muon, Newton-Schulz and LR schedule written out here).

    python3 -m pytest -q tests/test_05_optimizer.py -m "slow or not slow"
"""

import copy
import dataclasses

import numpy as np
import pytest
import torch

import train_gpt as tg


# ==============================================================================================
# optimizer


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


# ==============================================================================================
# optimizer frontier

# frontier.md 3.2, typed from the spec's table (not imported from the script)
POLAR = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
         (4.042929935166739, -2.808917465908714, 0.5000178451051316),
         (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
         (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
         (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]
CLASSIC = (3.4445, -4.7750, 2.0315)
# Five Polar Express steps map a singular value s of G/||G||_F in [1e-3, 1] into [0.8589, 1.1411]
# in exact arithmetic (the odd polynomials' composition, checked below); bf16 adds under 0.01.
PE_LOW, PE_HIGH = 0.8588, 1.1412


def reference_ns(G, steps, coeffs):
    """Newton-Schulz as the script wrote it before the coefficient option (one triple, 5 steps)."""
    X = G.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    for a, b, c in coeffs:
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if transposed else X).to(G.dtype)


def gains_along_singular_vectors(G, O):
    """(what each of G's singular directions was mapped to, relative singular values of G)."""
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    M = U.mT @ O.double() @ Vh.mT
    return torch.diagonal(M, dim1=-2, dim2=-1), S / G.double().norm(dim=(-2, -1)).unsqueeze(-1)


def test_polar_express_scalar_map_range():
    s = np.logspace(-3, 0, 100_001)
    x = s.copy()
    for a, b, c in POLAR:
        x = a * x + b * x ** 3 + c * x ** 5
    assert PE_LOW < x.min() < 0.859 and 1.141 < x.max() < PE_HIGH
    assert tg.ns_coefficients("polar_express", 5) == tuple(POLAR)
    assert tg.ns_coefficients("classic", 5) == (CLASSIC,) * 5


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (3, 48, 48), (4, 128, 64)],
                         ids=["tall", "wide", "batched_square", "bank"])
def test_polar_express_singular_values_in_the_documented_range(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    O = tg.newton_schulz(G, 5, coeffs="polar_express")
    assert O.shape == G.shape and O.dtype == G.dtype
    gains, rel = gains_along_singular_vectors(G, O)
    reach = rel >= 1e-3
    assert reach.float().mean() > 0.95
    assert gains[reach].min() > PE_LOW - 0.02 and gains[reach].max() < PE_HIGH + 0.02
    s = torch.linalg.svdvals(O.double())
    assert s.min() > PE_LOW - 0.02 and s.max() < PE_HIGH + 0.02
    torch.testing.assert_close(O, reference_ns(G, 5, POLAR), rtol=0, atol=0)
    classic_gains, _ = gains_along_singular_vectors(G, tg.newton_schulz(G, 5))
    assert classic_gains[reach].min() < 0.75  # the classic quintic leaves a wider band: the option matters


def test_classic_newton_schulz_is_bitwise_the_previous_one():
    G = torch.randn(5, 48, 80, generator=torch.Generator().manual_seed(3))
    for steps in (1, 5, 7):
        assert torch.equal(tg.newton_schulz(G, steps), reference_ns(G, steps, [CLASSIC] * steps))


def test_row_normalize_gives_unit_rows_in_the_same_directions():
    U = torch.randn(3, 16, 24, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 3, 16)[:, None]
    R = tg.row_normalize(U)
    torch.testing.assert_close(R.norm(dim=-1), torch.ones(3, 16), rtol=1e-6, atol=1e-6)
    cos = (R * U).sum(-1) / U.norm(dim=-1)
    torch.testing.assert_close(cos, torch.ones(3, 16), rtol=1e-6, atol=1e-6)
    assert torch.equal(tg.row_normalize(torch.zeros(2, 4)), torch.zeros(2, 4))  # clamped: no NaN


# ---- Muon ------------------------------------------------------------------------------------

def reference_muon_step(params, state, lr, mu, wd, steps, coeffs, row_norm):
    """The previous Muon, one matrix at a time, single process, plus the two options per spec."""
    banks = {}
    for p in params:
        banks.setdefault(tuple(p.shape), []).append(p)
    for shape, ps in banks.items():
        us = []
        for p in ps:
            buf = state.setdefault(id(p), torch.zeros_like(p))
            buf.mul_(mu).add_(p.grad)
            u = p.grad.add(buf, alpha=mu)
            if row_norm:
                u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-7)
            us.append(u)
        updates = reference_ns(torch.stack(us), steps, coeffs)
        scale = max(1.0, shape[0] / shape[1]) ** 0.5
        for p, u in zip(ps, updates):
            p.mul_(1 - lr * wd)
            p.add_(u.to(p.dtype), alpha=-lr * scale)


@pytest.mark.parametrize("row_norm,coeffs", [(False, "classic"), (True, "classic"), (False, "polar_express"),
                                             (True, "polar_express")],
                         ids=["off_bitwise_previous", "row_norm", "polar", "both"])
def test_muon_against_the_reference(runtime, row_norm, coeffs):
    gen = torch.Generator().manual_seed(2)
    shapes = [(16, 8)] * 3 + [(8, 16)] * 2 + [(12, 12)]  # three banks
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ref = [p.detach().clone() for p in ours]
    opt = tg.Muon(ours, lr=0.05, momentum=0.9, backend_steps=5, weight_decay=0.1, rt=runtime,
                  row_normalize=row_norm, ns_coeffs=coeffs)
    ref_state = {}
    table = POLAR if coeffs == "polar_express" else [CLASSIC] * 5
    for _ in range(3):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, r, g in zip(ours, ref, grads):
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        with torch.no_grad():
            reference_muon_step(ref, ref_state, 0.05, 0.9, 0.1, 5, table, row_norm)
    for p, r in zip(ours, ref):
        assert torch.equal(p.detach(), r), "Muon differs from the reference"
    bufs = [opt.state[p]["momentum_buffer"] for p in ours]
    assert [id(b) for b in bufs] == [id(opt.state[p]["momentum_buffer"]) for p in ours]
    p0 = ours[0]
    buf_before = opt.state[p0]["momentum_buffer"]
    p0.grad = torch.zeros_like(p0)
    for p in ours[1:]:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.state[p0]["momentum_buffer"] is buf_before  # made once, updated in place


# ---- schedule --------------------------------------------------------------------------------

def reference_lr_scale(step, elapsed_ms, cap_ms, iterations, warmdown_iters):
    """The previous schedule (WARMDOWN_ITERS only)."""
    if cap_ms <= 0:
        start = iterations - warmdown_iters
        return 1.0 if step < start else max(iterations - step, 0) / max(warmdown_iters, 1)
    warmdown_ms = warmdown_iters * elapsed_ms / max(step, 1)
    remaining_ms = max(cap_ms - elapsed_ms, 0.0)
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0


def test_lr_scale_off_is_bitwise_the_previous_schedule(hparams):
    h = dataclasses.replace(hparams, iterations=1000, warmdown_iters=300)
    assert h.warmdown_frac == 0.0 and h.min_lr == 0.0
    rng = np.random.default_rng(0)
    for _ in range(2000):
        step = int(rng.integers(0, 1200))
        elapsed = float(rng.uniform(0, 2e5))
        cap = float(rng.choice([0.0, rng.uniform(1, 2e5)]))
        assert tg.lr_scale(step, elapsed, cap, h) == reference_lr_scale(step, elapsed, cap, 1000, 300)


@pytest.mark.parametrize("frac,floor", [(0.85, 0.1), (0.5, 0.0), (1.0, 0.25)], ids=["final", "no_floor", "all"])
def test_lr_scale_warmdown_frac_and_min_lr(hparams, frac, floor):
    """frontier.md 3.4: with f the budget fraction, 1 for f < 1 - W, then max((1 - f) / W, MIN_LR)."""
    h = dataclasses.replace(hparams, iterations=200, warmdown_iters=7, warmdown_frac=frac, min_lr=floor)

    def expected(f):
        return 1.0 if f < 1 - frac else max((1 - f) / frac, floor)

    for elapsed in np.linspace(0, 700, 141):  # capped: the wall clock decides, the step count does not
        for step in (1, 150, 10_000):
            assert tg.lr_scale(step, float(elapsed), 600.0, h) == pytest.approx(expected(elapsed / 600), abs=1e-12)
    for step in range(0, 231):  # uncapped: ITERATIONS decides, the clock does not
        assert tg.lr_scale(step, 1e9, 0.0, h) == pytest.approx(expected(step / 200), abs=1e-12)
    assert tg.lr_scale(200, 0.0, 0.0, h) == floor  # the floor holds to the end


def test_min_lr_floors_the_warmdown_iters_schedule(hparams):
    h = dataclasses.replace(hparams, iterations=100, warmdown_iters=20, min_lr=0.3)
    assert [tg.lr_scale(s, 0.0, 0.0, h) for s in (79, 80, 86, 90, 99, 100)] == pytest.approx(
        [1.0, 1.0, 0.7, 0.5, 0.3, 0.3])
    assert tg.lr_scale(100, 1050.0, 1000.0, h) == 0.3 and tg.lr_scale(100, 999.0, 1000.0, h) == 0.3


# ---- EMBED_WD --------------------------------------------------------------------------------

def adam_after_steps(model, h, runtime, steps=3):
    adam = tg.build_optimizers(model, h, runtime)[0]
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        adam.step()
    return adam


def test_embed_wd_applies_to_the_embedding_group_only(tiny_model, hparams, runtime):
    import copy
    h = dataclasses.replace(hparams, adam_wd=0.1, embed_wd=0.3, beta1=0.8, beta2=0.9)
    ours, ref_model = tiny_model, copy.deepcopy(tiny_model)
    adam = adam_after_steps(ours, h, runtime)
    assert [g["weight_decay"] for g in adam.param_groups] == [0.3, 0.1]
    groups = tg.param_groups(ref_model)
    ref = torch.optim.AdamW([dict(params=groups["embed"], lr=h.tied_embed_lr, weight_decay=0.3),
                             dict(params=groups["scalar"], lr=h.scalar_lr, weight_decay=0.1)],
                            betas=(0.8, 0.9), eps=h.adam_eps)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        for p in ref_model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        ref.step()
    ours_p, ref_p = dict(ours.named_parameters()), dict(ref_model.named_parameters())
    for name, p in ours_p.items():
        if not tg.is_int6_matrix(name, p):
            assert torch.equal(p, ref_p[name]), name


def test_embed_wd_unset_is_bitwise_adam_wd(tiny_model, hparams, runtime):
    import copy
    a, b = tiny_model, copy.deepcopy(tiny_model)
    h = dataclasses.replace(hparams, adam_wd=0.2)
    assert h.embed_wd == -1.0
    adam_after_steps(a, h, runtime)
    adam_after_steps(b, dataclasses.replace(h, embed_wd=0.2), runtime)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("env,var", [
    ({"MUON_NS_COEFFS": "cubic"}, "MUON_NS_COEFFS"),
    ({"MUON_NS_COEFFS": "polar_express", "MUON_BACKEND_STEPS": "6"}, "MUON_BACKEND_STEPS"),
    ({"WARMDOWN_FRAC": "1.5"}, "WARMDOWN_FRAC"),
    ({"MIN_LR": "1.0"}, "MIN_LR"),
    ({"EMBED_WD": "-0.5"}, "EMBED_WD"),
], ids=["ns_name", "polar_steps", "frac", "min_lr", "embed_wd"])
def test_bad_values_name_the_variable(env, var):
    with pytest.raises(tg.ConfigError, match=f"^{var}="):
        tg.Hyperparameters.from_env(env)


def test_seed_defaults_leave_every_option_off():
    h = tg.Hyperparameters()
    assert (h.muon_row_normalize, h.muon_ns_coeffs, h.warmdown_frac, h.min_lr, h.embed_wd) == (
        False, "classic", 0.0, 0.0, -1.0)
    h = tg.Hyperparameters.from_env({"MUON_ROW_NORMALIZE": "1", "MUON_NS_COEFFS": "polar_express",
                                     "WARMDOWN_FRAC": "0.85", "MIN_LR": "0.1", "EMBED_WD": "0.085"})
    assert (h.muon_row_normalize, h.muon_ns_coeffs, h.warmdown_frac, h.min_lr, h.embed_wd) == (
        True, "polar_express", 0.85, 0.1, 0.085)

