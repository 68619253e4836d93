"""pytest-benchmark timings at CPU-runnable sizes: fastmae's ops (reference backend) and a tiny training step.

Not part of the main test suite (``testpaths = ["tests"]``); run them with::

    pytest benchmarks/ --benchmark-enable

The project's ``addopts`` pass ``--benchmark-disable``, under which each benchmark runs its
function once, as a smoke test. These are CPU figures for spotting regressions of the
Python/dispatch overhead; the GPU harness is ``benchmarks/bench_ops.py``. The Triton
backend is left out: on the CPU it runs through the Triton interpreter, whose speed says
nothing about the kernels.
"""

import pytest
import torch

from benchmarks.bench_ops import CPU_SHAPES, DATA_OPS, _attention_case, _data_case, _dims
from fastmae.bench import build_model

pytestmark = pytest.mark.benchmark(group="fastmae-cpu", min_rounds=5, max_time=0.5, warmup=False)

DEVICE = "cpu"


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("op", DATA_OPS)
def test_data_op(benchmark, op, direction):
    benchmark.group = f"{op} {direction}"
    make, fn = _data_case(op, _dims(CPU_SHAPES["tiny"], 8), direction, "torch", DEVICE, torch.float32)
    benchmark(fn, *make())


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_attention(benchmark, backend, direction):
    benchmark.group = f"attention_qkvpacked {direction}"
    make, fn = _attention_case("attention_qkvpacked", (8, 4, 65, 16), direction, backend, DEVICE, torch.float32)
    benchmark(fn, *make())


@pytest.mark.parametrize("mask_tokens_in_encoder", [False, True], ids=["visible", "mask_tokens"])
def test_training_step(benchmark, mask_tokens_in_encoder):
    benchmark.group = "tiny MAE training step"
    torch.manual_seed(0)
    model = build_model("tiny", "torch", mask_tokens_in_encoder, DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    imgs = torch.randn(4, 3, 32, 32)

    def step():
        loss, _, _ = model(imgs, mask_ratio=0.75)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    loss = benchmark(step)
    assert torch.isfinite(loss)
