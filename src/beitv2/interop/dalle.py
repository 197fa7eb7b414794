"""OpenAI DALL-E dVAE files (``encoder.pkl`` / ``decoder.pkl`` of the `dall_e` package), read without running code.

BEiT v1 takes its visual tokens from DALL-E's frozen dVAE encoder: ``argmax`` of the encoder's logits on the
112 px second view mapped by ``map_pixels`` (``(1 - 2 eps) x + eps``, eps 0.1). The released files are whole
modules saved with ``torch.save(module)``, i.e. pickles naming the `dall_e` classes. Unpickling them the usual way
imports `dall_e` and runs whatever the pickle asks for. Here a restricted unpickler reconstructs the tensors only:

* an allow-list of globals: the tensor-rebuilding functions (our own implementations, never torch's pickle hooks),
  the storage type markers, ``collections.OrderedDict`` and ``set``;
* the module classes these files name (`dall_e`'s Encoder/Decoder/blocks/Conv2d, the few ``torch.nn`` modules they
  hold, ``torch.device``) become inert records of their pickled state: nothing of theirs is imported or called;
* any other global (``os.system``, ``builtins.eval``, ...) is refused with an `UnpicklingError` naming it.

Both of torch's file formats are read: the zip archive (``torch.save`` since torch 1.6) and the older stream of
pickles followed by the raw storages (``_use_new_zipfile_serialization=False``); the same allow-list applies to both.

The convolutions' ``w``/``b`` (``blocks.input``, ``blocks.group_k.block_j.{id_path, res_path.conv_i}``,
``blocks.output.conv``) are then mapped onto `beitv2.models.dvae.DiscreteVAE`: the encoder one to one; the
decoder's input 1x1 convolution over the one-hot codes becomes the codebook (its bias folded into every row, exact
for one-hot inputs), the rest one to one. The model uses DALL-E's pixel mapping and logit-Laplace output.
"""

from __future__ import annotations

import io
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from ..models.dvae import DecoderBlock, DiscreteVAE, DVAEConfig, EncoderBlock

_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
           "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
           "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
           "BoolStorage": torch.bool}

# classes the DALL-E files name; they are recorded, never imported
_RECORDED = {
    ("dall_e.encoder", "Encoder"), ("dall_e.encoder", "EncoderBlock"), ("dall_e.decoder", "Decoder"),
    ("dall_e.decoder", "DecoderBlock"), ("dall_e.utils", "Conv2d"), ("torch", "device"),
    ("torch.nn.modules.container", "Sequential"), ("torch.nn.modules.activation", "ReLU"),
    ("torch.nn.modules.pooling", "MaxPool2d"), ("torch.nn.modules.upsampling", "Upsample"),
    ("torch.nn.modules.linear", "Identity"),
}


class _Record:
    """Stands in for a pickled object of an allowed class: keeps its constructor arguments and state, runs nothing."""

    qualname = ""

    def __init__(self, *args, **kwargs):
        self.args, self.state = args, None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, *_unused) -> torch.Tensor:
    return storage.as_strided(tuple(size), tuple(stride), int(offset))


def _rebuild_parameter(data: torch.Tensor, *_unused) -> torch.Tensor:
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals; storages come from ``storage(pid)`` (the file format's reader)."""

    def __init__(self, file, path: str, storage=None):
        super().__init__(file)
        self.path, self.storage = path, storage
        self.records: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("builtins", "set"):
            return set
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in _DTYPES:
            return _StorageType(_DTYPES[name])
        if (module, name) in _RECORDED:
            if (module, name) not in self.records:
                self.records[module, name] = type(name, (_Record,), {"qualname": f"{module}.{name}"})
            return self.records[module, name]
        raise pickle.UnpicklingError(f"{self.path}: refusing to load global {module}.{name} (not a tensor or a "
                                     "DALL-E dVAE module)")

    def persistent_load(self, pid: Any) -> Any:
        if self.storage is None:
            raise pickle.UnpicklingError(f"{self.path}: unexpected persistent id in a header record")
        return self.storage(pid)


def _storage_pid(pid: Any, path: str, length: int) -> tuple[_StorageType, str, int]:
    """(dtype marker, key, element count) of a ('storage', type, key, location, numel[, view]) persistent id."""
    if not (isinstance(pid, tuple) and len(pid) == length and pid[0] in ("storage", b"storage")
            and isinstance(pid[1], _StorageType)):
        raise pickle.UnpicklingError(f"{path}: unexpected persistent id {pid!r}")
    return pid[1], str(pid[2]), int(pid[4])


def _read_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ValueError(f"{path}: no single <name>/data.pkl record in the archive")
        prefix = pkl[0].split("/", 1)[0]
        order = f"{prefix}/byteorder"
        if order in archive.namelist() and archive.read(order).strip() != b"little":
            raise ValueError(f"{path}: big-endian tensors are not supported")

        def storage(pid: Any) -> torch.Tensor:
            stype, key, numel = _storage_pid(pid, str(path), 5)
            if numel == 0:
                return torch.empty(0, dtype=stype.dtype)
            raw = archive.read(f"{prefix}/data/{key}")
            return torch.frombuffer(bytearray(raw), dtype=stype.dtype)[:numel]

        with archive.open(pkl[0]) as f:
            return _RestrictedUnpickler(f, str(path), storage).load()


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001


def _is_legacy(head: bytes) -> bool:
    """Whether ``head`` starts with the legacy format's magic-number pickle (read with no global allowed)."""
    try:
        return _RestrictedUnpickler(io.BytesIO(head), "").load() == _LEGACY_MAGIC
    except Exception:  # any other file: not legacy
        return False


def _read_legacy(path: Path) -> Any:
    """The pre-zip format: pickles of the magic number, protocol and system info, the object tree (storages as
    ('storage', type, key, location, numel, view) ids, module classes as ('module', class, file, source) ids), the
    list of storage keys, then per key its element count (int64) and raw bytes."""
    what = str(path)
    storages: dict[str, torch.Tensor] = {}

    def load_id(pid: Any) -> Any:
        if isinstance(pid, tuple) and pid and pid[0] in ("module", b"module"):
            if len(pid) != 4 or not isinstance(pid[1], type) or not issubclass(pid[1], _Record):
                raise pickle.UnpicklingError(f"{what}: unexpected module id {pid[:2]!r}")
            return pid[1]
        stype, key, numel = _storage_pid(pid, what, 6)
        if pid[5] is not None:
            raise ValueError(f"{what}: storage views are not supported")
        if key not in storages:
            storages[key] = torch.empty(numel, dtype=stype.dtype)
        elif storages[key].dtype != stype.dtype or storages[key].numel() != numel:
            raise ValueError(f"{what}: storage {key} is named with two types or sizes")
        return storages[key]

    with open(path, "rb") as f:
        header = [_RestrictedUnpickler(f, what).load() for _ in range(3)]
        if header[0] != _LEGACY_MAGIC or header[1] != _LEGACY_PROTOCOL:
            raise ValueError(f"{what}: not a torch file (bad magic number or protocol {header[1]!r})")
        if not isinstance(header[2], dict) or not header[2].get("little_endian", False):
            raise ValueError(f"{what}: big-endian tensors are not supported")
        obj = _RestrictedUnpickler(f, what, load_id).load()
        keys = _RestrictedUnpickler(f, what).load()
        if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
            raise ValueError(f"{what}: the storage list does not match the tensors of the file")
        for key in map(str, keys):
            t = storages[key]
            count = f.read(8)
            if len(count) != 8 or struct.unpack("<q", count)[0] != t.numel():
                raise ValueError(f"{what}: storage {key} is truncated or has the wrong size")
            raw = f.read(t.numel() * t.element_size())
            if len(raw) != t.numel() * t.element_size():
                raise ValueError(f"{what}: storage {key} is truncated")
            if t.numel():
                t.copy_(torch.frombuffer(bytearray(raw), dtype=t.dtype))
    return obj


def read_torch_pickle(path: str | Path) -> Any:
    """The object tree of a ``torch.save`` file (zip or legacy format), with allowed classes as inert `_Record`
    objects."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        return _read_zip(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if _is_legacy(head):
        return _read_legacy(path)
    raise ValueError(f"{path}: not a torch.save file (neither the zip nor the legacy format); DALL-E's encoder.pkl "
                     "and decoder.pkl are torch.save files")


def module_tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """``state_dict()``-style names -> tensors of a recorded ``nn.Module`` tree."""
    state = obj.state if isinstance(obj, _Record) else None
    if not isinstance(state, dict):
        raise ValueError(f"{prefix or 'the file'}: not a pickled torch module")
    out: dict[str, torch.Tensor] = {}
    for group in ("_parameters", "_buffers"):
        for name, t in (state.get(group) or {}).items():
            if t is not None:
                out[prefix + name] = t.clone()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(module_tensors(child, f"{prefix}{name}."))
    return out


def read_dalle(path: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """('encoder' | 'decoder', tensors) of a DALL-E dVAE file."""
    obj = read_torch_pickle(path)
    kind = getattr(obj, "qualname", "")
    if kind not in ("dall_e.encoder.Encoder", "dall_e.decoder.Decoder"):
        raise ValueError(f"{path}: not a DALL-E dVAE encoder or decoder (holds {kind or type(obj).__name__})")
    return kind.rsplit(".", 1)[1].lower(), module_tensors(obj)


def is_dalle_file(path: str | Path) -> bool:
    """A torch file (zip or legacy format) whose pickle names DALL-E's Encoder or Decoder (checked without
    unpickling)."""
    p = Path(path)
    if not p.is_file():
        return False
    if zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as archive:
            pkl = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            return bool(pkl) and re.search(rb"dall_e\.(encoder|decoder)", archive.read(pkl[0])) is not None
    with open(p, "rb") as f:
        head = f.read(1 << 20)  # the object tree precedes the raw storages
    return _is_legacy(head) and re.search(rb"dall_e\.(encoder|decoder)", head) is not None


def _groups(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    groups = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.group_(\d+)\.", k))}
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.group_1\.block_(\d+)\.", k))}
    if not groups or groups != set(range(1, len(groups) + 1)) or not blocks:
        raise ValueError("not a DALL-E dVAE: no blocks.group_k.block_j convolutions")
    return len(groups), len(blocks)


def dalle_config(encoder: dict[str, torch.Tensor], decoder: dict[str, torch.Tensor] | None = None,
                 img_size: int = 112) -> DVAEConfig:
    """The `DVAEConfig` of DALL-E weights: sizes read from the tensors, DALL-E's pixel mapping and output."""
    n_groups, per_group = _groups(encoder)
    hidden, in_chans = encoder["blocks.input.w"].shape[:2]
    vocab = encoder["blocks.output.conv.w"].shape[0]
    code_dim = 128  # DALL-E's n_init; only used by a decoder
    if decoder is not None:
        if _groups(decoder) != (n_groups, per_group):
            raise ValueError("DALL-E encoder and decoder have different group / block counts")
        code_dim, dvocab = decoder["blocks.input.w"].shape[:2]
        out2, dhidden = decoder["blocks.output.conv.w"].shape[:2]
        if dvocab != vocab or dhidden != hidden or out2 != 2 * in_chans:
            raise ValueError(f"DALL-E decoder (vocab {dvocab}, width {dhidden}, {out2 // 2} channels) does not fit "
                             f"the encoder (vocab {vocab}, width {hidden}, {in_chans} channels)")
    return DVAEConfig(img_size=img_size, in_chans=int(in_chans), downsample=2 ** (n_groups - 1),
                      vocab_size=int(vocab), code_dim=int(code_dim), hidden_dim=int(hidden),
                      blocks_per_group=per_group, rec_loss="logit-laplace", pixel_map="dall-e",
                      logit_laplace_eps=0.1)


def _conv_map(blocks: torch.nn.Sequential, n_groups: int, per_group: int, res_order: tuple[str, ...]
              ) -> dict[str, str]:
    """Our ``blocks.<i>...`` conv prefixes -> DALL-E's names, by walking our Sequential in order."""
    out: dict[str, str] = {}
    res_blocks = [i for i, m in enumerate(blocks) if isinstance(m, (EncoderBlock, DecoderBlock))]
    if len(res_blocks) != n_groups * per_group:
        raise ValueError("model and DALL-E weights differ in their number of blocks")
    for n, i in enumerate(res_blocks):
        g, j = divmod(n, per_group)
        name = f"blocks.group_{g + 1}.block_{j + 1}"
        convs = [k for k, m in enumerate(blocks[i].res_path) if isinstance(m, torch.nn.Conv2d)]
        for k, c in zip(convs, res_order):
            out[f"blocks.{i}.res_path.{k}"] = f"{name}.res_path.{c}"
        if isinstance(blocks[i].id_path, torch.nn.Conv2d):
            out[f"blocks.{i}.id_path"] = f"{name}.id_path"
    out[f"blocks.{len(blocks) - 1}"] = "blocks.output.conv"
    return out


def _copy(module: torch.nn.Module, mapping: dict[str, str], state: dict[str, torch.Tensor], what: str
          ) -> tuple[dict[str, torch.Tensor], set[str]]:
    ours = module.state_dict()
    new = dict(ours)
    used = set()
    for mine, theirs in mapping.items():
        for a, b in (("weight", "w"), ("bias", "b")):
            src = state.get(f"{theirs}.{b}")
            if src is None or src.shape != ours[f"{mine}.{a}"].shape:
                raise ValueError(f"{what}: {theirs}.{b} {None if src is None else tuple(src.shape)} does not fit "
                                 f"{mine}.{a} {tuple(ours[f'{mine}.{a}'].shape)}")
            new[f"{mine}.{a}"] = src.float()
            used.add(f"{theirs}.{b}")
    return new, used


def load_dalle(encoder_path: str | Path, decoder_path: str | Path | None = None, img_size: int = 112
               ) -> DiscreteVAE:
    """A `DiscreteVAE` (eval mode) holding DALL-E's encoder (and decoder, when given; else a random decoder)."""
    kind, enc = read_dalle(encoder_path)
    if kind != "encoder":
        raise ValueError(f"{encoder_path}: holds a DALL-E decoder; pass the encoder file first")
    dec = None
    if decoder_path is not None:
        dkind, dec = read_dalle(decoder_path)
        if dkind != "decoder":
            raise ValueError(f"{decoder_path}: holds a DALL-E encoder, not a decoder")
    cfg = dalle_config(enc, dec, img_size)
    model = DiscreteVAE(cfg)
    n_groups, per_group = _groups(enc)
    enc_map = {"blocks.0": "blocks.input",
               **_conv_map(model.encoder.blocks, n_groups, per_group, ("conv_1", "conv_2", "conv_3", "conv_4"))}
    new, used = _copy(model.encoder, enc_map, enc, str(encoder_path))
    if set(enc) - used:
        raise ValueError(f"{encoder_path}: tensors left unmapped: {sorted(set(enc) - used)[:6]}")
    model.encoder.load_state_dict(new)
    if dec is not None:
        dec_map = _conv_map(model.decoder.blocks, n_groups, per_group, ("conv_1", "conv_2", "conv_3", "conv_4"))
        new, used = _copy(model.decoder, dec_map, dec, str(decoder_path))
        used |= {"blocks.input.w", "blocks.input.b"}
        if set(dec) - used:
            raise ValueError(f"{decoder_path}: tensors left unmapped: {sorted(set(dec) - used)[:6]}")
        model.decoder.load_state_dict(new)
        w, b = dec["blocks.input.w"].float()[:, :, 0, 0], dec["blocks.input.b"].float()
        with torch.no_grad():  # conv over a one-hot code = column of w plus b
            model.codebook.weight.copy_(w.t() + b)
    return model.eval()
