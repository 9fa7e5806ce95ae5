# Sourced by the GPU scripts: install the carried wheels (benchmarks/gpu_wheels.sh) and set PYTHONPATH,
# OUT's folder in $dest, unbuffered output, and print the GPU.
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
dest="${OUT:-benchmarks/results}"
mkdir -p "$dest"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
