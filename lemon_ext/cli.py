"""Console scripts ``lemon-expand`` and ``lemon-verify`` (also ``python -m lemon_ext.cli``).

Every user error (bad checkpoint, impossible sizes, existing output, full disk) is one line on
stderr, ``lemon-expand: error: ...``, and exit status 2; a failed verification exits 3. Set
``LEMON_DEBUG=1`` to get tracebacks. Under ``torchrun --nproc-per-node N -m lemon_ext.cli`` the
shards are split across ranks.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

EXIT_ERROR, EXIT_VERIFY, EXIT_INTERRUPT = 2, 3, 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lemon-expand",
        description="Grow a Hugging Face transformer checkpoint losslessly (LEMON), streaming tensor by tensor.")
    p.add_argument("src", help="source model directory (config.json + safetensors or pytorch_model*.bin)")
    p.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    g = p.add_argument_group("target sizes (default: the source's)")
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--intermediate-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--num-key-value-heads", type=int)
    g.add_argument("--num-hidden-layers", type=int)
    g.add_argument("--moe-intermediate-size", type=int, help="MoE expert width (Qwen-MoE; Mixtral: --intermediate-size)")
    g.add_argument("--shared-expert-intermediate-size", type=int, help="shared expert width (Qwen2-MoE)")
    o = p.add_argument_group("expansion")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--symmetry-breaking", default="lemon", choices=["lemon", "projection", "equal"])
    o.add_argument("--depth-placement", default="interleave",
                   help="interleave | stack | comma-separated source layer indices")
    o.add_argument("--allow-lossy", action="store_true", help="accept a Post-LN indivisible width (not exact)")
    r = p.add_argument_group("run")
    r.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    r.add_argument("--dtype", default=None, help="output dtype (default: the source's): bf16, fp16, fp32, fp64")
    r.add_argument("--backend", default="auto", help="expansion kernel backend (see lemon_ext.ops.backends())")
    r.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB (10^9), 2GiB (2^30), 500MB")
    r.add_argument("--verify", action="store_true", help="compare outputs with the source (transformers) before renaming")
    r.add_argument("--tolerance", type=float, default=None, help="--verify relative tolerance (default 1e-3 in fp32)")
    r.add_argument("--dry-run", action="store_true", help="print the plan, sizes and every error; read no weights")
    r.add_argument("--overwrite", action="store_true", help="replace an existing DST (only once the new one is complete)")
    r.add_argument("--resume", action="store_true", help="keep the finished shards of an interrupted run")
    # The names are hashing.ALGORITHMS, spelled out so that --help imports nothing heavy.
    r.add_argument("--hash", default="xxh3_128", choices=["xxh3_128", "sha256"], dest="hash_algorithm",
                   help="digest of every shard in lemon_expansion.json (default xxh3_128: fast, ~0.1 s of a "
                        "core per 2 GB); sha256 gives the digest the Hugging Face Hub (Git LFS) shows for a "
                        "file and costs about a core-second per 2 GB")
    r.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    return p


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (not the stream current at setup)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(quiet: bool, prog: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = logging.WARNING if quiet or rank != 0 else logging.INFO
    log = logging.getLogger("lemon_ext")
    for h in list(log.handlers):
        if isinstance(h, _StderrHandler):
            log.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def _fail(prog: str, msg: str, code: int = EXIT_ERROR) -> int:
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return code


def _guard(prog: str, fn) -> int:
    """Run fn(); turn any user error into one line and an exit status (no traceback)."""
    from .checkpoint.errors import VerificationError
    from .errors import LemonError

    debug = os.environ.get("LEMON_DEBUG") == "1"
    try:
        return fn()
    except VerificationError as e:
        return _fail(prog, str(e), EXIT_VERIFY)
    except LemonError as e:
        if debug:
            raise
        return _fail(prog, str(e))
    except KeyboardInterrupt:
        return _fail(prog, "interrupted (rerun with --resume to keep finished shards)", EXIT_INTERRUPT)
    except MemoryError:
        return _fail(prog, "out of host memory")
    except OSError as e:
        if debug:
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return _fail(prog, f"{where}{e.strerror or e}")
    except Exception as e:  # noqa: BLE001 - a bug: still one line, traceback with LEMON_DEBUG=1
        if debug:
            raise
        return _fail(prog, f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                           f"(set LEMON_DEBUG=1 for a traceback)")


def main(argv=None) -> int:
    """lemon-expand SRC DST [options]."""
    args = _parser().parse_args(argv)
    _setup_logging(args.quiet, "lemon-expand")
    log = logging.getLogger("lemon_ext.checkpoint")
    sizes = dict(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                 num_attention_heads=args.num_attention_heads, num_key_value_heads=args.num_key_value_heads,
                 num_hidden_layers=args.num_hidden_layers, moe_intermediate_size=args.moe_intermediate_size,
                 shared_expert_intermediate_size=args.shared_expert_intermediate_size)
    placement = args.depth_placement
    if placement not in ("interleave", "stack"):
        try:
            placement = [int(x) for x in placement.split(",")]
        except ValueError:
            return _fail("lemon-expand", f"--depth-placement {placement!r}: interleave, stack or indices like 0,0,1,1")

    def run() -> int:
        from .checkpoint.expand import dry_run, expand_checkpoint
        from .checkpoint.heap import keep_freed_pages

        keep_freed_pages()  # this process only: freed target tensors are reused, not re-faulted

        if args.dry_run:
            text, errors = dry_run(args.src, args.dst, sizes=sizes, seed=args.seed, dtype=args.dtype,
                                   options=dict(symmetry_breaking=args.symmetry_breaking, allow_lossy=args.allow_lossy,
                                                depth_placement=placement),
                                   max_shard_size=args.max_shard_size, device=args.device,
                                   overwrite=args.overwrite, resume=args.resume)
            if text:
                print(text)
            for e in errors:
                print(f"lemon-expand: error: {e}", file=sys.stderr)
            return EXIT_ERROR if errors else 0
        report = expand_checkpoint(
            args.src, args.dst, **sizes, symmetry_breaking=args.symmetry_breaking, depth_placement=placement,
            allow_lossy=args.allow_lossy, seed=args.seed, device=args.device, dtype=args.dtype,
            max_shard_size=args.max_shard_size, verify=args.verify, verify_tolerance=args.tolerance,
            overwrite=args.overwrite, resume=args.resume, backend=args.backend, progress=not args.quiet,
            hash_algorithm=args.hash_algorithm)
        if report is not None and int(os.environ.get("RANK", "0")) == 0:
            v = report.get("verification")
            extra = f"; verified: max relative error {v['max_rel_error']:.3g} on {v['compared']}" if v else ""
            log.info("wrote %s: %d shard(s), %s bytes, %.1f s%s", args.dst, len(report["shards"]),
                     f"{report['total_size']:,}", report["run"]["seconds"], extra)
        return 0

    return _guard("lemon-expand", run)


def verify_main(argv=None) -> int:
    """lemon-verify SRC DST: compare the expanded model's outputs with the source's."""
    p = argparse.ArgumentParser(prog="lemon-verify", description="Check that DST reproduces SRC's outputs.")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--tolerance", type=float, default=None)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp64"], help="compute dtype for the comparison")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    _setup_logging(args.quiet, "lemon-verify")

    def run() -> int:
        import torch

        from .checkpoint.verify import verify_checkpoints

        res = verify_checkpoints(args.src, args.dst, tolerance=args.tolerance,
                                 dtype=torch.float64 if args.dtype == "fp64" else torch.float32)
        line = (f"max relative error {res['max_rel_error']:.3g} on {res['compared']} "
                f"(tolerance {res['tolerance']:.3g}, {res['dtype']})")
        if not res["passed"]:
            return _fail("lemon-verify", f"{args.dst}: outputs differ: {line}", EXIT_VERIFY)
        if not args.quiet:
            print(f"lemon-verify: ok: {line}")
        return 0

    return _guard("lemon-verify", run)


if __name__ == "__main__":
    sys.exit(main())
