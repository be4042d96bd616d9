"""Where things are: the checkout, and the shared data that lives outside it.

Shared data (benchmark files) is found at `$TREERPO_SHARED` if set, else at `shared/` beside the
checkout (CI lays out `X/main` and `X/shared`); tests reach it through the `shared_dir` and
`benchmarks_dir` fixtures, which skip, naming what is missing, when it is not there.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED_ENV = "TREERPO_SHARED"


def find_shared() -> tuple[Path | None, str]:
    """(the shared folder, or None; where it was looked for, for a skip message)."""
    if os.environ.get(SHARED_ENV):
        path = Path(os.environ[SHARED_ENV]).expanduser()
        return (path if path.is_dir() else None), f"${SHARED_ENV}={path}"
    beside = REPO.parent / "shared"
    return (beside if beside.is_dir() else None), f"{beside} (or set ${SHARED_ENV})"
