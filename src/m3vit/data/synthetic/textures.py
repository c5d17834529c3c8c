"""Procedural textures of the room surfaces (planks, tiles, checker, stripes, wainscot, smooth blotches): the
albedo of every floor, wall and ceiling pixel of a ray-cast scene. Float32 throughout; every function works
on the pixels of one surface."""

from __future__ import annotations

import numpy as np

from .._geometry import ROOM_SURFACES
from .scenes import RoomStyle, Scene

_FLOOR, _CEILING = ROOM_SURFACES.index("floor"), ROOM_SURFACES.index("ceiling")


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
