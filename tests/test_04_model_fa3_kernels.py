"""FlashAttention 3 through the Hugging Face `kernels` package (issue 8): used only for an explicit
ATTN_BACKEND=fa3 when no local `flash_attn_interface` exists, never by `auto`, and optional (no
`kernels` package: the usual clear error). A stand-in `kernels` module replaces the Hub download.

    python3 -m pytest -q tests/test_04_model_fa3_kernels.py
"""

import sys
import types

import pytest
import torch

import train_gpt as tg


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
