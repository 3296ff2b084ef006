"""Pack train_gpt.py into a self-extracting single file that runs identically (issue 10 item 6,
rule D2: the file shipped is the file counted).

    python3 tests/tools/pack.py train_gpt.py records/<run>/train_gpt.py

The packed file is valid Python that needs only the standard library: it decompresses its string
literal with lzma (xz, preset 9 extreme) and executes the source as the running script itself: same
globals, so `__name__ == "__main__"` and `__file__` is the packed file, whose size is what
code_bytes() counts and the log reports. Exceptions keep the source's line numbers.
The literal holds the lzma bytes themselves, one byte each on disk (issue 17 item 8): line 1
declares the latin-1 source encoding (PEP 263), so every byte decodes to the character of the same
number and `.encode("latin-1")` gives the bytes back. Only the five bytes that cannot stand raw in
a "..." literal are escaped: NUL and CR (Python source may not contain them; a CR would also be
read as a line end), LF (it ends the literal), the quote and the backslash. A NUL before an octal
digit is written `\\000`, since `\\0` would take the digit with it. A bytes literal cannot hold them:
Python accepts only ASCII characters in b"...". The base85 text this replaces was 25% larger than
the lzma bytes; these escapes add 5/256 of them. The literal has a line of its own, so a traceback
through line 3 quotes `exec(compile(lzma.decompress(` and not the 75 KB line (Python 3.13 quotes the
whole expression, as it did the base85 text).
"""

import ast
import lzma
import re
import sys

USAGE = "usage: python3 tests/tools/pack.py train_gpt.py OUT.py"
WRAPPER = b'# coding: latin-1\nimport lzma\nexec(compile(lzma.decompress(\n"%s".encode("latin-1")),__file__,"exec"))\n'
ESCAPES = {0x00: b"\\0", 0x0A: b"\\n", 0x0D: b"\\r", 0x22: b'\\"', 0x5C: b"\\\\"}  # NUL LF CR " backslash
ESCAPED = re.compile(rb'(\x00(?=[0-7]))|[\x00\n\r"\\]')


def escape(data: bytes) -> bytes:
    """The body of a "..." literal in a latin-1 source file whose value is `data` decoded as latin-1."""
    return ESCAPED.sub(lambda m: b"\\000" if m.group(1) else ESCAPES[m.group()[0]], data)


def pack(source: bytes) -> bytes:
    return WRAPPER % escape(lzma.compress(source, preset=9 | lzma.PRESET_EXTREME))


def unpack(packed: bytes) -> bytes:
    """The source inside a packed file (what a reviewer reads); Python's parser reads the literal."""
    body = packed[len(WRAPPER.split(b"%s")[0]):-len(WRAPPER.split(b"%s")[1])]
    return lzma.decompress(ast.literal_eval('"' + body.decode("latin-1") + '"').encode("latin-1"))


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
