import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests import helpers.py by name

from helpers import driver  # noqa: E402,F401  (the FakeDriver fixture)
