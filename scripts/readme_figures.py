"""Make the README's figures from a trained run (by default the newest run of the default main job).

    python train.py && python scripts/readme_figures.py [--ckpt-path logs/train/runs/<run>]

The work is flowgen/cli/readme_figures.py.
"""

from flowgen.cli.readme_figures import main

if __name__ == "__main__":
    main()
