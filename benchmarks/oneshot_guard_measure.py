"""Measure the figures ``tests/test_oneshot_guard.py`` pins: Wanda and SparseGPT 2:4 on the bundled
SmolLM2, 8 × 512 calibration tokens (seed 0, fp32 calibration), perplexity on the first 4 × 256-token
evaluation windows. Rerun it and update the test's PINNED_BY_CAPABILITY values (this CPU's PyTorch
capability and vendor, printed) only when a change is meant to move them (say so in the commit), or to pin a new
capability on a CPU of that kind.

    python benchmarks/oneshot_guard_measure.py
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibrate.data import calibration_windows, evaluation_windows, shakespeare_splits, tokenize  # noqa: E402
from core.models import load_model  # noqa: E402
from passes import PassContext, get_pass_class  # noqa: E402
from pipeline.validate import perplexity, torch_outputs_fn  # noqa: E402


def main() -> None:
    loaded = load_model("smollm2-135m")
    s = shakespeare_splits()
    ev = evaluation_windows(tokenize(loaded.tokenizer, s.evaluation), 256, 4)
    cal = calibration_windows(tokenize(loaded.tokenizer, s.calibration), 8, 512, 0)
    for method in ("wanda", "sparsegpt"):
        model = copy.deepcopy(loaded.model)
        cls = get_pass_class(method)
        t0 = time.perf_counter()
        cls(cls.config_class(pattern="2:4", calibration_dtype="float32")).run(model, PassContext(loaded.adapter, calibration=lambda: cal, progress=False))
        seconds = time.perf_counter() - t0
        print(method, "2:4 float32", round(perplexity(torch_outputs_fn(model, "causal-lm"), ev, method)["perplexity"], 4), f"{seconds:.1f} s")
    print("dense", round(perplexity(torch_outputs_fn(loaded.model, "causal-lm"), ev, "dense")["perplexity"], 4))
    import torch

    from tests.test_oneshot_guard import cpu_kind

    print("PyTorch CPU capability", torch.backends.cpu.get_cpu_capability(), "- the pins' key:", cpu_kind())


if __name__ == "__main__":
    main()
