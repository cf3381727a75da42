"""A module whose import fails on rank 0 (for the import-time fault tests)."""
import os

if os.environ.get("RANK") == "0" and os.environ.get("DISTRIB_TEST_IMPORT_FAULT"):
    raise ImportError("rank 0 cannot import this module today")


def work():
    return int(os.environ["RANK"])
