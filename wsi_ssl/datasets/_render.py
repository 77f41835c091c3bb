"""A procedural H&E slide model: tissue on glass, glands, stroma, a label region and a decoy.

Everything is defined by small per-slide arrays (smooth random fields on a 16-px grid and one
nucleus per cell of two jittered cell grids), so any region of the slide can be rendered on demand
without holding the slide in memory, and the same pixel always gets the same value.

Colours follow the Beer-Lambert stain model of colour deconvolution (Ruifrok & Johnston, Anal.
Quant. Cytol. Histol. 2001): optical density ``OD = h * H + e * E`` for the haematoxylin and eosin
concentrations ``h``, ``e`` and per-slide perturbed stain vectors ``H``, ``E``; RGB ``= 255 exp(-OD)``.

Regions (the ``region map`` codes): 0 glass, 1 normal tissue (stroma with elongated nuclei and
fibres, glands of round nuclei around white lumens), 2 **tumour** (the label region: dense, large,
pleomorphic, vesicular nuclei with nucleoli), 3 **decoy** (lymphoid aggregate: dense, small, very
dark round nuclei; as purple as tumour but a different morphology).

Coordinates are level-0 pixels ``(x, y)``; sizes ``(w, h)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SlideModel", "REGION_CODES"]

#: region map codes
REGION_CODES: dict[str, int] = {"glass": 0, "normal": 1, "tumor": 2, "decoy": 3}

_GRID = 16  # level-0 px between field samples
_SOFT = 0.06  # field units over which a region boundary fades
_NOISE_PERIOD = 509
_PAD = 1024  # regions up to this size read the noise texture as a slice
_BIG = 8.0
_RUIFROK_H = np.array([0.650, 0.704, 0.286])
_RUIFROK_E = np.array([0.100, 0.850, 0.300])  # a pinker eosin than Ruifrok's, closer to scans


def _sstep(z: np.ndarray) -> np.ndarray:
    """Smooth 0 -> 1 ramp of ``z`` in field units (0 at -_SOFT/2, 1 at +_SOFT/2)."""
    t = np.clip(z * (1.0 / _SOFT) + 0.5, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _box_sum(img: np.ndarray, k: int) -> np.ndarray:
    """Sums over ``k x k`` blocks of an ``(h, w, 3)`` image (h, w multiples of k), as uint16."""
    a = img.astype(np.uint16)
    rows = sum(a[i::k] for i in range(k))
    return sum(rows[:, j::k] for j in range(k))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter  # lazy: scipy loads on first use, not on import

    f = gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return ((f - f.mean()) / (f.std() + 1e-12)).astype(np.float32)


@dataclass
class _Nuclei:
    """One possible nucleus per cell of a ``cell``-px grid (arrays of shape ``(ny, nx)``)."""

    cell: int
    present: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    a: np.ndarray  # semi-axis along ``angle`` (px)
    b: np.ndarray  # other semi-axis (px)
    cos: np.ndarray
    sin: np.ndarray
    dark: np.ndarray  # haematoxylin concentration
    vesicular: np.ndarray  # bool: pale centre, dark rim, nucleolus
    reach: int  # max semi-axis, rounded up

    def render(self, x0: int, y0: int, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
        """Haematoxylin and coverage ``(h, w)`` float32 of the nuclei in a region."""
        c, r = self.cell, self.reach
        ny, nx = self.present.shape
        i0, i1 = max(0, (y0 - r) // c), min(ny, (y0 + h + r) // c + 1)
        j0, j1 = max(0, (x0 - r) // c), min(nx, (x0 + w + r) // c + 1)
        hem = np.zeros(h * w, np.float32)
        cov = np.zeros(h * w, np.float32)
        sel = self.present[i0:i1, j0:j1]
        if not sel.any():
            return hem.reshape(h, w), cov.reshape(h, w)

        def pick(arr: np.ndarray) -> np.ndarray:
            return arr[i0:i1, j0:j1][sel][:, None, None]

        cx, cy, a, b = pick(self.cx), pick(self.cy), pick(self.a), pick(self.b)
        co, si, dark, ves = pick(self.cos), pick(self.sin), pick(self.dark), pick(self.vesicular)
        off = np.arange(-r - 1, r + 2, dtype=np.float32)
        px = np.floor(cx) + off[None, None, :]  # (N, 1, S)
        py = np.floor(cy) + off[None, :, None]  # (N, S, 1)
        dx, dy = px + 0.5 - cx, py + 0.5 - cy
        u = (dx * co + dy * si) / a
        v = (dy * co - dx * si) / b
        d2 = u * u + v * v
        d = np.sqrt(d2)
        alpha = np.clip((1.0 - d) * b + 0.5, 0.0, 1.0)
        prof = np.where(ves, 0.55 + 0.55 * d2 + 0.9 * np.exp(-(dx * dx + dy * dy) / 2.0), 1.0)
        val = (alpha * dark * prof).astype(np.float32)
        lx, ly = (px - x0).astype(np.int64), (py - y0).astype(np.int64)
        ok = (lx >= 0) & (lx < w) & (ly >= 0) & (ly < h) & (alpha > 0)
        flat = np.broadcast_to(ly * w + lx, ok.shape)[ok]
        np.maximum.at(hem, flat, val[ok])
        np.maximum.at(cov, flat, np.broadcast_to(alpha, ok.shape)[ok].astype(np.float32))
        return hem.reshape(h, w), cov.reshape(h, w)


class SlideModel:
    """A random slide: call it like a :data:`~wsi_ssl.datasets.Renderer` to draw any region.

    Args:
        size: level-0 ``(w, h)`` in pixels.
        seed: everything about the slide follows from it.
        tumor_fraction: fraction of the tissue area covered by the label region (0 = none).
        decoy_fraction: fraction of the tissue area covered by the decoy region (0 = none).
        tissue_fraction: fraction of the slide area covered by tissue.
        stain_jitter: strength of the per-slide stain variation (0 = the reference stain).
    """

    def __init__(self, size: tuple[int, int], *, seed: int, tumor_fraction: float,
                 decoy_fraction: float, tissue_fraction: float = 0.6,
                 stain_jitter: float = 1.0) -> None:
        self.size = (int(size[0]), int(size[1]))
        rng = np.random.default_rng(seed)
        w0, h0 = self.size
        gy, gx = h0 // _GRID + 3, w0 // _GRID + 3
        # --- tissue: large-scale noise under an off-centre elliptic envelope
        yy, xx = np.mgrid[0:gy, 0:gx].astype(np.float32)
        cx, cy = gx * rng.uniform(0.4, 0.6), gy * rng.uniform(0.4, 0.6)
        env = ((xx - cx) / (0.55 * gx)) ** 2 + ((yy - cy) / (0.55 * gy)) ** 2
        s = max(gx, gy) / 192.0 * 16  # noise scales relative to a 3072-px slide
        tissue = (_smooth_noise(rng, (gy, gx), 0.9 * s) + 0.35 * _smooth_noise(rng, (gy, gx), 0.2 * s)
                  - 2.2 * env)
        tissue[:1], tissue[-2:], tissue[:, :1], tissue[:, -2:] = -_BIG, -_BIG, -_BIG, -_BIG
        thr_t = float(np.quantile(tissue, 1.0 - tissue_fraction))
        in_tissue = tissue > thr_t
        # --- label region and decoy: a few blobs at tissue points, ragged edges
        tumor = self._blobs(rng, in_tissue, int(rng.integers(1, 4)), tumor_fraction, gy, gx)
        tumor[~in_tissue] = -_BIG
        thr_m, in_tumor = self._threshold(tumor, in_tissue, tumor_fraction)
        decoy = self._blobs(rng, in_tissue & ~in_tumor, int(rng.integers(1, 5)), decoy_fraction,
                            gy, gx)
        decoy[~in_tissue | in_tumor] = -_BIG
        thr_d, in_decoy = self._threshold(decoy, in_tissue & ~in_tumor,
                                          decoy_fraction * in_tissue.sum() /
                                          max(1, (in_tissue & ~in_tumor).sum()))
        glands = _smooth_noise(rng, (gy, gx), 1.6)
        angle = _smooth_noise(rng, (gy, gx), 4.0) * 1.3 + rng.uniform(0, np.pi)
        phase = _smooth_noise(rng, (gy, gx), 1.0) * 2.5
        self._fields = np.stack([tissue - thr_t, tumor - thr_m, decoy - thr_d, glands,
                                 np.cos(angle), np.sin(angle), phase], axis=-1).astype(np.float32)
        self._fields_cf = np.ascontiguousarray(self._fields.transpose(2, 0, 1))
        self.tissue_fraction = float(in_tissue.mean())
        n_t = max(1, int(in_tissue.sum()))
        self.tumor_fraction = float(in_tumor.sum() / n_t)
        self.decoy_fraction = float(in_decoy.sum() / n_t)
        # --- stain: per-slide perturbed stain vectors and concentrations
        j = stain_jitter
        hv = _RUIFROK_H * np.exp(rng.normal(0, 0.12 * j, 3))
        ev = _RUIFROK_E * np.exp(rng.normal(0, 0.15 * j, 3))
        self._hv = (hv / np.linalg.norm(hv) * np.exp(rng.normal(0, 0.12 * j))).astype(np.float32)
        self._ev = (ev / np.linalg.norm(ev) * np.exp(rng.normal(0, 0.15 * j))).astype(np.float32)
        self._glass = np.clip(np.array([0.04, 0.05, 0.035]) + rng.normal(0, 0.012 * j, 3),
                              0.005, 0.12).astype(np.float32)
        self._eosin = float(0.62 * np.exp(rng.normal(0, 0.12 * j)))
        self._gland_thr = (float(rng.uniform(0.1, 0.5)), float(rng.uniform(1.0, 1.3)))
        self._fibre_period = float(rng.uniform(7.0, 11.0))
        noise = rng.standard_normal((3, _NOISE_PERIOD, _NOISE_PERIOD)).astype(np.float32)
        self._noise = noise
        self._noise_pad = np.pad(noise, ((0, 0), (0, _PAD), (0, _PAD)), mode="wrap")
        self._nuc_a = self._make_nuclei(rng, 10, small=True)
        self._nuc_b = self._make_nuclei(rng, 18, small=False)
        self._cache_ds = 4
        self._cache = np.zeros((h0 // 4, w0 // 4, 3), np.uint8)
        self._cached = np.zeros((h0 // 4, w0 // 4), bool)

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _blobs(rng: np.random.Generator, where: np.ndarray, k: int, frac: float,
               gy: int, gx: int) -> np.ndarray:
        """``k`` Gaussian bumps centred on random points of ``where``, sized so that together
        they cover about ``frac`` of it, plus a little noise for ragged edges."""
        yy, xx = np.mgrid[0:gy, 0:gx].astype(np.float32)
        f = 0.06 * _smooth_noise(rng, (gy, gx), 1.0)
        pts = np.argwhere(where)
        if len(pts) == 0:
            return f
        radius = np.sqrt(max(frac, 1e-3) * len(pts) / k / np.pi)  # grid cells
        for _ in range(k):
            py, px = pts[rng.integers(len(pts))]
            sg = radius * rng.uniform(0.7, 1.1)
            f += rng.uniform(0.7, 1.0) * np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / (2 * sg * sg))
        return f

    @staticmethod
    def _threshold(field: np.ndarray, where: np.ndarray, frac: float) -> tuple[float, np.ndarray]:
        vals = field[where]
        if frac <= 0 or len(vals) == 0:
            return _BIG * 2, np.zeros_like(where)
        thr = float(np.quantile(vals, 1.0 - min(frac, 1.0)))
        return thr, where & (field > thr)

    def _make_nuclei(self, rng: np.random.Generator, cell: int, *, small: bool) -> _Nuclei:
        w0, h0 = self.size
        ny, nx = h0 // cell + 1, w0 // cell + 1
        cy = (np.arange(ny)[:, None] + rng.uniform(0.15, 0.85, (ny, nx))) * cell
        cx = (np.arange(nx)[None, :] + rng.uniform(0.15, 0.85, (ny, nx))) * cell
        reg = self.regions(cx.astype(np.float32), cy.astype(np.float32))
        u = rng.uniform(size=(ny, nx))
        jit = rng.uniform(0.85, 1.15, (ny, nx))
        if small:  # stroma fibroblasts, gland epithelium, lymphocytes
            stroma, epi, lym = reg["stroma"], reg["epithelium"], reg["decoy"]
            present = u < 0.11 * stroma + 0.55 * epi + 0.97 * lym
            kind = np.argmax(np.stack([stroma, epi, lym]), axis=0)
            r = np.choose(kind, [2.6, 3.8, 3.4]) * jit
            asp = np.choose(kind, [2.6, 1.25, 1.05]) * rng.uniform(0.85, 1.2, (ny, nx))
            ang = np.where(kind == 0, np.arctan2(reg["sin"], reg["cos"]),
                           rng.uniform(0, np.pi, (ny, nx)))
            dark = np.choose(kind, [1.05, 0.85, 1.55]) * rng.uniform(0.85, 1.15, (ny, nx))
            ves = np.zeros((ny, nx), bool)
        else:  # tumour: big, pleomorphic, vesicular
            present = u < 0.93 * reg["tumor"]
            r = rng.uniform(5.5, 8.3, (ny, nx))
            asp = rng.uniform(1.0, 1.7, (ny, nx))
            ang = rng.uniform(0, np.pi, (ny, nx))
            dark = rng.uniform(0.95, 1.45, (ny, nx))
            ves = rng.uniform(size=(ny, nx)) < 0.7
        a, b = r * np.sqrt(asp), r / np.sqrt(asp)
        reach = int(np.ceil(a[present].max())) if present.any() else 1
        f32 = np.float32
        return _Nuclei(cell, present, cx.astype(f32), cy.astype(f32), a.astype(f32),
                       b.astype(f32), np.cos(ang).astype(f32), np.sin(ang).astype(f32),
                       dark.astype(f32), ves, reach)

    # ------------------------------------------------------------------ evaluation
    def _fields_at(self, xs: np.ndarray, ys: np.ndarray) -> list[np.ndarray]:
        """Bilinear field values at level-0 points (``xs`` broadcast with ``ys``), per channel."""
        fx, fy = xs / _GRID, ys / _GRID
        ix = np.clip(np.floor(fx).astype(np.int64), 0, self._fields.shape[1] - 2)
        iy = np.clip(np.floor(fy).astype(np.int64), 0, self._fields.shape[0] - 2)
        wx = np.clip(fx - ix, 0, 1)[..., None].astype(np.float32)
        wy = np.clip(fy - iy, 0, 1)[..., None].astype(np.float32)
        f = self._fields
        top = f[iy, ix] * (1 - wx) + f[iy, ix + 1] * wx
        bot = f[iy + 1, ix] * (1 - wx) + f[iy + 1, ix + 1] * wx
        out = top * (1 - wy) + bot * wy
        return [out[..., c] for c in range(out.shape[-1])]

    def _fields_grid(self, xs: np.ndarray, ys: np.ndarray) -> list[np.ndarray]:
        """Bilinear field values on the grid ``ys x xs`` (1-D level-0 coordinates), as two small
        matrix products (separable interpolation). Returns one ``(len(ys), len(xs))`` per channel."""
        _, gy, gx = self._fields_cf.shape

        def weights(t: np.ndarray, n: int) -> tuple[np.ndarray, int, int]:
            ft = t / _GRID
            i = np.clip(np.floor(ft).astype(np.int64), 0, n - 2)
            lo, hi = int(i.min()), int(i.max()) + 2
            wt = np.clip(ft - i, 0, 1).astype(np.float32)
            m = np.zeros((len(t), hi - lo), np.float32)
            rows = np.arange(len(t))
            m[rows, i - lo] = 1 - wt
            m[rows, i - lo + 1] += wt
            return m, lo, hi

        my, y0, y1 = weights(ys, gy)
        mx, x0, x1 = weights(xs, gx)
        sub = np.ascontiguousarray(self._fields_cf[:, y0:y1, x0:x1])  # (C, sy, sx)
        out = np.matmul(np.matmul(my, sub), np.ascontiguousarray(mx.T))  # (C, h, w)
        return list(out)

    def regions(self, xs: np.ndarray, ys: np.ndarray, *, grid: bool = False) -> dict[str, np.ndarray]:
        """Soft region weights in [0, 1] at level-0 points ``(xs, ys)`` (broadcast together), or on
        the grid ``ys x xs`` of 1-D coordinates when ``grid=True``."""
        f = self._fields_grid(xs, ys) if grid else self._fields_at(xs, ys)
        tissue = _sstep(f[0])
        tumor = _sstep(f[1]) * tissue
        decoy = _sstep(f[2]) * tissue * (1 - tumor)
        normal = tissue * (1 - tumor) * (1 - decoy)
        g0, g1 = self._gland_thr
        gland, lumen = _sstep(f[3] - g0), _sstep(f[3] - g1)
        return {"tissue": tissue, "tumor": tumor, "decoy": decoy, "normal": normal,
                "stroma": normal * (1 - gland), "epithelium": normal * gland * (1 - lumen),
                "lumen": normal * lumen, "cos": f[4], "sin": f[5], "phase": f[6]}

    def region_map(self, downsample: int = _GRID) -> np.ndarray:
        """Region codes (:data:`REGION_CODES`) at the centres of ``downsample``-px blocks.

        Shape:
            ``(ceil(h / downsample), ceil(w / downsample))`` uint8.
        """
        w0, h0 = self.size
        xs = (np.arange(-(-w0 // downsample)) + 0.5) * downsample
        ys = (np.arange(-(-h0 // downsample)) + 0.5) * downsample
        reg = self.regions(xs.astype(np.float32), ys.astype(np.float32), grid=True)
        out = np.where(reg["tissue"] > 0.5, REGION_CODES["normal"], REGION_CODES["glass"])
        out = np.where(reg["decoy"] > 0.5, REGION_CODES["decoy"], out)
        out = np.where(reg["tumor"] > 0.5, REGION_CODES["tumor"], out)
        return out.astype(np.uint8)

    def render_full(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Level-0 pixels of a region. Shape: ``(h, w, 3)`` uint8."""
        p = _NOISE_PERIOD
        if w <= _PAD and h <= _PAD:
            noise = self._noise_pad[:, y0 % p: y0 % p + h, x0 % p: x0 % p + w]
        else:
            noise = self._noise[:, (np.arange(y0, y0 + h) % p)[:, None],
                                (np.arange(x0, x0 + w) % p)[None]]
        corners = self._fields_at(np.array([x0, x0 + w, x0, x0 + w], np.float32),
                                  np.array([y0, y0, y0 + h, y0 + h], np.float32))[0]
        gi0, gj0 = y0 // _GRID, x0 // _GRID
        block = self._fields[gi0: (y0 + h) // _GRID + 2, gj0: (x0 + w) // _GRID + 2, 0]
        out = np.empty((h, w, 3), np.uint8)
        if block.size and block.max() < -_SOFT and corners.max() < -_SOFT:
            for c in range(3):  # no tissue anywhere near: bright glass only
                od = self._glass[c] + 0.012 * noise[c]
                out[..., c] = np.clip(255.0 * np.exp(-od) + 2.0 * noise[2] + 0.5, 0, 255)
            return out
        xs = np.arange(x0, x0 + w, dtype=np.float32)[None, :] + 0.5
        ys = np.arange(y0, y0 + h, dtype=np.float32)[:, None] + 0.5
        reg = self.regions(xs[0], ys[:, 0], grid=True)
        tis, tum, dec = reg["tissue"], reg["tumor"], reg["decoy"]
        stroma, epi, lumen = reg["stroma"], reg["epithelium"], reg["lumen"]
        ca_, sa_ = reg["cos"], reg["sin"]
        along = ((xs * ca_ + ys * sa_) * (1.0 / self._fibre_period)).astype(np.int64) % p
        across = (ys * ca_ - xs * sa_ + 4.0 * reg["phase"]).astype(np.int64) % p
        fibre = 0.85 + 0.17 * self._noise[0][across, along]
        e = self._eosin * (stroma * fibre + 0.75 * epi + 0.55 * tum + 0.45 * dec + 0.06 * lumen)
        h_bg = 0.03 * stroma + 0.14 * epi + 0.32 * tum + 0.22 * dec
        ha, cov_a = self._nuc_a.render(x0, y0, w, h)
        hb, cov_b = self._nuc_b.render(x0, y0, w, h)
        normal_nuc = 1.0 - tum  # no normal nuclei inside the tumour
        cov = np.maximum(cov_a * normal_nuc, cov_b * tis)
        hem = h_bg * (1.0 - cov) + np.maximum(ha * normal_nuc, hb * tis) * (1.0 + 0.18 * noise[1])
        e *= (1.0 - 0.65 * cov) * (1.0 + 0.10 * noise[0])
        glass_w = 1.0 - 0.5 * tis
        for c in range(3):
            od = hem * self._hv[c] + e * self._ev[c] + (self._glass[c] + 0.012 * noise[c]) * glass_w
            out[..., c] = np.clip(255.0 * np.exp(-od) + 2.0 * noise[2] + 0.5, 0, 255)
        return out

    def __call__(self, x: int, y: int, w: int, h: int, downsample: float) -> np.ndarray:
        """The :data:`~wsi_ssl.datasets.Renderer` protocol (``w x h`` output pixels at ``downsample``).

        Level-0 regions are cached at 1/4 scale, so the coarser pyramid levels of a file written
        level 0 first cost almost nothing.
        """
        ds = int(round(downsample))
        if ds <= 1:
            img = self.render_full(x, y, w, h)
            k = self._cache_ds
            if x % k == 0 and y % k == 0:
                cw, ch = w // k, h // k
                if cw and ch:
                    small = _box_sum(img[: ch * k, : cw * k], k)
                    cy, cx = y // k, x // k
                    ch, cw = min(ch, self._cache.shape[0] - cy), min(cw, self._cache.shape[1] - cx)
                    if ch > 0 and cw > 0:
                        self._cache[cy: cy + ch, cx: cx + cw] = (small[:ch, :cw] + k * k // 2) // (k * k)
                        self._cached[cy: cy + ch, cx: cx + cw] = True
            return img
        k = self._cache_ds
        if ds % k == 0 and x % k == 0 and y % k == 0:
            f = ds // k
            cy, cx = y // k, x // k
            sub = self._cached[cy: cy + h * f, cx: cx + w * f]
            if sub.shape == (h * f, w * f) and sub.all():
                src = self._cache[cy: cy + h * f, cx: cx + w * f].astype(np.float32)
                return (src.reshape(h, f, w, f, 3).mean(axis=(1, 3)) + 0.5).astype(np.uint8)
        # not cached: render at level 0 in strips and box-downsample
        out = np.empty((h, w, 3), np.uint8)
        rows = max(1, 1024 // ds)
        for r0 in range(0, h, rows):
            rh = min(rows, h - r0)
            full = self.render_full(x, y + r0 * ds, w * ds, rh * ds).astype(np.float32)
            out[r0: r0 + rh] = (full.reshape(rh, ds, w, ds, 3).mean(axis=(1, 3)) + 0.5).astype(np.uint8)
        return out
