import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests import helpers.py by name

from helpers import driver  # noqa: E402,F401  (the FakeDriver fixture)

# Tests under these folders carry the marker (pyproject.toml deselects both by default).
DIR_MARKERS = {"tests/gpu/": "gpu", "tests/gpu_multi/": "gpu2"}


def pytest_collection_modifyitems(items):
    for item in items:
        path = str(item.fspath).replace("\\", "/")
        for folder, marker in DIR_MARKERS.items():
            if folder in path:
                item.add_marker(getattr(pytest.mark, marker))
