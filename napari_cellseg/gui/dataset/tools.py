"""The dock's editing helpers with the model's own heads (a mixin of DatasetWidget):

* Box tool: a Shapes layer in rectangle mode; each box drawn -> ``prompts.segment_box`` -> one new
  cell (an undoable edit of the cells layer);
* Click tool: a Points layer in add mode; each click -> ``prompts.promote_click`` (the best
  candidate below the threshold under the click), else the box path around the click;
* Next doubtful cell: centre the view on the next most doubtful cell and outline it.
"""

from __future__ import annotations

import functools

import numpy as np

from napari_cellseg.gui.dataset.jobs import add_cell, box_job, centre_of, click_job, doubtful_cells
from napari_cellseg.gui.segment.edit import EditError

BOX_LAYER = "box: draw around a missed cell"
CLICK_LAYER = "click: a missed cell"
DOUBT_LAYER = "doubtful cell"


class ToolActions:
    """Box / Click tools and Next doubtful cell of the Review dataset dock."""

    def _init_tools(self):
        self._tool_worker = None
        self._doubt_pos = -1

    # ------------------------------------------------------------ layers of the tools
    def _tool_layer(self, name):
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def toggle_box_tool(self, *_):
        self._toggle_tool(BOX_LAYER, self.box_btn, self._add_box_layer)

    def toggle_click_tool(self, *_):
        self._toggle_tool(CLICK_LAYER, self.click_btn, self._add_click_layer)

    def _toggle_tool(self, name, btn, make):
        if self.current is None:
            btn.setChecked(False)
            return
        layer = self._tool_layer(name)
        active = self.viewer.layers.selection.active
        if layer is not None and active is not None and active.name == name:
            self.viewer.layers.remove(layer)  # second press: tool off
            btn.setChecked(False)
            cells = self.cells_layer()
            if cells is not None:
                self.viewer.layers.selection.active = cells
            return
        if layer is None:
            layer = make()
        self.viewer.layers.selection.active = layer
        btn.setChecked(True)
        self._info(f"{name}: the model segments it; Ctrl-Z on the cells layer undoes it.")

    def _add_box_layer(self):
        layer = self.viewer.add_shapes(name=BOX_LAYER, edge_color="yellow", face_color="transparent",
                                       edge_width=2)
        layer.mode = "add_rectangle"
        layer.events.data.connect(functools.partial(self._on_tool_data, BOX_LAYER))
        return layer

    def _add_click_layer(self):
        layer = self.viewer.add_points(name=CLICK_LAYER, size=8, face_color="yellow")
        layer.mode = "add"
        layer.events.data.connect(functools.partial(self._on_tool_data, CLICK_LAYER))
        return layer

    def _on_tool_data(self, name, event):
        if str(getattr(event, "action", "")).lower().split(".")[-1] != "added":
            return
        layer = self._tool_layer(name)
        if layer is None or not len(layer.data):
            return
        last = np.asarray(layer.data[-1], float)
        if name == BOX_LAYER:
            (y0, x0), (y1, x1) = last[:, -2:].min(axis=0), last[:, -2:].max(axis=0)
            self.add_from_box((y0, x0, y1, x1))
        else:
            self.add_from_click((last[-2], last[-1]))
        # the prompt is used: clear it after napari finished adding it
        from qtpy.QtCore import QTimer

        QTimer.singleShot(0, functools.partial(self._clear_tool, name))

    def _clear_tool(self, name):
        layer = self._tool_layer(name)
        if layer is not None and len(layer.data):
            layer.selected_data = set(range(len(layer.data)))
            layer.remove_selected()

    # ------------------------------------------------------------ box / click -> one new cell
    def add_from_box(self, box) -> bool:
        """Segment the cell in ``box`` (y0, x0, y1, x1 image px) with the mask head (worker)."""
        raw = self._shown_raw()
        if raw is None:
            return False
        return self._run_tool(box_job, raw, tuple(float(v) for v in box), self.checkpoint(), "auto",
                              self._cache)

    def add_from_click(self, yx) -> bool:
        """Add the cell under the click ``yx`` (image px): a candidate below the threshold, else
        the box path around the click (worker)."""
        raw = self._shown_raw()
        cells = self.cells_layer()
        if raw is None or cells is None:
            return False
        return self._run_tool(click_job, self._preds.get(self.current), raw, np.array(cells.data),
                              tuple(float(v) for v in yx), self.checkpoint(), "auto", self._cache)

    def _shown_raw(self):
        if self.current is None or self._layer_names is None:
            return None
        img = self._layers()[0]
        return None if img is None else np.asarray(img.data)

    def _run_tool(self, job, *args) -> bool:
        from napari.qt.threading import create_worker

        if self._tool_worker is not None:
            self._info("the model is still busy with the last box or click; try again in a moment")
            return False
        worker = create_worker(job, *args, _ignore_errors=True)
        worker.returned.connect(functools.partial(self._on_tool_done, self.current))
        worker.errored.connect(lambda exc: self._error(f"the model could not add a cell: {exc}"))
        worker.finished.connect(self._on_tool_finished)
        self._tool_worker = worker
        self._info("segmenting the new cell…")
        worker.start()
        return True

    def _on_tool_finished(self):
        self._tool_worker = None

    def _on_tool_done(self, image_id, value):
        mask, how = value
        cells = self.cells_layer()
        if image_id != self.current or cells is None:
            return  # the user moved on meanwhile: nothing is added to another image
        try:
            new = add_cell(cells, mask)
        except EditError as exc:
            self._error(str(exc))
            return
        via = "a candidate below the threshold" if how == "candidate" else "the mask head on the box"
        self._info(f"added cell {new} ({int(np.count_nonzero(np.asarray(cells.data) == new))} px, "
                   f"{via}); Ctrl-Z undoes it.")

    def _clear_doubtful(self):
        """Drop the outline of the last doubtful cell (another image is shown)."""
        outline = self._tool_layer(DOUBT_LAYER)
        if outline is not None and len(outline.data):
            outline.data = []
        self._doubt_pos = -1

    # ------------------------------------------------------------ next doubtful cell
    def next_doubtful(self, *_):
        """Centre the view on the next most doubtful cell of the shown image and outline it."""
        cells = self.cells_layer()
        if cells is None or self.current is None:
            return None
        labels = np.asarray(cells.data)
        order = doubtful_cells(self._preds.get(self.current), labels)
        if not order:
            self._info("no model output for this image (masks from a CSV or a draft): no doubtful "
                       "cell to show" if self._preds.get(self.current) is None else "no cells")
            return None
        self._doubt_pos = (self._doubt_pos + 1) % len(order)
        label, value = order[self._doubt_pos]
        y, x = centre_of(labels, label)
        self.viewer.camera.center = (y, x)
        ys, xs = np.nonzero(labels == label)
        rect = np.array([[ys.min() - 2, xs.min() - 2], [ys.max() + 2, xs.max() + 2]], float)
        outline = self._tool_layer(DOUBT_LAYER)
        if outline is None:
            outline = self.viewer.add_shapes(name=DOUBT_LAYER, edge_color="magenta",
                                             face_color="transparent", edge_width=2)
        outline.data = [rect]
        outline.shape_type = ["rectangle"]
        cells.selected_label = label
        self.viewer.layers.selection.active = cells
        self._info(f"cell {label}: uncertainty {value:.2f} ({self._doubt_pos + 1} of {len(order)}, "
                   "most doubtful first)")
        return label
