"""Section 06 of train_gpt.py, train: EMA/SWA averaging, EMA warm-up.

Weight-averaging tests (stack.md section 5): the EMA recurrence, the SWA mean and the 'blend'
against hand-computed numbers, the fall-back to EMA without snapshots, apply_weight_average, and
two rules of train(): SWA snapshots are taken exactly at the steps the LR schedule allows, and the
compile warm-up steps are rolled back (weights, optimizer state, data position).

CPU only, a few seconds (two of them train the tiny preset for a few steps):

EMA warm-up (EMA_WARMUP, issue 8 item 6): update n uses decay min(EMA_DECAY, (1+n)/(10+n)),
checked against a float64 recurrence written here; without it the records' fixed decay is kept
bitwise; and a short run no longer exports mostly its initialization.

    python3 -m pytest -q tests/test_06_train.py -m "slow or not slow"
"""

import pytest
import torch

import train_gpt as tg
from conftest import tiny_env


# ==============================================================================================
# train averaging


# A 2-input linear layer (weight (1, 2), bias (1,)) set by hand: w0 at construction, then w1..w3.
W = [([1.0, 2.0], 0.0), ([2.0, 0.0], 1.0), ([0.0, 4.0], 2.0), ([10.0, -10.0], 3.0)]
# ema_k = 0.9 * ema_{k-1} + 0.1 * w_k, from ema_0 = w0, worked out by hand:
#   weight: [1, 2] -> [1.1, 1.8] -> [0.99, 2.02] -> [1.891, 0.818]
#   bias:    0     -> 0.1        -> 0.29         -> 0.561
EMA3 = ([1.891, 0.818], 0.561)
SWA3 = ([4.0, -2.0], 2.0)  # mean of w1..w3: [(2 + 0 + 10) / 3, (0 + 4 - 10) / 3], (1 + 2 + 3) / 3
BLEND3 = ([2.9455, -0.591], 1.2805)  # (EMA3 + SWA3) / 2


def linear(weight, bias) -> torch.nn.Linear:
    lin = torch.nn.Linear(2, 1)
    set_weights(lin, weight, bias)
    return lin


@torch.no_grad()
def set_weights(lin: torch.nn.Linear, weight, bias):
    lin.weight.copy_(torch.tensor([weight]))
    lin.bias.copy_(torch.tensor([bias]))


def averaged_linear(snapshots: bool) -> tuple[torch.nn.Linear, tg.WeightAverager]:
    lin = linear(*W[0])
    avg = tg.WeightAverager(lin, 0.9)
    for weight, bias in W[1:]:
        set_weights(lin, weight, bias)
        avg.update_ema(lin)
        if snapshots:
            avg.add_swa(lin)
    return lin, avg


def assert_weights(state: dict, expected):
    torch.testing.assert_close(state["weight"], torch.tensor([expected[0]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(state["bias"], torch.tensor([expected[1]]), rtol=0, atol=1e-6)


def test_ema_follows_the_recurrence():
    lin = linear(*W[0])
    avg = tg.WeightAverager(lin, 0.9)
    assert_weights(avg.averaged("ema"), W[0])  # starts at the initial weights, no bias correction
    set_weights(lin, *W[1])
    avg.update_ema(lin)
    assert_weights(avg.averaged("ema"), ([1.1, 1.8], 0.1))
    for weight, bias in W[2:]:
        set_weights(lin, weight, bias)
        avg.update_ema(lin)
    assert_weights(avg.averaged("ema"), EMA3)
    assert avg.swa_count == 0


@pytest.mark.parametrize("mode, expected", [("ema", EMA3), ("swa", SWA3), ("blend", BLEND3)])
def test_averaged_modes(mode, expected):
    _, avg = averaged_linear(snapshots=True)
    assert avg.swa_count == 3
    assert_weights(avg.averaged(mode), expected)


@pytest.mark.parametrize("mode", ["swa", "blend"])
def test_swa_modes_without_snapshots_fall_back_to_ema(mode):
    _, avg = averaged_linear(snapshots=False)
    assert_weights(avg.averaged(mode), EMA3)


@pytest.mark.parametrize("mode, snapshots, used, expected", [
    ("swa", True, "swa", SWA3), ("blend", True, "blend", BLEND3), ("ema", True, "ema", EMA3),
    ("swa", False, "ema", EMA3),
], ids=["swa", "blend", "ema", "swa_without_snapshots"])
def test_apply_weight_average_loads_and_logs(capsys, mode, snapshots, used, expected):
    lin, avg = averaged_linear(snapshots)
    set_weights(lin, [-7.0, -7.0], -7.0)  # the live weights must be overwritten
    tg.apply_weight_average(lin, avg, mode)
    assert_weights(dict(lin.named_parameters()), expected)
    out = capsys.readouterr().out
    assert f"weight_average:{used} requested:{mode} swa_snapshots:{3 if snapshots else 0}" in out


# ---- the rules inside train() ----------------------------------------------------------------

def run_train(tiny_data, runtime, **overrides):
    """train() on the tiny preset (smaller batch) from a model built right after seeding."""
    h = tg.Hyperparameters.from_env(tiny_env(tiny_data, TRAIN_BATCH_TOKENS=1024, **overrides))
    tg.select_attention_backend("sdpa", "cpu")
    torch.manual_seed(h.seed)
    model = tg.GPT(tg.ModelConfig.of(h))
    result, averager, _ = tg.train(model, model, h, runtime)
    return h, model, result, averager


def expected_swa_steps(iterations: int, warmdown: int, every: int, start_scale: float) -> list[int]:
    """Step n (1-based) runs with the step-based LR scale of step index n-1 (no wall-clock cap):
    1 before ITERATIONS-WARMDOWN_ITERS, then (ITERATIONS - index) / WARMDOWN_ITERS."""
    steps = []
    for n in range(1, iterations + 1):
        index = n - 1
        scale = 1.0 if index < iterations - warmdown else (iterations - index) / warmdown
        if scale < start_scale and n % every == 0:
            steps.append(n)
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("start_scale, steps", [(0.5, [12]), (0.9, [8, 10, 12])])
def test_train_takes_swa_snapshots_where_the_schedule_allows(tiny_data, runtime, tmp_path, monkeypatch,
                                                             start_scale, steps):
    monkeypatch.chdir(tmp_path)
    assert expected_swa_steps(12, 6, 2, start_scale) == steps  # the rule, spelled out for this case
    seen, ema_calls, snapshots = [], [0], []
    update_ema, add_swa = tg.WeightAverager.update_ema, tg.WeightAverager.add_swa

    def counting_update(self, model):
        ema_calls[0] += 1
        update_ema(self, model)

    def recording_add(self, model):
        seen.append(ema_calls[0])  # EMA is updated once per step, so this is the step number
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
        add_swa(self, model)

    monkeypatch.setattr(tg.WeightAverager, "update_ema", counting_update)
    monkeypatch.setattr(tg.WeightAverager, "add_swa", recording_add)
    _, _, result, averager = run_train(tiny_data, runtime, ITERATIONS=12, WARMDOWN_ITERS=6, SWA_EVERY=2,
                                       SWA_START_SCALE=start_scale, WARMUP_STEPS=1)
    assert result.steps == 12 and result.stop == "iterations" and ema_calls[0] == 12
    assert averager.swa_count == len(steps)
    assert seen == steps
    swa = averager.averaged("swa")
    for name in swa:
        mean = sum(s[name] for s in snapshots) / len(snapshots)
        torch.testing.assert_close(swa[name], mean, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_train_rolls_back_the_warmup_steps(tiny_data, runtime, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    common = dict(ITERATIONS=4, WARMDOWN_ITERS=2, SWA_EVERY=1, SWA_START_SCALE=0.9)
    _, warm, r_warm, a_warm = run_train(tiny_data, runtime, WARMUP_STEPS=2, **common)
    assert "warmup_step:2/2" in capsys.readouterr().out
    h, cold, r_cold, a_cold = run_train(tiny_data, runtime, WARMUP_STEPS=0, **common)
    assert r_warm.steps == r_cold.steps == 4
    for (name, p), (_, q) in zip(warm.state_dict().items(), cold.state_dict().items()):
        assert torch.equal(p, q), name
    for mode in ("ema", "swa"):
        for name, t in a_warm.averaged(mode).items():
            assert torch.equal(t, a_cold.averaged(mode)[name]), (mode, name)
    torch.manual_seed(h.seed)  # and training did move the weights
    init = tg.GPT(tg.ModelConfig.of(h))
    assert not torch.equal(init.blocks[0].attn.c_q.weight, cold.blocks[0].attn.c_q.weight)


def test_train_done_line_says_peak_memory_na_on_cpu(tiny_data, runtime, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_train(tiny_data, runtime, ITERATIONS=2, WARMDOWN_ITERS=1, WARMUP_STEPS=0)
    done = [l for l in capsys.readouterr().out.splitlines() if "train:done" in l]
    assert len(done) == 1 and done[0].endswith("peak memory n/a (CPU)"), done


# ==============================================================================================
# train ema warmup


def run_ema(warmup: bool, decay: float, steps: int, seed: int = 0):
    """(our EMA after `steps` updates of a linear layer set to random weights, the weights seen)."""
    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(3, 2)
    avg = tg.WeightAverager(lin, decay, warmup)
    seen = [[p.detach().double().clone() for p in lin.parameters()]]
    for _ in range(steps):
        with torch.no_grad():
            for p in lin.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        avg.update_ema(lin)
        seen.append([p.detach().double().clone() for p in lin.parameters()])
    return avg, seen


def test_warmup_matches_an_independent_recurrence():
    decay, steps = 0.997, 40
    avg, seen = run_ema(True, decay, steps)
    expected = seen[0]
    for n in range(steps):
        d = min(decay, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * w for e, w in zip(expected, seen[n + 1])]
    for got, want in zip(avg.ema, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert avg.updates == steps


def test_init_weight_after_a_short_run():
    """The init's share of the average: prod of the decays. After 40 steps at 0.997 it is 0.89 without
    warm-up (the exported model is mostly the init) and 4.9e-10 with it, closed form 9! 40! / 49!."""
    steps, decay = 40, 0.997
    share_plain = decay ** steps
    share_warm = 1.0
    for n in range(steps):
        share_warm *= min(decay, (1 + n) / (10 + n))
    assert share_plain > 0.88
    assert abs(share_warm - 1 / 2054455634) < 1e-15  # 9! 40! / 49! = 1 / C(49, 9)
    # measured on weights: start at 1, then train to 0 from the first step
    lin = torch.nn.Linear(2, 2)
    with torch.no_grad():
        for p in lin.parameters():
            p.fill_(1.0)
    for warmup, share in ((False, share_plain), (True, share_warm)):
        avg = tg.WeightAverager(lin, decay, warmup)
        with torch.no_grad():
            for p in lin.parameters():
                p.zero_()
            for _ in range(steps):
                avg.update_ema(lin)
            for p in lin.parameters():
                p.fill_(1.0)
        torch.testing.assert_close(avg.ema[0], torch.full((2, 2), share), rtol=1e-5, atol=1e-7)


def test_no_warmup_is_the_fixed_decay_bitwise():
    avg, seen = run_ema(False, 0.9, 12)
    ema = [t.float() for t in seen[0]]
    for w in seen[1:]:
        torch._foreach_lerp_(ema, [t.float() for t in w], 1 - 0.9)
    for got, want in zip(avg.ema, ema):
        assert torch.equal(got, want)


def test_warmup_reaches_the_configured_decay():
    """Once (1+n)/(10+n) >= EMA_DECAY, updates are the fixed-decay ones: for 0.9 from n = 80 on."""
    gen = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(2, 2)
    warm, plain = tg.WeightAverager(lin, 0.9, True), tg.WeightAverager(lin, 0.9, False)
    for _ in range(80):
        warm.update_ema(lin)
    plain.ema = [e.clone() for e in warm.ema]
    for _ in range(5):
        with torch.no_grad():
            for p in lin.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        warm.update_ema(lin)
        plain.update_ema(lin)
    for a, b in zip(warm.ema, plain.ema):
        assert torch.equal(a, b)
    assert tg.Hyperparameters().ema_warmup is True

