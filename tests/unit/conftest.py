import pytest

from natlb.core import Core, CoreConfig


@pytest.fixture
def core():
    c = Core(CoreConfig(max_flows=1024, workers=1))
    yield c
    c.check_table()   # whatever the test did, the conntrack is still consistent
    c.close()
