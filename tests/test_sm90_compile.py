"""Every Triton kernel launch fastmae's ops make compiles for sm_90 (H100/H200), without a GPU.

The CPU tests run the kernels in the Triton interpreter, which accepts code a GPU
compiler rejects. Here each launch is compiled ahead of time for ``GPUTarget("cuda", 90,
32)`` (and a subset for sm_80) down to a cubin with triton's bundled ptxas; see
``tests/_aot.py`` for how the launches are captured (every op forward and backward over
its dtypes and code paths, MAE shapes), bound exactly as ``JITFunction.run`` binds them
(signature, constexprs, specialisation) and, for the autotuned attention kernels,
expanded over their GPU configs.

One test per compile job, named ``sm<arch>-<kernel>-<pointer dtypes>-<constexprs>-w<warps>s<stages>``.
By default the jobs are a covering set (every kernel, every dtype, constexpr value,
argument specialisation and autotune config at least once, dtype x constexpr pairs);
``FASTMAE_AOT_FULL=1`` compiles every distinct launch and every config at every captured
shape (about 2000 jobs: hours on 2 cores, fp32 attention compiling its dots as FMAs is
slow; ``python tests/_aot.py report --full --match REGEX`` compiles a part of them).

Registers, spills, serialised wgmma and shared memory per job are written to
``.pytest_cache/d/fastmae_aot/sm90_report.txt``; they are reported, not failed on (and
are those of the installed triton's toolchain: triton 3.9 runs its ptxas 13.4 with
``--regAllocOptLevel=2``, another version may allocate registers differently). A
launch that is not autotuned must fit the target's shared memory (it would fail to
launch); an autotuned config that does not fit is skipped by the autotuner at run time,
so it is only reported, and with ``FASTMAE_AOT_FULL=1`` each autotuned launch must have
at least one config that fits.

``make test-device-triton`` runs this file again with the GPU machine's older triton
(3.6) on ``PYTHONPATH`` and ``FASTMAE_AOT_REQUIRED=1``, under which a missing triton
internal or ptxas fails instead of skipping.
"""

import os
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also under --import-mode=importlib
import _aot  # noqa: E402

# FASTMAE_AOT_REQUIRED=1 (make test-device-triton) turns "cannot compile here" into a failure.
REQUIRED = os.environ.get("FASTMAE_AOT_REQUIRED", "0") not in ("", "0")


def _cannot(why: str) -> None:
    if REQUIRED:
        pytest.fail(f"FASTMAE_AOT_REQUIRED is set but {why}", pytrace=False)
    pytest.skip(why, allow_module_level=True)


try:
    import triton  # noqa: F401
except ImportError as e:
    _cannot(f"triton does not import: {e}")
_MISSING = _aot.triton_api_missing()
if _MISSING:
    _cannot(f"this triton lacks internals the AOT compile uses: {_MISSING}")

FULL = os.environ.get("FASTMAE_AOT_FULL", "0") not in ("", "0")
_CACHE_KEY = "fastmae_aot/plan"


def _plan(config) -> dict:
    """The compile jobs (cached in .pytest_cache against the sources' hash): capture and
    plan take ~15 s in two subprocesses, and collection runs this every session."""
    if getattr(config, "_fastmae_aot_plan", None) is not None:
        return config._fastmae_aot_plan
    key = _aot.source_hash(FULL)
    cache = getattr(config, "cache", None)
    cached = cache.get(_CACHE_KEY, None) if cache is not None else None
    if cached and cached.get("key") == key:
        plan = cached["plan"]
    else:
        try:
            plan = dict(_aot.make_plan(FULL), error=None)
            if cache is not None:
                cache.set(_CACHE_KEY, {"key": key, "plan": plan})
        except Exception as e:  # reported by test_every_kernel_is_captured, not as a collection error
            plan = {"jobs": [], "kernels": [], "captured": [], "launches": 0, "overridden": [], "error": str(e)}
    config._fastmae_aot_plan = plan
    return plan


class _Short(dict):
    """A dict that prints short (pytest shows test arguments on failure)."""

    def __repr__(self):
        return self["id"] if "id" in self else f"<{len(self)} entries>"


def pytest_generate_tests(metafunc):
    if "job" in metafunc.fixturenames:
        jobs = _plan(metafunc.config)["jobs"]
        params = [pytest.param(_Short(j), cc, id=f"{_aot.TARGETS[cc]}-{j['id']}") for j in jobs for cc in j["targets"]]
        metafunc.parametrize(("job", "arch"), params)


@pytest.fixture(scope="session")
def compiled(request, tmp_path_factory):
    """{(job id, arch): result} for the jobs of the selected tests, compiled in a pool of 2."""
    ok, why = _aot.ptxas_available()
    if not ok:
        _cannot(why)
    wanted: dict = {}
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        # (with no jobs, e.g. when the plan failed, pytest parametrizes with a NOTSET marker)
        if isinstance(params.get("job"), dict) and "arch" in params:
            job = wanted.setdefault(params["job"]["id"], dict(params["job"], targets=[]))
            job["targets"].append(params["arch"])
    results = _aot.run_compile(list(wanted.values()), workers=2, timeout=24 * 3600 if FULL else 900)
    table = _aot.format_table(list(wanted.values()), results)
    cache = getattr(request.config, "cache", None)
    out = Path(cache.mkdir("fastmae_aot")) if cache is not None else tmp_path_factory.mktemp("fastmae_aot")
    (out / "sm90_report.txt").write_text(table + "\n")
    compiled = _Short({(r["id"], r["arch"]): r for r in results})
    compiled.report = out / "sm90_report.txt"
    return compiled


def _describe(job: dict, arch: int, res: dict) -> str:
    consts = {k: v["value"] for k, v in job["params"].items() if "value" in v}
    tensors = {k: v["tensor"] + ("" if v["align16"] else " (not 16-byte aligned)")
               for k, v in job["params"].items() if "tensor" in v}  # fmt: skip
    lines = [
        f"kernel {job['kernel']} for sm_{arch}, options {job['options']}"
        + (f", autotuner {job['tuner']} config #{job['config']}" if job.get("tuner") else ""),
        f"signature ({res.get('signature', '?')})",
        f"tensors {tensors}",
        f"scalars and constexprs {consts}",
        f"launched by: {'; '.join(job['scenarios'])}",
    ]
    return "\n".join(lines)


@pytest.fixture(scope="session")
def plan(request):
    return _plan(request.config)


def test_every_kernel_is_captured(plan):
    assert plan["error"] is None, plan["error"]
    # A kernel that no scenario launches would silently escape the compile check.
    missing = sorted(set(plan["kernels"]) - set(plan["captured"]))
    assert not missing, f"kernels no capture scenario launches (add one to tests/_aot.py): {missing}"
    assert plan["jobs"]


def test_compiles(job, arch, compiled):
    res = compiled[job["id"], arch]
    assert res["ok"], f"does not compile:\n{_describe(job, arch, res)}\n\n{res['error']}"
    if job.get("tuner") is None:
        limit = _aot.MAX_SHARED[arch]
        assert res["shared"] <= limit, (
            f"needs {res['shared']} bytes of shared memory, sm_{arch} gives a block at most {limit}: "
            f"the launch would fail\n{_describe(job, arch, res)}"
        )


def test_autotuned_launches_have_a_config_that_fits(plan, compiled):
    # An autotuned config over the shared memory limit is skipped at run time; a launch
    # all of whose configs are over it fails. Only decidable for the launches whose every
    # config was compiled (FASTMAE_AOT_FULL=1).
    groups: dict = {}
    for job in plan["jobs"]:
        if job.get("tuner"):
            groups.setdefault((job["tuner"], job["shape"]), []).append(job)
    complete = {k: v for k, v in groups.items() if len(v) == v[0]["n_configs"]}
    if not complete:
        pytest.skip("no autotuned launch has every config in this plan (set FASTMAE_AOT_FULL=1)")
    bad = []
    for (tuner, _), jobs in complete.items():
        for arch in (90,):
            results = [compiled.get((j["id"], arch)) for j in jobs]
            if any(r is None for r in results):
                continue
            if not any(r["ok"] and r["shared"] <= _aot.MAX_SHARED[arch] for r in results):
                bad.append(f"{tuner} sm_{arch}: {jobs[0]['scenarios']}")
    assert not bad, "autotuned launches with no config that fits:\n" + "\n".join(bad)


def test_resource_report(compiled):
    # Registers, spills and serialised wgmma are reported (printed, see -rP, and warned
    # about), not failed on.
    worst: dict = {}
    for (job_id, arch), r in compiled.items():
        if r["ok"]:
            fields = ("jobs", "regs", "spill", "shared", "serial")
            w = worst.setdefault((job_id.split("-")[0], arch), dict.fromkeys(fields, 0))
            w["jobs"] += 1
            w["serial"] += bool(r.get("wgmma_serialized"))
            for field, key in (("regs", "regs"), ("spill", "spill_stores"), ("shared", "shared")):
                w[field] = max(w[field], r.get(key) or 0)
    print(f"per-job table: {compiled.report}")
    print("kernel, arch: jobs, max registers, max spill stores (B/thread), max shared memory (B), "
          "jobs with serialised wgmma")
    for (kernel, arch), w in sorted(worst.items()):
        print(f"{kernel:24} sm{arch}: {w['jobs']:4} {w['regs']:4} {w['spill']:6} {w['shared']:7} {w['serial']:4}")
    flagged = sorted(
        f"sm{a} {i}: {_aot._flags(r)} ({r.get('regs')} regs, {r.get('spill_stores')} B spilled, {r['shared']} B smem)"
        for (i, a), r in compiled.items()
        if r["ok"] and _aot._flags(r)
    )
    if flagged:
        head = f"{len(flagged)} compiled kernels spill, serialise wgmma or exceed shared memory"
        head += " (autotuned configs over it are skipped at run time):\n"
        warnings.warn(head + "\n".join(flagged), stacklevel=1)
