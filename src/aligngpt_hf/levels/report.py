"""Report and plot for `aligngpt_hf.levels.compute`: what went into each level, what was skipped, converted, truncated.

The report exists so a 558K-pair run can be checked without opening the data: per-level counts and score
ranges, the bucket edges, a few captions per level, and every record that was skipped, with its reason.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from aligngpt_hf.levels.inputs import unwrapped
from aligngpt_hf.paths import atomic_path, atomic_write_text

BINNING_NOTE = (
    "The paper ranks pairs by CLIP similarity and assigns them to 'N equally spaced intervals'; this reads as "
    "equal-count groups by rank (quantile) or as equal-width score bins (uniform). The released data's per-level "
    "counts are unknown (about 69.8K per level of 558K would mean quantile). Level 0 = weakest alignment, "
    "level N-1 = strongest (AlignGPT's 'global' row). Scores within the tie tolerance share a level."
)


def require_matplotlib():
    """Import matplotlib with the Agg backend, or fail early with the install hint."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "the levels plot needs matplotlib: pip install matplotlib (or pass --no-plot)"
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def build_report(*, scores, levels, edges, num_levels, binning, scorer, captions, ids, errors, modes, truncated,
                 max_length, seconds, examples_per_level=3, ties: dict | None = None) -> dict:
    """Counts and ranges per level plus the skipped/converted/truncated bookkeeping over all input rows."""
    scores, levels = np.asarray(scores, dtype=np.float64), np.asarray(levels)
    per_level = []
    for level in range(num_levels):
        members = np.flatnonzero(levels == level)
        members = members[np.argsort(scores[members], kind="stable")]  # examples span the level's score range
        level_scores = scores[members]
        picks = members[np.linspace(0, len(members) - 1, min(examples_per_level, len(members))).astype(int)]
        per_level.append({
            "level": level,
            "count": int(len(members)),
            "min_score": float(level_scores.min()) if len(members) else None,
            "max_score": float(level_scores.max()) if len(members) else None,
            "mean_score": float(level_scores.mean()) if len(members) else None,
            "examples": [{"score": float(scores[i]), "caption": captions[i]} for i in picks],
        })
    skipped = [{"id": ids[i], "row": i, "reason": error} for i, error in enumerate(errors) if error]
    good = [i for i, error in enumerate(errors) if not error]
    conversions = Counter(modes[i] for i in good if modes[i] != "RGB")
    truncated_ids = [ids[i] for i in good if truncated[i]]
    repeated = [name for name, count in Counter(map(str, ids)).items() if count > 1]
    return {
        "num_records": len(errors),
        "num_scored": len(good),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "skipped_by_reason": dict(Counter(s["reason"].split(":")[0].split(" (")[0] for s in skipped)),
        "num_converted_to_rgb": int(sum(conversions.values())),
        "converted_from_mode": dict(conversions),
        "num_duplicate_ids": len(repeated),
        "duplicate_ids": repeated[:DUPLICATES_LISTED],
        "empty_levels": [entry["level"] for entry in per_level if entry["count"] == 0],
        "num_truncated": len(truncated_ids),
        "truncated_ids": truncated_ids,
        "text_max_length": max_length,
        "scorer": scorer,
        "score_kind": "cosine similarity of normalised image and text embeddings",
        "num_levels": num_levels,
        "binning": binning,
        "binning_note": BINNING_NOTE,
        "edges": [float(e) for e in edges],
        "score_min": float(scores.min()),
        "score_mean": float(scores.mean()),
        "score_median": float(np.median(scores)),
        "score_max": float(scores.max()),
        "levels": per_level,
        "ties": ties or {},
        "seconds": seconds,
        "pairs_per_second": len(errors) / seconds if seconds > 0 else None,
    }


DUPLICATES_LISTED = 20  # the report names this many repeated ids (all are counted)


def report_markdown(report: dict) -> str:
    lines = [
        "# Alignment levels", "",
        f"Scorer `{report['scorer']}` ({report['score_kind']}), {report['num_levels']} levels, "
        f"binning `{report['binning']}`.", "", report["binning_note"], "",
        f"* records: {report['num_records']}, scored: {report['num_scored']}, skipped: {report['num_skipped']}",
        f"* images converted to RGB: {report['num_converted_to_rgb']} {report['converted_from_mode']}",
        f"* captions truncated to {report['text_max_length']} tokens: {report['num_truncated']}"
        + (f" (e.g. {', '.join(map(str, report['truncated_ids'][:5]))})" if report["truncated_ids"] else ""),
        f"* scores: min {report['score_min']:.4f}, median {report['score_median']:.4f}, "
        f"mean {report['score_mean']:.4f}, max {report['score_max']:.4f}",
        f"* edges: {', '.join(f'{e:.4f}' for e in report['edges'])}",
        *_ties_line(report.get("ties") or {}), *_warning_lines(report), "",
        "| level | count | min score | max score | examples |", "|---|---|---|---|---|",
    ]
    for level in report["levels"]:
        examples = "<br>".join(f"{e['score']:.3f}: {_short(e['caption'])}" for e in level["examples"])
        low = "" if level["min_score"] is None else f"{level['min_score']:.4f}"
        high = "" if level["max_score"] is None else f"{level['max_score']:.4f}"
        lines.append(f"| {level['level']} | {level['count']} | {low} | {high} | {examples} |")
    if report["skipped"]:
        lines += ["", "## Skipped records", ""]
        lines += [f"* `{s['id']}` (row {s['row']}): {s['reason']}" for s in report["skipped"]]
    return "\n".join(lines) + "\n"


def _warning_lines(report: dict) -> list[str]:
    """What the user should look at: ids used by several records (all records are kept) and levels left empty."""
    lines = []
    if report.get("num_duplicate_ids"):
        lines.append(f"* ids used by more than one record (all records kept): {report['num_duplicate_ids']} "
                     f"(e.g. {', '.join(report['duplicate_ids'][:5])})")
    if report.get("empty_levels"):
        lines.append(f"* empty levels (ties or too few distinct scores): {report['empty_levels']}")
    return lines


def warning_lines(report: dict) -> list[str]:
    """The report's warnings as short lines for the command's summary."""
    lines = []
    if report.get("num_duplicate_ids"):
        lines.append(f"{report['num_duplicate_ids']} id(s) are used by more than one record (all kept), e.g. "
                     f"{report['duplicate_ids'][0]!r}; see the report")
    if report.get("empty_levels"):
        lines.append(f"level(s) {report['empty_levels']} are empty (ties or too few distinct scores)")
    return lines


def _ties_line(ties: dict) -> list[str]:
    if not ties:
        return []
    return [f"* ties (scores within {ties['tie_tolerance']:g}) kept in one level across a boundary: "
            f"{ties['num_tie_groups_across_boundary']} group(s), {ties['num_pairs_in_those_groups']} pair(s)"]


def _short(text: str, width: int = 70) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= width else text[: width - 1] + "…"


def plot_scores(report: dict, scores, edges, path) -> str:
    """Histogram of scores with the bucket edges, and a few captions per level below it."""
    plt = require_matplotlib()
    num_levels = report["num_levels"]
    fig, (ax, text_ax) = plt.subplots(2, 1, figsize=(11, 5 + 0.18 * num_levels),
                                      gridspec_kw={"height_ratios": [5, 0.3 + 0.18 * num_levels]})
    ax.hist(np.asarray(scores), bins=min(100, max(10, len(scores) // 5)), color="#4C72B0")
    for edge in edges[1:-1]:
        ax.axvline(edge, color="#C44E52", linestyle="--", linewidth=1)
    for level, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        ax.annotate(str(level), ((low + high) / 2, 1.0), xycoords=("data", "axes fraction"), ha="center",
                    va="bottom", fontsize=8, color="#C44E52")
    ax.set_xlabel("image-caption cosine similarity")
    ax.set_ylabel("pairs")
    ax.set_title(f"{report['num_scored']} pairs, {num_levels} levels ({report['binning']}; red: edges, "
                 f"level above), scorer {report['scorer']}", pad=16)
    text_ax.axis("off")
    rows = []
    for level in report["levels"]:
        captions = " | ".join(_short(e["caption"], 36) for e in level["examples"][:3])
        span = ("empty" if level["count"] == 0 else f"{level['min_score']:+.3f}..{level['max_score']:+.3f}")
        rows.append(f"level {level['level']:>2} n={level['count']:<7} {span}  {captions}")
    text_ax.text(0, 1, "\n".join(rows), va="top", ha="left", family="monospace", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as temp:
        fig.savefig(temp, dpi=100, format="png")
    plt.close(fig)
    return str(path)


def write_report(report: dict, output: Path, *, plot: bool, scores, edges, extra_files=None) -> dict[str, str]:
    """Write `<stem>.report.json`, `<stem>.report.md` and (with `plot`) `<stem>.scores.png` next to OUTPUT."""
    output = Path(output)
    files = {"report_json": str(output.with_name(output.stem + ".report.json")),
             "report_markdown": str(output.with_name(output.stem + ".report.md"))}
    if plot:
        files["plot"] = plot_scores(report, scores, edges, output.with_name(output.stem + ".scores.png"))
    report["files"] = {"output": str(output), **(extra_files or {}), **files}
    atomic_write_text(files["report_json"], json.dumps(report, indent=2, ensure_ascii=False))
    atomic_write_text(files["report_markdown"], report_markdown(report))
    return files


def llava_records_from_dataset(dataset, image_column: str, text_column: str, id_column: str) -> list[dict]:
    """LLaVA pre-training records for a scored `datasets` input: the caption becomes the `gpt` turn."""
    from datasets import Image, List, Sequence

    feature = dataset.features[image_column]
    if isinstance(feature, Image):
        dataset = dataset.cast_column(image_column, Image(decode=False))
    elif isinstance(feature, (List, Sequence)) and isinstance(feature.feature, Image):
        dataset = dataset.cast_column(image_column, List(Image(decode=False)))
    columns = dataset.select_columns([c for c in (image_column, text_column, id_column, "conversations",
                                                  "alignment_score", "alignment_level") if c in dataset.column_names])
    records = []
    for row, item in enumerate(columns):
        image = item[image_column]
        image = unwrapped(image)
        image = image.get("path") if isinstance(image, dict) else image if isinstance(image, str) else None
        conversations = item.get("conversations") or [{"from": "human", "value": "<image>"},
                                                       {"from": "gpt", "value": item[text_column]}]
        level = int(item["alignment_level"])
        name = item.get(id_column, row)
        records.append({"id": None if name is None else str(name), "image": image, "conversations": conversations,
                        "similarity": level, "alignment_score": float(item["alignment_score"]),
                        "alignment_level": level})
    return records
