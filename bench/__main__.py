"""`python -m bench`: run the benchmark against the local target and print the table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.link import PROFILES
from bench.run import Bench, Options


def parse_args(argv: list[str]) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time trainstack's sync, fetch, logs and task start-up against plain rsync, "
        "tar over ssh and a fresh `ssh host true`, in one run, on the local target.",
    )
    parser.add_argument("--runs", type=int, default=5, help="runs per command (default 5); the table shows the median")
    parser.add_argument("--quick", action="store_true", help="a smaller project (850 files, 18 MiB) for a fast check")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated project (default 1)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every sample as JSON")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="also write the tables as Markdown")
    parser.add_argument("--results-mb", type=int, default=None,
                        help="size of the results fetched (default 200, 40 with --quick)")
    parser.add_argument("--tmpdir", type=Path, help="where the workspace goes (default /dev/shm when it has room)")
    parser.add_argument("--keep", action="store_true", help="keep the workspace for inspection")
    parser.add_argument("--link", choices=sorted(PROFILES), default="loopback",
                        help="the path every client takes to the machine: loopback (default), or an emulated "
                        "internet path — home (40 ms RTT, 20 Mbit/s up, 100 down), office (10 ms, 200 both ways)")
    parser.add_argument("--only", action="append", choices=Bench.SCENARIOS, default=[],
                        help="run only this scenario (repeatable; the first sync runs too unless only startup is chosen)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.tmpdir is not None and not args.tmpdir.is_dir():
        parser.error(f"--tmpdir {args.tmpdir} is not a directory")
    results = args.results_mb if args.results_mb is not None else (40 if args.quick else 200)
    if results < 1:
        parser.error("--results-mb must be at least 1")
    options = Options(runs=args.runs, quick=args.quick, seed=args.seed, results_mib=results,
                      tmpdir=args.tmpdir, keep=args.keep, only=tuple(args.only),
                      json_path=args.json, markdown_path=args.markdown, link=PROFILES[args.link])
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_args(sys.argv[1:] if argv is None else argv)
    from bench import report

    bench = Bench(options, say=lambda line: print(line, flush=True))
    try:
        outcome = bench.run()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    report.print_rich(outcome)
    if options.json_path is not None:
        report.write_json(outcome, options.json_path)
        print(f"wrote {options.json_path}")
    if options.markdown_path is not None:
        options.markdown_path.parent.mkdir(parents=True, exist_ok=True)
        options.markdown_path.write_text(report.markdown(outcome))
        print(f"wrote {options.markdown_path}")
    for error in outcome.errors:
        print(f"error: {error}", file=sys.stderr)
    # Missed timing targets are results, not failures; a broken scenario or a wrong tree is.
    return 1 if outcome.errors or outcome.trees_wrong else 0


if __name__ == "__main__":
    sys.exit(main())
