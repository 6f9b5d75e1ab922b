"""MS-COCO FID and KID of text -> image generation (CogView's protocol), with cached reference statistics.

- N captions are sampled with a seed, one per image; the real images are those images (or every image of the
  split), center-cropped and resized by the ingest's own `normalize_image`. Generated images are kept as PNG:
  JPEG re-encoding alone moves FID (clean-fid).
- Features: torch-fidelity's TF-ported Inception-v3 through torchmetrics' wrapper, 2048-d pool3, TF-compatible
  bilinear resize to 299 (`antialias=False`), weights only from the configured file -- never downloaded.
- FID: torchmetrics' `FrechetInceptionDistance` over float64 sums (trace term from eigenvalues, no sqrtm). KID:
  torch-fidelity's unbiased polynomial-kernel MMD, 100 subsets of min(1000, N). FID-k: both sets Gaussian-blurred.
- The real side (mean, covariance, and the features KID needs) is stored under `eval/fid-reference/<key>/`, keyed by
  the dataset's content, N, resolution, weights, real set, seed and blur radii, so repeated evaluations pay only
  for generation.
- The captions index, caption order and real images are `wudao.eval.coco`'s; the sample grid and the PNG encoding
  are `wudao.eval.grid`'s.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from wudao.data.images import png_bytes
from wudao.eval.coco import CocoIndex, FIDError, caption_order, load_coco, read_real
from wudao.eval.grid import sample_grid
from wudao.storage import ObjectStore, StorageError, join_key, sha256_file

STANDARD_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
FEATURE_DIM = 2048
FULL_RANK_N = 2048  # fewer samples than feature dimensions: the covariance is rank-deficient
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torch-fidelity's defaults
TEST_MARKER = "wudao-test-weights"  # a state-dict `_metadata` entry: load_state_dict ignores it, weights_info sees it
REFERENCE_PREFIX = "eval/fid-reference"
_CACHE_VERSION = 1
_HOW = (
    f"the standard file is {STANDARD_WEIGHTS} from pytorch-fid's GitHub release (torch-fidelity's release has the "
    "same weights as weights-inception-2015-12-05-6726825d.pth); download it once and set "
    "WUDAO_EVAL__FID_WEIGHTS_URI=/path/or/s3-uri (or fid_weights_uri under [eval] in wudao.toml); "
    "nothing is downloaded at run time"
)

Generate = Callable[[list[str], list[int]], np.ndarray]
"""(captions, image ids) -> generated images (B, H, W, 3) uint8, one per caption."""


@dataclass(frozen=True)
class FIDConfig:
    n: int
    resolution: int
    real_set: Literal["captions", "split"] = "captions"
    split: str | None = None
    blur_sigmas: tuple[float, ...] = ()
    seed: int = 0
    batch_size: int = 32
    grid: int = 8
    max_pixels: int = 50_000_000


# ---- weights ----


def resolve_weights(uri: str | None, cache_dir: Path, open_uri: Callable[[str], ObjectStore]) -> Path:
    """The local weights file for `uri` (an s3:// object is copied once under `cache_dir/fid`)."""
    if not uri:
        raise FIDError(f"no Inception weights configured for FID: {_HOW}")
    if not uri.startswith("s3://"):
        path = Path(uri).expanduser()
        if not path.is_file():
            raise FIDError(f"FID weights file {uri} does not exist: {_HOW}")
        return path
    parent, _, name = uri.rpartition("/")
    local = cache_dir / "fid" / f"{hashlib.sha256(uri.encode()).hexdigest()[:12]}-{name}"
    if not local.is_file():
        try:
            open_uri(parent).get_file(name, local)
        except StorageError as e:
            raise FIDError(f"cannot read FID weights {uri} ({e}): {_HOW}") from e
    return local


def weights_info(path: Path) -> tuple[str, str | None]:
    """(sha256 of the file, a plain warning when it holds the random TEST-ONLY weights, else None)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        marker = getattr(state, "_metadata", {}).get(TEST_MARKER)
    except Exception:  # legacy or foreign pickles: not ours, so not test weights; loading them is checked later
        marker = None
    note = None
    if marker is not None:
        note = (
            f"FID/KID ran with random TEST-ONLY Inception weights ({path.name}, seed {marker.get('seed')}): "
            f"the numbers only compare runs with these same weights, never published FIDs; {_HOW}"
        )
    return sha256_file(path), note


def write_random_inception_weights(path: Path, seed: int = 0) -> Path:
    """A randomly initialised torch-fidelity Inception-v3 state dict (fp16, ~48 MB) marked as TEST-ONLY.

    For tests and the demo, where the standard file cannot be downloaded. Convolutions get Kaiming-normal weights
    (PyTorch's default init shrinks activations ~1e-8 through the net, which would make every FID about 0)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        net = _unloaded(FeatureExtractorInceptionV3, [str(FEATURE_DIM)])  # keeps its fresh init
    for module in net.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=gen)
    full = net.state_dict()
    state = OrderedDict((k, v.half() if v.is_floating_point() else v) for k, v in full.items())  # load casts back
    state._metadata = full._metadata  # type: ignore[attr-defined]
    state._metadata[TEST_MARKER] = {"seed": seed}  # type: ignore[attr-defined]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp_path)
    tmp_path.replace(path)
    return path


def _unloaded(cls: type, features: list[str], **kwargs: Any) -> torch.nn.Module:
    """A torch-fidelity Inception network of class `cls` that has loaded nothing.

    Given a weights path, torch-fidelity unpickles it with `weights_only=False`, so a crafted file runs code. We
    hand it a placeholder (an empty dict we write ourselves, so it never reaches for its download URL either)
    and skip that load; the caller loads a state dict read with `weights_only=True`."""

    class Unloaded(cls):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            if not state_dict:  # torch-fidelity's own call, with the placeholder
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    with tempfile.TemporaryDirectory(prefix="wudao-fid-") as tmp:
        placeholder = Path(tmp) / "placeholder.pth"
        torch.save({}, placeholder)
        return Unloaded(
            name="inception-v3-compat",
            features_list=features,
            feature_extractor_weights_path=str(placeholder),
            **kwargs,
        )


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


class InceptionFeatures:
    """2048-d pool3 features of uint8 images: torchmetrics' `NoTrainInceptionV3` (torch-fidelity's network), built
    as `FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=…, antialias=False)` builds it, but
    with the weights read by `torch.load(weights_only=True)`: a file that is not a plain state dict is refused."""

    def __init__(self, weights: Path, batch_size: int = 32):
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            first = _first_line(e)
            raise FIDError(
                f"{weights} is not a plain Inception-v3 state dict (refused by torch.load(weights_only=True): "
                f"{first}): {_HOW}"
            ) from e
        try:
            self.net = _unloaded(NoTrainInceptionV3, [str(FEATURE_DIM)], antialias=False)
            if not isinstance(state, dict) or not state:
                raise ValueError(f"it holds a {type(state).__name__}, not a state dict")
            self.net.load_state_dict(state)
        except Exception as e:
            first = _first_line(e)
            raise FIDError(f"{weights} is not an Inception-v3 state dict for torch-fidelity ({first}): {_HOW}") from e
        self.net.to(torch.float32).requires_grad_(False).eval()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net.to(self.device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images_NHWC: np.ndarray) -> np.ndarray:
        feats: list[np.ndarray] = []
        for start in range(0, len(images_NHWC), self.batch_size):
            x_NCHW = torch.from_numpy(images_NHWC[start : start + self.batch_size]).permute(0, 3, 1, 2).contiguous()
            feats.append(self.net(x_NCHW.to(self.device)).float().cpu().numpy())
        return np.concatenate(feats) if feats else np.zeros((0, FEATURE_DIM), np.float32)


# ---- metrics ----


@dataclass
class GaussianStats:
    mu_D: np.ndarray
    sigma_DD: np.ndarray
    n: int

    @classmethod
    def of(cls, feats_ND: np.ndarray) -> GaussianStats:
        feats_ND = np.asarray(feats_ND, np.float64)  # float64: FID is a small difference of large traces
        return cls(feats_ND.mean(0), np.cov(feats_ND, rowvar=False), len(feats_ND))


class _Precomputed(torch.nn.Module):
    """The 'feature extractor' that lets torchmetrics' FID consume features extracted once (for FID, KID, cache)."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, feats_ND: torch.Tensor) -> torch.Tensor:
        return feats_ND


def frechet_distance(real: GaussianStats, fake_ND: np.ndarray) -> float:
    """torchmetrics' FID between cached real statistics and generated features, all in float64."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_Precomputed(len(real.mu_D)), reset_real_features=False)
    # The metric keeps sums; restore them from the cached mean and covariance (its compute() inverts this).
    metric.real_features_sum = torch.from_numpy(real.mu_D * real.n)
    metric.real_features_cov_sum = torch.from_numpy(
        real.sigma_DD * (real.n - 1) + real.n * np.outer(real.mu_D, real.mu_D)
    )
    metric.real_features_num_samples = torch.tensor(real.n)
    metric.update(torch.from_numpy(np.asarray(fake_ND, np.float64)), real=False)
    return float(metric.compute())


def kernel_distance(real_ND: np.ndarray, fake_ND: np.ndarray, seed: int) -> tuple[float, float, int]:
    """torch-fidelity's KID (mean, std over subsets) and the subset size used, seeded so reruns agree."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = min(KID_SUBSET_SIZE, len(real_ND), len(fake_ND))
    out = kid_features_to_metric(
        torch.from_numpy(real_ND),
        torch.from_numpy(fake_ND),
        kid_subsets=KID_SUBSETS,
        kid_subset_size=size,
        rng_seed=seed,
        verbose=False,
    )
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD], size


def gaussian_blur(images_NHWC: np.ndarray, sigma: float) -> np.ndarray:
    from PIL import ImageFilter

    return np.stack(
        [np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(radius=sigma))) for im in images_NHWC]
    )


class _FeatureSets:
    """Features of one image set: plain (FID, KID) and one set per blur radius (FID-k)."""

    def __init__(self, extractor: InceptionFeatures, sigmas: tuple[float, ...]):
        self.extractor, self.parts = extractor, {s: [] for s in (0.0, *sigmas)}

    def add(self, images_NHWC: np.ndarray) -> None:
        for sigma, parts in self.parts.items():
            parts.append(self.extractor(gaussian_blur(images_NHWC, sigma) if sigma else images_NHWC))

    def get(self, sigma: float = 0.0) -> np.ndarray:
        return np.concatenate(self.parts[sigma]) if self.parts[sigma] else np.zeros((0, FEATURE_DIM), np.float32)


# ---- evaluation ----


def reference_key(index: CocoIndex, cfg: FIDConfig, weights_sha: str) -> str:
    parts = {
        "dataset": index.digest,
        "split": index.split,
        "n": cfg.n,
        "resolution": cfg.resolution,
        "weights": weights_sha,
        "real_set": cfg.real_set,
        "seed": cfg.seed,
        "blur": sorted(cfg.blur_sigmas),
        "max_pixels": cfg.max_pixels,
        "version": _CACHE_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _reference(
    coco: ObjectStore, index: CocoIndex, extractor: InceptionFeatures, cfg: FIDConfig, out: ObjectStore, prefix: str
) -> tuple[dict[str, Any], dict[str, np.ndarray], bool]:
    """(meta, arrays, cached): the real side from the cache, or computed by walking the seeded caption order."""
    meta = out.read_manifest(prefix)
    if meta is not None:
        with np.load(io.BytesIO(out.get_bytes(join_key(prefix, "stats.npz")))) as z:
            return meta, dict(z), True
    order = caption_order(index, cfg.seed)
    limit = len(order) if cfg.real_set == "split" else cfg.n
    taken: list[tuple[int, str]] = []
    skipped: Counter[str] = Counter()
    feats = _FeatureSets(extractor, cfg.blur_sigmas)
    pos = 0
    while pos < len(order) and len(taken) < limit:
        batch = order[pos : pos + min(cfg.batch_size, limit - len(taken))]
        pos += len(batch)
        images = read_real(coco, index, [i for i, _ in batch], cfg.resolution, cfg.max_pixels)
        skipped.update(im for im in images if isinstance(im, str))  # counted and skipped, never fatal
        usable = [(pair, im) for pair, im in zip(batch, images) if not isinstance(im, str)]
        if usable:
            taken += [pair for pair, _ in usable]
            feats.add(np.stack([im for _, im in usable]))
    if len(taken) < 2:
        raise FIDError(f"{coco.uri}: fewer than 2 readable images in {index.split} (skipped: {dict(skipped)})")
    arrays: dict[str, np.ndarray] = {"features": feats.get()}  # float32, for KID's subsets
    for sigma in (0.0, *cfg.blur_sigmas):
        stats = GaussianStats.of(feats.get(sigma))
        suffix = f"_blur_{sigma:g}" if sigma else ""
        arrays[f"mu{suffix}"], arrays[f"sigma{suffix}"] = stats.mu_D, stats.sigma_DD
    meta = {"captions": taken[: cfg.n], "n_real": len(taken), "skipped": dict(skipped), "split": index.split}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    out.put_bytes(join_key(prefix, "stats.npz"), buf.getvalue())
    out.commit(prefix, meta)  # manifest last: a half-written entry is never a cache hit
    return meta, arrays, False


def evaluate_fid(
    coco: ObjectStore, out: ObjectStore, out_prefix: str, weights: Path, generate: Generate, cfg: FIDConfig
) -> tuple[dict[str, Any], Image.Image]:
    """FID, KID (and FID-k) of `generate` on the captions of `coco`; generated PNGs, the sample grid and the report
    go under `out_prefix` in `out`. Returns the report and the grid image."""
    started = time.perf_counter()
    index = load_coco(coco, cfg.split)
    weights_sha, note = weights_info(weights)
    extractor = InceptionFeatures(weights, cfg.batch_size)
    key = reference_key(index, cfg, weights_sha)
    meta, arrays, cached = _reference(coco, index, extractor, cfg, out, join_key(REFERENCE_PREFIX, key))
    t_reference = time.perf_counter() - started

    captions = [(int(i), str(c)) for i, c in meta["captions"]]
    fake = _FeatureSets(extractor, cfg.blur_sigmas)
    grid_fake: list[np.ndarray] = []
    for start in range(0, len(captions), cfg.batch_size):
        chunk = captions[start : start + cfg.batch_size]
        images = _to_size(generate([c for _, c in chunk], [i for i, _ in chunk]), cfg.resolution)
        for (image_id, _), im in zip(chunk, images):
            out.put_bytes(join_key(out_prefix, "generated", f"{image_id:012d}.png"), png_bytes(im))
        fake.add(images)
        grid_fake += list(images[: cfg.grid - len(grid_fake)])
    t_generate = time.perf_counter() - started - t_reference

    n_real = int(meta["n_real"])
    fid = frechet_distance(GaussianStats(arrays["mu"], arrays["sigma"], n_real), fake.get())
    kid_mean, kid_std, subset = kernel_distance(arrays["features"], fake.get(), cfg.seed)
    shown = captions[: cfg.grid]
    real_shown = read_real(coco, index, [i for i, _ in shown], cfg.resolution, cfg.max_pixels)
    grid = sample_grid([c for _, c in shown], grid_fake, [None if isinstance(r, str) else r for r in real_shown])
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    out.put_bytes(join_key(out_prefix, "samples.png"), buf.getvalue())
    out.put_json(join_key(out_prefix, "samples.json"), [{"image_id": i, "caption": c} for i, c in shown])

    report: dict[str, Any] = {
        "fid": fid,
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "n_requested": cfg.n,
        "n_images": len(captions),
        "n_real": n_real,
        "n_skipped": sum(meta["skipped"].values()),
        "skipped": meta["skipped"],
        "reference_cached": cached,
        "reference_key": key,
        "split": index.split,
        "real_set": cfg.real_set,
        "resolution": cfg.resolution,
        "seed": cfg.seed,
        "kid_subsets": KID_SUBSETS,
        "kid_subset_size": subset,
        "weights_sha256": weights_sha,
        "generated_uri": out.url(join_key(out_prefix, "generated")),
        "samples_uri": out.url(join_key(out_prefix, "samples.png")),
    }
    if cfg.blur_sigmas:
        blurred = {
            s: GaussianStats(arrays[f"mu_blur_{s:g}"], arrays[f"sigma_blur_{s:g}"], n_real) for s in cfg.blur_sigmas
        }
        report["fid_blur"] = {f"{s:g}": frechet_distance(stats, fake.get(s)) for s, stats in blurred.items()}
    if len(captions) < FULL_RANK_N:
        report["warning"] = (
            f"N={len(captions)} < {FULL_RANK_N}: the feature covariance is rank-deficient and FID is "
            "biased upward at small N; compare only FIDs with the same N (KID is unbiased)"
        )
    if note:
        report["weights_note"] = note
    report["seconds"] = {
        "reference": round(t_reference, 2),
        "generate": round(t_generate, 2),
        "total": round(time.perf_counter() - started, 2),
    }
    out.put_json(join_key(out_prefix, "report.json"), report)
    return report, grid


def _to_size(images_NHWC: np.ndarray, size: int) -> np.ndarray:
    if images_NHWC.shape[1:3] == (size, size):
        return images_NHWC
    return np.stack(
        [np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC)) for im in images_NHWC]
    )
