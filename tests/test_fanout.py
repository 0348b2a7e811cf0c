"""``build --executor ray``: a recipe's variants fanned out on a local Ray with 2 CPUs give the serial
build's results (apart from what measures time), and a worker killed mid-variant is retried by Ray and
resumes from the stages its dead attempt finished."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ray", reason="the 'ray' extra is not installed (scripts/install.sh installs it)")

from test_build import tiny_recipe  # noqa: E402

from pipeline.build import build  # noqa: E402

pytestmark = pytest.mark.slow

VARIANTS = [
    {"name": "magnitude-50", "passes": [{"magnitude": {"sparsity": 0.5}}]},
    {"name": "magnitude-2of4", "passes": [{"magnitude": {"pattern": "2:4"}}]},
    {"name": "ffn50", "passes": [{"structured": {"ffn": 0.5}}]},
]


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def test_ray_fanout_equals_serial_and_a_killed_worker_resumes(local_ray, tiny_dirs, text_file, tmp_path, monkeypatch):
    from pipeline.fanout import FAULT_ENV, build_on_ray, untimed

    build(tiny_recipe(tiny_dirs["llama"], text_file, tmp_path / "serial", variants=VARIANTS))
    monkeypatch.setenv(FAULT_ENV, "ffn50/onnx")  # the first attempt of ffn50's task dies by SIGKILL after its ONNX stage
    fanned = build_on_ray(tiny_recipe(tiny_dirs["llama"], text_file, tmp_path / "ray", variants=VARIANTS), tmp_path / "ray")

    on_disk = json.loads((tmp_path / "ray" / "results.json").read_text())
    serial_disk = json.loads((tmp_path / "serial" / "results.json").read_text())
    for results in (on_disk, serial_disk):
        results["recipe"].pop("output")  # the two build directories
    assert untimed(on_disk) == untimed(serial_disk)
    tasks = {t["variant"]: t for t in on_disk["fanout"]["tasks"]}
    assert set(tasks) == {"dense", "magnitude-50", "magnitude-2of4", "ffn50"}
    assert len({t["pid"] for t in tasks.values()}) >= 2  # the variants ran in Ray worker processes, not all in one

    # the retry of ffn50: the killed attempt had finished its model and ONNX stages, which the retry reused
    assert (tmp_path / "ray" / ".fanout-fault-ffn50").is_file()
    retried = {s["stage"]: s["reused"] for s in tasks["ffn50"]["stages"]}
    assert tasks["ffn50"]["retry_after_injected_fault"]
    assert retried["ffn50/model"] and retried["ffn50/onnx"] and not retried["ffn50/engine-onnxruntime-cpu"], retried
    assert not any(s["reused"] for s in tasks["magnitude-50"]["stages"])

    # the driver's finishing build reused every per-variant stage the workers built; it ran the timing stage itself
    per_variant = [s for s in fanned.stages if s["variant"] != "all"]
    assert per_variant and all(s["reused"] for s in per_variant)
    assert any(not s["reused"] and s["variant"] == "all" for s in fanned.stages)


def test_executor_names(tmp_path):
    from core.errors import PipelineError
    from pipeline.fanout import parse_executor

    assert parse_executor("serial") == ("serial", None)
    assert parse_executor("ray") == ("ray", None)
    assert parse_executor("ray://10.0.0.5:10001") == ("ray", "ray://10.0.0.5:10001")
    assert parse_executor("ray:auto") == ("ray", "auto")
    with pytest.raises(PipelineError, match="--executor 'dask' is not one of"):
        parse_executor("dask")
