"""Writing a benchmark's figures into docs/benchmarks.md, between markers."""

from __future__ import annotations


def write_block(marker: str, section: str, heading: str,
                path: str = "docs/benchmarks.md") -> None:
    """Replace the text between ``<!-- marker:start -->`` and ``<!-- marker:end -->``
    with ``section``; the first time, append it under ``heading``."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    block = f"{start}\n{section}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n{heading}\n\n{block}\n"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
