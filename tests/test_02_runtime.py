"""Section 02 of train_gpt.py, runtime and log: the compiled CPU path, the CUDA paths checkable without a GPU.

The real compiled path on CPU (issue 8): COMPILE=1 forces torch.compile on CPU, and TorchInductor
builds C++ kernels (gcc) for the training step (forward + backward) and the eval forward, the
graphs the GPU run compiles. Compiled results agree with eager; one graph for training and one
for eval, no graph break, no recompile across steps, sliding batches (padded last batch) and TTT.


Cost, nearly all inductor's build (46 C++ kernels, one gcc call each): 81 CPU seconds with a cold
inductor cache (306 s wall on this 2-core machine at load 9), 19 s wall with a warm one
(/tmp/torchinductor_<user>, which persists between runs on one machine).

The CUDA code paths that can be checked without a GPU: the model traced by torch.compile with
fullgraph=True (a graph break would fail the record run's compile), the bf16 compute dtype,
and the attention backend chooser's fallbacks. The GPU itself is needed for speed and FA3.

    python3 -m pytest -q tests/test_02_runtime.py -m "slow or not slow"
"""

import pytest
import torch

import train_gpt as tg
from compiled_run import max_abs_diff, run_phases, small_hparams


# ==============================================================================================
# runtime compile cpu

STEPS = 3


def test_compile_flag_defaults_keep_cpu_eager(hparams, runtime):
    cuda = tg.Runtime(False, 0, 1, 0, torch.device("cuda"))
    on = {c: (tg.compile_enabled(tg.dataclasses.replace(hparams, compile=c), runtime),
              tg.compile_enabled(tg.dataclasses.replace(hparams, compile=c), cuda)) for c in (-1, 0, 1)}
    assert on == {-1: (False, True), 0: (False, False), 1: (True, True)}
    assert tg.Hyperparameters.from_env({}).compile == -1 and tg.maybe_compile(torch.nn.Identity(), hparams, runtime) \
        .__class__ is torch.nn.Identity


@pytest.mark.slow
def test_inductor_on_cpu_matches_eager_without_breaks_or_recompiles(tiny_data, runtime, monkeypatch):
    h = small_hparams(tiny_data, COMPILE=0)
    eager = run_phases(h, runtime, STEPS)
    assert eager.graphs["ttt"] == (0, 0)  # nothing compiled with COMPILE=0
    import torch._inductor.config
    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)  # no worker pool to start
    comp = run_phases(tg.dataclasses.replace(h, compile=1), runtime, STEPS)
    g = comp.graphs
    assert g["first_step"] == (1, 0)  # forward + backward of the training loss: one graph, no break
    assert g["train"] == g["first_step"]  # no recompile on later steps or micro-steps
    assert g["sliding"] == (2, 0)  # + the eval forward, one graph for every batch, the padded last one too
    assert g["ttt"] == g["sliding"]  # TTT's scoring reuses it after its weights changed in place
    # fp32 on both sides; inductor fuses and reorders float sums, so agreement is to rounding
    # (measured here: losses within 1.2e-6 relative over 3 steps). In the weights a rounding-size
    # gradient difference can flip a bf16 rounding in Muon's Newton-Schulz or the sign of a near-zero
    # Adam step, so one step may differ by a small fraction of the LR (measured: 2.4e-4 < 0.1 * 0.025).
    lr = max(h.matrix_lr, h.scalar_lr, h.tied_embed_lr)
    print(f"losses compiled {comp.losses} eager {eager.losses}; first-step weights max abs diff "
          f"{max_abs_diff(comp.first_step_params, eager.first_step_params):.2e}")
    assert comp.losses == pytest.approx(eager.losses, rel=1e-5)
    assert max_abs_diff(comp.first_step_params, eager.first_step_params) < 0.1 * lr
    nll_c, nll_e = comp.sliding[0].item(), eager.sliding[0].item()
    assert comp.sliding[1:].tolist() == eager.sliding[1:].tolist()  # same scored tokens and bytes
    assert nll_c == pytest.approx(nll_e, rel=1e-4)
    assert (comp.ttt.tokens, comp.ttt.bytes) == (eager.ttt.tokens, eager.ttt.bytes)
    assert comp.ttt.val_bpb == pytest.approx(eager.ttt.val_bpb, rel=1e-4)


@pytest.mark.parametrize("mode", tg.COMPILE_MODES)
def test_compile_mode_reaches_torch_compile(hparams, runtime, monkeypatch, mode):
    """COMPILE_MODE (issue 16 item 3): maybe_compile passes it as torch.compile's mode; default
    passes exactly the call it always made (no mode), so the default run is unchanged."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: calls.append((module, kw)) or module)
    h = tg.Hyperparameters.from_env({"PRESET": "tiny", "COMPILE": "1", "COMPILE_MODE": mode})
    assert h.compile_mode == mode and tg.Hyperparameters.from_env({}).compile_mode == "default"
    module = torch.nn.Identity()
    assert tg.maybe_compile(module, h, runtime) is module
    assert tg.maybe_compile(module, tg.dataclasses.replace(h, compile=0), runtime) is module  # off: no call
    expected = dict(dynamic=False, fullgraph=True) if mode == "default" else dict(dynamic=False, fullgraph=True, mode=mode)
    assert calls == [(module, expected)]


def test_compile_mode_bad_value_names_the_variable():
    with pytest.raises(tg.ConfigError, match=r"^COMPILE_MODE=reduce-overhead: must be one of \('default', 'max-autotune-no-cudagraphs', 'max-autotune'\)$"):
        tg.Hyperparameters.from_env({"COMPILE_MODE": "reduce-overhead"})


@pytest.mark.parametrize("compile_,line", [(0, "compile:off"), (1, "compile:on mode:max-autotune-no-cudagraphs")])
def test_train_logs_the_compile_mode(hparams, runtime, capsys, compile_, line):
    h = tg.dataclasses.replace(hparams, compile=compile_, compile_mode="max-autotune-no-cudagraphs", iterations=1,
                               warmup_steps=0)
    base = tg.build_model(tg.ModelConfig.of(h), runtime)
    tg.train(base, base, h, runtime)  # the model as given: only the log line reads COMPILE here
    assert [x for x in capsys.readouterr().out.splitlines() if x.startswith("compile:")] == [line]


# ==============================================================================================
# runtime gpu paths


@pytest.fixture
def noisy_model(hparams) -> tg.GPT:
    torch.manual_seed(0)
    m = tg.GPT(tg.ModelConfig.of(hparams))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def test_model_compiles_fullgraph_without_breaks(noisy_model, hparams):
    """Dynamo must trace forward (training loss and per-token NLL) as one graph."""
    torch._dynamo.reset()
    compiled = torch.compile(noisy_model, dynamic=False, fullgraph=True, backend="eager")
    x = torch.randint(0, hparams.vocab_size, (2, 32))
    y = torch.randint(0, hparams.vocab_size, (2, 32))
    torch.testing.assert_close(compiled(x, y), noisy_model(x, y))
    nll = torch.compile(tg.nll_function(noisy_model), dynamic=False, fullgraph=True, backend="eager")
    torch.testing.assert_close(nll(x, y), noisy_model(x, y, reduction="none"))
    loss = compiled(x, y)
    loss.backward()  # the backward of the traced graph runs too
    assert all(p.grad is not None for p in noisy_model.parameters() if p.requires_grad)


def test_bf16_compute_dtype_matches_fp32(noisy_model, hparams):
    """compute_dtype=bf16 (what CUDA uses): fp32 master weights cast at each matmul, loss in fp32."""
    bf16 = tg.GPT(noisy_model.cfg, compute_dtype=torch.bfloat16)
    bf16.load_state_dict(noisy_model.state_dict())
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    x = torch.randint(0, hparams.vocab_size, (2, 32))
    y = torch.randint(0, hparams.vocab_size, (2, 32))
    assert bf16.forward_hidden(x).dtype == torch.bfloat16
    loss16, loss32 = bf16(x, y), noisy_model(x, y)
    assert loss16.dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) < 0.02 * loss32.item()
    loss16.backward()
    assert all(p.grad.dtype == torch.float32 for p in bf16.parameters() if p.grad is not None)


@pytest.mark.parametrize("requested,device,expected", [
    ("auto", "cpu", "sdpa"), ("sdpa", "cpu", "sdpa"), ("sdpa", "cuda", "sdpa"),
], ids=["auto-cpu", "sdpa-cpu", "sdpa-forced-on-cuda"])
def test_attention_backend_fallbacks(requested, device, expected):
    assert tg.select_attention_backend(requested, device) == expected
    assert tg._ATTENTION["name"] == expected and tg._ATTENTION["fn"] is None


def test_flash_attention_backend_is_called_with_fa_layout(monkeypatch, noisy_model, hparams):
    """A stand-in for flash_attn_interface: called with (B,T,H,D) q and (B,T,Hkv,D) k/v, causal, and
    its (out, lse) tuple unwrapped; the model output then equals the SDPA path."""
    import sys
    import types
    calls = []

    def fake_fa(q, k, v, causal):
        calls.append((q.shape, k.shape, causal))
        rep = q.size(2) // k.size(2)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.repeat_interleave(rep, 2).transpose(1, 2), v.repeat_interleave(rep, 2).transpose(1, 2),
            is_causal=causal).transpose(1, 2)
        return out, None  # some FA3 builds return (out, lse)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", types.SimpleNamespace(flash_attn_func=fake_fa))
    x = torch.randint(0, hparams.vocab_size, (2, 16))
    ref = noisy_model(x, x, reduction="none")
    assert tg.select_attention_backend("fa3", "cuda") == "fa3"
    out = noisy_model(x, x, reduction="none")
    head_dim = hparams.model_dim // hparams.num_heads
    assert calls[0] == ((2, 16, hparams.num_heads, head_dim), (2, 16, hparams.num_kv_heads, head_dim), True)
    assert len(calls) == hparams.num_layers
    torch.testing.assert_close(out, ref)

