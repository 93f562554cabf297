"""The centred box that holds the lung fields, shared by the shortcut audit and training's border options.

On a frontal chest film resized to a square, a centred box covering about 0.6 of the width
and height holds most of both lung fields; what lies outside it (text markers, collimation
edges, shoulders, the patient's size) tells more about the hospital than about the disease.
The audit hides one side or the other of this box; ``train_*.border`` trains against it.
"""

from __future__ import annotations


def center_box(size: int, fraction: float) -> tuple[slice, slice]:
    """Rows and columns of the centred square covering ``fraction`` of the image's width and height."""
    if not 0 < fraction < 1:
        raise ValueError(f"the centre box must cover between 0 and 1 of the image, got {fraction}")
    side = max(1, round(size * fraction))
    start = (size - side) // 2
    return slice(start, start + side), slice(start, start + side)
