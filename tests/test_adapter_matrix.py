"""The shared matrix (DESIGN.md section 4) for every method the library
registers; see `matrix.py`.

The in-process suites run in one class per method, so that `pytest -n`
(`--dist loadscope`, as `nox -s tests` runs it) spreads the methods over
workers; the checks in another process (the other backend, several devices)
run once each for every registered method together (the library's and those test
modules define, such as `test_custom_method.py`'s IA3), each process costing
a backend start-up.
"""

from matrix import CrossBackendMatrix
from matrix import DistributionMatrix
from matrix import SharedMatrix

from keras_adapters.adapters.base import ADAPTER_METHODS

LIBRARY_METHODS = tuple(
    method
    for method, cls in ADAPTER_METHODS.items()
    if cls.__module__.startswith("keras_adapters.")
)


def test_the_matrix_covers_every_library_method():
    assert set(LIBRARY_METHODS) >= {"lora", "hut", "goft", "qgoft"}
    assert all(f"Test_{m}" in globals() for m in LIBRARY_METHODS)


for _method in LIBRARY_METHODS:
    globals()[f"Test_{_method}"] = type(
        f"Test_{_method}", (SharedMatrix,), {"methods": (_method,)}
    )


# Two classes, so that pytest-xdist can run the two subprocess suites (about
# a minute each) on different workers.
class TestOtherBackend(CrossBackendMatrix):
    pass


class TestSeveralDevices(DistributionMatrix):
    pass
