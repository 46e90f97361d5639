import pytest

from litefs_wsgi.testing import LiteFSMount


@pytest.fixture
def mount(tmp_path):
    """A LiteFS-style mount where this node is the primary."""
    m = LiteFSMount(tmp_path / "litefs")
    m.make_primary()
    return m
