"""CPU A/B of the frontier architecture options (issue 9 item 6): each option alone on top of the
seed stack, and all of them (PRESET=frontier's model), on a small model at equal steps.

    OMP_NUM_THREADS=1 python3 tests/tools/bench_frontier.py --vocab 1024 --out /tmp/bench_sp1024
    OMP_NUM_THREADS=1 python3 tests/tools/bench_frontier.py --vocab 8192 --out /tmp/bench_sp8192
    OMP_NUM_THREADS=1 python3 tests/tools/bench_frontier.py --vocab 1024 --out /tmp/bench_sp1024 --timing 7

Data: the stand-in shards in ../shared/data, with the validation stream cut to its first 65,536
targets (so the three evaluation passes stay short). Runs go one at a time, the configurations in
turn, ROUNDS times; the table prints ms/step (mean of the rounds) as a ratio to the seed stack and
the pre-quantization EMA val_bpb after ITERATIONS steps (same data, same order, same seed).
CPU figures: ratios only; on a shared machine the absolute times mean little. `--timing R`
instead times 4 training steps of every configuration in turn in one process, R rounds, and
prints the median ms/step as a ratio to the seed stack: finely interleaved, so load changes on a
shared machine hit every configuration alike. Looping is on there (the cost after the switch).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
VAL_TARGETS = 65_536
SMALL = dict(NUM_LAYERS=6, MODEL_DIM=128, NUM_HEADS=4, NUM_KV_HEADS=2, ROPE_DIMS=16, XSA_LAST_N=6,
             VE_LAYERS="4,5", VE_DIM=32, BIGRAM_VOCAB_SIZE=1024, BIGRAM_DIM=32, TRAIN_SEQ_LEN=128,
             EVAL_SEQ_LEN=128, EVAL_STRIDE=128, EVAL_BATCH_SEQS=64, TRAIN_BATCH_TOKENS=1024, MICRO_BATCH_SEQS=8,
             ITERATIONS=300, WARMDOWN_ITERS=100, WARMUP_STEPS=0, MAX_WALLCLOCK_SECONDS=0, TRAIN_LOG_EVERY=100,
             EMA_DECAY=0.95, GPTQ_CALIB="none", TTT_ENABLED=0, COMPILE=0, DEVICE="cpu")
LOOP = dict(NUM_LOOPS=1, LOOP_START=2, LOOP_END=3, ENABLE_LOOPING_AT=0.35)
OPTIONS = {
    "seed": {},
    "mlp4": dict(MLP_MULT=4.0),
    "skip_gates": dict(SKIP_GATES_ENABLED=1),
    "loop": LOOP,
    "parallel": dict(PARALLEL_START_LAYER=4),
    "doc_masking": dict(DOC_MASKING=1),
    "smear_window": dict(SMEAR_GATE_ENABLED=1, GATE_WINDOW=12),
    "sparse_gate": dict(SPARSE_ATTN_GATE_ENABLED=1, SPARSE_ATTN_GATE_SCALE=0.5, GATE_WINDOW=12),
    "all (frontier model)": dict(MLP_MULT=4.0, SKIP_GATES_ENABLED=1, **LOOP, PARALLEL_START_LAYER=4, DOC_MASKING=1,
                                 SMEAR_GATE_ENABLED=1, SPARSE_ATTN_GATE_ENABLED=1, SPARSE_ATTN_GATE_SCALE=0.5,
                                 GATE_WINDOW=12, BIGRAM_VOCAB_SIZE=0, VE_LAYERS="", QK_GAIN_INIT=5.0),
}


def make_data(vocab: int, out: Path) -> Path:
    data = out / f"data_sp{vocab}"
    data.mkdir(parents=True, exist_ok=True)
    src = SHARED / f"standin_sp{vocab}"
    for p in src.glob("fineweb_train_*.bin"):
        if not (data / p.name).exists():
            os.symlink(p, data / p.name)
    tg.write_shard(str(data / "fineweb_val_000000.bin"), tg.read_shard(str(src / "fineweb_val_000000.bin"))[:VAL_TARGETS + 1])
    return data


def run(name: str, env: dict, out: Path, rnd: int) -> dict:
    run_id = f"{re.sub(r'[^a-z0-9]+', '_', name)}_r{rnd}"
    full = {k: v for k, v in os.environ.items() if not k.startswith(tg.OWNED_ENV_PREFIXES)}
    full.update({k: str(v) for k, v in env.items()}, RUN_ID=run_id, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], cwd=out, env=full, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    log = (out / "logs" / f"{run_id}.txt").read_text()
    step_ms = float(re.findall(r"step_avg:([\d.]+)ms", log)[-1])
    bpb = float(re.search(r"prequant_ema_exact val_loss:[\d.]+ val_bpb:([\d.]+)", log).group(1))
    params = int(re.search(r"model_params:(\d+)", log).group(1))
    print(f"{name:22s} round {rnd}: {step_ms:8.2f} ms/step val_bpb {bpb:.4f} params {params}", flush=True)
    return dict(step_ms=step_ms, bpb=bpb, params=params)


def timing(base: dict, names: list[str], rounds: int, steps: int = 4):
    torch.set_num_threads(1)
    rt = tg.Runtime(False, 0, 1, 0, torch.device("cpu"))
    runs = {}
    for n in names:
        h = tg.Hyperparameters.from_env({k: str(v) for k, v in dict(base, **OPTIONS[n]).items()})
        h = tg.resolve_bos_id(h, tg.load_tokenizer(h))
        torch.manual_seed(h.seed)
        model = tg.build_model(tg.ModelConfig.of(h), rt)  # built looped when NUM_LOOPS > 0
        opts, params, loader = tg.build_optimizers(model, h, rt), list(model.parameters()), tg.make_train_loader(h, rt)
        geometry = tg.batch_geometry(h, rt)
        runs[n] = lambda m=model, o=opts, p=params, ld=loader, hh=h, g=geometry: tg.train_step(
            m, o, ld, hh, rt, g, p, 1.0, 100)
        runs[n]()  # first step outside the timing
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for n in names:
            t0 = time.perf_counter()
            for _ in range(steps):
                runs[n]()
            times[n].append(1000 * (time.perf_counter() - t0) / steps)
    seed = statistics.median(times["seed"])
    print(f"\n{rounds} rounds x {steps} steps of {base['TRAIN_BATCH_TOKENS']} tokens, median ms/step")
    print("| option | ms/step (median) | vs seed |\n|---|---:|---:|")
    for n, ts in times.items():
        print(f"| {n} | {statistics.median(ts):.1f} | {statistics.median(ts) / seed:.2f}x |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=1024, choices=(1024, 8192))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--only", default="", help="comma list of option names (seed is always run)")
    ap.add_argument("--timing", type=int, default=0, help="rounds of the in-process interleaved timing")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    data = make_data(a.vocab, a.out)
    base = dict(SMALL, DATA_PATH=data, VOCAB_SIZE=a.vocab,
                TOKENIZER_PATH=SHARED / "tokenizers" / f"fineweb_{a.vocab}_bpe.model")
    names = [n for n in OPTIONS if n == "seed" or not a.only or n in a.only.split(",")]
    if a.timing:
        return timing(base, names, a.timing)
    results: dict[str, list[dict]] = {n: [] for n in names}
    for rnd in range(a.rounds):
        for n in names:  # interleaved: every configuration once per round
            results[n].append(run(n, dict(base, **OPTIONS[n]), a.out, rnd))
    seed_ms = sum(r["step_ms"] for r in results["seed"]) / a.rounds
    seed_bpb = sum(r["bpb"] for r in results["seed"]) / a.rounds
    print(f"\nsp{a.vocab}, {SMALL['ITERATIONS']} steps of {SMALL['TRAIN_BATCH_TOKENS']} tokens, {a.rounds} round(s)")
    print("| option | params | ms/step vs seed | val_bpb | delta vs seed |\n|---|---:|---:|---:|---:|")
    for n, rs in results.items():
        ms, bpb = sum(r["step_ms"] for r in rs) / a.rounds, sum(r["bpb"] for r in rs) / a.rounds
        print(f"| {n} | {rs[0]['params']:,} | {ms / seed_ms:.2f}x | {bpb:.4f} | {bpb - seed_bpb:+.4f} |")


if __name__ == "__main__":
    main()
