"""Curves from one or more run logs (logs/<RUN_ID>.txt) to a PNG: training loss against step and
against training time, and the running TTT bpb against chunk (sliding-mode TTT) or batch (LoRA TTT).

    python3 tests/tools/plot_logs.py logs/seed42.txt logs/seed314.txt --out curves.png

Reads only the log lines after the embedded source (the `step:`, `ttt_chunk:` and `ttt_batch:`
lines). Needs matplotlib (a tools extra in requirements.txt, like scipy; not used by train_gpt.py).
"""

import argparse
import os
import re
import sys

STEP = re.compile(r"^step:(\d+)/\d+ train_loss:([0-9.naninf]+) .*train_time:(\d+)ms")
TTT = re.compile(r"^ttt_(chunk|batch):(\d+)/\d+ .*?rank0_bpb:([0-9.]+)")
SOURCE_RULE = "=" * 100


def parse_log(path: str) -> dict[str, list[tuple[float, ...]]]:
    """{'train': [(step, loss, seconds)], 'ttt': [(index, bpb)], 'ttt_unit': 'chunk'|'batch'}."""
    out = {"train": [], "ttt": [], "ttt_unit": "chunk"}
    in_source = False
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line == SOURCE_RULE:  # the source is logged between two such rules
                in_source = not in_source
                continue
            if in_source:
                continue
            if m := STEP.match(line):
                out["train"].append((int(m[1]), float(m[2]), int(m[3]) / 1000))
            elif m := TTT.match(line):
                out["ttt"].append((int(m[2]), float(m[3])))
                out["ttt_unit"] = m[1]
    if not out["train"] and not out["ttt"]:
        raise SystemExit(f"error: {path}: no step: or ttt_ lines (is it a train_gpt.py log?)")
    return out


def plot(paths: list[str], out: str):
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: plot_logs.py needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    for p in paths:
        d, name = parse_log(p), os.path.basename(p).removesuffix(".txt")
        if d["train"]:
            steps, loss, secs = zip(*d["train"])
            a.plot(steps, loss, label=name)
            b.plot(secs, loss, label=name)
        if d["ttt"]:
            idx, bpb = zip(*d["ttt"])
            c.plot(idx, bpb, marker=".", label=name)
            c.set_xlabel(f"TTT {d['ttt_unit']}")
    a.set(xlabel="step", ylabel="train loss (nats)", title="training loss")
    b.set(xlabel="training time (s)", ylabel="train loss (nats)", title="training loss vs time")
    c.set(ylabel="running bpb (rank 0)", title="TTT")
    for ax in (a, b, c):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--out", default="curves.png")
    a = ap.parse_args(argv)
    plot(a.logs, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
