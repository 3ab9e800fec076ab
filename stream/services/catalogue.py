"""The trainer's catalogue (:class:`Catalogue`): the items and users it has seen, bounded
with the most recent kept, each user's clicks and the items recently shown to them. The
indexer refreshes the retrieval index over its items; the hard-negative pools read the
shown-without-a-click sets.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

__all__ = ["Catalogue"]


@dataclass
class Catalogue:
    """Items and users the trainer has seen (bounded, most recent kept) and user clicks."""

    max_items: int
    max_users: int
    items: OrderedDict[str, None] = field(default_factory=OrderedDict)
    users: OrderedDict[str, set[str]] = field(default_factory=OrderedDict)
    #: user id -> the newest ``max_seen`` items shown to them (clicked or not), for the
    #: hard-negative pools ("seen without a click")
    seen: dict[str, OrderedDict[str, None]] = field(default_factory=dict)
    max_seen: int = 50

    def add(self, user_id: str, item_id: str, clicked: bool) -> None:
        self.items[item_id] = None
        self.items.move_to_end(item_id)
        if len(self.items) > self.max_items:
            self.items.popitem(last=False)
        clicks = self.users.get(user_id)
        if clicks is None:
            clicks = self.users[user_id] = set()
        else:
            self.users.move_to_end(user_id)
        if clicked:
            clicks.add(item_id)
        shown = self.seen.setdefault(user_id, OrderedDict())
        shown[item_id] = None
        shown.move_to_end(item_id)
        if len(shown) > self.max_seen:
            shown.popitem(last=False)
        if len(self.users) > self.max_users:
            gone, _ = self.users.popitem(last=False)
            self.seen.pop(gone, None)

    def seen_sets(self) -> dict[str, set[str]]:
        return {u: set(items) for u, items in self.seen.items()}
