"""Write docs/results.md: every result file under benchmarks/results/, grouped by method, with the
command, commit and CPU its provenance block records (run after adding or deleting a result)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GROUPS = [
    ("oneshot", "One-shot (magnitude, Wanda, SparseGPT)"),
    ("sparsegpt_peer", "One-shot: why two SparseGPT implementations differ"),
    ("reconstruct", "One-shot: reconstruction option search (held-out calibration only)"),
    ("allocation", "Mixed per-layer sparsity"),
    ("sds", "SDS (sparse → dense → sparse)"),
    ("admm", "ADMM + SR-STE"),
    ("contextual", "Contextual sparsity"),
    ("structured", "Structured pruning"),
    ("minilm", "Structured pruning: MiniLM heads"),
    ("quant", "Prune, then quantize"),
    ("fused", "Fused decoder graph (onnxruntime-fused) against ONNX Runtime GenAI"),
    ("streamed", "Block-streamed pruning: the same weights, and a model twice a memory cap"),
    ("large_model", "Block-streamed pruning: what the whole build needs in memory"),
    ("", "Whole builds and others"),
]

HEAD = """# Results: every table, its file and the command that made it

Each file under `benchmarks/results/` starts with a `provenance` block: the command line, the git
commit (`+dirty` when the tree had uncommitted changes) and the machine; `benchmarks/common.py`'s
`write_result` adds it. Files written before that carry a reconstructed block (`reconstructed`:
the last commit that wrote the file and the command the session notes give for it, or `null` with
a `command_note` where none was recorded). Superseded results are deleted (git keeps them). Logs
of `polygraphy inspect sparsity` runs sit beside them (`*.log`). This page is written by
`python benchmarks/results_index.py`.
"""


def cpu_of(machine: object) -> str:
    if not isinstance(machine, dict):
        return "not recorded"
    cpu = machine.get("cpu") if isinstance(machine.get("cpu"), dict) else machine
    name = cpu.get("model") or cpu.get("processor") or machine.get("processor") or "not recorded"
    isa = cpu.get("isa") or []
    return f"{name} ({', '.join(isa)})" if isa else str(name)


def main() -> None:
    lines = [HEAD]
    files = sorted(RESULTS.glob("*.json"))
    done: set[Path] = set()
    for prefix, title in GROUPS:
        mine = [f for f in files if f not in done and f.name.startswith(prefix)]
        if not mine:
            continue
        done |= set(mine)
        lines += [f"## {title}", "", "| file | command | commit | CPU |", "|---|---|---|---|"]
        for f in mine:
            prov = json.loads(f.read_text(encoding="utf-8")).get("provenance") or {}
            cmd = f"`{prov['command']}`" if prov.get("command") else "not recorded"
            lines.append(f"| [{f.name}](../benchmarks/results/{f.name}) | {cmd} | {str(prov.get('commit', 'unknown'))[:10]} | {cpu_of(prov.get('machine'))} |")
        lines.append("")
    (ROOT / "docs" / "results.md").write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()
