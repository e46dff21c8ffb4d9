"""Where the tests find the repository and the project's shared reference folder.

``../shared`` beside the checkout exists for the developers and in CI, never in a
user's clone; tests that read it skip with a clear reason when it is absent.
"""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
SCHEMAS = SHARED / "reference" / "jmix-spec" / "schemas"


def require_shared(path: Path = SHARED) -> Path:
    """Return ``path`` or skip the calling test when the shared folder is absent."""
    if not path.exists():
        pytest.skip(
            f"{path} is absent: the project's shared reference folder sits "
            "beside the checkout only for its developers and CI"
        )
    return path
