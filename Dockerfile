# segpipe inference image: `docker run ... segpipe:cpu infer --model /model /input --out /output`
#
#   docker build -t segpipe:cpu .                                  # CPU (python:3.11-slim, CPU torch)
#   docker build --build-arg VARIANT=gpu -t segpipe:gpu .          # GPU (CUDA torch from PyPI)
#   docker run --rm --network none -v RUN:/model:ro -v STUDY:/input:ro -v OUT:/output segpipe:cpu \
#       infer --model /model /input --out /output
#
# BASE_IMAGE may be any Debian-like image with Python 3.11 and venv (scripts/container_smoke.sh builds one
# with debootstrap where no registry can be reached). A folder of wheels mounted at /wheels at build time
# (podman build -v DIR:/wheels:ro) is used instead of the network for torch.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/segpipe \
    PATH=/opt/segpipe/bin:$PATH \
    MPLCONFIGDIR=/tmp

RUN python3 -m venv /opt/segpipe

# torch first: a local wheel when one is mounted, else the CPU index (or PyPI's CUDA build for VARIANT=gpu)
RUN if ls /wheels/torch-"${TORCH_VERSION}"*.whl >/dev/null 2>&1; then \
        pip install --no-deps /wheels/torch-"${TORCH_VERSION}"*.whl && pip install "torch==${TORCH_VERSION}" --find-links /wheels; \
    elif [ "${VARIANT}" = "gpu" ]; then \
        pip install "torch==${TORCH_VERSION}"; \
    else \
        pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_CPU_INDEX}" --extra-index-url https://pypi.org/simple; \
    fi

WORKDIR /src
COPY pyproject.toml README.md ./
COPY segpipe ./segpipe
COPY cli ./cli
COPY configs ./configs
RUN pip install --find-links /wheels . \
    && python -c "import segpipe, monai, nibabel, SimpleITK, highdicom" \
    && rm -rf /src

COPY docker/model /model
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin segpipe \
    && mkdir -p /input /output \
    && chown 1000:1000 /output
USER 1000:1000
WORKDIR /home/segpipe

ENTRYPOINT ["segpipe"]
CMD ["--help"]
