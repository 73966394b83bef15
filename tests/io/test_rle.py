import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from napari_cellseg.io.rle import (RleError, labels_to_rles, parse_rles, rle_decode, rle_encode, rle_runs, rles_to_labels, strip_field)


def renumbered(labels):
    """Instance ids replaced by 1..N in ascending order of the original ids."""
    ids = np.unique(labels)[1:] if (labels == 0).any() else np.unique(labels)
    return (np.searchsorted(ids, labels) + 1) * (labels > 0)


def test_encode_kaggle_convention():
    mask = np.zeros((3, 4), bool)
    mask[0, 1:3] = True  # pixels 2,3 (1-based, row-major)
    mask[1, 3] = mask[2, 0] = True  # pixels 8 and 9: one run across the row end
    assert rle_encode(mask) == "2 2 8 2"
    assert rle_encode(np.zeros((3, 4), bool)) == ""
    assert rle_encode(np.ones((2, 2), np.uint8)) == "1 4"


def test_decode_matches_encode(small_labels):
    for i in np.unique(small_labels)[1:]:
        mask = small_labels == i
        assert np.array_equal(rle_decode(rle_encode(mask), mask.shape), mask)
    assert not rle_decode("", (3, 3)).any()
    assert rle_decode("1 2 3 2", (2, 3)).sum() == 4  # touching runs are accepted when reading


@pytest.mark.parametrize("rle, problem", [
    ("1 2 3", "odd number of tokens"),
    ("0 2", "start 0"),
    ("1 x", "token 2 'x' is not"),
    ("1.5 2", "is not a non-negative integer"),
    ("-1 2", "is not a non-negative integer"),
    ("5 2 1 1", "out of order"),
    ("1 3 2 1", "overlaps the previous run"),
    ("19 3", "past the image end"),
    ("21 1", "past the image end"),
    ("1 0", "length 0"),
    ("99999999999999999999 1", "too large"),
])
def test_decode_rejects_bad_input(rle, problem):
    with pytest.raises(ValueError, match=problem):
        rle_decode(rle, (4, 5))


def test_labels_round_trip(small_labels):
    rles = labels_to_rles(small_labels)
    ids = np.unique(small_labels)[1:]
    assert len(rles) == len(ids)
    for rle, i in zip(rles, ids):  # ascending id order, one per instance
        assert np.array_equal(rle_decode(rle, small_labels.shape), small_labels == i)
    back = rles_to_labels(rles, small_labels.shape)
    assert back.dtype == np.int32
    assert np.array_equal(back, renumbered(small_labels))


def test_nuclei_slices_round_trip(nuclei_label_slices):
    for labels in nuclei_label_slices.values():
        back = rles_to_labels(labels_to_rles(labels), labels.shape)
        ids = np.unique(labels)[1:]
        assert np.array_equal(back, renumbered(labels))


def test_overlap_earlier_mask_keeps_pixel():
    out = rles_to_labels(["1 4", "3 3", "", "9 1"], (3, 3))
    assert out.ravel().tolist() == [1, 1, 1, 1, 2, 0, 0, 0, 4]


def test_rles_to_labels_names_bad_mask():
    with pytest.raises(RleError, match="mask 2: odd") as info:
        rles_to_labels(["1 2", "4 1 6"], (3, 3))
    assert info.value.index == 1


def test_parse_rles_per_string_sizes():
    starts, lengths, n = parse_rles(["1 2 5 1", "", "3 1"], size=[6, 1, 4])
    assert starts.tolist() == [0, 4, 2] and lengths.tolist() == [2, 1, 1] and n.tolist() == [2, 0, 1]
    with pytest.raises(RleError) as info:
        parse_rles(["1 2", "2 1"], size=[9, 1])
    assert info.value.index == 1 and "past the image end" in str(info.value)


def test_labels_to_rles_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        labels_to_rles(np.zeros((2, 2, 2), int))
    with pytest.raises(ValueError, match="integer"):
        labels_to_rles(np.zeros((2, 2), float))
    assert labels_to_rles(np.zeros((3, 3), np.uint16)) == []


@given(arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 9)),
              elements=st.integers(0, 4)))
def test_fuzz_label_round_trip(labels):
    rles = labels_to_rles(labels)
    ids = np.unique(labels)[1:]
    back = rles_to_labels(rles, labels.shape)
    assert np.array_equal(back, renumbered(labels))


# The documented RLE format: tokens separated by ASCII whitespace (space, tab, CR, LF, VT, FF)
# only; anything else (\x1c-\x1f, \x85, \xa0, \u2028, \u3000 ... which str.split() also splits on)
# is not a separator. Written out here, independently of the implementation.
_DOC_WHITESPACE = " \t\r\n\x0b\x0c"


def _reference_tokens(rle: str) -> list[str]:
    return [t for t in re.split(f"[{re.escape(_DOC_WHITESPACE)}]+", rle) if t]


def _reference_decode(rle: str, shape):
    """Slow, obviously-correct decoder; None when the string is invalid."""
    tokens = _reference_tokens(rle)
    if any(not t.isascii() or not t.isdigit() for t in tokens) or len(tokens) % 2:
        return None
    values = [int(t) for t in tokens]
    mask = np.zeros(shape[0] * shape[1], bool)
    previous_end = 1
    for start, length in zip(values[0::2], values[1::2]):
        if start < previous_end or length < 1 or start + length - 1 > mask.size:
            return None
        mask[start - 1:start - 1 + length] = True
        previous_end = start + length
    return mask.reshape(shape)


_tokens = st.one_of(st.integers(0, 40).map(str), st.sampled_from(["x", "-1", "1.0", "", "٣", "1e3"]))
# separators: the documented ones and look-alikes that str.split() / str.strip() also treat as
# whitespace but the format does not
_seps = st.sampled_from([" ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\xa0",
                         "\u2028", "\u3000"])


@st.composite
def _rle_like(draw):
    tokens = draw(st.lists(_tokens, max_size=12))
    out = draw(_seps) if draw(st.booleans()) else ""
    for t in tokens:
        out += t + draw(_seps)
    return out


@given(_rle_like() | st.lists(_tokens, max_size=12).map(" ".join) | st.text(max_size=20),
       st.tuples(st.integers(1, 6), st.integers(1, 6)))
def test_fuzz_decode_correct_mask_or_value_error(rle, shape):
    expected = _reference_decode(rle, shape)
    try:
        mask = rle_decode(rle, shape)
    except ValueError:
        assert expected is None, f"rejected a valid RLE {rle!r}"
        return
    assert expected is not None, f"accepted an invalid RLE {rle!r}"
    assert mask.dtype == bool and mask.shape == shape
    assert np.array_equal(mask, expected)
    if mask.any():
        assert rle_runs(rle_encode(mask))[0][0] == int(_reference_tokens(rle)[0]) - 1


@pytest.mark.parametrize("rle", ["1 2\x1f", "\xa01 2", "1\x852", "1\u30002", "1 2\u2028"])
def test_non_ascii_whitespace_is_not_a_separator(rle):
    """One definition of whitespace; look-alikes are refused, naming the token."""
    with pytest.raises(RleError, match="is not a non-negative integer"):
        rle_decode(rle, (4, 5))
    with pytest.raises(RleError):
        parse_rles([rle], 20)


@pytest.mark.parametrize("rle", ["1 2\t", "\x0b1\x0c2\r\n", " 1  2 "])
def test_ascii_whitespace_separates(rle):
    assert rle_decode(rle, (4, 5)).ravel()[:3].tolist() == [True, True, False]
    assert parse_rles([rle], 20)[1].tolist() == [2]


def test_strip_field_uses_the_same_whitespace():
    assert strip_field(" \t1 2\r\n") == "1 2"
    assert strip_field("1 2\x1f") == "1 2\x1f"  # not whitespace: left for the RLE check to refuse
    assert strip_field("\xa0a\u3000") == "\xa0a\u3000"


@pytest.mark.parametrize("rles, first", [
    (["1 2", "1 x", "1 2 3"], 1),            # bad character before an odd token count
    (["1 2", "1 2 3", "1 x"], 1),            # odd token count before a bad character
    (["1 2", "3 1 1 1", "1 x"], 1),          # out of order before a bad character
    (["5 1", "1 2 3", "9" * 300], 1),        # odd count before a string too long for the image
    (["5 1", "9" * 300, "1 2 3"], 1),        # too long before odd count
    (["1 0", "x"], 0),
    (["1 0", "1 2 3"], 0),                   # bad run before an odd token count
    (["1 2", "1 1 1 1", "1 2 3"], 1),        # overlap before an odd token count
])
def test_parse_rles_names_the_first_bad_string(rles, first):
    """The first bad string is named, whatever kinds of problem the later ones have."""
    with pytest.raises(RleError) as info:
        parse_rles(rles, 20)
    assert info.value.index == first


@given(st.lists(_rle_like() | st.sampled_from(["1 2", "3 1 5 1", "", "1 0", "9" * 40]), max_size=6),
       st.integers(1, 30))
def test_fuzz_parse_rles_agrees_with_one_at_a_time(rles, size):
    """parse_rles (vectorised) accepts exactly what rle_runs accepts string by string, and names
    the first string that rle_runs (or the length bound) refuses."""
    from napari_cellseg.io.rle import _max_chars

    first_bad = None
    for i, rle in enumerate(rles):
        try:
            if len(rle) > _max_chars(size):
                raise RleError("too long")
            rle_runs(rle, size)
        except RleError:
            first_bad = i
            break
    try:
        starts, lengths, n_runs = parse_rles(rles, size)
    except RleError as exc:
        assert exc.index == first_bad
        return
    assert first_bad is None
    assert len(n_runs) == len(rles) and int(n_runs.sum()) == len(starts) == len(lengths)


@pytest.mark.parametrize("profile, expected", [("default", 200), ("fuzz", 5000)])
def test_hypothesis_profile_sets_every_property_tests_example_count(profile, expected):
    """HYPOTHESIS_PROFILE=fuzz must widen every test here: no per-test max_examples overrides it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    code = ("import sys; sys.path[:0] = sys.argv[1:3]; import conftest, test_rle\n"
            "print(sorted({f._hypothesis_internal_use_settings.max_examples for f in vars(test_rle).values()"
            " if hasattr(f, 'hypothesis')}))")
    proc = subprocess.run([sys.executable, "-c", code, str(here.parent), str(here)], capture_output=True, text=True,
                          env={**os.environ, "HYPOTHESIS_PROFILE": profile}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [f"[{expected}]"]
