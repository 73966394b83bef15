"""Dock layout shared by the three widgets: a scroll area so a dock never forces the window
taller than the screen, collapsible sections, and re-fitting napari's window to the screen
(public napari API only: ``viewer.window.geometry()`` / ``resize()``)."""

from __future__ import annotations

from qtpy.QtCore import QSize, Qt, QTimer
from qtpy.QtWidgets import (QApplication, QComboBox, QDockWidget, QFrame, QHBoxLayout, QMainWindow, QPushButton,
                            QScrollArea, QVBoxLayout, QWidget)

DOCK_WIDTH = 360  # px: the docks (tabbed on the right) leave >= 400 px of canvas at 1280 wide
MIN_CANVAS = 400
SANE_SIZE = (1280, 800)  # smallest window we grow a too-small one to (bounded by the screen)


class ScrollDock(QWidget):
    """Base of the dock widgets: ``self.content`` holds the form, inside a vertical scroll area.

    Its minimum height is small, so docking three widgets never grows the window past the
    screen; what does not fit scrolls. On first show the napari window is re-fitted."""

    def __init__(self):
        super().__init__()
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QFrame.Shape.NoFrame)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.content = QWidget()
        self.scroll.setWidget(self.content)
        outer.addWidget(self.scroll)
        self._fitted = False

    def compact(self):
        """Let every picker shrink to the dock's width (long names are elided, the full text is in
        the drop-down): call once the form is built. Nothing then scrolls sideways."""
        for combo in self.content.findChildren(QComboBox):
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(8)
        self.content.setMinimumWidth(min(self.content.minimumSizeHint().width(), DOCK_WIDTH - 20))

    def sizeHint(self):
        return QSize(DOCK_WIDTH, min(self.content.sizeHint().height() + 4, 520))

    def minimumSizeHint(self):
        return QSize(DOCK_WIDTH - 40, 120)

    def showEvent(self, event):
        super().showEvent(event)
        if not self._fitted:
            self._fitted = True
            viewer = getattr(self, "viewer", None)
            if viewer is not None:
                QTimer.singleShot(0, lambda: fit_window(viewer))
                tabify_with_siblings(self, viewer)


def dock_of(widget):
    """The QDockWidget that holds ``widget`` (napari wraps each docked widget in one), or None."""
    parent = widget.parentWidget() if widget is not None else None
    while parent is not None and not isinstance(parent, QDockWidget):
        parent = parent.parentWidget()
    return parent


def tabify_with_siblings(widget, viewer) -> bool:
    """Put ``widget``'s dock in one tab group with this plugin's other docks of the viewer (found
    through the registry), so each gets the full height instead of a third of it, and raise it.
    Plain Qt (QMainWindow.tabifyDockWidget), whichever path docked it: the Plugins menu or
    ``add_plugin_dock_widget``. Returns whether it was tabified."""
    from napari_cellseg.gui import registry

    dock = dock_of(widget)
    main = dock.parentWidget() if dock is not None else None
    if not isinstance(main, QMainWindow):
        return False
    for role in registry.ROLES:
        other = dock_of(registry.lookup(viewer, role))
        if other is None or other is dock or other.isFloating() or not other.toggleViewAction().isChecked():
            continue
        if main.dockWidgetArea(other) != main.dockWidgetArea(dock):
            continue
        main.tabifyDockWidget(other, dock)
        for d in (other, dock):  # the tabs show the widget's name, not "(napari-cellseg)"
            d.setWindowTitle(short_title(d.windowTitle()))
        dock.show()
        dock.raise_()
        return True
    return False


def short_title(title: str) -> str:
    """A dock title without napari's " (plugin name)" suffix: "Segment cells (napari-cellseg)"
    -> "Segment cells" (the tab text; napari keeps its own name for the dock)."""
    head, sep, tail = title.rpartition(" (")
    return head if sep and tail.endswith(")") and head else title


def available_screen() -> tuple[int, int]:
    screen = QApplication.primaryScreen()
    if screen is None:
        return SANE_SIZE
    g = screen.availableGeometry()
    return int(g.width()), int(g.height())


def fit_size(current: tuple[int, int], screen: tuple[int, int]) -> tuple[int, int]:
    """The window size to use: at least SANE_SIZE (a too-small saved size is grown), at most
    the screen (a too-large one is shrunk)."""
    w, h = current
    sw, sh = screen
    return min(max(w, SANE_SIZE[0]), sw), min(max(h, SANE_SIZE[1]), sh)


def fit_window(viewer) -> tuple[int, int]:
    """Resize napari's window to :func:`fit_size` (public API); returns the new size."""
    window = getattr(viewer, "window", None)
    if window is None:
        return (0, 0)
    try:
        left, top, w, h = window.geometry()
    except (AttributeError, RuntimeError):  # headless window / closed
        return (0, 0)
    sw, sh = available_screen()
    nw, nh = fit_size((w, h), (sw, sh))
    if (nw, nh) != (w, h):
        window.set_geometry(min(max(left, 0), max(sw - nw, 0)), min(max(top, 0), max(sh - nh, 0)),
                            nw, nh)
    return nw, nh


def button(text: str, tip: str, slot, enabled: bool = True) -> QPushButton:
    """A push button with its tooltip (every control has one) connected to ``slot``."""
    btn = QPushButton(text)
    btn.setToolTip(tip)
    btn.setEnabled(enabled)
    btn.clicked.connect(slot)
    return btn


def row_of(*items) -> QHBoxLayout:
    """A horizontal row of ``widget`` or ``(widget, stretch)`` items."""
    row = QHBoxLayout()
    for item in items:
        widget, stretch = item if isinstance(item, tuple) else (item, 0)
        row.addWidget(widget, stretch)
    return row
