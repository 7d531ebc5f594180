"""`python -m train.assets [NAME ...]`: fetch assets and print their folders (default: minilm snli)."""

import os
import sys

from train.assets import path
from train.errors import UserError

try:
    for arg in sys.argv[1:] or ["minilm", "snli"]:
        print(path(arg))
except UserError as e:  # one line, as `python -m train` prints it
    if os.environ.get("TRAIN_DEBUG"):
        raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
