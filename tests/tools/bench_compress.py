"""Compressor benchmark (issue 19 finding 4): the full-size PRESET=frontier state dict, every tensor
drawn from a random normal, quantized through the real quantizer (SDClip, int7 embedding, LQER, the
quant gate; identity Hessians), then packed with each compressor: bytes, compress and decompress
seconds, and the entropy projection (project_model_bytes) against the measured bytes.

    OMP_NUM_THREADS=1 python3 tests/tools/bench_compress.py
    BENCH_CLIPS=11.5,14.0;12.0,15.0 (MLP,EMBED sigma pairs; default: the record's and frontier's)

SDClip sets each row's step from its std, so the codes of a Gaussian row have the entropy of its k
alone (bits - log2 k + 1.05): random weights give the code statistics of a k, not of training
(trained rows are heavier-tailed, so fewer bits: README). Not a test: a measurement (figures in README.md).
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import train_gpt as tg  # noqa: E402


def frontier_state(h: "tg.Hyperparameters") -> dict:
    torch.manual_seed(0)
    model = tg.build_model(tg.ModelConfig.of(h), tg.setup_runtime("cpu", {}))
    return {n: torch.randn_like(p.float()) if p.is_floating_point() else p for n, p in model.state_dict().items()}


def main() -> int:
    pairs = [tuple(map(float, p.split(","))) for p in os.environ.get("BENCH_CLIPS", "11.5,14.0;12.0,15.0").split(";")]
    methods = os.environ.get("BENCH_COMPRESSORS", "brotli,zstd,pergroup").split(",")
    for mlp, embed in pairs:
        h = tg.Hyperparameters.from_env({"PRESET": "frontier", "MLP_CLIP_SIGMAS": str(mlp),
                                         "EMBED_CLIP_SIGMAS": str(embed)})
        state = frontier_state(h)
        t0 = time.perf_counter()
        qstate = tg.quantize_state(state, {}, tg.QuantSpec.of(h))
        cfg = tg.ModelConfig.of(h)
        raw = tg.artifact_payload(qstate, cfg)
        print(f"bench_compress:clips mlp:{mlp} embed:{embed} params:{sum(t.numel() for t in state.values())} "
              f"payload:{len(raw)} entropy_bytes:{tg.payload_entropy_bytes(qstate):.0f} quantize_s:{time.perf_counter() - t0:.1f}",
              flush=True)
        for method in methods:
            t0 = time.perf_counter()
            blob = tg.pack_artifact(qstate, cfg, method)
            t1 = time.perf_counter()
            tg.unpack_artifact(blob)
            t2 = time.perf_counter()
            proj = tg.project_model_bytes(qstate, method)
            print(f"bench_compress:{method} bytes:{len(blob)} compress_s:{t1 - t0:.1f} decompress_s:{t2 - t1:.1f} "
                  f"projected:{proj} ({100 * (proj / len(blob) - 1):+.2f}%) ratio:{len(blob) / tg.payload_entropy_bytes(qstate):.4f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
