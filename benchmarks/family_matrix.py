"""Issue 30's family matrix, read from the tests: runs ``tests/test_families.py`` with every decoder family
built (``FAMILY_MATRIX=all``), reads the JUnit report, and writes family × {one-shot, structured,
contextual, ONNX prefill, KV decode, ORT = PyTorch, native-cpu, onnxruntime-fused}: ✔ (the test passed),
refused (the test passed by asserting the refusal; its reason recorded by the test) or ✘ (it failed).

    python benchmarks/family_matrix.py --out benchmarks/results/family_matrix.json

Nothing is timed; the run takes about 6 minutes on two cores (one build of exports per family).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, markdown_table, write_result  # noqa: E402

CELLS = {
    "one-shot (Wanda 2:4)": ("test_one_shot", ""),
    "structured FFN (sliced)": ("test_structured", ""),
    "structured heads (sliced)": ("test_structured_head_slicing", ""),
    "slice = mask (PyTorch)": ("test_slicing_equals_masking", ""),
    "contextual": ("test_contextual", ""),
    "ONNX prefill, ORT = PyTorch": ("test_onnx_prefill_and_ort_equals_pytorch", ""),
    "KV decode (greedy = PyTorch)": ("test_kv_decode", ""),
    "native-cpu": ("test_engines_that_run_llama_blocks_themselves", "native-cpu-"),
    "onnxruntime-fused": ("test_engines_that_run_llama_blocks_themselves", "onnxruntime-fused-"),
}
"""Matrix column → (test function, its parameter id's prefix before the family)."""


def _cell(name: str) -> tuple[str, str] | None:
    """A JUnit test case name 'test_x[params]' → (column, family), or None for a test outside the matrix."""
    func, _, params = name.partition("[")
    params = params.rstrip("]")
    for column, (test, prefix) in CELLS.items():
        if func == test and params.startswith(prefix) and params:
            return column, params[len(prefix):]
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "family_matrix.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_families.py", f"--junitxml={report}", "-o", "junit_family=xunit1"]
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "FAMILY_MATRIX": "all"})
        cases = ET.parse(report).getroot().iter("testcase")
        matrix: dict[str, dict[str, dict[str, str]]] = {}
        for case in cases:
            found = _cell(case.get("name", ""))
            if found is None:
                continue
            cell, family = found
            props = {p.get("name"): p.get("value") for p in case.iter("property")}
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                entry = {"status": "failed", "detail": bad.get("message", "")[:300]}
            elif case.find("skipped") is not None:
                entry = {"status": "not applicable", "detail": case.find("skipped").get("message", "")}
            elif "refused" in props:
                entry = {"status": "refused", "detail": props["refused"]}
            else:
                entry = {"status": "ok", "detail": ""}
            matrix.setdefault(family, {})[cell] = entry
    mark = {"ok": "✔", "refused": "refused", "failed": "✘", "not applicable": "—"}
    header = ["family", *CELLS]
    rows = [[fam, *(mark[matrix[fam][c]["status"]] if c in matrix[fam] else "" for c in CELLS)] for fam in sorted(matrix)]
    reasons = sorted({f"{fam} / {cell}: {e['detail']}" for fam, cells in matrix.items() for cell, e in cells.items() if e["status"] in ("refused", "failed")})
    table = markdown_table(header, rows)
    write_result(args.out, {"pytest_exit_code": proc.returncode, "matrix": matrix, "table_markdown": table, "reasons": reasons})
    print(table)
    print("\n".join(reasons))
    if proc.returncode:
        raise SystemExit(f"some family tests failed (pytest exit {proc.returncode}); the matrix marks them ✘")


if __name__ == "__main__":
    main()
