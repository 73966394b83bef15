"""The queue as a sortable table (id, status, cells, uncertainty): a Qt item model over a
``DatasetQueue``, read lazily (10,000 rows cost nothing until they are scrolled into view)."""

from __future__ import annotations

from qtpy.QtCore import QAbstractTableModel, QModelIndex, QSortFilterProxyModel, Qt
from qtpy.QtGui import QFont
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QTableView

COLUMNS = ("id", "status", "cells", "uncertainty")
SORT_ROLE = Qt.ItemDataRole.UserRole


class QueueModel(QAbstractTableModel):
    """Rows in the queue's order (fixed until :meth:`reset`); the view sorts through a proxy."""

    def __init__(self):
        super().__init__()
        self.queue = None
        self.ids: list[str] = []
        self._row: dict[str, int] = {}
        self.current: str | None = None

    def reset(self, queue) -> None:
        self.beginResetModel()
        self.queue = queue
        self.ids = queue.order() if queue is not None else []
        self._row = {image_id: i for i, image_id in enumerate(self.ids)}
        self.endResetModel()

    def rowCount(self, parent=QModelIndex()):
        return 0 if parent.isValid() else len(self.ids)

    def columnCount(self, parent=QModelIndex()):
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):
        if role == Qt.ItemDataRole.DisplayRole and orientation == Qt.Orientation.Horizontal:
            return COLUMNS[section]
        return None

    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        item = self.queue[self.ids[index.row()]]
        col = COLUMNS[index.column()]
        if role == Qt.ItemDataRole.DisplayRole:
            value = item.status if col == "status" else getattr(item, col)
            if value is None:
                return "—"
            return f"{value:.3f}" if col == "uncertainty" else str(value)
        if role == SORT_ROLE:
            value = item.status if col == "status" else getattr(item, col)
            return -1.0 if value is None else value
        if role == Qt.ItemDataRole.FontRole and item.id == self.current:
            font = QFont()
            font.setBold(True)
            return font
        if role == Qt.ItemDataRole.ToolTipRole:
            return str(item.path)
        return None

    def changed(self, image_id: str | None) -> None:
        """Repaint the row of ``image_id`` (its status, cells or uncertainty changed)."""
        row = self._row.get(image_id) if image_id is not None else None
        if row is not None:
            self.dataChanged.emit(self.index(row, 0), self.index(row, len(COLUMNS) - 1))

    def set_current(self, image_id: str | None) -> None:
        old, self.current = self.current, image_id
        self.changed(old)
        self.changed(image_id)

    def row_of(self, image_id: str) -> int | None:
        return self._row.get(image_id)


def make_view(model: QueueModel, on_open) -> tuple[QTableView, QSortFilterProxyModel]:
    """The sortable table; a double-click calls ``on_open(image id)``."""
    proxy = QSortFilterProxyModel()
    proxy.setSourceModel(model)
    proxy.setSortRole(SORT_ROLE)
    view = QTableView()
    view.setModel(proxy)
    view.setSortingEnabled(True)
    view.sortByColumn(-1, Qt.SortOrder.AscendingOrder)  # the queue's own order until a click
    view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    view.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
    view.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    view.verticalHeader().setVisible(False)
    view.verticalHeader().setDefaultSectionSize(20)
    header = view.horizontalHeader()
    header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
    for col, width in ((1, 74), (2, 40), (3, 84)):  # the id gets the rest of the dock's width
        header.setSectionResizeMode(col, QHeaderView.ResizeMode.Fixed)
        header.resizeSection(col, width)
    view.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    view.setTextElideMode(Qt.TextElideMode.ElideMiddle)
    view.setMinimumHeight(150)
    view.setToolTip("The images, most doubtful first (click a header to sort); double-click "
                    "opens one")

    def opened(index):
        source = proxy.mapToSource(index)
        if source.isValid():
            on_open(model.ids[source.row()])

    view.doubleClicked.connect(opened)
    return view, proxy
