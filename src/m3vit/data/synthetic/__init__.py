"""Procedurally rendered indoor scenes with exact, mutually consistent labels for all six tasks.

A pinhole camera looks into a box room (textured floor, walls and ceiling) holding 2-6 objects
(spheres, boxes, cylinders, cones) resting on the floor and, in about three scenes out of four, one or
two articulated people built from primitives in random poses (``people="close"``: one or two people in
every scene, nearer the camera, so that body parts cover about three times as many pixels). Every pixel ray is intersected
analytically with every primitive (vectorised NumPy, see ``m3vit.data._geometry``), which gives exact
depth, normals, classes, instances and body parts; the image is shaded from the same geometry.

``SyntheticScenes(split, size, length, seed)`` is a map-style ``torch`` dataset: sample ``i`` is a pure
function of ``(split, i, seed)``, so no files are needed and every run sees the same data.

The package: ``scenes`` (scene description and sampling), ``textures`` (the room's procedural
textures), ``rendering`` (ray casting into the image and every label), ``dataset`` (``SyntheticScenes``).
"""

from __future__ import annotations

from .dataset import SPLIT_CODES, SYNTHETIC_TASKS, SyntheticScenes
from .rendering import (MIN_SALIENT_FRACTION, SALIENT_AREA_RATIO, RenderedScene, gaussian_field, instance_edges,
                        render_scene, salient_instances, sensor_noise)
from .scenes import CLASSES, PART_NAMES, PEOPLE_MODES, Camera, PeopleMode, Scene, sample_scene

__all__ = [
    "SyntheticScenes",
    "Camera",
    "Scene",
    "RenderedScene",
    "sample_scene",
    "render_scene",
    "gaussian_field",
    "sensor_noise",
    "CLASSES",
    "PART_NAMES",
    "SPLIT_CODES",
    "SYNTHETIC_TASKS",
    "PEOPLE_MODES",
    "PeopleMode",
    "MIN_SALIENT_FRACTION",
    "SALIENT_AREA_RATIO",
    "salient_instances",
    "instance_edges",
]
