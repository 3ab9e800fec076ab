"""What a serving request may hold, checked before any model runs: the user id, ``k``,
the request context and a candidate list, each refused with a :class:`ServingError` that
carries the HTTP status to answer with (400 for a bad request).

:mod:`serving.recommender` checks every request through these; the limits (``max_k``,
``max_context``, ``max_candidates``) come from its ``ServingConfig``, the length limits of
ids and features from :mod:`logs.events`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from logs.events import (
    MAX_FEATURE_NAME_LEN,
    MAX_FEATURE_VALUE_LEN,
    MAX_ID_LEN,
    RESERVED_FEATURE_NAMES,
    normalize_id,
)

__all__ = ["Request", "ServingError", "check_context", "check_items", "check_k", "check_user"]

Request = tuple[str, int, Mapping[str, Any] | None]
"""``(user_id, k, context)`` as :meth:`serving.recommender.Recommender.recommend` takes
them."""


class ServingError(Exception):
    """A request that cannot be served: ``status`` is the HTTP status to answer with (400 for
    a bad request, 503 while no index is available), ``message`` says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __repr__(self) -> str:
        return f"ServingError({self.status}, {self.message!r})"


def check_user(user_id: object) -> str:
    """``user_id`` if it is a string of 1..``MAX_ID_LEN`` characters, else a 400."""
    if not isinstance(user_id, str) or not user_id:
        raise ServingError(400, "user_id must be a non-empty string")
    user_id = normalize_id(user_id)
    if len(user_id) > MAX_ID_LEN:
        raise ServingError(400, f"user_id must have at most {MAX_ID_LEN} characters")
    return user_id


def check_k(k: object, max_k: int) -> int:
    """``k`` as an int if it is an integer in ``[1, max_k]`` (not a bool), else a 400."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= max_k:
        raise ServingError(400, f"k must be an integer in [1, {max_k}], got {k!r}")
    return int(k)


def check_context(context: object, max_fields: int) -> dict[str, str | float]:
    """The request context as ``name -> str | float`` (None: empty), else a 400: at most
    ``max_fields`` fields, names of 1..``MAX_FEATURE_NAME_LEN`` characters and not reserved
    event names, values strings of at most ``MAX_FEATURE_VALUE_LEN`` characters or finite
    numbers (ints become floats)."""
    if context is None:
        return {}
    if not isinstance(context, Mapping):
        raise ServingError(400, "context must be an object of feature name -> value")
    if len(context) > max_fields:
        raise ServingError(400, f"context has {len(context)} fields, at most {max_fields}")
    out: dict[str, str | float] = {}
    for key, value in context.items():
        if not isinstance(key, str) or not key or len(key) > MAX_FEATURE_NAME_LEN:
            raise ServingError(
                400, f"context names must be strings of 1..{MAX_FEATURE_NAME_LEN} characters"
            )
        if key in RESERVED_FEATURE_NAMES:
            raise ServingError(400, f"context name {key!r} is reserved")
        if isinstance(value, str):
            if len(value) > MAX_FEATURE_VALUE_LEN:
                raise ServingError(400, f"context {key!r} is longer than {MAX_FEATURE_VALUE_LEN}")
            out[key] = value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            f = float(value)
            if not math.isfinite(f):
                raise ServingError(400, f"context {key!r} must be finite")
            out[key] = f
        else:
            raise ServingError(400, f"context {key!r} must be a string or a number")
    return out


def check_items(item_ids: object, max_candidates: int) -> list[str]:
    """``item_ids`` as a list if it is a non-empty sequence (not a string) of at most
    ``max_candidates`` distinct strings of 1..``MAX_ID_LEN`` characters, else a 400."""
    if isinstance(item_ids, str) or not isinstance(item_ids, Sequence):
        raise ServingError(400, "item_ids must be a list of strings")
    if not item_ids:
        raise ServingError(400, "item_ids must not be empty")
    if len(item_ids) > max_candidates:
        raise ServingError(400, f"{len(item_ids)} item_ids, at most {max_candidates}")
    for item in item_ids:
        if not isinstance(item, str) or not item:
            raise ServingError(400, f"item ids must be strings of 1..{MAX_ID_LEN} characters")
    items = [normalize_id(item) for item in item_ids]
    if max(map(len, items)) > MAX_ID_LEN:
        raise ServingError(400, f"item ids must be strings of 1..{MAX_ID_LEN} characters")
    if len(set(items)) != len(items):
        raise ServingError(400, "item_ids must be distinct")
    return items
