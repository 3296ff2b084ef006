"""EMA warm-up (EMA_WARMUP, issue 8 item 6): update n uses decay min(EMA_DECAY, (1+n)/(10+n)),
checked against a float64 recurrence written here; without it the records' fixed decay is kept
bitwise; and a short run no longer exports mostly its initialization.

    python3 -m pytest -q tests/test_06_train_ema_warmup.py
"""

import torch

import train_gpt as tg


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
