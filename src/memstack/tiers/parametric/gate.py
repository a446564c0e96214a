"""The adapter's own locality: what general text feeds each adapted layer, and two uses of it.

For each LoRA layer, the inputs that general text (the replay samples) gives its base layer,
with the adapter off, define a subspace: the top eigenvectors of their Gram matrix holding a
share (`TrainSettings.protect`) of their energy.

- **protect**: LoRA's A is projected out of that subspace after every optimizer step (a
  null-space constraint, as AlphaEdit's for edits), so the adapter reads only the directions
  general text barely uses.
- **gate** (after WISE's routing between main and side memory, made per token and per layer):
  the adapter acts on a token only when the share of the token's input energy outside that
  subspace exceeds the `gate` quantile of the same share over general text's tokens. Unrelated
  prompts then leave almost every adapted layer exactly as the base model has it, while a
  memory's own words (names, rare terms) open it. The gate is trained with (the adapter learns
  to work through the tokens it opens on) and saved beside the adapter (`gate.safetensors`);
  every way of loading a shard installs it, and a runtime that ignores it loses this locality.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Sequence

from .decoding import collate

GATE_FILE = "gate.safetensors"
# a token must pass its layer's threshold by this much: batch shapes change the floating-point
# sums a little, and a general token at the threshold must not open the gate by noise
MARGIN = 0.01
Encoded = Sequence[tuple[list[int], list[int]]]  # (input ids, labels) per sample


def _key(name: str) -> str:
    """A layer's name without peft's prefixes: 'layers.3.mlp.up_proj'."""
    found = re.search(r"layers\.\d+\..*$", name)
    return found.group(0) if found else name


def lora_layers(model: Any) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {_key(n): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _base_inputs(model: Any, general: Encoded, pad: int, record: Callable[[str, Any], None]
                 ) -> None:
    """Run general text through the model with the adapter off; `record(layer, inputs)` gets
    each LoRA layer's base-layer inputs (tokens x d_in, padding left out)."""
    import torch

    valid: list[Any] = [None]

    def recorder(key: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple) -> None:
            record(key, args[0].detach()[valid[0]])
        return hook

    hooks = [m.base_layer.register_forward_pre_hook(recorder(k))
             for k, m in lora_layers(model).items()]
    try:
        with torch.no_grad(), model.disable_adapter():
            for start in range(0, len(general), 8):
                x, _, mask = collate(general[start:start + 8], pad)
                valid[0] = mask.bool()
                model(input_ids=x, attention_mask=mask)
    finally:
        for hook in hooks:
            hook.remove()


def general_subspaces(model: Any, general: Encoded, share: float, pad: int
                      ) -> dict[str, Any]:
    """Per LoRA layer, U (d_in x used, orthonormal columns): the input directions holding
    `share` of general text's energy."""
    import torch

    grams: dict[str, Any] = {}

    def add(key: str, x: Any) -> None:
        grams[key] = grams.get(key, 0) + x.T @ x

    _base_inputs(model, general, pad, add)
    out = {}
    for key, gram in grams.items():
        values, vectors = torch.linalg.eigh(gram.double())  # ascending
        energy = values.clamp(min=0).flip(0).cumsum(0) / values.clamp(min=0).sum()
        used = int((energy < share).sum()) + 1
        out[key] = vectors[:, len(values) - used:].float().contiguous()
    return out


def protected(model: Any, subspaces: dict[str, Any]) -> dict[Any, Any]:
    """Each LoRA A weight with the subspace it must stay out of."""
    return {a.weight: subspaces[key] for key, layer in lora_layers(model).items()
            if key in subspaces for a in layer.lora_A.values()}


def project(protect: dict[Any, Any]) -> None:
    """A <- A (I - U U^T) for every protected A."""
    import torch

    with torch.no_grad():
        for weight, u in protect.items():
            weight.sub_((weight @ u) @ u.T)


def free_share(x: Any, u: Any) -> Any:
    """(..., d) -> (...): the share of each row's energy outside span(U)."""
    total = (x * x).sum(-1).clamp_min(1e-12)
    return 1 - ((x @ u) ** 2).sum(-1) / total


class Gate:
    """Per LoRA layer: the subspace U and the threshold on the free share above which the
    adapter acts on a token."""

    def __init__(self, subspaces: dict[str, Any], thresholds: dict[str, float]) -> None:
        self.subspaces, self.thresholds = subspaces, thresholds

    @classmethod
    def calibrate(cls, model: Any, general: Encoded, subspaces: dict[str, Any],
                  quantile: float, pad: int) -> "Gate":
        """Thresholds: the `quantile` of the free share over general text's tokens, plus
        MARGIN."""
        import torch

        shares: dict[str, list[Any]] = {}
        _base_inputs(model, general, pad, lambda key, x: shares.setdefault(key, []).append(
            free_share(x, subspaces[key])))
        return cls(subspaces, {key: float(torch.quantile(torch.cat(v), quantile)) + MARGIN
                               for key, v in shares.items()})

    def install(self, model: Any, adapter: str) -> list[Any]:
        """Hooks that zero the adapter's A output on tokens below their layer's threshold."""
        handles = []
        for key, layer in lora_layers(model).items():
            if key in self.subspaces and adapter in layer.lora_A:
                handles.append(layer.lora_A[adapter].register_forward_hook(
                    _gating(self.subspaces[key], self.thresholds[key])))
        return handles

    def save(self, folder: str | Path) -> None:
        import torch
        from safetensors.torch import save_file

        tensors = {f"{k}.u": u.half().contiguous() for k, u in self.subspaces.items()}
        tensors.update({f"{k}.threshold": torch.tensor([t]) for k, t in self.thresholds.items()})
        save_file(tensors, str(Path(folder) / GATE_FILE))

    @classmethod
    def load(cls, folder: str | Path) -> "Gate | None":
        """The gate saved in a shard's folder; None for a shard trained without one."""
        from safetensors.torch import load_file

        path = Path(folder) / GATE_FILE
        if not path.exists():
            return None
        tensors = load_file(str(path))
        keys = [k[:-2] for k in tensors if k.endswith(".u")]
        return cls({k: tensors[f"{k}.u"].float() for k in keys},
                   {k: float(tensors[f"{k}.threshold"][0]) for k in keys})


def _gating(u: Any, threshold: float) -> Callable[..., Any]:
    def hook(module: Any, args: tuple, output: Any) -> Any:
        x = args[0]
        on = free_share(x.to(u.dtype), u) > threshold  # (..., tokens)
        return output * on.unsqueeze(-1).to(output.dtype)
    return hook


def install_saved(model: Any, folder: str | Path, adapter: str) -> None:
    """Install the gate a shard was trained with, if any, on its adapter in `model`."""
    gate = Gate.load(folder)
    if gate is not None:
        gate.install(model, adapter)
