import pytest

from natlb.core import Core, CoreConfig


@pytest.fixture
def core():
    # Every packet decided as if queued; tests/unit/test_fastpath.py has the fast path.
    c = Core(CoreConfig(max_flows=1024, workers=1, fastpath=False))
    yield c
    c.check_table()   # whatever the test did, the conntrack is still consistent
    c.close()
