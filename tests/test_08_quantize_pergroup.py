"""QUANT_COMPRESSOR=pergroup (issue 19 finding 4): #1855's per-group layout with zpaq for its lrzip,
and the compressed-size projection from code entropy (project_model_bytes).

Covers: the round trip is bit-exact and the reader tells the container by its magic; the grouped
matrices are stored by role, layer by layer in numeric order, transposed; without the zpaq package
the setting and the reader are one ConfigError naming the variable and `pip install zpaq`; on i.i.d.
int6 codes of a known distribution the container is under brotli-11 and within 1% of the exact
entropy; the projection is within a few percent of a real compression of a small model.

Run: python3 -m pytest -q tests/test_08_quantize_pergroup.py   (CPU only, a few seconds)
"""

import json
import math

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import quant_spec
from helpers import ALL_OPTIONS, trained_like_state

pytest.importorskip("zpaq")
CFG = tg.ModelConfig.of(tg.Hyperparameters(vocab_size=320, ve_layers="0,1"))


def test_roundtrip_is_bit_exact_and_the_reader_detects_the_container():
    state = trained_like_state()
    qstate = tg.quantize_state(state, {}, ALL_OPTIONS)
    blob = tg.pack_artifact(qstate, CFG, "pergroup")
    assert blob.startswith(tg.PERGROUP_MAGIC) and not tg.pack_artifact(qstate, CFG, "brotli").startswith(tg.PERGROUP_MAGIC)
    cfg_back, raw_back = tg.pergroup_unpack(blob)
    assert cfg_back == CFG
    for kind, group in qstate.items():
        assert set(raw_back[kind]) == set(group), kind
        for name, ts in group.items():
            for a, b in zip(ts if isinstance(ts, tuple) else (ts,), raw_back[kind][name] if isinstance(ts, tuple) else (raw_back[kind][name],)):
                assert a.dtype == b.dtype and torch.equal(a, b), name
    cfg2, deq = tg.unpack_artifact(blob)  # the same reader as every other format
    expected = tg.dequantize_state(qstate)
    assert cfg2 == CFG and set(deq) == set(expected) == set(state)
    assert all(torch.equal(deq[n], expected[n]) for n in expected)
    assert tg.pack_artifact(qstate, CFG, "pergroup") == blob  # deterministic
    with pytest.raises(tg.ConfigError, match="^EVAL_ARTIFACT: the pergroup artifact .* corrupt or truncated"):
        tg.unpack_artifact(blob[:len(blob) - 7])


def test_groups_by_role_then_layer_transposed():
    state = {f"blocks.{i}.{r}.weight": torch.randn(8, 16) for i in (10, 2) for r in ("mlp.fc", "attn.c_q")}
    state["tok_emb.weight"] = torch.randn(70_000 // 16, 16)
    qstate = tg.quantize_state(state, {}, quant_spec(quant_clip="sdclip", quant_embed="gptq", embed_bits=7))
    blob = tg.pack_artifact(qstate, CFG, "pergroup")
    n = int(np.frombuffer(blob, "<u4", count=1, offset=4)[0])
    lengths = np.frombuffer(blob, "<u4", count=n, offset=8)
    start = 8 + 4 * n + int(lengths[0])
    table = json.loads(tg.decompress(blob[start:start + int(lengths[1])]))
    assert [t[0] for t in table] == ["tok_emb.weight", "blocks.2.attn.c_q.weight", "blocks.10.attn.c_q.weight",
                                     "blocks.2.mlp.fc.weight", "blocks.10.mlp.fc.weight"]
    codes = b"".join(tg.zpaq_module().decompress(blob[e - k:e]) for e, k in zip(
        (8 + 4 * n + np.cumsum(lengths)).tolist()[2:], lengths.tolist()[2:]))
    expected = b"".join(qstate["gptq"][name][0].T.contiguous().numpy().tobytes() for name, _ in table)
    assert codes == expected


def test_without_zpaq_one_error_naming_the_variable(monkeypatch):
    blob = tg.pack_artifact(tg.quantize_state(trained_like_state(), {}, ALL_OPTIONS), CFG, "pergroup")
    monkeypatch.setattr(tg, "zpaq_module", lambda: None)
    with pytest.raises(tg.ConfigError, match=r"^QUANT_COMPRESSOR=pergroup: pergroup needs the zpaq package: pip install zpaq$"):
        tg.Hyperparameters.from_env({"QUANT_COMPRESSOR": "pergroup"})
    with pytest.raises(tg.ConfigError, match=r"^QUANT_COMPRESSOR=pergroup: pergroup needs the zpaq package"):
        tg.Hyperparameters.from_env({"PRESET": "frontier", "COMPRESSOR": "pergroup"})  # the record's name
    with pytest.raises(tg.ConfigError, match=r"^EVAL_ARTIFACT: a QUANT_COMPRESSOR=pergroup artifact needs the zpaq "
                                             r"package: pip install zpaq$"):
        tg.unpack_artifact(blob)


def test_record_name_means_ours():
    h = tg.Hyperparameters.from_env({"PRESET": "frontier", "COMPRESSOR": "pergroup"})
    assert h.quant_compressor == "pergroup"
    assert "env_alias:COMPRESSOR=pergroup -> QUANT_COMPRESSOR=pergroup" in tg.env_aliases({"PRESET": "frontier", "COMPRESSOR": "pergroup"})[1]


def test_iid_int6_codes_under_brotli_and_near_their_entropy():
    """Codes drawn i.i.d. from a discretised Gaussian (SDClip k=11.5, int6): the exact entropy of
    that distribution (computed from its probabilities, not from the sample) bounds every coder."""
    levels = np.arange(-31, 32)
    sigma = 31 / 11.5
    cdf = lambda x: 0.5 * (1 + np.vectorize(math.erf)(x / (sigma * math.sqrt(2))))  # noqa: E731
    p = cdf(levels + 0.5) - cdf(levels - 0.5)
    p[0] += cdf(-31.5)
    p[-1] += 1 - cdf(31.5)
    entropy_bits = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
    rows, cols = 256, 2048
    q = torch.from_numpy(np.random.default_rng(0).choice(levels, size=(rows, cols), p=p).astype(np.int8))
    qstate = {"gptq": {"blocks.0.mlp.fc.weight": (q, torch.ones(rows, dtype=torch.float16))},
              "int8": {}, "gate": {}, "fp16": {}, "lqer": {}}
    bound = rows * cols * entropy_bits / 8
    pergroup = len(tg.pack_artifact(qstate, CFG, "pergroup"))
    brotli = len(tg.pack_artifact(qstate, CFG, "brotli"))
    assert bound < pergroup < brotli and pergroup < 1.01 * bound, (pergroup, brotli, bound)
    assert abs(tg.payload_entropy_bytes(qstate) - bound - 2 * rows) < 0.002 * bound  # the sample's entropy


@pytest.mark.parametrize("method", ["brotli", "pergroup"])
def test_projection_against_a_real_compression(tiny_model, method):
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.normal_(0, 0.5)
    state = {n: p.detach() for n, p in tiny_model.state_dict().items()}
    qstate = tg.quantize_state(state, {}, ALL_OPTIONS)
    real = len(tg.pack_artifact(qstate, tiny_model.cfg, method))
    # fp16 bytes count at face value (they compress a little): the projection errs high, by < 8% at this size
    assert -0.01 < tg.project_model_bytes(qstate, method) / real - 1 < 0.08, (tg.project_model_bytes(qstate, method), real)
