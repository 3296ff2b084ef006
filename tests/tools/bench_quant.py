"""Quantization gap benchmark: train once, then compare quantizers on the same averaged weights.

    PRESET=tiny DATA_PATH=/tmp/pg_tiny TOKENIZER_PATH=/tmp/pg_tiny/tokenizer.model python3 tests/tools/bench_quant.py
    DATA_PATH=../shared/data/standin_sp1024 TOKENIZER_PATH=../shared/data/tokenizers/fineweb_1024_bpe.model \
        NUM_LAYERS=11 ... python3 tests/tools/bench_quant.py

Configuration comes from the environment exactly as for train_gpt.py (INT6_SCALE_FLOOR too). After training and weight
averaging it prints, per variant, the plain-eval (roundtrip) val_bpb of the dequantized weights,
the gap to the unquantized averaged weights, and the compressed model bytes (zstd-22 and lzma-9e):
  rtn          round-to-nearest int6, clip at the row max (no search, no Hessian)
  lite         GPTQ-lite: per-row clip search, identity Hessian
  gptq_train   full GPTQ, Hessians from training batches
  gptq_selfgen full GPTQ, Hessians from text the model generates
  *_embgptq    the same with the tied embedding GPTQ'd to int6 with the head's Hessian
Validation data is read only after all training and calibration. Not a test: a measurement.
"""

import os
import sys
import time


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import train_gpt as tg  # noqa: E402
from benchlib import train_averaged  # noqa: E402


def rtn_state(state: dict, hessians: dict, block: int, embed_gptq: bool = False,
              scale_floor: float = tg.INT6_SCALE_FLOOR) -> dict:
    spec = tg.QuantSpec.of(tg.Hyperparameters(gptq_block_size=block, int6_scale_floor=scale_floor))
    out = tg.quantize_state(state, {}, spec)
    for name in out["gptq"]:
        out["gptq"][name] = tg.gptq_quantize(state[name], None, block, clip_quantiles=(1.0,), scale_floor=scale_floor)
    return out


def main() -> int:
    h = tg.Hyperparameters.from_env(os.environ)
    rt = tg.setup_runtime(h.device, os.environ)
    tg.select_attention_backend(h.attn_backend, rt.device.type)
    base, result, loader = train_averaged(h, rt, compiled=True)
    hess = {"none": {}}
    for source in ("train", "selfgen"):
        t0 = time.perf_counter()
        hess[source] = tg.calibrate(base, loader, tg.dataclasses.replace(h, gptq_calib=source), rt).hessians
        print(f"bench_quant:calib:{source} seconds:{time.perf_counter() - t0:.1f}")
    state = {n: p.detach() for n, p in base.state_dict().items()}
    variants = {"rtn": (rtn_state, "none", False), "lite": (tg.quantize_state, "none", False),
                "gptq_train": (tg.quantize_state, "train", False), "gptq_selfgen": (tg.quantize_state, "selfgen", False),
                "lite_embgptq": (tg.quantize_state, "none", True),
                "gptq_train_embgptq": (tg.quantize_state, "train", True)}
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=h.tokenizer_path)
    val = tg.load_validation(h, sp, rt, max(h.train_seq_len, h.eval_seq_len)).to(rt.device)
    pre = tg.evaluate(tg.nll_function(base), val, h, rt, h.eval_seq_len)
    print(f"bench_quant:prequant val_bpb:{pre.val_bpb:.5f} tokens:{pre.tokens} int6_scale_floor:{h.int6_scale_floor}")
    cfg = tg.ModelConfig.of(h)
    for name, (fn, source, embed) in variants.items():
        t0 = time.perf_counter()
        if fn is rtn_state:
            qstate = fn(state, hess[source], h.gptq_block_size, embed, h.int6_scale_floor)
        else:
            spec = tg.QuantSpec.of(tg.Hyperparameters(gptq_block_size=h.gptq_block_size,
                                                                int6_scale_floor=h.int6_scale_floor,
                                                                quant_embed="gptq" if embed else "int8"))
            qstate = fn(state, hess[source], spec)
        quant_s = time.perf_counter() - t0
        raw = tg.artifact_payload(qstate, cfg)
        _, deq = tg.unpack_artifact(tg.compress(raw, "zstd"))
        model = tg.build_model(cfg, rt)
        model.load_state_dict(deq, strict=True)
        r = tg.evaluate(tg.nll_function(model), val, h, rt, h.eval_seq_len)
        print(f"bench_quant:{name} roundtrip_bpb:{r.val_bpb:.5f} gap:{r.val_bpb - pre.val_bpb:+.5f} "
              f"zstd_bytes:{len(tg.compress(raw, 'zstd'))} lzma_bytes:{len(tg.compress(raw, 'lzma'))} "
              f"quant_seconds:{quant_s:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
