"""How the dock widgets of one viewer find each other (a small public registry, like micro-sam's
``AnnotatorState``), instead of searching napari's Qt main window.

Each widget registers itself under a role ("segment", "review", "train") for its viewer; others
look it up by role. Keys are the viewer object itself, with napari's ``PublicOnlyProxy`` (what a
widget docked from the Plugins menu receives) unwrapped, so the same viewer is found whichever
path opened the widget. Entries are weak: a closed widget or viewer disappears by itself.
No Qt or napari import here.
"""

from __future__ import annotations

import weakref
from typing import Any

ROLES = ("segment", "review", "train", "dataset")
_REGISTRY: "weakref.WeakKeyDictionary[Any, dict[str, weakref.ref]]" = weakref.WeakKeyDictionary()


def viewer_key(viewer) -> Any:
    """The real viewer behind a napari ``PublicOnlyProxy`` (or the object itself)."""
    return getattr(viewer, "__wrapped__", viewer)


def register(viewer, role: str, widget) -> None:
    """Make ``widget`` the ``role`` widget of ``viewer`` (replacing an earlier one)."""
    if role not in ROLES:
        raise ValueError(f"unknown widget role {role!r}; one of {', '.join(ROLES)}")
    _REGISTRY.setdefault(viewer_key(viewer), {})[role] = weakref.ref(widget)


def lookup(viewer, role: str):
    """The live ``role`` widget of ``viewer``, or None."""
    ref = _REGISTRY.get(viewer_key(viewer), {}).get(role)
    widget = ref() if ref is not None else None
    if widget is None:
        return None
    try:  # a Qt widget whose C++ side was deleted (dock closed) raises RuntimeError
        widget.objectName()
    except RuntimeError:
        return None
    except AttributeError:  # not a Qt object
        pass
    return widget
