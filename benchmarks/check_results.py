"""Smoke check of a benchmark run (CI): the JSON parses and holds every section, the Markdown
report has its tables, and every plot it links is a readable PNG. Timings are not judged."""
import argparse
import json
import re
import sys
from pathlib import Path

import matplotlib.image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import machine_info, machine_slug  # noqa: E402


def check(folder: Path, quick: bool):
    data = json.loads((folder / ("quick.json" if quick else "results.json")).read_text())
    for key in ("machine", "limits", "rows", "sweeps", "threads"):
        assert key in data, f"results lack '{key}'"
    assert data["rows"], "no benchmark rows"
    assert not data.get("partial"), "the run stopped before its last case (the file holds the cases it finished)"
    assert not data.get("errors"), f"case(s) failed: {data.get('errors')}"
    for row in data["rows"]:
        assert row["reference_ms"] > 0 and row["fsskern_ms"] > 0, row["case"]
        assert "roofline" in row, f"{row['case']}: no roofline entry"
    report = (folder / ("quick.md" if quick else "report.md")).read_text()
    for heading in ("| case | size | reference | fsskern |", "### Roofline", "### Scaling sweeps", "### Threads"):
        assert heading in report, f"report lacks '{heading}'"
    plots = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report)
    assert plots, "report links no plots"
    for plot in plots:
        image = matplotlib.image.imread(folder / plot)
        assert image.ndim == 3 and image.shape[0] > 100, f"{plot}: not an image"
    print(f"{folder}: {len(data['rows'])} cases, {len(data['sweeps'])} sweeps, {len(plots)} plots: ok")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    check(args.out or HERE / "results" / machine_slug(machine_info()), args.quick)
