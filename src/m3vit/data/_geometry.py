"""Analytic, vectorised ray casting for the procedural scenes: primitives, ray hits, surface normals.

Conventions
-----------
* World space: metres, ``y`` up, the floor is the plane ``y = 0``.
* Camera space: ``x`` right, ``y`` up, ``z`` towards the viewer; the camera sits at the origin and looks
  along ``-z`` (the in-memory normals convention of ``m3vit.tasks.base``).
* The ray of a pixel is ``t * (dx, dy, -1)``: its direction is *not* normalised but has ``-1`` as its
  ``z`` component, so the ray parameter ``t`` of a hit **is** the hit's z-depth (distance along the
  viewing axis), the quantity the ``depth`` label stores.
* The camera must lie outside every primitive (the scene sampler guarantees it).

How a cast works (:meth:`RayCaster.cast`): the six inner faces of the room are hit by every ray (exit
distance of an axis-aligned box, full frame). Every other primitive is moved into camera space and
reduced to the pixel rectangle that can see it (the bounding box of the projection of a few balls whose
convex hull contains it). All (pixel, primitive) candidate pairs of one primitive kind are then
intersected in a single batch of flat NumPy operations, with the primitive's parameters gathered per
pair, so the number of NumPy calls does not grow with the number of primitives. The nearest hit per
pixel is resolved with ``np.minimum.at``; normals are evaluated for the winning pairs only.

The (pixel, primitive) pairs are intersected in float64 (near tangencies -- silhouettes, a cone's
apex -- the roots are ill-conditioned), the full-frame room arrays and the output buffers are float32;
roots use the numerically stable forms (no subtraction of nearly equal numbers for the near root).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Union

import numpy as np

__all__ = [
    "Sphere",
    "Ellipsoid",
    "Box",
    "Capsule",
    "Cylinder",
    "Cone",
    "Primitive",
    "Rays",
    "RayCaster",
    "RayHits",
    "ROOM_SURFACES",
    "NEAR",
]

#: Hits closer than this (z-depth, metres) to the camera do not count.
NEAR = 1e-3

#: Room surfaces in the order of their primitive index in :class:`RayHits` (0..5): the low and high
#: face along world x, y (floor, ceiling) and z.
ROOM_SURFACES = ("wall_x_min", "wall_x_max", "floor", "ceiling", "wall_z_min", "wall_z_max")

_INF = np.float32(np.inf)


def _vec(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(3)


@dataclass(frozen=True, eq=False)
class Rays:
    """A flat batch of camera rays ``t * (dx, dy, -1)``; ``dd = |d|^2``. All arrays ``[N]`` float64."""

    dx: np.ndarray
    dy: np.ndarray
    dd: np.ndarray

    def dot(self, vx: np.ndarray, vy: np.ndarray, vz: np.ndarray) -> np.ndarray:
        """``v . d`` per ray for per-ray vectors ``v`` (rows of a gathered parameter table)."""
        return vx * self.dx + vy * self.dy - vz


def _near_root_outside(b: np.ndarray, dd: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Nearest positive root of ``dd t^2 - 2 b t + c = 0`` for an origin outside the quadric (``c > 0``).

    Stable form ``c / (b + sqrt(b^2 - dd c))``; a root in front of the camera needs ``b > 0``. ``inf``
    where there is none.
    """
    disc = b * b - dd * c
    t = c / (b + np.sqrt(np.maximum(disc, np.float32(0.0))))
    return np.where((disc >= 0.0) & (b > 0.0) & (t > NEAR), t, _INF)


def _unit_columns(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``[3, N]`` float32 unit vectors from components."""
    inv = np.float32(1.0) / np.sqrt(x * x + y * y + z * z)
    return np.stack([x * inv, y * inv, z * inv]).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------
# Primitives
#
# Each class holds world-space fields. Its class-level ``pack(prims, rotation, origin)`` moves a list of
# them into camera space at once and returns ``(params [ROWS, n] float64, hull centres [n, j, 3],
# hull radii [n, j])``: the parameter table the batched ``intersect(params [ROWS, N], rays)`` and
# ``normals(params, px, py, pz)`` read (one column per (ray, primitive) pair), and ``j`` balls per
# primitive whose convex hull contains it (for screen-space culling).
# ---------------------------------------------------------------------------------------------
def _to_camera(points: np.ndarray, rotation: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """World points ``[n, 3]`` in camera coordinates."""
    return (points - origin) @ rotation.T


def _rows(*blocks: np.ndarray) -> np.ndarray:
    """Stack per-primitive quantities (``[n]`` or ``[n, k]``) into a float64 ``[rows, n]`` table."""
    cols = [b[:, None] if b.ndim == 1 else b for b in blocks]
    return np.ascontiguousarray(np.concatenate(cols, axis=1).T)


def _axes_rows(axes: np.ndarray) -> np.ndarray:
    """``[n, 3, 3]`` column frames -> ``[n, 9]``: column 0 (x, y, z), column 1, column 2."""
    return axes.transpose(0, 2, 1).reshape(len(axes), 9)


_CORNER_SIGNS = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)


def _frame_corners(center: np.ndarray, axes: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Corners ``[n, 8, 3]`` of boxes ``center + axes @ (signs * half)``."""
    return center[:, None, :] + np.einsum("sk,nik->nsi", _CORNER_SIGNS, axes * half[:, None, :])


@dataclass(frozen=True, eq=False)
class Sphere:
    """Ball of ``radius`` around ``center``."""

    center: np.ndarray
    radius: float

    ROWS: ClassVar[int] = 5  # cx, cy, cz, |c|^2 - r^2, 1/r

    @staticmethod
    def pack(prims: list["Sphere"], rotation: np.ndarray, origin: np.ndarray):
        c = _to_camera(np.array([p.center for p in prims], np.float64), rotation, origin)
        r = np.array([p.radius for p in prims], np.float64)
        return _rows(c, (c * c).sum(1) - r * r, 1.0 / r), c[:, None, :], r[:, None]

    @staticmethod
    def intersect(p: np.ndarray, rays: Rays) -> np.ndarray:
        return _near_root_outside(rays.dot(p[0], p[1], p[2]), rays.dd, p[3])

    @staticmethod
    def normals(p: np.ndarray, px: np.ndarray, py: np.ndarray, pz: np.ndarray) -> np.ndarray:
        return _unit_columns(px - p[0], py - p[1], pz - p[2])


@dataclass(frozen=True, eq=False)
class Ellipsoid:
    """``{center + axes @ (radii * u) : |u| <= 1}``; ``axes`` columns are orthonormal directions."""

    center: np.ndarray
    axes: np.ndarray
    radii: np.ndarray

    # scaled axes s_j = axes[:, j] / radii[j] (9), S @ -o_u (3), |o_u|^2 - 1, M = A diag(1/r^2) A^T (6), c (3)
    ROWS: ClassVar[int] = 22

    @staticmethod
    def pack(prims: list["Ellipsoid"], rotation: np.ndarray, origin: np.ndarray):
        c = _to_camera(np.array([p.center for p in prims], np.float64), rotation, origin)
        axes = np.einsum("ij,njk->nik", rotation, np.array([p.axes for p in prims], np.float64))
        radii = np.array([p.radii for p in prims], np.float64)
        scaled = axes / radii[:, None, :]  # unit-sphere coordinates u = scaled^T (x - c)
        o_u = -np.einsum("nij,ni->nj", scaled, c)
        m = np.einsum("nij,nj,nkj->nik", axes, 1.0 / radii**2, axes)
        params = _rows(_axes_rows(scaled), -np.einsum("nij,nj->ni", scaled, o_u), (o_u * o_u).sum(1) - 1.0,
                       m[:, 0, 0], m[:, 0, 1], m[:, 0, 2], m[:, 1, 1], m[:, 1, 2], m[:, 2, 2], c)
        return params, _frame_corners(c, axes, radii), np.zeros((len(prims), 8))

    @staticmethod
    def intersect(p: np.ndarray, rays: Rays) -> np.ndarray:
        u0 = rays.dot(p[0], p[1], p[2])
        u1 = rays.dot(p[3], p[4], p[5])
        u2 = rays.dot(p[6], p[7], p[8])
        return _near_root_outside(rays.dot(p[9], p[10], p[11]), u0 * u0 + u1 * u1 + u2 * u2, p[12])

    @staticmethod
    def normals(p: np.ndarray, px: np.ndarray, py: np.ndarray, pz: np.ndarray) -> np.ndarray:
        x, y, z = px - p[19], py - p[20], pz - p[21]
        return _unit_columns(p[13] * x + p[14] * y + p[15] * z, p[14] * x + p[16] * y + p[17] * z,
                             p[15] * x + p[17] * y + p[18] * z)


@dataclass(frozen=True, eq=False)
class Box:
    """Oriented box: ``center``, orthonormal ``axes`` (columns) and ``half_size`` along each."""

    center: np.ndarray
    axes: np.ndarray
    half_size: np.ndarray

    # axes columns (9), slab bounds low_j, high_j in local coords (6), center (3), 1/half (3)
    ROWS: ClassVar[int] = 21

    @staticmethod
    def pack(prims: list["Box"], rotation: np.ndarray, origin: np.ndarray):
        c = _to_camera(np.array([p.center for p in prims], np.float64), rotation, origin)
        axes = np.einsum("ij,njk->nik", rotation, np.array([p.axes for p in prims], np.float64))
        half = np.array([p.half_size for p in prims], np.float64)
        origin_local = -np.einsum("nij,ni->nj", axes, c)
        params = _rows(_axes_rows(axes), -half - origin_local, half - origin_local, c, 1.0 / half)
        return params, _frame_corners(c, axes, half), np.zeros((len(prims), 8))

    @staticmethod
    def intersect(p: np.ndarray, rays: Rays) -> np.ndarray:
        enter = exit_ = None
        for j in range(3):  # slab method
            inv = np.float32(1.0) / rays.dot(p[3 * j], p[3 * j + 1], p[3 * j + 2])
            t_low, t_high = p[9 + j] * inv, p[12 + j] * inv
            near, far = np.minimum(t_low, t_high), np.maximum(t_low, t_high)
            enter = near if enter is None else np.maximum(enter, near)
            exit_ = far if exit_ is None else np.minimum(exit_, far)
        return np.where((enter <= exit_) & (enter > NEAR), enter, _INF)

    @staticmethod
    def normals(p: np.ndarray, px: np.ndarray, py: np.ndarray, pz: np.ndarray) -> np.ndarray:
        x, y, z = px - p[15], py - p[16], pz - p[17]
        scaled = np.stack([(p[3 * j] * x + p[3 * j + 1] * y + p[3 * j + 2] * z) * p[18 + j] for j in range(3)])
        face = np.argmax(np.abs(scaled), axis=0)
        cols = np.arange(px.size)
        sign = np.sign(scaled[face, cols])
        return np.stack([p[3 * face + k, cols] * sign for k in range(3)]).astype(np.float32, copy=False)


def _segment_rows(a: np.ndarray, b: np.ndarray, radius: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-primitive scalars of the infinite cylinders of ``radius`` around the lines ``a -> b`` (``[n, 3]``,
    camera at the origin): ``ba``, ``w = |ba|^2 (-a) - (ba . -a) ba``, ``|ba|^2``, ``ba . -a``, ``k0`` (the
    constant term of the quadratic; <= 0 when the camera is inside the infinite cylinder)."""
    ba, oa = b - a, -a
    baba, baoa = (ba * ba).sum(1), (ba * oa).sum(1)
    w = baba[:, None] * oa - baoa[:, None] * ba
    k0 = baba * (oa * oa).sum(1) - baoa * baoa - radius * radius * baba
    return ba, w, baba, baoa, k0


def _segment_body(p: np.ndarray, rays: Rays, first: int):
    """Near hit of an infinite cylinder whose ``_segment_rows`` start at row ``first``.

    Solves ``k2 t^2 + 2 k1 t + k0 = 0`` with ``k2 = |ba x d|^2`` (no cancellation) and
    ``k1 = w . d``; returns ``(t, y, ok)``: the near root, its axial coordinate ``(t d - a) . ba`` (0 at
    ``a``, ``|ba|^2`` at ``b``) and whether it is a genuine entry from outside in front of the camera.
    """
    bax, bay, baz, wx, wy, wz, baba, baoa, k0 = (p[first + i] for i in range(9))
    c0 = bay + baz * rays.dy  # components of ba x d (up to sign; squared below)
    c1 = baz * rays.dx + bax
    c2 = bax * rays.dy - bay * rays.dx
    k2 = c0 * c0 + c1 * c1 + c2 * c2
    k1 = rays.dot(wx, wy, wz)
    disc = k1 * k1 - k2 * k0
    t = k0 / (np.sqrt(np.maximum(disc, np.float32(0.0))) - k1)
    y = baoa + t * rays.dot(bax, bay, baz)
    ok = (k0 > 0.0) & (disc >= 0.0) & (k1 < 0.0) & (t > NEAR)
    return t, y, ok


@dataclass(frozen=True, eq=False)
class Capsule:
    """All points within ``radius`` of the segment ``a -> b`` (limbs of the people)."""

    a: np.ndarray
    b: np.ndarray
    radius: float

    # a (3), segment rows (9), b (3), |a|^2 - r^2, |b|^2 - r^2, camera beyond a (1/0)
    ROWS: ClassVar[int] = 18

    @staticmethod
    def pack(prims: list["Capsule"], rotation: np.ndarray, origin: np.ndarray):
        a = _to_camera(np.array([p.a for p in prims], np.float64), rotation, origin)
        b = _to_camera(np.array([p.b for p in prims], np.float64), rotation, origin)
        r = np.array([p.radius for p in prims], np.float64)
        seg = _segment_rows(a, b, r)
        params = _rows(a, *seg, b, (a * a).sum(1) - r * r, (b * b).sum(1) - r * r, (seg[3] < 0.0).astype(np.float64))
        return params, np.stack([a, b], axis=1), np.stack([r, r], axis=1)

    @staticmethod
    def intersect(p: np.ndarray, rays: Rays) -> np.ndarray:
        t_body, y, ok = _segment_body(p, rays, 3)
        body = ok & (y >= 0.0) & (y <= p[9])
        # Otherwise the ray can only enter through the end ball on the side where it met the infinite
        # cylinder (or, with the camera inside that cylinder, the end ball nearer to the camera).
        use_a = np.where(p[11] > 0.0, y < 0.0, p[17] > 0.0)
        cx, cy, cz = (np.where(use_a, p[i], p[12 + i]) for i in range(3))
        t_ball = _near_root_outside(rays.dot(cx, cy, cz), rays.dd, np.where(use_a, p[15], p[16]))
        return np.where(body, t_body, t_ball)

    @staticmethod
    def normals(p: np.ndarray, px: np.ndarray, py: np.ndarray, pz: np.ndarray) -> np.ndarray:
        x, y, z = px - p[0], py - p[1], pz - p[2]
        s = np.clip((x * p[3] + y * p[4] + z * p[5]) / p[9], 0.0, 1.0)
        return _unit_columns(x - s * p[3], y - s * p[4], z - s * p[5])


@dataclass(frozen=True, eq=False)
class Cylinder:
    """Solid cylinder of ``radius`` around the segment ``a -> b`` with flat end caps."""

    a: np.ndarray
    b: np.ndarray
    radius: float

    # a (3), segment rows (9), visible cap centre (3), cap . ba, |cap|^2 - r^2, has cap, unit axis (3), length, r
    ROWS: ClassVar[int] = 23

    @staticmethod
    def pack(prims: list["Cylinder"], rotation: np.ndarray, origin: np.ndarray):
        a = _to_camera(np.array([p.a for p in prims], np.float64), rotation, origin)
        b = _to_camera(np.array([p.b for p in prims], np.float64), rotation, origin)
        r = np.array([p.radius for p in prims], np.float64)
        ba, w, baba, baoa, k0 = _segment_rows(a, b, r)
        # Only the cap whose outside holds the camera (axial coordinate baoa) can be hit first.
        has_cap = (baoa < 0.0) | (baoa > baba)
        cap = np.where((baoa < 0.0)[:, None], a, b)
        length = np.sqrt(baba)
        params = _rows(a, ba, w, baba, baoa, k0, cap, (cap * ba).sum(1), (cap * cap).sum(1) - r * r,
                       has_cap.astype(np.float64), ba / length[:, None], length, r)
        return params, np.stack([a, b], axis=1), np.stack([r, r], axis=1)

    @staticmethod
    def intersect(p: np.ndarray, rays: Rays) -> np.ndarray:
        t_body, y, ok = _segment_body(p, rays, 3)
        t = np.where(ok & (y >= 0.0) & (y <= p[9]), t_body, _INF)
        # cap plane (x - cap) . ba = 0  ->  t = (cap . ba) / (d . ba); inside if |t d - cap|^2 <= r^2
        t_cap = p[15] / rays.dot(p[3], p[4], p[5])
        inside = t_cap * (t_cap * rays.dd - 2.0 * rays.dot(p[12], p[13], p[14])) + p[16] <= 0.0
        cap_ok = (p[17] > 0.0) & inside & (t_cap > NEAR)
        return np.where(cap_ok & (t_cap < t), t_cap, t)

    @staticmethod
    def normals(p: np.ndarray, px: np.ndarray, py: np.ndarray, pz: np.ndarray) -> np.ndarray:
        x, y, z = px - p[0], py - p[1], pz - p[2]
        ux, uy, uz, length, radius = p[18], p[19], p[20], p[21], p[22]
        axial = x * ux + y * uy + z * uz
        rx, ry, rz = x - axial * ux, y - axial * uy, z - axial * uz
        radial = np.sqrt(rx * rx + ry * ry + rz * rz)
        on_cap = np.minimum(np.abs(axial), np.abs(length - axial)) < np.abs(radius - radial)
        cap_sign = np.where(axial < 0.5 * length, np.float32(-1.0), np.float32(1.0))
        return _unit_columns(np.where(on_cap, cap_sign * ux, rx), np.where(on_cap, cap_sign * uy, ry),
                             np.where(on_cap, cap_sign * uz, rz))


@dataclass(frozen=True, eq=False)
class Cone:
    """Solid right cone: base disc of ``radius`` at ``base`` (normal ``-axis``), apex at ``base + height axis``."""

    base: np.ndarray
    axis: np.ndarray
    height: float
    radius: float

    # base (3), axis (3), height, k2 = (r/h)^2, y0 = camera axial, 1 + k2, k2 (h - y0) - y0, C, base cap
    # terms: base . axis, |base|^2 - r^2, cap visible (y0 < 0), radius
    ROWS: ClassVar[int] = 16

    @staticmethod
    def pack(prims: list["Cone"], rotation: np.ndarray, origin: np.ndarray):
        base = _to_camera(np.array([p.base for p in prims], np.float64), rotation, origin)
        axis = np.array([p.axis for p in prims], np.float64) @ rotation.T
        h = np.array([p.height for p in prims], np.float64)
        r = np.array([p.radius for p in prims], np.float64)
        k2 = (r / h) ** 2
        y0 = -(base * axis).sum(1)
        quad_c = (base * base).sum(1) - y0 * y0 - k2 * (h - y0) ** 2
        params = _rows(base, axis, h, k2, y0, 1.0 + k2, k2 * (h - y0) - y0, quad_c, -y0,
                       (base * base).sum(1) - r * r, (y0 < 0.0).astype(np.float64), r)
        apex = base + h[:, None] * axis
        return params, np.stack([base, apex], axis=1), np.stack([r, np.zeros_like(r)], axis=1)

    @staticmethod
    def intersect(p: np.ndarray, rays: Rays) -> np.ndarray:
        # q(t) = t d - base, axial y(t) = y0 + t e; lateral surface |q|^2 - y^2 - k2 (h - y)^2 = 0,
        # i.e. A t^2 + 2 B t + C = 0 (two nappes; keep roots with 0 <= y <= h).
        e = rays.dot(p[3], p[4], p[5])
        quad_a = rays.dd - p[9] * e * e
        quad_b = e * p[10] - rays.dot(p[0], p[1], p[2])
        disc = quad_b * quad_b - quad_a * p[11]
        q = -(quad_b + np.copysign(np.sqrt(np.maximum(disc, np.float32(0.0))), quad_b))
        best = _INF
        for t in (q / quad_a, p[11] / q):
            y = p[8] + t * e
            best = np.minimum(best, np.where((disc >= 0.0) & (y >= 0.0) & (y <= p[6]) & (t > NEAR), t, _INF))
        # base disc (only visible from below its plane)
        t_cap = p[12] / e
        inside = t_cap * (t_cap * rays.dd - 2.0 * rays.dot(p[0], p[1], p[2])) + p[13] <= 0.0
        return np.where((p[14] > 0.0) & inside & (t_cap > NEAR) & (t_cap < best), t_cap, best)

    @staticmethod
    def normals(p: np.ndarray, px: np.ndarray, py: np.ndarray, pz: np.ndarray) -> np.ndarray:
        x, y, z = px - p[0], py - p[1], pz - p[2]
        ax, ay, az, h, k2, radius = p[3], p[4], p[5], p[6], p[7], p[15]
        axial = x * ax + y * ay + z * az
        rx, ry, rz = x - axial * ax, y - axial * ay, z - axial * az
        radial = np.sqrt(rx * rx + ry * ry + rz * rz)
        lift = k2 * (h - axial)  # half the implicit gradient: radial part + k2 (h - y) axis
        to_side = np.abs(radius * (1.0 - axial / h) - radial) / np.sqrt(1.0 + k2)
        on_cap = np.abs(axial) < to_side
        return _unit_columns(np.where(on_cap, -ax, rx + lift * ax), np.where(on_cap, -ay, ry + lift * ay),
                             np.where(on_cap, -az, rz + lift * az))


Primitive = Union[Sphere, Ellipsoid, Box, Capsule, Cylinder, Cone]
_KINDS: tuple[type, ...] = (Sphere, Ellipsoid, Box, Capsule, Cylinder, Cone)


# ---------------------------------------------------------------------------------------------
# The ray caster
# ---------------------------------------------------------------------------------------------
@dataclass(eq=False)
class RayHits:
    """Per-pixel result of one cast (``H x W``).

    ``primitive`` intp: ``-1`` where no ray hit, ``0..5`` a room surface (``ROOM_SURFACES`` order),
    ``6 + k`` the ``k``-th primitive handed to :meth:`RayCaster.cast`. ``depth`` float32 z-depth
    (``inf`` without a hit). ``normals`` float32 ``[3, H, W]`` camera-space unit normals (0 without a
    hit). ``world_dirs`` the world-space ray directions ``R^T d`` (``[H, W]`` each): the world point of
    a hit is ``camera position + depth * world_dirs``.
    """

    primitive: np.ndarray
    depth: np.ndarray
    normals: np.ndarray
    world_dirs: tuple[np.ndarray, np.ndarray, np.ndarray]


class RayCaster:
    """Casts the rays of an ``H x W`` pinhole camera (square pixels) into a room holding primitives.

    The pixel grid is computed once. Pixel ``(row i, column j)`` looks through its centre:
    ``dx = (j + 0.5 - W/2) / (W/2) * tan(fov/2)``, ``dy = -(i + 0.5 - H/2) / (W/2) * tan(fov/2)``,
    ``dz = -1`` (``fov`` is the horizontal field of view).
    """

    def __init__(self, height: int, width: int):
        self.height, self.width = int(height), int(width)
        half_w = width / 2.0
        self._x_ndc = (np.arange(width) + 0.5 - half_w) / half_w
        self._y_ndc = -(np.arange(height) + 0.5 - height / 2.0) / half_w
        # Full-frame float32 copies for the room: contiguous arithmetic is much faster than broadcasting.
        self._x_grid = np.ascontiguousarray(np.broadcast_to(self._x_ndc[None, :], (height, width)), np.float32)
        self._y_grid = np.ascontiguousarray(np.broadcast_to(self._y_ndc[:, None], (height, width)), np.float32)

    def ray_directions(self, fov: float) -> tuple[np.ndarray, np.ndarray]:
        """``(dx [W], dy [H])`` (float64) of the camera-space rays for horizontal field of view ``fov`` (rad)."""
        scale = math.tan(fov / 2.0)
        return self._x_ndc * scale, self._y_ndc * scale

    def pixel_boxes(self, centers: np.ndarray, radii: np.ndarray, owner: np.ndarray, fov: float):
        """Pixel rectangles ``(r0, r1, c0, c1)`` (one per shape, possibly empty) of the images of shapes
        each lying inside the convex hull of its camera-space balls (``centers [B, 3]``, ``radii [B]``,
        ``owner [B]`` the shape of each ball, sorted, every shape owning at least one ball).

        Perspective maps the hull of the balls onto the hull of their images, so the union of the balls'
        boxes bounds the shape's image. A shape reaching behind the near plane gets the full frame.
        """
        height, width = self.height, self.width
        depth = -centers[:, 2]
        low, high = depth - radii, depth + radii
        in_front = low > NEAR
        safe_low = np.where(in_front, low, 1.0)
        x_lo, x_hi = centers[:, 0] - radii, centers[:, 0] + radii
        y_lo, y_hi = centers[:, 1] - radii, centers[:, 1] + radii
        x_a, x_b, x_c, x_d = x_lo / safe_low, x_lo / high, x_hi / safe_low, x_hi / high
        y_a, y_b, y_c, y_d = y_lo / safe_low, y_lo / high, y_hi / safe_low, y_hi / high
        starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
        x_min = np.minimum.reduceat(np.minimum(np.minimum(x_a, x_b), np.minimum(x_c, x_d)), starts)
        x_max = np.maximum.reduceat(np.maximum(np.maximum(x_a, x_b), np.maximum(x_c, x_d)), starts)
        y_min = np.minimum.reduceat(np.minimum(np.minimum(y_a, y_b), np.minimum(y_c, y_d)), starts)
        y_max = np.maximum.reduceat(np.maximum(np.maximum(y_a, y_b), np.maximum(y_c, y_d)), starts)
        visible = np.minimum.reduceat(in_front, starts)
        behind = np.minimum.reduceat(high <= NEAR, starts)
        # ndc = x / depth / tan(fov/2); column = ndc W/2 + W/2 - 0.5; row = H/2 - 0.5 - ndc_y W/2
        k = (width / 2.0) / math.tan(fov / 2.0)
        c0 = np.where(visible, np.clip(np.floor(x_min * k + (width / 2.0 - 0.5)), 0, width), 0)
        c1 = np.where(visible, np.clip(np.ceil(x_max * k + (width / 2.0 - 0.5)) + 1, 0, width), width)
        r0 = np.where(visible, np.clip(np.floor((height / 2.0 - 0.5) - y_max * k), 0, height), 0)
        r1 = np.where(visible, np.clip(np.ceil((height / 2.0 - 0.5) - y_min * k) + 1, 0, height), height)
        r1 = np.where(behind, r0, r1)
        return r0.astype(np.intp), r1.astype(np.intp), c0.astype(np.intp), c1.astype(np.intp)

    def cast(
        self,
        fov: float,
        rotation: np.ndarray,
        position: np.ndarray,
        room_low: np.ndarray,
        room_high: np.ndarray,
        primitives: Sequence[Primitive],
    ) -> RayHits:
        """Nearest hit per pixel among the room's six inner faces and the (world-space) ``primitives``.

        ``rotation`` is the world-to-camera rotation (rows: the camera's x, y, z axes in world
        coordinates), ``position`` the camera centre in world coordinates, ``room_low``/``room_high``
        the opposite corners of the axis-aligned room, which must contain the camera.
        """
        rot = np.asarray(rotation, np.float64)
        position = _vec(position)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            depth, primitive, normals, world = self._cast_room(fov, rot, position, room_low, room_high)
            if primitives:
                self._cast_primitives(fov, rot, position, primitives, depth, primitive, normals)
        height, width = self.height, self.width
        return RayHits(primitive.reshape(height, width), depth.reshape(height, width),
                       normals.reshape(3, height, width), world)

    def _cast_room(self, fov, rot, position, room_low, room_high):
        """Flat ``depth``, ``primitive``, ``normals [3, HW]`` of the room's inner faces, and world ray dirs."""
        scale = np.float32(math.tan(fov / 2.0))
        ray_x, ray_y = self._x_grid * scale, self._y_grid * scale
        # World direction of every ray, w = R^T d with d = (dx, dy, -1).
        world = tuple(
            np.float32(rot[0, a]) * ray_x + (np.float32(rot[1, a]) * ray_y - np.float32(rot[2, a])) for a in range(3)
        )
        # Exit distance of the box along each axis: the positive one of the two slab distances.
        t_axes = []
        for a in range(3):
            inv = np.float32(1.0) / world[a]
            t_axes.append(np.maximum(np.float32(room_high[a] - position[a]) * inv,
                                     np.float32(room_low[a] - position[a]) * inv))
        tx, ty, tz = t_axes
        t_yz = np.minimum(ty, tz)
        depth = np.minimum(tx, t_yz)
        # face id = 2 * axis + (direction along that axis > 0), axis = argmin(tx, ty, tz) (first on ties)
        not_x = tx > t_yz
        z_over_y = ty > tz
        axis = not_x * (1 + z_over_y.astype(np.int32))
        w_sel = np.where(not_x, np.where(z_over_y, world[2], world[1]), world[0])
        primitive = (2 * axis + (w_sel > 0.0)).astype(np.intp).ravel()
        face_normals = np.zeros((3, len(ROOM_SURFACES)), dtype=np.float32)
        for a in range(3):
            face_normals[:, 2 * a] = rot[:, a]  # the low face's inward normal is +axis (in camera space)
            face_normals[:, 2 * a + 1] = -rot[:, a]
        normals = np.stack([np.take(face_normals[c], primitive) for c in range(3)])
        return depth.ravel(), primitive, normals, world

    def _pairs(self, r0, r1, c0, c1):
        """All (pixel, owner) pairs of the rectangles, grouped by owner: ``(sizes, row, col)``."""
        box_w = np.maximum(c1 - c0, 0)
        sizes = np.maximum(r1 - r0, 0) * box_w
        total = int(sizes.sum())
        owner_start = np.repeat(np.cumsum(sizes) - sizes, sizes)
        local = np.arange(total, dtype=np.int64) - owner_start
        width_rep = np.repeat(box_w, sizes)
        # exact integer division in float32 (all values < 2**24)
        row_local = np.floor((local.astype(np.float32) + np.float32(0.5)) / width_rep.astype(np.float32))
        row_local = row_local.astype(np.intp)
        row = row_local + np.repeat(r0, sizes)
        col = local - row_local * width_rep + np.repeat(c0, sizes)
        return sizes, row, col

    def _cast_primitives(self, fov, rot, position, primitives, depth, primitive, normals) -> None:
        """Depth-test ``primitives`` against the flat ``depth``/``primitive``/``normals`` buffers, in place.

        Room faces have ids 0..5 and primitives larger ones, so on an exact depth tie a primitive beats
        the room and the primitive listed last beats the others.
        """
        width = self.width
        # float64 for the (pixel, primitive) pairs: near tangencies (silhouettes, a cone's apex) the
        # roots are ill-conditioned and float32 would cost up to ~1e-4 in depth and a degree in normal.
        dx, dy = self.ray_directions(fov)
        # Camera-space parameter tables per kind; primitives ordered by kind from here on.
        kinds, tables, order, centers, radii, ball_owner = [], [], [], [], [], []
        for kind in _KINDS:
            index = [i for i, prim in enumerate(primitives) if type(prim) is kind]
            if not index:
                continue
            params, hull_centers, hull_radii = kind.pack([primitives[i] for i in index], rot, position)
            n, balls = hull_radii.shape
            ball_owner.append(np.repeat(np.arange(len(order), len(order) + n), balls))
            kinds.append(kind)
            tables.append(params)
            order.extend(index)
            centers.append(hull_centers.reshape(n * balls, 3))
            radii.append(hull_radii.reshape(n * balls))
        boxes = self.pixel_boxes(np.concatenate(centers), np.concatenate(radii), np.concatenate(ball_owner), fov)
        sizes, row, col = self._pairs(*boxes)
        if row.size == 0:
            return
        kind_ends = np.cumsum([t.shape[1] for t in tables])
        pair_ends = np.cumsum(sizes)[kind_ends - 1]

        # Intersect every (pixel, primitive) pair, kind by kind.
        ray_dx, ray_dy = np.take(dx, col), np.take(dy, row)
        ray_dd = ray_dx * ray_dx + ray_dy * ray_dy + 1.0
        t = np.empty(row.size, dtype=np.float32)
        lo = first = 0
        for kind, params, hi, last in zip(kinds, tables, pair_ends, kind_ends):
            if hi > lo:
                rays = Rays(ray_dx[lo:hi], ray_dy[lo:hi], ray_dd[lo:hi])
                t[lo:hi] = kind.intersect(np.repeat(params, sizes[first:last], axis=1), rays)
            lo, first = hi, last

        # Nearest hit per pixel, then the largest id among the pairs at that depth.
        pixel = row * width + col
        ids = np.repeat(np.asarray(order, np.intp) + len(ROOM_SURFACES), sizes)
        np.minimum.at(depth, pixel, t)
        at_depth = (t <= np.take(depth, pixel)) & (t < _INF)
        np.maximum.at(primitive, pixel[at_depth], ids[at_depth])
        won = np.take(primitive, pixel) == ids  # needs at_depth: one pair per (pixel, primitive)

        # Normals of the winning pairs only (still grouped by primitive, so parameters are repeated).
        counts = _counts_per_primitive(sizes, won)
        pix, t_won = pixel[won], t[won]
        px, py = t_won * ray_dx[won], t_won * ray_dy[won]
        won_ends = np.cumsum(counts)[kind_ends - 1]
        lo = first = 0
        for kind, params, hi, last in zip(kinds, tables, won_ends, kind_ends):
            if hi > lo:
                n = kind.normals(np.repeat(params, counts[first:last], axis=1), px[lo:hi], py[lo:hi], -t_won[lo:hi])
                for c in range(3):
                    normals[c][pix[lo:hi]] = n[c]
            lo, first = hi, last


def _counts_per_primitive(sizes: np.ndarray, selected: np.ndarray) -> np.ndarray:
    """Number of ``selected`` pairs of each primitive; primitive ``k`` owns the ``sizes[k]`` pairs after
    those of primitives ``< k``."""
    running = np.concatenate([[0], np.cumsum(selected)])
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return running[bounds[1:]] - running[bounds[:-1]]
