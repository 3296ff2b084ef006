"""Throughput benchmark for train_gpt.py: training step, sliding-window eval and one TTT chunk.

    python3 tests/tools/bench.py                                   # default 11L model, real-format shards
    DATA_PATH=../shared/data/standin_sp1024 TOKENIZER_PATH=../shared/data/tokenizers/fineweb_1024_bpe.model \
        python3 tests/tools/bench.py --steps 20 --warmup 5
    PRESET=tiny DATA_PATH=/tmp/pg_tiny TOKENIZER_PATH=/tmp/pg_tiny/tokenizer.model python3 tests/tools/bench.py --steps 3 --warmup 1

Every hyperparameter comes from the environment exactly as for train_gpt.py (same
Hyperparameters.from_env), so a sweep's settings can be benchmarked as they are. Prints one
`key:value` line per measurement: ms/step, tokens/s, model FLOPs per token, TFLOP/s and MFU
against the device's dense bf16 peak (PEAK_TFLOPS env to override), peak memory, attention
backend; then scored tokens/s of the sliding-window eval over the first EVAL windows and the
seconds and tokens/s of one score-first TTT chunk. Not a test: timings vary by machine.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import train_gpt as tg  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, vendor datasheets


def flops_per_token(cfg: tg.ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters (incl. the tied head) + causal attention
    (QK^T and AV: 2 x 2 x d x T/2 per layer forward, x3 for forward + backward)."""
    d, L, V = cfg.model_dim, cfg.num_layers, cfg.vocab_size
    kv = cfg.num_kv_heads * d // cfg.num_heads
    hidden = int(cfg.mlp_mult * d)
    per_layer = d * d * 2 + d * kv * 2 + 2 * d * hidden
    extra = V * d  # tied output head
    if cfg.bigram_vocab_size:
        extra += cfg.bigram_dim * d
    if str(cfg.ve_layers).strip():
        extra += cfg.ve_dim * kv
    return 6.0 * (L * per_layer + extra) + 6.0 * L * d * seq_len


def peak_tflops(rt: tg.Runtime) -> float:
    if "PEAK_TFLOPS" in os.environ:
        return float(os.environ["PEAK_TFLOPS"])
    name = rt.device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), float("nan"))


def timed(rt: tg.Runtime, fn, n: int) -> float:
    rt.sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    rt.sync()
    return (time.perf_counter() - t0) / max(n, 1)


def bench_train(h, rt, steps: int, warmup: int) -> dict:
    base = tg.build_model(tg.ModelConfig.of(h), rt)
    model = tg.maybe_compile(base, h, rt)
    opts = tg.build_optimizers(base, h, rt)
    geometry = tg.batch_geometry(h, rt)
    loader, params = tg.make_train_loader(h, rt), list(base.parameters())
    step = lambda: tg.train_step(model, opts, loader, h, rt, geometry, params, 1.0, 100)  # noqa: E731
    timed(rt, step, warmup)
    sec = timed(rt, step, steps)
    tokens_per_s = h.train_batch_tokens / sec / rt.world_size
    fpt = flops_per_token(tg.ModelConfig.of(h), h.train_seq_len)
    tflops = fpt * tokens_per_s / 1e12
    mem = rt.max_memory_mib()
    return dict(ms_per_step=1000 * sec, tokens_per_s_per_device=tokens_per_s, flops_per_token=fpt,
                tflops_per_device=tflops, mfu=tflops / peak_tflops(rt), peak_alloc_mib=mem[0],
                peak_reserved_mib=mem[1], grad_accum_steps=geometry[1]), base


def bench_eval(h, rt, base, windows: int) -> dict:
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=h.tokenizer_path)
    val = tg.load_validation(h, sp, rt, h.eval_seq_len).to(rt.device)
    nll_fn = tg.maybe_compile(tg.nll_function(base), h, rt)
    wins = tg.sliding_windows(len(val.tokens) - 1, h.eval_seq_len, h.eval_stride)[:windows]
    tg.score_windows(nll_fn, val, wins[:h.eval_batch_seqs], h.eval_batch_seqs, rt)  # warm-up / compile
    rt.sync()
    t0 = time.perf_counter()
    sums = tg.score_windows(nll_fn, val, wins, h.eval_batch_seqs, rt)
    rt.sync()
    sliding_s = time.perf_counter() - t0
    n_chunk = min(h.ttt_chunk_tokens, len(val.tokens) - 1) // h.eval_seq_len * h.eval_seq_len
    one_chunk = tg.ValidationData(val.tokens[:n_chunk + 1], n_chunk + 1, val.base_bytes, val.has_leading_space,
                                  val.is_boundary)
    h1 = tg.dataclasses.replace(h, ttt_chunk_tokens=max(n_chunk // 2 // h.eval_seq_len, 1) * h.eval_seq_len)
    r = tg.ttt_evaluate(base, nll_fn, one_chunk, h1, rt)  # two chunks: score + train + score
    return dict(sliding_scored_tokens_per_s=float(sums[1]) / sliding_s, sliding_windows=len(wins),
                ttt_seconds=r.time_ms / 1000, ttt_tokens_per_s=r.tokens / (r.time_ms / 1000))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--eval-windows", type=int, default=2048)
    a = ap.parse_args(argv)
    h = tg.Hyperparameters.from_env(os.environ)
    rt = tg.setup_runtime(h.device, os.environ)
    backend = tg.select_attention_backend(h.attn_backend, rt.device.type)
    torch.manual_seed(h.seed)
    np.random.seed(h.seed)
    train, base = bench_train(h, rt, a.steps, a.warmup)
    results = dict(device=rt.device_name(), world_size=rt.world_size, attn_backend=backend,
                   compile=tg.compile_enabled(h, rt), **train, **bench_eval(h, rt, base, a.eval_windows))
    if rt.is_main:
        for k, v in results.items():
            print(f"bench:{k}:{v:.4g}" if isinstance(v, float) else f"bench:{k}:{v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
