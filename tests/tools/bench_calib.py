"""Calibration A/B (issue 19 item 4): train one small PRESET=frontier model per seed, collect GPTQ
Hessians on the same next training batches through the document-masked forward (ours) and the
dense causal forward (the record's), quantize the same weights with each, and print the roundtrip
gap (quantized minus unquantized val_bpb) of both.

    OMP_NUM_THREADS=1 BENCH_SEEDS=1337,1338,1339 python3 tests/tools/bench_calib.py

The model is BENCH_MODEL below on top of PRESET=frontier with the sp8192 stand-in data; the
environment can override any field. Validation data is read only after training and both
calibrations. Not a test: a measurement (CPU figures in README.md).
"""

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import train_gpt as tg  # noqa: E402
from benchlib import bench_hparams, train_averaged  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data")
BENCH_MODEL = dict(PRESET="frontier", DATA_PATH=os.path.join(DATA, "standin_sp8192"),
                   TOKENIZER_PATH=os.path.join(DATA, "tokenizers", "fineweb_8192_bpe.model"),
                   NUM_LAYERS="4", XSA_LAST_N="4", MODEL_DIM="128", NUM_HEADS="4", NUM_KV_HEADS="2",
                   LOOP_START="1", LOOP_END="2", PARALLEL_START_LAYER="3", TRAIN_SEQ_LEN="2048",
                   EVAL_SEQ_LEN="2048", TRAIN_BATCH_TOKENS="2048", MICRO_BATCH_SEQS="1", ITERATIONS="150",
                   MAX_WALLCLOCK_SECONDS="0", WARMUP_STEPS="0", EMA_DECAY="0.98", TRAIN_LOG_EVERY="50",
                   TRAIN_LOADER="coprime",  # the README's figures were measured with it (random 2048-token rows)
                   GPTQ_CALIB_BATCHES="16", DEVICE="cpu", COMPILE="0")


def one_seed(seed: str, rt) -> dict:
    h = bench_hparams(BENCH_MODEL, SEED=seed)
    sp = tg.load_tokenizer(h)
    h = tg.resolve_bos_id(h, sp)
    t0 = time.perf_counter()
    base, result, loader = train_averaged(h, rt)
    seqs = tg.batch_geometry(h, rt)[0]
    batches = [loader.next_batch(seqs, h.train_seq_len) for _ in range(h.gptq_calib_batches)]  # same for both
    dense = [(x.reshape(-1, h.train_seq_len), y.reshape(-1, h.train_seq_len)) for x, y in batches]
    hessians = {"masked": tg.collect_hessians(base, batches, rt, doc_mask=True),
                "dense": tg.collect_hessians(base, dense, rt, doc_mask=False)}
    train_s = time.perf_counter() - t0
    val = tg.load_validation(h, sp, rt, h.eval_seq_len).to(rt.device)  # only now: after both calibrations
    cfg, spec = tg.ModelConfig.of(h), tg.QuantSpec.of(h)
    state = {n: p.detach().clone() for n, p in base.state_dict().items()}

    def bpb(weights: dict) -> float:
        model = tg.build_model(cfg, rt)
        model.load_state_dict(weights, strict=True)
        return tg.evaluate(tg.nll_function(model), val, h, rt, h.eval_seq_len).val_bpb
    out = {"prequant": bpb(state), "steps": result.steps, "train_s": train_s}
    for mode, H in hessians.items():
        out[mode] = bpb(tg.dequantize_state(tg.quantize_state(state, H, spec))) - out["prequant"]
    print(f"bench_calib:seed:{seed} steps:{result.steps} prequant_bpb:{out['prequant']:.5f} "
          f"gap_masked:{out['masked']:+.5f} gap_dense:{out['dense']:+.5f} "
          f"dense_minus_masked:{out['dense'] - out['masked']:+.5f} train_s:{train_s:.0f}", flush=True)
    return out


def main() -> int:
    rt = tg.setup_runtime("cpu", {})
    tg.select_attention_backend("sdpa", "cpu")
    runs = [one_seed(s, rt) for s in os.environ.get("BENCH_SEEDS", "1337").split(",")]
    d = np.array([r["dense"] - r["masked"] for r in runs])
    print(f"bench_calib:mean seeds:{len(runs)} gap_masked:{np.mean([r['masked'] for r in runs]):+.5f} "
          f"gap_dense:{np.mean([r['dense'] for r in runs]):+.5f} dense_minus_masked:{d.mean():+.5f} "
          f"(per seed {', '.join(f'{x:+.5f}' for x in d)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
