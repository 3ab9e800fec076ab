"""Impression logs and the event schema, as plain libraries (no Kafka, no Faust).

* :mod:`logs.events`: the events (impression, click, watermark, labelled example, dead
  letter), their JSON encoding and validation;
* :mod:`logs.batches`: the internal topics' micro-batches (``labeled``, ``scored``) in
  their versioned binary form;
* :mod:`logs.log_format`: the canonical log format: its columns, normal form and validation;
* :mod:`logs.io`: readers and writers of that format (CSV, JSONL, Parquet);
* :mod:`logs.obd`: the Open Bandit Dataset conversion;
* :mod:`logs.synthetic`: the synthetic worlds with known true click probabilities;
* :mod:`logs.movielens`: MovieLens ratings turned into an impression log;
* :mod:`logs.offline`: in-process prequential evaluation and pretraining over a log.
"""
