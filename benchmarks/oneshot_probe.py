"""One one-shot 2:4 run on the bundled SmolLM2 with the checkout in the *current directory*: perplexity
(6 decimals) and a hash of the pruned masks, so two commits can be compared bit for bit (how issue 32's
Wanda 2:4 "regression" was bisected: the commit that recorded 145.6 and today's give the same fp32 mask).

    python benchmarks/oneshot_probe.py 128 40                       # this checkout, Wanda, fp32
    git worktree add /tmp/old COMMIT && cd /tmp/old && python /path/to/benchmarks/oneshot_probe.py 128 4
    CAL_DTYPE=bfloat16 python benchmarks/oneshot_probe.py 128 40 sparsegpt

Arguments: calibration windows, evaluation windows (512 tokens each, seed 0), method (default wanda).
It imports the packages of the current directory, so it runs unchanged against old commits; it writes
nothing, it prints one RESULT line.
"""

import copy
import dataclasses
import hashlib
import os
import sys
import time

sys.path.insert(0, os.getcwd())

import torch  # noqa: E402

from calibrate.data import calibration_windows, evaluation_windows, shakespeare_splits, tokenize  # noqa: E402
from core.models import load_model  # noqa: E402
from passes import PassContext, get_pass_class  # noqa: E402
from pipeline.validate import perplexity, torch_outputs_fn  # noqa: E402


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        return
    ncal, nev = int(sys.argv[1]), int(sys.argv[2])
    method = sys.argv[3] if len(sys.argv) > 3 else "wanda"
    torch.manual_seed(0)
    loaded = load_model("smollm2-135m")
    splits = shakespeare_splits()
    evw = evaluation_windows(tokenize(loaded.tokenizer, splits.evaluation), 512, nev)
    calw = calibration_windows(tokenize(loaded.tokenizer, splits.calibration), ncal, 512, 0)
    model = copy.deepcopy(loaded.model)
    cls = get_pass_class(method)
    opts = {"pattern": "2:4"}
    if "calibration_dtype" in {f.name for f in dataclasses.fields(cls.config_class)}:
        opts["calibration_dtype"] = os.environ.get("CAL_DTYPE", "float32")
    t0 = time.perf_counter()
    cls(cls.config_class(**opts)).run(model, PassContext(loaded.adapter, calibration=lambda: calw))
    seconds = time.perf_counter() - t0
    h = hashlib.sha256()
    for ref in loaded.adapter.linears(model):
        h.update((ref.weight_out_in() != 0).numpy().tobytes())
    ppl = perplexity(torch_outputs_fn(model, "causal-lm"), evw, "probe")["perplexity"]
    print(
        f"RESULT {method} dtype={opts.get('calibration_dtype')} cal={ncal} ev={nev} ppl={ppl:.6f} maskhash={h.hexdigest()[:16]} "
        f"prune_s={seconds:.1f} calib_sum={int(calw.sum())} eval_sum={int(evw.sum())}"
    )


if __name__ == "__main__":
    main()
