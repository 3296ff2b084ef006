"""LOADER_PREFETCH benchmark on CPU (issue 16 item 1): a loader made artificially slow (DELAY_MS
of sleep in its host half per batch) against a step of torch work (STEP_MS of matmuls, which
release the GIL as GPU work would); prints ms/step synchronous and with the prefetch thread,
interleaved, and the ratio prefetch/sync (ideal max(d, s)/(d + s), 0.5 at equal times).

    OMP_NUM_THREADS=1 python3 tests/tools/bench_prefetch.py   # DELAY_MS=200 STEP_MS=200 STEPS=8 ROUNDS=2
"""

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train_gpt as tg  # noqa: E402

DELAY, STEP_MS = float(os.environ.get("DELAY_MS", 200)) / 1000, float(os.environ.get("STEP_MS", 200))
STEPS, ROUNDS = int(os.environ.get("STEPS", 8)), int(os.environ.get("ROUNDS", 2))
RT = tg.Runtime(False, 0, 1, 0, torch.device("cpu"))
PATHS = tg.shard_paths(str(Path(__file__).resolve().parents[1] / "data" / "sp1024" / "fineweb_train_*.bin"))


class Slow(tg.SequentialLoader):
    def host_batch(self, seqs, seq_len):
        time.sleep(DELAY)
        return super().host_batch(seqs, seq_len)


def work(a: torch.Tensor, reps: int) -> None:
    for _ in range(reps):
        a = torch.tanh(a @ a)


def run(prefetch: int, reps: int) -> float:
    loader = Slow(PATHS, RT)
    if prefetch:
        loader = tg.PrefetchLoader(loader, RT, prefetch, 4, 64)
    a = torch.randn(256, 256) / 16
    t0 = time.perf_counter()
    for _ in range(STEPS):
        loader.next_batch(4, 64)
        work(a, reps)
    ms = 1000 * (time.perf_counter() - t0) / STEPS
    if prefetch:
        loader.close()
    return ms


def main():
    a = torch.randn(256, 256) / 16
    t0 = time.perf_counter()
    work(a, 20)
    reps = max(1, round(20 * STEP_MS / (1000 * (time.perf_counter() - t0))))
    for _ in range(ROUNDS):
        sync, pre = run(0, reps), run(2, reps)
        print(f"delay:{DELAY * 1000:.0f}ms step_work:{STEP_MS:.0f}ms sync:{sync:.1f}ms/step "
              f"prefetch2:{pre:.1f}ms/step ratio:{pre / sync:.3f}")


if __name__ == "__main__":
    main()
