"""Where the project's shared, read-only public data lives (tests, examples and benchmarks read it).

``$FEDSPLIT_SHARED/data`` when the variable is set, else ``<repository>/../shared/data``. The data is
never copied into the repository; callers skip or fail clearly when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

SHARED_ENV_VAR = "FEDSPLIT_SHARED"
_REPOSITORY = Path(__file__).resolve().parents[3]  # src/fedsplit/data/shared.py -> the repository root


def shared_data_dir() -> Path | None:
    """The shared data directory, or None when it does not exist here."""
    data = Path(os.environ.get(SHARED_ENV_VAR, _REPOSITORY.parent / "shared")) / "data"
    return data if data.is_dir() else None
