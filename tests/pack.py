"""Pack train_gpt.py into a self-extracting single file that runs identically (issue 10 item 6,
rule D2: the file shipped is the file counted).

    python3 tests/pack.py train_gpt.py records/<run>/train_gpt.py

The packed file is valid Python that needs only the standard library: it decodes the base85
text, decompresses it with lzma (xz, preset 9 extreme) and executes the source as the running
script itself: same globals, so `__name__ == "__main__"` and `__file__` is the packed file, whose
size is what code_bytes() counts and the log reports. Exceptions keep the source's line numbers.
Base85 text needs no escaping inside a Python string literal (no quotes, no backslash).
"""

import base64
import lzma
import sys

USAGE = "usage: python3 tests/pack.py train_gpt.py OUT.py"
WRAPPER = ('import base64,lzma\nexec(compile(lzma.decompress(base64.b85decode(\n"{text}"\n)),__file__,"exec"))\n')


def pack(source: bytes) -> bytes:
    text = base64.b85encode(lzma.compress(source, preset=9 | lzma.PRESET_EXTREME)).decode("ascii")
    return WRAPPER.format(text=text).encode("ascii")


def unpack(packed: bytes) -> bytes:
    """The source inside a packed file (what a reviewer reads)."""
    text = packed.decode("ascii").split('\n"')[1].split('"\n')[0]
    return lzma.decompress(base64.b85decode(text))


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(USAGE, file=sys.stderr)
        return 2
    with open(argv[1], "rb") as f:
        source = f.read()
    packed = pack(source)
    assert unpack(packed) == source
    with open(argv[2], "wb") as f:
        f.write(packed)
    print(f"pack: {argv[1]} {len(source)} bytes -> {argv[2]} {len(packed)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
