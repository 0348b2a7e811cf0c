"""A variant's native-cpu decode in a loop, for a profiler to sample (it writes no result file): the
variant's saved model built into a native artifact (once, under ``--work``), then ``--rounds`` greedy
generations of ``--new`` tokens after a ``--prompt``-token prompt, each round's mean ms/token printed.

    perf record -e cpu-clock -F 5000 -g -o build/perf.data python benchmarks/decode_loop.py build/quant-native-b128 dense --rounds 20
    perf report -i build/perf.data --no-children --sort sym -g none

Samples of a prefill and of the artifact's load are in the profile too (a few percent with the
defaults); attribute the kernels' shares accordingly."""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build", type=Path, help="a build directory whose variant has a saved model (VARIANT/model/model)")
    ap.add_argument("variant")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--float-kernel", action="store_true", help="the 16-bit-activation kernels off (engines.native.int16_activations)")
    ap.add_argument("--with", dest="options", action="append", default=[], metavar="OPTION=VALUE",
                    help="build the artifact with this native-cpu engine option (a YAML value; repeatable), e.g. int8_activations=true")
    ap.add_argument("--isa", default=None, help="force native-cpu's instruction set, no better than the CPU's (scalar, avx2+fma, avx512f)")
    ap.add_argument("--work", type=Path, default=None, help="where the artifact is built (default: BUILD/VARIANT/decode-loop)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import numpy as np

    from engines import native
    from engines.native_cpu import NativeCpuEngine

    model = args.build / args.variant / "model" / "model"
    if not model.is_dir():
        sys.exit(f"decode_loop: {model} is not a saved model directory (build the variant first)")
    work = args.work or args.build / args.variant / "decode-loop"
    work.mkdir(parents=True, exist_ok=True)
    import yaml

    options = {"threads": args.threads}
    for item in args.options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            sys.exit(f"decode_loop: --with {item!r}: expected OPTION=VALUE")
        options[key] = yaml.safe_load(value)
    if args.isa:
        native.set_isa(args.isa)  # before the artifact is opened: weights hold the layouts this instruction set reads
    engine = NativeCpuEngine(options)
    art = engine.build(model, work)
    native.int16_activations(not args.float_kernel)
    prompt = (np.arange(args.prompt, dtype=np.int64)[None] * 7919) % 1000 + 100
    with engine.runner(art, threads=args.threads) as r:
        r.generate(prompt, 8)  # warm-up
        means = []
        for i in range(args.rounds):
            means.append(statistics.mean(r.generate(prompt, args.new).decode_ms))
            print(f"round {i + 1}/{args.rounds}: {means[-1]:.3f} ms/token", flush=True)
    print(f"{args.variant}: median {statistics.median(means):.3f} ms/token over {args.rounds} rounds")


if __name__ == "__main__":
    main()
