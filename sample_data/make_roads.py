"""Procedurally draw the small road-surface demo image set used in tlearn's README.

Every picture is a synthetic dash-cam view: a sky with perspective clouds, a distant tree line or
hills at a horizon of varying height, and a road running away from the camera towards a vanishing
point, with a roadside verge on both sides. Each of the four classes has its own road surface:

* ``asphalt`` - dark grey fine-grained tarmac with a dashed or solid centre line, white edge
  lines, repair patches and cracks; grassy verges with a gravel shoulder.
* ``gravel`` - light grey or beige coarse speckle made of many small shaded pebbles.
* ``dirt`` - brown or ochre mottled earth with two darker tyre ruts and sometimes puddles that
  mirror the sky, or a grass strip along the middle.
* ``snow`` - white or bluish-white packed snow with grey or slushy tyre tracks, snowbanks at the
  sides, a pale overcast sky and sometimes falling snow.

The ground is rendered with a pinhole camera: each pixel below the horizon is cast onto the ground
plane and the surface is evaluated there, so texture gets finer towards the horizon, markings and
ruts follow the (slightly curved) road, and detail fades out where a pixel covers more ground than
it can show. Lighting, hue, horizon height, camera roll, lateral position, field of view, road
width and texture scale all vary from picture to picture, so no class is a single flat colour.

Everything is pure numpy + Pillow and deterministic: each image's random generator is seeded from
its split, class and index, so rerunning the script redraws the same pictures. The set exists so
that the README's example command has something to train on in seconds; it is far too small and
too synthetic to say anything about a model's real accuracy.

Usage::

    python sample_data/make_roads.py [--out sample_data/roads]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("asphalt", "gravel", "dirt", "snow")
SPLITS = {"train": 12, "val": 8}
WIDTH, HEIGHT = 256, 192
SUPERSAMPLE = 2  # render at 2x and downscale, for anti-aliasing
MARGIN = 1.1  # extra canvas so that the camera roll leaves no empty corners
JPEG_QUALITY = 85
GROUND_STRIP = 48  # canvas rows of ground rendered per batch
DEFAULT_OUT = Path(__file__).resolve().parent / "roads"

Array = np.ndarray


# ---------------------------------------------------------------------------------------------
# Noise primitives (all evaluated at arbitrary float coordinates, so they work in world space)
# ---------------------------------------------------------------------------------------------


_KX, _KY = np.uint32(0x9E3779B1), np.uint32(0x85EBCA77)


def _scramble(h: Array) -> Array:
    """Avalanche a uint32 array in place and map it to floats in [0, 1)."""
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x2C1B3C6D)
    h ^= h >> np.uint32(12)
    h *= np.uint32(0x297A2D39)
    h ^= h >> np.uint32(15)
    return h.astype(np.float32) * np.float32(1.0 / 2**32)


def _hash(ix: Array, iy: Array, salt: int) -> Array:
    """Hash integer lattice coordinates (uint32 arrays) to floats in [0, 1)."""
    return _scramble((ix * _KX) ^ (iy * _KY) ^ np.uint32(salt & 0xFFFFFFFF))


def _lattice(v: Array) -> Array:
    """Integer cell index of a float coordinate, as wrapping uint32 for hashing."""
    return v.astype(np.int64).astype(np.uint32)


def value_noise(x: Array, y: Array, salt: int) -> Array:
    """Smooth value noise in [0, 1] with a lattice spacing of one unit."""
    xf, yf = np.floor(x), np.floor(y)
    tx, ty = x - xf, y - yf
    tx *= tx * (3 - 2 * tx)
    ty *= ty * (3 - 2 * ty)
    salt32 = np.uint32(salt & 0xFFFFFFFF)
    hx, hy = _lattice(xf) * _KX, _lattice(yf) * _KY  # as in _hash, shared by the four corners
    hx1, hy1 = hx + _KX, (hy + _KY) ^ salt32
    hy ^= salt32
    a, b = _scramble(hx ^ hy), _scramble(hx1 ^ hy)
    c, d = _scramble(hx ^ hy1), _scramble(hx1 ^ hy1)
    a += (b - a) * tx
    c += (d - c) * tx
    a += (c - a) * ty
    return a


def fbm(
    x: Array,
    y: Array,
    foot: Array | float,
    freq: float,
    octaves: int,
    salt: int,
    gain: float = 0.5,
) -> Array:
    """Fractal noise, roughly in [-0.5, 0.5]; octaves finer than the pixel footprint fade out.

    Only the rows where an octave is still visible are evaluated, which keeps the fine octaves
    (visible just in the foreground) cheap.
    """
    x, y = np.broadcast_arrays(x, y)  # at least one of them is an array
    foot = np.asarray(foot, np.float32)
    if foot.ndim == 0:
        foot = np.full((len(x),) + (1,) * (x.ndim - 1), foot)
    total = np.zeros(x.shape, np.float32)
    amp, norm = 1.0, 0.0
    for octave in range(octaves):
        f = freq * 2.0**octave
        weight = np.clip(2.0 - 4.0 * f * foot, 0.0, 1.0)  # same rows as x, maybe fewer columns
        rows = np.flatnonzero(weight.reshape(len(weight), -1).any(axis=1))
        if len(rows):
            r = slice(rows[0], rows[-1] + 1)
            noise = value_noise(x[r] * f, y[r] * f, salt + 7919 * octave) - 0.5
            total[r] += amp * weight[r] * noise
        norm += amp
        amp *= gain
    return total / norm


def smoothstep(edge0: float | Array, edge1: float | Array, x: Array) -> Array:
    """Hermite step from 0 at edge0 to 1 at edge1."""
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def band(dist: Array, half_width: float | Array, foot: Array) -> Array:
    """Anti-aliased coverage of a stripe |dist| < half_width for a pixel of size foot."""
    return np.clip((half_width - np.abs(dist)) / np.maximum(foot, 1e-4) + 0.5, 0.0, 1.0)


def mix(a: Array, b: Array, t: Array | float) -> Array:
    """Blend colours a -> b by a scalar or per-pixel weight t (no channel axis)."""
    t = np.asarray(t, np.float32)
    if t.ndim:
        t = t[..., None]
    return a + (b - a) * t


def shade(base: Array, tone: Array) -> Array:
    """Multiply an RGB colour (3,) by a per-pixel brightness map -> (..., 3)."""
    return np.asarray(base, np.float32) * tone[..., None]


def pebbles(
    x: Array,
    y: Array,
    foot: Array,
    size: float,
    salt: int,
    angle: float = 0.0,
) -> tuple[Array, Array, Array]:
    """Scattered stones, at most one per jittered (rotated) grid cell.

    Returns per-pixel (coverage, brightness, hue pick). Coverage is anti-aliased and fades out
    once a cell is only a pixel or two wide, so distant gravel turns into an even tone; only the
    rows where stones are still visible are evaluated.
    """
    cover = np.zeros(x.shape, np.float32)
    bright = np.ones(x.shape, np.float32)
    pick = np.zeros(x.shape, np.float32)
    visible = np.clip((0.7 - foot / size) / 0.35, 0.0, 1.0)
    rows = np.flatnonzero(visible.any(axis=1))
    if not len(rows):
        return cover, bright, pick
    r = slice(rows[0], None)  # pixels get smaller downwards, so visible rows reach the bottom
    cos, sin = np.cos(angle), np.sin(angle)
    gx, gy = (x[r] * cos - y[r] * sin) / size, (x[r] * sin + y[r] * cos) / size
    ix, iy = np.floor(gx), np.floor(gy)
    fx, fy = gx - ix - 0.5, gy - iy - 0.5
    ix, iy = _lattice(ix), _lattice(iy)
    dx = fx - (_hash(ix, iy, salt) - 0.5) * 0.5
    dy = fy - (_hash(ix, iy, salt + 1) - 0.5) * 0.5
    rx = 0.18 + 0.3 * _hash(ix, iy, salt + 2)
    ry = 0.18 + 0.3 * _hash(ix, iy, salt + 3)
    dist = np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2)
    soft = np.clip(foot[r] / (0.4 * size), 0.1, 1.0)
    present = _hash(ix, iy, salt + 4) < 0.75
    cover[r] = smoothstep(1 + soft, 1 - soft, dist) * visible[r] * present
    light = np.clip(1 - dist, 0, 1) * 0.2 + (dy / ry - dx / rx) * 0.1
    bright[r] = 0.55 + 0.8 * _hash(ix, iy, salt + 5) + light
    pick[r] = _hash(ix, iy, salt + 6)
    return cover, bright, pick


# ---------------------------------------------------------------------------------------------
# Camera and ground plane
# ---------------------------------------------------------------------------------------------


@dataclass
class Camera:
    """Pinhole camera looking along the road; all lengths in canvas pixels or metres."""

    width: int
    height: int
    horizon: float  # canvas row of the horizon
    cx: float  # canvas column of the vanishing point (small yaw)
    focal: float  # focal length in pixels
    elevation: float  # camera height above the ground, metres


@dataclass
class Ground:
    """World coordinates of a strip of canvas pixels below the horizon."""

    x: Array  # lateral position relative to the road centre line, metres (rows, cols)
    z: Array  # distance ahead, metres; like the footprints it depends on the row only (rows, 1)
    foot: Array  # ground size of one pixel (geometric mean of both directions), metres
    foot_x: Array  # lateral ground size of one pixel
    foot_z: Array  # longitudinal ground size of one pixel


@dataclass
class Road:
    """Road geometry (metres) and the random stream its textures draw their parameters from.

    The ground is drawn in strips of rows; each strip gets a fresh ``rng`` seeded with ``salt``,
    so every strip draws the same texture parameters and the strips join seamlessly.
    """

    half_width: float
    offset: float  # lateral position of the centre line at the camera, relative to the camera
    curve: float  # the centre line bends by curve * z**2 at distance z
    salt: int
    rng: np.random.Generator | None = None


def make_camera(rng: np.random.Generator) -> Camera:
    """Random camera: field of view, pitch (horizon row), yaw (vanishing column) and height."""
    width = round(WIDTH * SUPERSAMPLE * MARGIN)
    height = round(HEIGHT * SUPERSAMPLE * MARGIN)
    fov = np.radians(rng.uniform(58, 76))
    focal = WIDTH * SUPERSAMPLE / 2 / np.tan(fov / 2)
    horizon = height * rng.uniform(0.36, 0.5)
    cx = width * (0.5 + rng.uniform(-0.07, 0.07))
    return Camera(width, height, horizon, cx, focal, rng.uniform(1.25, 1.7))


def project_ground(cam: Camera, road: Road, top: int, bottom: int) -> Ground:
    """Cast canvas rows top..bottom (below the horizon) onto the ground, relative to the road."""
    rows = np.arange(top, bottom, dtype=np.float32)[:, None] + 0.5
    cols = np.arange(cam.width, dtype=np.float32)[None, :] + 0.5
    drop = np.maximum(rows - cam.horizon, 1e-3)
    z = np.minimum(cam.elevation * cam.focal / drop, 3000.0)
    x_cam = (cols - cam.cx) * z / cam.focal
    x = x_cam - (road.offset + road.curve * z * z)
    foot_x, foot_z = z / cam.focal, z / drop
    foot = np.sqrt(foot_x * foot_z)
    return Ground(x, z, foot, foot_x, foot_z)


# ---------------------------------------------------------------------------------------------
# Sky and horizon
# ---------------------------------------------------------------------------------------------


@dataclass
class Weather:
    """Colours shared by the sky, the fog and reflections."""

    zenith: Array
    haze: Array
    cloud: Array
    cover: float  # fraction of the sky under cloud
    fog_distance: float  # metres


SKIES = {  # zenith, horizon haze, cloud colour, cloud cover range, fog distance range (m)
    "clear": ((0.18, 0.38, 0.78), (0.72, 0.82, 0.93), (0.97, 0.97, 0.98), (0.0, 0.45), (150, 400)),
    "hazy": ((0.45, 0.58, 0.78), (0.84, 0.86, 0.88), (0.93, 0.93, 0.94), (0.1, 0.5), (70, 150)),
    "golden": ((0.30, 0.42, 0.70), (0.98, 0.80, 0.58), (1.0, 0.88, 0.75), (0.1, 0.6), (100, 250)),
    "grey": ((0.64, 0.65, 0.69), (0.77, 0.78, 0.80), (0.75, 0.76, 0.78), (0.5, 1.0), (70, 180)),
    "snowy": ((0.68, 0.70, 0.74), (0.82, 0.83, 0.86), (0.80, 0.81, 0.83), (0.5, 1.0), (35, 110)),
}


def make_weather(cls: str, rng: np.random.Generator) -> Weather:
    """Pick clear, hazy, golden-hour or grey weather (snow pictures are always overcast)."""
    kind = "snowy" if cls == "snow" else rng.choice(["clear", "clear", "hazy", "golden", "grey"])
    zenith, haze, cloud, cover, fog = SKIES[kind]
    light, tint = (
        rng.uniform(0.85, 1.1),
        rng.uniform(-0.03, 0.03, 3),
    )  # shared, so skies stay coherent

    def vary(colour: tuple[float, ...]) -> Array:
        return np.clip((np.asarray(colour) + tint) * light, 0, 1).astype(np.float32)

    return Weather(vary(zenith), vary(haze), vary(cloud), rng.uniform(*cover), rng.uniform(*fog))


def draw_sky(cam: Camera, weather: Weather, salt: int) -> Array:
    """Vertical gradient plus clouds drawn on a plane overhead, so they flatten near the horizon."""
    rows = np.arange(cam.height, dtype=np.float32)[:, None] + 0.5
    rise = np.maximum(cam.horizon - rows, 1.0)
    t = np.clip(rise / cam.horizon, 0, 1) ** 0.6
    sky = mix(weather.haze, weather.zenith, np.broadcast_to(t, (cam.height, cam.width)))
    if weather.cover <= 0.02:
        return sky
    top = int(np.ceil(cam.horizon))
    cols = np.arange(cam.width, dtype=np.float32)[None, :] + 0.5
    rise = rise[:top]
    depth = cam.focal / rise  # distance across the cloud plane, in "cloud heights"
    dens = fbm((cols - cam.cx) / rise * 0.6, depth * 1.2, depth / rise, 0.35, 5, salt) + 0.5
    thresh = 1.0 - weather.cover
    alpha = smoothstep(thresh - 0.08, thresh + 0.15, dens) * (1 - smoothstep(12, 40, depth))
    body = np.clip(0.8 + 1.2 * (dens - thresh), 0.72, 1.05)
    sky[:top] = mix(sky[:top], shade(weather.cloud, body), alpha * 0.95)
    return sky


def skyline_profile(
    cam: Camera, cls: str, rng: np.random.Generator, salt: int
) -> tuple[Array, Array, float, float]:
    """Height per column (pixels), colour, haze fraction and texture strength of the skyline."""
    cols = np.arange(cam.width, dtype=np.float32) / cam.width
    scale = cam.height / 100.0
    if rng.random() < 0.6:  # forest: jagged crowns
        height = (4 + 5 * rng.random()) * scale
        profile = height * (1 + 1.6 * fbm(cols * 3, 1.5, 0.0, 4, 6, salt, gain=0.7))
        base = [0.16, 0.20, 0.18] if cls == "snow" else [0.12, 0.22, 0.12]
        return profile, base + rng.uniform(-0.04, 0.04, 3), rng.uniform(0.25, 0.6), 0.35
    height = (6 + 10 * rng.random()) * scale  # hills: smooth and hazy
    profile = height * (1 + 1.5 * fbm(cols * 2, 0.5, 0.0, 1.5, 3, salt))
    base = [0.80, 0.83, 0.88] if cls == "snow" else [0.30, 0.38, 0.36]
    return profile, base + rng.uniform(-0.03, 0.03, 3), rng.uniform(0.45, 0.75), 0.12


def draw_skyline(
    img: Array, cam: Camera, weather: Weather, cls: str, rng: np.random.Generator, salt: int
) -> None:
    """Paint a distant tree line or range of hills that sits on the horizon."""
    profile, base, haze, grain = skyline_profile(cam, cls, rng, salt)
    r0 = max(int(cam.horizon - profile.max()) - 2, 0)
    r1 = int(np.ceil(cam.horizon)) + 1
    rows = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5
    cols = np.arange(cam.width, dtype=np.float32)[None, :] + 0.5
    above = cam.horizon - rows
    cover = np.clip(profile[None, :] - above + 0.5, 0, 1) * (above > -1)
    texture = 1 + grain * fbm(cols / 6.0, rows / 6.0, 0.0, 1, 3, salt + 11)
    colour = mix(shade(base.astype(np.float32), texture), weather.haze, haze)
    img[r0:r1] = mix(img[r0:r1], colour, cover)


# ---------------------------------------------------------------------------------------------
# Road surfaces (one function per class) and verges
# ---------------------------------------------------------------------------------------------


def surface_asphalt(g: Ground, road: Road, weather: Weather) -> Array:
    """Dark fine-grained tarmac with wheel-path wear, patches, cracks and painted markings."""
    rng, s = road.rng, road.salt
    grey = rng.uniform(0.16, 0.32)
    base = np.array([grey, grey, grey * rng.uniform(0.98, 1.08)], np.float32)
    grain = fbm(g.x, g.z, g.foot, rng.uniform(15, 30), 4, s)
    blotch = fbm(g.x, g.z, g.foot, 0.25, 3, s + 1)
    from_lane_centre = np.abs(np.abs(g.x) - road.half_width / 2)
    wear = np.exp(-((from_lane_centre - 0.8) ** 2) / 0.05)  # darker wheel paths
    tone = 1 + 0.5 * grain + 0.25 * blotch - 0.08 * wear
    if rng.random() < 0.6:  # repair patches
        patch = smoothstep(0.15, 0.17, fbm(g.x, g.z, g.foot, rng.uniform(0.08, 0.2), 2, s + 2))
        tone *= 1 + rng.choice([-0.25, 0.2]) * patch
    if rng.random() < 0.6:  # thin cracks from ridged noise, in some stretches only
        ridge = np.abs(fbm(g.x, g.z, g.foot, rng.uniform(0.6, 1.2), 4, s + 3))
        where = smoothstep(0.0, 0.1, fbm(g.x, g.z, g.foot, 0.1, 2, s + 5))
        tone *= 1 - 0.3 * band(ridge, 0.003, g.foot * 0.1) * where * (g.foot < 0.03)
    colour = shade(base, tone)
    return paint_markings(colour, g, road)


def paint_markings(colour: Array, g: Ground, road: Road) -> Array:
    """Centre line (dashed white/yellow or double yellow) and solid white edge lines."""
    rng, s = road.rng, road.salt
    white = np.array([0.88, 0.88, 0.86], np.float32)
    yellow = np.array([0.92, 0.74, 0.20], np.float32)
    fresh = rng.uniform(0.55, 1.0)
    worn = np.clip(fresh + 0.8 * fbm(g.x, g.z, g.foot, 6, 3, s + 4), 0, 1)
    style = rng.choice(["dashed_white", "dashed_yellow", "double_yellow"])
    if style == "double_yellow":
        centre = np.maximum(band(g.x - 0.12, 0.06, g.foot_x), band(g.x + 0.12, 0.06, g.foot_x))
        centre_colour = yellow
    else:
        period, dash = rng.uniform(8, 12), rng.uniform(2.5, 4.0)
        phase = np.mod(g.z + rng.uniform(0, period), period)
        along = band(phase - dash / 2, dash / 2, g.foot_z)
        centre = band(g.x, 0.07, g.foot_x) * along
        centre_colour = white if style == "dashed_white" else yellow
    edge_pos = road.half_width - rng.uniform(0.2, 0.4)
    edges = band(np.abs(g.x) - edge_pos, 0.075, g.foot_x) * (rng.random() < 0.85)
    colour = mix(colour, centre_colour, centre * worn)
    return mix(colour, white, edges * worn)


def surface_gravel(g: Ground, road: Road, weather: Weather) -> Array:
    """Light grey/beige coarse speckle: layers of shaded pebbles of many tones over dark fines."""
    rng, s = road.rng, road.salt
    pale = np.array([0.62, 0.61, 0.58]) * rng.uniform(0.85, 1.15)
    beige = np.array([0.70, 0.62, 0.48]) * rng.uniform(0.85, 1.15)
    base = mix(pale, beige, rng.random()).astype(np.float32)
    rocks = np.array([[0.45, 0.45, 0.47], [0.80, 0.76, 0.68], [0.62, 0.50, 0.38], [0.9, 0.9, 0.88]])
    rocks = mix(base, rocks.astype(np.float32), 0.45)
    tracks = np.exp(-((np.abs(g.x) - rng.uniform(0.7, 0.9)) ** 2) / 0.08)
    fines = 1 + 0.4 * fbm(g.x, g.z, g.foot, 1.2, 4, s) - 0.1 * tracks
    colour = shade(base * 0.7, fines)
    size = rng.uniform(0.025, 0.045)
    for layer, scale in enumerate((2.2, 1.4, 1.0)):
        cover, bright, pick = pebbles(g.x, g.z, g.foot, size * scale, s + 10 * layer, 0.7 * layer)
        stone = rocks[(pick * 3.999).astype(int)] * bright[..., None]
        colour = mix(colour, stone, cover * (1 - 0.4 * tracks))
    far = np.clip(g.foot / (0.7 * size), 0, 1)  # where pebbles vanish, lift to their average tone
    return colour * (1 + 0.12 * far[..., None])


def surface_dirt(g: Ground, road: Road, weather: Weather) -> Array:
    """Brown/ochre earth with tyre ruts, optional grass centre strip and sky-mirroring puddles."""
    rng, s = road.rng, road.salt
    dark = np.array([0.40, 0.29, 0.18])
    ochre = np.array([0.66, 0.50, 0.28])
    base = (mix(dark, ochre, rng.random()) * rng.uniform(0.85, 1.1)).astype(np.float32)
    mottle = fbm(g.x, g.z, g.foot, rng.uniform(0.3, 0.8), 4, s)
    grain = fbm(g.x, g.z, g.foot, rng.uniform(6, 12), 3, s + 1)
    tone = 1 + 0.45 * mottle + 0.18 * grain
    rut_x = rng.uniform(0.7, 0.9)
    wander = 0.1 * fbm(1.0, g.z[:, :1], 0.0, 0.1, 2, s + 2)  # ruts drift a little sideways
    rut_d = np.abs(np.abs(g.x + wander) - rut_x)
    rut_w = rng.uniform(0.14, 0.22)
    rut = smoothstep(rut_w + np.maximum(g.foot_x, 0.08), rut_w * 0.4, rut_d)
    streak = fbm(g.x * 8, g.z * 0.4, g.foot, 1, 3, s + 3)
    tone = tone * (1 - rng.uniform(0.25, 0.4) * rut) + 0.15 * streak * rut
    colour = shade(base, tone)
    if rng.random() < 0.4:  # grass along the middle
        grass = smoothstep(0.45, 0.2, np.abs(g.x) + 0.15 * fbm(g.x, g.z, g.foot, 3, 3, s + 4))
        colour = mix(colour, grass_colour(g, rng, s + 5), grass * 0.85)
    if rng.random() < 0.55:  # puddles, mostly in the ruts
        colour = add_puddles(colour, g, rut, base, weather, road)
    return colour


def add_puddles(
    colour: Array,
    g: Ground,
    rut: Array,
    mud: Array,
    weather: Weather,
    road: Road,
) -> Array:
    """Puddles, mostly in the ruts, mirroring the sky: horizon haze far away, bluer close up."""
    rng, s = road.rng, road.salt + 50
    wet = fbm(g.x, g.z, g.foot, rng.uniform(0.3, 0.5), 4, s) + 0.05 * rut
    level = rng.uniform(0.17, 0.24)
    puddle = smoothstep(level, level + 0.015, wet)
    rim = smoothstep(level - 0.06, level, wet) * (1 - puddle)
    sky = mix(weather.haze, weather.zenith, np.clip(1.5 / g.z, 0, 0.8))
    ripple = 1 + 0.15 * fbm(g.x, g.z * 3, g.foot, 2, 3, s + 1)
    water = mix(shade(mud * 0.5, ripple), sky * 0.8, rng.uniform(0.45, 0.75))
    return mix(colour * (1 - 0.4 * rim[..., None]), water, puddle)


def surface_snow(g: Ground, road: Road, weather: Weather) -> Array:
    """White/bluish packed snow with one or two pairs of grey or slushy tyre tracks."""
    rng, s = road.rng, road.salt
    base = np.array([0.84, 0.87, 0.93], np.float32) * rng.uniform(0.85, 1.05)
    tone = 1 + 0.15 * fbm(g.x, g.z, g.foot, 1.5, 5, s)
    colour = shade(base, tone)
    slush = rng.random() < 0.4
    track = np.array([0.50, 0.46, 0.42]) if slush else np.array([0.68, 0.72, 0.80])
    track = (track * rng.uniform(0.9, 1.1)).astype(np.float32)
    centres = [0.0] if rng.random() < 0.5 else [-road.half_width / 2, road.half_width / 2]
    gauge = rng.uniform(0.75, 0.9)
    ragged = 0.06 * fbm(g.x, g.z, g.foot, 4, 3, s + 1)
    tread = 1 + 0.25 * fbm(g.x * 2, g.z * 12, g.foot, 2, 3, s + 2)
    for c in centres:
        for side in (-1, 1):
            amount = band(g.x - c - side * gauge + ragged, rng.uniform(0.12, 0.2), g.foot_x)
            colour = mix(colour, shade(track, tread), amount * rng.uniform(0.55, 0.9))
    return colour


SURFACES = {
    "asphalt": surface_asphalt,
    "gravel": surface_gravel,
    "dirt": surface_dirt,
    "snow": surface_snow,
}


def grass_colour(g: Ground, rng: np.random.Generator, salt: int) -> Array:
    """Green to straw-coloured grass with clumps and blades that fade with distance."""
    lush = np.array([0.22, 0.38, 0.12])
    dry = np.array([0.58, 0.52, 0.28])
    base = (mix(lush, dry, rng.random() ** 1.5) * rng.uniform(0.8, 1.15)).astype(np.float32)
    clumps = fbm(g.x, g.z, g.foot, 0.5, 4, salt)
    blades = fbm(g.x * 3, g.z * 0.7, g.foot, 10, 3, salt + 1)
    return shade(base, 1 + 0.7 * clumps + 0.5 * blades)


def draw_verge(g: Ground, cls: str, road: Road) -> Array:
    """Roadside: snowbanks shaded towards the road, or grass/soil (behind a shoulder on tarmac)."""
    rng, s = road.rng, road.salt + 100
    side = np.abs(g.x) - road.half_width
    if cls == "snow":
        return snowbank(g, side, rng, s)
    if cls == "dirt" and rng.random() < 0.3:
        soil = np.array([0.42, 0.32, 0.20], np.float32) * rng.uniform(0.85, 1.1)
        verge = shade(soil, 1 + 0.5 * fbm(g.x, g.z, g.foot, 1, 4, s))
    else:
        verge = grass_colour(g, rng, s)
    if cls != "asphalt":
        return verge
    width = rng.uniform(0.3, 1.0)
    shoulder_col = np.array([0.50, 0.47, 0.42], np.float32) * rng.uniform(0.8, 1.1)
    shoulder = shade(shoulder_col, 1 + 0.4 * fbm(g.x, g.z, g.foot, 5, 3, s + 3))
    ragged = 0.15 * fbm(g.x, g.z, g.foot, 1.5, 3, s + 4)
    return mix(shoulder, verge, smoothstep(width - 0.1, width + 0.1, side + ragged))


def snowbank(g: Ground, side: Array, rng: np.random.Generator, salt: int) -> Array:
    """Bright snow rising away from the road, bluish in the shade at its foot, with twigs."""
    snow = np.array([0.95, 0.97, 1.0], np.float32) * rng.uniform(0.92, 1.03)
    bank_w = rng.uniform(0.5, 1.5)
    slope = smoothstep(0.0, bank_w, side + 0.15 * fbm(g.x, g.z, g.foot, 1.5, 3, salt))
    tone = (0.8 + 0.22 * slope) * (1 + 0.08 * fbm(g.x, g.z, g.foot, 0.7, 4, salt + 1))
    colour = shade(snow, tone) * mix(np.float32([0.9, 0.94, 1.0]), np.float32([1, 1, 1]), slope)
    twigs = band(fbm(g.x, g.z * 0.3, g.foot, 6, 2, salt + 2), 0.006, g.foot) * (g.foot < 0.03)
    twigs *= smoothstep(0.1, 0.2, fbm(g.x, g.z, g.foot, 0.3, 2, salt + 3))
    return mix(colour, np.float32([0.25, 0.22, 0.18]), twigs * 0.7)


def draw_ground(img: Array, cam: Camera, cls: str, road: Road, weather: Weather) -> None:
    """Fill everything below the horizon, a strip of rows at a time (small arrays are faster)."""
    for top in range(int(np.ceil(cam.horizon + 0.5)), cam.height, GROUND_STRIP):
        bottom = min(top + GROUND_STRIP, cam.height)
        ground = project_ground(cam, road, top, bottom)
        strip_road = replace(road, rng=np.random.default_rng(road.salt))
        img[top:bottom] = ground_colour(ground, cls, strip_road, weather)


def ground_colour(g: Ground, cls: str, road: Road, weather: Weather) -> Array:
    """Road surface blended into the verge, with soft cloud shadows and distance fog."""
    rng = road.rng
    surface = SURFACES[cls](g, road, weather)
    verge = draw_verge(g, cls, road)
    soft = 0.03 if cls == "asphalt" else 0.25
    rough = 0.0 if cls == "asphalt" else 0.5
    edge = road.half_width + rough * fbm(1.0, g.z[:, :1], g.foot_z[:, :1], 0.3, 3, road.salt + 200)
    on_road = np.clip((edge - np.abs(g.x)) / np.maximum(g.foot_x, soft) + 0.5, 0, 1)
    colour = mix(verge, surface, on_road)
    if weather.cover > 0.3 and rng.random() < 0.5:  # cloud shadows drifting over the landscape
        shadow = smoothstep(0.0, 0.12, fbm(g.x, g.z, 0.0, 0.02, 2, road.salt + 300))
        colour *= (1 - rng.uniform(0.15, 0.35) * shadow)[..., None]
    fog = 1 - np.exp(-g.z / weather.fog_distance)
    return mix(colour, weather.haze, fog)


# ---------------------------------------------------------------------------------------------
# Whole picture
# ---------------------------------------------------------------------------------------------


def image_seed(split: str, cls: str, index: int) -> int:
    """Stable seed per picture (independent of Python's hash randomisation)."""
    return zlib.crc32(f"roads/{split}/{cls}/{index}".encode())


def make_road(cls: str, rng: np.random.Generator, salt: int) -> Road:
    """Road half-width, camera offset from the centre line and curvature per class."""
    half = {"asphalt": (3.0, 3.8), "gravel": (2.2, 3.2), "dirt": (1.8, 2.6), "snow": (2.6, 3.6)}
    half_width = rng.uniform(*half[cls])
    if cls == "asphalt":  # drive in the right-hand lane
        offset = -half_width / 2 + rng.uniform(-0.4, 0.4)
    else:
        offset = rng.uniform(-0.6, 0.6)
    curve = rng.uniform(-1, 1) * rng.uniform(0.0, 0.0025)
    return Road(half_width, offset, curve, salt)


POSTS = {  # (height m, width m, body colour, top colour) of the roadside posts per class
    "asphalt": (1.0, 0.12, (0.85, 0.85, 0.82), (0.1, 0.1, 0.1)),
    "gravel": (1.1, 0.12, (0.40, 0.30, 0.20), (0.40, 0.30, 0.20)),
    "dirt": (1.2, 0.14, (0.35, 0.26, 0.17), (0.35, 0.26, 0.17)),
    "snow": (1.8, 0.05, (0.1, 0.1, 0.1), (0.9, 0.35, 0.1)),
}


def draw_posts(
    img: Array, cam: Camera, road: Road, weather: Weather, cls: str, rng: np.random.Generator
) -> None:
    """Marker posts (snow poles, wooden or delineator posts) at intervals beside the road."""
    tall, wide, body, cap = (np.float32(v) for v in POSTS[cls])
    spacing, gap = rng.uniform(20, 50), rng.uniform(0.5, 1.5)
    sides = [(-1,), (1,), (-1, 1)][rng.integers(3)]
    for z in (rng.uniform(3, 3 + spacing) + spacing * np.arange(12))[::-1]:
        scale = cam.focal / z
        fog = 1 - np.exp(-z / weather.fog_distance)
        bottom = cam.horizon + cam.elevation * scale
        top, split = bottom - tall * scale, bottom - 0.75 * tall * scale
        for side in sides:
            x_cam = road.offset + road.curve * z * z + side * (road.half_width + gap)
            centre = cam.cx + x_cam * scale
            left, right = centre - wide * scale / 2, centre + wide * scale / 2
            fill_box(img, left, right, top, split, mix(cap, weather.haze, fog))
            fill_box(img, left, right, split, bottom, mix(body, weather.haze, fog))


def fill_box(
    img: Array, left: float, right: float, top: float, bottom: float, colour: Array
) -> None:
    """Fill a rectangle with anti-aliased left and right edges (at least one pixel wide)."""
    h, w, _ = img.shape
    right = max(right, left + 1.0)
    c0, c1 = max(int(np.floor(left)), 0), min(int(np.ceil(right)), w)
    r0, r1 = max(int(round(top)), 0), min(int(round(bottom)), h)
    if c0 >= c1 or r0 >= r1:
        return
    cols = np.arange(c0, c1, dtype=np.float32)
    cover = np.clip(np.minimum(cols + 1, right) - np.maximum(cols, left), 0, 1)
    img[r0:r1, c0:c1] = mix(img[r0:r1, c0:c1], colour, cover)


def add_snowfall(img: Array, rng: np.random.Generator) -> None:
    """Scatter soft white flakes of a few sizes over the picture."""
    h, w, _ = img.shape
    flakes = Image.new("L", (w, h))
    draw = ImageDraw.Draw(flakes)
    count = int(rng.uniform(150, 500))
    for x, y, r in zip(
        rng.uniform(0, w, count),
        rng.uniform(0, h, count),
        rng.uniform(0.6, 2.2, count),
        strict=True,
    ):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=int(rng.uniform(150, 230)))
    alpha = np.asarray(flakes.filter(ImageFilter.GaussianBlur(0.7)), np.float32) / 255
    img[:] = mix(img, np.float32([0.97, 0.97, 0.97]), alpha)


def grade(img: Array, rng: np.random.Generator) -> Array:
    """Exposure, white balance, contrast and a light vignette, like a cheap dash cam."""
    h, w, _ = img.shape
    exposure = rng.uniform(0.78, 1.15)
    tint = 1 + np.array([1, 0, -1], np.float32) * rng.uniform(-0.06, 0.06)
    contrast = rng.uniform(0.9, 1.15)
    img = (img * exposure * tint - 0.5) * contrast + 0.5
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
    return img * (1 - rng.uniform(0.05, 0.2) * r2 / 2)[..., None]


def finish(img: Array, rng: np.random.Generator) -> Image.Image:
    """Roll the camera a little, crop the margin away, downscale and add sensor noise."""
    pic = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    pic = pic.rotate(rng.uniform(-3.0, 3.0), resample=Image.Resampling.BILINEAR)
    w, h = WIDTH * SUPERSAMPLE, HEIGHT * SUPERSAMPLE
    left, top = (pic.width - w) // 2, (pic.height - h) // 2
    pic = pic.crop((left, top, left + w, top + h)).resize((WIDTH, HEIGHT), Image.Resampling.BOX)
    noisy = np.asarray(pic, np.float32) + rng.normal(0, rng.uniform(0.8, 2.0), (HEIGHT, WIDTH, 1))
    return Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8))


def render(split: str, cls: str, index: int) -> Image.Image:
    """Draw one road picture of the given class; the same arguments give the same picture."""
    seed = image_seed(split, cls, index)
    rng = np.random.default_rng(seed)
    cam = make_camera(rng)
    weather = make_weather(cls, rng)
    img = draw_sky(cam, weather, seed)
    draw_skyline(img, cam, weather, cls, rng, seed + 1)
    road = make_road(cls, rng, seed + 2)
    draw_ground(img, cam, cls, road, weather)
    if rng.random() < 0.5:
        draw_posts(img, cam, road, weather, cls, rng)
    if cls == "snow" and rng.random() < 0.5:
        add_snowfall(img, rng)
    return finish(grade(img, rng), rng)


def clear_output(out: Path) -> None:
    """Remove previously generated splits (only the split folders inside ``out``)."""
    for split in SPLITS:
        target = out / split
        if target.is_dir():
            shutil.rmtree(target)


def save_one(job: tuple[Path, str, str, int]) -> Path:
    """Render and save one picture (a unit of work for the process pool)."""
    out, split, cls, index = job
    path = out / split / cls / f"{cls}_{split}_{index:02d}.jpg"
    render(split, cls, index).save(path, quality=JPEG_QUALITY)
    return path


def generate(out: Path, jobs: int) -> int:
    """Write every split/class/index picture under ``out``; returns how many were written."""
    clear_output(out)
    work = []
    for split, count in SPLITS.items():
        for cls in CLASSES:
            (out / split / cls).mkdir(parents=True, exist_ok=True)
            work += [(out, split, cls, index) for index in range(count)]
    if jobs <= 1:
        return len([save_one(job) for job in work])
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return len(list(pool.map(save_one, work, chunksize=4)))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes (default: all CPUs); the pictures do not depend on it",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    written = generate(args.out, args.jobs)
    print(f"wrote {written} images to {args.out} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
