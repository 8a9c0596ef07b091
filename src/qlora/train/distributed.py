"""Data-parallel (DDP) and sharded (FSDP2) training through torch.distributed.

A run is launched by ``torchrun``, which sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; without them everything here is a no-op for one process. The
choices that keep runs equivalent to one process with the same global batch:

- Gradients are *summed* over ranks (never averaged): each rank's loss is its
  token-loss sum divided by the trainable-token count of the whole global
  batch, which is all-reduced first.
- LoRA parameters stay whole on every rank, also under FSDP2 (they are
  ``ignored_params``): they are a fraction of a percent of the model, and whole
  copies keep optimizer states and checkpoints independent of the world size.
  FSDP2 shards what does not fit: the frozen 4-bit base.
"""

import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from qlora.errors import UsageError
from qlora.nn import Linear4bit


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: rank, world size and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, logs, metrics and the progress bar."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistContext":
        """Read torchrun's variables and join the process group (NCCL on CUDA, gloo on CPU)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        ctx = cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(ctx.local_rank)
            dist.init_process_group("nccl" if cuda else "gloo")
        return ctx

    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum ``values`` over ranks (in place; returned for chaining)."""
        if self.enabled:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def all_gather_cat(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's ``values`` (the same shape on all but dim 0, whose length may differ: a short micro-batch
        gives ranks fewer rows, or none), concatenated in rank order along dim 0; this rank's own part is
        ``values`` itself, with its gradient, the others' carry none."""
        if not self.enabled:
            return values
        lengths = [torch.zeros(1, dtype=torch.long, device=values.device) for _ in range(self.world_size)]
        dist.all_gather(lengths, torch.tensor([values.shape[0]], device=values.device))
        longest = max(int(n) for n in lengths)
        padded = values.detach().new_zeros((longest, *values.shape[1:]))
        padded[:values.shape[0]] = values.detach()
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        parts = [part[:int(n)] for part, n in zip(parts, lengths)]
        parts[self.rank] = values
        return torch.cat(parts)

    def shutdown(self, wait: bool = True) -> None:
        """Leave the group once every rank is done (``wait``): a rank that tears its group down while another
        still talks to it can abort the process.

        A rank that failed (not ``wait``), or whose barrier finds the others gone (one failed in its own last
        work: rank 0's final save), leaves the group as it is, for the process's end to close: tearing it down
        can hang the rank for good. gloo's destructor joins its worker threads holding the GIL, which one of them
        may still need to free the tensors of the last collective (seen in 2 of 3 runs whose rank 1 ran out of
        memory: it never ended, and the launcher waited for it)."""
        if not self.enabled or not dist.is_initialized() or not wait:
            return
        try:
            dist.barrier()
        except RuntimeError as exc:
            if is_rank_lost(exc):
                return
            raise
        dist.destroy_process_group()


class RankLost(RuntimeError):
    """A collective of this rank failed because another rank stopped (killed, out of memory, failed)."""


def is_rank_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed collective: torch's ``DistError`` (NCCL, the store), or gloo's transport errors,
    which reach Python as plain RuntimeErrors naming gloo ("Connection closed by peer")."""
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and "/gloo/" in str(exc))


def _sum_hook(group: dist.ProcessGroup | None, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: all-reduce SUM (DDP's default divides by the world size).
    (This module has no ``from __future__ import annotations``: DDP checks these
    annotations as objects.)"""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP over the trainable parameters only.

    The frozen base is excluded from DDP's start-up broadcast (every rank
    loaded the same checkpoint, and LoRA is initialized from the same seed), so
    a 70B base is not sent over the network once per run. Adapters a rank's
    batch does not reach (experts no token was routed to, cross-attention
    layers only images reach) are found after each forward: without that DDP
    waits for their gradients and fails the next step; a parameter no rank
    reached keeps no gradient, as in one process.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
    device_ids = [ctx.local_rank] if torch.cuda.is_available() else None
    # no buffer sync in forward (the buffers are ignored above); torch 2.13 renamed the option
    renamed = "forward_sync_buffers" in inspect.signature(DDP).parameters
    no_sync = "forward_sync_buffers" if renamed else "broadcast_buffers"
    ddp = DDP(model, device_ids=device_ids, find_unused_parameters=True, **{no_sync: False})
    ddp.register_comm_hook(None, _sum_hook)
    return ddp


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks, outermost only: the classes transformers names in ``_no_split_modules``, or for a model
    that names none (BioGPT, Blenderbot, RoBERTa, ...) the items of its outermost module lists of one class.

    A block's own modules stay in it: a named class inside another (Mamba names its block and the mixer the block
    holds), a list inside a block (an MoE layer's list of experts). FSDP2 would otherwise shard the outer block
    first and then find the inner one's parameters already sharded."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    named = [m for m in model.modules() if type(m).__name__ in names]
    layers: list[nn.Module] = []
    inside: set[int] = set()  # modules within a block already found
    for module in (named or model.modules()):  # modules() is pre-order: a block comes before what it holds
        if id(module) in inside:
            continue
        if named:
            blocks = [module]
        elif isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            blocks = list(module)
        else:
            continue
        layers.extend(blocks)
        inside.update(id(m) for block in blocks for m in block.modules())
    if not layers:
        raise UsageError(f"--fsdp: {type(model).__name__} has no repeated blocks to shard (no _no_split_modules, "
                         "no list of layers of one class); train it without --fsdp (DDP replicas).")
    return layers


def unshared_blocks(model: nn.Module, blocks: list[nn.Module], ignored: set[nn.Parameter]) -> list[nn.Module]:
    """The ``blocks`` none of whose sharded parameters (all but ``ignored``) a module outside the block also holds.

    FSDP2 refuses a parameter two groups manage: BERT and RoBERTa name their embeddings module in
    ``_no_split_modules``, and its word embeddings are the output head's weight too. Such a block is left to the
    root's group, with the other module that holds its parameter."""
    owners: dict[int, set[int]] = {}  # parameter -> the modules holding it
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and param not in ignored:
                owners.setdefault(id(param), set()).add(id(module))
    kept = []
    for block in blocks:
        inside = {id(m) for m in block.modules()}
        if all(owners.get(id(p), set()) <= inside for p in block.parameters()):
            kept.append(block)
    return kept


FSDP2_TORCH = "2.7"  # fully_shard's ignored_params (torch.distributed.fsdp exports fully_shard since 2.6)


def fsdp2_api():
    """``(fully_shard, MixedPrecisionPolicy)``, or a UsageError naming the torch that has them: --fsdp keeps
    the LoRA parameters out of the shards with ``ignored_params``, first in torch 2.7."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        fully_shard = MixedPrecisionPolicy = None
    if fully_shard is None or "ignored_params" not in inspect.signature(fully_shard).parameters:
        raise UsageError(f"--fsdp needs torch>={FSDP2_TORCH} (FSDP2's fully_shard with ignored_params); this is "
                         f"torch {torch.__version__}. Upgrade torch, or train without --fsdp (DDP replicas).")
    return fully_shard, MixedPrecisionPolicy


def shard_fsdp(model: nn.Module, ctx: DistContext, compute_dtype: torch.dtype) -> None:
    """FSDP2 (``fully_shard``) on every decoder layer, then on the root, in place.

    Each rank keeps 1/world of the 4-bit codes and constants (made shardable
    in ``compute_dtype`` storage, the all-gather dtype) and of the frozen
    16-bit tensors; a layer's shards are all-gathered just before its forward
    and again before its backward, and freed after. Mixed precision: the
    parameters are already in ``compute_dtype`` (bf16 on GPU, fp32 on the CPU);
    trainable parameters are ignored by FSDP (see the module docstring).
    """
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard, MixedPrecisionPolicy = fsdp2_api()
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.make_shardable(compute_dtype)
    mesh = init_device_mesh(ctx.device().type, (ctx.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    trainable = {p for p in model.parameters() if p.requires_grad}
    for layer in unshared_blocks(model, decoder_layers(model), trainable):
        fully_shard(layer, mesh=mesh, mp_policy=policy, ignored_params=trainable)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=trainable)


def all_reduce_grads(params: list[nn.Parameter], ctx: DistContext) -> None:
    """Sum the gradients of whole (FSDP-ignored) parameters over ranks, in one flat bucket.

    Every rank sends every parameter (zeros where its batch reached none: an expert no token was routed to), so
    the ranks' buckets agree, and one count per parameter of the ranks that reached it: a parameter no rank
    reached keeps no gradient, as in one process (an optimizer skips it rather than decaying its moments)."""
    if not ctx.enabled or not params:
        return
    reached = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
                     + [reached])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    parts = flat.split([p.numel() for p in params] + [len(params)])
    for p, part, count in zip(params, parts, parts[-1].tolist()):
        if not count:
            continue
        if p.grad is None:
            p.grad = torch.empty_like(p)
        p.grad.copy_(part.view_as(p))


@contextmanager
def gathered_parameters(model: nn.Module, ctx: DistContext) -> Iterator[None]:
    """Under FSDP2, for the length of the block: on rank 0 every sharded parameter of ``model`` whole (on the
    CPU, one at a time through the accelerator), so that what reads a module's own tensors sees them whole (a
    4-bit layer's codes and constants, written as the LoftQ base). A collective: every rank enters, the others
    only to send their shards. Without FSDP (or outside torchrun) nothing changes."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if not ctx.enabled or not any(isinstance(m, FSDPModule) for m in model.modules()):
        yield
        return
    for module in model.modules():  # the root stays unsharded after an eval forward; state_dict would reshard it
        if isinstance(module, FSDPModule):
            module.reshard()
    whole: dict[int, nn.Parameter] = {}  # a tied parameter (embedding = head) gathered once, one object again
    swapped = []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if not isinstance(param, DTensor):
                continue
            if id(param) not in whole:
                full = param.full_tensor()  # every rank, in the same order
                whole[id(param)] = nn.Parameter(full.cpu(), requires_grad=False) if ctx.is_main else None
            if ctx.is_main:
                swapped.append((module, name, param))
                module._parameters[name] = whole[id(param)]
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param
