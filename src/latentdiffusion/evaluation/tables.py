"""The report's tables as (head, rows) of strings: the FID table of metrics.json, FID per class,
and the sweeps of sweep.json (`ldm sweep`) and guidance.json (`ldm sweep --guidance`)."""

from __future__ import annotations

from typing import Any

from ..diffusion import SAMPLERS

# What metrics.json holds besides one entry per scored set.
NOT_SETS = ("warnings", "memorisation")


def scored_sets(metrics: dict[str, Any]) -> dict[str, Any]:
    """The entries of metrics.json that are scored sets (Random, ..., Validation)."""
    return {name: m for name, m in metrics.items() if name not in NOT_SETS}


POST_FID = {"random": 48.43, "vae-prior": 63.49, "diffusion": 6.02, "validation": 0.30}
ROW_NAMES = {"random": "Random", "vae-prior": "VAE (prior samples)",
             "vae-reconstruction": "VAE (test reconstructions)", "validation": "Validation"}


def fid_rows(metrics: dict[str, Any], guided: str, post: bool,
             few: frozenset[str] | set[str] = frozenset()) -> list[list[str]]:
    """One row per set; `guided`: how the diffusion sets were guided (", autoguidance 1.5");
    `post`: with the post's FID of the row (its figures are of MNIST); `few`: sets with too
    few images for their FID, marked."""
    rows = []
    metrics = scored_sets(metrics)
    order = ["random", "vae-prior", "vae-reconstruction",
             *[k for k in metrics if k not in ROW_NAMES], "validation"]
    for name in order:
        if name not in metrics:
            continue
        m = metrics[name]
        post_fid = POST_FID.get(name, POST_FID["diffusion"] if name not in ROW_NAMES else None)
        label = ROW_NAMES.get(name, f"Diffusion ({name}{guided})")
        fid_format = ".3g" if m["fid"] is not None and abs(m["fid"]) < 1 else ".3f"  # not 0.000
        unreliable = " (too few images: read KID)" if name in few else ""
        row = [label, str(m["n"]), num(m["fid"], fid_format) + unreliable,
               num(m["fid_over_validation"], ".1f") + "x",
               f"{num(m['kid_mean'], '.4f')} ± {num(m['kid_std'], '.4f')}",
               f"{num(m['precision'], '.3f')} / {num(m['recall'], '.3f')}",
               num(m["class_entropy_bits"], ".3f"),
               f"{m['accuracy']:.4f}" if "accuracy" in m else "",
               f"{post_fid:.2f}" if post_fid is not None else ""]
        rows.append(row if post else row[:-1])
    return rows


def num(value: float | None, spec: str) -> str:
    """`value` formatted, or n/a where it is undefined."""
    # metrics.json holds null where a value is undefined (too few images, a zero Validation FID)
    return "n/a" if value is None else format(value, spec)


FID_HEAD = ["Set", "N", "FID", "FID / Validation", "KID (mean ± std)", "Precision / Recall",
        "Class entropy (bits)", "Accuracy", "Post's FID"]


def class_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """A conditional run's labelled sets: accuracy and FID against each class's images."""
    rows = []
    for name, m in scored_sets(metrics).items():
        if "fid_class_mean" not in m:
            continue
        per_class = " ".join(num(f, ".2f") for f in m["fid_per_class"])
        rows.append([ROW_NAMES.get(name, f"Diffusion ({name})"), f"{m['accuracy']:.4f}",
                     num(m["fid_class_mean"], ".3f"), per_class])
    return rows


def class_head(class_names: list[str]) -> list[str]:
    return ["Set", "Accuracy", "FID per class (mean)",
            "FID of classes " + ", ".join(class_names)]


def sweep_rows(sweep: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(objective, spec, entry) of every scored pair, the run's current denoiser first."""
    current = sweep.get("current")
    ordered = sorted(sweep["denoisers"].items(), key=lambda item: item[0] != current)
    return [(denoiser["objective"], spec, e) for _, denoiser in ordered
            for spec, e in sorted(denoiser["results"].items(),
                                  key=lambda item: (item[1]["sampler"], item[1]["nfe"]))]


def sweep_table(sweep: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Every scored pair as a table: head and rows."""
    head = ["Objective", "Sampler", "NFE", "FID", "FID / Validation", "KID (mean ± std)",
            "Precision / Recall", "Samples/s"]
    floor = sweep["validation"]["fid"]
    rows = [[objective, spec, str(e["nfe"]), f"{e['fid']:.3f}", f"{e['fid'] / floor:.2f}x",
             f"{e['kid_mean']:.4f} ± {e['kid_std']:.4f}",
             f"{e['precision']:.3f} / {e['recall']:.3f}", f"{e['samples_per_second']:.0f}"]
            for objective, spec, e in sweep_rows(sweep)]
    rows.append(["", "Validation (test set)", "", f"{floor:.3f}", "1.00x", "", "", ""])
    return head, rows


def best_per_objective(sweep: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per objective and kind of sampler: its lowest FID and at what cost."""
    head = ["Objective", "Sampler kind", "Best pair", "NFE", "FID", "FID / Validation"]
    floor = sweep["validation"]["fid"]
    best: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
    for objective, spec, e in sweep_rows(sweep):
        kind = "stochastic" if SAMPLERS[e["sampler"]].stochastic else "deterministic"
        if (objective, kind) not in best or e["fid"] < best[objective, kind][1]["fid"]:
            best[objective, kind] = (spec, e)
    rows = [[objective, kind, spec, str(e["nfe"]), f"{e['fid']:.3f}", f"{e['fid'] / floor:.2f}x"]
            for (objective, kind), (spec, e) in sorted(best.items())]
    return head, rows


def guidance_entries(sweep: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(sweep["results"].values(), key=lambda e: e["guidance"])


def guidance_table(sweep: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per guidance scale: head and rows."""
    head = ["Guidance s", "FID", "FID per class (mean)", "Accuracy", "KID", "Precision / Recall",
            "Seconds"]
    rows = [[f"{e['guidance']:g}", num(e["fid"], ".3f"), num(e["fid_class_mean"], ".3f"),
             f"{e['accuracy']:.4f}", num(e["kid_mean"], ".4f"),
             f"{num(e['precision'], '.3f')} / {num(e['recall'], '.3f')}",
             f"{e['seconds']:.0f}"] for e in guidance_entries(sweep)]
    return head, rows
