"""Easy positives prevent class collapse: batch-hard vs EPS on real and toy data.

Levi et al. (ICCV 2021, "Rethinking preventing class-collapsing in metric
learning with margin-based losses") observe that a margin loss whose positive
is the *farthest* same-class sample (batch-hard) pulls every sample of a class
onto one point, even when the class is made of several distinct modes; taking
each anchor's *nearest* same-class sample as positive (easy positive sampling,
EPS) only asks every sample to be close to *some* sample of its class, so the
modes can stay apart.  This script shows it in about a minute on a CPU.

Each setting is trained twice per seed, ``pos_strategy="hard"`` (farthest
positive) and ``"easy"`` (EPS), with the same seed, initial weights, batches,
negatives, margin, optimiser and steps; and all of that for two negative
strategies, ``"hard"`` (with a hard positive: the batch-hard loss) and
``"semihard"`` (TripletMarginLoss's default), because the size of the effect
depends on them.  Settings:

* ``digits-2`` / ``digits-5``: scikit-learn's bundled 8x8 digits (no
  download).  The 10 digits are merged into super-classes by ``digit % k``
  (k=2: even/odd; k=5: {0,5}, {1,6}, {2,7}, {3,8}, {4,9}), so every
  super-class is a union of unrelated digits.  An MLP 64 -> 128 -> 32 with an
  L2-normalised output is trained on the super-class labels only, and a
  held-out split is evaluated with super-class Recall@1, *fine* (original
  digit) Recall@1 and the NMI of a k-means clustering (k = 10) against the
  digits: does the embedding still separate the sub-clusters it was never told
  about?
* ``toy``: 2-D points, two classes of four well-separated Gaussian modes each,
  interleaved on a ring (so the classes are not linearly separable); an MLP
  maps them to an *unnormalised* 2-D embedding that is plotted directly.  The
  fine label is the mode.

Usage::

    python examples/class_collapse.py --out examples/results   # 5 seeds, ~1-2 min on 2 CPU cores
    python examples/class_collapse.py --quick                  # 2 seeds, fewer steps
    python examples/class_collapse.py --settings digits-2 --neg hard --steps 1000 --out /tmp/cc

Writes ``results.json``, ``results.md`` (the table) and two PNGs
(``toy_embeddings.png``, ``summary.png``) to ``--out``.  The function API,
``run(Config(...)) -> dict``, is what ``tests/test_class_collapse.py`` calls.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fastmine

STRATEGIES = ("hard", "easy")  # pos_strategy values compared
# "hard" positive = farthest same-class sample; with neg="hard" this is the
# batch-hard loss of Hermans et al. 2017.  "easy" = nearest (EPS).
LABELS = {"hard": "hard positive", "easy": "EPS"}
SETTINGS = ("digits-2", "digits-5", "toy")
METRICS = ("super_r1", "fine_r1", "fine_nmi")
METRIC_NAMES = {"super_r1": "super-class R@1", "fine_r1": "fine R@1", "fine_nmi": "fine NMI"}


@dataclass
class Config:
    """Everything a run depends on (recorded verbatim in results.json).

    ``steps`` is for the digits settings, ``toy_steps`` for the toy.  A batch
    is P x K: every super-class (P = number of classes, 2 or 5) with
    ``samples_per_class`` samples each, drawn by one sampler shared by both
    strategies, so the two runs of a seed see exactly the same batches.
    """
    settings: Sequence[str] = SETTINGS
    seeds: Sequence[int] = (0, 1, 2, 3, 4)
    steps: int = 500
    toy_steps: int = 800
    samples_per_class: int = 32
    margin: float = 0.2
    # Both are run: "hard" makes the hard-positive run the classic batch-hard
    # loss (Hermans et al. 2017); "semihard" is TripletMarginLoss's default.
    neg_strategies: Sequence[str] = ("hard", "semihard")
    lr: float = 1e-3
    embedding_dim: int = 32
    hidden_dim: int = 128
    test_fraction: float = 0.3
    toy_points_per_mode: int = 100
    device: str = "cpu"
    threads: int = 1
    plot_seed: Optional[int] = None  # seed whose toy embeddings are plotted (default: first)


def quick_config(**overrides) -> Config:
    """The reduced configuration: --quick, and (with one seed) the CI test,
    whose assertions come from a sweep of this configuration over 10 seeds."""
    return replace(Config(seeds=(0, 1), steps=150, toy_steps=300), **overrides)


# --------------------------------------------------------------------------- data

def _digits(seed: int, test_fraction: float):
    """Digits split (stratified by digit, split drawn from ``seed``).

    Returns (x_train, fine_train, x_test, fine_test) with x in [0, 1].
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)  # pixel counts are 0..16
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y,
                                              random_state=seed)
    return x_tr, y_tr, x_te, y_te


def _toy(points_per_mode: int, rng: np.random.Generator, modes_per_class: int = 4,
         num_classes: int = 2, radius: float = 2.0, std: float = 0.15):
    """Gaussian modes on a ring, class = mode % num_classes (classes interleave).

    Neighbouring centres are 2*radius*sin(pi/8) ~ 1.5 apart, std 0.15: well separated,
    so any sub-cluster the embedding loses is lost by training, not by the data.
    """
    n_modes = modes_per_class * num_classes
    angle = 2 * np.pi * np.arange(n_modes) / n_modes
    centres = radius * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    mode = np.repeat(np.arange(n_modes), points_per_mode)
    x = centres[mode] + std * rng.standard_normal((mode.size, 2))
    return x.astype(np.float32), mode


def _setting_data(setting: str, seed: int, cfg: Config):
    """(x_train, super_train, x_test, super_test, fine_test, num_super, n_fine)."""
    if setting.startswith("digits-"):
        k = int(setting.split("-")[1])
        x_tr, f_tr, x_te, f_te = _digits(seed, cfg.test_fraction)
        return x_tr, f_tr % k, x_te, f_te % k, f_te, k, 10
    if setting == "toy":
        # train and test drawn independently; offset keeps them apart from the
        # batch sampler's stream (which also starts from `seed`).
        x_tr, m_tr = _toy(cfg.toy_points_per_mode, np.random.default_rng(10_000 + seed))
        x_te, m_te = _toy(cfg.toy_points_per_mode, np.random.default_rng(20_000 + seed))
        return x_tr, m_tr % 2, x_te, m_te % 2, m_te, 2, 8
    raise ValueError(f"unknown setting {setting!r}; choose from {SETTINGS}")


class PKSampler:
    """P x K batches: every class, K samples each, without replacement within a batch.

    The index stream depends only on (labels, K, seed), never on the model, so
    the hard-positive and the EPS run of one seed train on identical batches.
    """

    def __init__(self, labels: np.ndarray, samples_per_class: int, seed: int):
        self.by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        self.k = samples_per_class
        self.rng = np.random.default_rng(seed)

    def __call__(self) -> np.ndarray:
        return np.concatenate([self.rng.choice(ix, self.k, replace=False) for ix in self.by_class])


# --------------------------------------------------------------------------- model / training

def _model(in_dim: int, setting: str, cfg: Config) -> nn.Module:
    if setting == "toy":
        # 2-D output so the embedding can be plotted as is.
        return nn.Sequential(nn.Linear(in_dim, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                             nn.Linear(64, 2))
    return nn.Sequential(nn.Linear(in_dim, cfg.hidden_dim), nn.ReLU(),
                         nn.Linear(cfg.hidden_dim, cfg.embedding_dim))


def _embed(model: nn.Module, x: torch.Tensor, normalise: bool) -> torch.Tensor:
    e = model(x)
    return F.normalize(e, dim=1) if normalise else e


def train_embedding(setting: str, pos_strategy: str, neg_strategy: str, seed: int, cfg: Config,
                    data) -> torch.Tensor:
    """Train one model; returns the test embeddings (CPU, float32)."""
    x_tr, s_tr, x_te = data[0], data[1], data[2]
    dev = torch.device(cfg.device)
    normalise = setting != "toy"
    steps = cfg.toy_steps if setting == "toy" else cfg.steps
    torch.manual_seed(seed)  # same initial weights for both positive strategies
    model = _model(x_tr.shape[1], setting, cfg).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, foreach=True)
    # The only difference between the two runs of a seed is pos_strategy.
    loss_fn = fastmine.losses.TripletMarginLoss(margin=cfg.margin, distance="euclidean",
                                                pos_strategy=pos_strategy,
                                                neg_strategy=neg_strategy)
    sampler = PKSampler(s_tr, cfg.samples_per_class, seed)
    x_all = torch.from_numpy(x_tr).to(dev)
    y_all = torch.from_numpy(s_tr.astype(np.int64)).to(dev)
    for _ in range(steps):
        b = torch.from_numpy(sampler()).to(dev)
        loss = loss_fn(_embed(model, x_all[b], normalise), y_all[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return _embed(model, torch.from_numpy(x_te).to(dev), normalise).float().cpu()


# --------------------------------------------------------------------------- evaluation

def recall_at_1(emb: torch.Tensor, labels: np.ndarray) -> float:
    """Leave-one-out Recall@1 inside the test set: is the nearest other sample
    (euclidean) of the same label?"""
    d = torch.cdist(emb.double(), emb.double())
    d.fill_diagonal_(float("inf"))
    nn_idx = d.argmin(dim=1).numpy()
    return float(np.mean(labels[nn_idx] == labels))


def cluster_nmi(emb: torch.Tensor, labels: np.ndarray, k: int, seed: int) -> float:
    """NMI between k-means (k = number of fine labels) and the fine labels."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    pred = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(emb.numpy())
    return float(normalized_mutual_info_score(labels, pred))


def evaluate(emb: torch.Tensor, s_te: np.ndarray, f_te: np.ndarray, n_fine: int, seed: int) -> dict:
    return {"super_r1": recall_at_1(emb, s_te), "fine_r1": recall_at_1(emb, f_te),
            "fine_nmi": cluster_nmi(emb, f_te, n_fine, seed)}


def _mean_std(values: List[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    # sample std (ddof=1) over seeds; 0 for a single seed
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "values": [float(v) for v in a]}


# --------------------------------------------------------------------------- driver

def run(config: Optional[Config] = None, verbose: bool = False) -> dict:
    """Run every negative strategy x setting x seed x positive strategy.

    Returns a JSON-able dict:
    ``result["summary"][neg][setting][pos][metric]`` = {mean, std, values}
    with pos in ("hard", "easy"), plus ``pos == "input"`` (the raw input
    features, no training, for reference) and ``["eps_wins"][metric]`` (in how
    many seeds EPS beat the hard positive); ``result["per_seed"]`` has every
    run; ``result["toy_embeddings"][neg]`` the plotted seed's toy embeddings.
    """
    cfg = config or Config()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # tiny model: more threads only add overhead
    try:
        return _run(cfg, verbose)
    finally:
        torch.set_num_threads(threads)  # callers (the test) keep their setting


def _run(cfg: Config, verbose: bool) -> dict:
    t0 = time.perf_counter()
    per_seed, summary, toy_plot = [], {}, {}
    plot_seed = cfg.seeds[0] if cfg.plot_seed is None else cfg.plot_seed
    for neg in cfg.neg_strategies:
        summary[neg] = {}
        for setting in cfg.settings:
            acc = {s: {m: [] for m in METRICS} for s in ("input",) + STRATEGIES}
            for seed in cfg.seeds:
                data = _setting_data(setting, seed, cfg)
                _, _, x_te, s_te, f_te, _, n_fine = data
                for m, v in evaluate(torch.from_numpy(x_te), s_te, f_te, n_fine, seed).items():
                    acc["input"][m].append(v)
                embs = {}
                for pos in STRATEGIES:
                    t = time.perf_counter()
                    embs[pos] = train_embedding(setting, pos, neg, seed, cfg, data)
                    metrics = evaluate(embs[pos], s_te, f_te, n_fine, seed)
                    row = {"neg": neg, "setting": setting, "pos": pos, "seed": seed,
                           "seconds": round(time.perf_counter() - t, 3), **metrics}
                    per_seed.append(row)
                    for m in METRICS:
                        acc[pos][m].append(metrics[m])
                    if verbose:
                        print(f"  neg={neg:8s} {setting:9s} seed {seed} {LABELS[pos]:13s} "
                              + " ".join(f"{m}={metrics[m]:.3f}" for m in METRICS)
                              + f"  ({row['seconds']:.1f} s)", flush=True)
                if setting == "toy" and seed == plot_seed:
                    toy_plot[neg] = {"x_test": x_te.tolist(), "mode": f_te.tolist(), "seed": seed,
                                     **{p: embs[p].tolist() for p in STRATEGIES}}
            summ = {s: {m: _mean_std(v) for m, v in acc[s].items()} for s in acc}
            # in how many seeds EPS beats the hard positive: how robust the sign is
            summ["eps_wins"] = {m: int(sum(e > h for e, h in zip(acc["easy"][m], acc["hard"][m])))
                                for m in METRICS}
            summary[neg][setting] = summ
    cfg_dict = asdict(cfg)
    for k in ("settings", "seeds", "neg_strategies"):
        cfg_dict[k] = list(cfg_dict[k])
    return {
        "config": cfg_dict,
        "summary": summary,
        "per_seed": per_seed,
        "toy_embeddings": toy_plot,
        "seconds": round(time.perf_counter() - t0, 1),
        "environment": {"torch": torch.__version__, "fastmine": fastmine.__version__,
                        "python": platform.python_version(), "machine": platform.machine(),
                        "cpu_count": os.cpu_count(), "threads": cfg.threads},
    }


def markdown_table(result: dict) -> str:
    """Mean ± std over seeds; the last column counts the seeds in which EPS
    beat the hard positive on fine R@1 and on fine NMI."""
    n = len(result["config"]["seeds"])
    lines = ["| setting | negatives | positives | super-class R@1 | fine R@1 | fine NMI "
             "| EPS better (fine R@1, NMI) |",
             "|---|---|---|---:|---:|---:|---:|"]
    settings = result["config"]["settings"]
    for setting in settings:
        first = True
        for neg, by_setting in result["summary"].items():
            s = by_setting[setting]
            for pos in ("input",) + STRATEGIES:
                if pos == "input":
                    if not first:  # the input row does not depend on the negatives
                        continue
                    name, neg_cell = "input features (untrained)", "–"
                    first = False
                else:
                    name, neg_cell = LABELS[pos], neg
                cells = [f"{s[pos][m]['mean']:.3f} ± {s[pos][m]['std']:.3f}" for m in METRICS]
                wins = (f"{s['eps_wins']['fine_r1']}/{n}, {s['eps_wins']['fine_nmi']}/{n}"
                        if pos == "easy" else "")
                lines.append(f"| {setting} | {neg_cell} | {name} | " + " | ".join(cells)
                             + f" | {wins} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots

_CLASS_CMAPS = ("Blues", "Oranges")
_CLASS_MARKERS = ("o", "^")


def _mode_colours(n_modes: int, n_classes: int = 2):
    """Class -> colour family, mode within the class -> shade, so that a
    collapsed class shows as its shades mixed on one blob."""
    import matplotlib

    per = n_modes // n_classes
    return [matplotlib.colormaps[_CLASS_CMAPS[m % n_classes]](0.4 + 0.55 * (m // n_classes) / max(per - 1, 1))
            for m in range(n_modes)]


def _find(result, **key):
    return next(r for r in result["per_seed"] if all(r[k] == v for k, v in key.items()))


def plot_toy(result: dict, path: str) -> None:
    """One row per negative strategy: input | hard-positive | EPS embedding."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    negs = list(result["toy_embeddings"])
    n_seeds = len(result["config"]["seeds"])
    fig, axes = plt.subplots(len(negs), 3, figsize=(12, 4.0 * len(negs)), squeeze=False)
    for row, neg in zip(axes, negs):
        toy = result["toy_embeddings"][neg]
        mode = np.asarray(toy["mode"])
        n_modes = int(mode.max()) + 1
        cols = _mode_colours(n_modes)
        summ = result["summary"][neg]["toy"]
        panels = [("input (test points)", np.asarray(toy["x_test"]), None)] + [
            (f"{LABELS[p]}, neg={neg}", np.asarray(toy[p]), p) for p in STRATEGIES]
        for ax, (title, pts, pos) in zip(row, panels):
            for m in range(n_modes):
                sel = mode == m
                ax.scatter(pts[sel, 0], pts[sel, 1], s=7, color=cols[m], alpha=0.6,
                           marker=_CLASS_MARKERS[m % 2], linewidths=0,
                           label=f"class {m % 2}, mode {m // 2}" if pos is None else None)
            if pos is not None:
                r = _find(result, neg=neg, setting="toy", pos=pos, seed=toy["seed"])
                title += (f"\nseed {toy['seed']}: class R@1 {r['super_r1']:.2f}, "
                          f"mode R@1 {r['fine_r1']:.2f}, mode NMI {r['fine_nmi']:.2f}"
                          f"\n{n_seeds} seeds: mode R@1 {summ[pos]['fine_r1']['mean']:.2f} "
                          f"± {summ[pos]['fine_r1']['std']:.2f}")
            ax.set_title(title, fontsize=9)
            ax.set_aspect("equal", adjustable="datalim")
            ax.tick_params(labelsize=7)
        row[0].legend(fontsize=6, markerscale=1.5, loc="center", frameon=False)
    fig.suptitle("Toy: 2 classes x 4 Gaussian modes, MLP -> 2-D embedding, triplet loss "
                 f"(margin {result['config']['margin']}). Same seed, init and batches in a row; "
                 "only the positive differs.", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_summary(result: dict, path: str) -> None:
    """Bars: mean ± std over seeds of each metric; one row per negative strategy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    negs = list(result["summary"])
    settings = result["config"]["settings"]
    fig, axes = plt.subplots(len(negs), len(METRICS), figsize=(4 * len(METRICS), 2.9 * len(negs)),
                             sharey=True, squeeze=False)
    width = 0.27
    colours = {"input": "0.75", "hard": "tab:red", "easy": "tab:blue"}
    for row, neg in zip(axes, negs):
        summ = result["summary"][neg]
        for ax, m in zip(row, METRICS):
            xs = np.arange(len(settings))
            for i, p in enumerate(("input",) + STRATEGIES):
                ax.bar(xs + (i - 1) * width, [summ[st][p][m]["mean"] for st in settings], width,
                       yerr=[summ[st][p][m]["std"] for st in settings], capsize=2,
                       color=colours[p], label="input (untrained)" if p == "input" else LABELS[p])
            ax.set_xticks(xs, settings)
            ax.set_title(f"{METRIC_NAMES[m]}, neg={neg}", fontsize=9)
            ax.set_ylim(0, 1.05)
            ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8, ncol=3)
    fig.suptitle(f"Held-out metrics, mean ± std over {len(result['config']['seeds'])} seeds",
                 fontsize=10, x=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_outputs(result: dict, out: str) -> List[str]:
    """results.json, results.md and the PNGs; returns the paths written."""
    os.makedirs(out, exist_ok=True)
    paths = []
    # The toy embeddings are only needed for the plot: keep the JSON small.
    slim = {k: v for k, v in result.items() if k != "toy_embeddings"}
    p = os.path.join(out, "results.json")
    with open(p, "w") as f:
        json.dump(slim, f, indent=1)
    paths.append(p)
    p = os.path.join(out, "results.md")
    with open(p, "w") as f:
        f.write(markdown_table(result) + "\n")
    paths.append(p)
    if result.get("toy_embeddings"):
        p = os.path.join(out, "toy_embeddings.png")
        plot_toy(result, p)
        paths.append(p)
    p = os.path.join(out, "summary.png")
    plot_summary(result, p)
    paths.append(p)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="class_collapse_out", help="output folder")
    ap.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0..4; --quick: 0 1)")
    ap.add_argument("--steps", type=int, help="training steps for digits (default 500)")
    ap.add_argument("--toy-steps", type=int, help="training steps for the toy (default 800)")
    ap.add_argument("--settings", nargs="+", choices=SETTINGS, help="default: all")
    ap.add_argument("--neg", nargs="+", choices=("hard", "semihard"),
                    help="negative strategies (default: hard semihard)")
    ap.add_argument("--quick", action="store_true", help="reduced run (2 seeds, fewer steps)")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1: the model is tiny)")
    args = ap.parse_args(argv)

    cfg = quick_config() if args.quick else Config()
    over = {k: tuple(v) if isinstance(v, list) else v
            for k, v in {"seeds": args.seeds, "steps": args.steps, "toy_steps": args.toy_steps,
                         "settings": args.settings, "neg_strategies": args.neg}.items()
            if v is not None}
    cfg = replace(cfg, device=args.device, threads=args.threads, **over)
    print(f"class collapse: settings {list(cfg.settings)}, seeds {list(cfg.seeds)}, "
          f"{cfg.steps} steps (toy {cfg.toy_steps}), neg {list(cfg.neg_strategies)}, "
          f"margin {cfg.margin}, device {cfg.device}", flush=True)
    result = run(cfg, verbose=True)
    print()
    print(markdown_table(result))
    print(f"\n{len(result['per_seed'])} training runs in {result['seconds']:.1f} s")
    for p in write_outputs(result, args.out):
        print("wrote", p)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
