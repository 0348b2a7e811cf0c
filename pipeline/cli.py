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
from pipeline.errors import PipelineError

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
    b.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    c = sub.add_parser("check", help="validate a recipe without building anything")
    c.add_argument("recipe", nargs="?", default=None)
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    _setup_logging(getattr(args, "verbose", False))
    try:
        from pipeline.recipe import load_recipe

        t0 = time.perf_counter()
        recipe = load_recipe(args.recipe)
        log.info("recipe '%s' is valid (%d variants) [%.2f s]", recipe.name, len(recipe.variants), time.perf_counter() - t0)
        if args.command == "check":
            print(f"recipe '{recipe.name}' is valid: variants {', '.join(v.name for v in recipe.variants)}")
            return 0
        from pipeline.build import build
        from pipeline.report import terminal_table

        summary = build(recipe, args.output)
        print(terminal_table(summary.results))
        print(f"\nreport: {summary.report_path}")
        return 0
    except PipelineError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; finished stages are kept and the next run resumes from them")
        return 130
