"""Calibrate TEAL thresholds for a converted checkpoint and write a threshold file.

    python -m thresholds.calibrate                       # default model, calibrated on C4 (allenai/c4, streamed)
    python -m thresholds.calibrate --checkpoint_path checkpoints/X --data text.txt --tokens 20480 --out x.safetensors
    python -m thresholds.calibrate --dataset Salesforce/wikitext:wikitext-2-raw-v1:train   # another HF dataset

The file goes into the checkpoint's folder (thresholds.safetensors), where generate.py and the benchmarks find it
before the shipped thresholds/<model>.safetensors; --out writes elsewhere (also over a shipped file, when asked).

Four stages, each with a progress bar:
1. dense statistics: quantile tables of |x| at the four thresholded inputs of every block, and of the
   weight-aware score |x_i| * ||W_p[:, i]||_2 for each of the seven projections;
2. block-wise greedy allocation (TEAL Algorithm 1) on calibration activations (on by default);
3. allocation across blocks (mode "allocated", beyond TEAL, which gives every block the model-wide target):
   how much each block alone moves the model's next-token distributions (KL from dense) at block sparsity
   0.1 ... 0.9, on --allocation_tokens tokens from the end of the calibration text; then, from all-dense,
   repeatedly raise by 0.005 the block whose KL grows least, recording the path for every model-wide target;
4. held calibration (--held_targets): for each mode and target, one pass in which every layer's thresholds
   are computed from its inputs with all earlier layers already sparse, so the realised sparsity at
   decode matches the target instead of overshooting it.
CATS (mode "cats"): quantiles of |SiLU(x W_gate^T)| in every MLP on dense activations, and its held thresholds at
the same targets (each MLP's threshold from its inputs with the earlier MLPs already CATS-sparse).
"""
import argparse
import datetime
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from cli import add_int4_args, fraction, int4_quant, positive_int, user_errors
from model import config_hash, load_model
from sparse import (LAYER_GROUPS, PROJECTIONS, cats_layers, catsify, column_norms, set_mask_prefill, set_thresholds,
                    sparse_layers, sparsify)
from thresholds.file import (MAX_SPARSITY, SITE_OF, ThresholdFile, interp, projection_sparsities, quantile_lookup,
                             user_calibration)
from tokenizer import load_tokenizer

# Calibration text, as the TEAL paper calibrates: C4 (English), streamed.
DEFAULT_DATASET = "allenai/c4:en:train"
LEVELS = torch.linspace(0, MAX_SPARSITY, 991)  # steps of 0.001
PATH_SITE = {"attention.wqkv": 0, "attention.wo": 1, "feed_forward.w13": 2, "feed_forward.w2": 3}
ALLOCATION_LEVELS = torch.linspace(0, 0.9, 10)  # block sparsities at which each block's KL is measured
MAX_SAMPLES = 4_000_000  # values per quantile table: far more than 0.001 resolution needs


def read_tokens(tokenizer, data: Path | None = None, dataset: str | None = None,
                min_tokens: int | None = None) -> tuple[torch.Tensor, str]:
    """All token ids (no BOS) of a text file, or of a Hugging Face dataset ("name[:config[:split]]", streamed: with
    min_tokens, records are read only until they hold that many tokens), and the source's name."""
    if data is not None:
        path = Path(data)
        if not path.is_file():
            raise SystemExit(f"text file {path} not found; pass an existing --data FILE, or leave --data out to read "
                             f"a Hugging Face dataset (--dataset NAME[:CONFIG[:SPLIT]])")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); pass a text file") from e
        return torch.tensor(tokenizer.encode(text, bos=False)), str(path)
    texts, count = [], 0
    for text in dataset_texts(dataset):
        texts.append(text)
        if min_tokens is not None:
            count += len(tokenizer.encode(text, bos=False))
            if count >= min_tokens:
                break
    return torch.tensor(tokenizer.encode("\n".join(texts), bos=False)), dataset


def dataset_texts(dataset: str):
    """The "text" fields of a Hugging Face dataset "name[:config[:split]]" (default split: train), streamed; a clear
    error naming --data when the `datasets` package or the dataset cannot be reached."""
    offline = ("pass --data FILE to read a local text file instead (offline), or --dataset NAME[:CONFIG[:SPLIT]] "
               "for another Hugging Face dataset")
    try:
        import datasets
    except ImportError:
        raise SystemExit(f"reading the dataset {dataset} needs the `datasets` package (pip install datasets); "
                         + offline) from None
    name, config, split = (dataset.split(":") + [None, None])[:3]
    try:
        for record in datasets.load_dataset(name, config, split=split or "train", streaming=True):
            yield record["text"]
    except Exception as e:  # the hub unreachable, an unknown name or config, a record without "text"
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise SystemExit(f"could not read the Hugging Face dataset {dataset} ({type(e).__name__}: {reason}); "
                         + offline) from None


def add_text_source(parser: argparse.ArgumentParser, what: str, default_dataset: str) -> None:
    """--data FILE or --dataset NAME (default default_dataset), read by read_tokens."""
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--data", type=Path, help=f"{what} as a local text file (offline)")
    src.add_argument("--dataset", default=default_dataset,
                     help=f"{what} from a Hugging Face dataset name[:config[:split]], streamed (needs network and "
                          f"the `datasets` package; default {default_dataset})")


def quantile_table(values: torch.Tensor, levels: torch.Tensor = LEVELS, generator=None) -> torch.Tensor:
    """Quantiles of `values` at `levels` with torch.quantile's linear interpolation (subsampled above MAX_SAMPLES)."""
    v = values.reshape(-1).float()
    if v.numel() > MAX_SAMPLES:
        v = v[torch.randint(v.numel(), (MAX_SAMPLES,), generator=generator, device=v.device)]
    v = v.sort().values
    pos = levels.to(v.device).double() * (v.numel() - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=v.numel() - 1)
    w = (pos - lo).float()
    return (v[lo] * (1 - w) + v[hi] * w).cpu()


def quantile_at(values: torch.Tensor, level: float, generator=None, max_samples: int = 1_000_000) -> float:
    """One quantile, by selection rather than a full sort (held calibration takes 200 of these a pass)."""
    v = values.reshape(-1).float()
    if v.numel() > max_samples:
        v = v[torch.randint(v.numel(), (max_samples,), generator=generator, device=v.device)]
    pos = float(level) * (v.numel() - 1)
    lo = int(pos)
    a = float(torch.kthvalue(v, lo + 1).values)
    b = float(torch.kthvalue(v, min(lo + 2, v.numel())).values) if pos > lo else a
    return a + (b - a) * (pos - lo)


def block_stream(block, h: torch.Tensor, input_pos, freqs, mask) -> torch.Tensor:
    """The residual stream after `block`, given the stream h entering it (the block's first norm starts from h)."""
    y, residual = block(h, None, input_pos, freqs, mask)
    return residual + y


@torch.no_grad()
def run_blocks(model, idx: torch.Tensor, layers=None) -> torch.Tensor:
    """Hidden states after the blocks (no output head: calibration never needs logits)."""
    input_pos = torch.arange(idx.shape[1], device=idx.device)
    mask, freqs = model.causal_mask[None, None, input_pos], model.freqs_cis[input_pos]
    x = model.tok_embeddings(idx)
    for block in (model.layers if layers is None else layers):
        x = block_stream(block, x, input_pos, freqs, mask)
    return x


@torch.no_grad()
def collect_statistics(model, batch: torch.Tensor, greedy_seqs: int, greedy_len: int):
    """Dense pass: site quantiles [L, 4, Q], score quantiles [L, 7, Q], and the first greedy_seqs x greedy_len
    block inputs of each layer (for the greedy search)."""
    n_layer = len(model.layers)
    site_q = torch.zeros(n_layer, 4, len(LEVELS))
    score_q = torch.zeros(n_layer, len(PROJECTIONS), len(LEVELS))
    block_inputs = [None] * n_layer
    gen = torch.Generator(device=batch.device).manual_seed(0)
    handles = []
    bar = tqdm(total=n_layer * 4, desc="dense statistics")

    def linear_hook(i, path, layer):
        norms = column_norms(layer)

        def hook(module, args):
            x = args[0].reshape(-1, layer.in_features).abs().float()
            site_q[i, PATH_SITE[path]] = quantile_table(x, generator=gen)
            for g, proj in enumerate(LAYER_GROUPS[path]):
                score_q[i, PROJECTIONS.index(proj)] = quantile_table(x * norms[g], generator=gen)
            bar.update()
        return hook

    def block_hook(i):
        def hook(module, args):
            block_inputs[i] = args[0][:greedy_seqs, :greedy_len].clone()
        return hook

    for i, path, layer in sparse_layers(model):
        handles.append(layer.register_forward_pre_hook(linear_hook(i, path, layer)))
    for i, block in enumerate(model.layers):
        handles.append(block.register_forward_pre_hook(block_hook(i)))
    try:
        run_blocks(model, batch)
    finally:
        for h in handles:
            h.remove()
        bar.close()
    return site_q, score_q, block_inputs


def projection_params(model) -> torch.Tensor:
    """[7] parameter count of each projection (the same in every block)."""
    counts = {}
    for _, path, layer in sparse_layers(model):
        for proj, n in zip(LAYER_GROUPS[path], layer.split_sizes):
            counts[proj] = n * layer.in_features
    return torch.tensor([counts[p] for p in PROJECTIONS], dtype=torch.float64)


@torch.no_grad()
def greedy_block(model, i: int, h: torch.Tensor, site_q: torch.Tensor, params: torch.Tensor,
                 step: float, max_target: float) -> list[tuple[float, torch.Tensor]]:
    """TEAL's block-wise greedy search for block i. Starting from all-dense, repeatedly raise the sparsity
    of the one projection whose next step adds the least error to the block's output; step sizes are
    inverse to parameter count (each step sparsifies the same number of weights). Returns the whole path
    [(block sparsity, [7] per-projection sparsities)]."""
    block = model.layers[i]
    input_pos = torch.arange(h.shape[1], device=h.device)
    mask, freqs = model.causal_mask[None, None, input_pos], model.freqs_cis[input_pos]
    layers = {path: layer for j, path, layer in sparse_layers(model) if j == i}
    steps = step * params.max() / params
    site = [SITE_OF[p] for p in PROJECTIONS]

    def forward(s: torch.Tensor) -> torch.Tensor:
        for path, layer in layers.items():
            for g, proj in enumerate(LAYER_GROUPS[path]):
                p = PROJECTIONS.index(proj)
                level = float(s[p])
                layer.thresholds[g] = 0.0 if level == 0 else _table_at(site_q[i, site[p]], level)
        return block_stream(block, h, input_pos, freqs, mask)

    s = torch.zeros(len(PROJECTIONS), dtype=torch.float64)
    dense = forward(s)
    path = [(0.0, s.clone())]
    total = params.sum()
    while float((s * params).sum() / total) < max_target:
        best, best_err = None, None
        for p in range(len(PROJECTIONS)):
            cand = s.clone()
            cand[p] = min(float(cand[p] + steps[p]), MAX_SPARSITY)
            if cand[p] == s[p]:
                continue
            err = float((forward(cand) - dense).float().pow(2).mean())
            if best_err is None or err < best_err:
                best, best_err = cand, err
        if best is None:
            break
        s = best
        path.append((float((s * params).sum() / total), s.clone()))
    forward(torch.zeros(len(PROJECTIONS)))
    return path


def _table_at(table: torch.Tensor, level: float) -> float:
    pos = level / float(LEVELS[1] - LEVELS[0])
    lo = min(int(pos), len(LEVELS) - 2)
    w = pos - lo
    return float(table[lo] * (1 - w) + table[lo + 1] * w)


def resample_path(path, targets: torch.Tensor) -> torch.Tensor:
    """Per-projection sparsities [len(targets), 7] along a greedy path, linear between its steps."""
    xs = torch.tensor([p[0] for p in path], dtype=torch.float64)
    ys = torch.stack([p[1] for p in path])
    out = []
    for t in targets.double():
        j = int(torch.searchsorted(xs, t.reshape(1)).clamp(1, len(xs) - 1))
        w = float(((t - xs[j - 1]) / (xs[j] - xs[j - 1]).clamp_min(1e-12)).clamp(0, 1))
        out.append(ys[j - 1] * (1 - w) + ys[j] * w)
    return torch.stack(out).float()


@torch.no_grad()
def block_kl(model, ids: torch.Tensor, tf: ThresholdFile, levels: torch.Tensor = ALLOCATION_LEVELS) -> torch.Tensor:
    """[L, A] mean KL(dense || sparse) of the next-token distributions over ids [B, S] when only block b is
    sparse, at its greedy split for block sparsity levels[a]. Upstream of b everything is dense, so the
    dense-activation quantiles give exactly that sparsity; the blocks before b run once."""
    n_layer = len(model.layers)
    pos = torch.arange(ids.shape[1], device=ids.device)
    mask, freqs = model.causal_mask[None, None, pos], model.freqs_cis[pos]
    site = torch.tensor([SITE_OF[p] for p in PROJECTIONS])
    dense_table = torch.zeros(n_layer, len(PROJECTIONS))
    set_thresholds(model, dense_table)
    inputs, x = [], model.tok_embeddings(ids)
    for block in model.layers:
        inputs.append(x)
        x = block_stream(block, x, pos, freqs, mask)
    dense = torch.log_softmax(model.output(model.norm(x)[0]).float(), dim=-1)
    kl = torch.zeros(n_layer, len(levels))
    set_mask_prefill(model, True)  # every position masked as a decode step masks it
    try:
        with tqdm(total=n_layer * (len(levels) - 1), desc="block sensitivity") as bar:
            for a in range(1, len(levels)):
                split = interp(levels[a], tf.greedy_targets, tf.greedy_sparsities)  # [L, 7]
                thresholds = quantile_lookup(tf.levels, tf.site_quantiles[:, site], split)
                for b in range(n_layer):
                    table = dense_table.clone()
                    table[b] = thresholds[b]
                    set_thresholds(model, table)
                    x = inputs[b]
                    for block in model.layers[b:]:
                        x = block_stream(block, x, pos, freqs, mask)
                    logp = torch.log_softmax(model.output(model.norm(x)[0]).float(), dim=-1)
                    kl[b, a] = float((dense.exp() * (dense - logp)).sum(-1).mean())
                    bar.update()
    finally:
        set_mask_prefill(model, False)
        set_thresholds(model, dense_table)
    return kl


def allocate_blocks(kl: torch.Tensor, levels: torch.Tensor, targets: torch.Tensor, step: float = 0.005) -> torch.Tensor:
    """[S, L] block sparsities for each model-wide target (blocks weigh equally: they have equal parameters).
    From all-dense, repeatedly raise by `step` the block whose KL grows least, up to levels[-1] each; the KL
    between measured levels is interpolated log-linearly (it grows roughly exponentially with sparsity), which
    keeps the marginal costs increasing within a segment so the search moves in fine steps."""
    log_kl = kl.double().clamp_min(1e-7).log()
    lv = levels.double()
    top = float(lv[-1])

    def curve(s: torch.Tensor) -> torch.Tensor:
        i = torch.searchsorted(lv, s, right=True).clamp(1, len(lv) - 1)
        w = (s - lv[i - 1]) / (lv[i] - lv[i - 1])
        rows = torch.arange(len(s))
        value = (log_kl[rows, i - 1] * (1 - w) + log_kl[rows, i] * w).exp()
        return torch.where(s > 0, value, torch.zeros_like(value))

    s = torch.zeros(kl.shape[0], dtype=torch.float64)
    xs, ys = [0.0], [s.clone()]
    while float(s.mean()) < top - 1e-9:
        nxt = (s + step).clamp(max=top)
        gain = torch.where(s < top - 1e-9, curve(nxt) - curve(s), torch.full_like(s, float("inf")))
        b = int(gain.argmin())
        s[b] = nxt[b]
        xs.append(float(s.mean()))
        ys.append(s.clone())
    xs, ys = torch.tensor(xs, dtype=torch.float32), torch.stack(ys).float()
    return torch.stack([interp(t, xs, ys) for t in targets.float()])


@torch.no_grad()
def held_calibration(model, batch: torch.Tensor, tf: ThresholdFile, mode: str, target: float) -> torch.Tensor:
    """One pass in which each layer's thresholds come from its inputs with everything upstream already sparse.
    Returns the [L, 7] thresholds (weight-aware: in score units)."""
    levels = projection_sparsities(tf, target, mode)
    table = torch.zeros(levels.shape)
    gen = torch.Generator(device=batch.device).manual_seed(0)
    handles = []

    def hook(i, path, layer):
        norms = column_norms(layer) if layer.per_channel else None

        def pre(module, args):
            x = args[0].reshape(-1, layer.in_features).abs().float()
            for g, proj in enumerate(LAYER_GROUPS[path]):
                p = PROJECTIONS.index(proj)
                level = float(levels[i, p])
                if norms is None:
                    t = 0.0 if level == 0 else quantile_at(x, level, gen)
                    module.thresholds[g] = t
                else:
                    t = 0.0 if level == 0 else quantile_at(x * norms[g], level, gen)
                    module.thresholds[g] = t / norms[g].clamp_min(1e-12)
                table[i, p] = t
        return pre

    for i, path, layer in sparse_layers(model):
        handles.append(layer.register_forward_pre_hook(hook(i, path, layer)))
    set_mask_prefill(model, True)
    try:
        run_blocks(model, batch)
    finally:
        set_mask_prefill(model, False)
        for h in handles:
            h.remove()
    return table


@torch.no_grad()
def cats_calibration(model, batch: torch.Tensor, target: float | None = None) -> torch.Tensor:
    """On a catsified model: with target None, a dense pass and the quantile tables of |SiLU(x W_gate^T)| of every
    MLP, [L, Q]; with a target, one pass in which each MLP's threshold is that quantile of its inputs with the
    earlier MLPs already sparse (decode's masking at every position), [L]."""
    gen = torch.Generator(device=batch.device).manual_seed(0)
    out = torch.zeros(len(model.layers), len(LEVELS)) if target is None else torch.zeros(len(model.layers))
    handles = []
    bar = tqdm(total=len(model.layers), desc="CATS statistics" if target is None else f"CATS held {target:g}",
               leave=target is None)

    def hook(i):
        def pre(module, args):
            bar.update()
            a = module.gate_activation(args[0]).abs().float()
            if target is None:
                out[i] = quantile_table(a, generator=gen)
            else:
                out[i] = quantile_at(a, target, gen)
                module.threshold.fill_(float(out[i]))
        return pre

    for i, ff in cats_layers(model):
        ff.threshold.zero_()
        handles.append(ff.register_forward_pre_hook(hook(i)))
    set_mask_prefill(model, target is not None)
    try:
        run_blocks(model, batch)
    finally:
        set_mask_prefill(model, False)
        for h in handles:
            h.remove()
        bar.close()
    return out


def new_threshold_file(model, batch: torch.Tensor, greedy: bool, greedy_tokens: int, greedy_step: float, source: str,
                       command: str) -> ThresholdFile:
    """Stages 1 and 2: dense statistics and, with greedy, the block-wise greedy tables."""
    args = model.config
    site_q, score_q, block_inputs = collect_statistics(model, batch, 1, greedy_tokens)
    tf = ThresholdFile(model=args.name, config_hash=config_hash(args), levels=LEVELS, site_quantiles=site_q,
                       score_quantiles=score_q, provenance={
                           "data": source, "tokens": batch.numel(), "seq_len": batch.shape[1],
                           "dtype": "float32", "date": datetime.date.today().isoformat(), "command": command})
    if greedy:
        params = projection_params(model)
        targets = torch.linspace(0, 0.9, 91)
        per_layer = []
        set_mask_prefill(model, True)  # the search scores whole sequences with decode's masking
        for i in tqdm(range(args.n_layer), desc="greedy allocation"):
            path = greedy_block(model, i, block_inputs[i], site_q, params, greedy_step, float(targets[-1]))
            per_layer.append(resample_path(path, targets))
        set_mask_prefill(model, False)
        tf.greedy_targets = targets
        tf.greedy_sparsities = torch.stack(per_layer, dim=1)  # [S, L, 7]
        tf.provenance.update(greedy_tokens=greedy_tokens, greedy_step=greedy_step)
    return tf


def calibrate(checkpoint_path: Path, out: Path, data=None, dataset=None, tokens=20480, seq_len=2048,
              greedy=True, greedy_tokens=256, greedy_step=0.04, allocation=True, allocation_tokens=1024,
              held_targets=(), held_tokens=4096, held_seq_len=1024, device="cpu", command="",
              base: Path | None = None, group_quant=None) -> ThresholdFile:
    """base: an existing threshold file of this model whose statistics and greedy tables are kept (stages 1 and
    2 are skipped, as are held tables it already has for the same targets); the missing stages are added.
    group_quant: calibrate the model with its projections quantized so (sparse.GroupQuant, generate.py --int4)."""
    dtype = torch.float32
    model = load_model(checkpoint_path, device=device, dtype=dtype)
    args = model.config
    tokenizer = load_tokenizer(Path(checkpoint_path))
    need = tokens + (allocation_tokens if greedy and allocation else 0)
    all_ids, source = read_tokens(tokenizer, data, dataset or DEFAULT_DATASET, min_tokens=need)
    if len(all_ids) < need:
        raise ValueError(f"{source} has {len(all_ids)} tokens, fewer than the {need} requested (--tokens {tokens}"
                         + (f" + --allocation_tokens {allocation_tokens}" if need > tokens else "") + "); lower them or add text")
    ids = all_ids[:tokens].to(device)
    n_seq = tokens // seq_len
    if n_seq == 0:
        raise ValueError(f"--tokens {tokens} is shorter than one --seq_len {seq_len} window")
    batch = ids[: n_seq * seq_len].view(n_seq, seq_len)
    if held_targets and not held_seq_len <= held_tokens <= tokens:
        raise ValueError(f"--held_tokens {held_tokens} must be between one held sequence ({held_seq_len} tokens) "
                         f"and --tokens {tokens}")
    model.setup_caches(max(n_seq, held_tokens // held_seq_len, 1), max(seq_len, held_seq_len, allocation_tokens))
    sparsify(model, group_quant=group_quant)
    if base is not None:
        tf = ThresholdFile.load(base, args)
        if greedy and tf.greedy_sparsities is None:
            raise ValueError(f"{base} has no greedy tables to build on; calibrate from scratch (without --from_file)")
        tf.provenance.update(extended_by=command, extended_on=datetime.date.today().isoformat())
    else:
        tf = new_threshold_file(model, batch, greedy, greedy_tokens, greedy_step, source, command)
    if greedy and allocation:
        # tokens from the end of the text, apart from the statistics' tokens at its start
        tf.block_kl = block_kl(model, all_ids[-allocation_tokens:].view(1, -1).to(device), tf)
        tf.allocation_levels = ALLOCATION_LEVELS
        blocks = allocate_blocks(tf.block_kl, ALLOCATION_LEVELS, tf.greedy_targets)  # [S, L]
        tf.allocated_sparsities = torch.stack([
            torch.stack([interp(blocks[j, b], tf.greedy_targets, tf.greedy_sparsities[:, b]) for b in range(args.n_layer)])
            for j in range(len(tf.greedy_targets))])
        tf.provenance.update(allocation_tokens=allocation_tokens)
    if held_targets:
        held_ids = ids[: (held_tokens // held_seq_len) * held_seq_len].view(-1, held_seq_len)
        pc_model = None
        targets = torch.tensor(sorted(held_targets), dtype=torch.float32)
        same = tf.held_targets is not None and torch.equal(tf.held_targets, targets)
        results = {m: list(t) for m, t in tf.held.items()} if same else {}
        tf.held_targets = targets
        work = [(m, t) for m in tf.modes() if m not in results and m != "cats" for t in targets.tolist()]
        for mode, target in tqdm(work, desc="held calibration"):
            if mode == "weight-aware" and pc_model is None:
                pc_model = sparsify(load_model(checkpoint_path, device=device, dtype=dtype), per_channel=True,
                                    group_quant=group_quant)
                pc_model.setup_caches(held_ids.shape[0], held_seq_len)
            results.setdefault(mode, []).append(
                held_calibration(pc_model if mode == "weight-aware" else model, held_ids, tf, mode, target))
        del pc_model
    del model  # the TEAL stages are done: CATS calibrates a model of its own, one fp32 copy at a time
    if tf.cats_quantiles is None or held_targets and "cats" not in results:
        cats_model = catsify(load_model(checkpoint_path, device=device, dtype=dtype))
        cats_model.setup_caches(max(n_seq, held_tokens // held_seq_len, 1), max(seq_len, held_seq_len))
        if tf.cats_quantiles is None:
            tf.cats_quantiles = cats_calibration(cats_model, batch)
        if held_targets and "cats" not in results:
            results["cats"] = [cats_calibration(cats_model, held_ids, target)
                               for target in tqdm(targets.tolist(), desc="held calibration (CATS)")]
        del cats_model
    if held_targets:
        tf.held = {m: torch.stack(v) for m, v in results.items()}
        tf.provenance.update(held_tokens=held_ids.numel(), held_seq_len=held_seq_len)
    out.parent.mkdir(parents=True, exist_ok=True)
    tf.save(out)
    print(f"wrote {out}: modes {tf.modes()}, held targets {tf.held_targets.tolist() if tf.held_targets is not None else []}")
    return tf


@user_errors
def main(argv=None):
    from convert_hf_checkpoint import DEFAULT_CHECKPOINT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--out", type=Path, help=f"threshold file (default: {user_calibration('CHECKPOINT_PATH')})")
    add_text_source(p, "calibration text", DEFAULT_DATASET)
    p.add_argument("--tokens", type=positive_int, default=20480)
    p.add_argument("--seq_len", type=positive_int, default=2048)
    p.add_argument("--no_greedy", action="store_true", help="skip the block-wise greedy search")
    p.add_argument("--greedy_tokens", type=positive_int, default=256,
                   help="tokens of block input the greedy search scores on")
    p.add_argument("--greedy_step", type=fraction(0, 0.5, low_open=True), default=0.04,
                   help="sparsity step of the largest projection, in (0, 0.5]")
    p.add_argument("--no_allocation", action="store_true", help="skip the allocation across blocks (mode allocated)")
    p.add_argument("--allocation_tokens", type=positive_int, default=1024,
                   help="tokens, from the end of the text, on which each block's effect on the output is measured")
    p.add_argument("--held_targets", type=fraction(0, MAX_SPARSITY, low_open=True), nargs="*",
                   default=[0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.8, 0.9])
    p.add_argument("--held_tokens", type=positive_int, default=4096)
    p.add_argument("--device", default="cpu")
    p.add_argument("--from_file", type=Path, help="keep this threshold file's statistics, greedy and held tables; "
                   "add what it lacks (e.g. the allocation across blocks) and write --out")
    add_int4_args(p)
    a = p.parse_args(argv)
    out = a.out or user_calibration(a.checkpoint_path)
    calibrate(a.checkpoint_path, out, a.data, a.dataset, a.tokens, a.seq_len, not a.no_greedy, a.greedy_tokens,
              a.greedy_step, not a.no_allocation, a.allocation_tokens, a.held_targets, a.held_tokens, device=a.device, command="python -m thresholds.calibrate " + " ".join(sys.argv[1:]),
              base=a.from_file, group_quant=int4_quant(a))


if __name__ == "__main__":
    main()
