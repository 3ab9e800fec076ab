"""Behaviour fingerprint of the worker's services, in process: a fixed-seed synthetic log
through :class:`stream.services.JoinService` → :class:`~stream.services.TrainerService` →
:class:`~stream.services.MonitorService`, control messages fed back to trainer and monitor.
Prints one sha256 over the labelled examples, scored batches, ranker parameters and control
messages, and writes it with per-part hashes to ``bench/results/fingerprint.json``. A
refactor that keeps behaviour must keep the hash bit-identical.

    python -m bench.fingerprint
    python -m bench.fingerprint --wire   # through the topics' encodings; prints only

``--wire`` sends every labelled example and scored batch through the encoding of its topic
(:func:`stream.limits.labeled_records` then :func:`logs.batches.decode_labeled`;
:meth:`ScoredBatch.encode` then :meth:`ScoredBatch.decode`), as the worker does between its
stages: the same hash shows the encodings change nothing the model or the monitor sees.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from learners.encoding import EncoderConfig
from learners.ranker import RankerConfig
from logs.batches import ScoredBatch, decode_labeled
from logs.events import (
    TOPIC_CLICKS,
    TOPIC_IMPRESSIONS,
    Click,
    Impression,
    LabeledExample,
    Watermark,
)
from logs.synthetic import SyntheticConfig, generate
from monitoring.metrics import StreamrecMetrics
from stream.join import JoinConfig
from stream.limits import labeled_records, payload_limit
from stream.services import JoinService, MonitorService, TrainerService
from stream.settings import MonitorConfig, Settings, TrainerConfig

OUT = Path(__file__).parent / "results" / "fingerprint.json"


def _feed(h: hashlib._Hash, obj: object) -> None:
    h.update(json.dumps(obj, sort_keys=True, default=repr).encode())


def run(n_impressions: int = 12_000, seed: int = 7, wire: bool = False) -> dict[str, str]:
    """Drive the services over ``n_impressions`` synthetic impressions; per-part sha256s.
    ``wire``: labels and scores go through their topics' encodings between the services."""
    settings = Settings(
        ranker=RankerConfig(encoder=EncoderConfig(num_buckets=2**12)),
        trainer=TrainerConfig(batch_size=64),
        join=JoinConfig(window_s=60.0, lateness_s=0.0),
        monitor=MonitorConfig(
            warmup=1_000, recal_window=1_000, refit_every=256, recalibration="continuous"
        ),
    )
    df = generate(SyntheticConfig(n_impressions=n_impressions, n_users=200, n_items=300, seed=seed))
    events: list[tuple[float, int, bytes]] = []
    for row in df.itertuples(index=False):
        imp = Impression(
            impression_id=row.impression_id,
            ts=float(row.ts),
            user_id=row.user_id,
            item_id=row.item_id,
            position=int(row.position),
            features={"ctx_device": row.ctx_device, "item_price": float(row.item_price)},
            true_p=float(row.true_p),
        )
        events.append((float(row.ts), 0, imp.to_json()))
        if int(row.click):
            events.append(
                (float(row.click_ts), 1, Click(row.impression_id, float(row.click_ts)).to_json())
            )
    events.sort(key=lambda e: (e[0], e[1]))
    join = JoinService(settings, StreamrecMetrics())
    trainer = TrainerService(settings, StreamrecMetrics())
    monitor = MonitorService(settings, StreamrecMetrics())
    parts = {k: hashlib.sha256() for k in ("labels", "scored", "control", "params")}
    offsets = [0, 0]

    limit = payload_limit(settings.max_message_bytes)

    def route(labels: list[LabeledExample]) -> None:
        if wire:
            records, too_large = labeled_records(labels, limit)
            assert not too_large
            labels = [e for r in records for e in decode_labeled(r)]
        for e in labels:
            _feed(
                parts["labels"], [e.impression.impression_id, e.label, e.kind, e.label_ts, e.weight]
            )
        trainer.add(labels)
        while (batch := trainer.step()) is not None:
            if wire:
                batch = ScoredBatch.decode(batch.encode())
            _feed(parts["scored"], dataclasses.asdict(batch))
            for msg in monitor.observe(batch):
                _feed(parts["control"], msg.to_dict())
                trainer.apply_control(msg)
                monitor.apply_control(msg)

    for i, (ts, which, payload) in enumerate(events):
        topic = TOPIC_CLICKS if which else TOPIC_IMPRESSIONS
        out, _ = join.handle(payload, topic, 0, offsets[which])
        offsets[which] += 1
        route(out)
        if i % 200 == 199:
            for w, t in enumerate((TOPIC_IMPRESSIONS, TOPIC_CLICKS)):
                out, _ = join.handle(Watermark(ts).to_json(), t, 0, offsets[w])
                offsets[w] += 1
                route(out)
    end = events[-1][0] + 10_000.0
    for w, t in enumerate((TOPIC_IMPRESSIONS, TOPIC_CLICKS)):
        out, _ = join.handle(Watermark(end).to_json(), t, 0, offsets[w])
        route(out)
    for name, tensor in sorted(trainer.ranker.model.state_dict().items()):
        parts["params"].update(name.encode())
        parts["params"].update(np.ascontiguousarray(tensor.detach().cpu().numpy()).tobytes())
    digests = {k: h.hexdigest() for k, h in parts.items()}
    total = hashlib.sha256("".join(digests[k] for k in sorted(digests)).encode()).hexdigest()
    return {"sha256": total, **digests, "span_s": f"{events[-1][0] - events[0][0]:.0f}"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fingerprint", description=__doc__)
    parser.add_argument("--wire", action="store_true", help="through the topics' encodings")
    args = parser.parse_args(argv)
    result = run(wire=args.wire)
    if not args.wire:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(result["sha256"])
    for k, v in result.items():
        print(f"  {k}: {v}")


if __name__ == "__main__":
    main()
