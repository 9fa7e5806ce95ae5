#!/usr/bin/env bash
# Build the inference image with podman and segment, inside it and with no network, the real ISLES 2022
# case (../shared/data/isles22_sample, when present) and a synthetic DICOM export.
#
# Works where no Docker engine runs and no base image can be pulled: the base image is made with
# debootstrap (Debian bookworm, Python 3.11) and imported; podman runs with runc and a containers.conf given
# through CONTAINERS_CONF; at build time the host's CA bundle is mounted (PIP_CERT points pip at it) and the
# CPU torch wheel is installed from a mounted folder (PyPI's Linux torch is the CUDA build).
#
#   scripts/container_smoke.sh            # exit 0: passed; 77: podman (or the recipe's tools) missing
#
# Environment: SEGPIPE_WHEELS (folder with the torch CPU wheel; default /opt/wheels when it holds one),
# SEGPIPE_CONTAINER_CACHE (where the debootstrap root is kept between runs), PYTHON (to train the tiny model).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null 2>&1 || { echo "skip: $tool not installed (apt-get install -y podman runc debootstrap)"; exit 77; }
done
PYTHON=${PYTHON:-python3}
cache=${SEGPIPE_CONTAINER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/segpipe-container}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$cache"

cat > "$work/containers.conf" <<'CONF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF="$work/containers.conf"

base=segpipe-base:bookworm
if ! podman image exists "$base"; then
  if [ ! -x "$cache/rootfs/usr/bin/python3" ]; then
    echo "== debootstrap bookworm (once)"
    rm -rf "$cache/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$cache/rootfs" \
      http://deb.debian.org/debian > "$cache/debootstrap.log"
  fi
  echo "== import the base image"
  tar -C "$cache/rootfs" -c . | podman import - "$base" > /dev/null
fi

wheels=${SEGPIPE_WHEELS:-}
if [ -z "$wheels" ] && compgen -G "/opt/wheels/torch-*cp311*.whl" > /dev/null; then wheels=/opt/wheels; fi
mounts=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
[ -n "$wheels" ] && mounts+=(-v "$wheels":/wheels:ro)

echo "== build segpipe:cpu"
podman build --network host "${mounts[@]}" \
  --build-arg BASE_IMAGE="$base" --build-arg PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
  --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt -t segpipe:cpu . > "$work/build.log" 2>&1 \
  || { tail -30 "$work/build.log"; exit 1; }

echo "== a tiny model and a synthetic DICOM export (on the host)"
$PYTHON -m cli.main -q synth "$work/raw" --layout isles22 --cases 3 --seed 1 --shape 40,40,28
$PYTHON -m cli.main -q manifest "$work/raw" --out "$work/m.json"
$PYTHON -m cli.main -q preprocess -m "$work/m.json" -o "$work/cache" -c configs/demo.yaml plan.patch_size=[32,32,32]
$PYTHON -m cli.main -q train --cache "$work/cache" --out "$work/run" --fold all --epochs 1 train.iterations_per_epoch=2
$PYTHON -m cli.main -q synth "$work/dicom" --layout isles22 --cases 1 --seed 9 --shape 40,40,28 --format dicom
mkdir -p "$work/out_dicom" "$work/out_nifti"
chmod 777 "$work/out_dicom" "$work/out_nifti"

run() {  # no network, read-only model and input, non-root user
  podman run --rm --network none -v "$work/run":/model:ro "$@"
}
echo "== segment the DICOM export in the container (--network none)"
run -v "$work/dicom/strokecase0001":/input:ro -v "$work/out_dicom":/output segpipe:cpu \
  infer --model /model /input --out /output --no-tta --dicom-overlay
test -s "$work/out_dicom/input.nii.gz" && test -s "$work/out_dicom/input_seg.dcm" && test -s "$work/out_dicom/input_sr.dcm"
$PYTHON - "$work/out_dicom/input_seg.dcm" "$work/out_dicom/input_sr.dcm" "$work/out_dicom/input_overlay" <<'PY'
import pathlib, sys, pydicom
ds = pydicom.dcmread(sys.argv[1])
assert ds.Modality == "SEG" and int(ds.NumberOfFrames) > 0, ds.Modality
print(f"DICOM SEG ok: {ds.NumberOfFrames} frames, segment '{ds.SegmentSequence[0].SegmentLabel}'")
sr = pydicom.dcmread(sys.argv[2])
assert sr.Modality == "SR" and sr.StudyInstanceUID == ds.StudyInstanceUID, sr.Modality
print("DICOM SR ok")
copies = [pydicom.dcmread(f) for f in sorted(pathlib.Path(sys.argv[3]).iterdir())]
assert len(copies) == int(ds.NumberOfFrames) and all(c.overlay_array(0x6000).shape == c.pixel_array.shape for c in copies)
print(f"overlay series ok: {len(copies)} images")
PY
echo "== which model the container runs"
run segpipe:cpu inspect /model | tee "$work/inspect.txt"
grep -q "sha256 $($PYTHON -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$work/run/checkpoint_best.pt")" "$work/inspect.txt"

sample="$repo/../shared/data/isles22_sample/rawdata/sub-strokecase0009/ses-0001"
if [ -d "$sample" ]; then
  echo "== segment the real ISLES 2022 case in the container (--network none)"
  run -v "$sample":/input:ro -v "$work/out_nifti":/output segpipe:cpu infer --model /model /input --out /output --no-tta
  test -s "$work/out_nifti/input.nii.gz"
  $PYTHON - "$work/out_nifti/input.nii.gz" "$sample/sub-strokecase0009_ses-0001_dwi.nii.gz" <<'PY'
import sys, nibabel as nib, numpy as np
m, r = nib.load(sys.argv[1]), nib.load(sys.argv[2])
assert m.shape == r.shape and np.allclose(m.affine, r.affine, atol=1e-4), (m.shape, r.shape)
print(f"NIfTI ok: {m.shape}, the DWI's geometry")
PY
else
  echo "(the real ISLES sample is not at ../shared: only the DICOM export was segmented)"
fi
podman run --rm --network none segpipe:cpu --version
podman run --rm --network none --entrypoint python segpipe:cpu -c \
  "from segpipe.config import builtin_configs as b; n = sorted(b()); assert n == ['demo', 'isles18', 'isles22', 'wmh17'], n; print('built-in configs:', *n)"
echo "container smoke test passed"
