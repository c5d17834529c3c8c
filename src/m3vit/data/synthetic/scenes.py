"""Scene sampling: what a synthetic scene holds (camera, room style, primitives with their instance, human part
and colour, light, jitter) and how ``sample_scene`` draws one: the room, articulated people in random poses
(``PEOPLE_MODES``), objects on the floor, the light."""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._geometry import ROOM_SURFACES, Box, Capsule, Cone, Cylinder, Ellipsoid, Primitive, Sphere

__all__ = ["Camera", "RoomStyle", "Scene", "PeopleMode", "PEOPLE_MODES", "CLASSES", "PART_NAMES", "sample_scene"]

#: Semantic classes, in label order (``semseg`` value = index).
CLASSES: tuple[str, ...] = ("floor", "wall", "ceiling", "person", "sphere", "box", "cylinder", "cone")
#: Human-part labels as PASCAL-Part groups them (0 = background, i.e. every non-person pixel).
PART_NAMES: tuple[str, ...] = ("background", "head", "torso", "upper_arm", "lower_arm", "upper_leg", "lower_leg")

HEAD, TORSO, UPPER_ARM, LOWER_ARM, UPPER_LEG, LOWER_LEG = 1, 2, 3, 4, 5, 6
_OBJECT_CLASSES = ("sphere", "box", "cylinder", "cone")
_ROOM_CLASS = tuple("floor" if s == "floor" else "ceiling" if s == "ceiling" else "wall" for s in ROOM_SURFACES)


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
