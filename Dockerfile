# One image for every role: `recast api`, `recast worker`, `recast beat` (the command picks it).
#   docker build -t recast .                      # CUDA torch for GPU workers (default)
#   docker build -t recast:cpu --build-arg VARIANT=cpu .   # CPU-only torch, a much smaller image
# No secret is baked in: tokens, credentials and URLs come from the environment at run time.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG VARIANT=cuda
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/recast
ENV PATH=/opt/recast/bin:$PATH
# torch first and pinned, so the project's range installs nothing more; the CPU variant uses the CPU index.
RUN if [ "$VARIANT" = "cpu" ]; then \
      pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu; \
    elif [ "$VARIANT" = "cuda" ]; then \
      pip install "torch==${TORCH_VERSION}"; \
    else echo "VARIANT must be cuda or cpu, not $VARIANT" >&2; exit 1; fi
COPY pyproject.toml README.md /src/
COPY core /src/core
COPY recast /src/recast
COPY service /src/service
COPY worker /src/worker
RUN pip install /src

FROM ${PYTHON_IMAGE} AS runtime
ARG VARIANT=cuda
LABEL org.opencontainers.image.title="recast" \
      org.opencontainers.image.description="Checkpoint conversion service (${VARIANT})"
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/recast recast \
 && mkdir -p /scratch && chown recast:recast /scratch
COPY --from=build /opt/recast /opt/recast
ENV PATH=/opt/recast/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RECAST_SCRATCH_DIR=/scratch
USER 10001:10001
WORKDIR /home/recast
EXPOSE 8000
# The API's liveness; worker and beat containers override or disable it (they serve no HTTP).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["recast"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]
