"""A shard's audit as JSON, markdown and a PNG (the metrics against their targets, and the
training curve)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS = ("reliability", "generalization", "locality", "locality_tokens", "k_extractable")
DETAIL = ("per_item", "per_control")  # per item / per control prompt: in the JSON only


def summary(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in DETAIL}


def markdown(shard: str, result: dict[str, Any], manifest: dict[str, Any]) -> str:
    how = f"method {manifest['settings']['method']}" if manifest["settings"] else \
        f"merged ({manifest.get('combination')}) from {', '.join(manifest.get('merged_from', []))}"
    lines = [f"# Audit of shard {shard}", "",
             f"Base model: {manifest['base']['name']} ({manifest['base']['weights_sha256'][:12]}), "
             f"{how}, {len(manifest['items'])} items, "
             f"{manifest['samples']} samples, {manifest['train_seconds']} s of training.", "",
             "| measure | value |", "|---|---:|"]
    for key, value in summary(result).items():
        if isinstance(value, dict):
            value = ", ".join(f"{k[:12]} {v}" for k, v in value.items())
        lines.append(f"| {key} | {value} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], manifest: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [m for m in METRICS if m in result]
    left.bar(names, [result[m] for m in names], color="#4c72b0")
    left.set_ylim(0, 1)
    left.set_title(f"audit (perplexity +{result['perplexity_increase']:.1%})")
    left.tick_params(axis="x", labelrotation=20)
    steps = manifest.get("curve", [])
    right.plot([s["step"] for s in steps], [s["fact_loss"] for s in steps], label="fact loss")
    if steps and "replay_loss" in steps[0]:
        right.plot([s["step"] for s in steps], [s["replay_loss"] for s in steps], label="replay")
    right.set_xlabel("step")
    right.set_title("training")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(shard: str, result: dict[str, Any], manifest: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{shard}.json", out / f"{shard}.md"]
    paths[0].write_text(json.dumps(result, indent=2))
    paths[1].write_text(markdown(shard, result, manifest))
    try:
        paths.append(plot(result, manifest, out / f"{shard}.png"))
    except ImportError:  # matplotlib is in the bench extra; the JSON and markdown suffice
        pass
    return paths
