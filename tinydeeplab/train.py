"""Training DeepLab v2: SGD with momentum, the poly (or step) learning rate, the head at 10×,
gradient accumulation, loss at the logits' resolution, JSON-lines log, atomic checkpoints,
resume.

DeepLab v2 §4: the loss is the sum of pixel-wise cross-entropies over the 1/8-resolution
output, against the ground truth *downsampled* (nearest neighbour, so labels stay labels and
void stays void) — the logits are not upsampled in training.  The learning rate follows
``base · (1 − iter / max_iter)^0.9``; the new classifier layers learn 10× faster than the
backbone (their biases 20×, without weight decay).
"""
import dataclasses
import json
import os
import time

import numpy as np

from . import functional as F
from . import models
from ._threads import SPINNING_BLAS_NOTE, LoadAdapter, blas_workers_spin
from .autograd import Tensor
from .backend import array_module, to_device
from .data import Loader, VOCSegmentation, require_valid, train_transform
from .optim import SGD


@dataclasses.dataclass
class TrainConfig:
    data_root: str
    out_dir: str
    split: str = "train"
    subset: int = None
    backbone: str = "tiny"
    output_stride: int = 8
    head: str = "aspp"
    aspp_rates: tuple = (6, 12, 18, 24)  # ASPP's branches (head "aspp")
    largefov_rate: int = 12  # LargeFOV's 3×3 (head "largefov")
    largefov_width: int = None  # LargeFOV's hidden channels (None: the default)
    crop: int = 161
    scale: tuple = (0.5, 1.5)
    batch_size: int = 4
    iter_size: int = 1  # gradient accumulation: batches per update
    iterations: int = 1000
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_policy: str = "poly"  # or "step"
    power: float = 0.9
    step_size: int = 2000
    gamma: float = 0.1
    head_lr_mult: float = 10.0
    freeze_bn: bool = False
    seed: int = 0
    workers: int = 2
    checkpoint_every: int = 100
    device: str = "cpu"
    resume: bool = False  # continue from out_dir/checkpoint.npz (else refuse to overwrite it)
    init: str = None  # start from this checkpoint's weights (fine-tuning), e.g. a finished run
    pretrained: str = None  # backbone weights: a torchvision ResNet .pth/.npz, or a .caffemodel
    style: str = None  # the ResNet's layout, "torchvision" or "caffe" (None: from the weights)
    crf_layer: int = 0  # > 0: end the network with a trainable CRF of this many iterations
    crf_lr_mult: float = 1.0  # the CRF layer's compatibility weights (no weight decay)
    crf_unary_loss: bool = False  # with crf_layer: also the loss of the logits before the CRF
    crf_compat: str = "potts"  # or "matrix": a learned C×C compatibility per kernel
    crf_scale: bool = False  # with crf_layer: learn a scale (temperature) of its output
    crf_test_iterations: int = None  # the CRF layer's iterations at test time (None: crf_layer)
    msc: tuple = ()  # extra input scales for MSC training (DeepLab v2 §3.2: (0.75, 0.5))


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: the weights of the last whole iteration were saved."""


class TrainingDiverged(ValueError):
    """The loss or a gradient became NaN or infinite: the run stopped before the step."""


def _truncate_log(path, iteration):
    """Keep the log's records of iterations 1..``iteration`` (those the checkpoint holds): a
    resumed run redoes the later ones, and a run killed mid-write leaves a torn last line.
    Rewritten atomically."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a torn line: the run was killed while writing it
            continue
        if record.get("iteration", 0) <= iteration:
            kept.append(line)
    if kept == lines:
        return
    with models.atomic_write(path, "w") as f:
        f.write("".join(line + "\n" for line in kept))


def _finite(a):
    return bool(array_module(a).isfinite(a).all())


def _check_finite(total, model, it, cfg, ckpt, weights=False):
    """Stop before a non-finite loss or gradient reaches the weights, or (``weights``: after
    the step, before a save) non-finite weights or statistics reach the checkpoint."""
    bad = None
    if not np.isfinite(total):
        bad = f"the loss is {total}"
    elif not weights:
        bad = next((f"the gradient of {name} is not finite" for name, p in
                    model.named_parameters() if p.grad is not None and not _finite(p.grad)),
                   None)
    else:  # in place (state_dict would copy every array off the device)
        arrays = [(n, p.data) for n, p in model.named_parameters()] + list(model.named_buffers())
        bad = next((f"{name} is not finite after the step" for name, v in arrays
                    if v.dtype.kind == "f" and not _finite(v)), None)
    if bad is None:
        return
    kept = (f"the last checkpoint, {ckpt}, is kept as it was" if os.path.exists(ckpt)
            else "no checkpoint had been written yet")
    raise TrainingDiverged(
        f"training diverged at iteration {it + 1}: {bad}; {kept}.  Try a lower --lr (now "
        f"{cfg.lr:g}), start from pre-trained weights (--init) if batch norm is frozen, or "
        f"check that the masks hold class ids and 255 only")


def learning_rate(cfg, iteration):
    """The base learning rate at ``iteration`` (0-based) under cfg.lr_policy."""
    if cfg.lr_policy == "poly":
        return cfg.lr * (1 - iteration / cfg.iterations) ** cfg.power
    if cfg.lr_policy == "step":
        return cfg.lr * cfg.gamma ** (iteration // cfg.step_size)
    raise ValueError(f"lr_policy must be 'poly' or 'step', got {cfg.lr_policy!r}")


def param_groups(model, cfg):
    """Backbone at 1×; head weights at head_lr_mult×, head biases at 2·head_lr_mult× with no
    weight decay (DeepLab's Caffe solver settings)."""
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    head_w = [p for n, p in model.head.named_parameters() if n.endswith("weight")]
    head_b = [p for n, p in model.head.named_parameters() if n.endswith("bias")]
    groups = [{"params": backbone},
              {"params": head_w, "lr_mult": cfg.head_lr_mult},
              {"params": head_b, "lr_mult": 2 * cfg.head_lr_mult, "weight_decay": 0.0}]
    if model.crf is not None:
        groups.append({"params": model.crf.parameters(), "lr_mult": cfg.crf_lr_mult,
                       "weight_decay": 0.0})
    return groups


def downsample_labels(labels, size):
    """Nearest-neighbour resize of (B, H, W) labels to size (h, w), sampling pixel centres."""
    B, H, W = labels.shape
    h, w = size
    xp = array_module(labels)  # labels on the GPU are resized there
    rows = xp.minimum(((xp.arange(h) + 0.5) * H / h).astype(int), H - 1)
    cols = xp.minimum(((xp.arange(w) + 0.5) * W / w).astype(int), W - 1)
    return labels[:, rows[:, None], cols[None, :]]


def segmentation_loss(logits, labels):
    """Cross-entropy at the logits' resolution, void (255) ignored.  A list of logits (the
    scales of ``models.MSC``, or a CRF model's unary and refined logits) gets the sum of their
    losses, each at its own resolution."""
    if isinstance(logits, (list, tuple)):
        total = segmentation_loss(logits[0], labels)
        for more in logits[1:]:
            total = total + segmentation_loss(more, labels)
        return total
    target = downsample_labels(labels, logits.shape[2:])
    return F.cross_entropy(logits, to_device(target, logits.device))


def _velocity_state(opt, model):
    """The momentum buffers by parameter name, so that a resumed run continues exactly."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {f"velocity/{names[k]}": to_device(v, "cpu") for k, v in opt.velocity.items()
            if k in names}


def _restore_velocity(opt, model, extra):
    params = dict(model.named_parameters())
    for key, value in extra.items():
        if key.startswith("velocity/") and key[9:] in params:
            p = params[key[9:]]
            opt.velocity[id(p)] = to_device(value, p.device)


class RunFolderLock:
    """An advisory lock on a run folder for the life of one training run: a second run into
    the same folder is refused instead of interleaving its log and replacing the first's
    checkpoint.  ``flock`` locks belong to the open file, so the kernel releases them when
    the process ends however it ends: a killed run leaves no stale lock behind."""

    def __init__(self, folder):
        self.path = os.path.join(folder, ".lock")
        self.fd = None

    def __enter__(self):
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FileExistsError(
                f"another training run (process {holder}) is writing into "
                f"{os.path.dirname(self.path)!r}; wait for it, stop it, or choose another "
                "--out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # releases the lock
        self.fd = None


# the settings that change what a run computes: a resumed run must keep them
RESUME_KEYS = ("data_root", "split", "subset", "backbone", "output_stride", "head",
               "aspp_rates", "largefov_rate", "largefov_width", "crop", "scale", "batch_size", "iter_size",
               "lr", "momentum", "weight_decay", "lr_policy", "power",
               "step_size", "gamma", "head_lr_mult", "freeze_bn", "seed", "crf_layer",
               "crf_lr_mult", "crf_unary_loss", "crf_compat", "crf_scale",
               "crf_test_iterations", "msc")


def run_settings(cfg):
    """What a checkpoint stores of its run's configuration (JSON), to compare on resume."""
    values = {k: getattr(cfg, k) for k in RESUME_KEYS + ("iterations",)}
    values["data_root"] = os.path.abspath(cfg.data_root)
    values["aspp_rates"], values["scale"] = list(cfg.aspp_rates), \
        (list(cfg.scale) if cfg.scale else None)
    values["msc"] = [float(s) for s in cfg.msc or ()]
    return json.dumps(values)


def _check_resume(cfg, ckpt, log):
    """Refuse to resume with settings other than the checkpoint's run: the result would be
    neither run.  Lists every difference."""
    with np.load(ckpt) as f:
        stored = json.loads(str(f["extra/run"])) if "extra/run" in f.files else None
    if stored is None:
        log(f"{ckpt} does not record its run's settings; resuming with the ones given")
        return
    given = json.loads(run_settings(cfg))
    diffs = [f"--{k.replace('_', '-')}: {stored.get(k)!r} in the checkpoint, {given[k]!r} now"
             for k in RESUME_KEYS if k in stored and stored[k] != given[k]]
    if stored.get("iterations") not in (None, cfg.iterations):  # extending a run is allowed
        log(f"resuming a run of {stored['iterations']} iterations for {cfg.iterations}: the "
            "learning-rate schedule follows the new length from here on")
    if diffs:
        raise ValueError(f"--resume with settings other than the run in {cfg.out_dir!r}:\n  "
                         + "\n  ".join(diffs) + "\ngive the run's own settings, or train into "
                         "another --out")


def train(cfg, log=print, progress=True):
    """Train; returns the history (a list of dicts).  Writes to cfg.out_dir: ``checkpoint.npz``
    (atomically, every cfg.checkpoint_every iterations and at the end) and ``log.jsonl``.
    One run at a time per folder (``RunFolderLock``)."""
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise NotADirectoryError(f"--out {cfg.out_dir!r} exists and is not a folder")
    if cfg.device == "cuda":
        from .backend import cuda_usable

        if not cuda_usable():
            raise RuntimeError("--device cuda: no CUDA GPU is usable here (CuPy and an NVIDIA "
                               "GPU are needed: pip install 'tinydeeplab[cuda]')")
    created = not os.path.exists(cfg.out_dir)
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(f"--out {cfg.out_dir!r}: a file is in the way") from None
    if not os.access(cfg.out_dir, os.W_OK):
        raise PermissionError(f"output folder {cfg.out_dir!r} is not writable")
    try:
        with RunFolderLock(cfg.out_dir):
            return _train(cfg, log, progress)
    except BaseException:
        if created:  # a run that stopped before writing anything leaves no folder behind
            leftovers = set(os.listdir(cfg.out_dir)) - {".lock"}
            if not leftovers:
                os.remove(os.path.join(cfg.out_dir, ".lock"))
                os.rmdir(cfg.out_dir)
        raise


def _train(cfg, log, progress):
    for name in models.remove_stale_temporaries(cfg.out_dir):
        log(f"removed {name}: a checkpoint save that was killed before it finished")
    t0 = time.perf_counter()
    if cfg.device == "cpu" and blas_workers_spin():
        log(f"note: {SPINNING_BLAS_NOTE}")
    report = require_valid(cfg.data_root, cfg.split, cfg.subset, cfg.workers)
    log(f"checked {report['images']} images and masks of {cfg.split!r} in "
        f"{time.perf_counter() - t0:.1f} s")
    dataset = VOCSegmentation(cfg.data_root, cfg.split, cfg.subset)
    ckpt = os.path.join(cfg.out_dir, "checkpoint.npz")
    if cfg.resume and not os.path.exists(ckpt):
        raise FileNotFoundError(f"nothing to resume: {ckpt} does not exist (leave out --resume "
                                "to start a run there)")
    if cfg.resume:
        _check_resume(cfg, ckpt, log)
    _check_start(cfg, resuming=os.path.exists(ckpt))
    pretrained, style = None, cfg.style
    if cfg.pretrained and not os.path.exists(ckpt):
        pretrained, style = models.read_pretrained(cfg.pretrained, cfg.backbone)
        if cfg.style is not None and cfg.style != style:
            raise ValueError(f"--pretrained {cfg.pretrained!r} holds a {style}-style ResNet, "
                             f"not {cfg.style}")
    source = ckpt if os.path.exists(ckpt) else cfg.init
    if source:  # a resumed or fine-tuned run keeps the layout of the weights it continues
        style = (models.checkpoint_config(source) or {}).get("style", "torchvision")
    cfg = dataclasses.replace(cfg, style=style or "torchvision")
    model = models.deeplab_v2(dataset.num_classes, cfg.backbone, cfg.output_stride,
                              aspp_rates=tuple(cfg.aspp_rates), head=cfg.head, seed=cfg.seed,
                              crf_layer=_crf_config(cfg), largefov_rate=cfg.largefov_rate,
                              largefov_width=cfg.largefov_width,
                              style=cfg.style)
    if os.path.exists(ckpt) and not cfg.resume:
        raise FileExistsError(f"{ckpt} exists: resume it (--resume) or choose another output "
                              "folder")
    if not os.path.exists(ckpt):  # a resumed run has its own weights already
        if cfg.init:
            _initialise(model, cfg.init, log)
        elif pretrained is not None:
            models.load_torchvision_resnet(model.backbone, pretrained)
            log(f"backbone initialised from {cfg.pretrained} ({cfg.style} layout)")
    model.unary_loss = bool(cfg.crf_unary_loss)
    if cfg.freeze_bn:
        model.backbone.freeze_batch_norm()
    opt = SGD(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum,
              weight_decay=cfg.weight_decay)
    start = 0
    if os.path.exists(ckpt):
        extra = models.load_checkpoint(model, ckpt)
        _restore_velocity(opt, model, extra)
        start = int(extra["iteration"])
        log(f"resumed from {ckpt} at iteration {start}")
    _truncate_log(os.path.join(cfg.out_dir, "log.jsonl"), start)
    model.to(cfg.device).train()
    # MSC (DeepLab v2 §3.2): the network also sees the batch at smaller scales; each scale's
    # logits and their max fusion get a loss.  The checkpoint holds the network itself.
    network = models.MSC(model, cfg.msc).train() if cfg.msc else model

    def transform(image, label, rng):
        return train_transform(image, label, rng, cfg.crop, cfg.scale)

    loader = Loader(dataset, cfg.batch_size, transform, cfg.seed, workers=cfg.workers)
    batches = _batches(loader, start * cfg.iter_size)
    history = []
    bar = _progress(cfg.iterations, start, progress)
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    def save(done):
        models.save_checkpoint(model, ckpt, iteration=done, config=model_config(cfg, dataset),
                               run=run_settings(cfg), **_velocity_state(opt, model))

    done = start  # iterations whose update is complete
    threads = LoadAdapter()  # fewer worker threads while other processes hold cores
    try:
        with open(log_path, "a") as log_file:
            for it in range(start, cfg.iterations):
                threads.update()
                t0 = time.perf_counter()
                opt.lr = learning_rate(cfg, it)
                opt.zero_grad()
                total = 0.0
                for _ in range(cfg.iter_size):
                    x, y = next(batches)  # each copied to the device once per step
                    x, y = to_device(x, cfg.device), to_device(y, cfg.device)
                    loss = segmentation_loss(network(Tensor(x)), y)
                    (loss * (1.0 / cfg.iter_size)).backward()
                    total += loss.item() / cfg.iter_size
                _check_finite(total, model, it, cfg, ckpt)
                with _whole():  # a Ctrl-C here waits for the update to finish
                    opt.step()
                done = it + 1
                seconds = time.perf_counter() - t0
                record = {"iteration": it + 1, "loss": total, "lr": opt.lr,
                          "images_per_s": cfg.batch_size * cfg.iter_size / seconds}
                history.append(record)
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{total:.3f}", lr=f"{opt.lr:.2e}",
                                    img_s=f"{record['images_per_s']:.1f}")
                    bar.update(1)
                if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
                    _check_finite(total, model, it, cfg, ckpt, weights=True)
                    save(it + 1)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        saved = ""
        if done > start and done % cfg.checkpoint_every != 0:
            save(done)  # the weights are those after iteration ``done``, whole
            saved = f"saved {ckpt} at iteration {done}; "
        raise TrainingInterrupted(
            f"interrupted at iteration {done}: {saved}continue with the same command and "
            "--resume") from None
    finally:
        threads.close()
    if bar is not None:
        bar.close()
    return model, history


class _whole:
    """Defer Ctrl-C (SIGINT) until the block ends, so that an update is never half applied.
    Only in the main thread, where Python delivers signals."""

    def __enter__(self):
        import signal
        import threading

        self.caught, self.previous = False, None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._note)
        return self

    def _note(self, signum, frame):
        self.caught = True

    def __exit__(self, *exc):
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        if self.caught and exc[0] is None:
            raise KeyboardInterrupt


def _crf_config(cfg):
    if int(cfg.crf_layer) != cfg.crf_layer or cfg.crf_layer < 0:
        raise ValueError(f"crf_layer must be a non-negative number of iterations, got "
                         f"{cfg.crf_layer!r}")
    if not cfg.crf_layer:
        return None
    test = cfg.crf_layer if cfg.crf_test_iterations is None else cfg.crf_test_iterations
    return {"iterations": int(cfg.crf_layer), "test_iterations": int(test),
            "compat": cfg.crf_compat, "learn_scale": bool(cfg.crf_scale)}


def _check_start(cfg, resuming):
    """Refuse a run that cannot train: frozen batch norm needs statistics someone estimated.

    With ``freeze_bn`` every batch norm normalises with its stored mean and variance.  In a
    backbone that was never trained those are the defaults (0 and 1), so no layer is
    normalised at all; through ResNet-101's 33 residual blocks the activations grow by
    orders of magnitude (a loss near 1e7 at the first iteration, NaN at the second).  DeepLab
    freezes batch norm only because it starts from ImageNet statistics.  Letting batch norm
    train instead would run, but on the small batches DeepLab uses its statistics are noisy
    and it is not what the user asked for; so the run is refused and the message says what to
    give."""
    if cfg.init and cfg.pretrained:
        raise ValueError("give either --init (a whole network from a checkpoint) or "
                         "--pretrained (backbone weights), not both")
    scales = tuple(cfg.msc or ())
    if not all(isinstance(s, (int, float)) and 0 < s < 1 for s in scales):
        raise ValueError(f"msc must be input scales between 0 and 1 (besides scale 1), e.g. "
                         f"(0.75, 0.5); got {cfg.msc!r}")
    if scales and cfg.crf_layer:
        raise ValueError("--msc with --crf-layer is not supported: the CRF layer refines one "
                         "scale's logits against that scale's image; train one or the other")
    if cfg.freeze_bn and not (cfg.init or cfg.pretrained or resuming):
        raise ValueError(
            "--freeze-bn needs a backbone with trained batch-norm statistics: give "
            "--pretrained WEIGHTS (a torchvision ResNet .pth or .npz, or DeepLab's "
            ".caffemodel) or --init CHECKPOINT.  Frozen, never-estimated statistics leave the "
            "network unnormalised and training diverges at once; to train from scratch, "
            "leave out --freeze-bn")


def _initialise(model, path, log):
    """Weights from another run's checkpoint; a CRF layer it lacks keeps its initial
    weights.  Any other difference is an error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"initial checkpoint {path!r} does not exist")
    own = set(model.state_dict())
    try:
        with np.load(path) as f:
            theirs = {k[6:] for k in f.files if k.startswith("model/")}
    except Exception as e:
        raise ValueError(f"initial checkpoint {path!r} is not a readable .npz file "
                         f"({type(e).__name__}: {e})") from None
    missing = sorted(k for k in own - theirs if not k.startswith("crf."))
    if missing or theirs - own:
        raise ValueError(f"initial checkpoint {path!r} does not fit this model: missing "
                         f"{missing[:5]}, unexpected {sorted(theirs - own)[:5]}")
    models.load_checkpoint(model, path, strict=False)
    log(f"initialised from {path}")


def model_config(cfg, dataset):
    """What rebuilds the network from a checkpoint (stored in it as JSON)."""
    return json.dumps({"num_classes": dataset.num_classes, "backbone": cfg.backbone,
                       "output_stride": cfg.output_stride, "head": cfg.head,
                       "aspp_rates": list(cfg.aspp_rates), "largefov_rate": cfg.largefov_rate,
                       "largefov_width": cfg.largefov_width,
                       "crf_layer": _crf_config(cfg), "class_names": dataset.class_names,
                       "style": cfg.style or "torchvision"})


def load_model(path, device="cpu"):
    """The network saved in a training checkpoint, ready for inference; returns
    (model, config dict)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    config = models.checkpoint_config(path)
    if config is None:
        raise ValueError(f"{path!r} is not a tinydeeplab training checkpoint (no config)")
    if config.get("num_classes") is None:
        raise ValueError(f"{path!r} holds a backbone without a classifier (converted from "
                         f"{config.get('source', 'a Caffe model')}); train from it with "
                         "--pretrained")
    model = models.deeplab_v2(config["num_classes"], config["backbone"],
                              config["output_stride"], head=config["head"],
                              aspp_rates=tuple(config.get("aspp_rates", (6, 12, 18, 24))),
                              largefov_rate=config.get("largefov_rate", 12),
                              largefov_width=config.get("largefov_width"),
                              crf_layer=config.get("crf_layer"),
                              style=config.get("style", "torchvision"))
    models.load_checkpoint(model, path)
    return model.to(device).eval(), config


def _batches(loader, skip):
    """Endless batches over epochs, starting after the first ``skip`` (to resume exactly:
    the same batches in the same order as an uninterrupted run)."""
    per_epoch = loader.batches_per_epoch()
    epoch, offset = divmod(skip, per_epoch)
    while True:
        yield from loader.epoch(epoch, start_batch=offset)
        epoch, offset = epoch + 1, 0


def _progress(total, start, enabled):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="it")
