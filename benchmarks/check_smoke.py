"""CI's check of ``make smoke``: the demo report and the methods table exist, parse and hold every row."""
import json
import sys
from pathlib import Path


def main(root: Path) -> int:
    report = (root / "demo" / "report.md").read_text()
    assert "| baseline |" in report, "demo report has no baseline row"
    for name in ("baseline",):
        metrics = json.loads((root / "demo" / name / "metrics.json").read_text())
        assert 0 <= metrics["miou"] <= 100 and metrics["manifest_sha256"], metrics
    overlays = list((root / "demo").glob("*/overlays/*.png"))
    assert overlays, "the demo wrote no overlay"
    results = json.loads((root / "methods" / "results.json").read_text())
    methods = {r["method"] for r in results["rows"]}
    assert "baseline" in methods and len(methods) > 1, methods
    for r in results["rows"]:
        assert "miou" in r["1shot"] or "not_run" in r["1shot"], r
    assert (root / "methods" / "miou.png").stat().st_size > 0
    assert "| baseline |" in (root / "methods" / "report.md").read_text()
    print(f"smoke outputs ok: demo ({len(overlays)} overlays), methods table ({sorted(methods)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
