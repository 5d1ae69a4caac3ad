"""Checkpoints: weights in safetensors (never pickle), config and state in JSON, written atomically.

A saved model directory holds ``config.json``, ``model.safetensors``, ``tokenizer.json`` and
``manifest.json`` (sha256 of each file, checked on load so truncation or corruption is named,
not silently loaded). A training run directory (``--out``) holds the final model the same way
plus ``checkpoints/step_NNNNNNNN/`` directories that also carry the optimizer, the RNG and data
position, and the trainer state: each is written to a temporary directory, fsynced, then
renamed into place, so a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import struct
import tempfile
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch

from .config import ConfigError, GPTConfig
from .model import register_saver, strip_prefixes  # noqa: F401  (strip_prefixes: re-exported)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
CKPT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint or saved model cannot be loaded; the message says why."""


# ---- atomic file primitives ------------------------------------------------------------------

def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where the OS tells it (Linux /proc), since
    setting it to read it back is not thread-safe."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write via a temp file in the same directory + fsync + rename."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        # mkstemp makes the file 0600: give it the mode open() would (0666 less the umask), so a
        # run shared with a group or other users stays readable for them.
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    try:
        _write_bytes(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(d)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensors_bytes(tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


def _load_tensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); "
                              f"it may be truncated or corrupted") from None


def _manifest_bytes(hashes: Dict[str, str]) -> bytes:
    return json.dumps({"format": "barkgpt", "version": 1, "sha256": hashes}, indent=2).encode()


def _write_dir_files(directory: str, files: Dict[str, bytes]) -> None:
    """Write files into directory (which must exist) and a manifest of their hashes."""
    manifest = {}
    for name, data in files.items():
        _write_bytes(os.path.join(directory, name), data)
        manifest[name] = hashlib.sha256(data).hexdigest()
    _write_bytes(os.path.join(directory, MANIFEST_FILE), _manifest_bytes(manifest))
    _fsync_dir(directory)


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_MAX_MANIFEST_BYTES = 1 << 20
MODEL_REQUIRED = (CONFIG_FILE, MODEL_FILE)
TRAINING_REQUIRED = MODEL_REQUIRED + ("optimizer.safetensors", "extra.safetensors", "state.json")


def _plain_name(name: Any) -> bool:
    """A file name inside the directory: no separators, no parent or absolute paths."""
    return (isinstance(name, str) and name not in ("", ".", "..")
            and not any(c in name for c in ("/", "\\", "\0", ":")))


def _regular_file(path: str) -> os.stat_result:
    """stat of path if it is a regular file (a FIFO or device would hang or never end)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing from the checkpoint") from None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path} is not a regular file: refusing to read it as part of a checkpoint")
    return st


def _verify_dir(directory: str, required: Tuple[str, ...] = MODEL_REQUIRED) -> Dict[str, str]:
    """Check the manifest and every file it lists; returns the listed names -> sha256.

    The manifest comes with the checkpoint, so it is not trusted: its entries must be plain
    file names in ``directory`` naming regular files, and the files the loader reads
    (``required``) must be among them."""
    mpath = os.path.join(directory, MANIFEST_FILE)
    if not os.path.lexists(mpath):
        raise CheckpointError(f"{directory} has no {MANIFEST_FILE}: it is not a barkgpt checkpoint "
                              f"(or its save did not finish)")
    if _regular_file(mpath).st_size > _MAX_MANIFEST_BYTES:
        raise CheckpointError(f"{mpath} is corrupted (over {_MAX_MANIFEST_BYTES} bytes)")
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
        hashes = manifest["sha256"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{mpath} is corrupted") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "barkgpt":
        raise CheckpointError(f"{directory} is not a barkgpt checkpoint")
    if not isinstance(hashes, dict):
        raise CheckpointError(f"{mpath} is corrupted")
    for name, want in hashes.items():
        if not _plain_name(name):
            raise CheckpointError(f"{mpath} lists {name!r}, which is not a file name inside {directory}: "
                                  f"refusing to read it (the manifest is corrupted or crafted)")
        if not isinstance(want, str) or not _SHA256_RE.match(want):
            raise CheckpointError(f"{mpath} is corrupted (bad checksum for {name!r})")
    unlisted = [r for r in required if r not in hashes]
    if unlisted:
        raise CheckpointError(f"{mpath} does not list {', '.join(unlisted)}: files outside the manifest "
                              f"are not loaded (the manifest is corrupted or crafted)")
    for name in hashes:
        _regular_file(os.path.join(directory, name))
    for name, want in hashes.items():
        p = os.path.join(directory, name)
        if _sha256(p) != want:
            raise CheckpointError(f"{p} does not match its recorded checksum: the file is truncated or "
                                  f"corrupted; use another checkpoint")
    return hashes


# ---- checking weights against the config before building anything ---------------------------

_FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
_OTHER_DTYPES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


def _safetensors_header(path: str) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """name -> (dtype, shape) from a safetensors file's header, reading nothing else: the
    header's byte ranges are checked against the file size, so the shapes it claims are
    bounded by the bytes actually there."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a readable safetensors file ({why}); "
                               f"it may be truncated or corrupted")

    size = _regular_file(path).st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("shorter than its header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise bad(f"header of {n} bytes in a file of {size}")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    data_bytes, out = size - 8 - n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = (all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
                  and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_bytes)
        except (TypeError, KeyError, ValueError):
            ok = False
        itemsize = _FLOAT_DTYPES.get(dtype, _OTHER_DTYPES.get(dtype)) if ok else None
        if not ok or itemsize is None:
            raise bad(f"bad entry for {name!r}")
        numel = 1
        for d in shape:
            numel *= d
        if numel * itemsize != end - begin:
            raise bad(f"{name!r} claims shape {list(shape)} but holds {end - begin} bytes")
        out[name] = (dtype, shape)
    return out


def _check_weights_fit(path: str, config: GPTConfig) -> None:
    """Refuse weights that do not fit ``config`` (names, shapes) or are not floating point,
    before any model is built: a crafted config.json must not make the loader allocate what
    the weights file cannot fill."""
    from .model import BarkGPT

    header = strip_prefixes(_safetensors_header(path))
    if config.tie_embeddings:
        header.pop("head.weight", None)  # tied: the token table is the head (load_weights drops it)
    where = f"{os.path.dirname(path)}: the weights do not fit the saved config"
    # The layer count bounds what building the model (even on the meta device) costs.
    layers = {int(m.group(1)) for m in (re.match(r"layers\.(\d+)\.", k) for k in header) if m}
    if len(layers) != config.n_layer:
        raise CheckpointError(f"{where}: the config says n_layer={config.n_layer}, the weights hold "
                              f"{len(layers)} layers")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in BarkGPT(config).export_state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where}: missing tensors {missing[:6]}, unexpected tensors {unexpected[:6]}")
    for name, want in expected.items():
        dtype, shape = header[name]
        if shape != want:
            raise CheckpointError(f"{where}: {name} has shape {list(shape)}, the config needs {list(want)} "
                                  f"(vocab_size={config.vocab_size}, block_size={config.block_size}, "
                                  f"n_embd={config.n_embd})")
        if dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{where}: {name} holds {dtype} values; weights must be floating point "
                                  f"(one of {', '.join(_FLOAT_DTYPES)})")


def _model_files(model, step: Optional[int] = None) -> Dict[str, bytes]:
    meta = {"format": "pt", "library": "barkgpt"}
    if step is not None:  # a training run's final model: the step it was trained to
        meta["step"] = str(step)
    files = {
        MODEL_FILE: _tensors_bytes(model.export_state_dict(), metadata=meta),
        CONFIG_FILE: model.config.to_json().encode(),
    }
    if getattr(model, "tokenizer", None) is not None:
        files[TOKENIZER_FILE] = json.dumps(model.tokenizer.to_dict(), indent=2).encode()
    return files


def _replace_dir(tmp: str, final: str) -> None:
    """Move a fully written tmp dir to ``final``, replacing any old one without a window
    in which neither exists complete."""
    parent = os.path.dirname(final)
    old = None
    if os.path.exists(final):
        old = final + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- models ------------------------------------------------------------------------------------

def save_model(model, directory: str, step: Optional[int] = None) -> str:
    """Save weights + config (+ tokenizer) into ``directory`` (created if needed; other files
    in it, such as a run's checkpoints/, are left alone). Each file is replaced atomically and
    the manifest last, so a crash mid-save is detected on load rather than loaded. ``step``
    (training's final save) records how far the model was trained."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    manifest = {}
    for name, data in _model_files(model, step).items():
        atomic_write_bytes(os.path.join(directory, name), data)
        manifest[name] = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(os.path.join(directory, MANIFEST_FILE), _manifest_bytes(manifest))
    return directory


def read_config(directory: str) -> GPTConfig:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}")
    try:
        return GPTConfig.from_json_file(path)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _model_from_dir(directory: str, device="cpu", backend=None):
    from .tokenizer import tokenizer_from_dict
    from .model import BarkGPT

    listed = _verify_dir(directory)
    config = read_config(directory)
    wpath = os.path.join(directory, MODEL_FILE)
    _check_weights_fit(wpath, config)
    model = BarkGPT(config, backend=backend)
    try:
        model.load_weights(_load_tensors(wpath))
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{directory}: the weights do not fit the saved config ({e})") from None
    tpath = os.path.join(directory, TOKENIZER_FILE)
    if TOKENIZER_FILE not in listed and os.path.lexists(tpath):
        raise CheckpointError(f"{tpath} is not listed in {MANIFEST_FILE}: files outside the manifest are "
                              f"not loaded (the manifest is corrupted or crafted)")
    if TOKENIZER_FILE in listed:
        with open(tpath, encoding="utf-8") as f:
            model.tokenizer = tokenizer_from_dict(json.load(f))
    return model.to(device)


def load(path: str, device="cpu", backend: Optional[str] = None):
    """Load a model saved with ``model.save(dir)``, a training run's ``--out`` directory (its
    final model, or its latest checkpoint if training has not finished) or one checkpoint dir.

    In a run directory whose newest model cannot be loaded (a save killed midway, a corrupted
    file), the newest intact checkpoint is loaded instead, with a warning naming both."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path!r} is not a directory; barkgpt models are saved as directories "
                              f"(config.json + model.safetensors)")
    checkpoints = list_checkpoints(path)
    candidates = []  # newest first
    if os.path.lexists(os.path.join(path, MODEL_FILE)):
        # A run resumed past its earlier end and stopped again: its checkpoint is newer.
        final_step = _trained_step(os.path.join(path, MODEL_FILE))
        if not checkpoints or final_step is None or checkpoints[-1][0] <= final_step:
            candidates.append(path)
    candidates += [d for _, d in reversed(checkpoints)]
    if not candidates:
        raise CheckpointError(f"{path!r} holds no barkgpt model ({MODEL_FILE}) and no checkpoints")
    first_error = None
    for d in candidates:
        try:
            model = _model_from_dir(d, device, backend)
        except CheckpointError as e:
            first_error = first_error or e
            continue
        if first_error is not None:
            warnings.warn(f"{first_error}\nbarkgpt.load: loaded the newest intact checkpoint instead: {d}",
                          UserWarning, stacklevel=2)
        return model
    raise first_error


def _trained_step(model_file: str) -> Optional[int]:
    """The step a training run's final model was saved at (None: not recorded)."""
    from safetensors import safe_open

    try:
        with safe_open(model_file, framework="pt") as f:
            step = (f.metadata() or {}).get("step")
        return int(step) if step is not None else None
    except Exception:  # noqa: BLE001 - unreadable: the full load reports it properly
        return None


# ---- training checkpoints ------------------------------------------------------------------

def _optimizer_to_files(opt_sd: Dict) -> Tuple[Dict[str, torch.Tensor], Dict]:
    tensors, scalars = {}, {}
    for pid, st in opt_sd["state"].items():
        for name, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = val
            else:
                scalars[f"{pid}.{name}"] = val
    return tensors, {"param_groups": opt_sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: Dict[str, torch.Tensor], meta: Dict) -> Dict:
    state: Dict[int, Dict[str, Any]] = {}
    for key, val in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = val
    for key, val in meta.get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = val
    return {"state": state, "param_groups": meta["param_groups"]}


def list_checkpoints(out_dir: str) -> List[Tuple[int, str]]:
    d = os.path.join(out_dir, CKPT_DIR)
    if not os.path.isdir(d):
        return []
    found = []
    for name in os.listdir(d):
        m = _STEP_RE.match(name)
        if m and os.path.exists(os.path.join(d, name, MANIFEST_FILE)):
            found.append((int(m.group(1)), os.path.join(d, name)))
    return sorted(found)


def latest_checkpoint(out_dir: str) -> Optional[str]:
    ck = list_checkpoints(out_dir)
    return ck[-1][1] if ck else None


def save_training_checkpoint(out_dir: str, step: int, model, optimizer, state: Dict[str, Any],
                             extra_tensors: Dict[str, torch.Tensor], keep_last: int = 3,
                             keep_steps: Tuple[int, ...] = ()) -> str:
    """Write checkpoints/step_<step>/ atomically and prune old ones (keeping the last
    ``keep_last`` plus ``keep_steps``, e.g. the best by validation loss)."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    root = os.path.join(out_dir, CKPT_DIR)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:08d}")
    tmp = tempfile.mkdtemp(prefix=f".tmp-step_{step:08d}-", dir=root)
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; a checkpoint honours the umask
        files = _model_files(model)
        opt_tensors, opt_meta = _optimizer_to_files(optimizer.state_dict())
        files["optimizer.safetensors"] = _tensors_bytes(opt_tensors)
        files["extra.safetensors"] = _tensors_bytes(extra_tensors)
        files["state.json"] = json.dumps({"step": step, "optimizer": opt_meta, **state}, indent=2).encode()
        _write_dir_files(tmp, files)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Leftovers of saves killed midway are never valid checkpoints (no rename happened).
    for name in os.listdir(root):
        if name.startswith(".tmp-") and os.path.join(root, name) != tmp:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    ck = list_checkpoints(out_dir)
    keep = {p for _, p in ck[-max(keep_last, 1):]} | {p for s, p in ck if s in keep_steps}
    for _, p in ck:
        if p not in keep:
            # Out of sight first (one rename): a kill during the rmtree must not leave a
            # half-deleted checkpoint that still looks complete; the next save clears the rest.
            trash = os.path.join(root, f".tmp-pruned-{os.path.basename(p)}")
            try:
                os.replace(p, trash)
            except OSError:
                continue
            shutil.rmtree(trash, ignore_errors=True)
    return final


def load_training_checkpoint(path: str) -> Dict[str, Any]:
    """Everything needed to resume: model/optimizer state dicts, trainer state, extra tensors."""
    _verify_dir(path, TRAINING_REQUIRED)
    with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    opt_meta = state.pop("optimizer")
    config = read_config(path)
    _check_weights_fit(os.path.join(path, MODEL_FILE), config)
    return {
        "config": config,
        "model": _load_tensors(os.path.join(path, MODEL_FILE)),
        "optimizer": _optimizer_from_files(_load_tensors(os.path.join(path, "optimizer.safetensors")), opt_meta),
        "extra": _load_tensors(os.path.join(path, "extra.safetensors")),
        "state": state,
    }


# BarkGPT.save() writes the model through save_model (model.py cannot import this module).
register_saver(save_model)
