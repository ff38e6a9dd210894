"""One DSv4 attention layer with tensor parallelism: every rank holds H / tp query heads and the layer
ends with one all-reduce, compiled into the step (and, on CUDA, captured in its CUDA graphs).

    torchrun --nproc_per_node 2 examples/tp_layer.py                 # CPU, gloo, tiny config
    torchrun --nproc_per_node 2 examples/tp_layer.py --device cuda   # GPUs, NCCL, V4-Flash, graphed decode
    torchrun --nproc_per_node 2 examples/tp_layer.py --device cuda --requests 64 --layer hca

Each rank builds the TP layer (``tp=TensorParallel()``) and, as the reference, the whole TP=1 layer
with the same checkpoint (the TP layer loads the full state dict; slicing on load shards it), runs
both through ``compile_step`` and ``CUDAGraphRunner`` (FULL_DECODE_ONLY; CUDA graphs on CUDA) on a
prefill and decode steps, and prints per rank the relative RMS error of the TP output against TP=1
(bf16 reduction noise, ~0.003; the check fails above 1e-2) and the decode step time of both. The
exit status is 1 on every rank when a check failed on any rank.

On CUDA, NCCL's NVLink multicast (NVLS) is turned off (``NCCL_NVLS_ENABLE=0``) unless it is set.
"""

import argparse
import gc
import os
import sys
import time

import torch
import torch.distributed as dist

from dsv4_compile import DSv4AttentionConfig
from dsv4_compile.distributed import TensorParallel
from dsv4_compile.model import DeepseekV4Attention
from dsv4_compile.runtime import CacheConfig, CUDAGraphRunner, KVCacheManager, StepMetadataBuilder, compile_step

RATIOS = {"swa": 0, "csa": 4, "hca": 128}
BOUND = 1e-2  # relative RMS error of TP against TP=1 (tests/test_tensor_parallel.py derives it)


def rel_rms(y, ref) -> float:
    y, ref = y.float(), ref.float()
    return float((y - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--config", default=None, choices=["tiny", "flash", "pro"],
                    help="default: tiny on cpu, flash on cuda")
    ap.add_argument("--layer", default="csa", choices=sorted(RATIOS))
    ap.add_argument("--requests", type=int, default=None, help="decode batch size (default 2 cpu, 64 cuda)")
    ap.add_argument("--prefill", type=int, default=64, help="prompt tokens per request")
    ap.add_argument("--decode", type=int, default=10, help="decode steps checked, then as many timed")
    ap.add_argument("--no-cudagraph", action="store_true", help="on CUDA, run decode steps compiled, without graphs")
    args = ap.parse_args()
    if "WORLD_SIZE" not in os.environ:
        ap.error("launch with torchrun, e.g. torchrun --nproc_per_node 2 examples/tp_layer.py")
    if args.prefill < 1 or args.decode < 1:
        ap.error("--prefill and --decode must be >= 1")

    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
    tp = TensorParallel()
    graphs = device.type == "cuda" and not args.no_cudagraph

    cfg_name = args.config or ("tiny" if device.type == "cpu" else "flash")
    cfg = getattr(DSv4AttentionConfig, cfg_name)()
    n_req = args.requests or (2 if device.type == "cpu" else 64)
    idx = cfg.compress_ratios.index(RATIOS[args.layer])
    max_len = max(512, 1 << (args.prefill + 2 * args.decode + 2).bit_length())
    cc = CacheConfig(max_num_seqs=n_req, max_model_len=max_len, max_num_batched_tokens=max(args.prefill, n_req, 64),
                     token_budget=n_req * max_len)

    # the checkpoint: the TP=1 layer's, the same on every rank (seeded on the CPU, then moved)
    torch.manual_seed(0)
    ref = DeepseekV4Attention(cfg, idx, max_model_len=max_len).to(device)
    layer = DeepseekV4Attention(cfg, idx, max_model_len=max_len, device=device, tp=tp)
    layer.load_state_dict(ref.state_dict())  # sliced to this rank's heads on load

    sizes = [s for s in (1, 2, 4, 8, 16, 32, 64) if s < n_req] + [n_req]
    t0 = time.perf_counter()
    runners = {}
    for name, model in (("tp", layer), ("tp1", ref)):
        mgr = KVCacheManager(cfg, [idx], cc, device=device)
        step = compile_step(lambda x, meta, model=model, mgr=mgr: model(x, meta, mgr.caches[0]))
        runners[name] = (mgr, CUDAGraphRunner(step, StepMetadataBuilder(mgr, device), cfg.hidden_size,
                                              capture_sizes=sizes, cuda_graphs=graphs))
        if graphs:
            runners[name][1].capture()
    sync(device)
    setup_s = time.perf_counter() - t0

    reqs = [f"r{i}" for i in range(n_req)]
    for mgr, _ in runners.values():
        for r in reqs:
            mgr.add_request(r)
    torch.manual_seed(1)  # the same activations on every rank
    errs = []

    def both(x, batch):
        ys = {name: runner(x, batch).clone() for name, (_, runner) in runners.items()}
        errs.append(rel_rms(ys["tp"], ys["tp1"]))

    for r in reqs:
        both(torch.randn(args.prefill, cfg.hidden_size, device=device).bfloat16(), [(r, args.prefill)])
    prefill_err = max(errs)
    batch = [(r, 1) for r in reqs]
    for _ in range(args.decode):
        both(torch.randn(n_req, cfg.hidden_size, device=device).bfloat16(), batch)
    decode_err = max(errs[n_req:])

    xs = torch.randn(args.decode, n_req, cfg.hidden_size, device=device).bfloat16()
    times = {}
    for name, (_, runner) in runners.items():  # the TP steps run together on every rank (a collective)
        runner(xs[0], batch)  # warm-up, not timed
        sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        for i in range(1, args.decode):
            runner(xs[i], batch)
        sync(device)
        times[name] = (time.perf_counter() - t0) / max(args.decode - 1, 1)

    ok = prefill_err < BOUND and decode_err < BOUND
    h0, h = layer.head_offset, layer.n_heads
    how = "CUDA-graph replay" if graphs else "compiled, no graph"
    report = (f"[rank {tp.rank}/{tp.world_size} {tp.backend}] {args.layer.upper()} layer {idx} of {cfg_name}, heads "
          f"{h0}..{h0 + h - 1} of {cfg.num_attention_heads}; vs TP=1: prefill rel RMS err {prefill_err:.2e}, "
          f"decode {decode_err:.2e} (bound {BOUND:g}): {'OK' if ok else 'FAIL'}; decode step B={n_req} "
          f"({how}): TP={tp.world_size} {times['tp'] * 1e3:.3f} ms, TP=1 {times['tp1'] * 1e3:.3f} ms "
          f"(ratio {times['tp'] / times['tp1']:.2f}); setup (compile{' + capture' if graphs else ''}) "
          f"{setup_s:.1f} s")
    sys.stdout.write(report + "\n")  # one write: the ranks share the terminal
    sys.stdout.flush()
    failed = torch.tensor([0 if ok else 1], device=device)
    dist.all_reduce(failed)
    failed = int(failed.item())
    # free the CUDA graphs (their captured all-reduces hold the NCCL communicator) before destroying
    # the group: with the graphs alive, destroy_process_group hung after all work was done (H200 x2)
    runners.clear()
    runner = None  # noqa: F841 (the timing loop's last runner)
    gc.collect()
    sync(device)
    dist.destroy_process_group()
    # leave without the interpreter's teardown: a gloo rank's C++ threads occasionally aborted there
    # ("terminate called without an active exception", SIGABRT after all work was done: 2 of ~20 CPU runs)
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(1 if failed else 0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
