"""The contract block of docs/api.md: the public signatures that tests check, one per call."""

from __future__ import annotations

from pathlib import Path

API = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def signatures(prefix: str = "rmsjax.", block: str = "contract") -> list[str]:
    """Each signature of the block marked ``<!-- {block}:begin -->`` whose dotted name starts
    with ``prefix``, on one line (continuation lines joined, comments dropped), in the order of
    the page."""
    text = API.read_text().split(f"<!-- {block}:begin -->", 1)[1].split(f"<!-- {block}:end -->", 1)[0]
    calls: list[str] = []
    for line in text.splitlines():
        if not line.strip() or line.startswith(("```", "#")):
            continue
        if line.startswith("rmsjax."):
            calls.append(line.strip())
        else:
            calls[-1] += " " + line.strip()
    return [call for call in calls if call.startswith(prefix)]
