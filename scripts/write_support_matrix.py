"""Write the support matrix (vtexit.methods.support.markdown) into README.md and docs/families.md, between their two
marker lines."""

from __future__ import annotations

import sys
from pathlib import Path

from vtexit.methods.support import BEGIN_MARK, END_MARK, markdown


def main(readme: Path) -> None:
    text = readme.read_text()
    if text.count(BEGIN_MARK) != 1 or text.count(END_MARK) != 1:
        sys.exit(f"{readme} needs exactly one line {BEGIN_MARK!r} and one line {END_MARK!r}")
    head, rest = text.split(BEGIN_MARK)
    _, tail = rest.split(END_MARK)
    readme.write_text(f"{head}{BEGIN_MARK}\n{markdown()}\n{END_MARK}{tail}")


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    for path in sys.argv[1:] or ["README.md", "docs/families.md"]:
        main(root / path)
