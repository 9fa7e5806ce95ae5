#!/usr/bin/env bash
# Run HERE (a machine with PyPI) before a GPU run: the GPU machine has PyTorch, SciPy, PyYAML, typer and rich
# but no MONAI, nibabel or SimpleITK, and no network. This downloads those as Python 3.12 wheels into .whl/
# (kept out of git through .git/info/exclude), which the device tool then carries: `carry: [".whl"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
# dynamic_network_architectures: nnU-Net's networks, pure Python (its unet module imports only torch), for
# benchmarks/nnunet_network.py
for pkg in "monai==1.6.1" "nibabel==5.4.2" "SimpleITK==2.5.7" "dynamic_network_architectures==0.4.4"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pkg"
done
du -sh .whl
