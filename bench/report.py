"""How a benchmark leaves its result: NAME.md (the table and what was measured) and
NAME.json under the output directory, and the same table on stdout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def publish(out: Path, name: str, md: str, meta: str, results: Any) -> None:
    (out / f"{name}.md").write_text(md + "\n\n" + meta + "\n")
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    print()
    print(md)
    print()
    print(meta)
