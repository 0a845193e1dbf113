"""`python -u -m cellnode.runtime SPEC_PATH`: run one instance of a cell node (see `cellnode.runtime.instance`)."""

from __future__ import annotations

import sys

from cellnode.runtime.instance import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
