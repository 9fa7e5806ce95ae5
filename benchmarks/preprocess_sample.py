"""Preprocessing the real ISLES 2022 case: seconds per case and peak memory.

Runs `preprocess_dataset` on ../shared/data/isles22_sample (3 channels; FLAIR 512x512x29 resampled onto the
DWI grid) in a fresh process, and reports the time and the peak resident memory above the interpreter with
its libraries loaded (warmed up on a tiny synthetic case first). Target: peak growth within 4x the case's
float32 size (all its input volumes as float32).

``--synthetic X Y Z`` preprocesses a synthetic ISLES-like case of that shape instead (three channels on one
grid, no resampling; e.g. ``192 224 192``: a 1 mm head, where the head mask and the normalisation weigh most).

    python -m benchmarks.preprocess_sample [--repeat 3] [--synthetic X Y Z]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._common import save

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "isles22_sample"

CHILD = r"""
import json, resource, sys, time, shutil
from pathlib import Path
import nibabel as nib, numpy as np
from segpipe.config import load_config
from segpipe.data.layouts import discover
from segpipe.data.preprocess import preprocess_dataset
root, out, repeat = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
def peak_rss():
    # this process's own high-water mark: Linux keeps ru_maxrss across fork and exec, so a child started by a
    # process that had grown larger (python -m benchmarks after another benchmark) would read its parent's;
    # VmHWM belongs to the address space, which exec makes anew
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
m = discover(root)
files = [m.image_path(m.cases[0], c) for c in m.channels] + [m.label_path(m.cases[0])]
float32_bytes = sum(int(np.prod(nib.load(str(f)).shape)) * 4 for f in files)
cfg = load_config(None, [])
# warm up on a tiny synthetic case, so that every library (SimpleITK alone is ~80 MB) is loaded before the
# baseline is taken: the growth measured below is what a case costs, not what importing costs
from segpipe.data.synthetic import synthesize
synthesize(out.parent / "warm", "isles22", cases=1, seed=0, shape=(24, 24, 16))
preprocess_dataset(discover(out.parent / "warm"), cfg, out.parent / "warm_cache")
base = peak_rss()
times = []
for i in range(repeat):
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    preprocess_dataset(m, cfg, out)
    times.append(time.perf_counter() - t)
peak = peak_rss()
print(json.dumps({"seconds": sorted(times)[len(times) // 2], "baseline_rss": base, "peak_rss": peak, "case_float32_bytes": float32_bytes}))
"""


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--synthetic", type=int, nargs=3, metavar=("X", "Y", "Z"), help="a synthetic case of this shape instead")
    args = ap.parse_args(argv)
    if args.synthetic is None and not (SAMPLE / "rawdata").is_dir():
        print(f"skipped: the real ISLES 2022 sample is not at {SAMPLE}")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        root = SAMPLE
        if args.synthetic is not None:
            root = Path(tmp) / "synthetic"
            # in a process of its own, so that this one stays small (see peak_rss in the child)
            subprocess.run([sys.executable, "-c", "import sys; from segpipe.data.synthetic import synthesize; "
                            "synthesize(sys.argv[1], 'isles22', cases=1, seed=0, shape=[int(v) for v in sys.argv[2:]])",
                            str(root), *map(str, args.synthetic)], check=True)
        proc = subprocess.run([sys.executable, "-c", CHILD, str(root), str(Path(tmp) / "cache"), str(args.repeat)],
                              capture_output=True, text=True, check=True)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = r["peak_rss"] - r["baseline_rss"]
    limit = 4 * r["case_float32_bytes"]
    result = {
        "seconds_per_case": round(r["seconds"], 2),
        "peak_rss_mb": round(r["peak_rss"] / 2**20, 1),
        "interpreter_rss_mb": round(r["baseline_rss"] / 2**20, 1),
        "growth_mb": round(growth / 2**20, 1),
        "case_float32_mb": round(r["case_float32_bytes"] / 2**20, 1),
        "growth_over_case_float32": round(growth / r["case_float32_bytes"], 2),
        "within_4x": growth <= limit,
    }
    what = "synthetic ISLES-like case " + "x".join(map(str, args.synthetic)) if args.synthetic else "real ISLES 2022 case"
    print(f"preprocess {what} (dwi, adc, flair): {r['seconds']:.2f} s per case; peak RSS "
          f"{result['peak_rss_mb']} MB = interpreter {result['interpreter_rss_mb']} MB + {result['growth_mb']} MB "
          f"({result['growth_over_case_float32']}x the case's float32 size of {result['case_float32_mb']} MB; target <= 4x)")
    save("preprocess_synthetic" if args.synthetic else "preprocess_sample", result)
    return result


if __name__ == "__main__":
    main()
