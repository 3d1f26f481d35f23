"""Metrics files (metrics.jsonl + metrics.csv, one row per logged step) and loss-curve plots.

Rows are flat dicts with at least "step"; training rows carry loss parts ("loss", "text", "audio", ...),
"lr", "tokens_per_s"; evaluation rows carry "eval_*" keys. The CSV has the union of all keys seen so far
(it is rewritten when a new key appears). `truncate_after(step)` drops rows logged after a checkpoint so
a resumed run does not log the same steps twice.

`plot_metrics` draws with matplotlib (Agg backend) when it is installed, otherwise with Pillow.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path


class MetricsWriter:
    def __init__(self, out_dir: str | Path, enabled: bool = True):
        self.dir = Path(out_dir)
        self.jsonl = self.dir / "metrics.jsonl"
        self.csv = self.dir / "metrics.csv"
        self.enabled = enabled
        self.keys: list[str] = []
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            for row in read_jsonl(self.jsonl):
                self._note_keys(row)

    def _note_keys(self, row: dict) -> bool:
        new = [k for k in row if k not in self.keys]
        self.keys += new
        return bool(new)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {k: _plain(v) for k, v in row.items()}
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._note_keys(row) or not self.csv.exists():
            self._rewrite_csv()
        else:
            with self.csv.open("a", newline="") as f:
                csv.DictWriter(f, self.keys).writerow(row)

    def _rewrite_csv(self) -> None:
        rows = read_jsonl(self.jsonl)
        with self.csv.open("w", newline="") as f:
            w = csv.DictWriter(f, self.keys)
            w.writeheader()
            w.writerows(rows)

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.jsonl.exists():
            return
        rows = [r for r in read_jsonl(self.jsonl) if r.get("step", 0) <= step]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.keys = []
        for r in rows:
            self._note_keys(r)
        self._rewrite_csv()


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill
    return rows


# ---- plots ---------------------------------------------------------------------------------------
CURVES = ("loss", "text", "audio", "eval_loss", "eval_text", "eval_audio")
COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


def series(rows: list[dict], keys=CURVES) -> dict[str, list[tuple[float, float]]]:
    out = {}
    for k in keys:
        pts = [(float(r["step"]), float(r[k])) for r in rows
               if k in r and "step" in r and isinstance(r[k], (int, float)) and math.isfinite(r[k])]
        if pts:
            out[k] = pts
    return out


def plot_metrics(jsonl: str | Path, out_png: str | Path, keys=CURVES, title: str | None = None,
                 backend: str = "auto") -> Path:
    """Loss curves of a metrics.jsonl as a PNG. backend: auto | matplotlib | pillow."""
    rows = read_jsonl(jsonl)
    data = series(rows, keys)
    if not data:
        raise ValueError(f"{jsonl} has no rows with any of {list(keys)}")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    title = title or Path(jsonl).parent.name or "training"
    if backend in ("auto", "matplotlib"):
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            if backend == "matplotlib":
                raise
        else:
            fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
            for k, pts in data.items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker="o" if len(pts) < 3 else None)
            ax.set_xlabel("step"), ax.set_ylabel("loss (nats/token)"), ax.set_title(title)
            if _use_log(data):
                ax.set_yscale("log")
            ax.grid(alpha=0.3), ax.legend()
            fig.tight_layout()
            fig.savefig(out_png)
            plt.close(fig)
            return out_png
    _plot_pillow(data, out_png, title)
    return out_png


def _use_log(data) -> bool:
    ys = [y for pts in data.values() for _, y in pts]
    return min(ys) > 0 and max(ys) / min(ys) > 30


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.ceil(lo / step) * step
    ticks, t = [], start
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-2:
        return f"{v:.0e}"
    return f"{v:g}"


def _plot_pillow(data: dict, out_png: Path, title: str, size=(800, 500)) -> None:
    from PIL import Image, ImageDraw, ImageFont

    W, H = size
    left, right, top, bottom = 70, 150, 40, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs = [x for pts in data.values() for x, _ in pts]
    ys = [y for pts in data.values() for _, y in pts]
    log = _use_log(data)
    f = (lambda y: math.log10(y)) if log else (lambda y: y)
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = f(min(ys)), f(max(ys))
    pad = (y1 - y0) * 0.05 or 0.5
    y0, y1 = y0 - pad, y1 + pad
    px = lambda x: left + (x - x0) / (x1 - x0) * (W - left - right)
    py = lambda y: H - bottom - (f(y) - y0) / (y1 - y0) * (H - top - bottom)
    # axes and grid
    d.rectangle([left, top, W - right, H - bottom], outline=(0, 0, 0))
    for t in _nice_ticks(x0, x1):
        X = px(t)
        d.line([X, top, X, H - bottom], fill=(230, 230, 230))
        d.text((X - 10, H - bottom + 5), _fmt(t), fill=(0, 0, 0), font=font)
    yt = [10 ** e for e in range(math.floor(y0), math.ceil(y1) + 1)] if log else _nice_ticks(y0, y1)
    for t in yt:
        if t <= 0 and log:
            continue
        Y = py(t)
        if top <= Y <= H - bottom:
            d.line([left, Y, W - right, Y], fill=(230, 230, 230))
            d.text((5, Y - 6), _fmt(t), fill=(0, 0, 0), font=font)
    d.text((W // 2 - 40, H - bottom + 25), "step", fill=(0, 0, 0), font=font)
    d.text((left, 12), f"{title} — loss (nats/token){' (log scale)' if log else ''}", fill=(0, 0, 0), font=font)
    for i, (k, pts) in enumerate(data.items()):
        c = COLORS[i % len(COLORS)]
        line = [(px(x), py(y)) for x, y in pts]
        if len(line) > 1:
            d.line(line, fill=c, width=2)
        if len(line) < 30:
            for X, Y in line:
                d.ellipse([X - 2, Y - 2, X + 2, Y + 2], fill=c)
        ly = top + 10 + 18 * i
        d.line([W - right + 10, ly + 6, W - right + 35, ly + 6], fill=c, width=3)
        d.text((W - right + 40, ly), k, fill=(0, 0, 0), font=font)
    img.save(out_png)
