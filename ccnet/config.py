"""Structured-config schemas, registered in Hydra's ConfigStore.

`conf/config.yaml` extends `config_schema`, so an unknown key (`schedule.lrr=0.1`) or a wrong type fails at
composition with a message that names it, before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from ccnet.runtime import launch_time, mpi_rank
from ccnet.sweep import job_dirname


@dataclass
class BackboneConfig:
    name: str = "resnet_tiny"
    pretrained: Optional[str] = None  # path to ImageNet weights (.pth, .pth.tar or our .pkl)
    strict: bool = True  # a missing or mis-shaped backbone tensor is an error
    drop_path: float = 0.0  # stochastic depth (VAN)
    neck: str = "sum"  # VAN only: stages 2-4 to stride 8, fused by sum | concat; none = stage 4 at stride 32
    head_channels: int = 64  # width of the RCCA and DSN heads used with this backbone (512 for ResNet-101)


@dataclass
class ModelConfig:
    recurrence: int = 2  # CCA loops; 0 = no attention
    cca_impl: str = "auto"  # auto | fused | ops
    act: str = "relu"  # relu (mmseg) | leaky_relu (the authors' InPlaceABN)
    dropout: float = 0.1
    aux_weight: float = 0.4
    loss: str = "ce"  # ce | ohem
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100000


@dataclass
class DatasetConfig:
    name: str = "embedded"
    root: str = "${oc.env:CCNET_DATA,'~/.cache/ccnet/data'}"
    num_classes: int = 7
    ignore_index: int = 255
    train_split: str = "train"
    val_split: str = "val"
    mean: List[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    std: List[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    bgr: bool = False  # feed BGR (the MIT ResNet weights' order)
    reduce_zero_label: bool = False  # ADE20K: 0 -> ignore, c -> c - 1
    num_workers: int = 2  # background threads decoding and augmenting
    verify: bool = False  # scan the whole split up front and list every problem


@dataclass
class ScheduleConfig:
    iters: int = 3000
    batch_size: int = 8  # global batch (split over MPI ranks)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    crop_size: List[int] = field(default_factory=lambda: [128, 128])
    scale_range: List[float] = field(default_factory=lambda: [0.75, 1.5])
    scale_step: float = 0.0  # 0: continuous scales; 0.1: the authors' grid
    mirror: bool = True
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3  # newest iter_*.pkl kept (plus last.pkl and best.pkl); 0 keeps all
    max_bad_steps: int = 3  # consecutive non-finite losses (steps skipped) before the run stops
    eval_every: int = 0  # 0: evaluate once, at the end
    log_every: int = 20
    amp: bool = False  # mixed precision (float16 forward, loss scaling) on the GPU; an error on the CPU


@dataclass
class EvalConfig:
    mode: str = "whole"  # whole | slide
    crop_size: List[int] = field(default_factory=lambda: [769, 769])
    stride: List[int] = field(default_factory=lambda: [513, 513])
    scales: List[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    num_vis: int = 4  # colourised predictions saved per evaluation
    max_images: int = 0  # 0: the whole split
    save_submission: bool = False  # job=eval on Cityscapes: label-id PNGs under run_dir/submission/


@dataclass
class Config:
    job: str = "train"  # train | eval | sweep | visualize | predict
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    verbose: bool = False  # show Jittor's compile logs
    checkpoint: Optional[str] = None  # job=eval|visualize|predict: a checkpoint file or a run directory
    sweep_dir: Optional[str] = None  # job=sweep: the multirun folder to summarise
    image: Optional[str] = None  # job=visualize: the picture (default: the first val image)
    point: Optional[List[int]] = None  # job=visualize: [y, x] in image pixels (default: on an object)
    input: Optional[str] = None  # job=predict: an image file or a folder of images
    resume: Any = None  # true: this run directory's last checkpoint (hydra.run.dir=RUN); or a file / run dir
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    expected: Any = None  # experiment presets: the result they should reproduce (mIoU %, source)


def run_stamp() -> str:
    """`<date>/<time>` of the launch; the same for every MPI rank on one machine (one run folder)."""
    import time

    return time.strftime("%Y-%m-%d/%H-%M-%S", time.localtime(launch_time()))


def hydra_output_subdir():
    """Hydra's `.hydra/` folder for rank 0 only, so MPI ranks do not write the same files at once."""
    return ".hydra" if mpi_rank() == 0 else None


def register_configs() -> None:
    OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("hydra_output_subdir", hydra_output_subdir, replace=True)
    OmegaConf.register_new_resolver("job_dirname", job_dirname, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="backbone", name="backbone_schema", node=BackboneConfig)
    cs.store(group="dataset", name="dataset_schema", node=DatasetConfig)
    cs.store(group="schedule", name="schedule_schema", node=ScheduleConfig)
