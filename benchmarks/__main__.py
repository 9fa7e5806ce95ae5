"""Run the benchmarks: ``python -m benchmarks [NAME ...] [--quick]``.

Each benchmark runs its baseline in the same process, prints one or two lines with the ratio, and writes a
JSON file under ``benchmarks/results/``. Names: see ``BENCHMARKS``. The GPU training benchmark runs on its
own (``benchmarks/gpu_train.sh`` on a GPU machine).
"""

from __future__ import annotations

import argparse
import importlib
import time

BENCHMARKS = {
    "distance_maps": (["--repeat", "3"], ["--repeat", "1", "--shape", "96", "112", "96"]),
    "preprocess_sample": (["--repeat", "3"], ["--repeat", "1"]),
    "loss_overhead": ([], ["--size", "48", "--repeat", "1"]),
    "loader": ([], ["--batches", "3"]),
    "infer_e2e": ([], ["--repeat", "1", "--tta", "off"]),
    "dicom_scan": (["--series", "20", "--files", "100"], ["--series", "4", "--files", "20", "--repeat", "1"]),
    "infer_dataset": (["--cases", "4", "--shape", "128", "128", "96"], ["--cases", "2", "--shape", "64", "64", "48"]),
    # needs nnU-Net (pip install -e ".[compare]"); says so and skips without it
    "nnunet_preprocess": (["--data", "isles", "--cases", "8", "24"], ["--cases", "2", "4"]),
    "nnunet_network": ([], ["--patch", "32", "--repeat", "1"]),
    "nnunet_infer": (["--repeat", "3"], ["--repeat", "1", "--cases", "1", "2"]),
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description="Run segpipe's benchmarks (CPU or GPU).")
    ap.add_argument("names", nargs="*", help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (a smoke run)")
    args = ap.parse_args(argv)
    names = args.names or list(BENCHMARKS)
    for name in names:
        if name not in BENCHMARKS:
            ap.error(f"unknown benchmark '{name}'; choose from {', '.join(BENCHMARKS)}")
    for name in names:
        full, quick = BENCHMARKS[name]
        print(f"== {name}")
        t = time.perf_counter()
        importlib.import_module(f"benchmarks.{name}").main(quick if args.quick else full)
        print(f"   ({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
