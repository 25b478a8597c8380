import os

import pytest

from ruvpy import _kernels

# RUVPY_ISA=scalar pytest ... runs as on a CPU without SIMD: only the forced path is tested.
ISA_PATHS = [os.environ["RUVPY_ISA"].strip().lower()] if os.environ.get("RUVPY_ISA", "").strip() \
    else _kernels.available_isas()


@pytest.fixture(params=ISA_PATHS)
def isa(request):
    """Runs a test once per ISA path this CPU supports, restoring the previous one after."""
    previous = _kernels.get_isa()
    _kernels.set_isa(request.param)
    yield request.param
    _kernels.set_isa(previous)
