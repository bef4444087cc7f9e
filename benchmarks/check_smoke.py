"""CI's check of ``make smoke``: the demo report, the methods table and the methods' step benchmarks exist, parse
and hold every row."""
import json
import sys
from pathlib import Path

MODEL_BENCHMARKS = {"rilfs", "dpcl", "umtfss", "crcnet", "popnet"}  # the Makefile's smoke target runs each


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
    benches = sorted((root / "models").glob("*-quick.json"))
    assert {p.stem[:-len("-quick")] for p in benches} == MODEL_BENCHMARKS, benches
    for path in benches:  # every case of each method's step benchmark ran on both sides and measured something
        rows = json.loads(path.read_text())["rows"]
        assert rows, path
        for r in rows:
            assert r["fused_s"] > 0 and r["fused_peak_extra_mb"] >= 0, (path.name, r)
            assert r.get("reference_s") is None or (r["reference_s"] > 0 and r["speedup"] > 0), (path.name, r)
        assert (path.with_suffix(".md")).stat().st_size > 0
    print(f"smoke outputs ok: demo ({len(overlays)} overlays), methods table ({sorted(methods)}), "
          f"step benchmarks ({len(benches)} methods)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print("usage: python benchmarks/check_smoke.py RUNS_DIR  (make smoke's outputs, e.g. runs/smoke)")
        sys.exit(0 if len(sys.argv) == 2 else 2)
    sys.exit(main(Path(sys.argv[1])))
