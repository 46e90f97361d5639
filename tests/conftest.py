import pytest

from litefs_wsgi.testing import LiteFSMount


@pytest.fixture
def mount(tmp_path):
    """A LiteFS-style mount where this node is the primary."""
    m = LiteFSMount(tmp_path / "litefs")
    m.make_primary()
    return m


@pytest.fixture
def replica(tmp_path):
    """A LiteFS-style mount where this node is a replica of node-a, with app.db at TXID 1."""
    m = LiteFSMount(tmp_path / "replica")
    m.make_replica("node-a")
    m.set_position("app.db", 1)
    return m
