import os
import sys

# `cases.py`, `matrix.py` and the helper scripts live next to the tests.
sys.path.insert(0, os.path.dirname(__file__))


def pytest_generate_tests(metafunc):
    """Parametrizes the shared matrix's fixtures from the class's `methods`
    (see `matrix.py`): `trained` per (method, model), `quantized` and
    `method` per method."""
    methods = tuple(getattr(metafunc.cls, "methods", ()) or ())
    if not methods:
        return
    names = metafunc.fixturenames
    if "trained" in names:
        cases = [(m, model) for m in methods for model in metafunc.cls.models]
        metafunc.parametrize(
            "trained",
            cases,
            indirect=True,
            scope="class",
            ids=[f"{m}-{model}" for m, model in cases],
        )
    if "quantized" in names:
        metafunc.parametrize("quantized", methods, indirect=True, scope="class")
    if "method" in names:
        metafunc.parametrize("method", methods)
