"""Training-step benchmark for one GPU (issue 16 item 4): the PRESET=frontier model at the record's
per-GPU micro-batch (48 x 2048 tokens: TRAIN_BATCH_TOKENS = MICRO_BATCH_SEQS x TRAIN_SEQ_LEN x world
size, one micro-batch per rank per step, as on 8xH100), the compiled step of train_gpt.py itself
(maybe_compile, build_optimizers, make_train_loader, PrefetchLoader, train_step), timed for every
variant: looping off / on (GPT.looping), COMPILE_MODE default / max-autotune-no-cudagraphs,
LOADER_PREFETCH 0 / 2, MUON_SHARDED 0 (1 too under torchrun with world size > 1), and, where the
Triton kernels can run (CUDA with triton), the default mode with FUSED_MLP_ENABLED (kernels=fused_mlp)
or FUSED_CE_ENABLED (kernels=fused_ce) alone, loader_prefetch 0.

    python3 tests/tools/bench_gpu_step.py                  # one H100/H200; BENCH_BUDGET_S=420 by default
    python3 tests/tools/bench_gpu_step.py --tiny           # the same code on CPU, PRESET=tiny, seconds

One `bench_step:` row per variant: ms/step (median of --steps timed steps after --warmup steps, the
device synchronized around each), tokens/s on this device, peak memory (CUDA: max_memory_allocated
since the variant began; CPU: the process's peak RSS), and TorchDynamo's counters: graphs compiled
during the variant's warm-up, graph breaks, and graphs compiled during the timed steps (recompiles:
0 expected). Variants of one COMPILE_MODE share one model and its compiled graphs (looping off and
on are its two graphs); each variant builds its optimizers and loader afresh. The training data is
a synthetic shard (uniform random tokens, documents of 256-2048 tokens after a BOS) unless DATA_PATH
is set. Every other hyperparameter comes from the environment as for train_gpt.py. When the elapsed
time plus the variant's projected time (projected_s) passes the budget (--budget-s or BENCH_BUDGET_S)
the variant is skipped, with a `bench_step:skipped` row; one still running --hard-s after the start
(default: the budget + 50 s; single process only) is aborted, with a `bench_step:aborted` row, and the rest skipped; the last line gives the elapsed seconds. BENCH_BACKEND (e.g. aot_eager)
replaces Inductor as torch.compile's backend (the mode is then ignored: a CPU check of the path).
"""

import argparse
import contextlib
import dataclasses
import math
import os
import resource
import signal
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import train_gpt as tg  # noqa: E402
from benchlib import script_fields  # noqa: E402

MODES = ("default", "max-autotune-no-cudagraphs")
PREFETCH = (0, 2)
KERNELS = {"fused_mlp": dict(fused_mlp_enabled=True), "fused_ce": dict(fused_ce_enabled=True)}
TINY_ENV = dict(PRESET="tiny", NUM_LOOPS="1", LOOP_START="0", LOOP_END="1", MICRO_BATCH_SEQS="8")


def synthetic_shard(folder: str, vocab: int, bos: int, tokens: int, seed: int = 0) -> str:
    """One train shard of `tokens` uniform random ids in [2, vocab), a BOS before each document of
    256-2048 tokens (DOC_MASKING's varlen capacity is 256 tokens per sequence on average)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, size=tokens, dtype=np.int64)
    at = 0
    while at < tokens:
        ids[at] = bos
        at += int(rng.integers(256, 2049))
    tg.write_shard(os.path.join(folder, "fineweb_train_000000.bin"), ids.astype(np.uint16))
    return folder


def bench_env(tiny: bool, environ, world_size: int) -> dict:
    """The run's environment: the preset, one micro-batch per rank per step, then environ's values."""
    env = dict(TINY_ENV) if tiny else dict(PRESET="frontier")
    env.update(script_fields(environ))
    preset = tg.PRESETS[env["PRESET"]]
    micro = int(env.get("MICRO_BATCH_SEQS", preset.get("micro_batch_seqs", 48)))
    seq = int(env.get("TRAIN_SEQ_LEN", preset.get("train_seq_len", 2048)))
    env.setdefault("TRAIN_BATCH_TOKENS", str(micro * seq * world_size))
    env.setdefault("BOS_ID", "1")
    return env


def peak_mib(rt: tg.Runtime) -> float:
    if rt.is_cuda:
        return torch.cuda.max_memory_allocated(rt.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def dynamo_counts() -> tuple[int, int]:
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def run_variant(model, base: tg.GPT, h: tg.Hyperparameters, rt: tg.Runtime, looping: bool,
                steps: int, warmup: int) -> dict:
    """Warm-up then `steps` timed steps of train_step, as train() runs them (the loader wrapped in a
    PrefetchLoader under LOADER_PREFETCH, closed at the end; FUSED_*_ENABLED's kernels in force)."""
    tg.select_train_kernels(h, rt.device.type)
    with tg.training_kernels(base):
        return _run_variant(model, base, h, rt, looping, steps, warmup)


def _run_variant(model, base: tg.GPT, h: tg.Hyperparameters, rt: tg.Runtime, looping: bool,
                 steps: int, warmup: int) -> dict:
    opts, geometry, params = tg.build_optimizers(base, h, rt), tg.batch_geometry(h, rt), list(base.parameters())
    loader = tg.make_train_loader(h, rt)
    if h.loader_prefetch:
        loader = tg.PrefetchLoader(loader, rt, h.loader_prefetch, geometry[0], h.train_seq_len)
    base.looping = looping
    if rt.is_cuda:
        torch.cuda.reset_peak_memory_stats(rt.device)
    graphs0, breaks0 = dynamo_counts()
    t0 = time.perf_counter()
    try:
        for i in range(warmup):
            tg.train_step(model, opts, loader, h, rt, geometry, params, 1.0, i)
        rt.sync()
        warm_s, (graphs1, breaks1) = time.perf_counter() - t0, dynamo_counts()
        times = []
        for i in range(steps):
            rt.sync()
            t = time.perf_counter()
            loss = tg.train_step(model, opts, loader, h, rt, geometry, params, 1.0, warmup + i)
            rt.sync()
            times.append(time.perf_counter() - t)
    finally:
        if h.loader_prefetch:
            loader.close()
    graphs2, breaks2 = dynamo_counts()
    sec = statistics.median(times)
    return dict(ms_per_step=1000 * sec, tokens_per_s=geometry[0] * geometry[1] * h.train_seq_len / sec,
                peak_mib=peak_mib(rt), graphs=graphs1 - graphs0, breaks=breaks2 - breaks0,
                recompiles=graphs2 - graphs1, warm_s=warm_s, loss=float(loss))


class HardLimit(Exception):
    pass


@contextlib.contextmanager
def hard_limit(started: float, limit_s: float):
    """SIGALRM at `limit_s` seconds after `started` raises HardLimit in the main thread (where Python
    next runs: a kernel or a compile in C++ finishes first). The rows already printed stay."""
    if math.isinf(limit_s):
        yield
        return

    def fire(signum, frame):
        raise HardLimit
    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(limit_s - (time.perf_counter() - started), 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def kernels_available(h: tg.Hyperparameters, rt: tg.Runtime) -> bool:
    """Whether FUSED_MLP/CE_ENABLED would run their Triton kernels here (select_train_kernels)."""
    line = tg.select_train_kernels(dataclasses.replace(h, fused_mlp_enabled=True, fused_ce_enabled=True), rt.device.type)
    return line.startswith("train_kernels: mlp:triton ce:triton")


def variants(h: tg.Hyperparameters, rt: tg.Runtime, kernels: bool = False) -> list[tuple[str, bool, int, int, str]]:
    """(COMPILE_MODE, looping, LOADER_PREFETCH, MUON_SHARDED, kernels), grouped by mode (one model
    each); with `kernels`, the default mode's KERNELS variants follow its plain ones."""
    loops = (False, True) if h.num_loops else (False,)
    sharded = (0, 1) if rt.world_size > 1 else (0,)
    return [(m, lp, p, s, k) for m in MODES
            for k in ("", *(KERNELS if kernels and m == "default" else ()))
            for lp in loops for p in (PREFETCH if not k else (0,)) for s in (sharded if not k else (0,))]


def projected_s(compiled: dict, mode: str, looping: bool, steps_s: float) -> float:
    """Seconds the next variant is expected to take: its steps at the last variant's rate, plus, when
    it compiles a new graph, the warm-up of this mode's other graph, or for a new mode twice the
    slowest warm-up so far (autotuning modes compile longer)."""
    if (mode, looping) in compiled:
        return steps_s
    same = [s for (m, _), s in compiled.items() if m == mode]
    return steps_s + (max(same) if same else 2 * max(compiled.values(), default=0.0))


def label(mode: str, looping: bool, prefetch: int, sharded: int, kernels: str = "") -> str:
    return (f"compile_mode={mode} looping={int(looping)} loader_prefetch={prefetch} muon_sharded={sharded}"
            + (f" kernels={kernels}" if kernels else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="PRESET=tiny shapes on CPU (COMPILE=0 unless set)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 20; tiny 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first, compile included (default 3; tiny 1)")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("BENCH_BUDGET_S", 420)))
    ap.add_argument("--hard-s", type=float, default=None,
                    help="a variant still running this many seconds after the start is aborted (default budget + 50)")
    a = ap.parse_args(argv)
    steps, warmup = a.steps or (3 if a.tiny else 20), a.warmup or (1 if a.tiny else 3)
    started = time.perf_counter()
    probe = tg.Hyperparameters.from_env(dict(TINY_ENV) if a.tiny else dict(PRESET="frontier"))
    rt = tg.setup_runtime("cpu" if a.tiny else os.environ.get("DEVICE", probe.device), os.environ)
    env = bench_env(a.tiny, os.environ, rt.world_size)
    backend, compile_ = os.environ.get("BENCH_BACKEND", ""), torch.compile
    if backend:
        torch.compile = lambda module, **kw: compile_(module, backend=backend, **kw)
    try:
        return bench(a, rt, env, backend, steps, warmup, started)
    finally:
        torch.compile = compile_


def bench(a, rt: tg.Runtime, env: dict, backend: str, steps: int, warmup: int, started: float) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        if "DATA_PATH" not in env and not a.tiny:
            h0 = tg.Hyperparameters.from_env(env)
            tokens = 4 * rt.world_size * (h0.train_batch_tokens // rt.world_size + 1)
            env["DATA_PATH"] = synthetic_shard(tmp, h0.vocab_size, h0.bos_id, max(tokens, 1 << 20))
        h = tg.Hyperparameters.from_env(env)
        geometry = tg.batch_geometry(h, rt)
        attn = tg.select_attention_backend(h.attn_backend, rt.device.type)  # as run(): every rank, before the model
        kernels = kernels_available(h, rt)
        if rt.is_main:
            print(f"bench_step:device={rt.device_name()} world_size={rt.world_size} preset={h.preset} "
                  f"micro_batch={geometry[0]}x{h.train_seq_len} grad_accum={geometry[1]} "
                  f"compile={int(tg.compile_enabled(h, rt))}{' backend=' + backend if backend else ''} "
                  f"attn={attn} triton_kernels={int(kernels)} steps={steps} "
                  f"warmup={warmup} memory={'cuda_max_allocated' if rt.is_cuda else 'cpu_peak_rss'}", flush=True)
        models: dict[str, tuple] = {}
        compiled: dict[tuple[str, bool], float] = {}  # (mode, looping) -> its first variant's warm-up seconds
        rows = skipped = 0
        aborted = False
        last_ms = 0.0
        for mode, looping, prefetch, sharded, kern in variants(h, rt, kernels):
            graph = f"{mode}/{kern}" if kern else mode  # a kernel variant traces its own graphs
            elapsed = time.perf_counter() - started
            expected = projected_s(compiled, graph, looping, (steps + warmup) * last_ms / 1000)
            if rt.any_rank(aborted or elapsed + expected > a.budget_s):  # every rank skips the same variants
                skipped += 1
                why = "a variant was aborted" if aborted else \
                    f"elapsed {elapsed:.0f} s + projected {expected:.0f} s over the budget of {a.budget_s:.0f} s"
                if rt.is_main:
                    print(f"bench_step:skipped {label(mode, looping, prefetch, sharded, kern)} ({why})", flush=True)
                continue
            hv = dataclasses.replace(h, compile_mode=mode, loader_prefetch=prefetch, muon_sharded=bool(sharded),
                                     **KERNELS.get(kern, {}))
            if mode not in models:
                models.clear()  # the previous mode's model and graphs go before the next one is built
                base = None
                torch.manual_seed(h.seed)
                base = tg.build_model(tg.ModelConfig.of(hv), rt)
                base.segment_len = tg.packed_segment_len(hv)  # as train(): a constant of the graph
                models[mode] = (tg.maybe_compile(base, hv, rt), base)
            try:
                hard = math.inf if rt.distributed else a.budget_s + 50 if a.hard_s is None else a.hard_s
                with hard_limit(started, hard):  # one rank alone must not leave a collective
                    r = run_variant(*models[mode], hv, rt, looping, steps, warmup)
            except HardLimit:
                skipped += 1
                if rt.is_main:
                    print(f"bench_step:aborted {label(mode, looping, prefetch, sharded, kern)} (still running "
                          f"{time.perf_counter() - started:.0f} s after the start)", flush=True)
                aborted = True
                continue
            compiled.setdefault((graph, looping), r["warm_s"])
            rows, last_ms = rows + 1, r["ms_per_step"]
            if rt.is_main:
                print(f"bench_step:{label(mode, looping, prefetch, sharded, kern)} ms_per_step={r['ms_per_step']:.2f} "
                      f"tokens_per_s={r['tokens_per_s']:.0f} peak_mib={r['peak_mib']:.0f} graphs={r['graphs']} "
                      f"graph_breaks={r['breaks']} recompiles={r['recompiles']} warmup_s={r['warm_s']:.1f} "
                      f"loss={r['loss']:.4f}", flush=True)
    if rt.is_main:
        print(f"bench_step:done rows={rows} skipped={skipped} elapsed_s={time.perf_counter() - started:.1f} "
              f"budget_s={a.budget_s:.0f}", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    if tg.dist.is_initialized():  # as train_gpt.py's main(): all ranks meet, then the group goes
        tg.dist.barrier()
        tg.dist.destroy_process_group()
    tg.exit_process(code)
