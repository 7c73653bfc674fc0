"""expand_checkpoint: a Hugging Face model directory in, an expanded one out, in bounded memory.

Phases (each its own module): read and validate headers (``source``), plan the expansion (the
engine's ``plan_expansion``) and the shards (``shards``), then every rank streams its whole shards
through the spec pipeline (``lemon_ext.execution``) and the ``writer`` into a hidden temporary directory (``outdir``);
rank 0 writes index, config, copied files, report and model card, optionally verifies, and renames
the directory into place. Everything up to the pipeline reads headers only, so a dry run reports
every error before a weight is read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field

import torch

from ..engine import plan_expansion
from ..engine.api import DTYPES, synthetic_dtype
from ..engine.api import resolve_dtype as engine_resolve_dtype
from ..errors import LemonError
from ..execution import run_specs
from .device import resolve_device
from .distributed import Dist, init_from_env, rank_device
from .errors import CheckpointError, VerificationError
from .hashing import DEFAULT_ALGORITHM, new_hasher
from .outdir import OutputDir, write_json_atomic
from .report import copy_aux_files, model_card, plan_rows, shard_hash_fields, versions, write_config, write_text
from .safetensors_format import dtype_size
from .sentence_transformers import check_sentence_transformers, copy_sentence_transformers_modules
from .shards import Shard, build_index, parse_size, plan_shards, shards_for_rank
from .source import SourceCheckpoint, _load_json
from .writer import ShardWriter, Syncer

log = logging.getLogger("lemon_ext.checkpoint")

SIZE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
             "num_hidden_layers", "moe_intermediate_size", "shared_expert_intermediate_size")
#: Python + torch import, measured on the CI machine (ru_maxrss after imports): ~0.3 GiB.
_BASE_RSS = 0.35 * 2**30
#: End-to-end expansion throughput (target bytes written per second) measured by
#: benchmarks/bench_checkpoint.py on the 2-core CI machine; used only for the dry-run estimate.
_EST_BYTES_PER_S = {"cpu": 55e6, "cuda": 1.0e9}  # cpu: 11.35 GB in 208 s (1510b39, the disk bounds it); cuda: a guess, unmeasured


def resolve_dtype(dtype) -> torch.dtype | None:
    """The engine's dtype names, with the error worded for the command line."""
    try:
        return engine_resolve_dtype(dtype)
    except LemonError:
        raise CheckpointError(f"--dtype {dtype}: use one of {', '.join(sorted(DTYPES))}") from None


@dataclass
class Job:
    """Everything decided from headers and config, before any weight is read."""

    source: SourceCheckpoint
    plan: object
    dtypes: dict  # target name -> torch.dtype
    shards: list  # list[Shard]
    fingerprint: str
    options: dict
    notes: list = field(default_factory=list)

    @property
    def target_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def largest_target(self) -> int:
        return max((math.prod(s.target_shape) * dtype_size(self.dtypes[s.name]) for s in self.plan.specs), default=0)

    @property
    def largest_source(self) -> int:
        return max((self.source.nbytes(n) for n in self.source.weight_map), default=0)

    @property
    def rss_bound(self) -> int:
        """The issue's bound: 2 x largest target tensor + one output shard + 1 GiB."""
        return 2 * self.largest_target + max(s.nbytes for s in self.shards) + 2**30


def _plan(cfg: dict, shapes: dict | None, **kwargs):
    """plan_expansion from the checkpoint's own names and shapes (a tied head may be absent)."""
    return plan_expansion(cfg, source_shapes=shapes, **kwargs)


def _target_dtypes(plan, source: SourceCheckpoint, dtype: torch.dtype | None) -> dict:
    """Output dtype per target tensor, the rule of ``expand_state_dict``: the requested dtype, else
    the source tensor's own; synthetic tensors (no source) take the checkpoint's most common float
    dtype (``engine.api.synthetic_dtype``)."""
    default = synthetic_dtype(source.dtypes.values())
    return {s.name: dtype or (source.dtypes[s.source] if s.source is not None else default) for s in plan.specs}


def _fingerprint(source: SourceCheckpoint, plan, dtypes: dict, shards: list, seed: int, options: dict) -> str:
    """sha256 over everything that decides the output bytes (used to accept resumed shards). The
    shards' hash algorithm is not in it: it changes no output byte, and resume re-hashes anyway."""
    files = {}
    for f in source.files:
        st = os.stat(os.path.join(source.path, f))
        files[f] = [st.st_size, st.st_mtime_ns]
    v = versions()
    blob = {
        "specs": [[s.name, s.source, list(s.source_shape), list(s.target_shape), s.role, s.rule,
                   str(dtypes[s.name])] for s in plan.specs],
        "shards": [[sh.filename, [n for n, _, _ in sh.tensors]] for sh in shards],
        "seed": seed, "options": options, "source_files": files,
        "versions": {k: v.get(k) for k in ("lemon_ext", "torch")},
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def analyze(src, *, sizes: dict, options: dict, seed: int = 0, dtype=None, max_shard_size="5GB",
            collect: bool = False):
    """Build the Job from headers and config. Raises the first error, or with ``collect=True``
    returns ``(job_or_None, [every error found])``."""
    errors: list[str] = []

    def fail(e):
        if not collect:
            raise e
        errors.append(str(e))

    source = plan = job = None
    try:
        source = SourceCheckpoint(src)
    except CheckpointError as e:
        fail(e)
    try:
        out_dtype = resolve_dtype(dtype)
    except CheckpointError as e:
        fail(e)
        out_dtype = None
    try:
        limit = parse_size(max_shard_size)
    except CheckpointError as e:
        fail(e)
        limit = 5 * 10**9
    cfg = source.config if source is not None else None
    if cfg is None:
        try:
            cfg = _load_json(os.path.join(os.fspath(src), "config.json"), "config.json")
        except CheckpointError:
            cfg = None  # already reported by SourceCheckpoint
    if cfg is not None:
        try:
            plan = _plan(cfg, source.shapes if source else None, seed=seed,
                         **{k: v for k, v in sizes.items() if v is not None}, **options)
        except LemonError as e:
            fail(CheckpointError(f"{os.path.join(os.fspath(src), 'config.json')}: {e}"))
    if plan is not None and source is not None:
        try:
            plan.check_source(source.shapes)
        except LemonError as e:
            fail(CheckpointError(f"{source.path}: {e}"))
        else:
            dtypes = _target_dtypes(plan, source, out_dtype)
            shards = plan_shards([(s.name, dtypes[s.name], tuple(s.target_shape)) for s in plan.specs], limit)
            fp = _fingerprint(source, plan, dtypes, shards, seed, options)
            job = Job(source, plan, dtypes, shards, fp, options, list(getattr(plan, "notes", [])))
    if plan is not None:  # sentence-transformers folders (modules.json): refusals before any write
        try:
            st_notes = check_sentence_transformers(src, plan.source_sizes.hidden, plan.target_sizes.hidden,
                                                   options.get("allow_lossy", False))
        except CheckpointError as e:
            fail(e)
        else:
            if job is not None:
                job.notes += st_notes
    return (job, errors) if collect else job


# -- dry run ----------------------------------------------------------------------------------------

def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def dry_run_text(job: Job, device: str) -> str:
    """The plan table plus counts, bytes, shard layout, memory and time estimates."""
    p = job.plan
    dev = "cuda" if str(device).startswith("cuda") else "cpu"
    est = job.target_bytes / _EST_BYTES_PER_S[dev]
    peak = _BASE_RSS + 2 * job.largest_target + 2 * job.largest_source
    lines = [
        str(p),
        "",
        f"source: {job.source.path} ({job.source.format}, {len(job.source.files)} file(s), "
        f"{len(job.source.weight_map)} tensors, {_gib(job.source.total_bytes)})",
        f"parameters: {p.num_parameters_source:,} -> {p.num_parameters_target:,} "
        f"(x{p.num_parameters_target / max(1, p.num_parameters_source):.2f})",
        f"target: {len(p.specs)} tensors, {job.target_bytes:,} bytes to write ({_gib(job.target_bytes)}) "
        f"in {len(job.shards)} shard(s) of at most {_gib(max(s.nbytes for s in job.shards))}",
        f"memory: largest target tensor {_gib(job.largest_target)}; estimated peak host RSS "
        f"{_gib(peak)} (bound 2 x largest target + one shard + 1 GiB = {_gib(job.rss_bound)})",
        f"time: about {est:.0f} s on {dev} (at {_EST_BYTES_PER_S[dev] / 1e6:.0f} MB/s measured end to end; "
        f"disk speed decides)",
    ]
    return "\n".join(lines)


def _free_bytes(path: str) -> int | None:
    try:
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize
    except OSError:
        return None


def dry_run(src, dst, *, sizes: dict, options: dict, seed=0, dtype=None, max_shard_size="5GB",
            device="auto", overwrite=False, resume=False) -> tuple[str, list[str]]:
    """(printable report, every error found) reading headers only."""
    job, errors = analyze(src, sizes=sizes, options=options, seed=seed, dtype=dtype,
                          max_shard_size=max_shard_size, collect=True)
    out = OutputDir(dst, src, overwrite=overwrite, resume=resume)
    try:
        out.check()
    except CheckpointError as e:
        errors.append(str(e))
    text = ""
    if job is not None:
        text = dry_run_text(job, "cpu" if device in (None, "auto") and not torch.cuda.is_available() else str(device))
        free = _free_bytes(os.path.dirname(out.dst))
        if free is not None and free < job.target_bytes:
            errors.append(f"{os.path.dirname(out.dst)}: not enough free space ({_gib(free)} free, "
                          f"{_gib(job.target_bytes)} needed)")
    return text, errors


# -- the run ----------------------------------------------------------------------------------------

def _write_my_shards(job: Job, out: OutputDir, mine: list, *, device, seed, backend, progress, resume,
                     dist: Dist, hash_algorithm: str = DEFAULT_ALGORITHM) -> dict:
    """Write this rank's shards (keeping resumable ones); return {filename: {hash, size, resumed}}
    (the report's shard fields, ``report.shard_hash_fields``)."""
    results: dict = {}
    todo: list[Shard] = []
    for sh in mine:
        rec = out.resumable(sh.filename, job.fingerprint, hash_algorithm) if resume else None
        if rec is not None:
            log.info("resume: keeping %s (digest matches)", sh.filename)
            results[sh.filename] = {**shard_hash_fields(hash_algorithm, rec["digest"]), "size": rec["size"],
                                    "resumed": True}
        else:
            todo.append(sh)
    by_name = {s.name: s for s in job.plan.specs}
    ordered = [by_name[n] for sh in todo for n, _, _ in sh.tensors]
    total = sum(sh.nbytes for sh in todo)
    from tqdm.auto import tqdm
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
               desc="writing" if dist.world_size == 1 else f"rank {dist.rank} writing", dynamic_ncols=True,
               position=dist.rank if dist.world_size > 1 else None, leave=dist.world_size == 1)
    state = {"i": 0, "w": None}
    # fsync off the writer thread; the resume record follows the fsync (see writer.Syncer).
    syncer = Syncer(lambda path, fname, digest, size: out.record(fname, job.fingerprint, digest, size,
                                                                 algorithm=hash_algorithm))

    def sink(spec, t):
        if state["w"] is None:
            state["w"] = ShardWriter(out.tmp, todo[state["i"]], hash_algorithm=hash_algorithm)
        w = state["w"]
        w.write(spec.name, t)
        bar.update(t.numel() * t.element_size())
        if w.done:
            digest, size = w.close()
            syncer.submit(w.path, w.shard.filename, digest, size)
            results[w.shard.filename] = {**shard_hash_fields(hash_algorithm, digest), "size": size,
                                         "resumed": False}
            state["w"], state["i"] = None, state["i"] + 1

    try:
        stats = run_specs(ordered, job.source.get, sink, device=device, seed=seed, dtype=job.dtypes,
                          backend=backend, source_dtypes=job.source.dtypes, copy_out=False)
        t_sync = time.perf_counter()
        syncer.join()
        stats["fsync_wait"] = time.perf_counter() - t_sync
    except BaseException:
        if state["w"] is not None:
            state["w"].abort()
        try:
            syncer.join()  # finished shards keep their records for --resume
        except Exception:  # noqa: BLE001 - the first error is the one raised
            pass
        raise
    finally:
        bar.close()
    if stats.get("wall"):
        log.info("stage seconds (overlapping): read %.1f, compute %.1f, write %.1f; wall %.1f; final fsync wait %.1f",
                 stats["read"], stats["compute"], stats["sink"], stats["wall"], stats.get("fsync_wait", 0.0))
    results["__stats__"] = stats
    return results


def expand_checkpoint(
    src,
    dst,
    *,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    num_hidden_layers: int | None = None,
    moe_intermediate_size: int | None = None,
    shared_expert_intermediate_size: int | None = None,
    symmetry_breaking: str = "lemon",
    depth_placement="interleave",
    allow_lossy: bool = False,
    seed: int = 0,
    device="auto",
    dtype=None,
    max_shard_size="5GB",
    verify: bool = False,
    verify_tolerance: float | None = None,
    overwrite: bool = False,
    resume: bool = False,
    backend: str = "auto",
    progress: bool = True,
    hash_algorithm: str = DEFAULT_ALGORITHM,
) -> dict:
    """Expand the Hugging Face model directory ``src`` into ``dst`` (LEMON, lossless), streaming.

    Target sizes and options as in ``lemon_ext.expand_state_dict`` (None keeps the source's).
    Reads one source tensor per target tensor, writes shards of at most ``max_shard_size``
    ("5GB" = 5*10**9 bytes, as transformers) as they are built; peak host memory stays within
    2 x the largest target tensor + one shard + 1 GiB. Under ``torchrun`` the shards are split
    across ranks (same bytes as one process). ``dst`` appears only when complete (built as a
    hidden sibling and renamed); an existing ``dst`` is replaced only with ``overwrite``;
    ``resume`` keeps the finished shards of an interrupted run whose digest matches. One run per
    ``dst`` at a time: a second one raises ``CheckpointError`` at once (``OutputDir.lock``).
    ``hash_algorithm``: the digest of every shard in the report, "xxh3_128" (fast, the default) or
    "sha256" (the digest the Hugging Face Hub / Git LFS shows; about a core-second per 2 GB).

    Returns the report written to ``dst/lemon_expansion.json``. Raises ``CheckpointError`` (a
    ``LemonError``/``ValueError``) with a one-line message naming the file or tensor at fault.
    """
    t0 = time.time()
    sizes = dict(hidden_size=hidden_size, intermediate_size=intermediate_size,
                 num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                 num_hidden_layers=num_hidden_layers, moe_intermediate_size=moe_intermediate_size,
                 shared_expert_intermediate_size=shared_expert_intermediate_size)
    options = dict(symmetry_breaking=symmetry_breaking, allow_lossy=allow_lossy,
                   depth_placement=depth_placement if isinstance(depth_placement, str) else list(depth_placement))
    new_hasher(hash_algorithm)  # an unknown name (or xxhash missing) is refused before any work
    dist = init_from_env()
    job = out = None
    try:
        job = analyze(src, sizes=sizes, options=options, seed=seed, dtype=dtype, max_shard_size=max_shard_size)
        out = OutputDir(dst, src, overwrite=overwrite, resume=resume)
        out.check()
        dev = rank_device(device, dist)
        resolve_device(dev)
        err = None
        if dist.is_main:
            # Rank 0 alone locks DST (it prepares and renames) and holds the lock until the finally
            # below; the other ranks learn of a refusal through this sync, so none waits forever.
            try:
                out.lock()
                out.prepare()
            except CheckpointError as e:
                err = e
        dist.sync(err)
        mine = shards_for_rank(job.shards, dist.rank, dist.world_size)
        err, res = None, {}
        try:
            res = _write_my_shards(job, out, mine, device=dev, seed=seed, backend=backend,
                                   progress=progress, resume=resume, dist=dist, hash_algorithm=hash_algorithm)
        except LemonError as e:
            err = e
        results: dict = {}
        stats = []
        for r in dist.sync(err, res):
            stats.append(r.pop("__stats__", {}))
            results.update(r)
        report = None
        err = None
        if dist.is_main:
            try:
                report = _finish(job, out, results, src=src, sizes=sizes, seed=seed, dtype=dtype,
                                 max_shard_size=max_shard_size, verify=verify, tolerance=verify_tolerance,
                                 elapsed_write=time.time() - t0, world=dist.world_size, device=str(dev),
                                 stats=stats, hash_algorithm=hash_algorithm)
            except LemonError as e:
                err = e
        report = dist.sync(err, report)[0]
        return report
    finally:
        if out is not None:
            out.unlock()
        if job is not None:
            job.source.close()
        dist.close()


#: --verify's default when rescaled gains are stored in low precision (the plan's "one rounding"
#: notes): each rescaled gain carries a relative error up to 2^-9 (bf16) / 2^-12 (fp16), compounded
#: over the layers. Measured on the tiny Hub-form fixtures at 1.5x width: TinyLlama bf16 1.9e-2,
#: Qwen3 bf16 6.8e-3. Otherwise verify_checkpoints' fp32 default (1e-3) applies.
_ROUNDED_TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 1e-2}


def _default_tolerance(job: Job) -> float | None:
    if not job.plan.rounds_in_low_precision:
        return None
    low = [_ROUNDED_TOLERANCE[d] for d in set(job.dtypes.values()) if d in _ROUNDED_TOLERANCE]
    return max(low) if low else None


def _finish(job: Job, out: OutputDir, results: dict, *, src, sizes, seed, dtype, max_shard_size, verify,
            tolerance, elapsed_write, world, device, stats=None, hash_algorithm=DEFAULT_ALGORITHM) -> dict:
    """Rank 0: index, config, copied files, report, model card, verification, rename into place."""
    missing = [s.filename for s in job.shards if s.filename not in results]
    if missing:
        raise CheckpointError(f"{out.path(missing[0])}: shard was not written")
    index = build_index(job.shards)
    if index is not None:
        write_json_atomic(out.path("model.safetensors.index.json"), index)
    cfg = dict(job.plan.target_config)
    out_dtype = resolve_dtype(dtype)
    if out_dtype is not None:
        for key in ("torch_dtype", "dtype"):
            if key in cfg:
                cfg[key] = str(out_dtype).replace("torch.", "")
    write_config(out.path("config.json"), cfg)
    copied = copy_aux_files(job.source.path, out.tmp)
    copied += copy_sentence_transformers_modules(job.source.path, out.tmp, job.plan.source_sizes.hidden,
                                                 job.plan.target_sizes.hidden)
    p = job.plan
    s, t = p.source_sizes, p.target_sizes
    report = {
        "tool": "lemon-expand",
        "source": {"path": os.path.abspath(os.fspath(src)), "format": job.source.format,
                   "files": job.source.files, "bytes": job.source.total_bytes},
        "seed": seed,
        "options": {**job.options, **{k: v for k, v in sizes.items()},
                    "dtype": None if out_dtype is None else str(out_dtype).replace("torch.", ""),
                    "max_shard_size": max_shard_size, "hash_algorithm": hash_algorithm},
        "plan_summary": {
            "num_parameters_source": p.num_parameters_source, "num_parameters_target": p.num_parameters_target,
            "hidden": [s.hidden, t.hidden], "ffn": [s.ffn, t.ffn], "heads": [s.heads, t.heads],
            "kv_heads": [s.kv_heads, t.kv_heads], "layers": [s.layers, t.layers],
            "layer_sources": [layer.source for layer in p.layers], "notes": job.notes,
        },
        "plan": plan_rows(p, job.dtypes),
        # Derived buffers of the source (position_ids, inv_freq, GPT-2's attn.bias): not weights,
        # rebuilt by transformers on load, so not written.
        "dropped_tensors": [{"name": name, "reason": reason} for name, reason in p.dropped],
        "shards": [{"file": sh.filename, "bytes": sh.nbytes, "tensors": len(sh.tensors), **results[sh.filename]}
                   for sh in job.shards],
        "total_size": job.target_bytes,
        "copied_files": copied,
        "versions": versions(),
        "run": {"processes": world, "device": device, "seconds": round(elapsed_write, 3),
                "stage_seconds": [{k: round(v, 3) for k, v in s.items()} for s in (stats or [])]},
        "fingerprint": job.fingerprint,
        "verification": None,
    }
    if verify:
        from .verify import verify_checkpoints
        if tolerance is None:
            tolerance = _default_tolerance(job)
        report["verification"] = verify_checkpoints(job.source.path, out.tmp, tolerance=tolerance)
    write_json_atomic(out.path("lemon_expansion.json"), report)
    write_text(out.path("README.md"), model_card(report))
    if report["verification"] is not None and not report["verification"]["passed"]:
        v = report["verification"]
        raise VerificationError(
            f"{out.dst}: verification failed: max relative error {v['max_rel_error']:.3g} on {v['compared']} "
            f"exceeds {v['tolerance']:.3g} (output kept unrenamed in {out.tmp})")
    index_name = None if index is None else "model.safetensors.index.json"
    # Without an index, a stale one from an interrupted run with more shards is stray too.
    out.remove_stray({sh.filename for sh in job.shards} | {index_name, "config.json", "lemon_expansion.json",
                                                             "README.md", *copied})
    out.commit({sh.filename: results[sh.filename]["size"] for sh in job.shards}, index_name)
    return report
