"""``python -m llmopt``: the same entry point as the ``llmopt`` script (the tensor-parallel
launcher starts its ranks this way)."""

import sys

from llmopt.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
