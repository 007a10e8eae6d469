"""Image file names (reference section 5): examples for each rule, then the properties."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbia_retriever.errors import UnsafeArchiveError
from nbia_retriever.naming import (
    LICENSE_ENTRY,
    MD5_ENTRY,
    ImageKey,
    assign_names,
    image_sort_key,
    parse_is,
    safe_entry_name,
)


def key(entry: str, acq: str | None, inst: str | None, uid: str = "") -> ImageKey:
    return ImageKey(entry=entry, acquisition=acq, instance=inst,
                    sop_instance_uid=uid or f"1.2.3.{entry}")


def shuffled(keys: list[ImageKey], seed: int = 7) -> list[ImageKey]:
    out = list(keys)
    random.Random(seed).shuffle(out)
    return out


def test_constants() -> None:
    assert (MD5_ENTRY, LICENSE_ENTRY) == ("md5hashes.csv", "LICENSE")


def test_two_acquisitions_of_42() -> None:
    keys = [key(f"{a}{i:03d}", str(a), str(i), f"1.2.{a}.{i}")
            for a in (1, 2) for i in range(1, 43)]
    names = assign_names(shuffled(keys))
    assert names["1001"] == "1-01.dcm"
    assert names["1042"] == "1-42.dcm"
    assert names["2001"] == "2-01.dcm"
    assert names["2042"] == "2-42.dcm"
    assert sorted(names.values()) == [f"{a}-{i:02d}.dcm" for a in (1, 2) for i in range(1, 43)]


def test_one_acquisition_of_five() -> None:
    names = assign_names(shuffled([key(str(i), "1", str(i)) for i in range(1, 6)]))
    assert [names[str(i)] for i in range(1, 6)] == [f"1-{i}.dcm" for i in range(1, 6)]


def test_instances_compare_as_numbers_not_text() -> None:
    names = assign_names([key("a", "1", "10"), key("b", "1", "9"), key("c", "1", "100")])
    assert (names["b"], names["a"], names["c"]) == ("1-1.dcm", "1-2.dcm", "1-3.dcm")


def test_acquisitions_compare_as_numbers_and_are_ordinals() -> None:
    names = assign_names([key("x", "10", "1"), key("y", "9", "1"), key("z", "700", "1")])
    assert (names["y"], names["x"], names["z"]) == ("1-1.dcm", "2-1.dcm", "3-1.dcm")


def test_padding_uses_largest_acquisition_and_count_of_acquisitions() -> None:
    keys = [key(f"a{a}-{i}", str(a), str(i)) for a in range(1, 12) for i in range(1, 3)]
    keys += [key(f"big{i}", "12", str(i)) for i in range(1, 101)]
    names = assign_names(keys)
    assert names["a1-1"] == "01-001.dcm"  # 12 acquisitions -> 2 digits; 100 images -> 3
    assert names["a11-2"] == "11-002.dcm"
    assert names["big100"] == "12-100.dcm"


def test_absent_and_empty_values_sort_first_and_form_one_acquisition() -> None:
    names = assign_names([
        key("n5", "1", "5"), key("absent", None, "2"), key("empty", "  ", "1"),
        key("junk", "abc", "3"), key("noinst", "1", None),
    ])
    assert names["empty"] == "1-1.dcm"  # no acquisition: group 1, instance 1
    assert names["absent"] == "1-2.dcm"
    assert names["junk"] == "1-3.dcm"  # non-numeric counts as absent
    assert names["noinst"] == "2-1.dcm"  # absent instance sorts before 5
    assert names["n5"] == "2-2.dcm"


@pytest.mark.parametrize(("raw", "value"), [
    ("3", 3), ("  3 ", 3), ("3.0", 3), ("+3", 3), ("-2", -2), ("2.5", 2.5), ("1e2", 100),
    ("", None), ("   ", None), (None, None), ("abc", None), ("1\\2", None), ("３", None),
    ("NaN", None), ("inf", None), ("1_000", None), ("1e99999999999999999999", None),
])
def test_parse_is(raw: str | None, value: float | None) -> None:
    parsed = parse_is(raw)
    assert (parsed is None) if value is None else (parsed == value)


def test_lenient_is_values_are_the_same_acquisition() -> None:
    names = assign_names([key("a", "3", "1"), key("b", " 3.0 ", "2"), key("c", "+3", "3")])
    assert sorted(names.values()) == ["1-1.dcm", "1-2.dcm", "1-3.dcm"]
    assert (names["a"], names["b"], names["c"]) == ("1-1.dcm", "1-2.dcm", "1-3.dcm")


def test_ties_broken_by_sop_uid_as_numbers() -> None:
    names = assign_names([
        key("a", "1", "1", "1.2.10"), key("b", "1", "1", "1.2.9"), key("c", "1", "1", "1.2.9.1"),
        key("d", "1", "1", "1.10"),
    ])
    assert (names["b"], names["c"], names["a"], names["d"]) == (
        "1-1.dcm", "1-2.dcm", "1-3.dcm", "1-4.dcm")


def test_repeated_instance_numbers_never_overwrite() -> None:
    """The nbiatoolkit failure: 60 images, all InstanceNumber 1, must give 60 files."""
    keys = [key(f"{n:08d}.dcm", "1", "1", f"1.2.826.0.1.{n}") for n in range(60)]
    names = assign_names(shuffled(keys))
    assert len(set(names.values())) == 60
    assert names["00000000.dcm"] == "1-01.dcm"
    assert names["00000059.dcm"] == "1-60.dcm"


def test_even_equal_uids_are_ordered_by_entry_name() -> None:
    names = assign_names([key("b", None, None, "1.2"), key("a", None, None, "1.2")])
    assert names == {"a": "1-1.dcm", "b": "1-2.dcm"}


def test_leading_zero_uid_components_compare_numerically_then_textually() -> None:
    names = assign_names([key("x", "1", "1", "1.02"), key("y", "1", "1", "1.2"),
                          key("z", "1", "1", "1.3")])
    assert (names["x"], names["y"], names["z"]) == ("1-1.dcm", "1-2.dcm", "1-3.dcm")


def test_empty_and_duplicate_entries() -> None:
    assert assign_names([]) == {}
    with pytest.raises(UnsafeArchiveError, match="twice"):
        assign_names([key("a", "1", "1"), key("a", "1", "2")])


def test_names_do_not_depend_on_input_order() -> None:
    keys = [key(f"e{n}", str(n % 3), str(n % 7), f"1.2.{n}") for n in range(50)]
    assert assign_names(keys) == assign_names(shuffled(keys, 1)) == assign_names(keys[::-1])


# ----------------------------------------------------------------------------- entries


@pytest.mark.parametrize(("raw", "out"), [
    ("LICENSE", "LICENSE"),
    ("annotations/seg.xml", "seg.xml"),
    ("a\\b\\c.xml", "c.xml"),
    ("C:\\evil\\x.xml", "x.xml"),
    ("C:x.xml", "x.xml"),
    ("../../etc/passwd", "passwd"),
    ("dir/..", "dir"),
    ("/abs/path/y.xml", "y.xml"),
    ("", "unnamed"),
    ("..", "unnamed"),
    ("/", "unnamed"),
    ("C:", "unnamed"),
    ("CON.xml", "CON_.xml"),
    ("ab:c?.xml", "ab_c_.xml"),
    ("notes. ", "notes"),
    ("sub/md5hashes.csv", "_md5hashes.csv"),
    ("MD5HASHES.CSV", "_MD5HASHES.CSV"),
    ("1-01.dcm", "_1-01.dcm"),
    ("x/12-3.DCM", "_12-3.DCM"),
    (".hidden.xml", "_hidden.xml"),
])
def test_safe_entry_name(raw: str, out: str) -> None:
    assert safe_entry_name(raw) == out


# ----------------------------------------------------------------------------- properties

_is_value = st.none() | st.sampled_from(["", " ", "x", "0", "1", "1.0", " 2 ", "+2", "10", "3"])
_uid = st.lists(st.integers(0, 30).map(str), min_size=1, max_size=4).map(".".join)


_series = st.lists(st.tuples(_is_value, _is_value, _uid), max_size=25).map(
    lambda rows: [ImageKey(entry=f"{n:08d}.dcm", acquisition=a, instance=i, sop_instance_uid=u)
                  for n, (a, i, u) in enumerate(rows)]
)


def _group_counts(keys: list[ImageKey]) -> list[int]:
    counts: dict[object, int] = {}
    for k in keys:
        value = parse_is(k.acquisition)
        counts[value] = counts.get(value, 0) + 1
    return list(counts.values())


@settings(max_examples=200, deadline=None)
@given(_series, st.randoms(use_true_random=False))
def test_names_unique_ordered_and_minimally_padded(keys: list[ImageKey],
                                                   rnd: random.Random) -> None:
    names = assign_names(keys)
    assert set(names) == {k.entry for k in keys}
    assert len(set(names.values())) == len(keys)
    # Sorting the names as text gives the (acquisition, instance, UID) order.
    by_rule = [k.entry for k in sorted(keys, key=image_sort_key)]
    by_name = sorted(names, key=names.__getitem__)
    assert by_name == by_rule
    # Widths: exactly the digits needed, no more, no less.
    if keys:
        counts = _group_counts(keys)
        a_parts = {n.split("-")[0] for n in names.values()}
        i_parts = {n.split("-")[1][: -len(".dcm")] for n in names.values()}
        assert {len(a) for a in a_parts} == {len(str(len(counts)))}
        assert {len(i) for i in i_parts} == {len(str(max(counts)))}
        assert max(int(a) for a in a_parts) == len(counts)
        assert max(int(i) for i in i_parts) == max(counts)
        assert all(n.endswith(".dcm") and n.count("-") == 1 for n in names.values())
    # Deterministic, whatever order the zip delivered the images in.
    again = list(keys)
    rnd.shuffle(again)
    assert assign_names(again) == names


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_safe_entry_name_is_a_single_safe_component(name: str) -> None:
    out = safe_entry_name(name)
    assert out and out not in (".", "..")
    assert "/" not in out and "\\" not in out and ":" not in out
    assert out[-1] not in ". " and out[0] != "."
    assert len(out.encode("utf-8")) <= 255
    assert out.casefold() != MD5_ENTRY


_numeric_text = st.text(max_size=30) | st.from_regex(
    r"[+-]?[0-9]{1,3}(\.[0-9]*)?([eE][+-]?[0-9]{1,25})?", fullmatch=True
)


@settings(max_examples=200, deadline=None)
@given(_numeric_text, _numeric_text)
def test_any_header_text_gets_a_name(acquisition: str, instance: str) -> None:
    """Whatever a header holds (huge exponents included), naming never crashes."""
    names = assign_names([ImageKey("a", acquisition, instance, "1.2"),
                          ImageKey("b", instance, acquisition, "1.3")])
    assert len(set(names.values())) == 2
