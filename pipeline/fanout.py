"""A recipe's variants fanned out on Ray (``python -m pipeline build --executor ray[://address]``).

Each variant's per-variant stages (pruned model, ONNX, KV graphs, engines, validation) run as one Ray task
against the same content-keyed stage store — the build directory, which must be a path every node sees
(one machine, or a shared filesystem). The dense variant runs first (other variants rebind its graph and
validate against it); the rest run in parallel, one CPU each by default. Then the driver runs the whole
build as usual: every stage the workers finished is reused (its key is the hash of its inputs, so a stage
built on a worker is the stage a serial build would have built), and the timing stages — latency and
decode, interleaved across variants — and the report run on the driver's node alone: interleaved timing
must not be split across machines.

A worker that dies (killed, out of memory, its node lost) is retried by Ray (``max_retries``); the retry
reuses every stage the dead attempt finished, and an unfinished stage's temporary directory is removed
before it is built again (``core.artifacts.run_stage``), so nothing half-written is ever used.

``PIPELINE_FANOUT_FAULT=<variant>/<stage>`` makes the first attempt of that variant's task kill itself
with SIGKILL right after that stage finishes — the fault the tests inject to check the retry (the marker
``.fanout-fault-<variant>`` in the build directory says it fired, so the retry runs through).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from core.artifacts import file_lock
from core.errors import PipelineError

log = logging.getLogger(__name__)

FAULT_ENV = "PIPELINE_FANOUT_FAULT"


TIMING_FIELDS = {"seconds", "created", "finished", "latency", "samples", "decision", "environment", "fanout", "train_seconds", "peak_rss_bytes"}
"""results.json fields that measure time or the run itself (plus the fan-out's own section)."""


def untimed(results: Any) -> Any:
    """``results`` without the fields that measure time (``TIMING_FIELDS``, names ending in ``_ms`` or
    ``_seconds`` or starting with ``seconds``): what two builds of one recipe must agree on, whatever ran them."""
    if isinstance(results, dict):
        return {k: untimed(v) for k, v in results.items()
                if k not in TIMING_FIELDS and not k.endswith(("_ms", "_seconds")) and not k.startswith("seconds") and "ms_per" not in k}
    if isinstance(results, list):
        return [untimed(v) for v in results]
    return results


def parse_executor(text: str) -> tuple[str, str | None]:
    """'serial' → ('serial', None); 'ray' → ('ray', None): a local Ray with this machine's CPUs, or the
    cluster ``RAY_ADDRESS`` names; 'ray://host:port' (or 'ray:auto') → ('ray', that address)."""
    if text == "serial":
        return "serial", None
    if text == "ray":
        return "ray", None
    if text.startswith("ray://"):
        return "ray", text
    if text.startswith("ray:") and len(text) > 4:
        return "ray", text[4:]
    raise PipelineError(f"--executor '{text}' is not one of: serial, ray, ray://HOST:PORT, ray:auto")


def _variant_task(recipe: Any, out_dir: str, name: str, threads: int, fault: str = "") -> dict[str, Any]:
    """One Ray task: the per-variant stages of one variant (a retry may run in a new worker process or a reused one)."""
    import torch

    from pipeline.build import Builder

    torch.set_num_threads(max(1, threads))
    marker = Path(out_dir) / f".fanout-fault-{name}"
    # the dense variant's stages (finished by the first task) are reused, not rebuilt: the other variants'
    # stage keys read their records (a rebound graph hashes the dense graph it was rebound from)
    names = ["dense"] if name == "dense" else ["dense", name]
    if fault.startswith(name + "/") and not marker.exists():
        stage_kind = fault.split("/", 1)[1]
        from pipeline.build import STAGES

        upto = [s for s in STAGES if s.scope.name in ("VARIANT", "VARIANT_ENGINE")]
        kinds = [s.kind for s in upto]
        if stage_kind not in kinds:
            raise PipelineError(f"{FAULT_ENV}: stage '{stage_kind}' is not a per-variant stage ({', '.join(kinds)})")
        Builder(recipe, Path(out_dir), stages=upto[: kinds.index(stage_kind) + 1]).run_variant_stages(names)
        marker.write_text(f"killed after {fault} at {time.time()}\n", encoding="utf-8")
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.perf_counter()
    stages = Builder(recipe, Path(out_dir)).run_variant_stages(names)
    return {
        "variant": name,
        "pid": os.getpid(),
        "node": _node_id(),
        "seconds": round(time.perf_counter() - t0, 3),
        "retry_after_injected_fault": marker.exists(),
        "stages": [{"stage": s["stage"], "reused": s["reused"], "seconds": s["seconds"]} for s in stages if s.get("variant") == name],
    }


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside a Ray worker: no node to name
        return None


def build_on_ray(recipe: Any, out_dir: Path | None = None, address: str | None = None, cpus_per_variant: int = 1,
                 max_retries: int = 2, num_cpus: int | None = None, threads: int | None = None) -> Any:
    """Build ``recipe`` with its variants' per-variant stages fanned out as Ray tasks, then finish the
    build (timing stages, report) on this node. Returns the :class:`pipeline.build.BuildSummary`, whose
    results carry a ``fanout`` section: each variant's task, its attempts' stage reuse and seconds.

    ``cpus_per_variant`` is what Ray reserves for each non-dense variant (how many run at once on a node);
    ``threads`` is how many PyTorch threads each task computes with — by default this process's count, as a
    serial build here would use, because PyTorch's float reductions (a pass's least-squares solve, the dense reference
    logits) round differently with another thread count: with the same count the results equal a serial
    build's to the last bit, with fewer they differ in the last digits. On a small machine the tasks then
    share the cores (two tasks of two threads on two cores). The dense variant, which runs alone, reserves
    a whole node."""
    try:
        import ray
    except ImportError as exc:
        raise PipelineError("--executor ray needs the 'ray' package (pip install 'prune-pipeline[ray]', or scripts/install.sh)") from exc
    from pipeline.build import Builder, build

    builder = Builder(recipe, out_dir)
    out = builder.out
    out.mkdir(parents=True, exist_ok=True)
    started_here = not ray.is_initialized()
    if started_here:
        init: dict[str, Any] = {"include_dashboard": False, "ignore_reinit_error": True, "logging_level": logging.WARNING}
        if address is not None:
            init["address"] = address
        elif num_cpus is not None:
            init["num_cpus"] = num_cpus
        ray.init(**init)
    t0 = time.perf_counter()
    try:
        names = ["dense"] + [v.name for v in recipe.variants if v.name != "dense"]
        log.info("fan-out on Ray: %d variants, %s CPUs in the cluster, %d reserved per variant", len(names), ray.cluster_resources().get("CPU"), cpus_per_variant)
        import torch

        threads = threads or torch.get_num_threads()
        node_cpus = max(int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive"))
        # Ray starts workers with OMP_NUM_THREADS = the CPUs reserved (1), which changes the float rounding of
        # the validation's reference computations; the workers get the thread count the serial build has
        env = {"OMP_NUM_THREADS": str(threads)}
        task = ray.remote(num_cpus=cpus_per_variant, max_retries=max_retries, runtime_env={"env_vars": env})(_variant_task)
        dense_task = task.options(num_cpus=max(1, node_cpus))
        fault = os.environ.get(FAULT_ENV, "")
        with file_lock(out / ".build.lock", f"build directory {out}", wait=False):
            from pipeline.checks import check_recipe

            check_recipe(recipe, out, source=builder.ctx.source)
            records = [ray.get(dense_task.remote(recipe, str(out), "dense", threads, fault))]  # every other variant builds on it
            pending = {task.remote(recipe, str(out), n, threads, fault): n for n in names[1:]}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                rec = ray.get(done[0])
                log.info("fan-out: variant '%s' done on node %s in %.1f s", pending.pop(done[0]), (rec["node"] or "?")[:8], rec["seconds"])
                records.append(rec)
        fanout_s = time.perf_counter() - t0
        summary = build(recipe, out)
    finally:
        if started_here:
            ray.shutdown()
    summary.results["fanout"] = {
        "executor": "ray", "address": address or "local", "seconds": round(fanout_s, 2), "cpus_per_variant": cpus_per_variant, "threads": threads,
        "max_retries": max_retries, "tasks": records,
    }
    from core.artifacts import atomic_write_json

    atomic_write_json(out / "results.json", summary.results)
    return summary
