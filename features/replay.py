"""Historical features of a whole impression log, replayed through a feature stage in
event-time order (``evaluate`` and ``pretrain`` over a log: :mod:`logs.offline`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from features.stage import FeatureStage, paused_gc

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
    rows (a duplicate id's row gets ``{}``). The cyclic GC is paused for the replay
    (:func:`features.stage.paused_gc`)."""
    n = len(ts)
    events: list[tuple[float, int, int]] = []
    for r in range(n):
        events.append((float(ts[r]), 0, r))
        ct = click_ts[r]
        if ct is not None and ct == ct:
            events.append((float(ct), 1, r))
    events.sort()
    out: list[dict[str, object]] = [{} for _ in range(n)]
    with paused_gc():
        for t, kind, r in events:
            if kind == 0:
                f = stage.impression(
                    impression_id[r], t, user_id[r], item_id[r], position[r], attrs[r]
                )
                if f is not None:
                    out[r] = f
            else:
                stage.click(impression_id[r], t, user_id[r])
    return out
