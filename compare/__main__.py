"""``python -m compare``: the agreement report (and, as they land, the benchmark and training check).

Exit status: 0 when everything agrees within tolerance, 1 when anything does not, 2 for usage errors.
"""

from __future__ import annotations

import sys

from compare import cli

if __name__ == "__main__":
    sys.exit(cli.main())
