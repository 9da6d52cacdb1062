"""The CUDA path: the same results on the GPU as on the CPU, and bf16 autocast training.

These need a CUDA GPU and are skipped without one (CI has none); run them with `pytest tests/test_cuda.py`
on a GPU machine. The truth is the CPU: the reference scan and the float32 model there.
"""
import pytest
import torch
import torch.nn.functional as F

from mamba_config import MambaConfig
from model import MambaLM
from selective_scan import selective_scan_fn, selective_scan_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def scan_inputs(b, d, n, l, selective, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape_BC = (b, n, l) if selective else (d, n)
    return dict(u=torch.randn(b, d, l, generator=g), delta=torch.randn(b, d, l, generator=g),
                A=-torch.rand(d, n, generator=g) * 4 - 0.1, B=torch.randn(*shape_BC, generator=g),
                C=torch.randn(*shape_BC, generator=g), D=torch.randn(d, generator=g),
                z=torch.randn(b, d, l, generator=g), delta_bias=torch.randn(d, generator=g))


def run_scan(fn, inputs, device, upstream):
    # a copy: .to("cpu") of a CPU tensor is the tensor itself, and the next call must get leaves again
    leaves = {k: v.to(device, copy=True).requires_grad_() for k, v in inputs.items()}
    y, last = fn(**leaves, delta_softplus=True, return_last_state=True)
    gy, glast = (g.to(device) for g in upstream)
    ((y * gy).sum() + (last * glast).sum()).backward()
    return [y, last] + [leaves[k].grad for k in inputs]


@pytest.mark.parametrize("selective", [True, False])
@pytest.mark.parametrize("l", [1, 300, 4097])
def test_fast_scan_on_cuda_matches_the_reference_on_cpu(selective, l):
    inputs = scan_inputs(2, 64, 16, l, selective)
    g = torch.Generator().manual_seed(1)
    upstream = (torch.randn(2, 64, l, generator=g), torch.randn(2, 64, 16, generator=g))
    want = run_scan(selective_scan_ref, inputs, "cpu", upstream)
    got = run_scan(selective_scan_fn, inputs, "cuda", upstream)
    for name, w, o in zip(["y", "last"] + list(inputs), want, got):
        assert o.device.type == "cuda" and torch.isfinite(o).all(), name
        err = (o.cpu() - w).abs().max() / w.abs().max().clamp_min(1e-6)   # dL/dA is 0 at l = 1
        assert err < 1e-4, f"{name}: relative error {err:.2e}"


def small_model(seed=0):
    torch.manual_seed(seed)
    return MambaLM(MambaConfig(d_model=64, n_layer=2, vocab_size=100))


def test_model_on_cuda_matches_cpu_forward_and_decoding():
    model = small_model().eval()
    ids = torch.randint(0, 100, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids)
        cuda_model = model.cuda()
        got = cuda_model(ids.cuda())
    assert (got.cpu() - want).abs().max() < 1e-4
    cache = cuda_model.allocate_cache(2)
    steps = [cuda_model.prefill(ids[:, :10].cuda(), cache)]
    steps += [cuda_model.step(ids[:, t].cuda(), cache) for t in range(10, 50)]
    decoded = torch.stack(steps[1:], dim=1)
    assert (decoded.cpu() - want[:, 10:]).abs().max() < 1e-4
    assert (steps[0].cpu() - want[:, 9]).abs().max() < 1e-4


def test_bf16_autocast_training_step_is_finite_and_close_to_float32():
    model = small_model().cuda()
    ids = torch.randint(0, 100, (4, 129), generator=torch.Generator().manual_seed(0)).cuda()

    def loss_and_grads(autocast):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    loss32, grad32 = loss_and_grads(False)
    loss16, grad16 = loss_and_grads(True)
    assert torch.isfinite(grad16).all()
    assert abs(loss16 - loss32) < 0.02 * loss32
    cosine = F.cosine_similarity(grad16, grad32, dim=0)
    assert cosine > 0.99, f"bf16 gradient direction differs from float32: cosine {cosine:.4f}"
