"""``rbd:`` specs: QEMU's reading rules, and round trips of every escaped form."""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csi_rbd.vm.rbd_spec import (
    RbdSpec,
    RbdSpecError,
    escape,
    find_unescaped,
    format_spec,
    parse,
    unescape,
)
from tests.vm.conftest import QEMU_IMG

# Cases worked out by hand from QEMU's qemu_rbd_parse_filename.
EXAMPLES = [
    ("rbd:rbd/disk", RbdSpec("rbd", "disk")),
    ("rbd:rbd/disk@base", RbdSpec("rbd", "disk", "base")),
    (
        "rbd:rbd/disk@base:id=admin:conf=/etc/ceph/ceph.conf",
        RbdSpec("rbd", "disk", "base", options=(("id", "admin"), ("conf", "/etc/ceph/ceph.conf"))),
    ),
    ("rbd:rbd/ns/disk", RbdSpec("rbd", "disk", namespace="ns")),
    ("rbd:rbd//disk", RbdSpec("rbd", "disk")),  # an empty namespace is the default one
    ("rbd:rbd/ns/a/b", RbdSpec("rbd", "a/b", namespace="ns")),  # only the first / splits
    ("rbd:rbd/a\\/b", RbdSpec("rbd", "a/b")),
    ("rbd:p\\/q/i", RbdSpec("p/q", "i")),
    ("rbd:rbd/a\\@b@c", RbdSpec("rbd", "a@b", "c")),
    ("rbd:rbd/i@s@t", RbdSpec("rbd", "i", "s@t")),  # only the first @ splits
    ("rbd:rbd/i@s\\:t", RbdSpec("rbd", "i", "s:t")),
    (
        "rbd:rbd/i:mon_host=127.0.0.1\\:3300",
        RbdSpec("rbd", "i", options=(("mon_host", "127.0.0.1:3300"),)),
    ),
    ("rbd:rbd/i:k=a=b", RbdSpec("rbd", "i", options=(("k", "a=b"),))),  # = ends only the key
    ("rbd:rbd/i:k\\=x=y", RbdSpec("rbd", "i", options=(("k=x", "y"),))),
    ("rbd:rbd/i:k=", RbdSpec("rbd", "i", options=(("k", ""),))),
    ("rbd:rbd/i\\", RbdSpec("rbd", "i\\")),  # a trailing backslash stands for itself
    ("rbd:rbd/i\\\\", RbdSpec("rbd", "i\\")),
    ("rbd:rbd/\\i", RbdSpec("rbd", "i")),  # any character may be escaped
    # an unescaped @ in an option value starts the snapshot name
    ("rbd:rbd/i:k=a@b", RbdSpec("rbd", "i:k=a", "b")),
]


@pytest.mark.parametrize(("text", "expected"), EXAMPLES, ids=[t for t, _ in EXAMPLES])
def test_examples(text: str, expected: RbdSpec) -> None:
    assert parse(text) == expected
    assert parse(format_spec(expected)) == expected


REFUSED = [
    "rbd/disk",  # no prefix
    "rbd:disk",  # no pool
    "rbd:rbd\\/disk",  # the only / is escaped
    "rbd:/disk",
    "rbd:rbd/",
    "rbd:rbd/i@",
    "rbd:rbd/i@:id=a",
    "rbd:rbd/i:novalue",
    "rbd:rbd/i:=v",
    "rbd:rbd/i:id=a:",  # an empty last option
    "rbd:rbd/a\0b",
]


@pytest.mark.parametrize("text", REFUSED)
def test_refused(text: str) -> None:
    with pytest.raises(RbdSpecError):
        parse(text)


def test_formatter_refuses_what_qemu_cannot_hold() -> None:
    for bad in (
        lambda: RbdSpec("", "i"),
        lambda: RbdSpec("p", ""),
        lambda: RbdSpec("p", "i", ""),
        lambda: RbdSpec("p", "i\0"),
        lambda: RbdSpec("p", "i", options=(("", "v"),)),
    ):
        with pytest.raises(RbdSpecError):
            bad()


def test_accessors() -> None:
    spec = parse("rbd:p/i:id=a:conf=/c:id=b")
    assert (spec.user, spec.conf, spec.option("x")) == ("b", "/c", None)
    assert str(spec) == "rbd:p/i:id=a:conf=/c:id=b"


# -- property tests ------------------------------------------------------------------------
# Text with every character that means something to the parser, and the rest of Unicode.
_SPECIAL = "\\:@=/"
_chars = st.one_of(st.sampled_from(_SPECIAL), st.characters(blacklist_characters="\0"))
_text = st.text(_chars, max_size=12)
_name = st.text(_chars, min_size=1, max_size=12)
specs = st.builds(
    RbdSpec,
    pool=_name,
    image=_name,
    snap=st.none() | _name,
    namespace=_text,
    options=st.lists(st.tuples(_name, _text), max_size=4).map(tuple),
)


@given(specs)
def test_format_then_parse_is_identity(spec: RbdSpec) -> None:
    text = format_spec(spec)
    assert parse(text) == spec
    assert format_spec(parse(text)) == text  # formatting is canonical


@given(st.text(st.sampled_from(_SPECIAL + "ab"), max_size=30))
def test_every_escaped_form_round_trips(body: str) -> None:
    """Whatever QEMU reads from a string, the formatter writes back to the same reading."""
    try:
        spec = parse("rbd:" + body)
    except RbdSpecError:
        return
    assert parse(format_spec(spec)) == spec


@given(_text)
def test_escape_unescape(value: str) -> None:
    escaped = escape(value, _SPECIAL)
    assert unescape(escaped) == value
    for delim in _SPECIAL.replace("\\", ""):
        assert find_unescaped(escaped, delim) == -1


# -- QEMU itself ----------------------------------------------------------------------------
@pytest.mark.skipif(QEMU_IMG is None, reason="needs qemu-img (qemu-utils, qemu-block-extra)")
@pytest.mark.parametrize("conf", ["/nonexistent/a:b@c=d\\e", "/nonexistent/plain.conf"])
def test_qemu_reads_the_conf_value_we_wrote(conf: str) -> None:
    """QEMU names the conf file it failed to read: proof of how it unescaped the value."""
    spec = RbdSpec("rbd", "img@x", "snap:1", options=(("id", "a=b"), ("conf", conf)))
    answer = subprocess.run(
        [str(QEMU_IMG), "info", format_spec(spec)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert answer.returncode != 0
    assert f"error reading conf file {conf}" in answer.stderr, answer.stderr
