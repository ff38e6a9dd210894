"""Pre-bound Triton launches (``kernels/triton/_launch.py``, issue 16): a call whose arguments
specialize as an earlier call's goes straight to the compiled kernel's launcher, with every parameter
in declaration order; anything the key cannot describe takes Triton's own path. CPU: the key and the
launcher call against a stand-in kernel; GPU: real kernels, results against the reference across
specializations, and no Triton-path launch in a warm compiled step."""

import inspect

import pytest
import torch

from dsv4_compile.kernels.triton import _launch


class _Param:
    def __init__(self, name, constexpr=False, default=inspect.Parameter.empty):
        self.name, self.is_constexpr, self.default = name, constexpr, default
        self.has_default = default is not inspect.Parameter.empty


class _Compiled:
    """What ``JITFunction.run`` returns: the launcher and its handles."""

    def __init__(self, calls):
        self.packed_metadata = (4, 1, 0)
        self.function = 1234
        self.run = lambda *a: calls.append(("fast", a))


class _Jit:
    """A stand-in ``triton.jit`` kernel ``k(x_ptr, n, scale, BLOCK: constexpr, FLAG: constexpr = 7)``."""

    def __init__(self):
        self.params = [_Param("x_ptr"), _Param("n"), _Param("scale"), _Param("BLOCK", True),
                       _Param("FLAG", True, 7)]
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.calls.append(("triton", grid, args, meta))
            return _Compiled(self.calls)
        return launch


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(_launch, "ENABLED", True)
    monkeypatch.setattr(_launch, "PDL", False)  # test_pdl_* turn it on
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda dev: 99, raising=False)
    jit = _Jit()
    return jit, _launch.PreBound(jit)


def test_second_call_of_a_specialization_goes_to_the_launcher(fake):
    jit, k = fake
    x = torch.zeros(64)
    k[(3,)](x, 5, 0.5, BLOCK=32, num_warps=4)
    k[(3, 2)](x, 5, 0.25, BLOCK=32, num_warps=4)
    assert (k.launches, k.fast) == (1, 1)
    kind, args = jit.calls[-1]
    # grid padded to 3, the current stream, the handles, no launch metadata / hooks, then every
    # parameter in declaration order: positional ones, the constexpr keyword, the default
    assert kind == "fast" and args == (3, 2, 1, 99, 1234, (4, 1, 0), None, None, None, x, 5, 0.25, 32, 7)


@pytest.mark.parametrize("change", ["misaligned tensor", "int one", "int multiple of 16", "int64", "dtype",
                                    "constexpr", "option"])
def test_a_different_specialization_takes_triton_path(fake, change):
    jit, k = fake
    x = torch.zeros(64)
    k[(1,)](x, 5, 0.5, BLOCK=32, num_warps=4)
    args, meta = [x, 5, 0.5], dict(BLOCK=32, num_warps=4)
    if change == "misaligned tensor":
        args[0] = x[1:]
    elif change == "int one":
        args[1] = 1
    elif change == "int multiple of 16":
        args[1] = 32
    elif change == "int64":
        args[1] = 2**40 + 3
    elif change == "dtype":
        args[0] = x.double()
    elif change == "constexpr":
        meta["BLOCK"] = 64
    else:
        meta["num_warps"] = 8
    k[(1,)](*args, **meta)
    assert (k.launches, k.fast) == (2, 0)
    k[(1,)](*args, **meta)
    assert (k.launches, k.fast) == (2, 1)


def test_calls_the_key_cannot_describe_always_take_triton_path(fake, monkeypatch):
    jit, k = fake
    x = torch.zeros(64)
    for _ in range(2):
        k[(1,)](x, 5, 0.5, 32)                       # a constexpr passed positionally
        k[(1,)](x, 5, scale=0.5, BLOCK=32)          # a runtime argument passed by keyword
        k[(1,)](x, [5], 0.5, BLOCK=32)              # an argument of another type
    assert (k.launches, k.fast) == (6, 0)
    k[(1,)](x, 5, 0.5, BLOCK=32)
    k[(1,)](x, 5, 0.5, BLOCK=32)
    assert (k.launches, k.fast) == (7, 1)
    from triton import knobs

    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", lambda *a: None)  # e.g. a profiler's hook
    k[(1,)](x, 5, 0.5, BLOCK=32)
    assert (k.launches, k.fast) == (8, 1)


def test_keyword_types_callable_grids_and_knobs_are_part_of_the_key(fake, monkeypatch):
    """``True`` / ``1`` / ``1.0`` are one dict key but three Triton specializations; a callable grid
    and a pre-run hook take Triton's path; a debug knob switched on recompiles (a new key)."""
    jit, k = fake
    x = torch.zeros(64)
    for flag in (True, 1, 1.0, -0.0, 0.0):
        k[(1,)](x, 5, 0.5, BLOCK=32, FLAG=flag)
    assert (k.launches, k.fast) == (5, 0)
    k[(1,)](x, 5, 0.5, BLOCK=32, FLAG=1)
    assert (k.launches, k.fast) == (5, 1)
    k[lambda meta: (1,)](x, 5, 0.5, BLOCK=32, FLAG=1)
    assert (k.launches, k.fast) == (6, 1)
    from triton import knobs

    monkeypatch.setattr(knobs.runtime, "debug", True)
    k[(1,)](x, 5, 0.5, BLOCK=32, FLAG=1)
    assert (k.launches, k.fast) == (7, 1)
    monkeypatch.setattr(knobs.runtime, "debug", False)
    jit.pre_run_hooks = [lambda *a, **kw: None]
    k[(1,)](x, 5, 0.5, BLOCK=32, FLAG=1)
    assert (k.launches, k.fast) == (8, 1)


def test_disabled_passes_every_call_through(fake, monkeypatch):
    jit, k = fake
    monkeypatch.setattr(_launch, "ENABLED", False)
    x = torch.zeros(64)
    for _ in range(3):
        k[(1,)](x, 5, 0.5, BLOCK=32)
    assert (k.launches, k.fast) == (3, 0) and all(c[0] == "triton" for c in jit.calls)


def test_every_launched_kernel_is_prebound():
    """Each ``name[grid](...)`` launch in the Triton kernel modules is of a ``PreBound`` kernel."""
    import re

    for mod in _kernel_modules():
        src = inspect.getsource(mod)
        for name in set(re.findall(r"(\w+_kernel)\[", src)):
            obj = getattr(mod, name, None)
            if obj is not None and callable(getattr(obj, "__getitem__", None)) and name.endswith("_kernel"):
                assert isinstance(obj, _launch.PreBound), f"{mod.__name__}.{name}"


@pytest.mark.parametrize("sm90", [True, False])
def test_pdl_launch_sets_the_constexpr_and_the_option(fake, monkeypatch, sm90):
    """With PDL on, a launch on an sm_90+ device gets ``PDL=True`` (the kernel's constexpr: its
    grid-dependency wait) and ``launch_pdl=True`` on both paths; below sm_90 neither."""
    jit, _ = fake
    jit.params.append(_Param("PDL", True, False))
    k = _launch.PreBound(jit)
    monkeypatch.setattr(_launch, "PDL", True)
    monkeypatch.setattr(_launch, "_pdl_devices", {0: sm90})
    x = torch.zeros(64)
    k[(1,)](x, 5, 0.5, BLOCK=32)
    k[(1,)](x, 5, 0.5, BLOCK=32)
    assert (k.launches, k.fast) == (1, 1)
    meta = jit.calls[0][3]
    plain = _Jit()  # a kernel without the PDL constexpr (no grid-dependency wait): never launched with PDL
    _launch.PreBound(plain)[(1,)](x, 5, 0.5, BLOCK=32)
    assert plain.calls[0][3] == dict(BLOCK=32)
    if sm90:
        assert meta == dict(BLOCK=32, PDL=True, launch_pdl=True)
        assert jit.calls[1][1][-3:] == (32, 7, True)  # BLOCK, FLAG's default, PDL
    else:
        assert meta == dict(BLOCK=32)
        assert jit.calls[1][1][-3:] == (32, 7, False)


def test_pdl_meta_follows_the_capability_and_the_switch(monkeypatch):
    """``pdl_meta``: the PDL keywords on sm_90+ only (asked once per device), none with PDL off."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: asked.append(d) or {0: (8, 9), 1: (9, 0)}[d])
    monkeypatch.setattr(_launch, "_pdl_devices", {})
    monkeypatch.setattr(_launch, "PDL", True)
    assert _launch.pdl_meta(0) is None and _launch.pdl_meta(1) == dict(PDL=True, launch_pdl=True)
    assert _launch.pdl_meta(1) is not None and asked == [0, 1]
    monkeypatch.setattr(_launch, "_pdl_devices", {})
    monkeypatch.setattr(_launch, "PDL", False)
    assert _launch.pdl_meta(1) is None


def test_every_launched_kernel_starts_with_pdl_enter():
    """Every ``PreBound`` kernel ends its parameters with ``PDL: tl.constexpr = False`` and starts its
    body (after the docstring) with ``pdl_enter(PDL)``: a kernel launched with ``launch_pdl`` but no
    grid-dependency wait could run before the kernel it depends on has finished. The two exceptions
    read inputs that the ops require not to be the previous kernel's output first: the GEMV its weight
    slab (what comes before its top-level ``pdl_enter(PDL)`` is index arithmetic and loads through
    ``w_ptr`` alone), the indexer logits kernel the token's request and position (arithmetic, loads
    through ``req_ptr`` and ``pos_ptr`` alone, and the return of a program without tiles)."""
    import ast
    import textwrap

    kernels = {id(k): k for k in _all_prebound()}.values()
    assert len(kernels) >= 21
    for k in kernels:
        py_fn = getattr(k.jit_fn, "fn", k.jit_fn)  # the Python function (JITFunction / InterpretedFunction)
        last = list(inspect.signature(py_fn).parameters.values())[-1]
        assert (last.name, str(last.annotation), last.default) == ("PDL", "tl.constexpr", False), k.__name__
        fn = ast.parse(textwrap.dedent(inspect.getsource(py_fn))).body[0]
        body = [st for st in fn.body if not (isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant))]
        early = {"_gemv_kernel": ({"tl.program_id", "tl.arange", "tl.load", "rn.to"}, ("w_ptr +",)),
                 "_indexer_logits_kernel": ({"tl.program_id", "tl.num_programs", "tl.load", "tl.where", "tl.minimum",
                                             "tl.cdiv", "tl.load(req_ptr + t).to", "tl.load(pos_ptr + t).to"},
                                            ("req_ptr +", "pos_ptr +"))}
        if k.__name__ in early:
            allowed, pointers = early[k.__name__]
            head = body[:[ast.unparse(st) for st in body].index("pdl_enter(PDL)")]
            calls = {ast.unparse(c.func) for st in head for c in ast.walk(st) if isinstance(c, ast.Call)}
            assert calls <= allowed, (k.__name__, calls - allowed)
            loads = [ast.unparse(c.args[0]) for st in head for c in ast.walk(st)
                     if isinstance(c, ast.Call) and ast.unparse(c.func) == "tl.load"]
            assert len(loads) == len(pointers) and all(a.startswith(p) for a, p in zip(loads, pointers)), loads
            continue
        assert ast.unparse(body[0]) == "pdl_enter(PDL)", k.__name__


def _kernel_modules():
    """Every module of ``dsv4_compile.kernels.triton``, imported."""
    import importlib
    import pkgutil

    import dsv4_compile.kernels.triton as pkg

    return [importlib.import_module(f"{pkg.__name__}.{info.name}") for info in pkgutil.iter_modules(pkg.__path__)]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
def test_gpu_results_across_specializations():
    """rms_norm's kernel over row counts 1 (a constexpr to Triton), 16 (aligned), 17, misaligned
    views and both dtypes, twice each (the second call pre-bound), against the reference."""
    from dsv4_compile.kernels.triton import compressor as kernels
    from dsv4_compile.reference import compressor as ref

    if not _launch.ENABLED:
        pytest.skip("pre-bound launches are off in this environment")
    g = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(40, 512, device="cuda", generator=g)
    w = torch.randn(512, device="cuda", generator=g).bfloat16()
    fast0 = kernels._rms_norm_kernel.fast
    flat = base.view(-1)
    for rows in (1, 16, 17, 1, 16, 17):
        misaligned = flat[1:1 + rows * 512].view(rows, 512)  # 4 bytes past a 16-byte boundary
        for x in (base[:rows], misaligned, base[:rows].bfloat16()):
            assert torch.equal(kernels.rms_norm(x, w, 1e-6).cpu(), ref.rms_norm(x.cpu(), w.cpu(), 1e-6))
    assert kernels._rms_norm_kernel.fast > fast0


@pytest.mark.cuda
@cuda
def test_gpu_warm_compiled_step_launches_only_prebound():
    """The second identical compiled decode step launches every dsv4 Triton kernel pre-bound."""
    from dsv4_compile import DSv4AttentionConfig
    from dsv4_compile.model import DeepseekV4Attention
    from dsv4_compile.runtime import CacheConfig, KVCacheManager, StepMetadataBuilder, compile_step

    if not _launch.ENABLED:
        pytest.skip("pre-bound launches are off in this environment")
    cfg = DSv4AttentionConfig.tiny()
    li = cfg.compress_ratios.index(4)
    layer = DeepseekV4Attention(cfg, li, max_model_len=512, device="cuda")
    cc = CacheConfig(max_num_seqs=4, max_model_len=512, max_num_batched_tokens=64, token_budget=4 * 512)
    mgr = KVCacheManager(cfg, [li], cc, device="cuda")
    cache = mgr.caches[0]
    builder = StepMetadataBuilder(mgr, "cuda")
    for i in range(2):
        mgr.add_request(i)
        mgr.extend(i, 40)
    step = compile_step(lambda x, meta: layer(x, meta, cache))
    x = torch.randn(2, cfg.hidden_size, device="cuda").bfloat16()
    meta = builder.build([(0, 1), (1, 1)])
    with torch.no_grad():
        step(x, meta)
        step(x, meta)
        kernels = _all_prebound()
        before = {k: k.launches for k in kernels}
        fast = sum(k.fast for k in kernels)
        step(x, meta)
        torch.cuda.synchronize()
    assert {k.__name__: k.launches - before[k] for k in kernels if k.launches != before[k]} == {}
    assert sum(k.fast for k in kernels) > fast


def _all_prebound():
    return [v for mod in _kernel_modules() for v in vars(mod).values() if isinstance(v, _launch.PreBound)]
