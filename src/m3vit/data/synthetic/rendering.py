"""Rendering and labels: ``render_scene`` ray-casts a scene and derives the image (textures, Lambert shading,
colour jitter, sensor noise) and every dense label (classes, human parts, saliency, normals, depth, edges)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...tasks.base import IGNORE
from .._geometry import ROOM_SURFACES, RayCaster
from .scenes import CLASSES, Scene
from .textures import _room_albedo

__all__ = ["RenderedScene", "render_scene", "salient_instances", "instance_edges", "gaussian_field", "sensor_noise",
           "MIN_SALIENT_FRACTION", "SALIENT_AREA_RATIO"]

_CLASS_ID = {name: i for i, name in enumerate(CLASSES)}

#: A visible instance needs at least this share of the image to count for saliency.
MIN_SALIENT_FRACTION = 0.002
#: An object is salient too when it covers at least this multiple of the largest salient area.
SALIENT_AREA_RATIO = 1.0


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
