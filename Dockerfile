# syntax=docker/dockerfile:1
# streamrec worker image (also runs replay / generate / pretrain: ENTRYPOINT is the CLI).
#
#   docker build -t streamrec .                                   # CPU torch
#   docker build -t streamrec:gpu \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .   # CUDA torch
FROM python:3.11-slim

# torch comes from its own index, pinned, before anything else: an open torch range from
# PyPI would pull a multi-GB CUDA build. TORCH_INDEX picks the CPU or a CUDA build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN groupadd --system --gid 10001 streamrec \
    && useradd --system --uid 10001 --gid streamrec --home-dir /app \
       --shell /usr/sbin/nologin streamrec \
    && python -m venv /opt/venv \
    && mkdir -p /app /data/worker /data/out /models \
    && chown -R streamrec:streamrec /app /data /models

WORKDIR /app

# 1. torch alone: the biggest layer, rebuilt only when TORCH_VERSION/TORCH_INDEX change
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

# 2. the project's dependencies from pyproject.toml only: cached until it changes
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# 3. the source, then the project itself (its dependencies are already there)
COPY README.md ./
COPY stream ./stream
COPY learners ./learners
COPY index ./index
COPY monitoring ./monitoring
COPY modelstore ./modelstore
COPY features ./features
COPY logs ./logs
COPY serving ./serving
RUN pip install --no-deps . && rm -rf build *.egg-info

USER streamrec

# the feature stage's compiled kernel (numba), compiled once into the image
ENV NUMBA_CACHE_DIR=/app/.numba-cache
RUN python -c "from features.stage import FeatureStage; FeatureStage().process([])" \
    && python -c "from features.stage import FeatureStage; FeatureStage().impression('w', 1.0, 'u', 'i')"

# the worker's settings (STREAMREC_<KEY>); compose sets STREAMREC_BROKER
ENV STREAMREC_METRICS_HOST=0.0.0.0 \
    STREAMREC_METRICS_PORT=9464 \
    STREAMREC_DATA_DIR=/data/worker

EXPOSE 9464

HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('STREAMREC_METRICS_PORT', '9464'), timeout=4)"]

ENTRYPOINT ["streamrec"]
CMD ["worker"]
