import pytest

from ruvpy import _kernels


@pytest.fixture(params=_kernels.available_isas())
def isa(request):
    """Runs a test once per ISA path this CPU supports, restoring the previous one after."""
    previous = _kernels.get_isa()
    _kernels.set_isa(request.param)
    yield request.param
    _kernels.set_isa(previous)
