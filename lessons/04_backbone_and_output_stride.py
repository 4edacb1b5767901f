"""Lesson 4 — The backbone and its output stride: from 1/32 to 1/8 resolution with holes.

You will learn:
  * how a ResNet shrinks a 321×321 image stage by stage down to 1/32 (11×11 features);
  * how DeepLab v2 removes the stride of the last one or two stages and dilates every later
    convolution by the stride it removed (output stride 16 or 8), with the *same* weights;
  * why that is exact: the output-stride-8 map, read every 4th pixel, *is* the
    output-stride-32 map (the "algorithme à trous") — the extra positions are new, denser
    responses, not interpolation;
  * what it costs: compute and memory grow with the number of output positions.

Run:  python lessons/04_backbone_and_output_stride.py   (TDL_FAST=1 for a smaller, quicker run)
"""
# %% Setup
import os
import time

import tinydeeplab  # noqa: F401  first: its thread set-up must precede NumPy's (README)
import numpy as np

from tinydeeplab import Tensor, exercises, lessons, models, nn, no_grad

FAST = lessons.fast()  # TDL_FAST=1: a smaller run (the test suite's smoke test)
OUT = lessons.output_dir()  # figures and runs: $TDL_OUT, else ./lesson_out
rng = np.random.default_rng(0)
BACKBONE, SIZE = "resnet50", (129 if FAST else 321)

# %% 1. Stage by stage
# conv1 (stride 2) and the max-pool (stride 2) take 1/4; layer2, layer3 and layer4 each halve
# again: 1/8, 1/16, 1/32.  Output stride 16 gives layer4's stride away (its 3×3 convolutions
# dilated by 2); output stride 8 also layer3's (3×3 dilation 2 in layer3, 4 in layer4).  The
# first block of such a stage keeps the previous stage's dilation in its 3×3 (the one that
# held the stride), as torchvision's ``replace_stride_with_dilation`` does.
x = Tensor(rng.standard_normal((1, 3, SIZE, SIZE)).astype(np.float32))
nets = {os_: models.ResNet(BACKBONE, output_stride=os_, seed=0).eval() for os_ in (32, 16, 8)}
sizes, dilations = {}, {}
with no_grad():
    for os_, net in nets.items():
        h = net.maxpool(net.bn1(net.conv1(x)))
        sizes[os_] = [("stem", h.shape[2])]
        for name in ("layer1", "layer2", "layer3", "layer4"):
            h = getattr(net, name)(h)
            # the dilations of the stage's 3×3 convolutions, block by block (the 1×1s have
            # nothing to dilate): as torchvision's replace_stride_with_dilation, the first block
            # of a stage that gave up its stride keeps the previous dilation
            dils = [m.dilation for _, m in getattr(net, name).named_modules()
                    if isinstance(m, nn.Conv2d) and m.weight.shape[2:] == (3, 3)]
            first, rest = dils[0], sorted(set(dils[1:]))
            label = f"3×3 dilation {first}" + (f", then {rest[0]}" if rest != [first] else "")
            sizes[os_].append((f"{name} ({label})", h.shape[2]))
            dilations[(os_, name)] = dils
for os_, rows in sizes.items():
    print(f"output stride {os_:2d}: " + ", ".join(f"{n} {s}×{s}" for n, s in rows))

# %% 2. Same weights, three networks
# No parameter changes shape: a stride is not a parameter, neither is a dilation.  So the weights
# of the 1/32 network load into the 1/8 one as they are (this is how DeepLab starts from an
# ImageNet ResNet).
state = nets[32].state_dict()
for os_ in (16, 8):
    nets[os_].load_state_dict(state)
with no_grad():
    feats = {os_: net(x).numpy() for os_, net in nets.items()}
for os_, f in feats.items():
    print(f"output stride {os_:2d}: features {f.shape}")

# %% 3. The algorithme à trous: every 4th pixel of the 1/8 map is the 1/32 map
# A stride-2 convolution computes every other position of the stride-1 one.  Keep all positions
# instead, and a following kernel must skip every other position to read the same pixels:
# dilation 2.  Positions 0, 4, 8, ... of the output-stride-8 features are therefore exactly the
# output-stride-32 features; the rest are responses the 1/32 network never computed.
# (Exact for ResNet-50/101, whose only 3×3 convolution in a block carries the stride.  In a
# BasicBlock — ResNet-18/34 and our "tiny" — the second 3×3 also follows the removed stride;
# like mmsegmentation we keep the previous dilation there, which is close to but not exactly the
# strided network: see models.BasicBlock for the measured trade-off.)  "Exactly" up to float32
# rounding: OS 8's larger 3×3 layers are computed by Winograd (lesson 02), which rounds
# differently from the im2col GEMMs of the OS-32 network — hence a difference of ~1e-6 below.
n32 = feats[32].shape[2]
sub8 = feats[8][:, :, ::4, ::4][:, :, :n32, :n32]
sub16 = feats[16][:, :, ::2, ::2][:, :, :n32, :n32]
err8 = np.abs(sub8 - feats[32]).max() / np.abs(feats[32]).max()
err16 = np.abs(sub16 - feats[32]).max() / np.abs(feats[32]).max()
print(f"relative max difference: OS 8 every 4th pixel vs OS 32 {err8:.1e}, "
      f"OS 16 every 2nd vs OS 32 {err16:.1e}")

# %% 4. The cost
# Layers after a removed stride run on 4× (then 16×) more positions.  Time one forward pass of
# each and count output positions.
times = {}
with no_grad():
    for os_, net in nets.items():
        net(x)  # warm up
        t0 = time.perf_counter()
        net(x)
        times[os_] = time.perf_counter() - t0
for os_ in (32, 16, 8):
    print(f"output stride {os_:2d}: {feats[os_].shape[2] ** 2:5d} output positions, forward "
          f"{times[os_] * 1e3:7.1f} ms ({times[os_] / times[32]:.1f}× the OS-32 time)")

import matplotlib.pyplot as plt  # noqa: E402

channel = int(np.argmax(feats[8][0].std(axis=(1, 2))))
fig, ax = plt.subplots(1, 4, figsize=(13, 3.2))
for a, os_ in zip(ax, (32, 16, 8)):
    a.imshow(feats[os_][0, channel], cmap="magma")
    a.set_title(f"output stride {os_}: {feats[os_].shape[2]}×{feats[os_].shape[3]}", fontsize=9)
    a.axis("off")
ax[3].bar([str(o) for o in (32, 16, 8)], [times[o] * 1e3 for o in (32, 16, 8)])
ax[3].set_xlabel("output stride")
ax[3].set_ylabel("forward ms")
ax[3].set_title(f"{BACKBONE}, {SIZE}×{SIZE} input", fontsize=9)
fig.savefig(os.path.join(OUT, "04_output_stride.png"), dpi=90, bbox_inches="tight")
plt.close(fig)

# %% Check
assert [s for _, s in sizes[32]][-1] == -(-SIZE // 32)  # ⌈321 / 32⌉ = 11
assert feats[8].shape[2] == -(-SIZE // 8) and feats[16].shape[2] == -(-SIZE // 16)
assert err8 < 1e-4 and err16 < 1e-4, "the dense map must contain the sparse one"
assert set(dilations[(8, "layer3")][1:]) == {2} and set(dilations[(8, "layer4")][1:]) == {4}
assert set(dilations[(16, "layer4")][1:]) == {2} and set(dilations[(32, "layer4")]) == {1}
print("Check passed.")

# %% Exercise — the dilations of each stage (a solution: lessons/solutions/04_backbone_and_output_stride.py)
# For an output stride (8, 16 or 32), return the dilation of layer3's and layer4's first
# 3×3 convolution and of their other blocks' 3×3s: {"layer3": (first, rest), "layer4": ...}.
# The check builds the ResNets and compares (section 1 printed the answer for 8 and 16).
def stage_dilations(output_stride):
    raise NotImplementedError("your code here")


exercises.run(exercises.check_stage_dilations, stage_dilations)

# %% Summary — read next
# * Output stride 8: the strides of layer3 and layer4 become 3×3 dilations 2 and 4 (each
#   stage's first block keeps the previous rate), with the same weights.
# * The dense map contains the sparse one exactly (every 4th position); the rest are new
#   responses, paid for in compute and memory.
# Next: lesson 05 — what to put on top of the 1/8 features (network track).
