"""The CUDA code paths that can be checked without a GPU: the model traced by torch.compile with
fullgraph=True (a graph break would fail the record run's compile), the bf16 compute dtype,
and the attention backend chooser's fallbacks. The GPU itself is needed for speed and FA3.

    python3 -m pytest -q tests/test_02_runtime_gpu_paths.py
"""

import pytest
import torch

import train_gpt as tg


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
