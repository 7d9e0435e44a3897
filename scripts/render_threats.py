"""Re-render the threats tables of docs/threats.md from a committed result JSON.

Run:  python scripts/render_threats.py results/threats-digits.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from trap2.eval.threats import threats_markdown


def main(paths: list[str]) -> None:
    for path in paths:
        sys.stdout.write(threats_markdown(json.loads(Path(path).read_text())) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
