"""Env-var sweeps of train_gpt.py: grids and greedy forward selection, judged per document.

    python3 tests/tools/sweep.py grid --base 'PRESET=tiny ITERATIONS=200' --vary MATRIX_LR=0.02,0.04 --out DIR
    python3 tests/tools/sweep.py select --base 'PRESET=tiny ITERATIONS=200' --candidate 'MUON_ROW_NORMALIZE=1' \
        --candidate 'EMBED_WD=0.085' --out DIR [--p 0.05] [--min-delta-bpb 0.0]
    extra arguments after `--` go to the launcher, e.g. `-- --nproc 8` (torchrun) or `-- --jobs 2`.

Every point runs in its own folder DIR/runs/<run_id> (its artifact, logs/<run_id>.{txt,json} and the
per-token losses of TOKEN_LOSSES_DIR), so points can run at once and a finished point (its summary
JSON exists) is never rerun: an interrupted sweep resumes where it stopped. A point that fails is
reported in the table (status `failed:<rc>`) and the sweep goes on.

Fixed-step by default: MAX_WALLCLOCK_SECONDS=0 unless the base sets it, so a sweep compares recipes,
not machine speed (the 1.0611 record chose its 9 overrides this way, ITERATIONS=4950, seed 42).
Confirm the final choice on the wall-clock run with several seeds (tests/tools/summarize.py).

Judging: two runs are compared document by document on the same validation documents, in the same
order (the per-token NLL dumps make this exact): for each document the mean NLL difference (nats per
token), then a paired t-test over documents (scipy.stats). select keeps a candidate only when its
headline val_bpb beats the current best by more than --min-delta-bpb and the one-sided p is below --p.
Writes DIR/table.md and DIR/table.csv (run_id, one column per varied key, val_bpb of the headline
phase, per-phase val_bpb, delta and paired p against the reference, steps, ms/step, bytes),
DIR/steps.md for select, and DIR/deltas.png when matplotlib is installed.
It lives under tests/ so that its bytes do not count toward the artifact.
"""

import argparse
import csv
import glob
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

SCRIPT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "train_gpt.py"))
HEADER_BYTES = 256 * 4  # shard header: 256 int32 (magic 20240520, version 1, token count)
LOSS_PHASES = ("ttt", "sliding")  # TOKEN_LOSSES_DIR files, headline first


@dataclass
class Point:
    run_id: str
    overrides: dict
    env: dict
    folder: str
    status: str = "pending"
    summary: dict = field(default_factory=dict)


def parse_assignments(text: str) -> dict:
    out = {}
    for item in shlex.split(text):
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
            raise SystemExit(f"error: expected KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def run_id_for(prefix: str, overrides: dict) -> str:
    parts = [prefix] + [f"{k.lower()}-{v}" for k, v in overrides.items()]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(parts))[:120]


def make_point(out: str, base: dict, overrides: dict, prefix: str) -> Point:
    rid = run_id_for(prefix, overrides)
    folder = os.path.join(out, "runs", rid)
    env = {"MAX_WALLCLOCK_SECONDS": "0", **base, **overrides, "RUN_ID": rid,
           "TOKEN_LOSSES_DIR": os.path.join(folder, "losses")}
    return Point(rid, overrides, env, folder)


def summary_path(p: Point) -> str:
    return os.path.join(p.folder, "logs", f"{p.run_id}.json")


def launch(p: Point, nproc: int, script: str) -> Point:
    """Run one point unless its summary JSON already exists (resumption)."""
    if os.path.exists(summary_path(p)):
        p.status = "done(resumed)"
    else:
        os.makedirs(p.folder, exist_ok=True)
        cmd = [sys.executable, script] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
        env = {k: v for k, v in os.environ.items() if k not in p.env}
        env.update(p.env)
        with open(os.path.join(p.folder, "stdout.txt"), "w") as f:
            rc = subprocess.run(cmd, cwd=p.folder, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        p.status = "done" if rc == 0 and os.path.exists(summary_path(p)) else f"failed:{rc}"
    if p.status.startswith("done"):
        with open(summary_path(p)) as f:
            p.summary = json.load(f)
    print(f"sweep: {p.run_id} {p.status}", flush=True)
    return p


def run_points(points: list[Point], jobs: int, nproc: int, script: str) -> list[Point]:
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(lambda p: launch(p, nproc, script), points))


def val_tokens(data_path: str) -> np.ndarray:
    """The validation stream as the script reads it: every val token shard in sorted order."""
    paths = sorted(p for p in glob.glob(os.path.join(data_path, "fineweb_val_*.bin")) if "_bytes_" not in p)
    if not paths:
        raise SystemExit(f"error: no fineweb_val_*.bin under DATA_PATH={data_path}")
    return np.concatenate([np.fromfile(p, dtype="<u2", offset=HEADER_BYTES) for p in paths]).astype(np.int64)


def per_document_deltas(new: np.ndarray, base: np.ndarray, tokens: np.ndarray, bos_id: int) -> np.ndarray:
    """Mean NLL difference (new - base, nats/token) of every document holding a token scored by both."""
    if new.shape != base.shape or len(new) != len(tokens):
        raise ValueError("per-token loss files and the val stream differ in length")
    starts = np.flatnonzero(tokens == bos_id)
    starts = np.unique(np.concatenate([[0], starts, [len(tokens)]]))
    ok = ~np.isnan(new) & ~np.isnan(base)
    diff = np.where(ok, new - base, 0.0)
    sums, counts = np.add.reduceat(diff, starts[:-1]), np.add.reduceat(ok.astype(np.int64), starts[:-1])
    return sums[counts > 0] / counts[counts > 0]


def paired_test(deltas: np.ndarray) -> dict:
    """One-sided paired t-test of 'new < base' over documents, with a 95% interval of the mean."""
    if len(deltas) < 2 or not np.any(deltas):
        return dict(documents=len(deltas), mean_delta_nats=float(deltas.mean()) if len(deltas) else 0.0,
                    p_one_sided=1.0 if not len(deltas) or deltas.mean() >= 0 else 0.0, ci95=(0.0, 0.0))
    t = stats.ttest_1samp(deltas, 0.0, alternative="less")
    half = stats.t.ppf(0.975, len(deltas) - 1) * deltas.std(ddof=1) / np.sqrt(len(deltas))
    m = float(deltas.mean())
    return dict(documents=len(deltas), mean_delta_nats=m, p_one_sided=float(t.pvalue), ci95=(m - half, m + half))


def headline_phase(p: Point) -> str | None:
    for name in LOSS_PHASES:
        if os.path.exists(os.path.join(p.folder, "losses", f"{name}.npy")):
            return name
    return None


def compare(new: Point, ref: Point, tokens: np.ndarray) -> dict:
    """Delta of the headline val_bpb and the paired per-document test of new against ref."""
    out = dict(delta_bpb=new.summary["val_bpb"] - ref.summary["val_bpb"])
    phase = headline_phase(new)
    if phase is None or headline_phase(ref) != phase:
        return {**out, "p_one_sided": float("nan"), "documents": 0, "mean_delta_nats": float("nan"),
                "ci95": (float("nan"), float("nan"))}
    load = lambda p: np.load(os.path.join(p.folder, "losses", f"{phase}.npy")).astype(np.float64)
    bos = int(new.summary.get("config", {}).get("bos_id", 1))
    return {**out, **paired_test(per_document_deltas(load(new), load(ref), tokens, bos))}


def row(p: Point, keys: list[str], ref: Point | None, tokens: np.ndarray | None) -> dict:
    r = {"run_id": p.run_id, **{k: p.overrides.get(k, "") for k in keys}, "status": p.status}
    s = p.summary
    if not s:
        return r
    train = s.get("train") or {}
    steps = train.get("steps")
    r.update(val_bpb=s.get("val_bpb"), steps=steps, bytes=(s.get("artifact") or {}).get("total_bytes"),
             ms_per_step=round(train["train_time_ms"] / steps, 2) if steps else None)
    for phase, e in (s.get("eval") or {}).items():
        r[f"bpb_{phase}"] = None if e is None else e.get("val_bpb")  # None: skipped (EVAL_PHASES)
    if ref is not None and ref.summary and p is not ref:
        c = compare(p, ref, tokens)
        r.update(delta_bpb=round(c["delta_bpb"], 6), p_paired=c["p_one_sided"], docs=c["documents"],
                 delta_nats=c["mean_delta_nats"], ci_lo=c["ci95"][0], ci_hi=c["ci95"][1])
    return r


def write_tables(out: str, rows: list[dict], name: str = "table"):
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(os.path.join(out, f"{name}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
        for r in rows:
            f.write("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |\n")


def plot_deltas(out: str, rows: list[dict]):
    """deltas.png: each run's mean per-document NLL delta against the reference with its 95% interval."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("sweep: matplotlib not installed, no deltas.png")
        return
    rs = [r for r in rows if r.get("ci_lo") is not None and np.isfinite(r.get("delta_nats", np.nan))]
    if not rs:
        return
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(rs) + 1.5))
    y = np.arange(len(rs))
    m = np.array([r["delta_nats"] for r in rs])
    err = np.array([[r["delta_nats"] - r["ci_lo"] for r in rs], [r["ci_hi"] - r["delta_nats"] for r in rs]])
    ax.errorbar(m, y, xerr=err, fmt="o")
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(y, [r["run_id"] for r in rs], fontsize=7)
    ax.set_xlabel("mean per-document NLL delta vs reference (nats/token), 95% interval")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "deltas.png"), dpi=100)
    plt.close(fig)


def cmd_grid(a) -> int:
    base = parse_assignments(a.base)
    varies = []
    for v in a.vary:
        key, sep, values = v.partition("=")
        if not sep or not values:
            raise SystemExit(f"error: --vary expects KEY=v1,v2, got {v!r}")
        varies.append([(key, x) for x in values.split(",")])
    keys = [v[0][0] for v in varies]
    points = [make_point(a.out, base, {}, "base")]
    points += [make_point(a.out, base, dict(c), f"p{i:03d}") for i, c in enumerate(itertools.product(*varies))]
    points = run_points(points, a.jobs, a.nproc, a.script)
    tokens = val_tokens(base.get("DATA_PATH", "./data/datasets/fineweb10B_sp1024")) if points[0].summary else None
    rows = [row(p, keys, points[0], tokens) for p in points]
    write_tables(a.out, rows)
    plot_deltas(a.out, rows)
    return 0 if all(p.status.startswith("done") for p in points) else 1


def cmd_select(a) -> int:
    base = parse_assignments(a.base)
    cands = [parse_assignments(c) for c in a.candidate]
    best = run_points([make_point(a.out, base, {}, "r0_base")], 1, a.nproc, a.script)[0]
    if not best.summary:
        raise SystemExit(f"error: the base run failed ({best.status}); see {best.folder}/stdout.txt")
    tokens = val_tokens(base.get("DATA_PATH", "./data/datasets/fineweb10B_sp1024"))
    chosen, steps, all_points, rnd = {}, [], [best], 0
    remaining = list(range(len(cands)))
    while remaining:
        rnd += 1
        trial = [make_point(a.out, base, {**chosen, **cands[i]}, f"r{rnd}_c{i}") for i in remaining]
        trial = run_points(trial, a.jobs, a.nproc, a.script)
        all_points += trial
        results = []
        for i, p in zip(remaining, trial):
            c = compare(p, best, tokens) if p.summary else None
            ok = c is not None and c["delta_bpb"] < -a.min_delta_bpb and c["p_one_sided"] < a.p
            results.append((i, p, c, ok))
        passing = [r for r in results if r[3]]
        keep = min(passing, key=lambda r: r[2]["delta_bpb"]) if passing else None
        for i, p, c, ok in results:
            steps.append({"round": rnd, "candidate": " ".join(f"{k}={v}" for k, v in cands[i].items()),
                          "run_id": p.run_id, "status": p.status,
                          "delta_bpb": None if c is None else round(c["delta_bpb"], 6),
                          "p_paired": None if c is None else c["p_one_sided"],
                          "passed": ok, "kept": keep is not None and i == keep[0]})
        if keep is None:
            break
        chosen.update(cands[keep[0]])
        best = keep[1]
        remaining.remove(keep[0])
    keys = sorted({k for c in cands for k in c})
    rows = [row(p, keys, all_points[0], tokens) for p in all_points]
    write_tables(a.out, rows)
    write_tables(a.out, steps, "steps")
    plot_deltas(a.out, rows)
    with open(os.path.join(a.out, "selected.json"), "w") as f:
        json.dump({"overrides": chosen, "best_run": best.run_id, "val_bpb": best.summary["val_bpb"]}, f, indent=1)
    print(f"sweep: selected {chosen or 'nothing'} val_bpb:{best.summary['val_bpb']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("grid", "select"):
        s = sub.add_parser(name)
        s.add_argument("--base", default="", help="'K=V K=V ...' applied to every run")
        s.add_argument("--out", required=True)
        s.add_argument("--jobs", type=int, default=1, help="points run at once")
        s.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when > 1)")
        s.add_argument("--script", default=SCRIPT)
        if name == "grid":
            s.add_argument("--vary", action="append", default=[], help="KEY=v1,v2 (repeatable)")
        else:
            s.add_argument("--candidate", action="append", default=[], help="'K=V ...' (repeatable)")
            s.add_argument("--p", type=float, default=0.05, help="one-sided paired p threshold")
            s.add_argument("--min-delta-bpb", type=float, default=0.0, help="least val_bpb gain to keep")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    return cmd_grid(a) if a.cmd == "grid" else cmd_select(a)


if __name__ == "__main__":
    sys.exit(main())
