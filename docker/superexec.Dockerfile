# The SuperExec image: it runs this app's ServerApp (connected to the SuperLink) or one SuperNode's
# ClientApp (connected to that SuperNode); Flower 1.41 picks the role from the Runtime API it is
# given. `flwr run` ships the app's code; the image holds its dependencies. Build context: the
# repository root (compose.yaml sets it).
FROM flwr/superexec:1.41.0

WORKDIR /app
COPY --chown=app:app pyproject.toml docker/requirements.py ./
# torch/torchvision as CPU wheels first, then every other [project] dependency except flwr, which
# the base image holds (its [simulation] extra, Ray, is only for simulation).
RUN python requirements.py --torch > torch.txt \
    && python requirements.py > app.txt \
    && python -m pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu -r torch.txt \
    && python -m pip install --no-cache-dir -r app.txt
# Mount points owned by the image's user `app`: an empty named volume mounted here takes this
# ownership, so the ClientApp can write its personal state and the ServerApp its outputs.
RUN mkdir -p /app/state /app/outputs
