# flowgen on a CUDA-capable PyTorch base; the package installs exactly as `make install` does.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    WANDB_MODE=offline
RUN apt-get update && apt-get install -y --no-install-recommends make git && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/flowgen
COPY pyproject.toml README.md Makefile ./
COPY flowgen ./flowgen
RUN make install
COPY . .

# docker run --gpus all -v $PWD/data:/workspace/flowgen/data flowgen python train.py model=glow data=cifar10
CMD ["make", "train"]
