"""Serving's candidate encoding (each request's row encoded once, the item column filled
in): the same arrays and the same P(click) as encoding every candidate row."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from learners.encoding import CandidateRows, EncoderConfig, FeatureEncoder, frozen_fields
from learners.ranker import RankerConfig, TorchRanker

ENC = EncoderConfig(num_buckets=1 << 12, max_cat_fields=6, max_num_fields=3, max_seq_len=4)
BASES: list[dict[str, object]] = [
    {"ctx_device": "ios", "user_id": "u1", "position": 1},
    {"user_id": "u2", "ctx_hour": 13.0, "position": 1, "ctx_device": "web"},
    {"user_id": "u3", "ctx_new": "x", "hist_seq": ["i4", "i9"], "hist_seq_age": [3.0, 60.0]},
]
ITEMS = [[f"i{j}" for j in range(7)], ["i3", "i1"], [f"i{j}" for j in range(10, 15)]]


def explicit(bases: list[dict[str, object]], items: list[list[str]]) -> list[dict[str, object]]:
    return [{**b, "item_id": it} for b, its in zip(bases, items, strict=True) for it in its]


def trained_encoder() -> FeatureEncoder:
    enc = FeatureEncoder(ENC)
    enc.encode([{"user_id": "u0", "item_id": "i0", "position": 2, "ctx_device": "a",
                 "ctx_hour": 1.0}])  # fmt: skip
    return enc


def test_encode_candidates_equals_encode_of_every_row() -> None:
    enc = trained_encoder()
    with frozen_fields():
        got = enc.encode(CandidateRows(BASES, ITEMS))
        unknown = enc.n_unknown_fields
        want = enc.encode(explicit(BASES, ITEMS))
    assert unknown > 0  # ctx_new has no slot: counted once per call, as encode counts it
    assert enc.n_unknown_fields == 2 * unknown
    assert got.cat.shape == (14, ENC.max_cat_fields)
    for name in ("cat", "num", "seq", "seq_age"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert got.seq is not None and got.seq[-1].any()  # the third base's history is there


def test_a_base_without_items_adds_no_unknown_field() -> None:
    enc = trained_encoder()
    with frozen_fields():
        got = enc.encode(CandidateRows(BASES[:2] + [{"user_id": "u9", "ctx_other": 1.0}],
                                       [ITEMS[0], ITEMS[1], []]))  # fmt: skip
        unknown = enc.n_unknown_fields
        want = enc.encode(explicit(BASES[:2], ITEMS[:2]))
    assert enc.n_unknown_fields == 2 * unknown == 0
    np.testing.assert_array_equal(got.cat, want.cat)


def test_candidate_rows_read_as_rows() -> None:
    rows = CandidateRows(BASES, ITEMS)
    assert list(rows) == explicit(BASES, ITEMS)
    assert rows[7:9] == explicit(BASES, ITEMS)[7:9]
    with pytest.raises(IndexError):
        rows[14]
    with pytest.raises(ValueError, match="2 bases but 3"):
        CandidateRows(BASES[:2], ITEMS)


@pytest.mark.parametrize("model", ["dcnv2", "logreg"])
def test_candidate_rows_predict_as_explicit_rows(model: str) -> None:
    ranker = TorchRanker(RankerConfig(model=model, device="cpu", encoder=ENC), seed=0)
    train = explicit(BASES, ITEMS)
    for _ in range(3):
        ranker.learn_many(train, [1, 0] * 7)
    got = ranker.predict_proba_many(CandidateRows(BASES, ITEMS))
    want = ranker.predict_proba_many(explicit(BASES, ITEMS))
    assert got.dtype == np.float64 and got.shape == (14,)
    np.testing.assert_array_equal(got, want)
    assert len(set(got.tolist())) > 3  # the candidates are scored apart
    assert ranker.predict_proba_many(CandidateRows(BASES[:1], [[]])).shape == (0,)
    # while learning (not frozen) every row is read and encoded as given
    ranker.learn_many(CandidateRows(BASES, ITEMS), [1, 0] * 7)
    assert ranker.n_updates == 4


def extras_for(items: list[list[str]]) -> list[list[dict[str, object]]]:
    """Per candidate: a numeric extra (some missing), a categorical one on the second query
    and a name with no slot on the third."""
    out: list[list[dict[str, object]]] = []
    for q, its in enumerate(items):
        rows: list[dict[str, object]] = []
        for n, _ in enumerate(its):
            e: dict[str, object] = {} if n % 3 == 2 else {"hist_item_n": float(n) - 1.5}
            if q == 1:
                e["item_seg"] = f"s{n}"
            if q == 2:
                e["hist_unknown"] = 1.0
            rows.append(e)
        out.append(rows)
    return out


def explicit_extras(bases, items, extras):  # noqa: ANN001, ANN202
    return [{**b, **e, "item_id": it} for b, its, es in zip(bases, items, extras, strict=True)
            for it, e in zip(its, es, strict=True)]  # fmt: skip


def test_encode_candidates_with_extras_equals_encode_of_every_row() -> None:
    enc = trained_encoder()
    enc.encode([{"user_id": "u0", "item_id": "i0", "hist_item_n": 1.0, "item_seg": "s"}])
    extras = extras_for(ITEMS)
    with frozen_fields():
        before = enc.n_unknown_fields
        got = enc.encode(CandidateRows(BASES, ITEMS, extras))
        unknown = enc.n_unknown_fields - before
        want = enc.encode(explicit_extras(BASES, ITEMS, extras))
    assert unknown == enc.n_unknown_fields - before - unknown  # the same count as rows give
    assert unknown == 2  # ctx_new (a base) and hist_unknown (an extra)
    for name in ("cat", "num", "seq", "seq_age"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    slot = enc.num_fields.index("hist_item_n")
    assert got.num[:, slot].any()  # the extras are there: the check is not vacuous
    assert list(CandidateRows(BASES, ITEMS, extras)) == explicit_extras(BASES, ITEMS, extras)


@pytest.mark.parametrize("bad", [{"ctx_device": "x"}, {"item_id": "i9"}, {"hist_seq": ["a"]}])
def test_extras_may_not_repeat_a_base_field(bad: dict[str, object]) -> None:
    enc = trained_encoder()
    extras = [[dict(bad) for _ in its] for its in ITEMS]
    with frozen_fields(), pytest.raises(ValueError, match="extras"):
        enc.encode(CandidateRows(BASES, ITEMS, extras))


def test_extras_must_match_the_items() -> None:
    with pytest.raises(ValueError, match="one mapping per item"):
        CandidateRows(BASES, ITEMS, [[{}] for _ in ITEMS])


def test_extras_shared_by_several_candidates_encode_as_their_copies() -> None:
    """At inference a dict shared by several candidates' extras is encoded once; the
    arrays and the unknown-field count equal those of the same extras as copies."""

    enc = FeatureEncoder(EncoderConfig(num_buckets=512, max_cat_fields=6, max_num_fields=6))
    enc.encode([{"user_id": "u", "item_id": "i", "x": 1.0, "y": 2.0, "c": "a"}])  # slots
    shared = {"x": 0.5, "y": -3.0, "z": 7.0}  # z: unknown at inference
    own = {"x": 2.0, "c": "b"}
    bases = [{"user_id": "u1"}, {"user_id": "u2"}]
    items = [["i1", "i2", "i3"], ["i4", "i5"]]
    extras_shared = [[shared, own, shared], [shared, shared]]
    extras_copies = [[dict(e) for e in q] for q in extras_shared]
    with frozen_fields():
        before = enc.n_unknown_fields
        a = enc.encode_candidates(bases, items, extras_shared)
        n_shared = enc.n_unknown_fields - before
        b = enc.encode_candidates(bases, items, extras_copies)
        n_copies = enc.n_unknown_fields - before - n_shared
    assert np.array_equal(a.cat, b.cat) and np.array_equal(a.num, b.num)
    assert n_shared == n_copies == 1
    assert not np.array_equal(a.num[0], a.num[1])  # the own extra differs: not vacuous


_NAMES = ["h_a", "h_b", "h_c", "h_new"]  # h_new never gets a slot
_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, -0.0, 1e300, -1e-300]),
)
_EXTRA = st.dictionaries(st.sampled_from(_NAMES), _VALUES, max_size=4)


@settings(max_examples=60, deadline=None)
@given(extras=st.lists(st.lists(_EXTRA, min_size=0, max_size=5), min_size=1, max_size=3),
       odd=st.sampled_from([None, 3, "x", True]), share=st.booleans())  # fmt: skip
def test_float_extras_encode_as_their_rows(
    extras: list[list[dict[str, float]]], odd: object, share: bool
) -> None:
    """Extras of floats in any key order (NaN, inf, -0.0, missing, unknown names; shared
    dicts or not) and, with ``odd``, one value of another type (the general path) encode
    as :meth:`encode` encodes the whole rows, arrays and unknown-field count alike."""
    enc = FeatureEncoder(EncoderConfig(num_buckets=512, max_cat_fields=4, max_num_fields=4))
    enc.encode([{"user_id": "u", "item_id": "i", "h_a": 1.0, "h_b": 1.0, "h_c": 1.0}])
    if share and extras[0]:
        extras[0].append(extras[0][0])  # the same dict twice
    if odd is not None and extras[0]:
        extras[0][-1] = {**extras[0][-1], "h_b": odd}
    bases = [{"user_id": f"u{q}"} for q in range(len(extras))]
    items = [[f"i{q}_{n}" for n in range(len(e))] for q, e in enumerate(extras)]
    rows = [{**bases[q], **x, "item_id": it}
            for q, e in enumerate(extras) for x, it in zip(e, items[q], strict=True)]  # fmt: skip
    with frozen_fields():
        n0 = enc.n_unknown_fields
        got = enc.encode_candidates(bases, items, extras)
        n1 = enc.n_unknown_fields
        want = enc.encode(rows) if rows else None
        n2 = enc.n_unknown_fields
    if want is None:
        assert got.num.shape[0] == 0
        return
    assert np.array_equal(got.cat, want.cat)
    assert np.array_equal(got.num.view(np.int32), want.num.view(np.int32))  # bits: -0.0
    assert n1 - n0 == n2 - n1
