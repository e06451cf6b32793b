"""Helpers for the multi-process tests: free ports, spawning gloo workers, the DDP worker itself.

Workers live here (not in a test module) so that ``torch.multiprocessing`` spawn children can
import them by module name; spawn passes the parent's ``sys.path``, which has ``tests/`` on it.
"""
from __future__ import annotations

import contextlib
import datetime
import faulthandler
import os
import sys
import socket
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import mmmod
from mmmod import functional
from _models import TwoEncoder

SPAWN_TIMEOUT_S = 240


@contextlib.contextmanager
def one_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only cost (5x slower here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_then_exit(rank: int, dump_after: float, fn, *args) -> None:
    """A worker's body, then an immediate exit once it has succeeded.

    With torch 2.13's gloo a worker that has finished (results written, process group
    destroyed) sometimes aborts during interpreter finalization ("terminate called without an
    active exception", SIGABRT with no Python frame on any thread; about 1 run in 8 of
    tests/distributed/test_distributed_methods.py here, the same with mmmod's extension disabled and at
    older commits): gloo's threads outlive the interpreter's teardown. Nothing of the test
    happens then, so a finished worker leaves with os._exit(0) and skips the teardown; a
    failing worker raises as before (its error reaches the parent through spawn).

    A worker still running ``dump_after`` seconds in prints every thread's Python stack to
    stderr, so a hang that ``spawn`` gives up on says where each rank stood."""
    faulthandler.dump_traceback_later(dump_after, exit=False)
    fn(rank, *args)
    faulthandler.cancel_dump_traceback_later()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, world: int, *args, timeout: float = SPAWN_TIMEOUT_S, attempts: int = 2) -> None:
    """Run ``fn(rank, world, port, *args)`` in ``world`` fresh processes; raise on any failure.

    A run that does not finish in ``timeout`` seconds is killed and started again on a fresh
    port, ``attempts`` times in all: on a loaded shared host a gloo run of this suite has hung
    with no error on either rank, and the same run started again passed in seconds. A worker
    that fails raises at once, without a retry, and a real deadlock fails every attempt."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    for attempt in range(1, attempts + 1):
        port = free_port()
        ctx = mp.start_processes(_run_then_exit,
                                 args=(max(timeout - 15.0, 1.0), fn, world, port) + args,
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                for p in ctx.processes:
                    p.join(5.0)
                break
        else:
            return
        if attempt < attempts:
            warnings.warn(f"distributed workers did not finish in {timeout} s (attempt {attempt} "
                          f"of {attempts}; their stacks are in the captured stderr); starting "
                          f"again")
    raise TimeoutError(f"distributed workers did not finish in {timeout} s, {attempts} times")


def init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))


def global_batch(step: int, seed: int, b: int, m: int = 2, classes: int = 5):
    """The whole global batch of a step, identical in every process."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    xs = [torch.randn(b, 1 + i, 9, 9, generator=g) for i in range(m)]
    return xs, torch.randint(0, classes, (b,), generator=g)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


# ---- the DDP training worker ----------------------------------------------------------------
LOCAL_B = 6       # per-rank batch of the plain run
STEPS = 30
ACC_STEPS = 3     # steps of the no_sync accumulation run
MICRO = 2         # micro-batches per accumulation step (the first under no_sync)
ALPHA = 0.8
LR = 0.05


def make_opt(model: nn.Module, params, backend: str, seed: int, process_group=None):
    inner = torch.optim.SGD(params, lr=LR, momentum=0.9)
    return mmmod.ModulatedOptimizer(inner, {"audio": model.encoders[0], "visual": model.encoders[1]},
                                    method="ogm_ge", alpha=ALPHA, backend=backend, seed=seed,
                                    process_group=process_group)


def ddp_worker(rank: int, world: int, port: int, out_dir: str, scenarios, seed: int) -> None:
    """For each (bucket_view, backend, explicit_group) scenario: a 30-step OGM-GE run and a
    no_sync accumulation run under DDP; results go to ``out_dir/<name>.rank<r>.pt``."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    init(rank, world, port)
    try:
        for name, bucket_view, backend, explicit_group in scenarios:
            group = dist.new_group(list(range(world))) if explicit_group else None
            res = {}
            # ---- plain run: every step scores the global batch ------------------------
            torch.manual_seed(seed + 17 * rank)  # different init per rank: DDP broadcasts rank 0's
            model = TwoEncoder()
            res["init_local"] = flat_params(model).clone()
            ddp = DDP(model, gradient_as_bucket_view=bucket_view, process_group=group)
            res["init"] = flat_params(model).clone()
            opt = make_opt(model, ddp.parameters(), backend, seed + rank, group)
            res["seed"] = opt.seed
            coeffs, scores, ref_scores, local_sums = [], [], [], []
            for t in range(STEPS):
                xs, y = global_batch(t, seed, LOCAL_B * world)
                mine = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
                opt.zero_grad()
                out, feats = ddp([x[mine] for x in xs])
                opt.observe(mmmod.fusion.concat_logits(model.head, feats), y[mine])
                nn.functional.cross_entropy(out, y[mine]).backward()
                local_sums.append(opt._score_sum.clone())
                with torch.no_grad():  # single-process scoring of the global batch, same params
                    _, gfeats = model(xs)
                    ref_scores.append(functional.scores(
                        mmmod.fusion.concat_logits(model.head, gfeats), y, backend="torch"))
                opt.step()
                coeffs.append(opt._coeffs.clone())
                scores.append(opt._scores.clone())
            res.update(coeffs=torch.stack(coeffs), scores=torch.stack(scores),
                       ref_scores=torch.stack(ref_scores), local_sums=torch.stack(local_sums),
                       params=flat_params(model).clone(), step_count=opt.step_count,
                       skipped=opt.skipped_steps)
            res["all_local_sums"] = torch.stack(gather(res["local_sums"], group))
            # ---- accumulation under no_sync ------------------------------------------
            torch.manual_seed(seed)
            model = TwoEncoder()
            ddp = DDP(model, gradient_as_bucket_view=bucket_view, process_group=group)
            opt = make_opt(model, ddp.parameters(), backend, seed, group)
            acc_scores, acc_ref, acc_local = [], [], []
            for t in range(ACC_STEPS):
                xs, y = global_batch(100 + t, seed, LOCAL_B * world * MICRO)
                opt.zero_grad()
                for mb in range(MICRO):  # rank r takes micro-batches r*MICRO .. r*MICRO+MICRO-1
                    part = slice((rank * MICRO + mb) * LOCAL_B, (rank * MICRO + mb + 1) * LOCAL_B)
                    last = mb == MICRO - 1
                    with (ddp.no_sync() if not last else contextlib.nullcontext()):
                        out, feats = ddp([x[part] for x in xs])
                        opt.observe(mmmod.fusion.concat_logits(model.head, feats), y[part])
                        (nn.functional.cross_entropy(out, y[part]) / MICRO).backward()
                acc_local.append(opt._score_sum.clone())
                with torch.no_grad():
                    _, gfeats = model(xs)
                    acc_ref.append(functional.scores(
                        mmmod.fusion.concat_logits(model.head, gfeats), y, backend="torch"))
                opt.step()
                acc_scores.append(opt._scores.clone())
            res.update(acc_scores=torch.stack(acc_scores), acc_ref=torch.stack(acc_ref),
                       acc_all_local=torch.stack(gather(torch.stack(acc_local), group)),
                       acc_params=flat_params(model).clone())
            torch.save(res, os.path.join(out_dir, f"{name}.rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def single_process_run(init_params: torch.Tensor, seed: int, backend: str, world: int):
    """The same 30 steps without DDP on the concatenated global batch: (coefficients, scores)."""
    model = TwoEncoder()
    torch.nn.utils.vector_to_parameters(init_params, model.parameters())
    opt = make_opt(model, model.parameters(), backend, seed)
    coeffs, scores = [], []
    for t in range(STEPS):
        xs, y = global_batch(t, seed, LOCAL_B * world)
        opt.zero_grad()
        out, feats = model(xs)
        opt.observe(mmmod.fusion.concat_logits(model.head, feats), y)
        nn.functional.cross_entropy(out, y).backward()
        opt.step()
        coeffs.append(opt._coeffs.clone())
        scores.append(opt._scores.clone())
    return torch.stack(coeffs), torch.stack(scores), flat_params(model)


# ---- resume: one training loop shared by the uninterrupted run and the resumed process -------
RESUME_CONFIGS = {
    # name: method, inner optimizer, apply_to, GradScaler (+ an inf step), LR scheduler, window
    "ogm_ge-adamw-scaler": dict(method="ogm_ge", inner="adamw", apply_to="grad", scaler=True,
                                sched=True, starts=0),
    "mlb-adam-update-slices": dict(method="mlb", inner="adam", apply_to="update", scaler=False,
                                   sched=False, starts=0),
    "ogm-sgd-window": dict(method="ogm", inner="sgd", apply_to="grad", scaler=False, sched=True,
                           starts=1),
    # the stateful methods: AGM's running means, MSLR's accuracy history, InfoReg's snapshot,
    # Fisher traces and window flags must all come back from the checkpoint
    "agm-sgd": dict(method="agm", inner="sgd", apply_to="grad", scaler=False, sched=False,
                    starts=0),
    "mslr-adamw": dict(method="mslr", inner="adamw", apply_to="grad", scaler=False, sched=False,
                       starts=0),
    "inforeg-sgd": dict(method="inforeg", inner="sgd", apply_to="grad", scaler=False,
                        sched=False, starts=0),
}
RESUME_AT, RESUME_TOTAL = 4, 8
INF_STEP = 5  # after the resume point: the scaler's state (scale, growth tracker) matters


def build_resume(cfg: dict, backend: str, init_seed: int, opt_seed: int, alpha: float):
    torch.manual_seed(init_seed)
    model = TwoEncoder()
    if cfg["method"] == "mlb":
        cols = mmmod.fusion.concat_slices(model.head, [4, 4])
        modalities = {"audio": [model.encoders[0], cols[0]], "visual": [model.encoders[1], cols[1]]}
    else:
        modalities = {"audio": model.encoders[0], "visual": model.encoders[1]}
    inner = {"adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
             "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
             "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)}[cfg["inner"]]
    opt = mmmod.ModulatedOptimizer(inner(model.parameters()), modalities, method=cfg["method"],
                                   alpha=None if cfg["method"] == "mslr" else alpha,
                                   apply_to=cfg["apply_to"], backend=backend,
                                   seed=opt_seed, modulation_starts=cfg["starts"])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2) \
        if cfg["scaler"] else None
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5) if cfg["sched"] else None
    return model, opt, scaler, sched


def run_resume_steps(model, opt, scaler, sched, steps, data_seed: int) -> list[dict]:
    names = opt.names
    rec = []
    for t in steps:
        xs, y = global_batch(t, data_seed, 6)
        # MSLR's per-epoch input: a made-up but deterministic accuracy history
        inputs = {"val_acc": {"audio": 0.5 + 0.03 * t, "visual": 0.4 + 0.01 * (t % 4)}} \
            if opt.method == "mslr" else {}
        opt.set_epoch(t // 3, **inputs)
        opt.zero_grad()
        out, feats = model(xs)
        opt.observe(dict(zip(names, mmmod.fusion.concat_logits(model.head, feats))), y)
        loss = nn.functional.cross_entropy(out, y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            if t == INF_STEP:
                model.encoders[1][0].weight.grad.view(-1)[0] = float("inf")
            scaler.step(opt)
            scaler.update()
        if sched is not None:
            sched.step()
        rec.append({"coeffs": opt._coeffs.clone(), "scores": opt._scores.clone(),
                    "grads": [None if p.grad is None else p.grad.clone()
                              for p in model.parameters()],
                    "step_count": opt.step_count})
    return rec


def checkpoint(model, opt, scaler, sched) -> dict:
    return {"model": model.state_dict(), "opt": opt.state_dict(),
            "scaler": None if scaler is None else scaler.state_dict(),
            "sched": None if sched is None else sched.state_dict()}


def final_state(model, opt, scaler, rec) -> dict:
    return {"params": [p.detach().clone() for p in model.parameters()],
            "opt": opt.state_dict(), "rec": rec,
            "scaler": None if scaler is None else scaler.state_dict()}


def resume_child(ckpt_dir: str, backend: str, data_seed: int) -> None:
    """Run in a fresh interpreter: load every config's step-RESUME_AT checkpoint, finish."""
    torch.set_num_threads(1)
    for name, cfg in RESUME_CONFIGS.items():
        # different constructor seed/alpha/init on purpose: everything must come from the checkpoint
        model, opt, scaler, sched = build_resume(cfg, backend, init_seed=12345, opt_seed=999,
                                                 alpha=0.33)
        ck = torch.load(os.path.join(ckpt_dir, f"{name}.ckpt.pt"))  # weights_only by default
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        if scaler is not None:
            scaler.load_state_dict(ck["scaler"])
        if sched is not None:
            sched.load_state_dict(ck["sched"])
        rec = run_resume_steps(model, opt, scaler, sched, range(RESUME_AT, RESUME_TOTAL), data_seed)
        torch.save(final_state(model, opt, scaler, rec), os.path.join(ckpt_dir, f"{name}.resumed.pt"))


# ---- backend agreement at construction -----------------------------------------------------
def backend_agreement_worker(rank: int, world: int, port: int, out_dir: str,
                             per_rank_backends, seed: int) -> None:
    """Build a ModulatedOptimizer with ``per_rank_backends[rank]`` (ranks disagree), then with
    the same backend everywhere; save what each construction said."""
    init(rank, world, port)
    try:
        res = {}
        model = TwoEncoder()
        mods = {"audio": model.encoders[0], "visual": model.encoders[1]}
        try:
            mmmod.ModulatedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), mods,
                                     backend=per_rank_backends[rank], seed=seed + rank)
            res["mixed"] = "built"
        except RuntimeError as e:
            res["mixed"] = str(e)
        opt = mmmod.ModulatedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), mods,
                                       backend=per_rank_backends[0], seed=seed + rank)
        res["agreed_seed"] = opt.seed
        # a seed above 2**63 survives the int64 collective as the same 64 bits
        big = mmmod.ModulatedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), mods,
                                       backend=per_rank_backends[0], seed=2 ** 64 - 1 - rank)
        res["big_seed"] = big.seed
        # a per-sample-mean method (AGM): ranks with unequal batches (3 and 5 samples) must
        # divide the global sums by the global count, all-reduced together
        torch.manual_seed(seed)
        model = TwoEncoder()
        opt = mmmod.ModulatedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       {"audio": model.encoders[0], "visual": model.encoders[1]},
                                       method="agm", backend="torch")
        xs, y = global_batch(0, seed, 8)
        mine = slice(0, 3) if rank == 0 else slice(3, 8)
        opt.zero_grad()
        out, feats = model([x[mine] for x in xs])
        opt.observe(mmmod.fusion.concat_logits(model.head, feats), y[mine])
        nn.functional.cross_entropy(out, y[mine]).backward()
        opt.step()
        res["mean_scores"], res["mean_coeffs"] = opt._scores.clone(), opt._coeffs.clone()
        torch.save(res, os.path.join(out_dir, f"agree.rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ---- FSDP2 (fully_shard) ------------------------------------------------------------------
class ShardEncoder(nn.Module):
    """An encoder whose tensors' first dims (5, 3, 1) divide by neither 2 nor 4 ranks: uneven
    shards, and an empty one (``gain``) on every rank but the first."""

    def __init__(self, cin: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, 5, 3)
        self.conv2 = nn.Conv2d(5, 3, 3)
        self.gain = nn.Parameter(torch.ones(1, 3))

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)) * self.gain


class ShardModel(nn.Module):
    def __init__(self, m: int = 2, classes: int = 5):
        super().__init__()
        self.encoders = nn.ModuleList(ShardEncoder(1 + i) for i in range(m))
        self.head = nn.Linear(3 * m, classes)

    def forward(self, xs):
        feats = [enc(x) for enc, x in zip(self.encoders, xs)]
        return self.head(torch.cat(feats, 1)), feats


FSDP_STEPS = 10
FSDP_LOCAL_B = 4
FSDP_CKPT_AT = 5
FSDP_BAD_STEP = 3
FSDP_INF_STEP = 6  # GradScaler: an inf in the last rank's shard of one gradient
NAMES = ["audio", "visual", "text"]
# name: method, inner, modalities, mapping ("modules": captured before fully_shard; "params":
# parameter lists taken after), param_filter, apply_to, micro-batches per rank, extras
FSDP_CONFIGS = {
    "ogm_ge-sgd": dict(method="ogm_ge", inner="sgd", m=2, mapping="modules", filter="all"),
    "ogm_ge-adamw": dict(method="ogm_ge", inner="adamw", m=2, mapping="params", filter="all"),
    "ogm_ge-3mod-scaled-update": dict(method="ogm_ge", inner="adamw", m=3, mapping="modules",
                                      filter="all", noise_std="scaled", apply_to="update"),
    "ogm_ge-accumulate": dict(method="ogm_ge", inner="sgd", m=2, mapping="modules",
                              filter="conv", micro=2),
    "ogm-sgd": dict(method="ogm", inner="sgd", m=2, mapping="modules", filter=None),
    "mlb-3mod-adamw": dict(method="mlb", inner="adamw", m=3, mapping="params", filter=None),
    "agm-sgd": dict(method="agm", inner="sgd", m=2, mapping="modules", filter="all"),
    "mslr-adamw": dict(method="mslr", inner="adamw", m=2, mapping="modules", filter=None),
    "ogm_ge-skip": dict(method="ogm_ge", inner="sgd", m=2, mapping="modules", filter="all",
                        bad_step=True),
    "ogm_ge-scaler": dict(method="ogm_ge", inner="adamw", m=2, mapping="modules", filter="all",
                          scaler=True),
    "ogm_ge-resume": dict(method="ogm_ge", inner="adamw", m=2, mapping="modules", filter="all",
                          resume=True),
    # fused=True: the modulation inside the inner update, on the local shards (the CPU kernel
    # when the extension is built, else the reference)
    "ogm_ge-sgd-fused": dict(method="ogm_ge", inner="sgd", m=2, mapping="modules", filter="all",
                             fused=True, backend="auto"),
    "ogm_ge-3mod-adamw-fused-update": dict(method="ogm_ge", inner="adamw", m=3,
                                           mapping="params", filter="all", fused=True,
                                           backend="auto", apply_to="update", resume=True),
    # InfoReg: epochs of 3 steps (snapshots retaken, traces closed, windows decided)
    "inforeg-sgd": dict(method="inforeg", inner="sgd", m=2, mapping="modules", filter=None),
    "inforeg-3mod-adamw-resume": dict(method="inforeg", inner="adamw", m=3, mapping="params",
                                      filter=None, resume=True),
}
FSDP_HYBRID = {k: FSDP_CONFIGS[k] for k in ("ogm_ge-adamw", "mlb-3mod-adamw", "inforeg-sgd")}
INFOREG_EPOCH_STEPS = 3


def fsdp_build(cfg: dict, init_seed: int, opt_seed: int, shard=None):
    """(model, ModulatedOptimizer); ``shard(module)`` is called on each encoder, then on the
    whole model (FSDP2's pattern), after a ``"modules"`` mapping has been taken."""
    torch.manual_seed(init_seed)
    model = ShardModel(cfg["m"])
    names = NAMES[:cfg["m"]]
    if cfg["mapping"] == "modules":  # module references taken before sharding stay valid
        mapping = dict(zip(names, model.encoders))
    if shard is not None:
        for enc in model.encoders:
            shard(enc)
        shard(model)
    if cfg["mapping"] == "params":  # fully_shard replaces parameters: take them afterwards
        mapping = {n: list(enc.parameters()) for n, enc in zip(names, model.encoders)}
    inner = {"sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
             "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2)}[cfg["inner"]]
    opt = mmmod.ModulatedOptimizer(
        inner(model.parameters()), mapping, method=cfg["method"], alpha=0.8 if cfg["method"] in (
            "ogm", "ogm_ge") else None, param_filter=cfg["filter"], seed=opt_seed,
        noise_std=cfg.get("noise_std", "raw"), apply_to=cfg.get("apply_to", "grad"),
        backend=cfg.get("backend", "torch"), fused=cfg.get("fused", False))
    return model, opt


def fsdp_batch(t: int, seed: int, world: int, m: int, part: int, micro: int):
    """Micro-batch ``part`` (of ``world * micro``, rank r holding r*micro .. r*micro+micro-1)
    of step t's global batch; a bad step gives the last part an ignored label (-100, which
    cross_entropy skips but the scores see as out of range)."""
    xs, y = global_batch(t, seed, FSDP_LOCAL_B * world * micro, m)
    s = slice(part * FSDP_LOCAL_B, (part + 1) * FSDP_LOCAL_B)
    return [x[s] for x in xs], y[s].clone()


def fsdp_step(model, opt, t, seed, world, parts, micro, cfg, sync=None, sharded=True,
              shard_size=None, scaler=None):
    """One training step over micro-batches ``parts`` (this rank's, or all of them in rank
    order for the single-process reference, whose gradient is then their mean)."""
    names = opt.names
    if cfg["method"] == "inforeg":
        opt.set_epoch(t // INFOREG_EPOCH_STEPS)
    opt.zero_grad()
    if cfg["method"] == "mslr":
        opt.set_epoch(1 + t, val_acc=[0.5 + 0.01 * t, 0.6 - 0.02 * t])  # ratios from epoch 6
    grads = []
    for j, part in enumerate(parts):
        xs, y = fsdp_batch(t, seed, world, cfg["m"], part, micro)
        if sync is not None:  # FSDP2's no_sync: reduce the gradients after the last part only
            sync(j == len(parts) - 1)
        out, feats = model(xs)
        logits = [z.detach() for z in mmmod.fusion.concat_logits(model.head, feats)]
        y_seen = y
        if cfg.get("bad_step") and t == FSDP_BAD_STEP and part == world * micro - 1:
            # the last rank's batch: an ignored label (the loss skips it, the scores see it
            # out of range) and a NaN unimodal logit
            y[0] = -100
            logits[0][1, 0] = float("nan")
            if not sharded:  # one process range-checks CPU labels eagerly: it observes a
                y_seen = y.clone()  # valid label there, the NaN logit alone makes the scores NaN
                y_seen[0] = 0
        opt.observe(dict(zip(names, logits)), y_seen)
        loss = nn.functional.cross_entropy(out, y, ignore_index=-100)
        if scaler is not None:
            loss = scaler.scale(loss)
        if not sharded:
            model.zero_grad()
            loss.backward()
            grads.append([None if p.grad is None else p.grad.clone() for p in model.parameters()])
        else:
            (loss / micro).backward()
    if not sharded:
        for i, p in enumerate(model.parameters()):
            p.grad = fsdp_mean([gs[i] for gs in grads], world, micro, shard_size)
    if scaler is not None and t == FSDP_INF_STEP:
        w = model.encoders[0].conv1.weight
        if sharded:
            if parts[0] == world * micro - micro:  # the last rank: its shard's first element
                w.grad.to_local().view(-1)[0] = float("inf")
        else:  # the same element of the whole gradient (torch.chunk's rows per rank)
            rows = w.shape[0]
            first = min(rows, (world - 1) * -(-rows // world))
            w.grad.view(-1)[first * w[0].numel()] = float("inf")
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()


def fsdp_mean(per_part, world: int, micro: int, shard_size: int):
    """FSDP2's gradient from per-micro-batch gradients, with its rounding: each rank
    accumulates its micro-batches' ``g / micro`` in order; the reduce-scatter adds the ranks
    of a shard group, the all-reduce (hybrid) adds the groups; then / world (power-of-two
    world and micro: the scalings are exact, so where FSDP divides does not matter)."""
    ranks = []
    for r in range(world):
        acc = None
        for j in range(micro):
            g = per_part[r * micro + j] * (1.0 / micro)
            acc = g if acc is None else acc + g
        ranks.append(acc)
    groups = []
    for q in range(0, world, shard_size):
        acc = ranks[q]
        for g in ranks[q + 1:q + shard_size]:
            acc = acc + g
        groups.append(acc)
    total = groups[0]
    for g in groups[1:]:
        total = total + g
    return total / world


def fsdp_run(cfg: dict, seed: int, world: int, rank: int | None, mesh=None, ckpt_dir=None,
             shard_size: int | None = None) -> dict:
    """FSDP_STEPS steps of ``cfg``: sharded on ``mesh`` as ``rank`` (rank None: the unsharded
    single-process reference over every rank's micro-batches). With ``resume``, the sharded
    run saves a torch.distributed.checkpoint at FSDP_CKPT_AT and continues in a fresh model
    and optimizer built from other seeds that load it."""
    micro = cfg.get("micro", 1)
    sharded = rank is not None
    shard_size = shard_size or world
    parts = list(range(rank * micro, (rank + 1) * micro)) if sharded else list(range(world * micro))
    shard = None
    if sharded:
        from torch.distributed.fsdp import fully_shard
        shard = lambda mod: fully_shard(mod, mesh=mesh)  # noqa: E731
    model, opt = fsdp_build(cfg, seed, seed + 1 + (rank or 0), shard)
    sync = model.set_requires_gradient_sync if sharded and micro > 1 else None
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if cfg.get("scaler") else None
    coeffs, scores, betas, collectives = [], [], [], None
    for t in range(FSDP_STEPS):
        if sharded and cfg.get("resume") and t == FSDP_CKPT_AT:
            model, opt = fsdp_resume(cfg, model, opt, seed, mesh, ckpt_dir, shard)
        if sharded and t == 0 and cfg["method"] == "ogm_ge":
            collectives = count_all_gathers(lambda: fsdp_step(
                model, opt, t, seed, world, parts, micro, cfg, sync, sharded, shard_size, scaler))
        else:
            fsdp_step(model, opt, t, seed, world, parts, micro, cfg, sync, sharded, shard_size,
                      scaler)
        coeffs.append(opt._coeffs.clone())
        scores.append(opt._scores.clone())
        if "beta" in opt._method_state:  # InfoReg: the proximal pull's strength this step
            betas.append(opt._method_state["beta"].clone())
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for n, p in model.named_parameters()}
    method_state = {k: v.clone() for k, v in opt._method_state.items()
                    if not k.startswith("snapshot.")}  # the rest is replicated
    return {"coeffs": torch.stack(coeffs), "scores": torch.stack(scores), "params": params,
            "betas": torch.stack(betas) if betas else None, "method_state": method_state,
            "skipped": opt.skipped_steps, "step_count": opt.step_count,
            "fused": opt._fused is not None,
            "collectives": collectives,
            "scale": None if scaler is None else scaler.get_scale()}


def count_all_gathers(fn) -> int:
    """Run fn (one training step); return how many all-gathers ModulatedOptimizer.step made
    (FSDP's own collectives run in forward and backward, outside step)."""
    import mmmod.optim.distributed as md
    calls = []
    real_gather, real_step = md.dist.all_gather_into_tensor, mmmod.ModulatedOptimizer.step

    def counting(*a, **k):
        calls.append(a[1].numel())
        return real_gather(*a, **k)

    def step(self, *a, **k):
        md.dist.all_gather_into_tensor = counting
        try:
            return real_step(self, *a, **k)
        finally:
            md.dist.all_gather_into_tensor = real_gather
    mmmod.ModulatedOptimizer.step = step
    try:
        fn()
    finally:
        mmmod.ModulatedOptimizer.step = real_step
    return len(calls)


def fsdp_resume(cfg, model, opt, seed, mesh, ckpt_dir, shard):
    """Save the sharded state with torch.distributed.checkpoint, build everything anew from
    other seeds, load it: the recipe of docs/distributed.md."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict)
    import io
    # mmmod's entry is replicated (the same on every rank) unless opt.sharded_state (InfoReg's
    # snapshot of sharded parameters): then each rank saves its own under its own key
    key = f"mmmod.rank{dist.get_rank()}" if opt.sharded_state else "mmmod"
    mine = io.BytesIO()
    torch.save(opt.state_dict()["mmmod"], mine)
    state = {"model": get_model_state_dict(model),
             "optim": get_optimizer_state_dict(model, opt.optimizer), key: mine}
    dcp.save(state, checkpoint_id=ckpt_dir)
    model, opt = fsdp_build(cfg, seed + 777, seed + 999, shard)
    state = {"model": get_model_state_dict(model),
             "optim": get_optimizer_state_dict(model, opt.optimizer), key: io.BytesIO()}
    dcp.load(state, checkpoint_id=ckpt_dir)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt.optimizer, state["optim"])
    state[key].seek(0)
    opt.load_state_dict({**opt.optimizer.state_dict(), "mmmod": torch.load(state[key])})
    return model, opt


def fsdp_worker(rank: int, world: int, port: int, out_dir: str, configs, seed: int,
                mesh_shape) -> None:
    """Every config of ``configs`` sharded over ``mesh_shape`` (1-D: fully_shard; 2-D:
    replicate x shard); results to ``out_dir/<name>.rank<r>.pt``."""
    from torch.distributed.device_mesh import init_device_mesh
    init(rank, world, port)
    try:
        names = ("replicate", "shard") if len(mesh_shape) == 2 else ("shard",)
        mesh = init_device_mesh("cpu", tuple(mesh_shape), mesh_dim_names=names)
        for name, cfg in configs.items():
            ckpt = os.path.join(out_dir, f"{name}.dcp")
            res = fsdp_run(cfg, seed, world, rank, mesh, ckpt)
            torch.save(res, os.path.join(out_dir, f"{name}.rank{rank}.pt"))
        if len(mesh_shape) == 1:
            torch.save(fsdp_refusals(mesh), os.path.join(out_dir, f"refusals.rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def fsdp_refusals(mesh) -> dict:
    """What construction says for layouts mmmod cannot give a contiguous stream range."""
    from torch.distributed.tensor import Shard, distribute_tensor
    out = {}
    col = nn.Parameter(distribute_tensor(torch.randn(3, 5, 2, 2), mesh, [Shard(1)]))
    row = nn.Parameter(distribute_tensor(torch.randn(5, 4), mesh, [Shard(0)]))
    plain = nn.Parameter(torch.randn(3, 3))
    for key, bad, method, mods in (
            ("shard1", col, "ogm_ge", {"audio": [col], "visual": [plain]}),
            ("slice", row, "mlb", {"audio": [mmmod.ParamSlice(row, 0, 0, 2)], "visual": [plain]})):
        try:
            mmmod.ModulatedOptimizer(torch.optim.SGD([bad, plain], lr=0.1), mods, method=method,
                                     param_filter="all")
            out[key] = "built"
        except ValueError as e:
            out[key] = str(e)
    # the same DTensor sharded on dim 1 is fine for an element-wise method
    mmmod.ModulatedOptimizer(torch.optim.SGD([col, plain], lr=0.1),
                             {"audio": [col], "visual": [plain]}, method="ogm", param_filter="all")
    return out


# ---- DDP replicas with the stateful methods ------------------------------------------------
STATEFUL_METHODS = ("agm", "mslr", "inforeg")


def ddp_methods_worker(rank: int, world: int, port: int, out_dir: str, seed: int) -> None:
    """Each stateful method under DDP (different init per rank, rank 0's is broadcast), 3 epochs
    of 3 steps on rank-local slices of a global batch; saves parameters, coefficients and the
    method state per rank (they must be identical on every rank)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    init(rank, world, port)
    try:
        for method in STATEFUL_METHODS:
            torch.manual_seed(seed + 17 * rank)
            model = TwoEncoder()
            ddp = DDP(model)
            opt = mmmod.ModulatedOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9),
                                           {"audio": model.encoders[0], "visual": model.encoders[1]},
                                           method=method, backend="torch", seed=seed + rank)
            coeffs = []
            for t in range(9):
                inputs = {"val_acc": {"audio": 0.5 + 0.02 * t, "visual": 0.45}} \
                    if method == "mslr" else {}
                opt.set_epoch(t // 3, **inputs)
                xs, y = global_batch(t, seed, 4 * world)
                mine = slice(rank * 4, (rank + 1) * 4)
                opt.zero_grad()
                out, feats = ddp([x[mine] for x in xs])
                opt.observe(mmmod.fusion.concat_logits(model.head, feats), y[mine])
                nn.functional.cross_entropy(out, y[mine]).backward()
                opt.step()
                coeffs.append(opt._coeffs.clone())
            torch.save({"params": flat_params(model).clone(), "coeffs": torch.stack(coeffs),
                        "state": {k: v.clone() for k, v in opt._method_state.items()}},
                       os.path.join(out_dir, f"{method}.rank{rank}.pt"))
    finally:
        dist.destroy_process_group()



def hang_worker(rank: int, world: int, port: int) -> None:
    """A worker that never finishes (the spawn helper's own test)."""
    time.sleep(600)
