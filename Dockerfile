# flowgen's runtime image: the package and its runtime dependencies on a CUDA PyTorch base (the
# dev extras -- pytest, ruff, hadolint, the cluster plugins -- stay out). Build and run:
#   docker build -t flowgen .
#   mkdir -p data logs
#   docker run --gpus all --rm --user "$(id -u):$(id -g)" \
#       -v "$PWD/data:/workspace/flowgen/data" -v "$PWD/logs:/workspace/flowgen/logs" \
#       flowgen python train.py model=glow data=cifar10
# data/ holds the datasets, logs/ the runs (checkpoints, samples, metrics): both stay on the host,
# owned by you (--user). wandb logs offline without credentials; add -e WANDB_API_KEY to log online.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/flowgen

WORKDIR /workspace/flowgen
COPY pyproject.toml README.md ./
COPY flowgen ./flowgen
# The package alone (no [dev]); torch and torchvision come with the base image. The home directory
# (wandb settings, matplotlib cache) and data/ and logs/ are writable by whichever uid --user picks.
RUN pip install --no-cache-dir -e . \
    && groupadd --gid 10001 flowgen \
    && useradd --no-log-init --uid 10001 --gid 10001 --create-home --home-dir /home/flowgen flowgen \
    && chmod 1777 /home/flowgen \
    && install -d -m 1777 data logs
COPY . .

USER 10001:10001
CMD ["python", "train.py"]
