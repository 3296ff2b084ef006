"""Every preset's numbers at tiny dims, to check a restructuring changes none of them (issue 17).

    OMP_NUM_THREADS=1 python3 tests/tools/preset_fingerprint.py OUT.json           # record (about 3 min)
    OMP_NUM_THREADS=1 python3 tests/tools/preset_fingerprint.py OUT.json --check BEFORE.json

Each preset runs as `python3 train_gpt.py` on the tests' tiny dataset with the tests' tiny
overrides (tests/test_01_config.py, tests/test_11_drivers.py): shapes shrink, what the preset is
about stays. Recorded per preset: every eval phase's val_loss and val_bpb as logged, the
artifact's bytes and sha256 and the steps trained (not the code
bytes, which any edit moves). --check exits 1 naming every difference.
"""

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS / "tools"))
sys.path.insert(0, str(TESTS.parent))

from conftest import run_script, tiny_env  # noqa: E402
from make_tiny_data import make_dataset  # noqa: E402
from helpers import frontier_env  # noqa: E402
from helpers import tiny_preset_env  # noqa: E402

import train_gpt as tg  # noqa: E402

NAMES = ("tiny", "pr691", "pr639", "pr1306", "pr1060", "frontier", "pr1855")


def preset_env(name: str, data: Path) -> dict:
    if name == "tiny":
        return tiny_env(data, RUN_ID="tiny")
    if name == "frontier":
        return frontier_env(data)
    return tiny_preset_env(name, data)


def fingerprint(name: str, data: Path, cwd: Path) -> dict:
    cwd.mkdir()
    env = preset_env(name, data)
    proc = run_script(env, cwd, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    summary = json.loads((cwd / "logs" / f"{env['RUN_ID']}.json").read_text())
    artifact = (cwd / tg.ARTIFACT_NAME).read_bytes()
    return {"eval": {k: {m: v.get(m) for m in ("val_loss", "val_bpb")} if isinstance(v, dict) else v
                     for k, v in summary["eval"].items()},
            "artifact_bytes": len(artifact), "artifact_sha256": hashlib.sha256(artifact).hexdigest(),
            "model_bytes": summary["artifact"]["model_bytes"], "steps": summary["train"]["steps"]}


def differences(before: dict, after: dict, path: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for k in sorted(set(before) | set(after)):
            if k not in after or k not in before:
                out.append(f"{path}{k}: only in {'before' if k in before else 'after'}")
            else:
                out += differences(before[k], after[k], f"{path}{k}.")
        return out
    return [] if before == after else [f"{path.rstrip('.')}: {before!r} -> {after!r}"]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--check", metavar="BEFORE")
    p.add_argument("--only", nargs="*", default=list(NAMES), choices=NAMES)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(make_dataset(os.path.join(tmp, "data")))
        result = {}
        for name in args.only:
            result[name] = fingerprint(name, data, Path(tmp) / name)
            print(f"{name}: " + " ".join(f"{k}:{v['val_bpb'] if isinstance(v, dict) else v}"
                                         for k, v in result[name]["eval"].items()), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    if args.check:
        before = json.loads(Path(args.check).read_text())
        diff = differences({k: before[k] for k in result if k in before}, result)
        print("\n".join(diff) if diff else f"identical: {', '.join(result)}")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
