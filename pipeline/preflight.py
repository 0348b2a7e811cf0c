"""Before the expensive work: will this build fit in this machine's memory and disk?

The estimate is deliberately simple and stated in the error, so a user can see which knob to turn:

- memory: the models, the ONNX export and the rebinding of a variant's weights into the dense graph,
  :data:`BUILD_PEAK_WEIGHTS` × the fp32 weights (``W`` bytes; measured: the peak RSS of a whole
  build is 4.57 W, at the rebinding stage, in ``benchmarks/results/large_model_build.json``); three more ``W`` for
  gradients and AdamW's two moments when a variant trains (a pass with ``trains``), plus the largest
  ``state_copies`` of its training passes (e.g. two for a pass that keeps Z and U); the layer-wise calibration
  runner's block inputs and outputs for every calibration window (windows × length × hidden × 4 B
  × 2); one evaluation window's logits and their log-softmax, plus the dense logits kept for
  agreement (length × vocab × 4 B each);
- disk: per variant not yet built, its safetensors, ONNX and each engine's artifact (about ``W``
  each: an optimised graph, a fused graph, a compressed native file), plus the KV-cache graphs
  (2 ``W``) when the recipe exports them.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ResourceError

log = logging.getLogger(__name__)

GiB = 1 << 30

BUILD_PEAK_WEIGHTS = 4.6
"""A whole build's peak memory in units of the model's float32 weights: 4.57 measured (dense model,
the variant's model, the ONNX graph and its initializers while a variant's weights are rebound;
``python benchmarks/large_model_build.py``, a 0.64B-parameter Llama)."""


def available_memory() -> int | None:
    """Memory this process can still use, in bytes: MemAvailable from /proc/meminfo, or less when the
    process's memory cgroup (a container's limit) leaves less; None where neither can be read."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        avail = None
    left = cgroup_memory_left()
    if left is not None and (avail is None or left < avail):
        log.debug("memory cgroup leaves %.1f GiB (MemAvailable %s)", left / GiB, f"{avail / GiB:.1f} GiB" if avail else "unknown")
        return left
    return avail


NO_LIMIT = 1 << 60
"""Cgroup limits at or above this are "no limit" (v1 writes 2^63 rounded down to a page)."""


def cgroup_memory_left(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """limit − usage + reclaimable file cache of this process's memory cgroup (v2 ``memory.max``, or v1
    ``memory.limit_in_bytes``), in bytes; None without a limit or where it cannot be read."""
    try:
        lines = proc_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":  # v2: one unified hierarchy
            files = ("memory.max", "memory.current", "inactive_file")
            dirs = [root / path.lstrip("/"), root]
        elif "memory" in controllers.split(","):
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
            dirs = [root / "memory" / path.lstrip("/"), root / "memory"]
        else:
            continue
        for d in dirs:
            left = _cgroup_left(d, *files)
            if left is not None:
                return left
    return None


def _cgroup_left(d: Path, limit_file: str, usage_file: str, inactive_key: str) -> int | None:
    try:
        raw = (d / limit_file).read_text(encoding="ascii").strip()
        if raw == "max" or int(raw) >= NO_LIMIT:
            return None
        usage = int((d / usage_file).read_text(encoding="ascii").strip())
        inactive = 0
        stat = d / "memory.stat"
        if stat.is_file():
            for line in stat.read_text(encoding="ascii").splitlines():
                key, _, value = line.partition(" ")
                if key == inactive_key:
                    inactive = int(value)
        return max(0, int(raw) - usage + inactive)
    except (OSError, ValueError):
        return None


def free_disk(path: Path) -> int:
    p = Path(path)
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


@dataclass
class Estimate:
    memory: dict[str, int]
    disk: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"memory_bytes": self.memory, "disk_bytes": self.disk}


def estimate(
    recipe: Any, facts: Any, weights_bytes: int, variants_to_build: list[Any], trains: bool, calibrates: bool, state_copies: int = 0,
) -> Estimate:
    """``facts``: the model's :class:`core.adapters.base.ModelFacts` (from its config, no weights)."""
    hidden = facts.hidden
    vocab = facts.vocab or 1
    cal, ev = recipe.data.calibration, recipe.data.evaluation
    mem = {f"models, ONNX export and weight rebinding ({BUILD_PEAK_WEIGHTS} × the float32 weights)": int(BUILD_PEAK_WEIGHTS * weights_bytes)}
    if trains:
        mem["training state (grads + AdamW moments)"] = 3 * weights_bytes
        if state_copies:
            mem[f"training pass state ({state_copies} weight copies the passes keep)"] = state_copies * weights_bytes
    if calibrates:
        mem[f"calibration activations ({cal.windows} windows × {cal.length} tokens × hidden {hidden})"] = cal.windows * cal.length * hidden * 4 * 2
    agree = recipe.validation.agreement_windows
    mem[f"evaluation logits ({ev.length} tokens × vocab {vocab}, + {agree} dense windows kept)"] = (2 + agree) * ev.length * vocab * 4
    per_variant = 2 + max(1, len(recipe.engines)) + (2 if recipe.export.kv_cache else 0)
    disk = {f"{len(variants_to_build)} variants × {per_variant} copies of the weights": len(variants_to_build) * per_variant * weights_bytes}
    return Estimate(mem, disk)


def check(est: Estimate, out_dir: Path, memory_available: int | None = None, disk_available: int | None = None) -> str:
    """Raise :class:`ResourceError` naming the biggest term when the estimate exceeds what is free;
    else return the estimate as one line."""
    memory_available = available_memory() if memory_available is None else memory_available
    disk_available = free_disk(out_dir) if disk_available is None else disk_available
    need_mem, need_disk = sum(est.memory.values()), sum(est.disk.values())
    line = (
        f"preflight: about {need_mem / GiB:.1f} GiB of memory ({(memory_available or 0) / GiB:.1f} GiB available) "
        f"and {need_disk / GiB:.1f} GiB of disk ({disk_available / GiB:.1f} GiB free under {out_dir})"
    )
    log.info("%s", line)
    if memory_available is not None and need_mem > memory_available:
        raise ResourceError(
            f"this build needs about {need_mem / GiB:.1f} GiB of memory but {memory_available / GiB:.1f} GiB is available: "
            + _terms(est.memory)
            + "; lower data.calibration.windows or .length (or data.evaluation.length), or free memory"
            + (
                f". The model alone does not fit {BUILD_PEAK_WEIGHTS} times over: `python -m pipeline prune RECIPE` prunes it block by "
                "block from disk (model.stream) into Hugging Face directories, without the ONNX export and validation that load it whole"
                if max(est.memory, key=est.memory.get).startswith("models") else ""
            )
        )
    if need_disk > disk_available:
        raise ResourceError(
            f"this build needs about {need_disk / GiB:.1f} GiB of disk under {out_dir} but {disk_available / GiB:.1f} GiB is free: "
            + _terms(est.disk)
            + "; free space, choose another --output, or build fewer variants"
        )
    return line


def _terms(terms: dict[str, int]) -> str:
    return ", ".join(f"{name} {b / GiB:.2f} GiB" for name, b in sorted(terms.items(), key=lambda kv: -kv[1]))


def stream_refusal_of(variant: Any) -> str | None:
    """Why ``variant``'s passes cannot run block-streamed (the first pass that cannot); None when they can."""
    from passes import get_pass_class
    from passes.streamed import stream_refusal

    classes = [get_pass_class(p.name) for p in variant.passes]
    return stream_refusal([(c, c.config_class(**p.options)) for c, p in zip(classes, variant.passes)])


def in_memory_pruning_bytes(recipe: Any, facts: Any, weights_bytes: int, variant: Any) -> int:
    """What pruning ``variant`` in memory holds: the dense model and its copy (+ training state), and the
    calibration activations (see :func:`estimate`)."""
    from passes import get_pass_class

    classes = [get_pass_class(p.name) for p in variant.passes]
    cal = recipe.data.calibration
    need = 2 * weights_bytes + cal.windows * cal.length * facts.hidden * 4 * 2
    if any(c.trains for c in classes):
        need += (3 + max((c.state_copies for c in classes), default=0)) * weights_bytes
    return need


def streamed_pruning_bytes(recipe: Any, facts: Any, weights_bytes: int) -> int:
    """What pruning block-streamed holds: the parts outside the blocks (embeddings, and an untied head
    only when counted here to stay on the safe side), two blocks (the one being pruned and its
    float32 statistics' worth), and the calibration activations (inputs and outputs)."""
    cal = recipe.data.calibration
    outer = 2 * (facts.vocab or 0) * facts.hidden * 4
    block = max(0, weights_bytes - outer) // max(1, facts.layers)
    return outer + 2 * block + cal.windows * cal.length * facts.hidden * 4 * 2


def streaming_needed(recipe: Any, facts: Any, weights: int, variant: Any, memory_available: int | None = None) -> bool:
    """``model.stream: auto``: whether pruning ``variant`` in memory would not fit in the memory available
    (``facts``, ``weights``: the model's, from :func:`pipeline.checks.model_facts`)."""
    avail = available_memory() if memory_available is None else memory_available
    need = in_memory_pruning_bytes(recipe, facts, weights, variant)
    if avail is None or need <= avail:
        return False
    log.info("variant '%s': pruning in memory needs about %.1f GiB, %.1f GiB is available: its passes run block-streamed", variant.name, need / GiB, avail / GiB)
    return True


def check_prune(recipe: Any, facts: Any, weights_bytes: int, variants: list[Any], streamed: dict[str, bool], memory_available: int | None = None) -> str:
    """``python -m pipeline prune``'s memory check: the largest variant's pruning (block-streamed or in
    memory); raises :class:`ResourceError` when it does not fit."""
    avail = available_memory() if memory_available is None else memory_available
    needs = {
        v.name: streamed_pruning_bytes(recipe, facts, weights_bytes) if streamed.get(v.name) else in_memory_pruning_bytes(recipe, facts, weights_bytes, v)
        for v in variants if v.passes
    }
    if not needs:
        return "preflight: no variant has passes"
    name = max(needs, key=needs.get)
    line = f"preflight: pruning needs about {needs[name] / GiB:.1f} GiB of memory (variant '{name}', {'block-streamed' if streamed.get(name) else 'in memory'}); {(avail or 0) / GiB:.1f} GiB available"
    log.info("%s", line)
    if avail is not None and needs[name] > avail:
        hint = "lower data.calibration.windows or .length" if streamed.get(name) else "set model.stream: always (if its passes can stream) or lower data.calibration.windows"
        raise ResourceError(f"variant '{name}' needs about {needs[name] / GiB:.1f} GiB of memory to prune but {avail / GiB:.1f} GiB is available; {hint}")
    return line
