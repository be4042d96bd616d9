"""Transport configuration errors, raised before any socket exists: missing CURVE keys, missing endpoints.

The endpoints over real loopback sockets are tested in tests/integration/test_transport.py.
"""

from __future__ import annotations

import pytest

from common.config import TransportConfig
from common.transport import ActorEndpoints, LearnerEndpoints, TransportError


def _cfg(**kw) -> TransportConfig:
    return TransportConfig(data_port=0, control_port=0, linger_s=0.2, **kw)


def test_curve_needs_keys(tmp_path):
    with pytest.raises(TransportError, match="generate_keys"):
        LearnerEndpoints(_cfg(curve=True, curve_dir=str(tmp_path)))


def test_actor_needs_endpoints_when_ports_are_ephemeral():
    with pytest.raises(TransportError, match="endpoints.json"):
        ActorEndpoints(_cfg(), "actor-0")
    with pytest.raises(ValueError, match="actor id"):
        ActorEndpoints(TransportConfig(), "")
