"""Procedural floor plans: the built-in default data set of layoutgen.

Every layout is a colour-coded floor plan drawn with numpy array slicing (no per-pixel Python loops, no anti-aliasing):
a rectilinear building footprint (a rectangle, a rectangle minus one or two corner notches, or an L/T/U shape) placed
with a margin on a background canvas, recursively partitioned into rectangular rooms, each room filled with the
colour of its class, walls along every room boundary and the outline, and doors as gaps in interior walls.

The palette is part of the public API: ``PALETTE[segmentation] == rgb`` holds exactly for generated images, and
:func:`rgb_to_segmentation` maps any image (e.g. a model sample) back to class indices by nearest palette colour.

Determinism: layout ``i`` of a data set with seed ``K`` is drawn from ``numpy.random.SeedSequence([K, i])``, so it
does not depend on how many layouts were generated before it, nor on ``num``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from layoutgen.utils.atomic import atomic_write_text

__all__ = [
    "CLASS_NAMES",
    "NUM_CLASSES",
    "PALETTE",
    "BACKGROUND",
    "WALL",
    "ROOM_CLASSES",
    "LAYOUT_TYPES",
    "LAYOUT_TYPE_PROBS",
    "SyntheticLayout",
    "generate_layout",
    "generate_layouts",
    "layout_rng",
    "rgb_to_segmentation",
    "write_synthetic_dataset",
    "SyntheticLayoutDataset",
]

# ----------------------------------------------------------------------------------------------------------------------
# Public constants
# ----------------------------------------------------------------------------------------------------------------------

CLASS_NAMES: tuple[str, ...] = (
    "background",
    "wall",
    "living_room",
    "bedroom",
    "kitchen",
    "bathroom",
    "dining_room",
    "corridor",
    "balcony",
    "storage",
    "study",
)
NUM_CLASSES: int = len(CLASS_NAMES)

BACKGROUND, WALL = 0, 1
LIVING, BEDROOM, KITCHEN, BATHROOM, DINING, CORRIDOR, BALCONY, STORAGE, STUDY = range(2, NUM_CLASSES)
ROOM_CLASSES: tuple[int, ...] = tuple(range(2, NUM_CLASSES))

#: RGB colour of every class (row ``k`` is the colour of ``CLASS_NAMES[k]``); min pairwise L2 distance > 85.
PALETTE: np.ndarray = np.array(
    [
        (255, 255, 255),  # background: white
        (40, 40, 40),  # wall: near black
        (240, 160, 60),  # living_room: orange
        (80, 130, 230),  # bedroom: blue
        (215, 50, 60),  # kitchen: red
        (50, 215, 200),  # bathroom: turquoise
        (245, 230, 110),  # dining_room: yellow
        (175, 175, 175),  # corridor: grey
        (110, 195, 80),  # balcony: green
        (135, 85, 35),  # storage: brown
        (160, 80, 200),  # study: purple
    ],
    dtype=np.uint8,
)

LAYOUT_TYPES: tuple[str, ...] = ("apartment", "house", "studio", "office")
#: Deliberately unbalanced type frequencies (apartment >> house >> studio >> office).
LAYOUT_TYPE_PROBS: tuple[float, ...] = (0.55, 0.25, 0.13, 0.07)

_PALETTE_LIST = PALETTE.ravel().tolist()
_TYPE_CDF = np.cumsum(LAYOUT_TYPE_PROBS)
_TYPE_CDF[-1] = 1.0
_MIN_SIZE = 32

# Nominal room sizes: used to give big classes to big rooms and small classes to small rooms.
_NOMINAL_SIZE = {
    LIVING: 10.0,
    DINING: 6.5,
    BEDROOM: 6.0,
    STUDY: 5.0,
    KITCHEN: 4.5,
    BATHROOM: 2.5,
    STORAGE: 1.5,
}
# "Public" rooms act as hubs of the door graph; "private" rooms get few doors.
_HUB = {LIVING: 0.6, CORRIDOR: 0.9, DINING: 0.3}
_DEAD_END = {BATHROOM: 0.6, STORAGE: 0.6, BALCONY: 0.6, BEDROOM: 0.2, STUDY: 0.2}


@dataclass(frozen=True)
class _TypeSpec:
    rooms: tuple[int, int]  # inclusive range of the target room count (before balcony)
    shape_probs: dict[str, float]
    bbox_frac: tuple[float, float]  # footprint bounding-box side, as a fraction of the usable canvas
    corridor_prob: float
    balcony_prob: float


_TYPE_SPECS: dict[str, _TypeSpec] = {
    "apartment": _TypeSpec(
        rooms=(4, 8),
        shape_probs={"rect": 0.58, "notch1": 0.2, "notch2": 0.08, "L": 0.14},
        bbox_frac=(0.62, 0.95),
        corridor_prob=0.2,
        balcony_prob=0.4,
    ),
    "house": _TypeSpec(
        rooms=(5, 10),
        shape_probs={"rect": 0.26, "notch1": 0.16, "notch2": 0.12, "L": 0.2, "T": 0.12, "U": 0.14},
        bbox_frac=(0.72, 1.0),
        corridor_prob=0.45,
        balcony_prob=0.3,
    ),
    "studio": _TypeSpec(
        rooms=(1, 3),
        shape_probs={"rect": 0.72, "notch1": 0.18, "L": 0.1},
        bbox_frac=(0.45, 0.75),
        corridor_prob=0.0,
        balcony_prob=0.35,
    ),
    "office": _TypeSpec(
        rooms=(7, 14),
        shape_probs={"rect": 0.74, "notch1": 0.13, "L": 0.13},
        bbox_frac=(0.78, 1.0),
        corridor_prob=1.0,
        balcony_prob=0.0,
    ),
}


# ----------------------------------------------------------------------------------------------------------------------
# Layout record
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class SyntheticLayout:
    """One generated floor plan.

    Attributes:
        rgb: (H, W, 3) uint8 colour-coded plan, exactly ``PALETTE[segmentation]``.
        segmentation: (H, W) uint8 class indices into ``CLASS_NAMES``.
        outline: (H, W) uint8, 255 inside the building footprint (walls included), 0 outside; the ControlNet control.
        layout_type: one of ``LAYOUT_TYPES``.
        is_empty: True for a blank background canvas.
        room_count: number of rooms (0 when empty).
    """

    rgb: np.ndarray
    segmentation: np.ndarray
    outline: np.ndarray
    layout_type: str
    is_empty: bool
    room_count: int

    @property
    def label(self) -> int:
        """Index of ``layout_type`` in ``LAYOUT_TYPES``."""
        return LAYOUT_TYPES.index(self.layout_type)


# ----------------------------------------------------------------------------------------------------------------------
# Random streams
# ----------------------------------------------------------------------------------------------------------------------


def layout_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of layout ``index`` of a data set with seed ``seed`` (independent of every other index)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def _draw_header(rng: np.random.Generator, empty_prob: float) -> tuple[int, bool]:
    """The first two draws of every layout: its type index and whether it is empty."""
    u_type, u_empty = rng.random(2)
    type_idx = int(np.searchsorted(_TYPE_CDF, u_type, side="right"))
    return min(type_idx, len(LAYOUT_TYPES) - 1), bool(u_empty < empty_prob)


# ----------------------------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------------------------


def _weighted_index(rng: np.random.Generator, weights) -> int:
    """Index drawn with probability proportional to ``weights`` (cheaper than ``rng.choice(p=...)``)."""
    cdf = np.cumsum(weights, dtype=np.float64)
    return min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(cdf) - 1)


def _choice(rng: np.random.Generator, probs: dict[str, float]) -> str:
    keys = list(probs)
    return keys[_weighted_index(rng, [probs[k] for k in keys])]


def _colorize(seg: np.ndarray) -> np.ndarray:
    """``PALETTE[seg]`` via a PIL palette image (about 3x faster than numpy fancy indexing)."""
    from PIL import Image

    h, w = seg.shape
    im = Image.frombuffer("P", (w, h), np.ascontiguousarray(seg, dtype=np.uint8).tobytes(), "raw", "P", 0, 1)
    im.putpalette(_PALETTE_LIST)
    return np.array(im.convert("RGB"))


def _footprint(rng: np.random.Generator, size: int, spec: _TypeSpec, min_side: int):
    """Bounding box (y0, y1, x0, x1) and the notches (rectangles removed from it, each touching its border)."""
    margin = max(2, round(size * 0.06))
    avail = size - 2 * margin
    lo, hi = spec.bbox_frac
    bh = int(round(avail * rng.uniform(lo, hi)))
    bw = int(round(avail * rng.uniform(lo, hi)))
    # Keep the aspect ratio at most 1.8.
    if bh > 1.8 * bw:
        bh = int(1.8 * bw)
    if bw > 1.8 * bh:
        bw = int(1.8 * bh)
    bh, bw = max(bh, 3 * min_side), max(bw, 3 * min_side)
    bh, bw = min(bh, avail), min(bw, avail)
    y0 = margin + int(rng.integers(0, avail - bh + 1))
    x0 = margin + int(rng.integers(0, avail - bw + 1))

    shape = _choice(rng, spec.shape_probs)
    # Notches in the unit square, canonical orientation (top side / top-right corner); then randomly flipped and
    # transposed.
    u = rng.uniform
    if shape == "rect":
        unit = []
    elif shape == "notch1":
        unit = [(0.0, u(0.2, 0.38), 1.0 - u(0.2, 0.38), 1.0)]
    elif shape == "notch2":
        if rng.random() < 0.5:  # two corners on the same side
            unit = [(0.0, u(0.18, 0.35), 0.0, u(0.18, 0.3)), (0.0, u(0.18, 0.35), 1.0 - u(0.18, 0.3), 1.0)]
        else:  # diagonal corners
            unit = [(0.0, u(0.18, 0.35), 0.0, u(0.18, 0.35)), (1.0 - u(0.18, 0.35), 1.0, 1.0 - u(0.18, 0.35), 1.0)]
    elif shape == "L":
        unit = [(0.0, u(0.4, 0.6), 1.0 - u(0.4, 0.58), 1.0)]
    elif shape == "T":
        depth = u(0.35, 0.55)
        unit = [(0.0, depth, 0.0, u(0.25, 0.35)), (0.0, depth, 1.0 - u(0.25, 0.35), 1.0)]
    elif shape == "U":
        width = u(0.3, 0.42)
        left = 0.5 - width / 2 + u(-0.06, 0.06)
        unit = [(0.0, u(0.35, 0.6), left, left + width)]
    else:  # pragma: no cover - guarded by the spec tables
        raise AssertionError(shape)

    flip_y, flip_x, transpose = rng.random(3) < 0.5
    notches = []
    for ny0, ny1, nx0, nx1 in unit:
        if flip_y:
            ny0, ny1 = 1.0 - ny1, 1.0 - ny0
        if flip_x:
            nx0, nx1 = 1.0 - nx1, 1.0 - nx0
        if transpose:
            ny0, ny1, nx0, nx1 = nx0, nx1, ny0, ny1
        ry0, ry1 = _scale_span(ny0, ny1, y0, bh, min_side)
        rx0, rx1 = _scale_span(nx0, nx1, x0, bw, min_side)
        notches.append((ry0, ry1, rx0, rx1))
    return (y0, y0 + bh, x0, x0 + bw), notches


def _scale_span(a: float, b: float, origin: int, length: int, min_side: int) -> tuple[int, int]:
    """Unit interval [a, b) -> pixels; spans touching a border stay on it, every span and arm is >= min_side."""
    p0, p1 = int(round(a * length)), int(round(b * length))
    if a <= 0.0:
        p1 = min(max(p1, min_side), length - min_side)
    elif b >= 1.0:
        p0 = max(min(p0, length - min_side), min_side)
    else:  # an interior span (the U notch): keep both arms
        p0 = max(p0, min_side)
        p1 = min(max(p1, p0 + min_side), length - min_side)
    return origin + p0, origin + p1


def _overlap(a0: int, a1: int, b0: int, b1: int) -> int:
    return min(a1, b1) - max(a0, b0)


def _coverage(rect, notches) -> str:
    """'in', 'out' or 'partial': how a rectangle lies with respect to the footprint (bbox minus notches)."""
    y0, y1, x0, x1 = rect
    hit = False
    for ny0, ny1, nx0, nx1 in notches:
        if _overlap(y0, y1, ny0, ny1) > 0 and _overlap(x0, x1, nx0, nx1) > 0:
            if ny0 <= y0 and y1 <= ny1 and nx0 <= x0 and x1 <= nx1:
                return "out"
            hit = True
    return "partial" if hit else "in"


def _decompose(rng: np.random.Generator, bbox, notches) -> list[tuple[int, int, int, int]]:
    """Cut the bounding box along notch edges until every piece is fully inside or outside the footprint."""
    ycuts = sorted({c for n in notches for c in n[:2]})
    xcuts = sorted({c for n in notches for c in n[2:]})
    stack, pieces = [bbox], []
    while stack:
        rect = stack.pop()
        cov = _coverage(rect, notches)
        if cov == "out":
            continue
        if cov == "in":
            pieces.append(rect)
            continue
        y0, y1, x0, x1 = rect
        cands = [(0, c) for c in ycuts if y0 < c < y1] + [(1, c) for c in xcuts if x0 < c < x1]
        axis, c = cands[int(rng.integers(len(cands)))]
        stack.extend(_cut(rect, axis, c))
    return pieces


def _cut(rect, axis: int, c: int):
    y0, y1, x0, x1 = rect
    if axis == 0:
        return [(y0, c, x0, x1), (c, y1, x0, x1)]
    return [(y0, y1, x0, c), (y0, y1, c, x1)]


def _split_axis(rng: np.random.Generator, h: int, w: int, min_side: int) -> int | None:
    """0: cut along y (stack vertically), 1: cut along x; None when the rectangle is too small to split."""
    can_y, can_x = h >= 2 * min_side, w >= 2 * min_side
    if not (can_y or can_x):
        return None
    if can_y and not can_x:
        return 0
    if can_x and not can_y:
        return 1
    if h > 1.25 * w:
        return 0
    if w > 1.25 * h:
        return 1
    return int(rng.random() < 0.5)


def _split(rng: np.random.Generator, rect, min_side: int, axis: int | None = None):
    y0, y1, x0, x1 = rect
    h, w = y1 - y0, x1 - x0
    if axis is None:
        axis = _split_axis(rng, h, w, min_side)
        if axis is None:
            return None
    lo, length = (y0, h) if axis == 0 else (x0, w)
    r = rng.uniform(0.3, 0.7)
    c = lo + int(round(r * length))
    c = min(max(c, lo + min_side), lo + length - min_side)
    return _cut(rect, axis, c)


def _carve_corridor(rng: np.random.Generator, rect, min_side: int, width: int):
    """Split a rectangle into (side A, corridor, side B) along its long axis, or None when it is too small."""
    y0, y1, x0, x1 = rect
    h, w = y1 - y0, x1 - x0
    along_x = w >= h  # corridor runs along the long side
    short = h if along_x else w
    if short < 2 * min_side + width or max(h, w) < 3 * min_side:
        return None
    free = short - width
    a = int(round(free * rng.uniform(0.38, 0.62)))
    a = min(max(a, min_side), free - min_side)
    if along_x:
        return (y0, y0 + a, x0, x1), (y0 + a, y0 + a + width, x0, x1), (y0 + a + width, y1, x0, x1), 1
    return (y0, y1, x0, x0 + a), (y0, y1, x0 + a, x0 + a + width), (y0, y1, x0 + a + width, x1), 0


def _equal_split(rect, axis: int, n: int):
    """Cut a rectangle into n nearly equal pieces perpendicular to ``axis`` (1: cut along x)."""
    y0, y1, x0, x1 = rect
    lo, hi = (x0, x1) if axis == 1 else (y0, y1)
    edges = [lo + int(round(k * (hi - lo) / n)) for k in range(n + 1)]
    if axis == 1:
        return [(y0, y1, edges[k], edges[k + 1]) for k in range(n)]
    return [(edges[k], edges[k + 1], x0, x1) for k in range(n)]


def _on_bbox_edge(rect, bbox) -> list[int]:
    """Sides of ``rect`` on the bounding box border: 0 top, 1 bottom, 2 left, 3 right."""
    return [k for k in range(4) if rect[k] == bbox[k]]


def _rooms(rng: np.random.Generator, size: int, ltype: str, bbox, notches, min_side: int, t_ext: int):
    """Partition the footprint into rooms: list of [y0, y1, x0, x1, cls] (cls 0 = not assigned yet)."""
    spec = _TYPE_SPECS[ltype]
    leaves = [[*r, 0] for r in _decompose(rng, bbox, notches)]
    target = int(rng.integers(spec.rooms[0], spec.rooms[1] + 1))
    corridor_w = max(int(round(size * 0.075)), 2 * t_ext + 2)
    fixed = set()  # indices of leaves that must not be split further

    if rng.random() < spec.corridor_prob and (ltype == "office" or target >= 5):
        order = sorted(range(len(leaves)), key=lambda k: -(leaves[k][1] - leaves[k][0]) * (leaves[k][3] - leaves[k][2]))
        big = leaves[order[0]]
        carved = _carve_corridor(rng, tuple(big[:4]), min_side, corridor_w)
        if carved is not None:
            side_a, corr, side_b, axis = carved
            leaves.pop(order[0])
            leaves.append([*corr, CORRIDOR])
            fixed.add(len(leaves) - 1)
            if ltype == "office":
                # Rows of similar offices on both sides of the corridor.
                room_len = min_side * rng.uniform(1.3, 2.0)
                for side in (side_a, side_b):
                    length = side[3] - side[2] if axis == 1 else side[1] - side[0]
                    n = max(1, int(round(length / room_len)))
                    for piece in _equal_split(side, axis, n):
                        leaves.append([*piece, 0])
                        fixed.add(len(leaves) - 1)
            else:
                leaves.append([*side_a, 0])
                leaves.append([*side_b, 0])

    while len(leaves) < target:
        cands = [
            k
            for k, lf in enumerate(leaves)
            if k not in fixed and _split_axis(rng, lf[1] - lf[0], lf[3] - lf[2], min_side) is not None
        ]
        if not cands:
            break
        areas = np.array([(leaves[k][1] - leaves[k][0]) * (leaves[k][3] - leaves[k][2]) for k in cands], float)
        # Big rooms are split first; a studio instead subdivides its service strip (bathroom, kitchenette).
        k = cands[_weighted_index(rng, areas**-1.0 if ltype == "studio" else areas**1.5)]
        parts = _split(rng, tuple(leaves[k][:4]), min_side)
        if parts is None:  # pragma: no cover - candidates are splittable
            break
        # Keep indices of fixed leaves valid: replace in place and append the second half.
        leaves[k] = [*parts[0], 0]
        leaves.append([*parts[1], 0])
    return leaves


_BALCONY_HOSTS = (LIVING, BEDROOM, DINING, STUDY)


def _carve_balcony(rng: np.random.Generator, leaves, bbox, size: int, min_side: int) -> None:
    """Cut a thin balcony strip off the outer side of a living room / bedroom / dining room / study."""
    depth = max(int(round(size * rng.uniform(0.07, 0.1))), (min_side * 2) // 3)
    options = []
    for k, lf in enumerate(leaves):
        if lf[4] not in _BALCONY_HOSTS:
            continue
        h, w = lf[1] - lf[0], lf[3] - lf[2]
        for side in _on_bbox_edge(lf[:4], bbox):
            run, across = (w, h) if side < 2 else (h, w)
            if run >= 2 * min_side and across >= depth + min_side:
                options.append((k, side))
    if not options:
        return
    k, side = options[int(rng.integers(len(options)))]
    y0, y1, x0, x1, host = leaves[k]
    if side == 0:
        balcony, rest = (y0, y0 + depth, x0, x1), (y0 + depth, y1, x0, x1)
    elif side == 1:
        balcony, rest = (y1 - depth, y1, x0, x1), (y0, y1 - depth, x0, x1)
    elif side == 2:
        balcony, rest = (y0, y1, x0, x0 + depth), (y0, y1, x0 + depth, x1)
    else:
        balcony, rest = (y0, y1, x1 - depth, x1), (y0, y1, x0, x1 - depth)
    leaves[k] = [*rest, host]
    leaves.append([*balcony, BALCONY])


def _program(rng: np.random.Generator, ltype: str, n: int) -> list[int]:
    """The room classes of the ``n`` free rooms of a layout type."""
    if n <= 0:
        return []
    if ltype == "studio":
        prog = [LIVING, BATHROOM, KITCHEN if rng.random() < 0.6 else STORAGE]
        return prog[:n]
    if ltype == "office":
        prog = [BATHROOM]
        if n >= 4:
            prog.append(KITCHEN)
        if n >= 6:
            prog.append(STORAGE if rng.random() < 0.6 else BATHROOM)
        if n >= 8 and rng.random() < 0.5:
            prog.append(LIVING)  # lounge / meeting room
        prog += [STUDY] * (n - len(prog))
        return prog[:n]
    if ltype == "apartment":
        prog = [LIVING, BATHROOM, KITCHEN, BEDROOM]
        extras = [(DINING, 0.3), (STORAGE, 0.35), (STUDY, 0.2), (BATHROOM, 0.25)]
        fill = BEDROOM
    else:  # house
        prog = [LIVING, BATHROOM, KITCHEN, BEDROOM, BEDROOM]
        extras = [(DINING, 0.6), (STUDY, 0.4), (BATHROOM, 0.45), (STORAGE, 0.45)]
        fill = BEDROOM
    if n <= len(prog):
        return prog[:n]
    for cls, p in extras:
        if len(prog) < n and rng.random() < p:
            prog.append(cls)
    prog += [fill] * (n - len(prog))
    return prog


def _assign_classes(rng: np.random.Generator, ltype: str, leaves) -> None:
    free = [k for k, lf in enumerate(leaves) if lf[4] == 0]
    prog = _program(rng, ltype, len(free))
    # Big classes to big rooms, small classes to small rooms (with some jitter so the order is not rigid).
    prog.sort(key=lambda c: -(_NOMINAL_SIZE[c] * rng.uniform(0.75, 1.25)))
    areas = {k: (leaves[k][1] - leaves[k][0]) * (leaves[k][3] - leaves[k][2]) * rng.uniform(0.85, 1.15) for k in free}
    for k, cls in zip(sorted(free, key=lambda k: -areas[k]), prog):
        leaves[k][4] = cls


def _door_edges(leaves, margin: int, min_door: int):
    """Adjacent room pairs that can take a door: (i, j, axis, cut, start, end) with axis 1 a wall along y at x=cut."""
    edges = []
    n = len(leaves)
    for i in range(n):
        a = leaves[i]
        for j in range(i + 1, n):
            b = leaves[j]
            if a[3] == b[2] or b[3] == a[2]:
                cut, axis = (a[3] if a[3] == b[2] else a[2]), 1
                s, e = max(a[0], b[0]), min(a[1], b[1])
            elif a[1] == b[0] or b[1] == a[0]:
                cut, axis = (a[1] if a[1] == b[0] else a[0]), 0
                s, e = max(a[2], b[2]), min(a[3], b[3])
            else:
                continue
            if e - s - 2 * margin >= min_door:
                edges.append((i, j, axis, cut, s, e))
    return edges


def _choose_doors(rng: np.random.Generator, leaves, edges):
    """A random spanning forest of the adjacency graph (hubs preferred, dead-end rooms avoided) plus a few extras."""
    n = len(leaves)
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def weight(e) -> float:
        ci, cj = leaves[e[0]][4], leaves[e[1]][4]
        w = rng.random() - _HUB.get(ci, 0.0) - _HUB.get(cj, 0.0) + _DEAD_END.get(ci, 0.0) + _DEAD_END.get(cj, 0.0)
        if ci == cj == STUDY:
            w += 1.5  # offices open onto the corridor, not onto each other
        return w

    chosen, rest = [], []
    for e in sorted(edges, key=weight):
        ri, rj = find(e[0]), find(e[1])
        if ri != rj:
            parent[ri] = rj
            chosen.append(e)
        else:
            rest.append(e)
    for e in rest:
        ci, cj = leaves[e[0]][4], leaves[e[1]][4]
        if ci in _HUB and cj in _HUB and rng.random() < 0.5:
            chosen.append(e)
    return chosen


# ----------------------------------------------------------------------------------------------------------------------
# Public generation API
# ----------------------------------------------------------------------------------------------------------------------


def generate_layout(
    size: int = 128,
    seed: Any = 0,
    rng: np.random.Generator | None = None,
    layout_type: str | None = None,
    empty_prob: float = 0.05,
) -> SyntheticLayout:
    """Generate one floor plan of ``size`` x ``size`` pixels.

    Args:
        size: canvas side in pixels (>= 32; any value, not only powers of two).
        seed: seed of a fresh ``numpy.random.default_rng`` (int, sequence or ``SeedSequence``); ignored when ``rng``
            is given.
        rng: generator to draw from.
        layout_type: force a type from ``LAYOUT_TYPES``; by default drawn with ``LAYOUT_TYPE_PROBS``.
        empty_prob: probability of a blank canvas (``is_empty=True``).
    """
    size = int(size)
    if size < _MIN_SIZE:
        raise ValueError(f"size must be >= {_MIN_SIZE}, got {size}")
    if rng is None:
        rng = np.random.default_rng(seed)
    type_idx, is_empty = _draw_header(rng, empty_prob)
    if layout_type is not None:
        if layout_type not in LAYOUT_TYPES:
            raise ValueError(f"unknown layout_type {layout_type!r}; expected one of {LAYOUT_TYPES}")
        type_idx = LAYOUT_TYPES.index(layout_type)
    ltype = LAYOUT_TYPES[type_idx]

    seg = np.zeros((size, size), dtype=np.uint8)
    if is_empty:
        return SyntheticLayout(_colorize(seg), seg, np.zeros_like(seg), ltype, True, 0)

    t = max(1, size // 64)  # interior walls
    t_ext = max(t + 1, int(round(1.5 * t)))  # outer walls are a little thicker
    min_side = max(6, int(round(size * 0.1)))
    bbox, notches = _footprint(rng, size, _TYPE_SPECS[ltype], min_side)
    leaves = _rooms(rng, size, ltype, bbox, notches, min_side, t_ext)
    _assign_classes(rng, ltype, leaves)
    if rng.random() < _TYPE_SPECS[ltype].balcony_prob:
        _carve_balcony(rng, leaves, bbox, size, min_side)

    # Footprint and its outer wall: erode(bbox \ notches) = erode(bbox) \ dilate(notches) (square element).
    by0, by1, bx0, bx1 = bbox
    fp = np.zeros((size, size), dtype=bool)
    fp[by0:by1, bx0:bx1] = True
    inner = np.zeros_like(fp)
    inner[by0 + t_ext : by1 - t_ext, bx0 + t_ext : bx1 - t_ext] = True
    for ny0, ny1, nx0, nx1 in notches:
        fp[ny0:ny1, nx0:nx1] = False
        inner[max(ny0 - t_ext, 0) : ny1 + t_ext, max(nx0 - t_ext, 0) : nx1 + t_ext] = False

    # Floors, then a wall band of thickness t centred on every room edge, then the outer wall.
    for y0, y1, x0, x1, cls in leaves:
        seg[y0:y1, x0:x1] = cls
    wall = ~inner & fp
    h0, h1 = t // 2, t - t // 2
    for y0, y1, x0, x1, _ in leaves:
        wall[max(y0 - h0, 0) : y0 + h1, x0:x1] = True
        wall[max(y1 - h0, 0) : y1 + h1, x0:x1] = True
        wall[y0:y1, max(x0 - h0, 0) : x0 + h1] = True
        wall[y0:y1, max(x1 - h0, 0) : x1 + h1] = True
    wall &= fp
    seg[wall] = WALL

    # Doors: gaps in interior walls, filled with the floor of one of the two rooms.
    margin = t_ext + 1
    min_door = max(3, 2 * t + 1)
    door_w = max(min_door, int(round(size * 0.07)))
    for i, j, axis, cut, s, e in _choose_doors(rng, leaves, _door_edges(leaves, margin, min_door)):
        g = min(door_w, e - s - 2 * margin)
        p = int(rng.integers(s + margin, e - margin - g + 1))
        cls = leaves[i][4] if rng.random() < 0.5 else leaves[j][4]
        if axis == 1:
            seg[p : p + g, cut - h0 : cut + h1] = cls
        else:
            seg[cut - h0 : cut + h1, p : p + g] = cls

    outline = fp.astype(np.uint8) * 255
    return SyntheticLayout(_colorize(seg), seg, outline, ltype, False, len(leaves))


def generate_layouts(num: int, size: int = 128, seed: int = 0, empty_prob: float = 0.05) -> list[SyntheticLayout]:
    """Layouts ``0 .. num-1`` of the data set with seed ``seed`` (layout i drawn from ``SeedSequence([seed, i])``)."""
    return [generate_layout(size, rng=layout_rng(seed, i), empty_prob=empty_prob) for i in range(int(num))]


# ----------------------------------------------------------------------------------------------------------------------
# Reading images back
# ----------------------------------------------------------------------------------------------------------------------


def _nearest_palette(flat, palette, chunk: int, xp_torch: bool):
    """argmin_k ||x - p_k||^2 = argmin_k (||p_k||^2 - 2 x.p_k), in chunks of pixels."""
    if xp_torch:
        import torch

        pn = (palette * palette).sum(1)
        out = torch.empty(flat.shape[0], dtype=torch.int64, device=flat.device)
        for s in range(0, flat.shape[0], chunk):
            out[s : s + chunk] = torch.argmin(pn[None, :] - 2.0 * flat[s : s + chunk] @ palette.T, dim=1)
        return out
    pn = (palette * palette).sum(1)
    out = np.empty(flat.shape[0], dtype=np.uint8)
    for s in range(0, flat.shape[0], chunk):
        out[s : s + chunk] = np.argmin(pn[None, :] - 2.0 * flat[s : s + chunk] @ palette.T, axis=1)
    return out


def rgb_to_segmentation(rgb, value_range: tuple[float, float] | None = None, chunk: int = 1 << 20):
    """Map every pixel to the index of the nearest ``PALETTE`` colour (exact inverse of ``PALETTE[seg]``).

    Args:
        rgb: a numpy array (..., H, W, 3) or a torch tensor, channels-last (..., H, W, 3) or channels-first
            (..., 3, H, W) (channels-last wins when the last dim is 3).
        value_range: (low, high) of the input values. Default: integer dtypes are 0..255, floating dtypes are the
            model convention [-1, 1] (``x / 127.5 - 1``).
        chunk: pixels per distance block (bounds memory).

    Returns:
        numpy uint8 (..., H, W) for numpy input; torch int64 (..., H, W) on the input's device for torch input.
    """
    try:
        import torch

        is_torch = isinstance(rgb, torch.Tensor)
    except ImportError:  # pragma: no cover - torch is a dependency of layoutgen
        is_torch = False

    if is_torch:
        x = rgb
        if x.shape[-1] != 3:
            if x.dim() < 3 or x.shape[-3] != 3:
                raise ValueError(f"expected (..., H, W, 3) or (..., 3, H, W), got {tuple(x.shape)}")
            x = x.movedim(-3, -1)
        floating = x.is_floating_point()
        x = x.to(torch.float32)
        if value_range is None and floating:
            value_range = (-1.0, 1.0)
        if value_range is not None:
            lo, hi = value_range
            x = (x - lo) * (255.0 / (hi - lo))
        shape = x.shape[:-1]
        palette = torch.as_tensor(PALETTE, dtype=torch.float32, device=x.device)
        out = _nearest_palette(x.reshape(-1, 3), palette, chunk, True)
        return out.reshape(shape)

    x = np.asarray(rgb)
    if x.shape[-1] != 3:
        raise ValueError(f"expected a numpy array (..., H, W, 3), got {x.shape}")
    floating = np.issubdtype(x.dtype, np.floating)
    x = x.astype(np.float32)
    if value_range is None and floating:
        value_range = (-1.0, 1.0)
    if value_range is not None:
        lo, hi = value_range
        x = (x - lo) * (255.0 / (hi - lo))
    out = _nearest_palette(x.reshape(-1, 3), PALETTE.astype(np.float32), chunk, False)
    return out.reshape(x.shape[:-1])


# ----------------------------------------------------------------------------------------------------------------------
# On-disk data set
# ----------------------------------------------------------------------------------------------------------------------


def write_synthetic_dataset(
    out_dir: str | os.PathLike,
    num: int,
    size: int = 128,
    seed: int = 0,
    empty_prob: float = 0.05,
) -> Path:
    """Write ``num`` layouts as PNGs plus a ``manifest.csv``; returns the manifest path.

    Layout: ``images/00000.png`` (RGB), ``segmentation/00000.png`` (mode L class indices), ``control/00000.png``
    (mode L outline, 0/255). The manifest has columns layout_path, seg_path, control_path (relative to ``out_dir``),
    type, is_empty, room_count, and is written atomically (temp file + ``os.replace``).
    """
    import pandas as pd
    from PIL import Image

    out = Path(out_dir)
    dirs = {name: out / name for name in ("images", "segmentation", "control")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(max(int(num) - 1, 0))))
    rows = []
    for i in range(int(num)):
        lay = generate_layout(size, rng=layout_rng(seed, i), empty_prob=empty_prob)
        name = f"{i:0{width}d}.png"
        Image.fromarray(lay.rgb, mode="RGB").save(dirs["images"] / name, compress_level=3)
        Image.fromarray(lay.segmentation, mode="L").save(dirs["segmentation"] / name, compress_level=3)
        Image.fromarray(lay.outline, mode="L").save(dirs["control"] / name, compress_level=3)
        rows.append(
            {
                "layout_path": f"images/{name}",
                "seg_path": f"segmentation/{name}",
                "control_path": f"control/{name}",
                "type": lay.layout_type,
                "is_empty": lay.is_empty,
                "room_count": lay.room_count,
            }
        )
    columns = ["layout_path", "seg_path", "control_path", "type", "is_empty", "room_count"]
    df = pd.DataFrame(rows, columns=columns)
    manifest = out / "manifest.csv"
    atomic_write_text(manifest, df.to_csv(index=False))
    return manifest


# ----------------------------------------------------------------------------------------------------------------------
# torch Dataset
# ----------------------------------------------------------------------------------------------------------------------

try:
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover - torch is a dependency of layoutgen
    _TorchDataset = object  # type: ignore[assignment,misc]


class SyntheticLayoutDataset(_TorchDataset):
    """``num`` procedural layouts, generated lazily and deterministically per index.

    ``__getitem__`` returns a dict:
        ``rgb``: float32 [3, H, W] in [-1, 1] (``x / 127.5 - 1``);
        ``segmentation``: int64 [H, W] class indices;
        ``label``: int64 scalar, index of the layout type in ``LAYOUT_TYPES``;
        ``control``: float32 [1, H, W] footprint mask in {0, 1};
        ``is_empty``: bool.
    """

    def __init__(self, num: int, size: int = 128, seed: int = 0, empty_prob: float = 0.05, cache: bool = False):
        if int(num) < 0:
            raise ValueError(f"num must be >= 0, got {num}")
        if int(size) < _MIN_SIZE:
            raise ValueError(f"size must be >= {_MIN_SIZE}, got {size}")
        self.num, self.size, self.seed, self.empty_prob = int(num), int(size), int(seed), float(empty_prob)
        self.cache = bool(cache)
        self._cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return self.num

    def layout(self, index: int) -> SyntheticLayout:
        """The raw :class:`SyntheticLayout` of ``index``."""
        index = self._check(index)
        return generate_layout(self.size, rng=layout_rng(self.seed, index), empty_prob=self.empty_prob)

    def label(self, index: int) -> int:
        """The layout-type label of ``index``, without drawing the layout."""
        index = self._check(index)
        return _draw_header(layout_rng(self.seed, index), self.empty_prob)[0]

    def labels(self) -> np.ndarray:
        """int64 [num] layout-type labels (cheap: only the first draws of each layout are made)."""
        return np.array([self.label(i) for i in range(self.num)], dtype=np.int64)

    def class_counts(self) -> np.ndarray:
        """int64 [len(LAYOUT_TYPES)] number of layouts of each type (e.g. for class-balanced sampling weights)."""
        return np.bincount(self.labels(), minlength=len(LAYOUT_TYPES)).astype(np.int64)

    def _check(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += self.num
        if not 0 <= index < self.num:
            raise IndexError(f"index {index} out of range for {self.num} layouts")
        return index

    def __getitem__(self, index: int) -> dict:
        import torch

        index = self._check(index)
        if self.cache and index in self._cache:
            return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in self._cache[index].items()}
        lay = self.layout(index)
        item = {
            "rgb": torch.from_numpy(lay.rgb).permute(2, 0, 1).to(torch.float32).div_(127.5).sub_(1.0),
            "segmentation": torch.from_numpy(lay.segmentation.astype(np.int64)),
            "label": torch.tensor(lay.label, dtype=torch.int64),
            "control": torch.from_numpy((lay.outline > 0).astype(np.float32))[None],
            "is_empty": bool(lay.is_empty),
        }
        if self.cache:
            self._cache[index] = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in item.items()}
        return item
