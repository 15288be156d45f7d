# The one image of this app's Flower 1.41 deployment: SuperLink (`flower-superlink`), SuperNode
# (`flower-supernode`) and SuperExec (`flower-superexec`, the default entrypoint; it runs the
# ServerApp or one SuperNode's ClientApp) are entry points of the same pinned flwr, so one image
# serves every role and compose.yaml picks the role with `entrypoint:`. `flwr run` ships the app's
# code; the image holds its dependencies (pyproject.toml's pins), CPU only. Build context: the
# repository root (compose.yaml sets it); docs/deploy.md, "Docker".
#
# BASE_IMAGE: any image with python3 (and its venv module). Default: Flower's official
# flwr/superexec:1.41.0; where no registry is reachable, a local Debian base (docker/base-image.sh).
# TORCH_INDEX_URL: where the CPU torch wheels come from (PyTorch's CPU index); empty: PyPI, with
# docker/build-extra/wheels/ preferred (PyPI's Linux torch is a CUDA build: put a CPU wheel there). TORCH_REQUIREMENTS: empty = pyproject.toml's torch and torchvision
# pins; else the requirement(s) to install instead (space-separated), e.g. "torch==2.13.0".
# docker/build-extra/ (git-ignored but for its README) may hold ca-certificates.crt, a CA bundle
# pip trusts during the build only, and wheels/; both stay in the build stage, never in the image.
ARG BASE_IMAGE=flwr/superexec:1.41.0

FROM ${BASE_IMAGE} AS build
USER root
WORKDIR /build
COPY pyproject.toml docker/requirements.py ./
COPY docker/build-extra/ ./extra/
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_REQUIREMENTS=
RUN set -eu; \
    if [ -f extra/ca-certificates.crt ]; then export PIP_CERT=/build/extra/ca-certificates.crt; fi; \
    mkdir -p extra/wheels; \
    python3 -m venv /opt/fedlora; \
    pip="/opt/fedlora/bin/python -m pip install --no-cache-dir --disable-pip-version-check"; \
    if [ -n "$TORCH_REQUIREMENTS" ]; then printf '%s\n' $TORCH_REQUIREMENTS > torch.txt; \
    else python3 requirements.py --torch > torch.txt; fi; \
    if [ -n "$TORCH_INDEX_URL" ]; then source="--index-url $TORCH_INDEX_URL"; else source=""; fi; \
    $pip $source --find-links extra/wheels -r torch.txt; \
    python3 requirements.py --flwr > app.txt; \
    python3 requirements.py >> app.txt; \
    $pip -r app.txt -c torch.txt; \
    /opt/fedlora/bin/python -c "import flwr, torch; print('flwr', flwr.__version__, 'torch', torch.__version__)"

FROM ${BASE_IMAGE}
USER root
COPY --from=build /opt/fedlora /opt/fedlora
# The user `app` (Flower's images have it; uid 49999 as there) owns /app and the mount points:
# an empty named volume mounted at /app/state or /app/outputs takes this ownership. (No /app/data:
# compose.yaml bind-mounts the dataset there, a file or a folder.)
RUN (id app >/dev/null 2>&1 || useradd --uid 49999 --user-group --no-create-home --home-dir /app app) \
    && mkdir -p /app/state /app/outputs \
    && chown -R app:app /app
ENV PATH=/opt/fedlora/bin:$PATH \
    HOME=/app \
    FLWR_HOME=/app/.flwr \
    PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=1
WORKDIR /app
USER app
ENTRYPOINT ["flower-superexec"]
