"""Writing a benchmark's JSON report: to a file (parents created) or, for ``-``, to standard output."""
from __future__ import annotations

import json
from pathlib import Path


def write_json(report: dict, where: str | None) -> None:
    if not where:
        return
    text = json.dumps(report, indent=1)
    if where == "-":
        print(text)
    else:
        out = Path(where)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
