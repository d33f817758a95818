"""Structured-config schemas, registered in Hydra's ConfigStore.

`conf/config.yaml` extends `config_schema`, so an unknown key (`schedule.lrr=0.1`) or a wrong type fails at
composition with a message that names it, before any work starts. A value marked `???` here has no default of
its own: the config group that owns the section supplies it (conf/<group>/*.yaml), so the schema never holds a
second, contradicting default.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from ccnet.launch import launch_time, mpi_rank
from ccnet.run_dirs import claim_dir


def config_dir() -> Path:
    """The conf/ folder Hydra composes from: the checkout's top-level conf/ beside ccnet/ (run.py, an editable
    install), or, installed from a wheel or `pip install .`, the copy shipped inside the package as ccnet/conf
    (pyproject.toml maps conf/ to it)."""
    package = Path(__file__).resolve().parent
    shipped = package / "conf"
    return shipped if shipped.is_dir() else package.parent / "conf"


def config_groups() -> list[str]:
    """The groups conf/config.yaml picks one option of (paths, backbone, ..., experiment), in its order."""
    defaults = OmegaConf.load(config_dir() / "config.yaml").defaults
    return [next(iter(entry)) for entry in defaults if not isinstance(entry, str)]


@dataclass
class PathsConfig:  # conf/paths/
    data_root: str = MISSING  # where the data sets live (and the embedded ones are generated)
    outputs: str = MISSING  # run folders: <outputs>/<date>/<time>/
    sweeps: str = MISSING  # sweep folders: <sweeps>/<date>/<time>/<job>/


@dataclass
class BackboneConfig:  # conf/backbone/
    name: str = MISSING  # a registered backbone (ccnet.registry.BACKBONES)
    head_channels: int = MISSING  # width of the RCCA and DSN heads used with this backbone (512 for ResNet-101)
    pretrained: Optional[str] = None  # path to ImageNet weights (.pth, .pth.tar or our .pkl)
    strict: bool = True  # a missing or mis-shaped backbone tensor is an error
    allow_normalization_mismatch: bool = False  # true: train with dataset.mean/std/bgr even where the pretrained
    # file is a published one trained on another input (ccnet.weights.WeightFile); false: that is an error
    # The settings of some backbones only (null = the backbone's own default; a backbone refuses one it lacks):
    drop_path: Optional[float] = None  # VAN: stochastic depth
    neck: Optional[str] = None  # VAN: stages 2-4 to stride 8 fused by sum | concat; none = stage 4 at stride 32
    ln_eps: Optional[float] = None  # VAN: its stages' LayerNorm epsilon (1e-6, the official; the seed's: 1e-5)
    # ResNet (ccnet/models/resnet.py; every name resnet*): depth 18 | 34 | 50 | 101 | 152 picks the block type and
    # counts; blocks ([3, 4, 12, 3]) and block (basic | bottleneck) override them; backbone=resnet takes them all
    depth: Optional[int] = None
    blocks: Optional[List[int]] = None  # blocks per stage (4)
    block: Optional[str] = None  # basic | bottleneck
    stem: Optional[str] = None  # deep (3x3 convs 64-64-128, MIT's / the authors') | deep_v1c (32-32-64, mmseg's) |
    # plain (7x7, 64: torchvision's)
    stem_channels: Optional[List[int]] = None  # the stem's widths (3 for a deep stem, 1 for a plain one)
    widths: Optional[List[int]] = None  # the four stages' base widths (64, 128, 256, 512)
    ceil_mode: Optional[bool] = None  # of the stem's max-pool (the authors': true; mmseg's, torchvision's: false)
    strides: Optional[List[int]] = None  # per stage (1, 2, 1, 1: output stride 8; 1, 2, 2, 2: 32)
    dilations: Optional[List[int]] = None  # per stage (1, 1, 2, 4)
    contract_dilation: Optional[bool] = None  # a dilated stage's first block at half the dilation (mmseg's V1c)


@dataclass
class ModelConfig:
    recurrence: int = MISSING  # CCA loops, conf/recurrence/; 0 = no attention
    head: str = "rcca"  # the decode head (ccnet.registry.HEADS)
    aux_head: str = "dsn"  # the auxiliary head (ccnet.registry.AUX_HEADS)
    head_in: Optional[str] = None  # the backbone feature the decode head reads: stage1-4 | neck (VAN); null: the
    # backbone's own (ResNet: stage4, VAN: neck, or stage4 with backbone.neck=none)
    aux_in: Optional[str] = None  # the same for the auxiliary head; null: stage3
    head_reduction: Optional[int] = None  # the decode head's width = its input's channels // this (the seed's VAN
    # head: 4); null: backbone.head_channels
    act: str = "relu"  # of both heads: relu (mmseg) | leaky_relu (the authors' InPlaceABN) | none (the seed's)
    dropout: float = 0.1
    aux_weight: float = 0.4
    loss: str = "ce"  # ce | ohem (ccnet.registry.LOSSES); settings of loss X are the keys X_*
    ce_average: str = "valid"  # cross-entropy (loss=ce, and the DSN's always) averaged over the valid pixels (ours,
    # PyTorch's) | all: over every pixel of the batch, ignored and padded ones too (mmsegmentation 0.x)
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100000
    aux_channels: Optional[int] = None  # DSN head width; null: backbone.head_channels (mmseg's FCNHead: 256)
    aux_bias: bool = True  # the DSN head's 3x3 conv has a bias (the authors'); mmseg's FCNHead has none
    align_corners: Optional[bool] = None  # of the logits' resizing; null: the model file's family (ours, the authors':
    # true; mmsegmentation's: false)
    cca_softmax: str = "pixel"  # the criss-cross attention's softmax: pixel (over each pixel's H + W scores: the
    # paper, the authors, mmseg) | whole (one over the whole (B, H, W, H + W) tensor: the seed's Jittor nn.Softmax())
    init: Optional[str] = None  # job=train: start from a whole model (ours, an export, mmseg's or the authors' file,
    # a run folder, or zoo: the zoo preset's file); its architecture, backbone and heads, a new classifier if needed


@dataclass
class KernelsConfig:  # conf/kernels/: ours (fused) or Jittor's ops, per op (ccnet/ops/)
    cca: str = MISSING
    conv: str = MISSING
    batch_norm: str = MISSING
    relu: str = MISSING


@dataclass
class DatasetConfig:  # conf/dataset/ and conf/normalization/ (mean, std, bgr)
    name: str = MISSING  # a registered data set (ccnet.registry.DATASETS)
    root: str = MISSING
    num_classes: int = MISSING
    mean: List[float] = MISSING
    std: List[float] = MISSING
    bgr: bool = MISSING  # feed BGR (the MIT ResNet weights' order)
    ignore_index: int = 255
    train_split: str = "train"
    val_split: str = "val"
    reduce_zero_label: bool = False  # ADE20K: 0 -> ignore, c -> c - 1
    num_workers: int = 2  # background threads decoding and augmenting
    verify: bool = False  # scan the whole split up front and list every problem
    classes: Optional[List[str]] = None  # class names replacing the data set's (null: its own; set from a published
    # file's meta without a zoo preset, ccnet/engine/model_files/mmseg.py)
    palette: Optional[List[List[int]]] = None  # their RGB colours (null: the data set's, else the VOC colour map)


@dataclass
class ScheduleConfig:  # conf/schedule/
    iters: int = MISSING
    batch_size: int = MISSING  # global batch (split over MPI ranks)
    lr: float = MISSING
    momentum: float = MISSING
    weight_decay: float = MISSING
    poly_power: float = MISSING
    crop_size: List[int] = MISSING
    scale_range: List[float] = MISSING
    scale_step: float = 0.0  # 0: continuous scales; 0.1: the authors' grid
    mirror: bool = True
    # mmsegmentation 0.x's training pipeline and schedule (conf/schedule/mmseg_*.yaml); the defaults leave ours as it
    # is (ccnet/data/transforms.py):
    resize_bound: Optional[List[int]] = None  # [long, short]: resize keeping the ratio to fit scale x this bound
    # (mmseg's Resize(img_scale, ratio_range=scale_range)); null: scale x the image's own size
    cat_max_ratio: float = 1.0  # < 1: retry a crop (up to 10 times) until no class covers this share of it; 1: off
    photometric: bool = False  # mmseg's PhotoMetricDistortion (brightness, contrast, saturation, hue) on the crop
    min_lr: float = 0.0  # poly schedule's floor: lr = (lr - min_lr) * (1 - it / iters) ** poly_power + min_lr
    checkpoint_every: int = MISSING  # 0: only at the end (and at evaluations)
    keep_checkpoints: int = 3  # newest iter_*.pkl kept (plus last.pkl and best.pkl); 0 keeps all
    max_bad_steps: int = 3  # consecutive non-finite losses (steps skipped) before the run stops
    eval_every: int = 0  # 0: evaluate once, at the end
    log_every: int = MISSING  # 0: only at the end
    amp: bool = False  # mixed precision (float16 forward, loss scaling) on the GPU; an error on the CPU


@dataclass
class EvalConfig:  # conf/eval/
    mode: str = MISSING  # whole | slide
    scales: List[float] = MISSING
    flip: bool = MISSING
    crop_size: Optional[List[int]] = None  # slide: the window (eval/slide_769: the authors' 769 x 769)
    stride: Optional[List[int]] = None  # slide: the step between windows
    num_vis: int = 4  # colourised predictions saved per evaluation
    max_images: int = 0  # 0: the whole split
    save_submission: bool = False  # job=eval on Cityscapes: label-id PNGs under run_dir/submission/
    resize: Optional[List[int]] = None  # [long, short]: mmsegmentation's test resize (keep the ratio, fit the
    # bound; logits back with model.align_corners); null: the image as it is (ccnet/engine/inference.py)
    average: str = "logits"  # scales and flips combined as: logits (the authors, ours) | probs (mmseg: softmax)
    pad_windows: bool = True  # slide: pad a window larger than the image (the authors); false: cut it (mmseg)
    miou_exclude: List[int] = field(default_factory=list)  # classes the reported mIoU leaves out of its mean (the
    # seed's evaluate.py: [0]); [] (the standard): none
    absent_iou: str = "skip"  # a class absent from both labels and predictions of the whole set: skip (left out of
    # the mean: Cityscapes' scripts, mmseg) | zero (counted as IoU 0: the seed's evaluate.py). Either way other than
    # the standard, metrics.json and the log give the standard mIoU beside it (mIoU_standard)


@dataclass
class ZooConfig:  # conf/experiment/zoo/: a published model's file; checkpoint=zoo / model.init=zoo fetch it
    name: Optional[str] = None  # the preset's name: the released file's config name
    family: Optional[str] = None  # mmseg | authors | seed (ccnet/engine/model_files/)
    url: Optional[str] = None  # where the file is published
    sha256: Optional[str] = None  # the first hex digits of the file's SHA-256 (in mmseg's file names); null: the
    # file cannot be fetched directly (the authors' Google Drive links): download it by hand


@dataclass
class DownloadConfig:  # every fetch (zoo files, backbone weights, data set archives): ccnet/download.py
    deadline_s: float = 43200.0  # one file, every attempt together (download.DEADLINE_S)
    min_rate: float = 1024.0  # bytes/s over each minute of a transfer, else the attempt fails (download.MIN_RATE)


@dataclass
class ExploreConfig:  # job=explore: the attention explorer's web page (ccnet/jobs/explore.py)
    host: str = "127.0.0.1"  # the address the page is served on; another than a loopback one needs public=true
    port: int = 7860
    public: bool = False  # true: allow a host other machines can reach (anyone who can reach it sees the page)


@dataclass
class Config:
    job: str = "train"  # a registered job (ccnet.registry.JOBS): train, eval, summarize, visualize, predict, ...
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    verbose: bool = False  # show Jittor's compile logs
    checkpoint: Optional[str] = None  # job=eval|visualize|predict|explore: a checkpoint, an export, a run directory, an
    # mmsegmentation or the authors' CCNet file, or zoo (the zoo preset's published file)
    sweep_dir: Optional[str] = None  # job=summarize: the multirun folder to summarise
    image: Optional[str] = None  # job=visualize: the picture (default: the first val image)
    point: Optional[List[int]] = None  # job=visualize: [y, x] in image pixels (default: on an object)
    input: Optional[str] = None  # job=predict|explore: an image file or a folder of images
    resume: Any = None  # true: this run directory's last checkpoint (hydra.run.dir=RUN); or a file / run dir
    paths: PathsConfig = field(default_factory=PathsConfig)
    overwrite: bool = False  # hydra.run.dir=RUN (or sweep.dir) of an earlier run: delete its files and start anew
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    zoo: ZooConfig = field(default_factory=ZooConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    explore: ExploreConfig = field(default_factory=ExploreConfig)
    expected: Any = None  # experiment presets: the result they should reproduce (mIoU %, source)


def run_stamp() -> str:
    """`<date>/<time>` of the launch; the same for every MPI rank on one machine (one run folder)."""
    import time

    return time.strftime("%Y-%m-%d/%H-%M-%S", time.localtime(launch_time()))


def hydra_output_subdir():
    """Hydra's `.hydra/` folder for rank 0 only, so MPI ranks do not write the same files at once."""
    return ".hydra" if mpi_rank() == 0 else None


UNSAFE = re.compile(r"[^A-Za-z0-9_.+@%-]")


def job_dirname(override_dirname: str, limit: int = 120) -> str:
    """A sweep job's folder name (resolver `job_dirname`, conf/config.yaml) from Hydra's override_dirname, whose
    separators we set to '-' (key-value) and '+' (items): brackets and quotes dropped, any other character
    outside [A-Za-z0-9_.+@%-] (',' of a list, '/', ...) turned into '.', so the folder can be passed back
    unquoted (checkpoint=...; '=' and ',' would need quoting); cut to `limit` characters plus a hash of the whole
    when longer (names stop at 255 bytes). The summary reads each job's overrides from its .hydra/ instead."""
    name = UNSAFE.sub(".", re.sub(r"[\[\]{}()'\"]", "", override_dirname))
    if len(name) > limit:
        name = f"{name[: limit - 9]}@{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def register_configs() -> None:
    OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("claim_dir", claim_dir, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("hydra_output_subdir", hydra_output_subdir, replace=True)
    OmegaConf.register_new_resolver("job_dirname", job_dirname, replace=True)
    ConfigStore.instance().store(name="config_schema", node=Config)
