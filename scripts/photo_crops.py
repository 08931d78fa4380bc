"""Write 640 32x32 crops of scikit-learn's two sample photographs into <dir>/(train|val|test) for data=folder.

    python scripts/photo_crops.py /tmp/photos

The work is flowgen/cli/photo_crops.py.
"""

import sys

from flowgen.cli.photo_crops import run

if __name__ == "__main__":
    run(sys.argv[1:])
