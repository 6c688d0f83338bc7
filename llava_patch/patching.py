"""The one way ``llava_patch`` changes attributes of other packages (``llava``, ``transformers``, ``deepspeed``).

:func:`wrap` replaces ``owner.name`` by ``make(original)``, :func:`set_attribute` by a value. Each records the
original the first time, so patching the same attribute again changes nothing (every ``apply()`` is
idempotent), and :func:`undo_all` puts every original back (for tests). A replacement that can carry attributes
is marked with its original (:data:`MARKER`, read by :func:`original_of`); :func:`patched_attributes` lists what
is patched. :func:`swapped` replaces an attribute only within a ``with`` block.
"""

import contextlib
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Tuple

MARKER = "__llava_patch_original__"
_MISSING = object()


class _Record(NamedTuple):
    owner: Any
    name: str
    stored: Any  # the value in ``vars(owner)`` before patching (a classmethod stays one), or _MISSING


_records: Dict[Tuple[int, str], _Record] = {}


def is_patched(owner: Any, name: str) -> bool:
    """Whether ``owner.name`` was patched through this module (and not undone)."""
    return (id(owner), name) in _records


def original_of(value: Any) -> Any:
    """The original that the patched ``value`` replaced (``value`` itself when it is no replacement)."""
    return getattr(value, MARKER, value)


def _mark(replacement: Any, original: Any) -> None:
    target = replacement.__func__ if isinstance(replacement, (classmethod, staticmethod)) else replacement
    with contextlib.suppress(AttributeError, TypeError):  # plain values (bool, list) carry no marker
        setattr(target, MARKER, original)


def set_attribute(owner: Any, name: str, value: Any) -> bool:
    """Set ``owner.name = value`` unless this module already patched it; returns whether it did."""
    key = (id(owner), name)
    if key in _records:
        return False
    original = getattr(owner, name, None)
    _records[key] = _Record(owner, name, vars(owner).get(name, _MISSING))
    _mark(value, original)
    setattr(owner, name, value)
    return True


def wrap(owner: Any, name: str, make: Callable[[Any], Any]) -> bool:
    """Replace ``owner.name`` by ``make(original)`` (``original`` as ``getattr`` returns it) unless already done."""
    if is_patched(owner, name):
        return False
    return set_attribute(owner, name, make(getattr(owner, name)))


def patched_attributes() -> List[str]:
    """``owner.name`` of every patched attribute, in patching order."""
    return [f"{getattr(r.owner, '__name__', type(r.owner).__name__)}.{r.name}" for r in _records.values()]


def undo_all() -> None:
    """Restore every patched attribute (latest first); patching can start again afterwards."""
    for record in reversed(list(_records.values())):
        if record.stored is _MISSING:
            delattr(record.owner, record.name)
        else:
            setattr(record.owner, record.name, record.stored)
    _records.clear()


@contextlib.contextmanager
def swapped(owner: Any, name: str, value: Any) -> Iterator[None]:
    """Within the block, ``owner.name`` is ``value``; the previous value is restored on exit."""
    previous = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, previous)
