import pytest

from natlb.core import Core, CoreConfig

from .services import FAMILIES, Family


@pytest.fixture
def core():
    # Every packet decided as if queued; tests/unit/test_fastpath.py has the fast path.
    c = Core(CoreConfig(max_flows=1024, workers=1, fastpath=False))
    yield c
    c.check_table()   # whatever the test did, the conntrack is still consistent
    c.close()


@pytest.fixture(params=sorted(FAMILIES))
def fam(request) -> Family:
    """Each address family in turn, for promises both keep alike."""
    return FAMILIES[request.param]
