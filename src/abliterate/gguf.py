"""GGUF: convert an export with llama.cpp's own converter, then check what it wrote.

Why llama.cpp's `convert_hf_to_gguf.py` and not a writer of ours: a GGUF is only useful if
llama.cpp loads it, and that script is what decides the tensor names, the merged expert
tensors, the vocabulary type and the metadata llama.cpp reads. It ships in the
llama-cpp-python source distribution (`make gguf-converter` unpacks it from the package
registry, nothing compiled); we run it as a subprocess, as a user would.

Why a check after it: the converter reorders, renames, stacks (one `ffn_down_exps` per
layer instead of one tensor per expert) and casts tensors, so "it wrote a file" says
little. The check reads the GGUF back and finds every tensor the plan edited: it must be
the export's tensor (to the output type's precision), and nearer to it than to the source.

Why `pre_tokenizer`: for byte-level BPE vocabularies the converter identifies the
pre-tokenizer by hashing the token ids of a fixed text, and only knows the hashes of
published vocabularies. A new vocabulary (a model newer than the converter, or our demo
organism's GLM-style tokenizer) is refused with "BPE pre-tokenizer was not recognized"
even when its pre-tokenizer is the published one; `pre_tokenizer: glm4` names it, and only
that step of the converter is replaced.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from .errors import AbliterateError
from .shards import read_checkpoint, read_tensor

CONVERTER_NAME = "convert_hf_to_gguf.py"
CONVERTER_ENV = "ABLITERATE_GGUF_CONVERTER"
OUTTYPES = ("auto", "f32", "f16", "bf16", "q8_0")

# Runs the converter's own main() in a fresh interpreter; with a pre-tokenizer name, only
# TextModel.get_vocab_base_pre (the hash lookup) is replaced by that name.
_LAUNCHER = """\
import runpy, sys
script, pre = sys.argv[1], sys.argv[2]
root = script.rsplit("/", 1)[0]
sys.path[:0] = [root, root + "/gguf-py"]
if pre:
    import conversion.base
    conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name="__main__")
"""


def find_converter(explicit: str | Path | None = None) -> Path:
    """llama.cpp's convert_hf_to_gguf.py: `explicit` (config `export.gguf_converter`), else
    $ABLITERATE_GGUF_CONVERTER, else the one `make gguf-converter` put in the environment
    (`<venv>/llama.cpp/`), else one on PATH."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise AbliterateError(
                f"export.gguf_converter: {path} does not exist; expected the path of "
                f"llama.cpp's {CONVERTER_NAME}."
            )
        return path.resolve()
    candidates = []
    if os.environ.get(CONVERTER_ENV):
        candidates.append(Path(os.environ[CONVERTER_ENV]).expanduser())
    candidates.append(Path(sys.prefix) / "llama.cpp" / CONVERTER_NAME)
    on_path = shutil.which(CONVERTER_NAME)
    if on_path:
        candidates.append(Path(on_path))
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise AbliterateError(
        f"export.gguf: llama.cpp's {CONVERTER_NAME} was not found (looked at "
        f"${CONVERTER_ENV}, {Path(sys.prefix) / 'llama.cpp'} and PATH); run "
        "`make gguf-converter` or set export.gguf_converter to its path."
    )


def convert(
    model_dir: str | Path,
    output: str | Path,
    *,
    converter: str | Path | None = None,
    outtype: str = "auto",
    pre_tokenizer: str | None = None,
    log=None,
) -> Path:
    """Convert the Hugging Face checkpoint `model_dir` to the GGUF file `output`.

    The converter writes to a temp name beside `output`, renamed on success, so an
    interrupted or failed conversion never leaves a file that looks complete; its output
    goes to `log` (a file object), and a failure raises with its last line.
    """
    model_dir, output = Path(model_dir), Path(output)
    if outtype not in OUTTYPES:
        raise AbliterateError(
            f"export.gguf_outtype: {outtype!r} is not one of {', '.join(OUTTYPES)}."
        )
    if not (model_dir / "config.json").is_file():
        raise AbliterateError(f"{model_dir}: no config.json; expected a Hugging Face model.")
    script = find_converter(converter)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial")
    command = [sys.executable, "-c", _LAUNCHER, str(script), pre_tokenizer or "", str(model_dir)]
    command += ["--outfile", str(partial), "--outtype", outtype]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
        if log is not None:
            log.write(done.stdout + done.stderr)
            log.flush()
        if done.returncode != 0 or not partial.is_file():
            lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            last = lines[-1].strip() if lines else f"exit status {done.returncode}"
            raise AbliterateError(f"llama.cpp's {CONVERTER_NAME} failed on {model_dir}: {last}")
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    return output


# --------------------------------------------------------------------------------------
# Reading the result back
# --------------------------------------------------------------------------------------

_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    if field.types and field.types[0].name == "STRING":
        return bytes(value).decode("utf-8")
    return value.tolist()[0]


def tensor_name_map(arch: str, block_count: int):
    """gguf-py's map from Hugging Face tensor names to GGUF ones for `arch`."""
    import gguf

    by_name = {name: arch_id for arch_id, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise AbliterateError(
            f"the GGUF's architecture {arch!r} is unknown to the installed gguf package "
            f"{getattr(gguf, '__version__', '')}; upgrade it."
        )
    return gguf.get_tensor_name_map(by_name[arch], block_count)


def gguf_location(key: str, name_map) -> tuple[str, int | None] | None:
    """Where the Hugging Face tensor `key` is in the GGUF: (name, expert index or None).

    Per-expert tensors (`...experts.3.down_proj.weight`) are stacked by the converter into
    one tensor per layer and kind, so they are looked up by their merged name and sliced.
    """
    expert = _EXPERT.search(key)
    candidates = []
    if expert:
        candidates.append((_EXPERT.sub(".experts.", key, count=1), int(expert.group(1))))
    candidates.append((key, None))
    for name, index in candidates:
        found = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if found is not None:
            return found, index
    return None


def _tolerance(gguf_type: str) -> float:
    """Largest error relative to the tensor's largest magnitude that the output type's
    rounding explains (q8_0 keeps 8 bits per block of 32)."""
    return {"F32": 1e-6, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1e-2}.get(gguf_type, 0.05)


def _gguf_tensor(tensor, expert: int | None = None) -> torch.Tensor:
    """One GGUF tensor (or one expert of a stacked one, sliced before it is dequantized, so
    a stack is not dequantized once per expert) as float32, in the export's axis order."""
    import gguf
    import numpy as np

    data = tensor.data  # leading axes as in the export; the last one in bytes when quantized
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    if expert is not None:
        data, shape = data[expert], shape[1:]
    if tensor.tensor_type.name not in ("F32", "F16"):
        data = gguf.quants.dequantize(data, tensor.tensor_type)
    # a copy: the reader's memory map is read-only
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))


def _read(model_dir: Path, info) -> torch.Tensor:
    with open(model_dir / info.shard, "rb") as handle:
        return read_tensor(handle, info).float()


def expected_tensor_count(model_dir: str | Path) -> int:
    """How many tensors the converter should write for a checkpoint: one per tensor, with
    per-expert tensors of a layer and kind counted once (they are stacked)."""
    merged = {_EXPERT.sub(".experts.", key, count=1) for key in read_checkpoint(model_dir)}
    return len(merged)


def check(gguf_path: str | Path, export_dir: str | Path, source_dir: str | Path, keys) -> dict:
    """Read the GGUF back and compare every edited tensor (`keys`, Hugging Face names)
    with the export and the source; returns a report with `ok` and `failures`."""
    import gguf

    gguf_path, export_dir, source_dir = Path(gguf_path), Path(export_dir), Path(source_dir)
    reader = gguf.GGUFReader(gguf_path)
    arch = _field(reader, "general.architecture")
    config = json.loads((export_dir / "config.json").read_text())
    layers = config.get("text_config", config).get("num_hidden_layers")
    block_count = _field(reader, f"{arch}.block_count")
    by_name = {tensor.name: tensor for tensor in reader.tensors}
    report = {
        "gguf": gguf_path.name,
        "bytes": gguf_path.stat().st_size,
        "architecture": arch,
        "block_count": block_count,
        "num_hidden_layers": layers,
        "tensors": len(by_name),
        "expected_tensors": expected_tensor_count(export_dir),
        "vocabulary": _field(reader, "tokenizer.ggml.model"),
        "pre_tokenizer": _field(reader, "tokenizer.ggml.pre"),
        "checked": [],
        "failures": [],
    }
    fail = report["failures"].append
    if block_count != layers:
        fail(f"{arch}.block_count is {block_count}, but config.json has {layers} layers")
    exported, source = read_checkpoint(export_dir), read_checkpoint(source_dir)
    name_map = tensor_name_map(arch, block_count or 0)
    for key in keys:
        location = gguf_location(key, name_map)
        if location is None or location[0] not in by_name:
            fail(f"{key}: edited, but no GGUF tensor holds it")
            continue
        name, expert = location
        tensor = by_name[name]
        data = _gguf_tensor(tensor, expert)
        edited, original = _read(export_dir, exported[key]), _read(source_dir, source[key])
        if data.shape != edited.shape:
            fail(
                f"{key}: GGUF {name} has shape {tuple(data.shape)}, the export {tuple(edited.shape)}"
            )
            continue
        scale = edited.abs().max().clamp_min(1e-30)
        error = ((data - edited).abs().max() / scale).item()
        from_source = ((data - original).abs().max() / scale).item()
        where = name if expert is None else f"{name}[{expert}]"
        problem = None
        if error > _tolerance(tensor.tensor_type.name):
            problem = f"{key}: GGUF {where} differs from the export by {error:.2e} of its range"
        elif from_source <= error:
            problem = f"{key}: GGUF {where} is no nearer the export than the unedited source"
        if problem:
            fail(problem)
        report["checked"].append(
            {
                "key": key,
                "gguf": where,
                "type": tensor.tensor_type.name,
                "error": error,
                "error_vs_source": from_source,
                "ok": problem is None,
            }
        )
    report["ok"] = not report["failures"]
    return report


def summary(report: dict) -> str:
    """A few lines for the log and the report."""
    lines = [
        f"GGUF {report['gguf']}: {report['bytes'] / 2**20:.1f} MiB, architecture "
        f"{report['architecture']}, {report['block_count']} blocks "
        f"({report['num_hidden_layers']} layers in config.json), {report['tensors']} tensors "
        f"({report['expected_tensors']} expected), vocabulary {report['vocabulary']} "
        f"(pre-tokenizer {report['pre_tokenizer']})",
        f"edited tensors equal to the export in it: "
        f"{sum(entry['ok'] for entry in report['checked'])} of {len(report['checked'])} checked",
    ]
    lines += [f"FAILED: {failure}" for failure in report["failures"]]
    lines.append("ok" if report["ok"] else "GGUF check failed")
    return "\n".join(lines) + "\n"
