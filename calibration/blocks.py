"""Per-block activation checkpointing of a network, for the end-to-end stage's backward pass (issue 30).

The stage already checkpoints each sampler step, so a trajectory keeps only its states; but when the backward pass
recomputes a step it keeps every activation of that step's model calls, 6.5x (SD1.5) to 11.8x (SDXL) an inference
call's peak per sample. Within ``checkpointed_blocks(network)`` each block of the network keeps only its inputs and
recomputes its own activations when the backward pass reaches it, so the peak is the blocks' inputs and outputs
plus one block's activations (benchmarks/scale.py measures it), for one more forward pass of the step.

A block is, as in ComfyUI's trainer (``comfy_extras/nodes_train.py``), one of the highest modules under the network
that are not containers (``ModuleList``, ``Sequential``, ``ModuleDict``), here only those with weights, and one step
finer: a module that holds a ``ModuleList`` of its own (a UNet level's lists of ResNets and attentions, a spatial
transformer's list of transformer blocks) is looked into as well, so a block is one ResNet or one transformer block,
not a whole resolution level of them; a ``Sequential`` inside a block (a ResNet's layers) stays in it. On SD1.5 at
512 px whole levels as blocks cut the stage's peak 2.5x below no checkpointing (1527 -> 618 MiB), one block each
to 434 MiB (benchmarks/SCALE.md). The rule is the same for ComfyUI's and Forge's
UNets and DiTs and for diffusers' classes, whatever their names.
Leaving the block restores each module exactly as it was: nothing of the patch stays on the model.
"""
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.utils.checkpoint

CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def blocks_of(network):
    """The highest non-container modules under ``network`` that hold weights, in module order; a wrapper around one
    such module (ComfyUI's model around its ``diffusion_model``) gives that module's blocks."""
    found = []

    def visit(module):
        for child in module.children():
            if isinstance(child, CONTAINERS) or any(isinstance(c, nn.ModuleList) for c in child.children()):
                visit(child)
            elif any(True for _ in child.parameters()):
                found.append(child)
    visit(network)
    return blocks_of(found[0]) if len(found) == 1 else found


def _checkpointing(forward):
    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():  # sampling and held-out checks: nothing to save, nothing to recompute
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return checkpointed


@contextmanager
def checkpointed_blocks(network):
    """Within: every block of ``network`` (None: nothing) recomputes its activations in the backward pass."""
    patched = []
    try:
        for block in blocks_of(network) if network is not None else ():
            own = block.__dict__.get("forward", None)  # a forward already set on the instance (another patch)
            patched.append((block, "forward" in block.__dict__, own))
            block.forward = _checkpointing(block.forward)
        yield len(patched)
    finally:
        for block, had_own, own in reversed(patched):
            if had_own:
                block.forward = own
            else:
                del block.forward
