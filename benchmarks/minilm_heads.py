"""MiniLM-L6 with half of its attention heads removed: embedding similarity before/after recovery, latency.

1. Calibrate on windows of the Shakespeare calibration split (by default its lines, each as
   "[CLS] line [SEP]", packed into windows, so the data looks like the sentences being embedded); remove ``--heads`` of the 12 heads
   in every block (activation importance, ``passes.structured``), physically.
2. Sentence embeddings (mean pooling over the attention mask, as sentence-transformers does for
   all-MiniLM-L6-v2) of held-out lines of the evaluation split (lines with at least
   ``--min-words`` words, first ``--lines`` of them), cosine similarity to the dense model's.
3. Recovery: ``passes.distill`` from the dense encoder (final and per-block hidden-state MSE) on
   calibration windows; similarity again.
4. Export dense and recovered models to ONNX; ONNX Runtime CPU latency interleaved at each
   ``--shapes`` (batch × tokens); ratio against the ideal FLOPs ratio (``pipeline.flops``).

    python benchmarks/minilm_heads.py
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import sentence_embeddings, write_result  # noqa: E402

from calibrate.data import calibration_windows, load_splits, tokenize  # noqa: E402
from engines.onnxruntime import OnnxRuntimeCpuEngine  # noqa: E402
from export.onnx_export import export_onnx  # noqa: E402
from passes.base import PassContext  # noqa: E402
from passes.distill import DistillConfig, DistillPass  # noqa: E402
from passes.structured import StructuredConfig, StructuredPass  # noqa: E402
from pipeline.flops import FlopsModel  # noqa: E402
from core.models import count_parameters, load_model  # noqa: E402
from pipeline.validate import interleaved_latency  # noqa: E402

log = logging.getLogger("minilm_heads")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=float, default=0.5)
    ap.add_argument("--calibration", type=int, default=512, help="calibration windows")
    ap.add_argument("--length", type=int, default=32, help="calibration window length (tokens; sentence-sized by default)")
    ap.add_argument("--lines", type=int, default=500)
    ap.add_argument("--min-words", type=int, default=4)
    ap.add_argument("--sentence-windows", action=argparse.BooleanOptionalAction, default=True,
                    help="calibrate and distil on packed calibration-split lines with [CLS]/[SEP] (default) instead of raw text windows")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--shapes", nargs="+", default=["1x128", "8x128"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "minilm_heads.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    loaded = load_model("minilm-l6")
    dense, tok, adapter = loaded.model, loaded.tokenizer, loaded.adapter
    splits = load_splits("shakespeare")
    if args.sentence_windows:
        # sentence-shaped calibration: calibration-split lines, each as "[CLS] line [SEP]", packed into windows
        cal_lines = [ln.strip() for ln in splits.calibration.splitlines() if len(ln.split()) >= args.min_words]
        packed = torch.tensor([t for ids in tok(cal_lines)["input_ids"] for t in ids], dtype=torch.long)
        windows = calibration_windows(packed, args.calibration, args.length, 0)
    else:
        windows = calibration_windows(tokenize(tok, splits.calibration), args.calibration, args.length, 0)
    lines = [ln.strip() for ln in splits.evaluation.splitlines() if len(ln.split()) >= args.min_words][: args.lines]
    ref = sentence_embeddings(dense, tok, lines)

    def similarity(model: torch.nn.Module) -> dict[str, float]:
        cos = F.cosine_similarity(sentence_embeddings(model, tok, lines), ref, dim=-1)
        return {"mean_cosine": round(float(cos.mean()), 5), "min_cosine": round(float(cos.min()), 5)}

    student = copy.deepcopy(dense)
    ctx = PassContext(adapter, calibration=lambda: windows, progress=True, teacher=lambda: dense)
    t0 = time.perf_counter()
    sres = StructuredPass(StructuredConfig(heads=args.heads)).run(student, ctx)
    prune_s = time.perf_counter() - t0
    before = similarity(student)
    log.info("pruned: %s", before)
    dres = DistillPass(DistillConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, hidden_mse=1.0, warmup_steps=10)).run(student, ctx)
    after = similarity(student)
    log.info("recovered: %s", after)

    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    fd, fs = FlopsModel.of(dense, adapter), FlopsModel.of(student, adapter)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"dense": Path(tmp) / "dense.onnx", "heads": Path(tmp) / "heads.onnx"}
        export_onnx(dense, "encoder", paths["dense"], 18, "torchscript")
        export_onnx(student, "encoder", paths["heads"], 18, "torchscript")
        eng = OnnxRuntimeCpuEngine({})
        with eng.open(paths["dense"], spinning=False, name="dense") as rd, eng.open(paths["heads"], spinning=False, name="heads") as rh:
            pts = interleaved_latency({"dense": rd, "heads": rh}, shapes, int(dense.config.vocab_size), warmup=3, repeats=args.repeats)
    latency = []
    for p in pts["heads"]:
        ideal = fd.forward(p.batch, p.sequence)["total"] / fs.forward(p.batch, p.sequence)["total"]
        speed = p.dense_ms / p.variant_ms
        latency.append({**{k: v for k, v in p.to_dict().items() if not k.endswith("samples_ms")}, "speedup": round(speed, 4), "ideal": round(ideal, 4), "fraction_of_ideal": round(speed / ideal, 4)})
    out = {
        "model": "minilm-l6 (all-MiniLM-L6-v2)",
        "heads_removed_fraction": args.heads,
        "kept_heads_per_block": [k["heads"] for k in sres.info["kept"]],
        "parameters": {"dense": count_parameters(dense), "pruned": count_parameters(student)},
        "prune_seconds": round(prune_s, 1),
        "evaluation": f"{len(lines)} held-out lines (≥{args.min_words} words) of the Shakespeare evaluation split, mean-pooled embeddings",
        "cosine_before_recovery": before,
        "cosine_after_recovery": after,
        "recovery": {k: dres.info[k] for k in ("steps", "tokens", "train_seconds", "compute_dtype", "loss_first10", "loss_last10")}
        | {"batch_size": args.batch, "lr": args.lr, "calibration_windows": [args.calibration, args.length], "sentence_windows": args.sentence_windows},
        "latency_onnxruntime_cpu": latency,
    }
    write_result(args.out, out)
    print(json.dumps({k: out[k] for k in ("parameters", "cosine_before_recovery", "cosine_after_recovery", "latency_onnxruntime_cpu")}, indent=2))


if __name__ == "__main__":
    main()
