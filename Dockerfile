# The aptserve GPU image: a builder stage makes the wheel and a venv from the hash-checked lock; the runtime stage
# holds that venv, the shipped default checkpoint, a C compiler and the Python headers (Triton builds a small
# launcher at run time) and runs as a non-root user.
#
#   docker build -t aptserve .
#   docker run --gpus all -p 8000:8000 -v aptserve-data:/data aptserve
#
# torch's CUDA 13 wheels bring their own CUDA libraries, so the base image only has to meet the NVIDIA container
# runtime contract (the host needs driver 580 or newer). Both stages use the same base so that the venv's
# /usr/bin/python3.12 is the same interpreter in each. tests/test_install.py replays this file's install commands.

FROM nvidia/cuda:13.0.2-base-ubuntu24.04 AS builder

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# The CUDA lock pins Python 3.12 x86_64 wheels; a CPU image can pass --build-arg LOCK=requirements/serve-cpu.lock
# only with a Python 3.11 base, which is what tests/test_install.py does on its own interpreter.
ARG LOCK=requirements/serve-cuda.lock
COPY requirements/ requirements/
RUN python3.12 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --require-hashes --no-deps -r "$LOCK"

COPY pyproject.toml README.md ./
COPY aptserve/ aptserve/
RUN /opt/venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /tmp/wheels . \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps /tmp/wheels/aptserve-*.whl

FROM nvidia/cuda:13.0.2-base-ubuntu24.04

# gcc and libc6-dev compile Triton's launcher against the headers in libpython3.12-dev.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 libpython3.12-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# Ubuntu's image already has uid 1000 (ubuntu); ours has a fixed numeric id (so Kubernetes' runAsNonRoot can check
# it) and a home for Triton's and torch's caches.
RUN groupadd --gid 10001 aptserve \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/aptserve aptserve \
    && mkdir -p /data \
    && chown aptserve:aptserve /data

COPY --from=builder /opt/venv /opt/venv
COPY models/shapes-apt-tiny /opt/aptserve/models/shapes-apt-tiny
# the default's distilled light decoder (--decoder light), which its config.json names
COPY models/shapes-decoder-light-tiny /opt/aptserve/models/shapes-decoder-light-tiny

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    APTSERVE_MODELS_DIR=/opt/aptserve/models \
    APTSERVE_DATA_DIR=/data

USER 10001:10001
WORKDIR /home/aptserve
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

ENTRYPOINT ["aptserve", "serve", "--host", "0.0.0.0"]
