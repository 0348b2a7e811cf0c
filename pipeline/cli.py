"""Command line: ``python -m pipeline build [RECIPE]``.

The CLI parses arguments into config objects and hands them down; library code
never sees argparse. Output for people (the summary table) is printed here;
everything else is logged.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from pipeline import __version__
from core.errors import PipelineError

log = logging.getLogger("pipeline")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Prune transformer models, export to ONNX, build engines and report accuracy/latency vs the dense baseline.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    b = sub.add_parser("build", help="build every variant of a recipe and write the report", description="Build every variant of RECIPE (default: the shipped 'default' recipe on the bundled SmolLM2) and write results.json, report.md and report.html.")
    b.add_argument("recipe", nargs="?", default=None, help="recipe YAML file, or the name of a shipped recipe (default: default)")
    b.add_argument("--output", "-o", type=Path, default=None, help="build directory (default: build/<recipe name>)")
    b.add_argument("--verbose", "-v", action="store_true", help="debug logging, and the traceback of an error")
    b.add_argument(
        "--executor", default="serial",
        help="serial (default), or ray: each variant's model/ONNX/engine/validation stages as Ray tasks (a local Ray with "
             "this machine's CPUs, or RAY_ADDRESS's cluster; ray://HOST:PORT for another), then timing and the report here",
    )
    pr = sub.add_parser(
        "prune", help="prune every variant of a recipe into Hugging Face directories (no ONNX, engines or report)",
        description="Run only the passes of every variant of RECIPE — block by block from disk where model.stream says so — "
                    "and write each pruned model as a Hugging Face directory, with prune.json; for models whose export "
                    "and validation do not fit on this machine.",
    )
    pr.add_argument("recipe", nargs="?", default=None)
    pr.add_argument("--output", "-o", type=Path, default=None, help="build directory (default: build/<recipe name>)")
    pr.add_argument("--perplexity", action="store_true", help="also evaluate every variant and the dense model block-streamed on the evaluation windows")
    pr.add_argument("--verbose", "-v", action="store_true", help="debug logging, and the traceback of an error")
    c = sub.add_parser(
        "check", help="validate a recipe without building anything",
        description="Check RECIPE without loading a model: every key and option, each pass against the model's config and the data, and the build's memory and disk estimate.",
    )
    c.add_argument("recipe", nargs="?", default=None)
    c.add_argument("--output", "-o", type=Path, default=None, help="build directory whose free disk space is checked (default: build/<recipe name>)")
    c.add_argument("--verbose", "-v", action="store_true", help="debug logging, and the traceback of an error")
    i = sub.add_parser(
        "inspect",
        help="per-weight sparsity report of an ONNX model (TensorRT's 2:4 rules)",
        description="For every MatMul/Gemm/Conv weight: sparsity, whether it is 2:4 along TensorRT's reduction axis, and whether TensorRT could run it sparse.",
    )
    i.add_argument("model", type=Path, help="ONNX file")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("transformers", "torch", "onnxscript", "onnx_ir", "httpx", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notices


def _inspect(model: Path, as_json: bool) -> int:
    import json

    from export.sparsity_report import render_table, sparsity_report

    if not model.is_file():
        log.error("ONNX file '%s' does not exist", model)
        return 1
    try:
        rows = sparsity_report(model)
    except Exception as exc:  # onnx raises DecodeError and others for a file that is not ONNX
        log.error("'%s' could not be read as an ONNX model: %s", model, exc)
        return 1
    print(json.dumps([r.to_dict() for r in rows], indent=2) if as_json else render_table(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    verbose = getattr(args, "verbose", False)
    _setup_logging(verbose)
    if args.command == "inspect":
        return _inspect(args.model, args.json)
    try:
        from pipeline.recipe import load_recipe

        t0 = time.perf_counter()
        recipe = load_recipe(args.recipe)
        if args.command == "check":
            from pipeline.checks import check_recipe

            est = check_recipe(recipe, args.output)
            print(f"recipe '{recipe.name}' is valid: variants {', '.join(v.name for v in recipe.variants)} [{time.perf_counter() - t0:.2f} s]")
            if est is not None:
                print(est)
            return 0
        log.info("recipe '%s' is valid (%d variants) [%.2f s]", recipe.name, len(recipe.variants), time.perf_counter() - t0)
        if args.command == "prune":
            from pipeline.build import Builder

            result = Builder(recipe, args.output).prune(perplexity=args.perplexity)
            for row in result["variants"]:
                extra = f"  sparsity {row['sparsity']:.3f}{'  streamed' if row.get('streamed') else ''}" if "sparsity" in row else ""
                ppl = f"  perplexity {row['perplexity']:.4f}" if "perplexity" in row else ""
                print(f"{row['variant']:<24} {row['directory']}{extra}{ppl}")
            if result["peak_rss_bytes"]:
                print(f"peak resident memory: {result['peak_rss_bytes'] / 2**30:.2f} GiB")
            return 0
        from pipeline.build import build
        from pipeline.fanout import build_on_ray, parse_executor
        from pipeline.report import terminal_table

        executor, address = parse_executor(args.executor)
        summary = build(recipe, args.output) if executor == "serial" else build_on_ray(recipe, args.output, address)
        print(terminal_table(summary.results))
        print(f"\nreport: {summary.report_path}")
        return 0
    except PipelineError as exc:
        log.error("%s", exc, exc_info=exc if verbose else None)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; finished stages are kept and the next run resumes from them")
        return 130
    except Exception as exc:  # a bug of ours, not the user's input: still one line unless -v
        from core.errors import describe

        log.error("internal error (%s); run again with -v for the traceback", describe(exc), exc_info=exc if verbose else None)
        return 1
