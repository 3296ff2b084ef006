"""Frontier quantization benchmark (issue 10 item 7): train one small model, then quantize the same
weights every way and print bytes, roundtrip bpb gap and time per variant.

    OMP_NUM_THREADS=1 BENCH_WEIGHTS=/tmp/bq1024.pt DATA_PATH=../shared/data/standin_sp1024 \
      TOKENIZER_PATH=../shared/data/tokenizers/fineweb_1024_bpe.model VOCAB_SIZE=1024 \
      python3 tests/tools/bench_quant_frontier.py
    (the same with standin_sp8192, fineweb_8192_bpe.model, VOCAB_SIZE=8192)

The model is BENCH_MODEL below (4 layers, width 128, MLP 4x) on top of PRESET=tiny; the
environment can override any field. Training runs once: its averaged weights and training-data
Hessians are saved to BENCH_WEIGHTS and reused by later runs; BENCH_VARIANTS=a,b runs a subset of VARIANTS. Validation data is read only after
training and calibration. Not a test: a measurement (CPU figures in README.md).
"""

import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import train_gpt as tg  # noqa: E402
from benchlib import bench_hparams, train_averaged  # noqa: E402

BENCH_MODEL = dict(PRESET="tiny", NUM_LAYERS="4", MODEL_DIM="128", NUM_HEADS="4", NUM_KV_HEADS="2",
                   MLP_MULT="4.0", ROPE_DIMS="16", XSA_LAST_N="4", VE_LAYERS="2,3", VE_DIM="32",
                   TRAIN_SEQ_LEN="256", EVAL_SEQ_LEN="256", EVAL_STRIDE="256", TRAIN_BATCH_TOKENS="8192",
                   MICRO_BATCH_SEQS="32", ITERATIONS="300", WARMDOWN_ITERS="100", EMA_DECAY="0.99",
                   GPTQ_CALIB="train", GPTQ_CALIB_BATCHES="8", TTT_ENABLED="0")


def train_or_load(h, rt, path: str) -> tuple[dict, dict]:
    """(averaged state dict, training-data Hessians), trained once and cached at `path`."""
    if os.path.exists(path):
        saved = torch.load(path, weights_only=True)
        return saved["state"], saved["hessians"]
    t0 = time.perf_counter()
    base, result, loader = train_averaged(h, rt)
    hessians = tg.calibrate(base, loader, h, rt).hessians
    print(f"bench_quant_frontier:trained steps:{result.steps} seconds:{time.perf_counter() - t0:.0f}")
    state = {n: p.detach().clone() for n, p in base.state_dict().items()}
    torch.save({"state": state, "hessians": hessians}, path)
    return state, hessians


ROLES = tg.PERGROUP_ROLES  # #1855's groups


def role_order(entry: tuple) -> tuple:
    """Codes grouped by role, all layers of a role together, in layer order (#1855)."""
    kind, name, i, t = entry
    role = next((k for k, r in enumerate(ROLES) if r in "." + name), len(ROLES))
    layer = int(name.split(".")[1]) if name.startswith("blocks.") else -1
    return t.dtype != torch.int8, role, layer, name, kind, i


def layout_payload(qstate: dict, layout: str) -> bytes:
    """The tensor bytes of artifact_payload (no header) in another layout: byname (the artifact's:
    codes in name order, fp16 bytes shuffled), grouped (codes grouped by role), noshuffle (grouped,
    fp16 bytes interleaved), transposed (grouped, codes column-major as #1855 writes them), and
    torchsave (pg-int6-v1's torch.save of the dict)."""
    if layout == "torchsave":
        buf = tg.io.BytesIO()
        torch.save(qstate, buf)
        return buf.getvalue()
    entries = [(kind, name, i, t.detach().contiguous()) for kind, group in qstate.items() for name, ts in group.items()
               for i, t in enumerate(ts if isinstance(ts, tuple) else (ts,))]
    entries.sort(key=tg._payload_order if layout == "byname" else role_order)
    codes = b"".join((t.T.contiguous() if layout == "transposed" and t.ndim == 2 else t).numpy().tobytes()
                     for *_, t in entries if t.dtype == torch.int8)
    halves = b"".join(t.numpy().tobytes() for *_, t in entries if t.dtype == torch.float16)
    if layout != "noshuffle":
        halves = np.frombuffer(halves, np.uint8).reshape(-1, 2).T.tobytes()
    return codes + halves


VARIANTS = {  # name -> QuantSpec changes against the seed stack's defaults
    "today": {},
    "sdclip": dict(quant_clip="sdclip"),
    "sdclip+emb7": dict(quant_clip="sdclip", quant_embed="gptq", embed_bits=7),
    "sdclip+emb7+lqer": dict(quant_clip="sdclip", quant_embed="gptq", embed_bits=7, lqer_enabled=True, lqer_top_k=3),
    "sdclip+emb7_noH": dict(quant_clip="sdclip", quant_embed="gptq", embed_bits=7),  # the embedding without its Hessian
    "sdclip+emb8": dict(quant_clip="sdclip", quant_embed="gptq", embed_bits=8),
    "sdclip+lqer": dict(quant_clip="sdclip", lqer_enabled=True, lqer_top_k=3),
    "today+emb7": dict(quant_embed="gptq", embed_bits=7),
    "today+emb7+lqer": dict(quant_embed="gptq", embed_bits=7, lqer_enabled=True, lqer_top_k=3),
}


def main() -> int:
    h = bench_hparams(BENCH_MODEL)
    rt = tg.setup_runtime(h.device, os.environ)
    tg.select_attention_backend(h.attn_backend, rt.device.type)
    state, hessians = train_or_load(h, rt, os.environ.get("BENCH_WEIGHTS", "/tmp/bench_quant_frontier.pt"))
    if os.environ.get("BENCH_TRAIN_ONLY") == "1":
        return 0
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=h.tokenizer_path)
    val = tg.load_validation(h, sp, rt, h.eval_seq_len).to(rt.device)
    cfg = tg.ModelConfig.of(h)

    def bpb(weights: dict) -> float:
        model = tg.build_model(cfg, rt)
        model.load_state_dict(weights, strict=True)
        return tg.evaluate(tg.nll_function(model), val, h, rt, h.eval_seq_len).val_bpb
    pre = bpb(state)
    print(f"bench_quant_frontier:prequant val_bpb:{pre:.5f} vocab:{h.vocab_size} params:{sum(t.numel() for t in state.values())}")
    base = tg.QuantSpec.of(h)
    chosen = os.environ.get("BENCH_VARIANTS", ",".join(VARIANTS)).split(",")  # a subset, by name
    for name, changes in ((n, VARIANTS[n]) for n in chosen):
        t0 = time.perf_counter()
        used = {n: H for n, H in hessians.items() if not (name.endswith("_noH") and n == "tok_emb.weight")}
        qstate = tg.quantize_state(state, used, tg.dataclasses.replace(base, **changes))
        quant_s = time.perf_counter() - t0
        raw = tg.artifact_payload(qstate, cfg)
        sizes = []
        for method in tg.COMPRESSORS:
            t0 = time.perf_counter()
            blob = tg.compress(raw, method)
            sizes.append(f"{method}:{len(blob)}/{time.perf_counter() - t0:.2f}s")
        r = bpb(tg.unpack_artifact(blob)[1])
        print(f"bench_quant_frontier:{name} roundtrip_bpb:{r:.5f} gap:{r - pre:+.5f} quant_s:{quant_s:.1f} "
              f"lqer:{','.join(qstate['lqer']) or '-'} " + " ".join(sizes))
        if name == "sdclip+emb7+lqer":
            for layout in ("byname", "grouped", "noshuffle", "transposed", "torchsave"):
                lraw = layout_payload(qstate, layout)
                print(f"bench_quant_frontier:layout:{layout} " + " ".join(
                    f"{m}:{len(tg.compress(lraw, m))}" for m in tg.COMPRESSORS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
