"""The GPU check, one command that finishes within 8 minutes on one H100/H200:

    python scripts/device_check.py              # on the GPU machine
    python scripts/device_check.py --dry-run    # the same steps on the CPU at tiny sizes

Runs the CUDA-only tests (pytest -m gpu), times the paper configs (experiment=glow_cifar10,
experiment=tarflow_cifar10) in float32, bf16-mixed and compiled (train img/s, FLOPs per image, the
fraction of the device's GEMM rate, peak memory), and trains the paper Glow for 300 steps on synthetic
images (the loss falls, no step skipped).  Writes device_check.md and device_check.json to --out.
Steps and budgets: flowgen/benchmark/device_check.py; options: flowgen/cli/device_check.py.
"""

from flowgen.cli.device_check import main

if __name__ == "__main__":
    main()
