#!/usr/bin/env python3
"""Rewrites a safetensors checkpoint as sharded PyTorch pickles (`pytorch_model-*.bin`, f32),
the format the original KoLLaVA and LLaVA v0 releases ship, without needing torch.

Used by BENCHMARKS.md to measure loading an f32 `.bin` checkpoint (peak memory must stay at
one copy of the weights). Only numpy is needed; the pickle references torch's classes by name,
exactly as `torch.save` writes them, so torch and kollava both read the result.

    python3 scripts/safetensors_to_pth.py SRC_DIR OUT_DIR [--shard-gb 2]
"""

import argparse
import collections
import json
import pathlib
import pickle
import shutil
import struct
import sys
import types
import zipfile

import numpy as np

# Stand-ins for the two torch names a state dict pickle refers to. Pickle stores classes and
# functions by module and name, so these write the same bytes torch would.
_torch = types.ModuleType("torch")
_utils = types.ModuleType("torch._utils")


class FloatStorage:
    pass


def _rebuild_tensor_v2(*args):
    raise RuntimeError("only for writing")


FloatStorage.__module__ = "torch"
_rebuild_tensor_v2.__module__ = "torch._utils"
_torch.FloatStorage = FloatStorage
_torch._utils = _utils
_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
sys.modules.setdefault("torch", _torch)
sys.modules.setdefault("torch._utils", _utils)


class Storage:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class TensorRef:
    """Pickles as torch's `_rebuild_tensor_v2(storage, 0, shape, stride, False, {})`."""

    def __init__(self, storage, shape):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce__(self):
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.append(acc)
            acc *= d
        args = (self.storage, 0, self.shape, tuple(reversed(stride)), False,
                collections.OrderedDict())
        return (_rebuild_tensor_v2, args)


class StatePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", FloatStorage, obj.key, "cpu", obj.numel)
        return None


def read_safetensors(path):
    """(name, dtype, shape, offset of the data in the file) per tensor."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return [(k, v["dtype"], v["shape"], 8 + n + v["data_offsets"][0], v["data_offsets"])
            for k, v in header.items()]


def as_f32(raw, dtype):
    if dtype == "F32":
        return np.frombuffer(raw, dtype="<f4")
    if dtype == "F16":
        return np.frombuffer(raw, dtype="<f2").astype("<f4")
    if dtype == "BF16":
        return (np.frombuffer(raw, dtype="<u2").astype("<u4") << 16).view("<f4")
    raise SystemExit(f"unsupported dtype {dtype}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=pathlib.Path)
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    a = ap.parse_args()
    index = a.src / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({a.src / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(a.src.glob("model*.safetensors"))
    if not files:
        raise SystemExit(f"no model*.safetensors in {a.src}")
    tensors = [(f, *t) for f in files for t in read_safetensors(f)]
    a.out.mkdir(parents=True, exist_ok=False)
    for p in a.src.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and "index" not in p.name:
            shutil.copy(p, a.out / p.name)
    # Shards of at most --shard-gb of f32.
    shards, cur, size = [], [], 0
    for t in tensors:
        nbytes = 4 * int(np.prod(t[3], dtype=np.int64))
        if cur and size + nbytes > a.shard_gb * 1e9:
            shards.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += nbytes
    shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        prefix = name[:-4]
        state = collections.OrderedDict()
        tmp = a.out / (name + ".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for key, (f, tname, dtype, shape, offset, (lo, hi)) in enumerate(shard):
                with open(f, "rb") as src:
                    src.seek(offset)
                    data = as_f32(src.read(hi - lo), dtype)
                with z.open(f"{prefix}/data/{key}", "w", force_zip64=True) as dst:
                    dst.write(data.tobytes())
                state[tname] = TensorRef(Storage(str(key), data.size), shape)
                weight_map[tname] = name
                total += data.nbytes
            buf = __import__("io").BytesIO()
            StatePickler(buf, protocol=2).dump(state)
            z.writestr(f"{prefix}/data.pkl", buf.getvalue())
            z.writestr(f"{prefix}/version", "3\n")
        tmp.rename(a.out / name)
        print(f"{name}: {len(shard)} tensors", file=sys.stderr)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (a.out / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


if __name__ == "__main__":
    main()
