"""The `kdkernels` command line: `kdkernels cache|bench|demo ...`.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `main(args) -> int`;
they are imported only when their subcommand is parsed, so `kdkernels --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "demo": ("kdkernels.demo", "distill a small student from a real teacher on CPU, end to end"),
    "cache": ("kdkernels.cache.cli", "build, inspect and verify teacher caches"),
    "bench": ("kdkernels.bench.cli", "benchmark the kernels against naive PyTorch and others"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="kdkernels", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (_, help_) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] not in SUBCOMMANDS:
        args = parser.parse_args(argv)
        if args.version:
            from . import __version__
            print(__version__)
            return 0
        parser.print_help()
        return 0 if not argv else 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    sub_parser = argparse.ArgumentParser(prog=f"kdkernels {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(sub_parser)
    return int(module.main(sub_parser.parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())
