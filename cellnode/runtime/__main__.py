"""`python -u -m cellnode.runtime SPEC_PATH`: run one instance of a cell node (see `cellnode.runtime.instance`).

`python -u -m cellnode.runtime --zygote SPEC_PATH`: run the zygote that forks a node's instances
(see `cellnode.runtime.zygote`).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["--zygote"]:
        from cellnode.runtime import zygote

        sys.exit(zygote.main(sys.argv[2:]))
    from cellnode.runtime import instance

    sys.exit(instance.main(sys.argv[1:]))
