"""The synthesis fabric: generator protocol and the table of generators, shard files, synthesize/regenerate.

A generator turns (params, seed, shard index, count) into a dict of numpy arrays whose first
axis is the example. Every shard draws from its own ``np.random.default_rng(SeedSequence([seed,
shard]))``, so shards are independent, can run as separate subtasks on different workers and
are bit-identical whenever they are regenerated.

Shard files are written by our own small encoders (uncompressed ``.npz`` with fixed zip
timestamps, or safetensors) because ``np.savez`` stamps the current time into the zip and
would make every run's bytes — and hashes — differ.

No torch here: the CLI imports this module.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Final, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from schema.artifact_store import ArtifactStore
from schema.artifacts import HEAD_FIELDS, CorruptArtifactError, FieldSpec, Lineage, Manifest, ShardInfo
from schema.ticket import DEFAULT_SHARD_SIZE

ShardFormat = Literal["npz", "safetensors"]
Arrays = dict[str, np.ndarray]

# Every generator a ticket may name: name -> "module:Class", imported on first lookup. This table is
# the whole list (nothing registers itself by being imported); a new generator is one line here.
GENERATORS: Final[dict[str, str]] = {
    "shapes": "workers.synth.shapes:ShapesGenerator",
    "sudoku": "workers.synth.sudoku:SudokuGenerator",
    "maze": "workers.synth.maze:MazeGenerator",
    "text": "workers.synth.text:TextGenerator",
    "glyphs": "workers.synth.glyphs:GlyphGenerator",
    "visual_sudoku": "workers.synth.glyphs:VisualSudokuGenerator",
}


class SynthError(Exception):
    """A synthesis failed for a reason the user can act on."""


class UnknownGeneratorError(SynthError, KeyError):
    """No generator of that name is in `GENERATORS`."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown generator"


class ParamsModel(BaseModel):
    """Base of every generator's Params: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@runtime_checkable
class Generator(Protocol):
    """What a synthetic data generator provides."""

    name: ClassVar[str]
    version: ClassVar[str]

    @property
    def Params(self) -> type[ParamsModel]:  # a ClassVar in implementations
        """The pydantic model of the generator's parameters."""
        ...

    def generate(self, params: Any, seed: int, shard: int, count: int) -> Arrays:
        """`count` examples of shard `shard`, deterministically from (params, seed, shard)."""
        ...

    def label_schema(self, params: Any) -> dict[str, FieldSpec]:
        """dtype and per-example shape of each array that `generate` returns."""
        ...

    def preview(self, arrays: Mapping[str, np.ndarray], limit: int) -> str:
        """A human-readable rendering of the first `limit` examples."""
        ...

    def preview_images(self, arrays: Mapping[str, np.ndarray], limit: int) -> np.ndarray | None:
        """uint8 [K, H, W] or [K, H, W, 3] images for a contact sheet, or None for non-image data."""
        ...


_LOADED: dict[str, Generator] = {}  # instances made so far (generators are stateless)


def _load(name: str) -> Generator:
    loaded = _LOADED.get(name)
    if loaded is not None:
        return loaded
    module, _, attr = GENERATORS[name].partition(":")
    generator = getattr(importlib.import_module(module), attr)()
    if generator.name != name:  # the table and the class must agree, or manifests would lie
        raise SynthError(f"GENERATORS[{name!r}] names {GENERATORS[name]}, whose name is {generator.name!r}")
    _LOADED[name] = generator
    return generator


def generators() -> dict[str, Generator]:
    """Every generator by name (each module is imported on first use)."""
    return {name: _load(name) for name in sorted(GENERATORS)}


def get_generator(name: str | Generator) -> Generator:
    """The generator named `name` in `GENERATORS` (an instance is returned as is)."""
    if not isinstance(name, str):
        return name
    if name not in GENERATORS:
        known = ", ".join(sorted(GENERATORS))
        raise UnknownGeneratorError(f"unknown generator {name!r}; known generators: {known}")
    return _load(name)


def _format_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)  # whole-model checks name their fields themselves
    return "; ".join(parts)


def validate_params(generator: str | Generator, params: Mapping[str, Any] | BaseModel | None) -> Any:
    """Validate raw parameters against the generator's Params model.

    Raises SynthError naming each bad field (e.g. ``size: Input should be 32 or 64``).
    """
    gen = get_generator(generator)
    if isinstance(params, gen.Params):
        return params
    raw = params.model_dump() if isinstance(params, BaseModel) else dict(params or {})
    try:
        return gen.Params.model_validate(raw)
    except ValidationError as exc:
        raise SynthError(f"invalid {gen.name} parameters: {_format_errors(exc)}") from None


class SynthesisRequest(BaseModel):
    """What a `synthesize` step asks for; validating it checks the generator and its parameters."""

    model_config = ConfigDict(extra="forbid")

    generator: str
    params: dict[str, Any] = Field(default_factory=dict)
    seed: int = Field(default=0, ge=0, lt=2**63)
    count: int = Field(ge=1, le=100_000_000)
    shard_size: int = Field(default=DEFAULT_SHARD_SIZE, ge=1, le=10_000_000)
    format: ShardFormat = "npz"

    @field_validator("generator")
    @classmethod
    def _known(cls, value: str) -> str:
        try:
            get_generator(value)
        except UnknownGeneratorError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("params")
    @classmethod
    def _params(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        generator = info.data.get("generator")
        if generator is None:  # already reported as an unknown generator
            return value
        try:
            normal = validate_params(generator, value)
        except SynthError as exc:
            raise ValueError(str(exc)) from None
        return dict(normal.model_dump(mode="json"))


# ---------------------------------------------------------------------------------------------
# Seeding and shard planning


def shard_rng(seed: int, shard: int) -> np.random.Generator:
    """The random generator of one shard: PCG64 seeded from (seed, shard index)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(shard)]))


def shard_counts(count: int, shard_size: int) -> list[int]:
    """How many examples each shard holds: full shards, then the remainder."""
    if count < 0 or shard_size < 1:
        raise SynthError(f"count must be >= 0 and shard_size >= 1 (got {count}, {shard_size})")
    full, rest = divmod(count, shard_size)
    return [shard_size] * full + ([rest] if rest else [])


# ---------------------------------------------------------------------------------------------
# Shard encoding: deterministic bytes


_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_ST_DTYPES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int16": "I16",
    "uint16": "U16",
    "int32": "I32",
    "uint32": "U32",
    "int64": "I64",
    "uint64": "U64",
    "float16": "F16",
    "float32": "F32",
    "float64": "F64",
}
_ST_BACK = {v: k for k, v in _ST_DTYPES.items()}


def _little(arr: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if arr.dtype.hasobject:
        raise SynthError("object arrays cannot be stored; use fixed-width strings (dtype '<U..')")
    return arr


def encode_npz(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An uncompressed .npz with fixed metadata: same arrays → same bytes (np.load reads it)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, _little(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.create_system = 3
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_STORED
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def encode_safetensors(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The safetensors format (numeric arrays only), with a sorted, space-padded header."""
    header: dict[str, Any] = {}
    blobs = []
    offset = 0
    for name in sorted(arrays):
        arr = _little(arrays[name])
        code = _ST_DTYPES.get(arr.dtype.name)
        if code is None:
            raise SynthError(f"safetensors cannot store array {name!r} of dtype {arr.dtype}; use format 'npz'")
        data = arr.tobytes()
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # align the data to 8 bytes
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def encode_shard(arrays: Mapping[str, np.ndarray], fmt: ShardFormat = "npz") -> bytes:
    """Shard bytes in the given format."""
    return encode_npz(arrays) if fmt == "npz" else encode_safetensors(arrays)


class ShardFormatError(SynthError):
    """A shard file cannot be parsed (truncated or altered)."""


def _read_npz(path: Path, mmap: bool) -> Arrays:
    out: Arrays = {}
    try:
        with zipfile.ZipFile(path) as zf, path.open("rb") as fh:
            for info in zf.infolist():
                name = info.filename.removesuffix(".npy")
                if not mmap or info.compress_type != zipfile.ZIP_STORED:
                    with zf.open(info) as member:
                        out[name] = np.lib.format.read_array(member, allow_pickle=False)
                    continue
                # A stored member is contiguous in the file: map it instead of reading it.
                fh.seek(info.header_offset)
                local = fh.read(30)
                if len(local) != 30 or local[:4] != b"PK\x03\x04":
                    raise ShardFormatError(f"{path}: bad zip member header for {name!r}")
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                fh.seek(info.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
                start = fh.tell()
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                if start + nbytes > path.stat().st_size:
                    raise ShardFormatError(f"{path}: array {name!r} runs past the end of the file (truncated?)")
                if nbytes == 0:
                    out[name] = np.empty(shape, dtype=dtype)
                else:
                    order: Literal["F", "C"] = "F" if fortran else "C"
                    out[name] = np.memmap(path, dtype=dtype, mode="r", offset=start, shape=shape, order=order)
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as exc:
        raise ShardFormatError(f"{path}: cannot read shard: {exc}") from None
    return out


def _read_safetensors(path: Path, mmap: bool) -> Arrays:
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (head_len,) = struct.unpack("<Q", fh.read(8))
            if head_len > size - 8:
                raise ShardFormatError(f"{path}: header runs past the end of the file (truncated?)")
            header = json.loads(fh.read(head_len))
    except (struct.error, ValueError) as exc:
        raise ShardFormatError(f"{path}: cannot read shard: {exc}") from None
    base = 8 + head_len
    out: Arrays = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        dtype = np.dtype(_ST_BACK[spec["dtype"]])
        begin, end = spec["data_offsets"]
        shape = tuple(spec["shape"])
        if base + end > size:
            raise ShardFormatError(f"{path}: array {name!r} runs past the end of the file (truncated?)")
        if end == begin:
            out[name] = np.empty(shape, dtype=dtype)
        elif mmap:
            out[name] = np.memmap(path, dtype=dtype, mode="r", offset=base + begin, shape=shape)
        else:
            with path.open("rb") as fh:
                fh.seek(base + begin)
                out[name] = np.frombuffer(fh.read(end - begin), dtype=dtype).reshape(shape)
    return out


def read_shard(path: Path | str, fmt: ShardFormat = "npz", mmap: bool = True) -> Arrays:
    """Load a shard file; arrays are memory-mapped when `mmap` and the layout allows it."""
    path = Path(path)
    return _read_npz(path, mmap) if fmt == "npz" else _read_safetensors(path, mmap)


def decode_shard(data: bytes, fmt: ShardFormat = "npz") -> Arrays:
    """Arrays from shard bytes held in memory."""
    if fmt == "npz":
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    (head_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + head_len])
    base = 8 + head_len
    return {
        name: np.frombuffer(
            data[base + s["data_offsets"][0] : base + s["data_offsets"][1]], dtype=_ST_BACK[s["dtype"]]
        ).reshape(s["shape"])
        for name, s in header.items()
        if name != "__metadata__"
    }


# ---------------------------------------------------------------------------------------------
# Synthesis


def check_arrays(generator: Generator, params: Any, arrays: Mapping[str, np.ndarray], count: int) -> None:
    """Fail loudly when a generator's output does not match its declared label schema."""
    schema = generator.label_schema(params)
    if set(arrays) != set(schema):
        raise SynthError(f"{generator.name}: arrays {sorted(arrays)} differ from the schema {sorted(schema)}")
    for name, spec in schema.items():
        arr = arrays[name]
        want_shape = (count, *spec.shape)
        kind_ok = arr.dtype.str.lstrip("<>|=") == spec.dtype.lstrip("<>|=") or (
            spec.dtype.startswith("<U") and arr.dtype.kind == "U"
        )
        if not kind_ok or arr.shape != want_shape:
            raise SynthError(
                f"{generator.name}: array {name!r} is {arr.dtype}{list(arr.shape)}, "
                f"schema says {spec.dtype}{list(want_shape)}"
            )


def generate_shard(
    generator: str | Generator,
    params: Any,
    seed: int,
    shard: int,
    count: int,
    store: ArtifactStore,
    fmt: ShardFormat = "npz",
) -> ShardInfo:
    """Generate one shard, write it to the store and describe it (a subtask's unit of work)."""
    gen = get_generator(generator)
    p = validate_params(gen, params)
    if count < 0 or shard < 0:
        raise SynthError(f"count and shard must be >= 0 (got count={count}, shard={shard})")
    arrays = gen.generate(p, seed, shard, count)
    check_arrays(gen, p, arrays, count)
    data = encode_shard(arrays, fmt)
    shard_id = store.put_bytes(data)
    return ShardInfo(index=shard, id=shard_id, size=len(data), count=count, format=fmt)


def manifest_head(request: SynthesisRequest) -> dict[str, Any]:
    """The manifest's fields but its shards, lineage and time (`schema.artifacts.HEAD_FIELDS`), as
    JSON: what a shard subtask reports so that its step's manifest is joined without a job."""
    gen = get_generator(request.generator)
    p = validate_params(gen, request.params)
    probe = Manifest(
        generator=gen.name,
        generator_version=gen.version,
        params=p.model_dump(mode="json"),
        seed=request.seed,
        count=request.count,
        shard_size=request.shard_size,
        shards=[],
        label_schema=gen.label_schema(p),
        split=getattr(p, "split", None),
        created_at=datetime(1970, 1, 1, tzinfo=UTC),
    ).model_dump(mode="json")
    return {k: probe[k] for k in HEAD_FIELDS}


def merge_manifest(
    generator: str | Generator,
    params: Any,
    seed: int,
    count: int,
    shard_size: int,
    shards: list[ShardInfo],
    store: ArtifactStore,
    lineage: Lineage | None = None,
    created_at: datetime | None = None,
) -> Manifest:
    """Check that `shards` are exactly the planned ones, then write and return the manifest."""
    gen = get_generator(generator)
    p = validate_params(gen, params)
    plan = shard_counts(count, shard_size)
    ordered = sorted(shards, key=lambda s: s.index)
    if [s.index for s in ordered] != list(range(len(plan))):
        raise SynthError(f"expected shards 0..{len(plan) - 1}, got {[s.index for s in ordered]}")
    for shard, want in zip(ordered, plan, strict=True):
        if shard.count != want:
            raise SynthError(f"shard {shard.index} holds {shard.count} examples, the plan says {want}")
    if created_at is None:
        created_at = datetime.now(UTC)  # workers are the impure edge; pure callers pass the time in
    manifest = Manifest(
        generator=gen.name,
        generator_version=gen.version,
        params=p.model_dump(mode="json"),
        seed=seed,
        count=count,
        shard_size=shard_size,
        shards=ordered,
        label_schema=gen.label_schema(p),
        split=getattr(p, "split", None),
        lineage=lineage or Lineage(),
        created_at=created_at,
    )
    store.put_manifest(manifest)
    return manifest


def synthesize(
    generator: str | Generator,
    params: Any,
    seed: int,
    count: int,
    shard_size: int,
    store: ArtifactStore,
    lineage: Lineage | None = None,
    *,
    created_at: datetime | None = None,
    fmt: ShardFormat = "npz",
    progress: Callable[[int, int], None] | None = None,
) -> Manifest:
    """Generate a whole dataset shard by shard into `store` and write its manifest.

    `progress(done, total)` is called after each shard. The manifest's id is `manifest.manifest_id()`.
    """
    request = SynthesisRequest(
        generator=generator if isinstance(generator, str) else generator.name,
        params=params.model_dump(mode="json") if isinstance(params, BaseModel) else dict(params or {}),
        seed=seed,
        count=count,
        shard_size=shard_size,
        format=fmt,
    )
    gen = get_generator(generator)
    p = validate_params(gen, request.params)
    shards = []
    done = 0
    for index, n in enumerate(shard_counts(count, shard_size)):
        shards.append(generate_shard(gen, p, seed, index, n, store, fmt))
        done += n
        if progress is not None:
            progress(done, count)
    return merge_manifest(gen, p, seed, count, shard_size, shards, store, lineage, created_at)


def generate_shards(
    request: SynthesisRequest,
    first: int,
    stop: int,
    store: ArtifactStore,
    progress: Callable[[int, int], None] | None = None,
) -> list[ShardInfo]:
    """Shard files `first..stop-1` of the dataset `request` describes (a subtask's part of it): the very
    files `synthesize` writes for those indices."""
    plan = shard_counts(request.count, request.shard_size)
    if not 0 <= first < stop <= len(plan):
        raise SynthError(f"shard range {first}..{stop - 1} is outside the dataset's {len(plan)} shard files")
    gen = get_generator(request.generator)
    p = validate_params(gen, request.params)
    out, done, total = [], 0, sum(plan[first:stop])
    for index in range(first, stop):
        out.append(generate_shard(gen, p, request.seed, index, plan[index], store, request.format))
        done += plan[index]
        if progress is not None:
            progress(done, total)
    return out


def load_arrays(manifest: Manifest, store: ArtifactStore, limit: int | None = None) -> Arrays:
    """All shards of a dataset concatenated in memory (verified), optionally only the first `limit`."""
    parts: dict[str, list[np.ndarray]] = {}
    have = 0
    for shard in manifest.shards:
        if limit is not None and have >= limit:
            break
        arrays = decode_shard(store.get_bytes(shard.id), shard.format)
        take = shard.count if limit is None else min(shard.count, limit - have)
        for name, arr in arrays.items():
            parts.setdefault(name, []).append(arr[:take])
        have += take
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


@dataclass
class ShardCheck:
    """One shard's expected and regenerated hash."""

    index: int
    expected: str
    actual: str
    restored: bool = False

    @property
    def ok(self) -> bool:
        return self.expected == self.actual


@dataclass
class RegenerateReport:
    """The result of `regenerate`."""

    manifest_id: str
    shards: list[ShardCheck] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and all(s.ok for s in self.shards)


def regenerate(manifest_id: str, store: ArtifactStore, repair: bool = True) -> RegenerateReport:
    """Rebuild every shard of a stored dataset from its manifest and compare hashes.

    With `repair`, a shard that regenerates identically replaces a missing or damaged object.
    """
    full = store.resolve(manifest_id)
    manifest = store.load_manifest(full)
    report = RegenerateReport(manifest_id=full)
    try:
        gen = get_generator(manifest.generator)
    except UnknownGeneratorError as exc:
        report.error = str(exc)
        return report
    if gen.version != manifest.generator_version:
        report.error = (
            f"generator {gen.name} is version {gen.version}, the dataset was made by version "
            f"{manifest.generator_version}: cannot regenerate bit for bit"
        )
        return report
    params = validate_params(gen, manifest.params)
    for shard in manifest.shards:
        arrays = gen.generate(params, manifest.seed, shard.index, shard.count)
        data = encode_shard(arrays, shard.format)
        check = ShardCheck(index=shard.index, expected=shard.id, actual=_sha256(data))
        if check.ok and repair and _damaged(store, shard):
            store.put_bytes(data, repair=True)
            check.restored = True
        report.shards.append(check)
    return report


def _damaged(store: ArtifactStore, shard: ShardInfo) -> bool:
    try:
        store.check(shard.id, shard.size)
    except CorruptArtifactError:
        return True
    return False


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
