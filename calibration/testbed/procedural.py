"""Procedurally drawn RGB images (3x16x16, in [-1, 1]): the data of the held-out models, which is not digits.

``shapes``: one soft-edged shape (class: disk, square, triangle, ring, cross, diamond, horizontal bar, vertical
bar, two disks, half disk) of a random colour, size, place and turn on a background that is a linear blend of two
random colours. ``textures``: a pattern filling the image (class: stripes, checks, dots, concentric rings, plaid,
each at a low and a high frequency) in two random colours, at a random turn and phase. Both are drawn from a
``torch.Generator``, so a seed gives the same images on every machine; there is no data set to download or ship.
Pure torch.
"""
import math

import torch

SIZE = 16
SHAPES = ("disk", "square", "triangle", "ring", "cross", "diamond", "hbar", "vbar", "two_disks", "half_disk")
TEXTURES = ("stripes", "checks", "dots", "rings", "plaid")  # x (low, high) frequency: classes 0-9
EDGE = 0.06  # softness of a shape's edge, in image widths: about one pixel, so the images are anti-aliased


def _grid(n):
    """Pixel centres in [-1, 1], each (n, H, W)."""
    c = (torch.arange(SIZE, dtype=torch.float32) + 0.5) / SIZE * 2 - 1
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return yy.expand(n, SIZE, SIZE), xx.expand(n, SIZE, SIZE)


def _u(gen, n, lo, hi):
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _colours(gen, n):
    return torch.rand(n, 3, generator=gen) * 2 - 1


def _signed_distance(kind, u, v, r):
    """Approximate signed distance (negative inside) of shape ``kind`` of size ``r`` at rotated coordinates."""
    if kind == "disk":
        return (u ** 2 + v ** 2).sqrt() - r
    if kind == "square":
        return torch.maximum(u.abs(), v.abs()) - 0.8 * r
    if kind == "triangle":  # equilateral, pointing up in its own frame
        k = math.sqrt(3.0)
        return torch.maximum(-v - 0.5 * r, (k * u.abs() + v) / 2 - 0.5 * r)
    if kind == "ring":
        return ((u ** 2 + v ** 2).sqrt() - r).abs() - 0.3 * r
    if kind == "cross":
        arm = 0.3 * r
        return torch.minimum(torch.maximum(u.abs() - r, v.abs() - arm), torch.maximum(u.abs() - arm, v.abs() - r))
    if kind == "diamond":
        return (u.abs() + v.abs()) / math.sqrt(2) - 0.75 * r
    if kind == "hbar":
        return torch.maximum(u.abs() - 1.3 * r, v.abs() - 0.35 * r)
    if kind == "vbar":
        return torch.maximum(u.abs() - 0.35 * r, v.abs() - 1.3 * r)
    if kind == "two_disks":
        a = ((u - 0.6 * r) ** 2 + v ** 2).sqrt() - 0.5 * r
        b = ((u + 0.6 * r) ** 2 + v ** 2).sqrt() - 0.5 * r
        return torch.minimum(a, b)
    if kind == "half_disk":
        return torch.maximum((u ** 2 + v ** 2).sqrt() - r, -v)
    raise ValueError(kind)


def shapes(n, gen):
    """``n`` shape images (n, 3, 16, 16) and their classes (indices into ``SHAPES``)."""
    labels = torch.randint(len(SHAPES), (n,), generator=gen)
    yy, xx = _grid(n)
    # background: two colours blended along a random direction
    c0, c1 = _colours(gen, n), _colours(gen, n)
    angle = _u(gen, n, 0, 2 * math.pi)
    along = (xx * angle.cos()[:, None, None] + yy * angle.sin()[:, None, None]) / 2 + 0.5
    image = c0[:, :, None, None] + (c1 - c0)[:, :, None, None] * along[:, None]
    # the shape: its colour kept apart from the background's mean, so it shows
    fg = _colours(gen, n)
    mean = (c0 + c1) / 2
    close = (fg - mean).abs().amax(1, keepdim=True) < 0.5
    fg = torch.where(close, -0.8 * torch.sign(mean + 1e-6) + 0.2 * fg, fg)
    r = _u(gen, n, 0.3, 0.55)
    cx, cy = _u(gen, n, -0.35, 0.35), _u(gen, n, -0.35, 0.35)
    turn = _u(gen, n, 0, 2 * math.pi)
    dx, dy = xx - cx[:, None, None], yy - cy[:, None, None]
    cos, sin = turn.cos()[:, None, None], turn.sin()[:, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    dist = torch.stack([_signed_distance(SHAPES[k], u[i], v[i], r[i]) for i, k in enumerate(labels.tolist())])
    inside = torch.sigmoid(-dist / EDGE)[:, None]
    image = image * (1 - inside) + fg[:, :, None, None] * inside
    return image.clamp(-1, 1), labels


def textures(n, gen):
    """``n`` texture images (n, 3, 16, 16) and their classes (2 * pattern + high frequency)."""
    labels = torch.randint(2 * len(TEXTURES), (n,), generator=gen)
    pattern, high = labels // 2, labels % 2
    yy, xx = _grid(n)
    freq = torch.where(high.bool(), _u(gen, n, 3.0, 4.0), _u(gen, n, 1.2, 1.8)) * math.pi  # cycles over [-1, 1]
    turn = _u(gen, n, 0, math.pi)
    phase = _u(gen, n, 0, 2 * math.pi)
    cos, sin = turn.cos()[:, None, None], turn.sin()[:, None, None]
    u, v = cos * xx + sin * yy, -sin * xx + cos * yy
    f, p = freq[:, None, None], phase[:, None, None]
    value = torch.empty(n, SIZE, SIZE)
    for k, name in enumerate(TEXTURES):
        m = pattern == k
        if not m.any():
            continue
        uu, vv, ff, pp = u[m], v[m], f[m], p[m]
        if name == "stripes":
            w = torch.sin(ff * uu + pp)
        elif name == "checks":
            w = torch.sin(ff * uu + pp) * torch.sin(ff * vv + pp)
        elif name == "dots":
            w = (torch.cos(ff * uu + pp) + torch.cos(ff * vv + pp)) / 2
        elif name == "rings":
            w = torch.sin(ff * (uu ** 2 + vv ** 2).sqrt() * 1.5 + pp)
        else:  # plaid: two stripe sets at right angles, one half as strong
            w = (torch.sin(ff * uu + pp) + 0.5 * torch.sin(0.5 * ff * vv)) / 1.5
        value[m] = w
    # a soft threshold makes edges, not only sine waves
    mix = torch.sigmoid(3 * value)[:, None]
    c0, c1 = _colours(gen, n), _colours(gen, n)
    image = c0[:, :, None, None] + (c1 - c0)[:, :, None, None] * mix
    return image.clamp(-1, 1), labels


DATA = {"shapes": shapes, "textures": textures}
