"""Host-side dispatch of the dsv4 ops (issue 16): direct dispatcher registrations and the trusted
(already traced) call path of compiled functions."""

import os
import subprocess
import sys

import pytest
import torch

import dsv4_compile
from dsv4_compile.ops import _lib

dsv4 = torch.ops.dsv4


def _table(op: str) -> dict:
    """``dispatch key -> registration line`` of ``dsv4::op``'s dispatch table."""
    rows = {}
    for line in torch._C._dispatch_dump_table(f"dsv4::{op}").splitlines():
        key, _, what = line.partition(":")
        rows[key.strip()] = what.strip()
    return rows


direct = pytest.mark.skipif(_lib._full_dispatch(), reason="DSV4_FULL_DISPATCH=1 keeps custom_op's layers")


@direct
@pytest.mark.parametrize("op", ["rms_norm", "kv_insert", "compressor_insert", "sparse_attn"])
def test_ops_are_registered_straight_on_the_dispatcher(op):
    """CUDA and CPU kernels are ours (no custom_op backend wrapper), Autograd is a C++ fallthrough, and
    so is ADInplaceOrView for mutating ops: no Python layer runs before ours."""
    table = _table(op)
    assert "_lib.py" in table["CUDA"] and "_lib.py" in table["CPU"]
    assert table["AutogradCUDA"].startswith("fallthrough") and table["AutogradCPU"].startswith("fallthrough")
    mutable = getattr(dsv4, op).default._schema.is_mutable
    assert table["ADInplaceOrView"].startswith("fallthrough")  # ours for mutating ops, PyTorch's otherwise
    assert ("_lib.py" in table["ADInplaceOrView"]) == mutable


def test_full_dispatch_env_keeps_custom_op_layers():
    """``DSV4_FULL_DISPATCH=1`` at import: custom_op's own Autograd / backend kernels stay."""
    code = ("import torch, dsv4_compile\n"
            "rows = dict(l.split(':', 1) for l in torch._C._dispatch_dump_table('dsv4::kv_insert').splitlines())\n"
            "print(*[('custom_ops.py' in rows[k]) for k in ('CUDA', 'AutogradCPU', 'ADInplaceOrView')])\n")
    env = {**os.environ, "DSV4_FULL_DISPATCH": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "True"], out.stdout + out.stderr


@direct
def test_inputs_that_require_grad_give_outputs_that_do_not():
    """No backward either way; the Autograd fallthrough makes outputs plain tensors."""
    x = torch.randn(3, 64, requires_grad=True)
    w = torch.ones(64)
    y = dsv4.rms_norm(x, w, 1e-6)
    assert not y.requires_grad
    torch.testing.assert_close(y, dsv4_compile.reference.compressor.rms_norm(x.detach(), w, 1e-6),
                               rtol=0, atol=0)


def test_direct_calls_still_raise_value_errors():
    with pytest.raises(ValueError, match="weight"):
        dsv4.rms_norm(torch.randn(3, 64), torch.ones(32), 1e-6)


def test_trusted_nests_and_is_per_thread():
    import threading

    assert _lib.checks_needed()
    with _lib.trusted():
        with _lib.trusted():
            assert not _lib.checks_needed()
        assert not _lib.checks_needed()
        seen = []
        th = threading.Thread(target=lambda: seen.append(_lib.checks_needed()))
        th.start()
        th.join()
        assert seen == [True]
    assert _lib.checks_needed()
    with pytest.raises(RuntimeError):
        with _lib.trusted():
            raise RuntimeError
    assert _lib.checks_needed()


def test_debug_env_keeps_checks_inside_trusted(monkeypatch):
    monkeypatch.setenv("DSV4_CHECK_INDICES", "1")
    with _lib.trusted():
        assert _lib.checks_needed()


@torch.library.custom_op("dsv4_test::record_checks", mutates_args=())
def _record_checks(x: torch.Tensor) -> torch.Tensor:
    _SEEN.append(_lib.checks_needed())
    return x.clone()


@_record_checks.register_fake
def _(x):
    return torch.empty_like(x)


_SEEN: list = []


@pytest.mark.parametrize("fullgraph", [True, False])
def test_compile_trusts_only_fullgraph_functions(fullgraph):
    """A ``fullgraph=True`` compiled function runs its ops trusted; with graph breaks allowed (ops may
    then run eagerly, untraced) every check stays on."""
    def fn(x):
        return torch.ops.dsv4_test.record_checks(x * 2) + 1

    f = dsv4_compile.compile(fn, fullgraph=fullgraph)
    _SEEN.clear()
    x = torch.randn(4)
    torch.testing.assert_close(f(x), x * 2 + 1)
    torch.testing.assert_close(f(x), x * 2 + 1)
    assert _SEEN == [not fullgraph] * 2
    assert _lib.checks_needed()


@pytest.mark.parametrize("how", ["force_eager", "eager_on_recompile", "dynamo_disabled", "skip_guard_eval",
                                 "guard_filter_fn"])
def test_no_trust_when_the_call_runs_python_or_skips_guards(how, monkeypatch):
    """Checks stay on whenever the call may not run the traced graph under its guards."""
    def fn(x):
        return torch.ops.dsv4_test.record_checks(x * 2) + 1

    opts = {"guard_filter_fn": torch.compiler.skip_all_guards_unsafe} if how == "guard_filter_fn" else None
    f = dsv4_compile.compile(fn, options=opts)
    x = torch.randn(4)
    f(x)  # compiled once, trusted unless guards are filtered
    _SEEN.clear()
    if how == "dynamo_disabled":
        monkeypatch.setattr(torch._dynamo.config, "disable", True)
        f(x)
    elif how == "guard_filter_fn":
        f(x)
    else:
        kw = {"skip_guard_eval_unsafe": True} if how == "skip_guard_eval" else {}
        with torch.compiler.set_stance("default" if how == "skip_guard_eval" else how, **kw):
            f(x)
    assert _SEEN == [True]


def _stubbed_launches(monkeypatch):
    from triton.runtime.jit import JITFunction

    monkeypatch.setattr(JITFunction, "run", lambda self, *a, grid, warmup, **kw: None)


def test_cuda_functions_skip_checks_only_when_trusted(monkeypatch):
    """The CUDA function of rms_norm (called on CPU tensors, Triton's launch stubbed out) runs its
    argument check outside ``trusted()`` and skips it inside."""
    from dsv4_compile.ops import compressor
    from dsv4_compile.ops._lib import CUDA_KERNELS

    _stubbed_launches(monkeypatch)
    calls = []
    monkeypatch.setattr(compressor, "_check_norm", lambda *a: calls.append(a))
    x, w = torch.randn(3, 64), torch.ones(64)
    CUDA_KERNELS["rms_norm"](x, w, 1e-6)
    assert len(calls) == 1
    with _lib.trusted():
        CUDA_KERNELS["rms_norm"](x, w, 1e-6)
    assert len(calls) == 1


def test_trusted_calls_still_check_the_cache_offset(monkeypatch):
    """A cache's storage offset is not guarded by Dynamo: trusted calls check it too."""
    from dsv4_compile import layouts
    from dsv4_compile.ops._lib import CUDA_KERNELS

    _stubbed_launches(monkeypatch)
    page = layouts.page_bytes("fp8_ds_mla", 64)
    flat = torch.zeros(2 * page + 1, dtype=torch.uint8)
    odd = flat[1:].view(2, page)
    kv = torch.randn(3, layouts.KV_HEAD_DIM).bfloat16()
    slots = torch.tensor([0, 1, -1])
    with _lib.trusted():
        CUDA_KERNELS["kv_insert"](kv, flat[:-1].view(2, page), slots, 64)  # even offset: fine
        with pytest.raises(ValueError, match="even byte offsets"):
            CUDA_KERNELS["kv_insert"](kv, odd, slots, 64)


def test_import_warns_nothing():
    """Overriding custom_op's kernels on the dispatcher prints no "Overriding a previously registered
    kernel" warning (a UserWarning from the dispatcher) at import."""
    out = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", "import dsv4_compile"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
