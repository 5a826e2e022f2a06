"""Run every benchmark: ``python -m benchmarks [--only NAME ...]``.

Each module benchmarks/bench_*.py exposes ``run() -> list[dict]`` (CSV rows, already
appended and plotted by the module itself)."""
import argparse
import importlib
import pkgutil

import benchmarks


def main():
    modules = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__)
                     if m.name.startswith("bench_"))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", choices=modules, help="run only these modules")
    args = parser.parse_args()
    for name in args.only or modules:
        print(f"== {name}", flush=True)
        importlib.import_module(f"benchmarks.{name}").run()


if __name__ == "__main__":
    main()
