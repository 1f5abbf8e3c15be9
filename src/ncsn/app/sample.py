"""The sampling application behind ``sample.py``: a checkpoint in, images / arrays / metrics out.

Modes (``mode=``):

* ``generate``   — ``samples.png`` (grid), ``samples.npz`` (uint8 N×H×W×C, as FID tools expect) and,
  with ``save_individual=true``, one PNG per image in ``images/``;
* ``trajectory`` — the intermediate samples of the sampler across levels (paper Fig. 5), one PNG
  strip per sample (``trajectory_XX.png``) and optionally a GIF, recorded through the sampler's callback;
* ``inpaint``    — occlude validation images (right half, centre square or random mask), complete them
  with the sampler's inpainting (paper Fig. 6 with ald): ``inpainting.png`` with rows
  occluded | completions | original;
* ``nn``         — for a few samples, the nearest training images in L2 (``nearest_neighbours.png``);
* ``fid``        — FID and Inception Score against the run's validation split (``metrics.json``).

Everything a run needs comes from the checkpoint (``ncsn_config``: network, σ list, sampler settings,
data). ``sampler=ald|pc|cas`` switches the sampler on any checkpoint (that group's defaults replace the
checkpoint's sampler settings); field overrides (``sampler.n_steps_each=…``, ``sampler.snr=…``) apply after.
Every mode writes ``sampler.json``: the settings used and the network evaluations per sample (NFE).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torchvision.utils import save_image
from tqdm.auto import tqdm

from ncsn.app.callbacks import image_grid, scatter_image
from ncsn.app.checkpoints import load_checkpoint, trust_flag
from ncsn.app.common import instantiate
from ncsn.app.module import ScoreModel
from ncsn.devices import pick_device
from ncsn.errors import CheckpointError, ConfigError
from ncsn.samplers import describe_sampler, inpaint

log = logging.getLogger("ncsn")

MODES = ("generate", "trajectory", "inpaint", "nn", "fid")
MASKS = ("right_half", "centre_square", "random")


# ---------------------------------------------------------------------------------------------- loading
def load_model(ckpt_path: str | Path, *, use_ema: bool = True, device: str | torch.device = "cpu",
               trust: bool = False) -> tuple[ScoreModel, DictConfig]:
    """Rebuild the trained module from a checkpoint alone; returns it (eval mode) and the run config.
    ``trust``: the user's ``trust_checkpoint`` (see :func:`ncsn.app.checkpoints.read_torch_file`)."""
    ckpt = load_checkpoint(ckpt_path, trust=trust)
    run_cfg = OmegaConf.create(ckpt["ncsn_config"])
    model = instantiate(run_cfg.model)
    state = ckpt["state_dict"]
    if not use_ema and "current_model_state" in ckpt:
        state = ckpt["current_model_state"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint '{ckpt_path}' does not match the model its config describes ({str(exc).splitlines()[0]})"
        ) from exc
    return model.to(device).eval(), run_cfg


# ---------------------------------------------------------------------------------------------- writing
def to_uint8_hwc(samples: torch.Tensor) -> np.ndarray:
    """Model-range images [N, C, H, W] → uint8 array [N, H, W, C]."""
    from ncsn.data.transforms import to_uint8

    return np.ascontiguousarray(to_uint8(samples.detach().cpu()))


def save_png(tensor: torch.Tensor, path: Path) -> Path:
    """Write a [C, H, W] image in [0, 1] atomically (a temporary file renamed into place)."""
    tmp = path.with_name(path.name + ".part")
    save_image(tensor, tmp, format="png")
    os.replace(tmp, path)
    return path


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)
    return path


def grid_of(samples: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    return scatter_image(samples) if samples.ndim == 2 else image_grid(samples, nrow)


# ---------------------------------------------------------------------------------------------- modes
def generate(model: ScoreModel, num: int, batch_size: int, seed: int, overrides: dict, *,
             progress: bool = True) -> torch.Tensor:
    """``num`` samples in batches, from one seeded generator (same seed → same samples)."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    chunks = []
    bar = tqdm(total=num, desc="sampling", unit="img", disable=not progress)
    for start in range(0, num, batch_size):
        n = min(batch_size, num - start)
        chunks.append(model.sample(n, generator=generator, progress=progress, **overrides).cpu())
        bar.update(n)
    bar.close()
    return torch.cat(chunks)


def run_generate(model, cfg, out: Path, overrides: dict) -> dict:
    samples = generate(model, cfg.num_samples, cfg.batch_size, cfg.seed, overrides, progress=cfg.progress)
    files = {"grid": save_png(grid_of(samples[: cfg.grid_max], cfg.get("nrow")), out / "samples.png")}
    if samples.ndim == 4:
        files["array"] = save_npz(out / "samples.npz", samples=to_uint8_hwc(samples))
        if cfg.save_individual:
            img_dir = out / "images"
            img_dir.mkdir(exist_ok=True)
            for i, img in enumerate(samples):
                save_png(grid_of(img[None], 1), img_dir / f"{i:06d}.png")
    else:
        files["array"] = save_npz(out / "samples.npz", samples=samples.numpy())
    return files


def run_trajectory(model, cfg, out: Path, overrides: dict) -> dict:
    """Record every ``trajectory.every``-th step of the sampler for ``trajectory.num`` samples."""
    every = int(cfg.trajectory.every)
    frames: list[torch.Tensor] = []
    steps = 0

    def record(state: dict) -> None:
        nonlocal steps
        steps += 1
        if steps % every == 0:
            frames.append(state["x"].detach().clamp(0, 1).cpu())

    generator = torch.Generator(device=model.device).manual_seed(cfg.seed)
    x0 = model.initial_samples(int(cfg.trajectory.num), generator, model.sampling_settings(**overrides))
    frames.append(x0.clamp(0, 1).cpu())
    final = model.sample(int(cfg.trajectory.num), generator=generator, callback=record, x_init=x0,
                         progress=cfg.progress, **overrides).cpu()
    if not torch.equal(final.clamp(0, 1), frames[-1]):  # the denoising step adds a last frame
        frames.append(final.clamp(0, 1))
    stacked = torch.stack(frames, dim=1)  # [N, frames, C, H, W]
    files = {}
    for i, seq in enumerate(stacked):
        files[f"strip_{i}"] = save_png(image_grid(seq, nrow=seq.shape[0]), out / f"trajectory_{i:02d}.png")
        if cfg.trajectory.gif:
            pics = [Image.fromarray(to_uint8_hwc(f[None])[0].squeeze(-1) if f.shape[0] == 1
                                    else to_uint8_hwc(f[None])[0]) for f in seq]
            gif = out / f"trajectory_{i:02d}.gif"
            pics[0].save(gif, save_all=True, append_images=pics[1:], duration=60, loop=0)
            files[f"gif_{i}"] = gif
    return files


def make_mask(kind: str, shape: tuple[int, ...], *, square: int = 0, keep: float = 0.5,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """A [1 or N, 1, H, W] mask, 1 where pixels are known."""
    n, _, h, w = shape
    mask = torch.ones(1, 1, h, w)
    if kind == "right_half":
        mask[..., w // 2:] = 0
    elif kind == "centre_square":
        s = square or h // 2
        top, left = (h - s) // 2, (w - s) // 2
        mask[..., top:top + s, left:left + s] = 0
    elif kind == "random":
        mask = (torch.rand(n, 1, h, w, generator=generator) < keep).float()
    else:
        raise ConfigError(f"unknown inpaint.mask '{kind}'; choose one of {', '.join(MASKS)}")
    return mask


def _datamodule(run_cfg: DictConfig, cfg: DictConfig):
    data_cfg = run_cfg.data
    if cfg.get("data_dir"):
        data_cfg = OmegaConf.merge(data_cfg, {"data_dir": cfg.data_dir})
    dm = instantiate(data_cfg)
    dm.setup("fit")
    return dm


def _first_images(loader, n: int, setting: str) -> torch.Tensor:
    out, count = [], 0
    for batch in loader:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        out.append(x)
        count += x.shape[0]
        if count >= n:
            break
    images = torch.cat(out)[:n]
    if images.shape[0] < n:
        raise ConfigError(f"{setting}={n} asks for more images than the data's validation split has "
                          f"({images.shape[0]}); set {setting}={images.shape[0]} or fewer")
    return images


def run_inpaint(model, cfg, out: Path, overrides: dict, run_cfg: DictConfig) -> dict:
    settings = model.sampling_settings(**overrides)
    dm = _datamodule(run_cfg, cfg)
    n, k = int(cfg.inpaint.num), int(cfg.inpaint.num_completions)
    images = _first_images(dm.val_dataloader(), n, "inpaint.num").to(model.device)
    generator = torch.Generator(device=model.device).manual_seed(cfg.seed)
    mask = make_mask(cfg.inpaint.mask, tuple(images.shape), square=int(cfg.inpaint.square),
                     generator=torch.Generator().manual_seed(cfg.seed)).to(model.device)
    known = images.repeat_interleave(k, dim=0)
    full_mask = mask.repeat_interleave(k, dim=0) if mask.shape[0] > 1 else mask
    x_init = model.initial_samples(known.shape[0], generator, settings)
    completions = inpaint(model.score_fn, known, full_mask, model.sigmas, settings, x_init=x_init,
                          generator=generator, progress=cfg.progress,
                          snap=model.snap_sigma).view(n, k, *images.shape[1:])
    occluded = images * mask + (1 - mask) * 0.5
    rows = torch.cat([occluded[:, None], completions, images[:, None]], dim=1)  # [n, k + 2, C, H, W]
    grid = image_grid(rows.flatten(0, 1).cpu(), nrow=k + 2)
    return {"grid": save_png(grid, out / "inpainting.png"),
            "array": save_npz(out / "inpainting.npz", completions=to_uint8_hwc(completions.flatten(0, 1)),
                              originals=to_uint8_hwc(images), mask=mask.cpu().numpy())}


def nearest_neighbours(queries: torch.Tensor, loader, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest (L2) images of ``loader`` for each query; returns (distances [Q, k], images [Q, k, ...])."""
    best_d = torch.full((queries.shape[0], k), float("inf"))
    best_x = torch.zeros(queries.shape[0], k, *queries.shape[1:])
    q = queries.flatten(1).cpu()
    for batch in loader:
        x = (batch[0] if isinstance(batch, (list, tuple)) else batch).cpu()
        d = torch.cdist(q, x.flatten(1))
        all_d = torch.cat([best_d, d], dim=1)
        all_x = torch.cat([best_x, x[None].expand(q.shape[0], *x.shape)], dim=1)
        best_d, idx = all_d.topk(k, dim=1, largest=False)
        best_x = torch.gather(all_x, 1, idx.view(*idx.shape, *([1] * (all_x.ndim - 2))).expand(-1, -1, *x.shape[1:]))
    return best_d, best_x


def run_nn(model, cfg, out: Path, overrides: dict, run_cfg: DictConfig) -> dict:
    dm = _datamodule(run_cfg, cfg)
    samples = generate(model, int(cfg.nn.num), cfg.batch_size, cfg.seed, overrides, progress=cfg.progress)
    dist, neigh = nearest_neighbours(samples.clamp(0, 1), dm.train_dataloader(), int(cfg.nn.k))
    rows = torch.cat([samples.clamp(0, 1)[:, None], neigh], dim=1)
    grid = image_grid(rows.flatten(0, 1), nrow=int(cfg.nn.k) + 1)
    (out / "nearest_neighbours.json").write_text(json.dumps({"l2_distances": dist.tolist()}, indent=2))
    return {"grid": save_png(grid, out / "nearest_neighbours.png")}


def run_fid(model, cfg, out: Path, overrides: dict, run_cfg: DictConfig) -> dict:
    from ncsn.metrics import compute_image_metrics, feature_from_config

    dm = _datamodule(run_cfg, cfg)
    real = _first_images(dm.val_dataloader(), int(cfg.fid.num_real), "fid.num_real")  # before the long sampling
    samples = generate(model, cfg.num_samples, cfg.batch_size, cfg.seed, overrides, progress=cfg.progress)
    feature = feature_from_config(cfg.fid)
    result = compute_image_metrics(real, samples.clamp(0, 1), feature=feature, batch_size=cfg.batch_size,
                                   device=model.device, inception_score=bool(cfg.fid.inception_score),
                                   inception_weights=cfg.fid.get("inception_weights"),
                                   allow_download=bool(cfg.fid.get("allow_download", False)))
    result["settings"] = {"ckpt_path": str(cfg.ckpt_path), "sampler": model.sampling_settings(**overrides),
                          "num_samples": int(cfg.num_samples), "num_real": int(cfg.fid.num_real),
                          "seed": int(cfg.seed), "use_ema": bool(cfg.use_ema),
                          "note": "papers report FID on 50,000 samples; smaller counts bias FID upward"}
    path = out / "metrics.json"
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    log.info("FID %.3f  IS %s", result["fid"], result.get("is_mean"))
    return {"metrics": path}


# ---------------------------------------------------------------------------------------------- entry
#: the counts sample.py reads, with their least value (the mode that reads them; None: every mode)
COUNTS = {"num_samples": (1, None), "batch_size": (1, None), "grid_max": (1, None), "nrow": (1, None),
          "trajectory.num": (1, "trajectory"), "trajectory.every": (1, "trajectory"),
          "inpaint.num": (1, "inpaint"), "inpaint.num_completions": (1, "inpaint"), "inpaint.square": (0, "inpaint"),
          "nn.num": (1, "nn"), "nn.k": (1, "nn"), "fid.num_real": (2, "fid")}
SWITCHES = ("use_ema", "progress", "save_individual", "trajectory.gif", "fid.inception_score",
            "fid.allow_download")


def check_sample_config(cfg: DictConfig) -> None:
    """Every setting sample.py reads, checked before anything is loaded or written (one line each)."""
    if cfg.mode not in MODES:
        raise ConfigError(f"unknown mode '{cfg.mode}'; choose one of {', '.join(MODES)}")
    if cfg.mode == "inpaint":
        make_mask(cfg.inpaint.mask, (1, 1, 2, 2))  # an unknown mask: one line now
    for key, (least, mode) in COUNTS.items():
        value = OmegaConf.select(cfg, key)
        if value is None or (mode is not None and cfg.mode != mode):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{key} must be a whole number >= {least} (got {value!r})")
    for key in SWITCHES:
        value = OmegaConf.select(cfg, key)
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false (got {value!r})")
    seed = cfg.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"seed must be a whole number or null (got {seed!r})")
    if cfg.get("data_dir") and not Path(str(cfg.data_dir)).is_dir():
        raise ConfigError(f"data_dir '{cfg.data_dir}' is not a directory; pass the dir that holds the run's data "
                          "(or leave data_dir unset for the run's own)")
    if not cfg.get("ckpt_path"):
        raise CheckpointError("no checkpoint given; pass ckpt_path=<run dir>/checkpoints/last.ckpt")


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Run one ``sample.py`` invocation; returns the files written."""
    check_sample_config(cfg)
    device = pick_device(str(cfg.device))
    if cfg.seed is not None:
        torch.manual_seed(int(cfg.seed))
    model, run_cfg = load_model(cfg.ckpt_path, use_ema=bool(cfg.use_ema), device=device,
                                trust=trust_flag(cfg.get("trust_checkpoint", False)))
    overrides = {k: v for k, v in OmegaConf.to_container(cfg.sampler, resolve=True).items() if v is not None}
    settings = model.sampling_settings(**overrides)
    plan = model.sampling_plan(settings)  # bad settings: one clear error before anything is written
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log.info("Sampling (%s) from %s into %s on %s", cfg.mode, cfg.ckpt_path, out.resolve(), device)
    log.info("sampler %s: %d network evaluations per sample (NFE)", describe_sampler(settings), plan.nfe)
    if cfg.mode == "generate":
        files = run_generate(model, cfg, out, overrides)
    elif cfg.mode == "trajectory":
        files = run_trajectory(model, cfg, out, overrides)
    elif cfg.mode == "inpaint":
        files = run_inpaint(model, cfg, out, overrides, run_cfg)
    elif cfg.mode == "nn":
        files = run_nn(model, cfg, out, overrides, run_cfg)
    else:
        files = run_fid(model, cfg, out, overrides, run_cfg)
    record = {"sampler": settings, "nfe": plan.nfe, "num_levels": model.num_scales}
    (out / "sampler.json").write_text(json.dumps(record, indent=2) + "\n")  # last: a failed run leaves none
    files["sampler"] = out / "sampler.json"
    for name, path in files.items():
        log.info("wrote %s: %s", name, path)
    return {k: str(v) for k, v in files.items()}
