"""The README's knob table, generated from train_gpt.py so it cannot drift from the code.

One row per Hyperparameters field: the environment variable, its default, the presets that set
another value, and the field's comment in the source. Sections follow the source's `# ...`
comment lines inside the class.

    python3 tests/tools/knobs_table.py            # print the table
    python3 tests/tools/knobs_table.py --write    # replace the block between the README's knobs markers

tests/test_01_config.py checks that the README's block equals this output.
"""

import ast
import dataclasses
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import train_gpt as tg  # noqa: E402

BEGIN, END = "<!-- knobs:begin (tests/tools/knobs_table.py --write) -->", "<!-- knobs:end -->"
README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "README.md")
PRESET_ORDER = ("frontier", "pr1855", "pr1060", "pr691", "pr639", "pr1306", "tiny")
BUILT_ON = {"pr1855": "frontier"}  # listed only where it differs from the preset it is built on


def class_lines() -> list[tuple[str, str, str]]:
    """(kind, name, comment) for the Hyperparameters body in source order: kind 'section' for a
    comment line, 'field' for an annotated field (comment: its trailing `# ...`)."""
    src = open(tg.__file__).read().splitlines()
    tree = ast.parse("\n".join(src))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Hyperparameters")
    fields = {n.lineno: n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}
    first = min(fields)
    last = max(fields)
    out = []
    for i in range(first - 1, last):
        line = src[i].strip()
        if i + 1 in fields:
            comment = line.split("  # ", 1)[1] if "  # " in line else ""
            out.append(("field", fields[i + 1], comment))
        elif line.startswith("# "):
            out.append(("section", "", line[2:]))
    return out


def cell(v) -> str:
    """A value as one would type it after `NAME=`; paths inside the repo relative to its root."""
    root = os.path.dirname(os.path.abspath(tg.__file__)) + os.sep
    text = str(int(v)) if isinstance(v, bool) else str(v).replace(root, "./")
    return "`" + text.replace("|", "\\|") + "`" if text else '`""`'


def table() -> str:
    defaults = {f.name: f.default for f in dataclasses.fields(tg.Hyperparameters)}
    rows = ["| Variable | Default | Presets that change it | Meaning |", "|---|---|---|---|"]
    for kind, name, comment in class_lines():
        if kind == "section":
            rows.append(f"| **{comment.replace('|', '/')}** | | | |")
            continue
        def base(p):
            return tg.PRESETS[BUILT_ON[p]].get(name, defaults[name]) if p in BUILT_ON else defaults[name]
        presets = ", ".join(f"{p} {cell(tg.PRESETS[p][name])}" for p in PRESET_ORDER
                            if p in tg.PRESETS and name in tg.PRESETS[p] and tg.PRESETS[p][name] != base(p))
        meaning = re.sub(r"\s+", " ", comment).replace("|", "/").replace("<", "&lt;")
        rows.append(f"| `{name.upper()}` | {cell(defaults[name])} | {presets} | {meaning} |")
    return "\n".join(rows) + "\n"


def readme_block(text: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md has no knobs markers ({BEGIN} ... {END})")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def main(argv: list[str]) -> int:
    if "--write" in argv:
        text = open(README).read()
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        open(README, "w").write(head + BEGIN + "\n" + table() + END + tail)
        return 0
    sys.stdout.write(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
