"""The threshold file: one safetensors file per model, and the lookup from (sparsity, mode) to thresholds.

Tensors (L layers, Q quantile levels, the 4 sites and 7 projections in sparse.PROJECTIONS order):
  levels               [Q]        quantile levels, 0 to 0.99 in steps of 0.001
  site_quantiles       [L, 4, Q]  quantiles of |x| at attn_in (q,k,v), attn_out (o), mlp_in (gate,up), mlp_mid (down)
  score_quantiles      [L, 7, Q]  quantiles of |x_i| * ||W_p[:, i]||_2, the weight-aware score of each projection
  greedy_targets       [S]        block sparsity targets of the greedy path (optional)
  greedy_sparsities    [S, L, 7]  per-projection sparsity the block-wise greedy search gives for each target
  block_kl             [L, A]     KL(dense || sparse) of the model's next-token distributions with only block b
                                  sparse, at its greedy split for block sparsity allocation_levels[a] (optional)
  allocation_levels    [A]        block sparsities at which block_kl was measured
  allocated_sparsities [S, L, 7]  per-projection sparsity for each model-wide target when the blocks' own
                                  sparsities are allocated from block_kl (mode "allocated")
  held_targets         [H]        targets of the sequential ("held") calibration (optional)
  held_<mode>          [H, L, 7]  thresholds calibrated with earlier layers already sparse, per mode
                                  (weight-aware: in score units; divided by ||W_p[:, i]|| at load)
  cats_quantiles       [L, Q]     quantiles of |SiLU(x W_gate^T)| in each MLP, for mode "cats" (optional)
  held_cats            [H, L]     CATS thresholds calibrated with earlier MLPs already CATS-sparse
Metadata (strings): format, model, config_hash, provenance (JSON: data, tokens, seq_len, date, command).

A user's calibration lives in the checkpoint's folder (CALIBRATION_NAME), where generate.py and the benchmarks look
first; the files in this package are the shipped calibrations of named models.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model import ModelArgs, checkpoint_folder, config_hash
from sparse import LAYER_GROUPS, PROJECTIONS, cats_layers, column_norms, set_cats_thresholds, sparse_layers

FORMAT = "teal-thresholds/1"
SITES = ("attn_in", "attn_out", "mlp_in", "mlp_mid")
SITE_OF = {"q": 0, "k": 0, "v": 0, "o": 1, "gate": 2, "up": 2, "down": 3}
MODES = ("uniform", "greedy", "weight-aware", "allocated", "cats")
MAX_SPARSITY = 0.99
CALIBRATION_NAME = "thresholds.safetensors"  # a calibration's file name in its checkpoint's folder
SHIPPED = Path(__file__).resolve().parent
TABLES = {"levels", "site_quantiles", "score_quantiles", "greedy_targets", "greedy_sparsities", "block_kl",
          "allocation_levels", "allocated_sparsities", "held_targets", "cats_quantiles", *(f"held_{m}" for m in MODES)}


def user_calibration(checkpoint_path: Path) -> Path:
    """Where `python -m thresholds.calibrate` writes a checkpoint's thresholds unless told otherwise: in its folder."""
    return checkpoint_folder(checkpoint_path) / CALIBRATION_NAME


def default_thresholds(checkpoint_path: Path, model_name: str) -> Path:
    """The checkpoint's own calibration if it has one, else the shipped file of its model name."""
    own = user_calibration(checkpoint_path)
    return own if own.exists() else SHIPPED / f"{model_name}.safetensors"


@dataclass
class ThresholdFile:
    model: str
    config_hash: str
    levels: torch.Tensor
    site_quantiles: torch.Tensor
    score_quantiles: torch.Tensor | None = None
    greedy_targets: torch.Tensor | None = None
    greedy_sparsities: torch.Tensor | None = None
    block_kl: torch.Tensor | None = None
    allocation_levels: torch.Tensor | None = None
    allocated_sparsities: torch.Tensor | None = None
    held_targets: torch.Tensor | None = None
    cats_quantiles: torch.Tensor | None = None
    held: dict = field(default_factory=dict)  # mode -> [H, L, 7] (cats: [H, L])
    provenance: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        tensors = {"levels": self.levels, "site_quantiles": self.site_quantiles}
        for name in ("score_quantiles", "greedy_targets", "greedy_sparsities", "block_kl", "allocation_levels",
                     "allocated_sparsities", "held_targets", "cats_quantiles"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        tensors.update({f"held_{m}": t for m, t in self.held.items()})
        meta = {"format": FORMAT, "model": self.model, "config_hash": self.config_hash,
                "provenance": json.dumps(self.provenance)}
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, args: ModelArgs | None = None) -> "ThresholdFile":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no threshold file {path}; make one with `python -m thresholds.calibrate "
                                    f"--checkpoint_path CKPT --out {path}`")
        try:
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path} is not a readable threshold file ({e})") from e
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        check_tables(tensors, meta, path)
        tf = cls(model=meta["model"], config_hash=meta["config_hash"], levels=tensors["levels"],
                 site_quantiles=tensors["site_quantiles"], score_quantiles=tensors.get("score_quantiles"),
                 greedy_targets=tensors.get("greedy_targets"), greedy_sparsities=tensors.get("greedy_sparsities"),
                 block_kl=tensors.get("block_kl"), allocation_levels=tensors.get("allocation_levels"),
                 allocated_sparsities=tensors.get("allocated_sparsities"),
                 held_targets=tensors.get("held_targets"), cats_quantiles=tensors.get("cats_quantiles"),
                 held={m: tensors[f"held_{m}"] for m in MODES if f"held_{m}" in tensors},
                 provenance=json.loads(meta.get("provenance", "{}")))
        if args is not None:
            tf.check_model(args, path)
        return tf

    def check_model(self, args: ModelArgs, path="threshold file") -> None:
        if self.config_hash != config_hash(args):
            raise ValueError(f"{path} was calibrated for model {self.model!r} (config {self.config_hash}), not for this "
                             f"{args.name!r} (config {config_hash(args)}); calibrate with `python -m thresholds.calibrate`")
        if self.site_quantiles.shape[0] != args.n_layer:
            raise ValueError(f"{path} has {self.site_quantiles.shape[0]} layers, the model {args.n_layer}")

    def modes(self) -> list[str]:
        out = ["uniform"]
        if self.greedy_sparsities is not None:
            out.append("greedy")
        if self.score_quantiles is not None:
            out.append("weight-aware")
        if self.allocated_sparsities is not None:
            out.append("allocated")
        if self.cats_quantiles is not None:
            out.append("cats")
        return out


def check_tables(tensors: dict, meta: dict, path) -> None:
    """Refuse a threshold file whose tables are missing, unknown, not finite, or disagree in shape or range."""
    def bad(name, why):
        raise ValueError(f"{path}: table {name!r} {why}; recalibrate with `python -m thresholds.calibrate`")
    for key in ("model", "config_hash"):
        if key not in meta:
            bad(key, "(metadata) is missing")
    unknown = sorted(set(tensors) - TABLES)
    if unknown:
        bad(unknown[0], f"is not one this code reads (it reads {', '.join(sorted(TABLES))})")
    for name in ("levels", "site_quantiles"):
        if name not in tensors:
            bad(name, "is missing")
    pairs = (("greedy_sparsities", "greedy_targets"), ("allocated_sparsities", "greedy_targets"),
             ("block_kl", "allocation_levels"), ("allocation_levels", "block_kl"),
             *((f"held_{m}", "held_targets") for m in MODES))
    for name, needs in pairs:
        if name in tensors and needs not in tensors:
            bad(needs, f"is missing (the file has {name!r}, which needs it)")
    if "held_targets" in tensors and not any(f"held_{m}" in tensors for m in MODES):
        bad("held_targets", "has no held tables with it")
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            bad(name, "holds NaN or infinite values")
    levels = tensors["levels"]
    q = levels.shape[0] if levels.dim() == 1 else 0
    if q < 2 or float(levels[0]) != 0 or not torch.allclose(levels.diff(), levels.diff()[0].expand(q - 1), atol=1e-6) \
            or float(levels.diff()[0]) <= 0 or float(levels[-1]) > MAX_SPARSITY + 1e-6:
        bad("levels", f"must be evenly spaced quantile levels from 0 up to at most {MAX_SPARSITY}")
    n_layer = tensors["site_quantiles"].shape[0]
    s = tensors["greedy_targets"].shape[0] if "greedy_targets" in tensors else 0
    h = tensors["held_targets"].shape[0] if "held_targets" in tensors else 0
    a = tensors["allocation_levels"].shape[0] if "allocation_levels" in tensors else 0
    shapes = {"site_quantiles": (n_layer, len(SITES), q), "score_quantiles": (n_layer, len(PROJECTIONS), q),
              "greedy_targets": (s,), "greedy_sparsities": (s, n_layer, len(PROJECTIONS)), "block_kl": (n_layer, a),
              "allocation_levels": (a,), "allocated_sparsities": (s, n_layer, len(PROJECTIONS)), "held_targets": (h,),
              "cats_quantiles": (n_layer, q), **{f"held_{m}": (h, n_layer, len(PROJECTIONS)) for m in MODES},
              "held_cats": (h, n_layer)}
    for name, shape in shapes.items():
        if name in tensors and (tuple(tensors[name].shape) != shape or 0 in shape):
            bad(name, f"has shape {tuple(tensors[name].shape)}, expected {shape} "
                      f"({n_layer} layers, {q} levels, {s} greedy / {h} held targets)")
    for name in ("site_quantiles", "score_quantiles", "cats_quantiles", *(f"held_{m}" for m in MODES)):
        if name in tensors and (tensors[name] < 0).any():
            bad(name, "holds negative thresholds")
    for name in ("greedy_targets", "held_targets", "allocation_levels"):
        if name in tensors and (tensors[name].numel() > 1 and (tensors[name].diff() <= 0).any()):
            bad(name, "is not increasing")
    for name in ("greedy_targets", "greedy_sparsities", "allocated_sparsities", "held_targets", "allocation_levels"):
        if name in tensors and ((tensors[name] < 0).any() or (tensors[name] > MAX_SPARSITY + 1e-6).any()):
            bad(name, f"holds sparsities outside [0, {MAX_SPARSITY}]")


def check_sparsity(s: float) -> float:
    if not 0.0 <= s <= MAX_SPARSITY:
        raise ValueError(f"sparsity {s} is outside [0, {MAX_SPARSITY}]")
    return float(s)


def interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of fp (leading dim indexed by the increasing xp) at x."""
    x = torch.as_tensor(x, dtype=torch.float32).clamp(xp[0], xp[-1])
    i = torch.searchsorted(xp, x.reshape(-1), right=True).clamp(1, len(xp) - 1).reshape(x.shape)
    w = (x - xp[i - 1]) / (xp[i] - xp[i - 1])
    return fp[i - 1] * (1 - w) + fp[i] * w


def quantile_lookup(levels: torch.Tensor, table: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """table: [..., Q] quantiles at `levels`; level: broadcastable to table[..., 0]. Returns the value at level."""
    level = torch.as_tensor(level, dtype=torch.float32).clamp(0, float(levels[-1]))
    pos = level / float(levels[1] - levels[0])
    lo = pos.floor().long().clamp(0, len(levels) - 2)
    w = pos - lo
    lo = lo.expand(table.shape[:-1])
    w = w.expand(table.shape[:-1])
    a = table.gather(-1, lo.unsqueeze(-1)).squeeze(-1)
    b = table.gather(-1, (lo + 1).unsqueeze(-1)).squeeze(-1)
    return a * (1 - w) + b * w


def projection_sparsities(tf: ThresholdFile, sparsity: float, mode: str) -> torch.Tensor:
    """[L, 7] per-projection sparsity levels for a model-wide target."""
    n_layer = tf.site_quantiles.shape[0]
    if mode == "allocated":
        return interp(torch.tensor(sparsity), tf.greedy_targets, tf.allocated_sparsities)
    if mode == "uniform" or tf.greedy_sparsities is None:
        return torch.full((n_layer, len(PROJECTIONS)), sparsity)
    return interp(torch.tensor(sparsity), tf.greedy_targets, tf.greedy_sparsities)


def threshold_table(tf: ThresholdFile, sparsity: float, mode: str = "uniform", held: bool = True) -> torch.Tensor:
    """[L, 7] thresholds (weight-aware: in score units) for a target sparsity and mode; for "cats", [L] thresholds
    on |SiLU(x W_gate^T)|, the target being the share of each MLP's intermediate activations dropped.

    Where the file holds sequentially calibrated thresholds covering the target (and `held`), those are used
    (they keep the realised sparsity on target); elsewhere the dense-activation quantiles are, as in TEAL.
    """
    check_sparsity(sparsity)
    if mode not in MODES:
        raise ValueError(f"unknown sparsity mode {mode!r}; choose from {MODES}")
    if mode not in tf.modes():
        raise ValueError(f"this threshold file has no data for mode {mode!r} (it has {tf.modes()}); recalibrate with "
                         "`python -m thresholds.calibrate` (without --no_greedy / --no_allocation)")
    n_layer = tf.site_quantiles.shape[0]
    if sparsity == 0:
        return torch.zeros(n_layer) if mode == "cats" else torch.zeros(n_layer, len(PROJECTIONS))
    if held and mode in tf.held and tf.held_targets[0] <= sparsity <= tf.held_targets[-1]:
        xp = torch.cat([torch.zeros(1), tf.held_targets])
        fp = torch.cat([torch.zeros_like(tf.held[mode][:1]), tf.held[mode]])
        return interp(torch.tensor(sparsity), xp, fp)
    if mode == "cats":
        return quantile_lookup(tf.levels, tf.cats_quantiles, torch.tensor(sparsity))
    levels = projection_sparsities(tf, sparsity, mode)
    if mode == "weight-aware":
        return quantile_lookup(tf.levels, tf.score_quantiles, levels)
    site = torch.tensor([SITE_OF[p] for p in PROJECTIONS])
    return quantile_lookup(tf.levels, tf.site_quantiles[:, site], levels)


def apply_thresholds(model, tf: ThresholdFile, sparsity: float, mode: str = "uniform", held: bool = True) -> torch.Tensor:
    """Load the thresholds for (sparsity, mode) into a sparsified (cats: catsified) model's buffers; returns the
    table ([L, 7], cats [L])."""
    table = threshold_table(tf, sparsity, mode, held)
    if not torch.isfinite(table).all():
        raise ValueError(f"the {mode} thresholds at sparsity {sparsity} are not finite")
    if mode == "cats":
        set_cats_thresholds(model, table)
        return table
    if next(cats_layers(model), None) is not None:
        raise ValueError(f"mode {mode!r} needs a TEAL-sparsified model, this one has CATS MLPs")
    with torch.no_grad():
        for i, path, layer in sparse_layers(model):
            if (mode == "weight-aware") != layer.per_channel:
                raise ValueError(f"mode {mode!r} needs a model sparsified with per_channel={mode == 'weight-aware'}")
            norms = column_norms(layer) if layer.per_channel else None
            for g, proj in enumerate(LAYER_GROUPS[path]):
                t = table[i, PROJECTIONS.index(proj)]
                # Weight-aware: |x_i| * ||W[:, i]|| > t  <=>  |x_i| > t / ||W[:, i]||, a per-channel threshold.
                layer.thresholds[g].copy_(t / norms[g].clamp_min(1e-12) if norms is not None else t)
    return table


def import_reference_histograms(path: Path, args: ModelArgs, levels: torch.Tensor | None = None) -> ThresholdFile:
    """Import the reference TEAL implementation's histograms.pt: {layer: {"mlp/h1", "mlp/h1_centers", "mlp/h2",
    "mlp/h2_centers", "self_attn/h1", ...}}, where for attention h1 feeds q/k/v and h2 feeds o, and for the
    MLP h1 feeds gate/up and h2 feeds down; histograms are over signed activations."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    levels = torch.linspace(0, MAX_SPARSITY, 991) if levels is None else levels
    keys = sorted(data, key=int)
    if len(keys) != args.n_layer:
        raise ValueError(f"{path} has {len(keys)} layers, the model {args.n_layer}")
    table = torch.zeros(args.n_layer, len(SITES), len(levels))
    for li, key in enumerate(keys):
        layer = data[key]
        for si, name in enumerate(("self_attn/h1", "self_attn/h2", "mlp/h1", "mlp/h2")):
            if name not in layer or name + "_centers" not in layer:
                raise ValueError(f"{path}: layer {key} lacks {name} / {name}_centers")
            table[li, si] = histogram_quantiles(layer[name].double(), layer[name + "_centers"].double(), levels)
    return ThresholdFile(model=args.name, config_hash=config_hash(args), levels=levels, site_quantiles=table,
                         provenance={"imported_from": str(path)})


def histogram_quantiles(counts: torch.Tensor, centers: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Quantiles of |x| from a histogram of signed x: fold onto |centers|, sort, interpolate the CDF."""
    mag, order = centers.abs().sort()
    cdf = counts[order].cumsum(0)
    cdf = cdf / cdf[-1]
    idx = torch.searchsorted(cdf, levels.double()).clamp(max=len(mag) - 1)
    return mag[idx].float()
