"""Pack a ``scripts/gpu_check.sh`` work folder into the few files a GPU lease sends back.

    python -m benchmarks.gpu_pack WORK_DIR OUT_DIR

The device tool returns at most :data:`MAX_FILES` files from ``$OUT`` (each at most
:data:`MAX_FILE_BYTES`, no more than two folders down); anything beyond is dropped. So
gpu_check.sh writes its logs and records into a work folder outside ``$OUT`` and calls this
after every step, leaving in ``OUT_DIR`` only:

* ``records.tar.gz``: everything under ``WORK_DIR`` (``env.txt``, ``logs/``, every JSON
  record under ``records/``, the bench CSVs and PNGs), with any log over
  :data:`MAX_LOG_BYTES` cut to its head and tail (the cut is marked in the file);
* ``summary.txt``: the step table and :mod:`benchmarks.gpu_summary`'s summary, when
  ``WORK_DIR/summary.txt`` exists;
* up to :data:`MAX_PNGS` PNG plots (also inside the archive), so they can be looked at
  without unpacking.

Each call rewrites the files atomically (temporary name, then rename), so a lease that
ends in the middle of a step still returns the archive of the steps before it.
Returns (and prints) the names written.
"""

from __future__ import annotations

import glob
import io
import os
import sys
import tarfile

__all__ = ["MAX_FILES", "MAX_FILE_BYTES", "MAX_LOG_BYTES", "MAX_PNGS", "pack"]

MAX_FILES = 8
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_LOG_BYTES = 2 * 1024 * 1024  # a log above this keeps its first and last half of this
MAX_PNGS = MAX_FILES - 2  # the archive and the summary take two


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _clipped(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if not path.endswith((".log", ".txt")) or len(data) <= MAX_LOG_BYTES:
        return data
    half = MAX_LOG_BYTES // 2
    cut = len(data) - 2 * half
    return data[:half] + f"\n[... gpu_pack: {cut} bytes cut ...]\n".encode() + data[-half:]


def _archive(work: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for root, dirs, files in os.walk(work):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                if ".tmp-" in name or not os.path.isfile(path):
                    continue
                data = _clipped(path)
                info = tarfile.TarInfo(os.path.relpath(path, work))
                info.size = len(data)
                info.mtime = int(os.path.getmtime(path))
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def pack(work: str, out: str) -> list[str]:
    """Write ``records.tar.gz``, ``summary.txt`` and up to :data:`MAX_PNGS` PNGs of ``work`` into ``out``."""
    if not os.path.isdir(work):
        raise ValueError(f"work folder {work!r} does not exist")
    if os.path.abspath(work) == os.path.abspath(out) or os.path.abspath(work).startswith(os.path.abspath(out) + os.sep):
        raise ValueError(f"work folder {work!r} must be outside the out folder {out!r} (its files would count)")
    os.makedirs(out, exist_ok=True)
    written = []
    archive = _archive(work)
    if len(archive) > MAX_FILE_BYTES:
        raise RuntimeError(f"records.tar.gz is {len(archive)} bytes, over the {MAX_FILE_BYTES} a lease returns")
    _atomic_write(os.path.join(out, "records.tar.gz"), archive)
    written.append("records.tar.gz")
    summary = os.path.join(work, "summary.txt")
    if os.path.isfile(summary):
        _atomic_write(os.path.join(out, "summary.txt"), _clipped(summary))
        written.append("summary.txt")
    pngs = sorted(glob.glob(os.path.join(work, "**", "*.png"), recursive=True))
    used = set()
    for path in pngs[:MAX_PNGS]:
        name = os.path.basename(path)
        if name in used:  # two steps' plots of one name: keep both, prefixed by their folder
            name = f"{os.path.basename(os.path.dirname(path))}-{name}"
        used.add(name)
        with open(path, "rb") as f:
            data = f.read()
        if len(data) <= MAX_FILE_BYTES:
            _atomic_write(os.path.join(out, name), data)
            written.append(name)
    return written


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m benchmarks.gpu_pack WORK_DIR OUT_DIR", file=sys.stderr)
        return 2
    print("packed:", " ".join(pack(argv[0], argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
