"""Multi-seed summary and significance for a submission (rule F1), from the runs' own files.

    python3 tests/summarize.py logs/seed1.json logs/seed2.json logs/seed3.json \
        --baseline-bpb 1.11922988 1.12002032 1.11888882 --name "my record" --out submission.json
    python3 tests/summarize.py logs/*.json --baseline-json base/*.json
    python3 tests/summarize.py --paired new/ttt.npy base/ttt.npy --val-shard data/fineweb_val_000000.bin

Reads each run's summary JSON (logs/<RUN_ID>.json) and writes submission.json: per-seed results,
mean and sample std of val_loss (nats) and val_bpb, and a one-sided Welch t-test of "new < baseline"
in both units against the baseline (numbers or summary JSONs), stating whether the challenge's bar
(at least 0.005 nats better, p < 0.01) is met. Baseline nats, when only bpb is given, are derived
with the new runs' own nats/bpb ratio. --paired compares two per-token loss files (TOKEN_LOSSES_DIR)
document by document (documents start at BOS=1) with a paired t-test.
It lives under tests/ so that its bytes do not count toward the artifact.
"""

import argparse
import json
import math
import sys

import numpy as np

BAR_NATS = 0.005
BAR_P = 0.01


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student t CDF."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def welch(new: list[float], base: list[float]) -> dict:
    """Welch's unequal-variance t-test of mean(new) < mean(base) (one-sided p) and two-sided p."""
    a, b = np.asarray(new, float), np.asarray(base, float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    t = (a.mean() - b.mean()) / se
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    p_less = t_cdf(t, df)
    return dict(delta=float(a.mean() - b.mean()), t_statistic=float(t), welch_df=float(df),
                p_one_sided=p_less, p_two_sided=2 * min(p_less, 1 - p_less))


def paired_by_document(new_npy: str, base_npy: str, val_tokens: np.ndarray) -> dict:
    """Paired t-test over documents of the per-document mean NLL difference (new - base)."""
    new, base = np.load(new_npy), np.load(base_npy)
    if new.shape != base.shape or len(new) != len(val_tokens):
        raise SystemExit("error: --paired files and the val stream must have the same length")
    starts = np.flatnonzero(val_tokens == 1).tolist() + [len(val_tokens)]
    diffs = []
    for s, e in zip(starts[:-1], starts[1:]):
        ok = ~np.isnan(new[s:e]) & ~np.isnan(base[s:e])
        if ok.any():
            diffs.append(float(np.mean(new[s:e][ok] - base[s:e][ok])))
    d = np.asarray(diffs)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    return dict(documents=len(d), mean_delta_nats=float(d.mean()), t_statistic=float(t),
                p_one_sided=t_cdf(t, len(d) - 1))


def load_runs(paths: list[str]) -> list[dict]:
    runs = []
    for p in paths:
        with open(p) as f:
            runs.append(json.load(f))
    return runs


def headline(run: dict) -> tuple[float, float]:
    """(val_loss, val_bpb) of the run's headline phase (the last phase that ran)."""
    phase = [k for k in ("prequant", "roundtrip", "doc", "sliding", "ttt") if run["eval"].get(k)][-1]  # None: skipped
    return run["eval"][phase]["val_loss"], run["eval"][phase]["val_bpb"]


def summarize(runs: list[dict], base_bpb: list[float] | None = None, base_nats: list[float] | None = None,
              name: str = "") -> dict:
    losses, bpbs = zip(*(headline(r) for r in runs))
    ratio = float(np.mean(np.asarray(losses) / np.asarray(bpbs)))  # nats per bpb on this val set
    out = dict(name=name, val_loss=float(np.mean(losses)), val_bpb=float(np.mean(bpbs)),
               val_loss_std=float(np.std(losses, ddof=1)) if len(runs) > 1 else 0.0,
               val_bpb_std=float(np.std(bpbs, ddof=1)) if len(runs) > 1 else 0.0,
               seeds=[r["seed"] for r in runs],
               seed_results={str(r["seed"]): dict(val_loss=l, val_bpb=b, artifact_bytes=r["artifact"]["total_bytes"],
                                                  steps=(r.get("train") or {}).get("steps"),
                                                  hardware=f"{r['world_size']}x {r['device']}")
                             for r, l, b in zip(runs, losses, bpbs)},
               bytes_total=max(r["artifact"]["total_bytes"] for r in runs))
    if base_bpb:
        base_nats = base_nats or [b * ratio for b in base_bpb]
        out["vs_baseline"] = dict(bpb=welch(list(bpbs), base_bpb), nats=welch(list(losses), base_nats),
                                  baseline_bpb=base_bpb, baseline_nats=base_nats)
        nats = out["vs_baseline"]["nats"]
        out["vs_baseline"]["bar"] = f"delta <= -{BAR_NATS} nats and one-sided p < {BAR_P}"
        out["vs_baseline"]["bar_met"] = bool(nats["delta"] <= -BAR_NATS and nats["p_one_sided"] < BAR_P)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", help="summary JSONs of the new configuration, one per seed")
    ap.add_argument("--baseline-bpb", type=float, nargs="+")
    ap.add_argument("--baseline-nats", type=float, nargs="+")
    ap.add_argument("--baseline-json", nargs="+")
    ap.add_argument("--paired", nargs=2, metavar=("NEW_NPY", "BASE_NPY"))
    ap.add_argument("--val-shard", nargs="+", help="val shards (sorted) for --paired document boundaries")
    ap.add_argument("--name", default="")
    ap.add_argument("--out", default="submission.json")
    a = ap.parse_args(argv)
    if a.paired:
        sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
        import train_gpt
        val = np.concatenate([np.asarray(train_gpt.read_shard(p)) for p in sorted(a.val_shard or [])])
        print(json.dumps(paired_by_document(a.paired[0], a.paired[1], val), indent=1))
        return 0
    if len(a.runs) < 2:
        raise SystemExit("error: give at least two run JSONs (rule F1 asks for 3 seeds)")
    base_bpb, base_nats = a.baseline_bpb, a.baseline_nats
    if a.baseline_json:
        base_nats, base_bpb = map(list, zip(*(headline(r) for r in load_runs(a.baseline_json))))
    out = summarize(load_runs(a.runs), base_bpb, base_nats, a.name)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: out[k] for k in ("val_bpb", "val_bpb_std", "seeds")} | (
        {"bar_met": out["vs_baseline"]["bar_met"]} if "vs_baseline" in out else {})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
