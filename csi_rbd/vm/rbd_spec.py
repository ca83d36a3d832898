"""QEMU's ``rbd:`` image specs: parsed and formatted the way QEMU reads them.

Grammar (QEMU ``block/rbd.c``: ``qemu_rbd_parse_filename``, since 5.2)::

    rbd:<pool>/[<namespace>/]<image>[@<snap>][:<key>=<value>[:<key>=<value>...]]

How QEMU reads it, and so how :func:`parse` does:

* A backslash escapes the character after it, whatever it is; a backslash at
  the very end stands for itself (``qemu_rbd_unescape``). Searching for a
  separator skips escaped characters (``qemu_rbd_strchr``).
* The pool ends at the first unescaped ``/``; without one the spec is
  refused ("pool name is required").
* If the rest holds an unescaped ``@`` *anywhere*, options included, the
  image ends there and the snapshot name runs to the next unescaped ``:``.
  An ``@`` in an option value must therefore be escaped, or QEMU takes the
  text before it for the image name.
* Otherwise the image ends at the first unescaped ``:``. An unescaped ``/``
  inside the image part splits off a RADOS namespace (QEMU 4.0+).
* Options are ``key=value`` pairs separated by unescaped ``:``; the key ends
  at the first unescaped ``=`` (a pair without one is refused), the value at
  the next unescaped ``:`` (so it may hold ``=``). ``id`` is the Ceph user,
  ``conf`` a ceph.conf to read; any other key is a Ceph option
  (``rados_conf_set``), e.g. ``mon_host``.

:func:`format_spec` escapes every ``\\``, ``:``, ``@`` and ``=`` and, in the pool,
namespace and image names, every ``/``; so ``parse(format_spec(s)) == s`` for
every spec, and ``format_spec(parse(t))`` is a canonical form of ``t``. On top
of QEMU's rules this module refuses what QEMU accepts here but fails on
later: empty pool, image, snapshot or option names, and NUL characters
(QEMU works on C strings).

A ``-drive file=...`` value has one more layer, QEMU's option syntax, where
``,`` is doubled; that belongs to :mod:`csi_rbd.vm.drive`, not here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

PREFIX = "rbd:"
ESCAPE = "\\"
_ALWAYS_ESCAPED = frozenset("\\:@=")
_NAME_ESCAPED = _ALWAYS_ESCAPED | {"/"}


class RbdSpecError(ValueError):
    """A string QEMU would not read as an ``rbd:`` spec, or a spec it could not hold."""


@dataclass(frozen=True)
class RbdSpec:
    """One ``rbd:`` spec; ``namespace`` ``""`` is the pool's default namespace."""

    pool: str
    image: str
    snap: str | None = None
    namespace: str = ""
    options: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        _check_name(self.pool, "pool")
        _check_name(self.image, "image")
        if self.snap is not None:
            _check_name(self.snap, "snapshot")
        _check_text(self.namespace, "namespace")
        for key, value in self.options:
            _check_name(key, "option")
            _check_text(value, f"option {key}")

    def option(self, key: str) -> str | None:
        """The value of ``key`` (the last one wins, as in QEMU), or None."""
        found = None
        for name, value in self.options:
            if name == key:
                found = value
        return found

    @property
    def user(self) -> str | None:
        """The Ceph user (``id``) QEMU connects as; None means Ceph's default."""
        return self.option("id")

    @property
    def conf(self) -> str | None:
        return self.option("conf")

    def __str__(self) -> str:
        return format_spec(self)


def _check_text(value: str, what: str) -> None:
    if "\0" in value:
        raise RbdSpecError(f"{what} holds a NUL character")


def _check_name(value: str, what: str) -> None:
    if not value:
        raise RbdSpecError(f"{what} name is empty")
    _check_text(value, f"{what} name")


# -- QEMU's tokenizer ------------------------------------------------------------------
def find_unescaped(text: str, delim: str, start: int = 0) -> int:
    """Index of the first ``delim`` not escaped by a backslash, or -1 (``qemu_rbd_strchr``)."""
    index = start
    while index < len(text):
        char = text[index]
        if char == delim:
            return index
        if char == ESCAPE and index + 1 < len(text):
            index += 1
        index += 1
    return -1


def next_token(text: str, delim: str) -> tuple[str, str | None]:
    """(token, rest after the delimiter), rest None without one (``qemu_rbd_next_tok``)."""
    end = find_unescaped(text, delim)
    if end < 0:
        return text, None
    return text[:end], text[end + 1 :]


def unescape(text: str) -> str:
    """Drop each escaping backslash; a trailing lone one stays (``qemu_rbd_unescape``)."""
    out = []
    index = 0
    while index < len(text):
        if text[index] == ESCAPE and index + 1 < len(text):
            index += 1
        out.append(text[index])
        index += 1
    return "".join(out)


def escape(text: str, special: Iterable[str] = _ALWAYS_ESCAPED) -> str:
    """``text`` with a backslash before every character of ``special``."""
    chars = frozenset(special) | {ESCAPE}
    return "".join(ESCAPE + char if char in chars else char for char in text)


# -- parse and format ---------------------------------------------------------------------
def parse(text: str) -> RbdSpec:
    """Read ``text`` the way QEMU does; RbdSpecError when QEMU (or librbd) would refuse it."""
    if not text.startswith(PREFIX):
        raise RbdSpecError(f"an rbd spec starts with {PREFIX!r}: {text!r}")
    pool, rest = next_token(text[len(PREFIX) :], "/")
    if rest is None:
        raise RbdSpecError(f"pool name is required: {text!r}")
    snap: str | None = None
    if find_unescaped(rest, "@") >= 0:
        image_part, rest = next_token(rest, "@")
        assert rest is not None
        snap_part, rest = next_token(rest, ":")
        snap = unescape(snap_part)
    else:
        image_part, rest = next_token(rest, ":")
    namespace = ""
    if find_unescaped(image_part, "/") >= 0:
        namespace_part, image_rest = next_token(image_part, "/")
        assert image_rest is not None
        namespace, image_part = unescape(namespace_part), image_rest
    options = []
    while rest is not None:
        key, rest = next_token(rest, "=")
        if rest is None:
            raise RbdSpecError(f"conf option {unescape(key)!r} has no value: {text!r}")
        value, rest = next_token(rest, ":")
        options.append((unescape(key), unescape(value)))
    try:
        return RbdSpec(
            pool=unescape(pool),
            image=unescape(image_part),
            snap=snap,
            namespace=namespace,
            options=tuple(options),
        )
    except RbdSpecError as exc:
        raise RbdSpecError(f"{exc}: {text!r}") from None


def format_spec(spec: RbdSpec) -> str:
    """The ``rbd:`` string QEMU reads back as ``spec``."""
    parts = [PREFIX, escape(spec.pool, _NAME_ESCAPED), "/"]
    if spec.namespace:
        parts += [escape(spec.namespace, _NAME_ESCAPED), "/"]
    parts.append(escape(spec.image, _NAME_ESCAPED))
    if spec.snap is not None:
        parts += ["@", escape(spec.snap)]
    for key, value in spec.options:
        parts += [":", escape(key), "=", escape(value)]
    return "".join(parts)
