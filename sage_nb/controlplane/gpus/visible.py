"""Which GPU devices this server may use: its own ``CUDA_VISIBLE_DEVICES``, read as CUDA reads it,
narrowed by the ``gpus`` setting. Pure functions over the inventory's readings (its units: whole
GPUs and MIG devices; and its GPUs, MIG-mode ones too).

``CUDA_VISIBLE_DEVICES`` as CUDA reads it (CUDA C Programming Guide, "CUDA Environment Variables"):
a comma-separated list of GPU indices, ``GPU-<uuid>`` or ``MIG-<uuid>``; a UUID may be shortened to
a prefix that names one device only; an empty value hides every GPU; the first entry that names no
device ends the list (``0,2,-1,1`` makes GPUs 0 and 2 visible). Unset: every GPU. Here an index or
a ``GPU-`` UUID of a GPU in MIG mode names all of its MIG devices, a ``MIG-`` UUID that one device;
a repeated entry counts once. The legacy ``MIG-GPU-<uuid>/<gi>/<ci>`` form is not read (it ends
the list, with a warning).

Indices: CUDA numbers GPUs by ``CUDA_DEVICE_ORDER``: ``PCI_BUS_ID`` is NVML's order, which sage_nb
uses; the default ``FASTEST_FIRST`` is the same order on a box of one GPU model, but on a box with
different models CUDA may number them otherwise. Indices are then still read in NVML order, with a
warning that only UUIDs (or ``CUDA_DEVICE_ORDER=PCI_BUS_ID``) are unambiguous.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..errors import BadRequest


@dataclass
class View:
    """The units this server may use, what was doubtful, and why there are none (if so)."""

    devices: list = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    why_none: str | None = None


def parse_gpus(value) -> list[int | str] | None:
    """The ``gpus`` setting: GPU indices (as sage_nb lists them) and ``GPU-``/``MIG-`` UUIDs, as a
    list, a JSON list or a comma-separated string; ``None`` or ``""``: no restriction. Anything
    else is a configuration error."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise BadRequest(f"gpus: {value!r} is not a JSON list: {e}") from None
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise BadRequest(f"gpus must be a list of GPU indices and UUIDs, got {value!r}")
    out: list[int | str] = []
    for item in items:
        text = item.strip() if isinstance(item, str) else item
        if isinstance(text, str) and text.isdigit():
            text = int(text)
        if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
            entry: int | str = text
        elif isinstance(text, str) and text[:4].upper() in ("GPU-", "MIG-") and len(text) > 4:
            entry = text
        else:
            raise BadRequest(f"gpus: {item!r} is neither a GPU index (0, 1, ...) nor a GPU-/MIG- UUID")
        if entry not in out:
            out.append(entry)
    return out


def _by_uuid(prefix: str, uuids: list[str]) -> list[str]:
    return [u for u in uuids if u.lower().startswith(prefix.lower())]


def _units_of_gpu(gpu_index: int, units: list) -> list:
    return [u for u in units if u.gpu_index == gpu_index]


def _cuda_entry(token: str, units: list, gpus: list) -> list | None:
    """The units one ``CUDA_VISIBLE_DEVICES`` entry names, or ``None`` when it names no device."""
    if token.isdigit():
        index = int(token)
        return _units_of_gpu(index, units) if any(g.index == index for g in gpus) else None
    if token[:4].upper() == "GPU-":
        match = _by_uuid(token, [g.uuid for g in gpus])
        return _units_of_gpu(next(g.index for g in gpus if g.uuid == match[0]), units) if len(match) == 1 else None
    if token[:4].upper() == "MIG-":
        match = _by_uuid(token, [u.uuid for u in units if u.mig])
        return [u for u in units if u.uuid == match[0]] if len(match) == 1 else None
    return None


def named_by_cuda(value: str, order: str | None, units: list, gpus: list) -> tuple[list, list[str]]:
    """The units a ``CUDA_VISIBLE_DEVICES`` value names, in its order, and warnings."""
    named: list = []
    warnings: list[str] = []
    if not value.strip():
        return named, warnings
    entries = [e.strip() for e in value.split(",")]
    by_index = False
    for n, token in enumerate(entries):
        found = _cuda_entry(token, units, gpus)
        if found is None:
            rest = entries[n + 1:]
            warnings.append(f"CUDA_VISIBLE_DEVICES entry {token!r} names no GPU device of this machine: "
                            "CUDA ignores it" + (f" and every entry after it ({','.join(rest)})" if rest else ""))
            break
        by_index = by_index or token.isdigit()
        named += [u for u in found if u.uuid not in {k.uuid for k in named}]
    if by_index and order != "PCI_BUS_ID" and len({g.name for g in gpus}) > 1:
        warnings.append(f"CUDA_VISIBLE_DEVICES={value!r} names GPUs by index and this machine has different "
                        "GPU models: CUDA numbers them fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID, "
                        "sage_nb reads the indices in NVML (PCI bus) order; name the GPUs by UUID or set "
                        "CUDA_DEVICE_ORDER=PCI_BUS_ID")
    return named, warnings


def named_by_setting(entries: list[int | str], units: list, gpus: list) -> tuple[list, list[str]]:
    """The units the ``gpus`` setting names: an index of a GPU (all of its MIG devices if it is in
    MIG mode) or of a MIG device as sage_nb lists it, a ``GPU-`` or ``MIG-`` UUID (or a prefix
    that names one device). Entries that name nothing give warnings."""
    named: list = []
    warnings: list[str] = []
    for entry in entries:
        if isinstance(entry, int):
            if any(g.index == entry for g in gpus):
                found = _units_of_gpu(entry, units)
            else:
                found = [u for u in units if u.index == entry and u.mig] or None
        else:
            found = _cuda_entry(entry, units, gpus)
        if found is None:
            warnings.append(f"the gpus setting names {entry!r}, which is no GPU device of this machine")
            continue
        named += [u for u in found if u.uuid not in {k.uuid for k in named}]
    return named, warnings


def visible(units: list, gpus: list, cuda_visible: str | None, order: str | None,
            setting: list[int | str] | None) -> View:
    """The units this server may use: those its ``CUDA_VISIBLE_DEVICES`` names (all when unset),
    narrowed by the ``gpus`` setting (``None``: no restriction); in the inventory's order."""
    view = View(devices=list(units))
    if not units and gpus:
        view.why_none = "every GPU of this machine is in MIG mode without MIG devices"
    if cuda_visible is not None:
        named, warnings = named_by_cuda(cuda_visible, order, units, gpus)
        view.warnings += warnings
        keep = {u.uuid for u in named}
        view.devices = [u for u in view.devices if u.uuid in keep]
        if units and not view.devices:
            view.why_none = (f"this server's CUDA_VISIBLE_DEVICES={cuda_visible!r} leaves it none of this "
                             f"machine's {len(units)} GPU device(s)")
    if setting is not None:
        named, warnings = named_by_setting(setting, units, gpus)
        view.warnings += warnings
        before, keep = len(view.devices), {u.uuid for u in named}
        outside = [u.index for u in named if u.uuid not in {d.uuid for d in view.devices}]
        if outside and cuda_visible is not None:
            view.warnings.append(f"the gpus setting names GPU device(s) {outside}, which this server's "
                                 f"CUDA_VISIBLE_DEVICES={cuda_visible!r} does not give it")
        view.devices = [u for u in view.devices if u.uuid in keep]
        if before and not view.devices:
            given = f" (CUDA_VISIBLE_DEVICES={cuda_visible!r})" if cuda_visible is not None else ""
            view.why_none = f"the gpus setting {setting} leaves this server none of the GPU devices it may use{given}"
    return view
