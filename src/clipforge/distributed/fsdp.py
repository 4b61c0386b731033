"""Fully sharded data parallel (FSDP2) for CLIP, and sharded checkpoints that any number of processes resumes.

`shard_model` applies `torch.distributed.fsdp.fully_shard` to each residual block of both towers (the
transformer blocks of the ViT and text towers; a ModifiedResNet's bottlenecks and attention pool) and then to
the model itself, which gathers everything else (embeddings, stems, final norms, projections). Each process
then holds 1/W of every parameter, gradient and AdamW moment; a block's weights are all-gathered just before
it runs and freed after, and its gradients are reduce-scattered (averaged, as DDP does) in the backward.

The scalar parameters (`logit_scale`, `logit_bias`) stay whole on every process: fully_shard refuses 0-dim
parameters, and they are 8 bytes. A hook averages their gradient over processes the moment it is
accumulated, so what the optimizer sees is DDP's gradient; the temperature clamp (`clamp_logit_scale`)
works on them unchanged. Everything else is a DTensor between steps, and the step code in
`train/steps.py` works on it as it is: `clip_grad_norm_` returns the global norm (a replicated DTensor
whose `.item()` every process agrees on), and `parameters_finite` sees a NaN in any process's shard on all
of them. The tests check each of these.

Checkpoints are torch.distributed.checkpoint (DCP) directories: one data file per saving process and a
`.metadata` index written last (atomically), so a run saved with W processes loads into W' (1 included,
without a process group). `full_state_dict` / `full_model` gather the unsharded weights on rank 0 for
the usual clipforge directory that `clipforge.load` reads.

Trust: DCP's `.metadata` is a pickle, and so are the non-tensor values (the optimizer's hyperparameters).
`load_sharded` reads the index with a restricted unpickler that admits only DCP's own record classes,
torch sizes, dtypes and layouts, and paths (anything else is refused, naming it, before it is imported),
and the other values with `torch.load(weights_only=True)`, as DCP already reads the tensor data. So a
sharded checkpoint, like every clipforge file, runs no code from the file when loaded.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from clipforge.checkpoints.safe_unpickle import CheckpointError, UnsafeCheckpointError
from clipforge.models.clip import CLIP
from clipforge.models.layers import ResidualAttentionBlock
from clipforge.models.modified_resnet import AttentionPool2d, Bottleneck

# The units that are gathered, run and freed one at a time: the repeated blocks of either tower. By type,
# so that any architecture built from them is sharded the same way.
SHARDED_BLOCKS: tuple[type[nn.Module], ...] = (ResidualAttentionBlock, Bottleneck, AttentionPool2d)
# CLIP's entry points besides forward(): FSDP must gather the root's parameters around each of them.
ENCODERS = ("encode_image", "encode_text")
METADATA_FILE = ".metadata"  # DCP's index of a checkpoint, written last


# ---- sharding ----


def sharded_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules `shard_model` shards on their own, outermost first (none of them nests another)."""
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if isinstance(module, SHARDED_BLOCKS) and id(module) not in inside:
            blocks.append(module)
            inside.update(id(m) for m in module.modules())
    return blocks


def shard_model(model: CLIP, mesh: DeviceMesh | None = None) -> CLIP:
    """Shard `model` in place over the process group (or `mesh`): each residual block, then the root.

    The process group must exist (`init_process_group`) and the model must be on this process's device.
    Every process ends up with rank 0's weights: they are broadcast first, as DDP does, because fully_shard
    keeps this process's slice of whatever it holds. Build the optimizer after this call.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("shard_model needs a process group: call init_process_group first")
    if isinstance(model, FSDPModule):
        raise ValueError("this model is already sharded")
    device = next(model.parameters()).device
    mesh = mesh if mesh is not None else init_device_mesh(device.type, (dist.get_world_size(),))
    _broadcast_from_rank0(model)
    scalars = {p for p in model.parameters() if p.ndim == 0}
    for block in sharded_blocks(model):
        fully_shard(block, mesh=mesh, ignored_params=scalars)
    fully_shard(model, mesh=mesh, ignored_params=scalars)
    for name in ENCODERS:
        register_fsdp_forward_method(model, name)
    for param in scalars:
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(_average_gradient)
    return model


@torch.no_grad()
def _broadcast_from_rank0(model: nn.Module) -> None:
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)


@torch.no_grad()
def _average_gradient(param: torch.Tensor) -> None:
    """DDP's treatment of a parameter FSDP does not manage: its gradient becomes the mean over processes.

    Runs after each accumulation, so several backward passes before a step (a gradient cache) still add
    up to the mean of the sums: mean(a) + mean(b) = mean(a + b).
    """
    dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)  # gloo has no AVG
    param.grad.div_(dist.get_world_size())


@torch.no_grad()
def broadcast_buffers(model: nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm statistics, which FSDP leaves to each process, as DDP
    would after its per-forward broadcast). The savers call it, so what is saved is well defined."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def local_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """This process's part of each tensor: a DTensor's local shard, any other tensor as it is. For work
    that must not communicate (e.g. per-process statistics); global answers need the DTensors themselves."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


# ---- whole weights on rank 0 ----


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights (OpenAI's keys) on CPU on rank 0, an empty dict on the others.

    Collective: every process must call it. Without a process group (or an unsharded model) it is the
    model's state dict on CPU.
    """
    if not isinstance(model, FSDPModule):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    broadcast_buffers(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    # Gathered shards are new tensors, but what FSDP does not manage (the scalars, buffers) comes back as
    # the model's own tensor: copy those, or the dict would change with the next step.
    own = {t.data_ptr() for t in [*model.parameters(), *model.buffers()] if not isinstance(t, DTensor)}
    return {k: v.detach().clone() if v.data_ptr() in own else v for k, v in state.items()}


def full_model(model: CLIP) -> CLIP | None:
    """An unsharded CPU copy of a sharded CLIP on rank 0 (None on the others), for `save_native` or
    `clipforge.save`. Collective, like `full_state_dict`. Built on the meta device and given the gathered
    tensors, so rank 0 holds the weights once."""
    state = full_state_dict(model)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        copy = CLIP(model.config)
    copy.load_state_dict(state, assign=True)
    return copy.train(model.training)


# ---- sharded checkpoints ----


def save_sharded(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> Path:
    """Write the model's and optimizer's state as a DCP checkpoint in `directory` (new or empty; on a file
    system every process sees). Collective. Each process writes its own shards; `.metadata` comes last."""
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise CheckpointError(f"cannot save a sharded checkpoint to {directory}: it exists and is not empty")
    directory.mkdir(parents=True, exist_ok=True)
    broadcast_buffers(model)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.save(state, storage_writer=FileSystemWriter(directory), no_dist=not _grouped())
    return directory


def load_sharded(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a `save_sharded` checkpoint into `model` and `optimizer`, whatever number of processes saved
    it: sharded models with any process count, or a plain model in a single process (no process group).
    Collective. Every tensor must be in the checkpoint with its shape; the file's pickles are read
    without running anything (see the module docstring)."""
    directory = Path(directory)
    reader = _RestrictedReader(directory)
    reader.read_metadata()  # refuse a missing or unsafe index here, with its own message
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, storage_reader=reader, planner=_RestrictedLoadPlanner(), no_dist=not _grouped())
    except (CheckpointException, RuntimeError, ValueError, AssertionError) as e:
        raise _load_error(directory, e) from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _grouped() -> bool:
    """Whether a process group exists (without one, DCP reads and writes as the only process)."""
    return dist.is_available() and dist.is_initialized()


def _load_error(directory: Path, error: BaseException) -> CheckpointError:
    """One line naming the checkpoint and the first failure (DCP wraps each process's in its own type)."""
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    if isinstance(error, CheckpointError):
        return error
    lines = str(error).strip().splitlines()
    reason = lines[0] if lines else repr(error)
    return CheckpointError(f"{directory}: cannot load the sharded checkpoint: {reason}")


# The globals a DCP index may name: its record classes, and the torch and path values inside them.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a lookup of torch's layout objects by name
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        allowed = name in _METADATA_GLOBALS.get(module, ())
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise UnsafeCheckpointError(f"{module}.{name}", self.path)
        return super().find_class(module, name)


class _RestrictedReader(FileSystemReader):
    """DCP's file reader, with the `.metadata` pickle read by `_MetadataUnpickler`."""

    def __init__(self, directory: Path):
        super().__init__(directory)
        self._directory = directory
        self._metadata: Metadata | None = None

    def read_metadata(self) -> Metadata:  # no **kwargs: DCP then never asks for per-rank indexes
        if self._metadata is None:
            path = self._directory / METADATA_FILE
            if not path.is_file():
                missing = f"{self._directory} is not a sharded checkpoint: it has no {METADATA_FILE}"
                raise CheckpointError(missing)
            try:
                metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes()), path).load()
            except UnsafeCheckpointError:
                raise
            except Exception as e:  # a truncated or corrupt pickle
                raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None
            if not isinstance(metadata, Metadata):
                raise CheckpointError(f"{path} is not a DCP index (holds a {type(metadata).__name__})")
            if metadata.storage_meta is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            self._metadata = metadata
        return self._metadata


class _RestrictedLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner; non-tensor values are first read by torch's weights-only unpickler, which
    refuses anything but plain data, before the default path (an unrestricted torch.load) sees them."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            reason = str(e).strip().splitlines()[0]
            fqn = read_item.dest_index.fqn
            raise CheckpointError(f"refusing the checkpoint value {fqn}: {reason}") from None
        value.seek(0)
        super().load_bytes(read_item, value)
