"""Historical features of a whole impression log, replayed through a feature stage in
event-time order (``evaluate`` and ``pretrain`` over a log: :mod:`logs.offline`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from features.config import ClickEvent, ImpressionEvent
from features.stage import FeatureStage

__all__ = ["attach_log"]


def attach_log(
    stage: FeatureStage,
    ts: Sequence[float],
    impression_id: Sequence[str],
    user_id: Sequence[str],
    item_id: Sequence[str],
    position: Sequence[int | None],
    attrs: Sequence[Mapping[str, object]],
    click_ts: Sequence[float | None],
) -> list[dict[str, object]]:
    """Features of every row of an impression log (N rows), replayed in event-time order:
    impressions at ``ts``, clicks at ``click_ts`` (``None``/NaN: not clicked), an
    impression before a click at the same time. Returns N feature dicts aligned with the
    rows (a duplicate id's row gets ``{}``). One batch through
    :meth:`features.stage.FeatureStage.process` (one call of its compiled kernel)."""
    n = len(ts)
    order: list[tuple[float, int, int]] = []
    for r in range(n):
        order.append((float(ts[r]), 0, r))
        ct = click_ts[r]
        if ct is not None and ct == ct:
            order.append((float(ct), 1, r))
    order.sort()
    events: list[ImpressionEvent | ClickEvent] = [
        ImpressionEvent(impression_id[r], t, user_id[r], item_id[r], position[r], attrs[r])
        if kind == 0
        else ClickEvent(impression_id[r], t, user_id[r])
        for t, kind, r in order
    ]
    out: list[dict[str, object]] = [{} for _ in range(n)]
    for (_, kind, r), f in zip(order, stage.process(events), strict=True):
        if kind == 0 and f is not None:
            out[r] = f
    return out
