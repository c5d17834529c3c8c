"""Tests of the procedural scenes: an independent float64 ray caster, label consistency, determinism, API."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m3vit.data._geometry import Box, Capsule, Cone, Cylinder, Ellipsoid, RayCaster, Sphere
from m3vit.data.synthetic import CLASSES, Camera, SyntheticScenes

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # no NaN/inf arithmetic may leak out

SIZE = (48, 64)  # non-square on purpose: catches swapped axes
TASKS = ("semseg", "human_parts", "sal", "normals", "edge", "depth")
ROOM_CLASSES = {CLASSES.index("floor"), CLASSES.index("wall"), CLASSES.index("ceiling")}
PERSON = CLASSES.index("person")


@pytest.fixture(scope="module")
def dataset() -> SyntheticScenes:
    return SyntheticScenes("train", size=SIZE, length=50, seed=0)


@pytest.fixture(scope="module")
def samples(dataset):
    return [dataset[i] for i in range(12)]


@pytest.fixture(scope="module")
def renders(dataset):
    return [dataset.render(i) for i in range(12)]


# ---------------------------------------------------------------------------------------------
# An independent reference ray caster: world space, unit ray directions, float64, one pixel at a time,
# every primitive tested face by face / part by part (no slabs, no stable-root tricks, no culling).
# ---------------------------------------------------------------------------------------------
def dot(a, b):
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def add(a, b, s=1.0):
    return (a[0] + s * b[0], a[1] + s * b[1], a[2] + s * b[2])


def scale(a, s):
    return (a[0] * s, a[1] * s, a[2] * s)


def cross(a, b):
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def unit(a):
    n = math.sqrt(dot(a, a))
    return (a[0] / n, a[1] / n, a[2] / n)


def vec(x):
    return tuple(float(v) for v in np.asarray(x, dtype=np.float64).reshape(3))


def column(m, j):
    m = np.asarray(m, dtype=np.float64)
    return (float(m[0, j]), float(m[1, j]), float(m[2, j]))


def camera_basis(cam: Camera):
    forward = (-math.sin(cam.yaw) * math.cos(cam.pitch), math.sin(cam.pitch), -math.cos(cam.yaw) * math.cos(cam.pitch))
    right = (math.cos(cam.yaw), 0.0, -math.sin(cam.yaw))
    return forward, right, cross(right, forward)


def pixel_ray(cam: Camera, row: int, col: int, height: int, width: int):
    """Unit world direction through the centre of pixel (row, col); square pixels, horizontal fov."""
    forward, right, up = camera_basis(cam)
    t = math.tan(cam.fov / 2)
    x = (col + 0.5 - width / 2) / (width / 2) * t
    y = -(row + 0.5 - height / 2) / (width / 2) * t
    return unit(add(add(forward, right, x), up, y))


def solve_quadratic(a, b, c):
    """Real roots of a x^2 + b x + c = 0 (ascending)."""
    if abs(a) < 1e-15:
        return [] if abs(b) < 1e-15 else [-c / b]
    disc = b * b - 4 * a * c
    if disc < 0:
        return []
    r = math.sqrt(disc)
    return sorted([(-b - r) / (2 * a), (-b + r) / (2 * a)])


def hit_sphere(o, u, center, radius):
    oc = add(o, center, -1.0)
    best = None
    for s in solve_quadratic(1.0, 2 * dot(oc, u), dot(oc, oc) - radius**2):
        if s > 1e-9 and (best is None or s < best[0]):
            p = add(o, u, s)
            best = (s, unit(add(p, center, -1.0)))
    return best


def hit_disc(o, u, center, normal, radius):
    """Front side of a disc (normal pointing outwards)."""
    den = dot(u, normal)
    if den >= 0:
        return None
    s = dot(add(center, o, -1.0), normal) / den
    if s <= 1e-9:
        return None
    p = add(o, u, s)
    d = add(p, center, -1.0)
    return (s, normal) if dot(d, d) <= radius**2 else None


def hit_tube(o, u, a, b, radius):
    """The lateral surface of the cylinder around segment a-b."""
    axis_vec = add(b, a, -1.0)
    length = math.sqrt(dot(axis_vec, axis_vec))
    e = scale(axis_vec, 1 / length)
    w = add(o, a, -1.0)
    u_perp = add(u, e, -dot(u, e))
    w_perp = add(w, e, -dot(w, e))
    best = None
    for s in solve_quadratic(dot(u_perp, u_perp), 2 * dot(w_perp, u_perp), dot(w_perp, w_perp) - radius**2):
        p = add(o, u, s)
        axial = dot(add(p, a, -1.0), e)
        if s > 1e-9 and 0 <= axial <= length and (best is None or s < best[0]):
            best = (s, unit(add(add(p, a, -1.0), e, -axial)))
    return best


def nearest(*hits):
    hits = [h for h in hits if h is not None]
    return min(hits, key=lambda h: h[0]) if hits else None


def hit_primitive(o, u, prim):
    if isinstance(prim, Sphere):
        return hit_sphere(o, u, vec(prim.center), float(prim.radius))
    if isinstance(prim, Capsule):
        a, b, r = vec(prim.a), vec(prim.b), float(prim.radius)
        return nearest(hit_tube(o, u, a, b, r), hit_sphere(o, u, a, r), hit_sphere(o, u, b, r))
    if isinstance(prim, Cylinder):
        a, b, r = vec(prim.a), vec(prim.b), float(prim.radius)
        e = unit(add(b, a, -1.0))
        return nearest(hit_tube(o, u, a, b, r), hit_disc(o, u, a, scale(e, -1.0), r), hit_disc(o, u, b, e, r))
    if isinstance(prim, Box):
        c, half = vec(prim.center), [float(h) for h in prim.half_size]
        axes = [column(prim.axes, j) for j in range(3)]
        best = None
        for j in range(3):
            for sign in (-1.0, 1.0):
                n = scale(axes[j], sign)
                den = dot(u, n)
                if den >= 0:
                    continue
                face = add(c, n, half[j])
                s = dot(add(face, o, -1.0), n) / den
                p = add(o, u, s)
                local = [dot(add(p, c, -1.0), axes[k]) for k in range(3)]
                inside = all(abs(local[k]) <= half[k] + 1e-9 for k in range(3) if k != j)
                if s > 1e-9 and inside and (best is None or s < best[0]):
                    best = (s, n)
        return best
    if isinstance(prim, Ellipsoid):
        c, radii = vec(prim.center), [float(r) for r in prim.radii]
        axes = [column(prim.axes, j) for j in range(3)]
        oc = add(o, c, -1.0)
        lo = [dot(oc, axes[j]) / radii[j] for j in range(3)]
        lu = [dot(u, axes[j]) / radii[j] for j in range(3)]
        roots = solve_quadratic(
            sum(x * x for x in lu), 2 * sum(x * y for x, y in zip(lo, lu)), sum(x * x for x in lo) - 1
        )
        roots = [s for s in roots if s > 1e-9]
        if not roots:
            return None
        s = roots[0]
        p = add(o, u, s)
        g = (0.0, 0.0, 0.0)
        for j in range(3):
            g = add(g, axes[j], dot(add(p, c, -1.0), axes[j]) / radii[j] ** 2)
        return s, unit(g)
    if isinstance(prim, Cone):
        base, axis, h, r = vec(prim.base), unit(vec(prim.axis)), float(prim.height), float(prim.radius)
        helper = (1.0, 0.0, 0.0) if abs(axis[0]) < 0.9 else (0.0, 0.0, 1.0)
        e1 = unit(cross(axis, helper))
        e2 = cross(e1, axis)
        ob = add(o, base, -1.0)
        ox, oy, oz = dot(ob, e1), dot(ob, axis), dot(ob, e2)
        ux, uy, uz = dot(u, e1), dot(u, axis), dot(u, e2)
        k2 = (r / h) ** 2
        best = None
        roots = solve_quadratic(ux * ux + uz * uz - k2 * uy * uy, 2 * (ox * ux + oz * uz + k2 * (h - oy) * uy),
                                ox * ox + oz * oz - k2 * (h - oy) ** 2)
        for s in roots:
            y = oy + s * uy
            if s > 1e-9 and 0 <= y <= h and (best is None or s < best[0]):
                x, z = ox + s * ux, oz + s * uz
                n = add(add(scale(e1, x), e2, z), axis, k2 * (h - y))
                best = (s, unit(n))
        return nearest(best, hit_disc(o, u, base, scale(axis, -1.0), r))
    raise TypeError(type(prim))


def hit_room(o, u, low, high):
    best = None
    for a in range(3):
        if u[a] == 0:
            continue
        for side, bound in enumerate((low[a], high[a])):
            s = (bound - o[a]) / u[a]
            p = add(o, u, s)
            inside = all(low[k] - 1e-9 <= p[k] <= high[k] + 1e-9 for k in range(3))
            if s > 1e-9 and inside and (best is None or s < best[0]):
                n = [0.0, 0.0, 0.0]
                n[a] = 1.0 if side == 0 else -1.0  # inward
                best = (s, tuple(n), 2 * a + side)
    return best


def reference_pixel(cam, low, high, primitives, row, col, height, width):
    """(primitive id as in RenderedScene.primitive, z-depth, camera-space normal) of one pixel."""
    o = vec(cam.position)
    u = pixel_ray(cam, row, col, height, width)
    s, n, ident = hit_room(o, u, vec(low), vec(high))
    for k, prim in enumerate(primitives):
        h = hit_primitive(o, u, prim)
        if h is not None and h[0] < s:
            s, n, ident = h[0], h[1], 6 + k
    forward, right, up = camera_basis(cam)
    return ident, s * dot(u, forward), (dot(n, right), dot(n, up), -dot(n, forward))


def interior_pixels(ids: np.ndarray) -> np.ndarray:
    """Mask of pixels whose 4 neighbours carry the same id (away from silhouettes and image borders)."""
    same = np.zeros(ids.shape, dtype=bool)
    core = ids[1:-1, 1:-1]
    same[1:-1, 1:-1] = (
        (core == ids[:-2, 1:-1]) & (core == ids[2:, 1:-1]) & (core == ids[1:-1, :-2]) & (core == ids[1:-1, 2:])
    )
    return same


def check_against_reference(cam, low, high, primitives, ids, depth, normals, pixels):
    height, width = ids.shape
    for row, col in pixels:
        ident, z, n = reference_pixel(cam, low, high, primitives, int(row), int(col), height, width)
        assert ids[row, col] == ident, (row, col)
        assert depth[row, col] == pytest.approx(z, rel=1e-4), (row, col)
        cos = float(np.dot(normals[:, row, col], n))
        assert cos > math.cos(math.radians(0.2)), (row, col, normals[:, row, col], n)


# ---------------------------------------------------------------------------------------------
# Ray caster against the reference
# ---------------------------------------------------------------------------------------------
def test_scene_ray_cast_matches_scalar_reference(dataset):
    """~50 pixels per scene (random + on every kind of primitive), three scenes."""
    rng = np.random.default_rng(1)
    kinds_seen = set()
    for index in (0, 1, 2):
        scene = dataset.scene(index)
        rendered = dataset.render(index)
        ids = rendered.primitive
        depth, normals = rendered.depth[0], rendered.normals
        interior = interior_pixels(ids)
        candidates = np.argwhere(interior)
        chosen = [tuple(p) for p in candidates[rng.choice(len(candidates), 20, replace=False)]]
        for kind in (Sphere, Ellipsoid, Box, Capsule, Cylinder, Cone):
            prim_ids = [6 + k for k, p in enumerate(scene.primitives) if isinstance(p, kind)]
            on_kind = np.argwhere(interior & np.isin(ids, prim_ids))
            if len(on_kind):
                kinds_seen.add(kind)
                chosen += [tuple(p) for p in on_kind[rng.choice(len(on_kind), min(6, len(on_kind)), replace=False)]]
        check_against_reference(
            scene.camera, scene.room_low, scene.room_high, scene.primitives, ids, depth, normals, chosen
        )
        # instance ids follow from the primitive ids
        table = list(range(6)) + list(scene.primitive_instance)
        for row, col in chosen:
            assert rendered.instance[row, col] == table[ids[row, col]]
    assert {Sphere, Capsule, Ellipsoid} <= kinds_seen  # people were checked


def _look_at(position, target, fov_deg=60.0) -> Camera:
    d = np.asarray(target, float) - np.asarray(position, float)
    yaw = math.atan2(-d[0], -d[2])
    pitch = math.atan2(d[1], math.hypot(d[0], d[2]))
    return Camera(np.asarray(position, float), yaw, pitch, math.radians(fov_deg))


def _random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _cast_and_check(cam, primitives, size=(40, 40), min_pixels=20):
    low, high = np.array([-20.0, -20.0, -20.0]), np.array([20.0, 20.0, 20.0])
    hits = RayCaster(*size).cast(cam.fov, cam.rotation, cam.position, low, high, primitives)
    mask = interior_pixels(hits.primitive)
    on_prims = np.argwhere(mask & (hits.primitive >= 6))
    assert len(on_prims) >= min_pixels, "the primitive should be visible"
    pixels = [tuple(p) for p in np.argwhere(mask)]
    check_against_reference(cam, low, high, primitives, hits.primitive, hits.depth, hits.normals, pixels)
    assert np.allclose(np.linalg.norm(hits.normals, axis=0), 1.0, atol=1e-5)


def test_parameter_tables_have_the_documented_rows(dataset):
    scenes = [dataset.scene(i) for i in range(12)]
    rot, pos = scenes[0].camera.rotation, scenes[0].camera.position
    for kind in (Sphere, Ellipsoid, Box, Capsule, Cylinder, Cone):
        prims = [p for scene in scenes for p in scene.primitives if type(p) is kind][:3]
        assert prims, kind
        params, centers, radii = kind.pack(prims, rot, pos)
        assert params.shape == (kind.ROWS, len(prims)) and params.dtype == np.float64
        assert centers.shape[:2] == radii.shape and centers.shape[0] == len(prims)


def test_special_views_match_reference():
    rng = np.random.default_rng(3)
    # A capsule pointing at the camera (camera inside its infinite cylinder): only the end ball is seen.
    cam = _look_at([0, 0, 5], [0, 0, 0])
    _cast_and_check(cam, [Capsule(np.array([0, 0, 1.0]), np.array([0, 0, -2.0]), 0.6)])
    # Cylinders and a cone seen from above (top caps), and a cone seen from below (its base disc).
    cam = _look_at([0, 4, 3], [0, 0, 0])
    _cast_and_check(cam, [Cylinder(np.array([-1.0, 0, 0]), np.array([-1.0, 1.0, 0]), 0.5),
                          Cone(np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), 1.2, 0.6)])
    cam = _look_at([0, -3, 3], [0, 0.5, 0])
    _cast_and_check(cam, [Cone(np.array([0.0, 0.5, 0]), np.array([0, 1.0, 0]), 1.0, 0.8),
                          Cylinder(np.array([1.5, 1.0, 0]), np.array([1.5, -0.5, 0.5]), 0.4)])
    # Arbitrarily oriented box and ellipsoid, an oblique capsule and a sphere overlapping them.
    cam = _look_at([0.5, 1.0, 6], [0, 0, 0])
    _cast_and_check(cam, [Box(np.array([-1.0, 0, 0]), _random_rotation(rng), np.array([0.6, 0.4, 0.8])),
                          Ellipsoid(np.array([1.0, 0.2, 0]), _random_rotation(rng), np.array([0.9, 0.4, 0.6])),
                          Capsule(np.array([-2.0, -1.0, 1.0]), np.array([2.0, 1.5, -1.0]), 0.25),
                          Sphere(np.array([0.3, -0.3, 0.5]), 0.5)])


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["sphere", "ellipsoid", "box", "capsule", "cylinder", "cone"]),
       seed=st.integers(0, 2**31 - 1))
def test_random_primitive_matches_reference(kind, seed):
    rng = np.random.default_rng(seed)
    center = rng.uniform(-0.5, 0.5, size=3)
    size = rng.uniform(0.4, 1.0, size=3)
    rot = _random_rotation(rng)
    end_a, end_b = center - rot[:, 0] * size[0], center + rot[:, 0] * size[0]
    if kind == "sphere":
        prim, bound = Sphere(center, size[0]), size[0]
    elif kind == "ellipsoid":
        prim, bound = Ellipsoid(center, rot, size), size.max()
    elif kind == "box":
        prim, bound = Box(center, rot, size), np.linalg.norm(size)
    elif kind == "capsule":
        prim, bound = Capsule(end_a, end_b, 0.6 * size[1]), size[0] + 0.6 * size[1]
    elif kind == "cylinder":
        prim, bound = Cylinder(end_a, end_b, 0.6 * size[1]), math.hypot(size[0], 0.6 * size[1])
    else:
        prim, bound = Cone(end_a, rot[:, 0], 2 * size[0], 0.8 * size[1]), math.hypot(size[0], 0.8 * size[1])
    # camera outside the primitive's bounding ball, which then fills most of the field of view
    fov = math.radians(rng.uniform(40, 70))
    reach = float(np.linalg.norm(center) + bound)
    direction = rng.normal(size=3)
    position = reach / math.sin(0.8 * fov / 2) * direction / np.linalg.norm(direction)
    _cast_and_check(_look_at(position, [0, 0, 0], math.degrees(fov)), [prim], size=(28, 32), min_pixels=1)


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------
def test_sample_dtypes_shapes_and_ranges(samples):
    h, w = SIZE
    for s in samples:
        assert set(s) == {"image", *TASKS, "meta"}
        assert s["image"].dtype == torch.float32 and s["image"].shape == (3, h, w)
        assert 0.0 <= float(s["image"].min()) and float(s["image"].max()) <= 1.0
        assert s["semseg"].dtype == torch.int64 and s["semseg"].shape == (h, w)
        assert int(s["semseg"].min()) >= 0 and int(s["semseg"].max()) < len(CLASSES)
        assert s["human_parts"].dtype == torch.int64 and s["human_parts"].shape == (h, w)
        assert int(s["human_parts"].min()) >= 0 and int(s["human_parts"].max()) <= 6
        for task, channels in (("sal", 1), ("edge", 1), ("depth", 1), ("normals", 3)):
            assert s[task].dtype == torch.float32 and s[task].shape == (channels, h, w), task
        assert set(torch.unique(s["sal"]).tolist()) <= {0.0, 1.0}
        assert set(torch.unique(s["edge"]).tolist()) <= {0.0, 1.0}
        depth = s["depth"]
        assert bool(torch.isfinite(depth).all()) and float(depth.min()) > 0 and float(depth.max()) < 50
        assert s["image"].std() > 0.02  # not a flat picture


def test_normals_are_unit_vectors(samples):
    for s in samples:
        # the closed room leaves no ray without a hit, so every pixel carries a normal
        assert float((s["normals"].norm(dim=0) - 1).abs().max()) < 1e-5


def test_visible_surfaces_face_the_camera(dataset, renders):
    """A visible point p with outward normal n satisfies n . (camera - p) >= 0 (up to rounding)."""
    h, w = SIZE
    for index, rendered in enumerate(renders[:4]):
        cam = dataset.scene(index).camera
        t = math.tan(cam.fov / 2)
        cols, rows = np.meshgrid(np.arange(w), np.arange(h))
        dx = (cols + 0.5 - w / 2) / (w / 2) * t
        dy = -(rows + 0.5 - h / 2) / (w / 2) * t
        z = rendered.depth[0]
        points = np.stack([dx * z, dy * z, -z])
        facing = -(rendered.normals * points).sum(0) / np.linalg.norm(points, axis=0)
        assert facing.min() > -1e-3


def test_floor_normals_are_flat_and_match_the_camera_pitch(dataset, renders):
    floor = CLASSES.index("floor")
    for index, rendered in enumerate(renders):
        mask = rendered.semseg == floor
        assert mask.sum() > 0
        pitch = dataset.scene(index).camera.pitch
        expected = np.array([0.0, math.cos(pitch), -math.sin(pitch)])  # world up seen by a rolled-0 camera
        n = rendered.normals[:, mask]
        assert np.abs(n - n[:, :1]).max() < 1e-5
        assert np.abs(n - expected[:, None]).max() < 1e-5


def test_floor_depth_matches_plane_intersection(dataset, renders):
    """Slow per-pixel loop: z-depth of the plane y = 0 along each floor pixel's ray."""
    h, w = SIZE
    floor = CLASSES.index("floor")
    rng = np.random.default_rng(0)
    for index in range(4):
        rendered = renders[index]
        cam = dataset.scene(index).camera
        forward, _, _ = camera_basis(cam)
        pixels = np.argwhere(rendered.semseg == floor)
        for row, col in pixels[rng.choice(len(pixels), 10, replace=False)]:
            u = pixel_ray(cam, int(row), int(col), h, w)
            s = -float(cam.position[1]) / u[1]
            assert rendered.depth[0, row, col] == pytest.approx(s * dot(u, forward), rel=1e-4)


def test_edges_follow_instance_changes(renders):
    for r in renders:
        inst, edge = r.instance, r.edge[0] > 0
        h, w = inst.shape
        for row in range(h):
            for col in range(w):
                right = col + 1 < w and inst[row, col] != inst[row, col + 1]
                down = row + 1 < h and inst[row, col] != inst[row + 1, col]
                assert edge[row, col] == (right or down), (row, col)


def test_edges_coincide_with_label_or_geometry_discontinuities(renders):
    for r in renders:
        edge, sem, depth, normals = r.edge[0] > 0, r.semseg, r.depth[0], r.normals
        # every class change between neighbours has an edge on one side
        horiz = sem[:, :-1] != sem[:, 1:]
        vert = sem[:-1, :] != sem[1:, :]
        assert np.all(edge[:, :-1][horiz] | edge[:, 1:][horiz])
        assert np.all(edge[:-1, :][vert] | edge[1:, :][vert])
        # every edge pixel differs from its right or lower neighbour in class, normal or depth
        jump = np.zeros_like(edge)
        for a, b, out in ((np.s_[:, :-1], np.s_[:, 1:], np.s_[:, :-1]), (np.s_[:-1, :], np.s_[1:, :], np.s_[:-1, :])):
            class_change = sem[a] != sem[b]
            cos = (normals[(slice(None),) + a] * normals[(slice(None),) + b]).sum(0)
            normal_change = cos < math.cos(math.radians(1))
            depth_change = np.abs(depth[a] - depth[b]) > 0.01 * np.minimum(depth[a], depth[b])
            jump[out] |= class_change | normal_change | depth_change
        assert np.all(jump[edge])
        assert edge.mean() < 0.25


def test_parts_only_on_people(renders):
    for r in renders:
        person = r.semseg == PERSON
        assert np.all(r.human_parts[~person] == 0)
        assert np.all((r.human_parts[person] >= 1) & (r.human_parts[person] <= 6))


def test_people_appear_with_all_parts(dataset, renders):
    with_people = [i for i in range(5) if dataset.scene(i).num_people > 0]
    assert with_people, "a scene with people among the first five"
    visible = set()
    for r in renders:
        visible |= set(np.unique(r.human_parts).tolist())
    assert visible == {0, 1, 2, 3, 4, 5, 6}
    share = np.mean([dataset.scene(i).num_people > 0 for i in range(40)])
    assert 0.5 < share < 0.95


def test_saliency_rule(dataset, renders):
    """Re-derive the documented rule from the instance map with plain loops."""
    non_empty = 0
    for index, r in enumerate(renders):
        classes = dataset.scene(index).instance_class
        sal = r.sal[0] > 0
        assert not np.any(sal & np.isin(r.semseg, list(ROOM_CLASSES)))
        area = {}
        for value in r.instance.ravel().tolist():
            area[value] = area.get(value, 0) + 1
        min_area = math.ceil(0.002 * r.instance.size)
        counted = [i for i in range(6, len(classes)) if area.get(i, 0) >= min_area]
        people = [i for i in counted if classes[i] == "person"]
        objects = [i for i in counted if classes[i] != "person"]
        if people:
            expected = set(people)
        elif objects:
            expected = {sorted(objects, key=lambda i: (-area[i], i))[0]}
        else:
            expected = set()
        if expected:
            largest = max(area[i] for i in expected)
            expected |= {i for i in objects if area[i] >= largest}
        assert set(np.unique(r.instance[sal]).tolist()) == expected
        assert np.array_equal(sal, np.isin(r.instance, list(expected)))
        non_empty += bool(expected)
    assert non_empty >= 0.8 * len(renders)


def test_classes_and_channels(dataset):
    assert {"floor", "wall", "person"} <= set(dataset.classes)
    assert dataset.task_channels == {"semseg": len(dataset.classes), "human_parts": 7, "sal": 1, "normals": 3,
                                     "edge": 1, "depth": 1}
    assert dataset.tasks == TASKS
    assert len(dataset) == 50


# ---------------------------------------------------------------------------------------------
# Determinism, splits, API
# ---------------------------------------------------------------------------------------------
def _equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in TASKS + ("image",)) and a["meta"] == b["meta"]


def test_deterministic_in_split_index_seed(samples):
    again = SyntheticScenes("train", size=SIZE, length=50, seed=0)
    assert _equal(again[3], samples[3])
    assert _equal(again[3], again[3])
    assert not torch.equal(samples[3]["image"], samples[4]["image"])
    other_seed = SyntheticScenes("train", size=SIZE, length=50, seed=1)
    assert not torch.equal(other_seed[3]["image"], samples[3]["image"])
    assert samples[3]["meta"] == {"dataset": "synthetic", "split": "train", "index": 3, "id": "train-0-000003"}
    assert _equal(again[-47], samples[3])


def test_splits_are_disjoint():
    digests = {}
    for split in ("train", "val", "test"):
        ds = SyntheticScenes(split, size=(16, 16), length=12, seed=0, tasks=["depth"])
        for i in range(12):
            digest = hashlib.sha1(ds[i]["image"].numpy().tobytes()).hexdigest()
            assert digest not in digests, (split, i, digests.get(digest))
            digests[digest] = (split, i)


def test_task_subset():
    ds = SyntheticScenes("val", size=(16, 20), length=3, tasks=["depth", "semseg"])
    assert ds.tasks == ("semseg", "depth")
    assert set(ds[0]) == {"image", "semseg", "depth", "meta"}
    assert ds.task_channels == {"semseg": len(CLASSES), "depth": 1}
    full = SyntheticScenes("val", size=(16, 20), length=3)
    assert torch.equal(ds[1]["depth"], full[1]["depth"])


def test_transform_receives_reproducible_epoch_rng():
    draws = []

    def transform(sample, rng):
        value = float(rng.uniform())
        draws.append(value)
        sample["image"] = sample["image"] * 0 + value
        return sample

    ds = SyntheticScenes("train", size=(16, 16), length=4, transform=transform)
    first = ds[2]
    assert torch.all(first["image"] == draws[-1])
    assert ds[2]["image"][0, 0, 0] == first["image"][0, 0, 0]
    assert draws[0] == draws[1]
    ds.set_epoch(1)
    assert ds.epoch == 1
    ds[2]
    assert draws[2] != draws[0]
    ds[3]
    assert draws[3] != draws[2]
    ds.set_epoch(0)
    ds[2]
    assert draws[4] == draws[0]
    with pytest.raises(ValueError, match="epoch"):
        ds.set_epoch(-1)


def test_default_collate_batches_samples():
    ds = SyntheticScenes("train", size=(16, 16), length=4)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 3, 16, 16)
    assert batch["semseg"].shape == (2, 16, 16)
    assert batch["meta"]["id"] == ["train-0-000000", "train-0-000001"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "training"}, "train.*val.*test"),
        ({"size": (8, 64)}, "size"),
        ({"size": 64}, "size"),
        ({"size": (32, 32, 3)}, "size"),
        ({"size": (32.0, 32)}, "size"),
        ({"length": 0}, "length"),
        ({"seed": -1}, "seed"),
        ({"tasks": ["semseg", "keypoints"]}, "keypoints"),
        ({"transform": 3}, "transform"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticScenes(**kwargs)


def test_index_out_of_range():
    ds = SyntheticScenes(size=(16, 16), length=3)
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(IndexError):
        ds[-4]
    with pytest.raises(TypeError):
        ds[1.5]


def test_screen_space_culling_loses_no_hit(dataset, monkeypatch):
    """The per-primitive pixel rectangles must contain every pixel the primitive covers."""
    culled = [dataset.render(i) for i in range(6)]

    def full_frame(self, centers, radii, owner, fov):
        n = int(owner.max()) + 1
        zeros = np.zeros(n, np.intp)
        return zeros, np.full(n, self.height, np.intp), zeros, np.full(n, self.width, np.intp)

    monkeypatch.setattr(RayCaster, "pixel_boxes", full_frame)
    for i, r in enumerate(culled):
        brute = dataset.render(i)
        assert np.array_equal(brute.primitive, r.primitive)
        assert np.array_equal(brute.depth, r.depth)
        assert np.array_equal(brute.normals, r.normals)


def test_saliency_rule_on_handmade_maps():
    from m3vit.data.synthetic import salient_instances

    classes = ("wall",) * 6 + ("person", "box", "sphere", "person", "cone")
    inst = np.full((40, 50), 2)  # floor everywhere (2000 px; 0.2 % = 4 px)
    inst[0:10, 0:10] = 6  # person, 100 px
    inst[10:13, 0:1] = 9  # person, 3 px: below the minimum area, ignored
    inst[20:30, 0:12] = 7  # box, 120 px >= the person: salient too
    inst[30:39, 20:30] = 8  # sphere, 90 px: smaller than the person
    assert salient_instances(inst, classes) == (6, 7)
    inst[inst == 6] = 2
    assert salient_instances(inst, classes) == (7,)  # no person: the largest object only
    inst[30:40, 20:32] = 8  # sphere now 120 px too: tie -> both as large as the largest
    assert salient_instances(inst, classes) == (7, 8)
    assert salient_instances(np.full((10, 10), 2), classes) == ()


def _lowest_y(prim) -> float:
    if isinstance(prim, Sphere):
        return float(prim.center[1] - prim.radius)
    if isinstance(prim, (Capsule, Cylinder)):
        low = min(float(prim.a[1]), float(prim.b[1]))
        return low - float(prim.radius) if isinstance(prim, Capsule) else low
    if isinstance(prim, Ellipsoid):
        # support function of the ellipsoid in direction -y
        return float(prim.center[1]) - float(np.linalg.norm(np.asarray(prim.axes)[1] * np.asarray(prim.radii)))
    if isinstance(prim, Box):
        return float(prim.center[1]) - float(np.abs(np.asarray(prim.axes)[1] * np.asarray(prim.half_size)).sum())
    if isinstance(prim, Cone):
        return float(prim.base[1])
    raise TypeError(type(prim))


def _inside(prim, points: np.ndarray) -> np.ndarray:
    if isinstance(prim, Sphere):
        return np.linalg.norm(points - prim.center, axis=1) <= prim.radius + 1e-9
    if isinstance(prim, Capsule):
        ba = prim.b - prim.a
        s = np.clip((points - prim.a) @ ba / (ba @ ba), 0, 1)
        return np.linalg.norm(points - prim.a - s[:, None] * ba, axis=1) <= prim.radius + 1e-9
    local = (points - prim.center) @ np.asarray(prim.axes) / np.asarray(prim.radii)
    return np.linalg.norm(local, axis=1) <= 1 + 1e-9


def _samples_inside(prim, rng, n=400) -> np.ndarray:
    ball = rng.normal(size=(n, 3))
    ball *= (rng.uniform(size=(n, 1)) ** (1 / 3)) / np.linalg.norm(ball, axis=1, keepdims=True)
    if isinstance(prim, Sphere):
        return prim.center + prim.radius * ball
    if isinstance(prim, Capsule):
        return prim.a + rng.uniform(size=(n, 1)) * (prim.b - prim.a) + prim.radius * ball
    return prim.center + (ball * np.asarray(prim.radii)) @ np.asarray(prim.axes).T


def test_things_rest_on_the_floor_and_people_are_in_one_piece(dataset):
    rng = np.random.default_rng(0)
    for index in range(15):
        scene = dataset.scene(index)
        by_instance = {}
        for prim, inst in zip(scene.primitives, scene.primitive_instance):
            by_instance.setdefault(inst, []).append(prim)
        for inst, prims in by_instance.items():
            assert min(_lowest_y(p) for p in prims) == pytest.approx(0.0, abs=1e-9), (index, inst)
            if scene.instance_class[inst] != "person":
                assert len(prims) == 1
                continue
            points = np.concatenate([_samples_inside(p, rng) for p in prims])
            assert np.all(points >= scene.room_low - 1e-9) and np.all(points <= scene.room_high)
            tops = [float(p.center[1] + p.radius) for p in prims if isinstance(p, Sphere)]
            assert 0.9 < max(tops) < 2.05  # a child or an adult, standing
            # connected: two parts touch when a point sampled inside one lies inside the other
            points = [_samples_inside(p, rng) for p in prims]
            linked = {0}
            frontier = [0]
            while frontier:
                i = frontier.pop()
                for j, p in enumerate(prims):
                    if j not in linked and (_inside(p, points[i]).any() or _inside(prims[i], points[j]).any()):
                        linked.add(j)
                        frontier.append(j)
            assert linked == set(range(len(prims))), (index, inst)


def test_people_are_placed_in_view(dataset):
    seen = total = 0
    for index in range(30):
        scene = dataset.scene(index)
        people = [i for i, c in enumerate(scene.instance_class) if c == "person"]
        if not people:
            continue
        instance = dataset.render(index).instance
        total += len(people)
        seen += sum(int((instance == i).sum()) >= 10 for i in people)
    assert total > 15 and seen >= 0.85 * total


def test_pixels_without_a_hit_are_ignored(monkeypatch):
    """The closed room never lets a ray escape; fake escaping rays to exercise the 255 path."""
    cast = RayCaster.cast

    def leaky_cast(self, *args, **kwargs):
        hits = cast(self, *args, **kwargs)
        hits.primitive[:3] = -1
        hits.depth[:3] = np.inf
        hits.normals[:, :3] = 0.0
        return hits

    monkeypatch.setattr(RayCaster, "cast", leaky_cast)
    s = SyntheticScenes("train", size=(16, 20), length=2)[1]
    for task in ("semseg", "human_parts", "normals", "depth"):
        assert bool((s[task][..., :3, :] == 255).all()), task
        assert bool((s[task][..., 3:, :] != 255).all()), task
    assert float(s["sal"][:, :3].max()) == 0.0
    assert bool((s["edge"][0, 2] == 1).all())  # the last row without a hit borders the first hit row
    assert bool(((s["image"] >= 0) & (s["image"] <= 1)).all())


def test_sensor_noise_is_a_reproducible_gaussian_window():
    from m3vit.data.synthetic import gaussian_field, sensor_noise

    field = gaussian_field(16, 20)
    assert field.shape == (3, 32, 40) and field.dtype == np.float32
    assert abs(float(field.mean())) < 0.05 and abs(float(field.std()) - 1) < 0.05
    a, b, c = (sensor_noise(seed, 16, 20, field) for seed in (1, 1, 2))
    assert a.shape == (3, 16, 20) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert any(np.array_equal(a, field[:, i:i + 16, j:j + 20]) for i in range(17) for j in range(21))
    assert sensor_noise(1, 16, 20).shape == (3, 16, 20)
    with pytest.raises(ValueError, match="too small"):
        sensor_noise(1, 40, 20, field)


def test_body_parts_follow_the_kinematic_chain(dataset):
    """Part labels agree with the anatomy: head on top, hands on forearms, feet on shins, limbs joined."""
    rng = np.random.default_rng(0)

    def touch(p, q):
        return _inside(q, _samples_inside(p, rng)).any() or _inside(p, _samples_inside(q, rng)).any()

    checked = 0
    for index in range(10):
        scene = dataset.scene(index)
        for inst, cls in enumerate(scene.instance_class):
            if cls != "person":
                continue
            body = [(part, p) for part, p, i in zip(scene.primitive_part, scene.primitives, scene.primitive_instance)
                    if i == inst]
            by_part = {k: [p for part, p in body if part == k] for k in range(1, 7)}
            assert [len(by_part[k]) for k in range(1, 7)] == [1, 4, 2, 4, 2, 4]  # shins + feet; forearms + hands
            head = by_part[1][0]
            spheres = [p for _, p in body if isinstance(p, Sphere)]
            assert isinstance(head, Sphere) and head.center[1] == max(s.center[1] for s in spheres)
            assert all(isinstance(p, Sphere) for p in spheres if p is not head)
            assert all(any(p is s for s in by_part[4]) for p in spheres if p is not head)  # hands: lower arm
            for child, parents in ((1, (2,)), (3, (2,)), (5, (2,)), (4, (3, 4)), (6, (5, 6))):
                for p in by_part[child]:
                    others = [q for k in parents for q in by_part[k] if q is not p]
                    assert any(touch(p, q) for q in others), (index, inst, child)
            checked += 1
    assert checked >= 5


def test_size_is_bounded_and_errors_are_config_errors():
    from m3vit.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="each side must be <= 4096"):
        SyntheticScenes("train", size=(16000, 16000))
    for kwargs in (dict(split="holdout"), dict(size=(8, 8)), dict(tasks=["bogus"]), dict(length=0)):
        with pytest.raises(ConfigError):
            SyntheticScenes(**{"split": "train", **kwargs})


def test_people_modes_change_how_many_people_and_how_near():
    """``close``: one or two people in every scene, nearer the camera, covering several times the pixels;
    ``sparse`` stays the default (people in about three scenes out of four)."""
    from m3vit.data.synthetic import PEOPLE_MODES

    assert SyntheticScenes("val", size=(16, 16), length=1).people == "sparse"
    n = 24
    sparse = SyntheticScenes("val", size=(32, 32), length=n, seed=0, tasks=["human_parts"])
    close = SyntheticScenes("val", size=(32, 32), length=n, seed=0, tasks=["human_parts"], people="close")
    counts = [close.scene(i).num_people for i in range(n)]
    assert set(counts) <= {1, 2} and set(counts) == {1, 2}
    for mode, data in (("sparse", sparse), ("close", close)):
        near, far = PEOPLE_MODES[mode].distance
        for i in range(8):
            scene = data.scene(i)
            camera = scene.camera.position[[0, 2]]
            for inst in (k for k, c in enumerate(scene.instance_class) if c == "person"):
                prims = [p for p, owner in zip(scene.primitives, scene.primitive_instance) if owner == inst]
                feet = np.mean([np.asarray(getattr(p, "center", getattr(p, "a", None)))[[0, 2]] for p in prims], axis=0)
                # the body's mean position stays within a body's reach of its spot on the floor
                assert near - 0.6 < float(np.hypot(*(feet - camera))) < far + 0.6, (mode, i)
    share = {name: np.mean([((d[i]["human_parts"] > 0) & (d[i]["human_parts"] < 7)).float().mean().item()
                            for i in range(n)]) for name, d in (("sparse", sparse), ("close", close))}
    assert share["close"] > 2 * share["sparse"] > 0
    # room size and camera come before the people in the draw, so they agree between the modes
    assert np.array_equal(sparse.scene(5).room_high, close.scene(5).room_high)
    assert np.array_equal(sparse.scene(5).camera.position, close.scene(5).camera.position)
    assert close[0]["meta"]["id"] == "val-0-close-000000" and sparse[0]["meta"]["id"] == "val-0-000000"
    assert "people='close'" in repr(close) and "people" not in repr(sparse)
    with pytest.raises(ValueError, match="unknown people mode"):
        SyntheticScenes("val", size=(16, 16), length=1, people="crowd")
