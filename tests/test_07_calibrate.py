"""Section 07 of train_gpt.py, calibrate: the GPTQ reserve, Hessians, the calibration forward,
self-generated text.

Single-process calibration tests (GPTQ_SPLIT on 2 processes is in test_12_two_process.py): the
wallclock cap keeps GPTQ_RESERVE_SECONDS for calibration; collect_hessians against X^T X from our
own hooks (and GPTQ on those Hessians beats round-to-nearest); GPTQ_CALIB_ATTENTION picks the
forward the Hessians come from; GPTQ_CALIB=selfgen's sequences are samples of the model.

    python3 -m pytest -q tests/test_07_calibrate.py -m "slow or not slow"
"""

import copy
import dataclasses
import re

import pytest
import torch

import train_gpt as tg
from conftest import tiny_env
from doc_streams import BOS, doc_env, noisy_model, random_ids
from helpers import BLOCK_LINEAR, output_error, realistic_model, token_batches


# ==============================================================================================
# report compliance


def test_wallclock_cap_stops_training_with_the_calibration_reserve(tiny_data, runtime, tmp_path, monkeypatch, capsys):
    """MAX_WALLCLOCK_SECONDS=3 with GPTQ_RESERVE_SECONDS=1: the loop stops on the clock at about
    2 s, long before ITERATIONS, logs stopping_early, and the LR has decayed toward zero."""
    monkeypatch.chdir(tmp_path)
    tg.select_attention_backend("sdpa", "cpu")
    h = tg.Hyperparameters.from_env(tiny_env(tiny_data, ITERATIONS=100_000, MAX_WALLCLOCK_SECONDS=3,
                                             GPTQ_RESERVE_SECONDS=1, WARMDOWN_ITERS=5, WARMUP_STEPS=0,
                                             TRAIN_BATCH_TOKENS=1024, TRAIN_LOG_EVERY=1))
    model = tg.GPT(tg.ModelConfig.of(h))
    result, _, _ = tg.train(model, model, h, runtime)
    assert result.stop == "wallclock" and result.cap_ms == 2000
    assert 5 < result.steps < 100_000
    assert 2000 <= result.train_time_ms < 2000 + 1000  # the crossing step completes, nothing more
    out = capsys.readouterr().out
    assert "stopping_early: wallclock_cap train_time:" in out and f"step:{result.steps}/100000" in out
    last_scale = float(re.findall(r"lr_scale:(\S+)", out)[-1])
    assert last_scale < 0.5  # warmdown of ~5 steps before the cap


# ==============================================================================================
# quantize


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


# ==============================================================================================
# data varlen

RT = tg.Runtime(False, 0, 1, 0, torch.device("cpu"))


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


# ==============================================================================================
# report compliance


def test_selfgen_sequences_are_model_samples(tiny_model, runtime):
    seqs = tg.generate_sequences(tiny_model, 5, 12, 0.8, seed=3, rt=runtime, batch=2)
    ids = torch.cat(seqs)
    assert ids.shape == (5, 12) and ids.min() >= 0 and ids.max() < tiny_model.cfg.vocab_size
    again = torch.cat(tg.generate_sequences(tiny_model, 5, 12, 0.8, seed=3, rt=runtime, batch=2))
    assert torch.equal(ids, again)

