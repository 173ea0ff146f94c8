"""The configuration schema of every MM-FM run: each key a run reads, its default, presets.

The experiment files in `configs/` (big_vision style: configs are code) call
`get_base_config` and choose the source and conditioning; the library (bench, tests) builds
run configs from the same schema, so it never imports `configs/`.

`get_base_config(source, mode_conditional, preset)` returns the full ConfigDict; the three
experiment files only choose the source and the conditioning. Every number a run depends
on lives here and is written to `<workdir>/config.json`, the sharding too: `mesh.rules`
holds the logical-axis rules (MaxText's `logical_axis_rules`; default
`parallel.LOGICAL_AXIS_RULES`), overridable like any key, e.g.
`--config.mesh.rules="(('batch', ('data', 'fsdp')), ('embed', None), ...)"`.
"""

import ml_collections

from mmfm_jax import parallel
from mmfm_jax.models.ditdh import MODEL_SIZES

PRESETS = ("demo", "imagenet256_xl", "imagenet256_s")


def _model(size: str, input_size: int, in_channels: int, num_classes: int):
    m = ml_collections.ConfigDict()
    m.size = size
    m.hidden_size = MODEL_SIZES[size]["hidden_size"] if size in MODEL_SIZES else (64, 96)
    m.depth = MODEL_SIZES[size]["depth"] if size in MODEL_SIZES else (2, 1)
    m.num_heads = MODEL_SIZES[size]["num_heads"] if size in MODEL_SIZES else (2, 2)
    m.input_size = input_size
    m.in_channels = in_channels
    m.mlp_ratio = 4.0
    m.num_classes = num_classes  # modes for mode-conditional models; null label = num_classes
    m.class_dropout_prob = 0.1  # > 0 adds the null row to the label table
    m.compute_dtype = "bfloat16"  # parameters stay float32
    # True/"full", False/"none" or a jax.checkpoint_policies name ("dots_saveable", ...):
    m.remat = ml_collections.FieldReference(False, field_type=object)
    m.scan_blocks = False  # each stream's blocks as one stacked module under lax.scan
    m.attention_impl = "xla"  # jax.nn.dot_product_attention implementation ("cudnn" on GPU)
    return m


def get_base_config(source: str, mode_conditional: bool, preset: str | None):
    preset = preset or "demo"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.seed = 0
    c.source = source  # "gmm" (MM-FM) or "gaussian" (baseline)
    c.mode_conditional = mode_conditional  # mode index through the label table

    # persistent XLA compilation cache ("{workdir}": the run's workdir; "" disables it)
    c.compile_cache = "{workdir}/compile_cache"
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))  # -1: all remaining devices
    c.mesh.rules = parallel.LOGICAL_AXIS_RULES  # (logical axis, mesh axes or None) pairs

    c.data = _data()  # grain pipeline
    c.rae = _rae()  # stage 1: the frozen RAE
    c.gmm = _gmm()  # the mixture source
    c.model = _model("XL", input_size=16, in_channels=768, num_classes=8192)
    c.train = _train()
    c.sample = _sample()
    c.eval = _eval()
    c.sweep = _sweep()  # --stage=sweep

    if preset == "demo":
        _demo(c)
    elif preset == "imagenet256_s":
        c.model = _model("S", input_size=16, in_channels=768, num_classes=8192)
        c.train.num_steps = 25_000
    _fit_conditioning(c)
    return c


def _data() -> ml_collections.ConfigDict:
    """The data pipeline (grain)."""
    g = ml_collections.ConfigDict()
    g.kind = "imagefolder"  # digits | imagefolder | arrayrecord | latent_cache
    g.path = ""  # ImageNet train split (ImageFolder root or packed file pattern)
    g.image_size = 256
    g.num_workers = 8
    g.prefetch = 2
    g.random_flip = True
    g.latent_cache = ""  # optional precomputed latents + CLS tokens of both flips
    g.read_threads = 16  # grain read threads per process
    g.read_buffer = 256  # records read ahead per process
    g.digits_holdout = 0.2  # demo: held-out fraction of the digits (Frechet reference)
    g.limit_fraction = 1.0  # < 1: class-balanced subset (MM-FM's 10%-data study), also
    g.limit_seed = 42  # used by --stage=fit_gmm, so the GMM is fit on the same subset
    return g


def _rae() -> ml_collections.ConfigDict:
    """Stage 1: the frozen RAE."""
    g = ml_collections.ConfigDict()
    g.kind = "dinov2"  # dinov2 (converted RAE directory) | identity (demo, pixel space)
    g.path = ""  # directory written by `python -m convert rae`
    g.compute_dtype = "float32"  # as upstream encodes training batches (README: precision)
    return g


def _gmm() -> ml_collections.ConfigDict:
    """The GMM source: EM fit and mode assignment."""
    g = ml_collections.ConfigDict()
    g.path = ""  # existing mixtures (`python -m convert gmm` output); empty: <workdir>/gmm
    g.num_components = 8192
    g.max_iter = 100
    g.tol = 1e-3
    g.reg_covar = 1e-6
    g.init = "k-means++"
    g.seed = 42
    g.assignment = "soft"  # soft (sample the posterior) | hard (argmax)
    g.chunk_size = 65536  # rows per streamed EM chunk
    g.screen = True  # bf16-screened E-step with a certificate (exact to float32 rounding)
    g.encode_batch_size = 256
    g.flip = True  # spatial pass also uses the horizontally flipped latent
    return g


def _train() -> ml_collections.ConfigDict:
    """Optimizer, schedule, time distribution, logging and checkpoints."""
    g = ml_collections.ConfigDict()
    g.batch_size = 1024  # global
    g.num_steps = 100_000
    g.lr = 2e-4
    g.lr_end = 2e-5
    g.lr_decay_start = 50_040  # 40 epochs at 1251 steps/epoch: flat, then linear
    g.lr_decay_end = 1_000_800  # 800 epochs
    g.b1 = 0.9
    g.b2 = 0.95
    g.eps = 1e-8
    g.weight_decay = 0.0
    g.grad_clip = 1.0
    g.ema_decay = 0.9995
    g.time_dist = "logit-normal"  # logit-normal | uniform
    g.time_mu = 0.0
    g.time_sigma = 1.0
    g.time_shift = -1.0  # -1: sqrt(H*W*C/4096)
    g.label_dropout = 0.1
    g.grad_accum = 1  # -1: the fewest micro-batches that fit (memory_plan.py)
    g.memory_model = ""  # grad_accum=-1: the JSON `bench plan --fit` writes
    g.device_memory_gib = -1.0  # grad_accum=-1: per device; -1: the device's limit
    g.log_every = 100
    g.ckpt_every = 5000
    g.ckpt_keep = 3  # most recent checkpoints kept
    g.ckpt_keep_period = 25_000  # and every M-th step forever
    g.sample_every = 5000  # PNG grid from the EMA model
    # FID-N of the EMA model every fid_every steps (0: off), through the eval job's code path
    # (needs eval.inception_path and eval.ref_path); logged as fid / fid_samples
    g.fid_every = 0
    g.fid_samples = 5000
    g.peak_tflops = -1.0  # per device for MFU; -1: look up the device kind
    return g


def _sample() -> ml_collections.ConfigDict:
    """The sampling stage (Euler ODE, guidance, precision)."""
    g = ml_collections.ConfigDict()
    g.num_samples = 50_000
    g.batch_size = 256  # global
    g.num_steps = 50  # grid points (num_steps - 1 Euler evaluations)
    g.guidance = "none"  # none | autoguidance | cfg
    g.guidance_scale = 1.5
    g.guidance_interval = (0.0, 1.0)
    g.guide_path = ""  # converted DiTDH-S guide directory (autoguidance)
    g.model_path = ""  # converted model directory; empty: EMA of the latest checkpoint
    g.compute_dtype = "float32"
    g.state_dtype = "float32"  # "bfloat16": MM-FM's --precision bf16 ODE state
    g.seed = 0
    g.png_grid = True
    return g


def _eval() -> ml_collections.ConfigDict:
    """The evaluation job (FID Inception, reference batch)."""
    g = ml_collections.ConfigDict()
    g.inception_path = ""  # `python -m convert inception` output
    g.ref_path = ""  # ADM reference batch (VIRTUAL_imagenet256_labeled.npz)
    g.batch_size = 200
    return g


def _sweep() -> ml_collections.ConfigDict:
    """The guidance sweep (--stage=sweep)."""
    g = ml_collections.ConfigDict()
    g.scales = "1.0,1.25,1.5,1.75"  # values of sample.guidance_scale, comma-separated
    g.intervals = ""  # "lo:hi,lo:hi" values of sample.guidance_interval; empty: as set
    g.num_samples = 10_000  # FID-N per point
    return g


def _demo(c):
    """Embedded demo: 8x8 digits in pixel space, identity encoder, tiny DiTDH, CPU minutes."""
    c.data.kind = "digits"
    c.data.image_size = 8
    c.data.num_workers = 0
    c.data.random_flip = False  # a mirrored digit is not a digit
    c.rae.kind = "identity"
    c.rae.compute_dtype = "float32"
    c.gmm.num_components = 10
    c.gmm.chunk_size = 4096
    c.model = _model("demo", input_size=8, in_channels=1, num_classes=10)
    c.model.hidden_size = (64, 64)
    c.model.depth = (2, 1)
    c.model.num_heads = (2, 2)
    c.model.compute_dtype = "float32"
    c.train.batch_size = 64
    c.train.num_steps = 1000
    c.train.lr = 1e-3
    c.train.lr_end = 1e-4
    c.train.lr_decay_start = 600
    c.train.lr_decay_end = 1000
    c.train.ema_decay = 0.995
    c.train.time_shift = 1.0
    c.train.log_every = 100
    c.train.ckpt_every = 500
    c.train.ckpt_keep_period = 0
    c.train.sample_every = 0
    c.sample.num_samples = 512
    c.sample.batch_size = 512
    c.sample.compute_dtype = "float32"
    c.sweep.num_samples = 512


def _fit_conditioning(c):
    if not c.mode_conditional:
        c.train.label_dropout = 0.0
    if c.source == "gaussian":
        c.mode_conditional = False
        c.train.label_dropout = 0.0
