"""Control messages as bytes."""

from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)


def control_bytes(msg: dict[str, object]) -> bytes:
    return json.dumps(msg).encode()
