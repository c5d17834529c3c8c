"""Procedurally rendered indoor scenes with exact, mutually consistent labels for all six tasks.

A pinhole camera looks into a box room (textured floor, walls and ceiling) holding 2-6 objects
(spheres, boxes, cylinders, cones) resting on the floor and, in about three scenes out of four, one or
two articulated people built from primitives in random poses (``people="close"``: one or two people in
every scene, nearer the camera, so that body parts cover about three times as many pixels). Every pixel ray is intersected
analytically with every primitive (vectorised NumPy, see ``m3vit.data._geometry``), which gives exact
depth, normals, classes, instances and body parts; the image is shaded from the same geometry.

``SyntheticScenes(split, size, length, seed)`` is a map-style ``torch`` dataset: sample ``i`` is a pure
function of ``(split, i, seed)``, so no files are needed and every run sees the same data.
"""

from __future__ import annotations

import colorsys
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..models.config import MAX_INPUT_SIDE
from ..tasks.base import IGNORE
from ..utils.errors import ConfigError
from ._geometry import ROOM_SURFACES, Box, Capsule, Cone, Cylinder, Ellipsoid, Primitive, RayCaster, Sphere

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

#: Semantic classes, in label order (``semseg`` value = index).
CLASSES: tuple[str, ...] = ("floor", "wall", "ceiling", "person", "sphere", "box", "cylinder", "cone")
#: Human-part labels as PASCAL-Part groups them (0 = background, i.e. every non-person pixel).
PART_NAMES: tuple[str, ...] = ("background", "head", "torso", "upper_arm", "lower_arm", "upper_leg", "lower_leg")
#: Fixed split codes: they enter the seed, so the splits draw from disjoint random streams.
SPLIT_CODES: dict[str, int] = {"train": 0, "val": 1, "test": 2}
#: Tasks the dataset provides labels for, in their canonical order.
SYNTHETIC_TASKS: tuple[str, ...] = ("semseg", "human_parts", "sal", "normals", "edge", "depth")

HEAD, TORSO, UPPER_ARM, LOWER_ARM, UPPER_LEG, LOWER_LEG = 1, 2, 3, 4, 5, 6
_CLASS_ID = {name: i for i, name in enumerate(CLASSES)}
_OBJECT_CLASSES = ("sphere", "box", "cylinder", "cone")
_ROOM_CLASS = tuple("floor" if s == "floor" else "ceiling" if s == "ceiling" else "wall" for s in ROOM_SURFACES)
_FLOOR, _CEILING = ROOM_SURFACES.index("floor"), ROOM_SURFACES.index("ceiling")



@dataclass(frozen=True)
class PeopleMode:
    """How often people appear and where they stand: ``counts`` the probabilities of 0, 1 and 2 people
    in a scene, ``distance`` the range (metres) of their distance from the camera along the floor."""

    counts: tuple[float, float, float]
    distance: tuple[float, float]


#: ``sparse`` (the default): people in ~75% of the scenes, 2.3-6 m away; at 128x128 their parts cover
#: ~2.7% of the pixels (head ~0.2%, smaller than one 16x16 patch). ``close``: one or two people in every
#: scene, 1.4-3.4 m away; parts cover ~8.7% of the pixels (every part 3-4x larger).
PEOPLE_MODES: dict[str, PeopleMode] = {
    "sparse": PeopleMode(counts=(0.25, 0.45, 0.30), distance=(2.3, 6.0)),
    "close": PeopleMode(counts=(0.0, 0.5, 0.5), distance=(1.4, 3.4)),
}

#: A visible instance needs at least this share of the image to count for saliency.
MIN_SALIENT_FRACTION = 0.002
#: An object is salient too when it covers at least this multiple of the largest salient area.
SALIENT_AREA_RATIO = 1.0


# ---------------------------------------------------------------------------------------------
# Scene description
# ---------------------------------------------------------------------------------------------
def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / math.sqrt(float(v @ v))


@dataclass(frozen=True, eq=False)
class Camera:
    """Pinhole camera: world ``position``, ``yaw`` (0 looks along world ``-z``, positive turns towards
    ``-x``), ``pitch`` (negative looks down), roll 0, horizontal field of view ``fov`` (radians)."""

    position: np.ndarray
    yaw: float
    pitch: float
    fov: float

    @property
    def forward(self) -> np.ndarray:
        """Viewing direction in world space (unit)."""
        cp = math.cos(self.pitch)
        return np.array([-math.sin(self.yaw) * cp, math.sin(self.pitch), -math.cos(self.yaw) * cp])

    @property
    def rotation(self) -> np.ndarray:
        """World-to-camera rotation: rows are the camera's x (right), y (up), z (back) axes in world space."""
        forward = self.forward
        right = np.array([math.cos(self.yaw), 0.0, -math.sin(self.yaw)])
        return np.stack([right, _cross(right, forward), -forward])


@dataclass(frozen=True, eq=False)
class RoomStyle:
    """Procedural textures of the room surfaces (colours are RGB in [0, 1])."""

    floor_kind: str  # "planks" | "tiles" | "checker"
    floor_colors: np.ndarray  # [2, 3]
    floor_scale: float  # board width or tile size, metres
    wall_kind: str  # "plain" | "stripes" | "checker" | "wainscot"
    wall_colors: np.ndarray  # [2, 3]
    wall_scale: float
    ceiling_color: np.ndarray  # [3]
    waves: np.ndarray  # [6]: two plane waves (frequency u, frequency v, phase) for smooth blotches
    salt: int  # hash salt of per-board / per-tile variations


@dataclass(frozen=True, eq=False)
class Scene:
    """Everything needed to render one sample; ``primitives`` are in world coordinates.

    Instance ids: room surfaces are ``0..5`` (``m3vit.data._geometry.ROOM_SURFACES`` order), objects
    and people ``6, 7, ...``; ``instance_class[i]`` is the class name of instance ``i``. For each
    primitive, ``primitive_instance``/``primitive_part``/``primitive_albedo`` give its instance, its
    human part (0 for objects) and its colour.
    """

    camera: Camera
    room_low: np.ndarray
    room_high: np.ndarray
    room_style: RoomStyle
    primitives: tuple[Primitive, ...]
    primitive_instance: tuple[int, ...]
    primitive_part: tuple[int, ...]
    primitive_albedo: np.ndarray  # [P, 3]
    instance_class: tuple[str, ...]
    light_direction: np.ndarray  # world, unit, points towards the light
    light_color: np.ndarray
    ambient: float
    diffuse: float
    brightness: float
    contrast: float
    channel_gain: np.ndarray
    noise_std: float
    noise_seed: int

    @property
    def num_people(self) -> int:
        return sum(1 for c in self.instance_class if c == "person")


@dataclass(eq=False)
class RenderedScene:
    """Numpy arrays of one rendered scene (``H x W``); the dataset turns them into the sample dict."""

    image: np.ndarray  # float32 [3, H, W] in [0, 1]
    semseg: np.ndarray  # int64 [H, W]
    human_parts: np.ndarray  # int64 [H, W]
    sal: np.ndarray  # float32 [1, H, W]
    normals: np.ndarray  # float32 [3, H, W]
    depth: np.ndarray  # float32 [1, H, W]
    edge: np.ndarray  # float32 [1, H, W]
    instance: np.ndarray  # int64 [H, W], -1 where no hit
    primitive: np.ndarray  # int64 [H, W]: -1 no hit, 0..5 room surface, 6 + k the scene's k-th primitive
    salient_instances: tuple[int, ...]


# ---------------------------------------------------------------------------------------------
# Scene sampling
# ---------------------------------------------------------------------------------------------
def _color(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
    """A random colour: uniform hue, saturation and value in the given ranges."""
    return np.array(colorsys.hsv_to_rgb(rng.uniform(0.0, 1.0), rng.uniform(*sat), rng.uniform(*val)))


_SKIN_TONES = np.array(
    [[0.96, 0.80, 0.69], [0.90, 0.72, 0.56], [0.78, 0.57, 0.44], [0.63, 0.45, 0.33], [0.45, 0.31, 0.22],
     [0.33, 0.22, 0.15]]
)


def _yaw_matrix(angle: float) -> np.ndarray:
    """Rotation about world ``+y`` taking local ``+z`` (forward) to ``(sin a, 0, cos a)``."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _pick(rng: np.random.Generator, options: Sequence[str], weights: Sequence[float]) -> str:
    """One of ``options`` with probabilities ``weights`` (a cheaper ``rng.choice`` for a handful)."""
    u, total = rng.uniform(), 0.0
    for option, weight in zip(options, weights):
        total += weight
        if u < total:
            return option
    return options[-1]


def _sample_pose(rng: np.random.Generator) -> dict[str, Any]:
    """Joint angles (radians) within human ranges, in one of four modes.

    ``hip_flex``/``shoulder_flex`` swing a limb forwards (negative: backwards), ``*_abd`` sideways,
    ``knee`` bends the shin backwards, ``elbow`` the forearm forwards; pairs are (left, right).
    """
    deg = math.radians
    mode = _pick(rng, ("standing", "walking", "arms_raised", "free"), (0.3, 0.3, 0.2, 0.2))
    pose: dict[str, Any] = {"mode": mode}
    if mode == "walking":
        phase = rng.uniform(-1.0, 1.0)
        swing = deg(rng.uniform(15, 30))
        pose["hip_flex"] = (swing * phase, -swing * phase)
        pose["knee"] = tuple(deg(rng.uniform(0, 15)) if f > 0 else deg(rng.uniform(10, 45)) for f in pose["hip_flex"])
        pose["shoulder_flex"] = (-0.8 * swing * phase, 0.8 * swing * phase)
        pose["shoulder_abd"] = (deg(rng.uniform(3, 12)), deg(rng.uniform(3, 12)))
        pose["elbow"] = (deg(rng.uniform(10, 45)), deg(rng.uniform(10, 45)))
    else:
        pose["hip_flex"] = (deg(rng.normal(0, 4)), deg(rng.normal(0, 4)))
        pose["knee"] = (deg(rng.uniform(0, 10)), deg(rng.uniform(0, 10)))
        if mode == "standing":
            pose["shoulder_flex"] = (deg(rng.uniform(-10, 25)), deg(rng.uniform(-10, 25)))
            pose["shoulder_abd"] = (deg(rng.uniform(4, 20)), deg(rng.uniform(4, 20)))
            pose["elbow"] = (deg(rng.uniform(0, 40)), deg(rng.uniform(0, 40)))
        elif mode == "arms_raised":
            u = rng.uniform()
            raised = (True, True) if u < 0.6 else ((True, False) if u < 0.8 else (False, True))
            pose["shoulder_flex"] = tuple(deg(rng.uniform(60, 170) if r else rng.uniform(-5, 15)) for r in raised)
            pose["shoulder_abd"] = tuple(deg(rng.uniform(10, 90) if r else rng.uniform(5, 15)) for r in raised)
            pose["elbow"] = (deg(rng.uniform(0, 60)), deg(rng.uniform(0, 60)))
        else:  # free: anywhere in the comfortable range, one leg possibly lifted
            lifted, planted = deg(rng.uniform(-15, 50)), deg(rng.uniform(-15, 15))
            pose["hip_flex"] = (lifted, planted) if rng.uniform() < 0.5 else (planted, lifted)
            pose["knee"] = tuple(
                deg(rng.uniform(0, 70) if f > deg(15) else rng.uniform(0, 15)) for f in pose["hip_flex"]
            )
            pose["shoulder_flex"] = (deg(rng.uniform(-40, 170)), deg(rng.uniform(-40, 170)))
            pose["shoulder_abd"] = (deg(rng.uniform(0, 100)), deg(rng.uniform(0, 100)))
            pose["elbow"] = (deg(rng.uniform(0, 130)), deg(rng.uniform(0, 130)))
    pose["hip_abd"] = (deg(rng.uniform(0, 8)), deg(rng.uniform(0, 8)))
    pose["lean"] = deg(rng.uniform(-6, 10))
    pose["sway"] = deg(rng.uniform(-5, 5))
    pose["head_tilt"] = (deg(rng.uniform(-15, 15)), deg(rng.uniform(-10, 10)))
    return pose


def _limb_direction(side: float, flex: float, abd: float) -> np.ndarray:
    """Direction of a limb hanging down (``-y``), raised sideways by ``abd`` and forwards (``+z``) by ``flex``."""
    return np.array([side * math.sin(abd), -math.cos(abd) * math.cos(flex), math.cos(abd) * math.sin(flex)])


def _build_person(rng: np.random.Generator, height: float, pose: dict[str, Any]) -> list[tuple[int, Primitive, str]]:
    """Body primitives in the person's frame (x lateral, y up, z facing), pelvis at the origin.

    Returns ``(part id, primitive, material)`` triples; materials are "skin", "shirt", "pants", "shoes".
    Segment lengths are standard anthropometric fractions of ``height``; girth is jittered.
    """
    h = height
    girth = rng.uniform(0.9, 1.15)
    long_sleeves = rng.uniform() < 0.5
    shorts = rng.uniform() < 0.25
    parts: list[tuple[int, Primitive, str]] = []
    forward = np.array([0.0, 0.0, 1.0])

    # Legs: thigh from the hip joint, shin from the knee, a foot pointing forwards from the ankle.
    for i, side in enumerate((-1.0, 1.0)):
        hip = np.array([side * 0.055 * h, 0.0, 0.0])
        flex, abd, knee = pose["hip_flex"][i], pose["hip_abd"][i], pose["knee"][i]
        knee_pos = hip + 0.245 * h * _limb_direction(side, flex, abd)
        ankle = knee_pos + 0.25 * h * _limb_direction(side, flex - knee, abd)
        parts.append((UPPER_LEG, Capsule(hip, knee_pos, 0.040 * h * girth), "pants"))
        parts.append((LOWER_LEG, Capsule(knee_pos, ankle, 0.029 * h * girth), "skin" if shorts else "pants"))
        heel = ankle + np.array([0.0, -0.025 * h, -0.015 * h])
        toe = ankle + np.array([0.0, -0.025 * h, 0.10 * h])
        parts.append((LOWER_LEG, Capsule(heel, toe, 0.022 * h), "shoes"))

    # Torso: an ellipsoid along the (leaning) spine from the pelvis to the neck, plus capsules across
    # the hips and the shoulders and up the neck that join it to the limbs and the head.
    lean, sway = pose["lean"], pose["sway"]
    spine = _unit(np.array([math.sin(sway), math.cos(sway) * math.cos(lean), math.cos(sway) * math.sin(lean)]))
    lateral = _unit(_cross(spine, forward))
    front = _cross(lateral, spine)
    neck = 0.30 * h * spine
    torso_axes = np.stack([lateral, spine, front], axis=1)
    torso_radii = np.array([0.105, 0.175, 0.068]) * h * girth
    parts.append((TORSO, Ellipsoid(0.15 * h * spine, torso_axes, torso_radii), "shirt"))
    parts.append((TORSO, Capsule(-0.055 * h * lateral, 0.055 * h * lateral, 0.045 * h * girth), "pants"))
    shoulders = [neck - 0.035 * h * spine + side * 0.11 * h * lateral for side in (-1.0, 1.0)]
    parts.append((TORSO, Capsule(shoulders[0], shoulders[1], 0.035 * h * girth), "shirt"))

    # Head: a ball above the neck, tilted forwards/sideways.
    tilt_f, tilt_s = pose["head_tilt"]
    head_dir = _unit(spine + math.sin(tilt_f) * front + math.sin(tilt_s) * lateral)
    head = neck + 0.075 * h * head_dir
    parts.append((TORSO, Capsule(neck - 0.03 * h * spine, head, 0.025 * h * girth), "skin"))
    parts.append((HEAD, Sphere(head, 0.062 * h), "skin"))

    # Arms: upper arm from the shoulder, forearm bending forwards at the elbow, a ball for the hand.
    for i, (side, shoulder) in enumerate(zip((-1.0, 1.0), shoulders)):
        upper = _limb_direction(side, pose["shoulder_flex"][i], pose["shoulder_abd"][i])
        bend = forward - float(forward @ upper) * upper
        if float(bend @ bend) < 1e-6:  # arm pointing straight forwards: bend upwards instead
            bend = np.array([0.0, 1.0, 0.0]) - upper[1] * upper
        bend = _unit(bend)
        elbow_angle = pose["elbow"][i]
        fore = math.cos(elbow_angle) * upper + math.sin(elbow_angle) * bend
        elbow = shoulder + 0.17 * h * upper
        wrist = elbow + 0.15 * h * fore
        parts.append((UPPER_ARM, Capsule(shoulder, elbow, 0.028 * h * girth), "shirt"))
        parts.append((LOWER_ARM, Capsule(elbow, wrist, 0.023 * h * girth), "shirt" if long_sleeves else "skin"))
        parts.append((LOWER_ARM, Sphere(wrist + 0.035 * h * fore, 0.028 * h), "skin"))
    return parts


def _lowest_point(prim: Primitive) -> float:
    """Smallest ``y`` of a body primitive."""
    if isinstance(prim, Sphere):
        return float(prim.center[1]) - prim.radius
    if isinstance(prim, Capsule):
        return min(float(prim.a[1]), float(prim.b[1])) - prim.radius
    if isinstance(prim, Ellipsoid):
        return float(prim.center[1]) - math.sqrt(float(((prim.axes[1] * prim.radii) ** 2).sum()))
    raise TypeError(f"no lowest point for {type(prim).__name__}")


def _place_person(parts, position_xz: np.ndarray, facing: float) -> list[tuple[int, Primitive, str]]:
    """Turn a person (built around the origin) by ``facing`` about the vertical and stand it on the
    floor at ``position_xz``: its lowest point touches ``y = 0``."""
    rot = _yaw_matrix(facing)
    lift = -min(_lowest_point(prim) for _, prim, _ in parts)  # a turn about y keeps heights
    offset = np.array([position_xz[0], lift, position_xz[1]])
    placed = []
    for part, prim, material in parts:
        if isinstance(prim, Sphere):
            prim = Sphere(rot @ prim.center + offset, prim.radius)
        elif isinstance(prim, Capsule):
            prim = Capsule(rot @ prim.a + offset, rot @ prim.b + offset, prim.radius)
        else:
            prim = Ellipsoid(rot @ prim.center + offset, rot @ prim.axes, prim.radii)
        placed.append((part, prim, material))
    return placed


def _sample_object(rng: np.random.Generator, kind: str, x: float, z: float) -> Primitive:
    """An object of class ``kind`` resting on the floor at ``(x, z)``."""
    if kind == "sphere":
        r = rng.uniform(0.12, 0.55)
        return Sphere(np.array([x, r, z]), r)
    if kind == "box":
        half = np.array([rng.uniform(0.1, 0.5), rng.uniform(0.08, 0.6), rng.uniform(0.1, 0.5)])
        return Box(np.array([x, half[1], z]), _yaw_matrix(rng.uniform(0.0, math.pi)), half)
    if kind == "cylinder":
        r, height = rng.uniform(0.1, 0.45), rng.uniform(0.2, 1.4)
        return Cylinder(np.array([x, 0.0, z]), np.array([x, height, z]), r)
    if kind == "cone":
        r, height = rng.uniform(0.15, 0.5), rng.uniform(0.3, 1.3)
        return Cone(np.array([x, 0.0, z]), np.array([0.0, 1.0, 0.0]), height, r)
    raise ValueError(f"unknown object kind {kind!r}; known: {list(_OBJECT_CLASSES)}")


def _footprint_radius(prim: Primitive) -> float:
    """Radius of a vertical cylinder around the object's axis that holds its footprint."""
    if isinstance(prim, Box):
        return math.hypot(float(prim.half_size[0]), float(prim.half_size[2]))
    return float(prim.radius)


def _sample_room_style(rng: np.random.Generator) -> RoomStyle:
    floor_kind = _pick(rng, ("planks", "tiles", "checker"), (0.5, 0.25, 0.25))
    if floor_kind == "planks":
        wood = colorsys.hsv_to_rgb(rng.uniform(0.05, 0.11), rng.uniform(0.35, 0.7), rng.uniform(0.35, 0.8))
        floor_colors = np.stack([np.array(wood), 0.8 * np.array(wood)])
        floor_scale = rng.uniform(0.12, 0.25)
    else:
        floor_colors = np.stack([_color(rng, (0.0, 0.5), (0.3, 0.95)), _color(rng, (0.0, 0.5), (0.1, 0.7))])
        floor_scale = rng.uniform(0.3, 0.8)
    wall_kind = _pick(rng, ("plain", "stripes", "checker", "wainscot"), (0.3, 0.3, 0.15, 0.25))
    wall_colors = np.stack([_color(rng, (0.0, 0.45), (0.5, 0.95)), _color(rng, (0.1, 0.7), (0.3, 0.9))])
    angles = rng.uniform(0.0, 2 * math.pi, size=2)
    freqs = rng.uniform(0.8, 2.5, size=2)
    waves = np.array([freqs[0] * math.cos(angles[0]), freqs[0] * math.sin(angles[0]), rng.uniform(0, 2 * math.pi),
                      freqs[1] * math.cos(angles[1]), freqs[1] * math.sin(angles[1]), rng.uniform(0, 2 * math.pi)])
    return RoomStyle(
        floor_kind=floor_kind,
        floor_colors=floor_colors,
        floor_scale=float(floor_scale),
        wall_kind=wall_kind,
        wall_colors=wall_colors,
        wall_scale=float(rng.uniform(0.15, 0.6)),
        ceiling_color=_color(rng, (0.0, 0.1), (0.75, 0.95)),
        waves=waves,
        salt=int(rng.integers(0, 2**31 - 1)),
    )


def sample_scene(rng: np.random.Generator, people: str = "sparse") -> Scene:
    """Draw one random scene: room, camera, people (how many and how near: ``PEOPLE_MODES[people]``),
    objects, light, jitter. The modes differ only in the people's distribution (a scene of one index is
    not the same scene in both modes beyond its room size and camera)."""
    if people not in PEOPLE_MODES:
        raise ValueError(f"unknown people mode {people!r}; allowed: {', '.join(PEOPLE_MODES)}")
    mode = PEOPLE_MODES[people]
    room_w, room_d, room_h = rng.uniform(5.0, 10.0), rng.uniform(7.0, 11.0), rng.uniform(2.5, 3.5)
    room_low = np.array([-room_w / 2, 0.0, -room_d / 2])
    room_high = np.array([room_w / 2, room_h, room_d / 2])
    cam_x = rng.uniform(-room_w / 4, room_w / 4)
    cam_y = rng.uniform(1.2, 2.1)
    cam_z = room_d / 2 - rng.uniform(0.2, 0.8)  # near the back wall, looking into the room
    camera = Camera(
        position=np.array([cam_x, cam_y, cam_z]),
        yaw=math.radians(rng.uniform(-30, 30)),
        pitch=-math.radians(rng.uniform(5, 25)),
        fov=math.radians(rng.uniform(55, 65)),
    )
    footprints: list[tuple[float, float, float]] = []

    def find_spot(radius: float, near: float, far: float, spread: float) -> tuple[float, float] | None:
        """A floor position ``near..far`` metres in front of the camera, within ``spread`` of the half
        field of view, inside the room, clear of earlier footprints; ``None`` after 20 tries."""
        for _ in range(20):
            dist = rng.uniform(near, far)
            bearing = camera.yaw + rng.uniform(-spread, spread) * camera.fov / 2
            x, z = cam_x - dist * math.sin(bearing), cam_z - dist * math.cos(bearing)
            margin = radius + 0.1
            inside = -room_w / 2 + margin < x < room_w / 2 - margin and -room_d / 2 + margin < z < room_d / 2 - margin
            if inside and all(math.hypot(x - fx, z - fz) > radius + fr for fx, fz, fr in footprints):
                footprints.append((x, z, radius))
                return x, z
        return None

    primitives: list[Primitive] = []
    prim_instance: list[int] = []
    prim_part: list[int] = []
    albedo: list[np.ndarray] = []
    instance_class: list[str] = list(_ROOM_CLASS)

    u = rng.uniform()
    none, one, _ = mode.counts
    num_people = 0 if u < none else (1 if u < none + one else 2)
    for _ in range(num_people):
        height = rng.uniform(1.55, 1.95) if rng.uniform() < 0.85 else rng.uniform(1.0, 1.45)  # adult or child
        spot = find_spot(0.45, *mode.distance, 0.6)
        if spot is None:
            continue
        facing = rng.uniform(-math.pi, math.pi)
        parts = _place_person(_build_person(rng, height, _sample_pose(rng)), spot, facing)
        materials = {
            "skin": _SKIN_TONES[rng.integers(len(_SKIN_TONES))] * rng.uniform(0.92, 1.05),
            "shirt": _color(rng, (0.2, 0.9), (0.3, 0.95)),
            "pants": _color(rng, (0.1, 0.7), (0.1, 0.6)),
            "shoes": _color(rng, (0.0, 0.4), (0.05, 0.3)),
        }
        instance = len(instance_class)
        instance_class.append("person")
        for part, prim, material in parts:
            primitives.append(prim)
            prim_instance.append(instance)
            prim_part.append(part)
            albedo.append(materials[material])

    for _ in range(int(rng.integers(2, 7))):
        kind = _OBJECT_CLASSES[int(rng.integers(len(_OBJECT_CLASSES)))]
        prim = _sample_object(rng, kind, 0.0, 0.0)
        spot = find_spot(_footprint_radius(prim), 1.3, 7.5, 0.9)
        if spot is None:
            continue
        prim = _sample_object(rng, kind, *spot)
        instance = len(instance_class)
        instance_class.append(kind)
        primitives.append(prim)
        prim_instance.append(instance)
        prim_part.append(0)
        albedo.append(_color(rng, (0.3, 1.0), (0.3, 1.0)))

    elevation = math.radians(rng.uniform(35, 80))
    azimuth = rng.uniform(0, 2 * math.pi)
    light = np.array([math.cos(elevation) * math.cos(azimuth), math.sin(elevation),
                      math.cos(elevation) * math.sin(azimuth)])
    return Scene(
        camera=camera,
        room_low=room_low,
        room_high=room_high,
        room_style=_sample_room_style(rng),
        primitives=tuple(primitives),
        primitive_instance=tuple(prim_instance),
        primitive_part=tuple(prim_part),
        primitive_albedo=np.array(albedo, dtype=np.float64).reshape(-1, 3),
        instance_class=tuple(instance_class),
        light_direction=light,
        light_color=1.0 + rng.normal(0.0, 0.04, size=3),
        ambient=float(rng.uniform(0.35, 0.55)),
        diffuse=float(rng.uniform(0.5, 0.8)),
        brightness=float(rng.uniform(0.85, 1.15)),
        contrast=float(rng.uniform(0.85, 1.15)),
        channel_gain=rng.uniform(0.92, 1.08, size=3),
        noise_std=float(rng.uniform(0.005, 0.025)),
        noise_seed=int(rng.integers(0, 2**63 - 1)),
    )


# ---------------------------------------------------------------------------------------------
# Textures and shading (float32 throughout; every function works on the pixels of one surface)
# ---------------------------------------------------------------------------------------------
def _hash01(a: np.ndarray, b: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic pseudo-random value in ``[0, 1)`` per pair of integer-valued floats (integer hash)."""
    h = a.astype(np.int32).view(np.uint32) * np.uint32(0x9E3779B1)
    h ^= b.astype(np.int32).view(np.uint32) * np.uint32(0x85EBCA77)
    h ^= np.uint32(salt & 0xFFFFFFFF)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x2C1B3C6D)
    h ^= h >> np.uint32(12)
    return (h >> np.uint32(16)).astype(np.float32) * np.float32(1.0 / 65536.0)


def _blotches(waves: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Smooth pattern in ``[-1, 1]``: product of two plane waves over surface coordinates ``(u, v)``."""
    w = waves.astype(np.float32)
    return np.sin(w[0] * u + w[1] * v + w[2]) * np.sin(w[3] * u + w[4] * v + w[5])


def _parity(i: np.ndarray) -> np.ndarray:
    """``i mod 2`` (0.0 or 1.0) of integer-valued floats."""
    half = np.float32(0.5) * i
    return np.float32(2.0) * (half - np.floor(half))


def _mix(colors: np.ndarray, weight: np.ndarray, shade: np.ndarray) -> list[np.ndarray]:
    """Channels ``shade * (colors[0] + (colors[1] - colors[0]) * weight)``."""
    c0, c1 = colors[0].astype(np.float32), colors[1].astype(np.float32)
    return [(c0[c] + (c1[c] - c0[c]) * weight) * shade for c in range(3)]


def _floor_albedo(style: RoomStyle, x: np.ndarray, z: np.ndarray) -> list[np.ndarray]:
    """Albedo channels of floor points at world ``(x, z)``."""
    inv = np.float32(1.0 / style.floor_scale)
    one = np.float32(1.0)
    if style.floor_kind == "planks":  # boards along z, staggered joints, per-piece tone, dark seams
        across = x * inv
        board = np.floor(across)
        along = z * (inv / np.float32(9.0)) + _hash01(board, board, style.salt)
        piece = np.floor(along)
        seam = ((across - board) < 0.05) | ((along - piece) < 0.01)
        tone = np.float32(0.8) + np.float32(0.4) * _hash01(board, piece, style.salt)
        grain = one + np.float32(0.05) * np.sin(np.float32(40.0) * z + np.float32(7.0) * board)
        shade = tone * grain * (one - np.float32(0.45) * seam)
        return _mix(style.floor_colors, _hash01(piece, board, style.salt + 1), shade)
    u, v = x * inv, z * inv
    i, j = np.floor(u), np.floor(v)
    shade = one + np.float32(0.06) * _blotches(style.waves, x, z)
    if style.floor_kind == "tiles":  # grout lines darken the tile borders
        shade = shade * (one - np.float32(0.4) * (((u - i) < 0.04) | ((v - j) < 0.04)))
    return _mix(style.floor_colors, _parity(i + j), shade)


def _wall_albedo(style: RoomStyle, u: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """Albedo channels of wall points: ``u`` the horizontal coordinate along the wall, ``y`` the height."""
    inv = np.float32(1.0 / style.wall_scale)
    one = np.float32(1.0)
    shade = one + np.float32(0.05) * _blotches(style.waves, u, y)
    if style.wall_kind == "stripes":
        weight = np.float32(0.5) * _parity(np.floor(u * inv))
    elif style.wall_kind == "checker":
        weight = np.float32(0.6) * _parity(np.floor(u * inv) + np.floor(y * inv))
    elif style.wall_kind == "wainscot":  # lower panel in the second colour, a dark rail on top
        top = np.float32(0.9 + style.wall_scale)
        weight = (y < top).astype(np.float32)
        shade = shade * (one - np.float32(0.3) * (np.abs(y - top) < 0.03))
    else:
        weight = np.zeros_like(u)
        shade = one + np.float32(0.12) * _blotches(style.waves, u, y)
    return _mix(style.wall_colors, weight, shade)


def _room_albedo(scene: Scene, primitive: np.ndarray, depth: np.ndarray, world_dirs, albedo: np.ndarray) -> None:
    """Write the textured albedo of every room-surface pixel into ``albedo [3, HW]`` (flat buffers)."""
    px, py, pz = (np.float32(c) for c in scene.camera.position)
    wx, wy, wz = (w.ravel() for w in world_dirs)
    style = scene.room_style

    floor = np.flatnonzero(primitive == _FLOOR)
    if floor.size:
        t = depth[floor]
        for c, value in enumerate(_floor_albedo(style, px + t * wx[floor], pz + t * wz[floor])):
            albedo[c][floor] = value
    is_room = (primitive >= 0) & (primitive < len(ROOM_SURFACES))
    walls = np.flatnonzero(is_room & (primitive != _FLOOR) & (primitive != _CEILING))
    if walls.size:
        t = depth[walls]
        along_x = primitive[walls] > _CEILING  # walls at z = const run along x; walls at x = const along z
        u = np.where(along_x, px + t * wx[walls], pz + t * wz[walls])
        for c, value in enumerate(_wall_albedo(style, u, py + t * wy[walls])):
            albedo[c][walls] = value
    ceiling = np.flatnonzero(primitive == _CEILING)
    if ceiling.size:
        t = depth[ceiling]
        shade = np.float32(1.0) + np.float32(0.03) * _blotches(style.waves, px + t * wx[ceiling], pz + t * wz[ceiling])
        for c in range(3):
            albedo[c][ceiling] = np.float32(style.ceiling_color[c]) * shade


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def salient_instances(instance: np.ndarray, instance_class: Sequence[str]) -> tuple[int, ...]:
    """The saliency rule (see :class:`SyntheticScenes`) applied to an instance map (``-1`` = no hit)."""
    counts = np.bincount(instance.ravel() + 1, minlength=len(instance_class) + 1)[1:]
    min_area = max(1, math.ceil(MIN_SALIENT_FRACTION * instance.size))
    first = len(ROOM_SURFACES)
    people = [i for i in range(first, len(instance_class)) if instance_class[i] == "person" and counts[i] >= min_area]
    objects = [i for i in range(first, len(instance_class)) if instance_class[i] != "person" and counts[i] >= min_area]
    if people:
        salient = list(people)
    elif objects:
        salient = [max(objects, key=lambda i: (counts[i], -i))]  # ties: the lowest instance id
    else:
        return ()
    reference = max(counts[i] for i in salient)
    salient += [i for i in objects if i not in salient and counts[i] >= SALIENT_AREA_RATIO * reference]
    return tuple(sorted(salient))


def instance_edges(instance: np.ndarray) -> np.ndarray:
    """One-pixel boundaries: ``True`` where the right or the lower neighbour has another instance id."""
    edge = np.zeros(instance.shape, dtype=bool)
    np.not_equal(instance[:, :-1], instance[:, 1:], out=edge[:, :-1])
    edge[:-1, :] |= instance[:-1, :] != instance[1:, :]
    return edge


def gaussian_field(height: int, width: int) -> np.ndarray:
    """A fixed standard-normal field ``[3, 2H, 2W]`` whose ``H x W`` windows serve as sensor noise."""
    rng = np.random.default_rng(np.random.SeedSequence([0x5E_45_0E, height, width]))
    return rng.standard_normal((3, 2 * height, 2 * width), dtype=np.float32)


def sensor_noise(noise_seed: int, height: int, width: int, field: np.ndarray | None = None) -> np.ndarray:
    """Standard-normal noise ``[3, H, W]`` of one sample, drawn from ``noise_seed``.

    With a ``field`` from :func:`gaussian_field` the noise is the window of it at an offset drawn from
    ``noise_seed`` (every pixel still standard normal; drawing 3 H W fresh normals per sample would cost
    a tenth of the time budget of a 128 x 128 sample), otherwise fresh normals.
    """
    rng = np.random.default_rng(noise_seed)
    if field is None:
        return rng.standard_normal((3, height, width), dtype=np.float32)
    if field.shape[0] != 3 or field.shape[1] < height or field.shape[2] < width:
        raise ValueError(f"noise field of shape {field.shape} is too small for {height}x{width} images")
    top = int(rng.integers(field.shape[1] - height + 1))
    left = int(rng.integers(field.shape[2] - width + 1))
    return field[:, top:top + height, left:left + width]


def render_scene(scene: Scene, caster: RayCaster, noise_field: np.ndarray | None = None) -> RenderedScene:
    """Ray-cast ``scene`` with ``caster`` and derive the image and all labels from the hits.

    ``noise_field`` (optional, from :func:`gaussian_field`) makes the Gaussian sensor noise cheap.
    """
    camera = scene.camera
    rotation = camera.rotation
    hits = caster.cast(camera.fov, rotation, camera.position, scene.room_low, scene.room_high, scene.primitives)
    height, width = hits.depth.shape
    primitive = hits.primitive.ravel()
    depth = hits.depth.ravel()
    normals = hits.normals.reshape(3, -1)
    num_room = len(ROOM_SURFACES)
    # Per-primitive tables are indexed by primitive + 1, so that entry 0 describes "no hit".
    lookup = primitive + 1
    class_ids = [_CLASS_ID[c] for c in scene.instance_class]
    instance_table = np.array([-1, *range(num_room), *scene.primitive_instance], dtype=np.int64)
    class_table = np.array([IGNORE, *class_ids[:num_room], *(class_ids[i] for i in scene.primitive_instance)], np.int64)
    part_table = np.array([IGNORE] + [0] * num_room + list(scene.primitive_part), dtype=np.int64)
    instance = np.take(instance_table, lookup).reshape(height, width)
    semseg = np.take(class_table, lookup).reshape(height, width)
    human_parts = np.take(part_table, lookup).reshape(height, width)

    # Image: albedo (textures on the room, flat colours elsewhere), Lambert shading with ambient and one
    # directional light, colour jitter, sensor noise.
    albedo_table = np.zeros((3, num_room + len(scene.primitives) + 1), dtype=np.float32)
    albedo_table[:, num_room + 1:] = scene.primitive_albedo.T
    albedo = np.stack([np.take(albedo_table[c], lookup) for c in range(3)])
    _room_albedo(scene, primitive, depth, hits.world_dirs, albedo)
    light = (rotation @ scene.light_direction).astype(np.float32)
    lambert = np.maximum(light[0] * normals[0] + light[1] * normals[1] + light[2] * normals[2], np.float32(0.0))
    shade = np.float32(scene.ambient) + np.float32(scene.diffuse) * lambert
    gain = (scene.light_color * scene.channel_gain * scene.brightness).astype(np.float32)
    image = albedo * shade
    image *= gain[:, None]
    mean = np.float32(image.mean())
    image = (image - mean) * np.float32(scene.contrast) + mean
    image = image.reshape(3, height, width)
    image += sensor_noise(scene.noise_seed, height, width, noise_field) * np.float32(scene.noise_std)
    np.clip(image, 0.0, 1.0, out=image)

    salient = salient_instances(instance, scene.instance_class)
    sal_table = np.zeros(len(scene.instance_class) + 1, dtype=np.float32)
    sal_table[[i + 1 for i in salient]] = 1.0
    hit = primitive >= 0
    ignore = np.float32(IGNORE)
    normals_label, depth_label = normals, depth
    if not hit.all():
        normals_label = np.where(hit, normals, ignore)
        depth_label = np.where(hit, depth, ignore)
    return RenderedScene(
        image=image,
        semseg=semseg,
        human_parts=human_parts,
        sal=np.take(sal_table, instance + 1).reshape(1, height, width),
        normals=normals_label.reshape(3, height, width),
        depth=depth_label.reshape(1, height, width),
        edge=instance_edges(instance).astype(np.float32)[None],
        instance=instance,
        primitive=hits.primitive.astype(np.int64, copy=False),
        salient_instances=salient,
    )


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------
def _positive_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class SyntheticScenes(Dataset):
    """Procedural indoor scenes (room, objects, articulated people) with six exact dense labels.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``; each split draws from its own seed stream.
        size: ``(H, W)`` of the images, each >= 16.
        length: number of samples (any index below it is a distinct scene).
        seed: non-negative base seed; sample ``i`` is a pure function of ``(split, i, seed)``: its
            generator is ``np.random.default_rng(SeedSequence([seed, SPLIT_CODES[split], i]))``.
        tasks: labels to return (default all of ``SYNTHETIC_TASKS``; one name or a sequence).
        transform: optional ``transform(sample, rng) -> sample``; ``rng`` is a ``numpy`` Generator from
            ``SeedSequence([seed, split_code, i, epoch, 1])`` so augmentation is reproducible and changes
            with :meth:`set_epoch` (with ``DataLoader`` workers, call it before creating each epoch's
            iterator; persistent workers keep the epoch they were started with).
        people: ``"sparse"`` (default) or ``"close"``, see ``PEOPLE_MODES``: how many people a scene
            holds and how near they stand; everything else is drawn from the same distributions.

    Each sample is a dict: ``image`` float32 ``[3, H, W]`` in ``[0, 1]``, the requested labels in the
    format of ``m3vit.tasks.base`` and ``meta`` ``{"dataset", "split", "index", "id"}``:

    * ``semseg`` int64 ``[H, W]``: index into :attr:`classes` (255 where a ray hits nothing, which the
      closed room prevents in practice).
    * ``human_parts`` int64 ``[H, W]``: 0 on every non-person pixel, 1 head, 2 torso, 3 upper arm,
      4 lower arm + hand, 5 upper leg, 6 lower leg + foot on person pixels.
    * ``sal`` float32 ``[1, H, W]``: 1 on the salient instances. Rule: an instance (person or object,
      never a room surface) counts only if it covers at least ``MIN_SALIENT_FRACTION`` of the image.
      Every such person is salient; with no person, the object covering the most pixels is (ties: the
      first placed); in both cases every other object covering at least ``SALIENT_AREA_RATIO`` (1.0)
      times as many pixels as the largest salient instance is salient too (a big object in front is as
      salient as the people). A scene without a counted instance has an empty map.
    * ``normals`` float32 ``[3, H, W]``: camera-space outward unit normals of the visible surfaces
      (x right, y up, z towards the camera), 255 in all channels where no ray hits.
    * ``depth`` float32 ``[1, H, W]``: z-depth in metres, i.e. the distance of the hit point along the
      camera's viewing axis (not along the ray), > 0; 255 where no ray hits.
    * ``edge`` float32 ``[1, H, W]``: 1 on a pixel whose right or lower neighbour belongs to another
      instance (each wall, the floor, the ceiling, each object and each person is one instance; the
      parts of one person are not separated). Boundaries are therefore exactly one pixel wide and lie
      on the upper/left side of every change.

    The camera: height 1.2-2.1 m, pitch 5-25 degrees down, roll 0, horizontal field of view 55-65
    degrees, square pixels; :meth:`scene` returns the full scene description of an index and
    :meth:`render` all its arrays (with the instance and primitive maps). The image is albedo
    (procedural textures on the room, flat colours on objects and clothes) times ambient plus Lambert
    diffuse light from one random direction above (no shadows), then brightness, contrast and
    per-channel gain jitter and Gaussian sensor noise (std 0.005-0.025), clipped to ``[0, 1]``.
    """

    classes: tuple[str, ...] = CLASSES
    part_names: tuple[str, ...] = PART_NAMES
    #: Per-task loss weights of the reference recipe (PASCAL-Context's, and NYUD's depth weight).
    REFERENCE_LOSS_WEIGHTS = {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "edge": 50.0, "normals": 10.0,
                              "depth": 1.0}

    def __init__(
        self,
        split: str = "train",
        size: Sequence[int] = (128, 128),
        length: int = 1000,
        seed: int = 0,
        tasks: Sequence[str] | None = None,
        transform: Callable[[dict, np.random.Generator], dict] | None = None,
        people: str = "sparse",
    ):
        if split not in SPLIT_CODES:
            raise ConfigError(f"unknown split {split!r}; allowed splits are {list(SPLIT_CODES)}")
        if isinstance(size, (str, bytes)) or not isinstance(size, Sequence) or len(size) != 2:
            raise ConfigError(f"size must be a pair (H, W) of ints >= 16, got {size!r}")
        height, width = (_positive_int("size", s, 16) for s in size)
        if max(height, width) > MAX_INPUT_SIDE:
            raise ConfigError(f"size {height}x{width}: each side must be <= {MAX_INPUT_SIDE} pixels")
        if tasks is None:
            tasks = SYNTHETIC_TASKS
        elif isinstance(tasks, str):
            tasks = [tasks]
        unknown = [t for t in tasks if t not in SYNTHETIC_TASKS]
        if unknown:
            raise ConfigError(f"unknown task(s) {unknown}; SyntheticScenes provides {list(SYNTHETIC_TASKS)}")
        if transform is not None and not callable(transform):
            raise ValueError(f"transform must be callable as transform(sample, rng), got {transform!r}")
        if people not in PEOPLE_MODES:
            raise ValueError(f"unknown people mode {people!r}; allowed: {', '.join(PEOPLE_MODES)}")
        self.people = people
        self.split = split
        self.size = (height, width)
        self.length = _positive_int("length", length, 1)
        self.seed = _positive_int("seed", seed, 0)
        self._tasks = tuple(t for t in SYNTHETIC_TASKS if t in set(tasks))
        self.transform = transform
        self._epoch = 0
        self._caster = RayCaster(height, width)
        self._noise_field = gaussian_field(height, width)

    @property
    def tasks(self) -> tuple[str, ...]:
        """The labels each sample carries, in canonical order."""
        return self._tasks

    @property
    def task_channels(self) -> dict[str, int]:
        """Output channels a model head needs per task of this dataset."""
        channels = {"semseg": len(self.classes), "human_parts": len(PART_NAMES), "sal": 1, "normals": 3,
                    "edge": 1, "depth": 1}
        return {t: channels[t] for t in self._tasks}

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (scenes themselves never change)."""
        self._epoch = _positive_int("epoch", epoch, 0)

    def __len__(self) -> int:
        return self.length

    def _check_index(self, index: int) -> int:
        try:
            index = operator.index(index)
        except TypeError:
            raise TypeError(f"index must be an int, got {type(index).__name__}") from None
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index out of range for SyntheticScenes of length {self.length}")
        return index

    def _seed_words(self, index: int) -> list[int]:
        return [self.seed, SPLIT_CODES[self.split], index]

    def scene(self, index: int) -> Scene:
        """The scene description of sample ``index`` (camera, room, primitives, light, jitter)."""
        index = self._check_index(index)
        return sample_scene(np.random.default_rng(np.random.SeedSequence(self._seed_words(index))), self.people)

    def render(self, index: int) -> RenderedScene:
        """All arrays of sample ``index`` (including the instance map), before any transform."""
        return self.render_scene(self.scene(index))

    def render_scene(self, scene: Scene) -> RenderedScene:
        """Render a scene description at this dataset's image size."""
        return render_scene(scene, self._caster, self._noise_field)

    @property
    def ray_caster(self) -> RayCaster:
        """The ray caster of this dataset's pixel grid."""
        return self._caster

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        rendered = self.render(index)
        sample: dict[str, Any] = {"image": torch.from_numpy(rendered.image)}
        for task in self._tasks:
            sample[task] = torch.from_numpy(getattr(rendered, task))
        sample["meta"] = {
            "dataset": "synthetic",
            "split": self.split,
            "index": index,
            "id": f"{self.split}-{self.seed}-{index:06d}" if self.people == "sparse" else
                  f"{self.split}-{self.seed}-{self.people}-{index:06d}",
        }
        if self.transform is not None:
            words = [*self._seed_words(index), self._epoch, 1]
            sample = self.transform(sample, np.random.default_rng(np.random.SeedSequence(words)))
        return sample

    def __repr__(self) -> str:
        people = "" if self.people == "sparse" else f", people={self.people!r}"
        return (f"SyntheticScenes(split={self.split!r}, size={self.size}, length={self.length}, "
                f"seed={self.seed}, tasks={list(self._tasks)}{people})")
