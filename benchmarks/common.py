"""What every benchmark script shares: the provenance each result file records (the command line, the
git commit and whether the tree had uncommitted changes, the machine), the one JSON writer that adds
it, and small helpers for option specs and Markdown tables. Scripts import this module, never each
other; texts and models come from the product's own packages (``calibrate.data.stdlib_text`` is the
second evaluation text)."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """HEAD's hash, with ``+dirty`` when tracked files differ from it; 'unknown' outside a checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


START_COMMIT = git_commit()
"""The commit the script started on (a long run may see new commits before it writes)."""


def machine() -> dict[str, Any]:
    import torch

    from pipeline.build import cpu_info

    return {**cpu_info(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.machine(), "python": platform.python_version()}


def provenance() -> dict[str, Any]:
    now = git_commit()
    return {
        "command": shlex.join(["python", os.path.relpath(sys.argv[0], ROOT) if sys.argv[0] else "-", *sys.argv[1:]]),
        "commit": START_COMMIT,
        **({"commit_at_write": now} if now != START_COMMIT else {}),
        "machine": machine(),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write a benchmark's result atomically, its provenance first."""
    from core.artifacts import atomic_write_json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(path), {"provenance": provenance(), **result})


def parse_spec(spec: str) -> tuple[str, dict]:
    """'name[key=value,...]' → ('name', {key: value}); values become int, float or bool where they read as one."""
    name, _, rest = spec.partition("[")
    options: dict = {}
    if rest:
        if not rest.endswith("]"):
            raise SystemExit(f"'{spec}': expected name[key=value,...]")
        for item in rest[:-1].split(","):
            key, _, value = item.partition("=")
            options[key] = _value(value)
    return name, options


def _value(text: str) -> int | float | bool | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text, text)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def sentence_embeddings(model: Any, tokenizer: Any, lines: list[str], batch: int = 32) -> Any:
    """Mean-pooled last hidden states of ``lines`` (the sentence-transformers pooling)."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(lines), batch):
            enc = tokenizer(lines[i : i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            out.append((h * m).sum(1) / m.sum(1))
    return torch.cat(out)


def synthetic_llama_dir(path: Path, hidden: int, ffn: int, layers: int) -> dict[str, Any]:
    """A random Llama-architecture model (GQA with a quarter of the query heads as KV heads, tied
    embeddings, weights N(0, 0.02)) with SmolLM2's tokenizer, saved like a downloaded checkpoint: bf16
    safetensors shards of at most 500 MB. For measuring memory on models larger than the bundled ones."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from core.models import cached_fp32_dir, resolve_source

    tok = AutoTokenizer.from_pretrained(cached_fp32_dir(resolve_source("smollm2-135m")))
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64 // 4, max_position_embeddings=2048, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    params = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size="500MB")
    tok.save_pretrained(path)
    del model
    return {"hidden": hidden, "ffn": ffn, "layers": layers, "vocab": len(tok), "parameters": params, "float32_bytes": 4 * params,
            "stored": "bfloat16 safetensors shards of ≤ 500 MB", "stored_bytes": sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))}
