"""Shared defaults for every config, and the `cpu` / `tiny` variants.

Sections: `data`, `model`, `train`, `optim`, `schedule`, `eval`, `checkpoint`. Schedules are given in epochs
(docs/design.md §4: beta and the free-nats floor step once per epoch at its start); `schedule.continuous=True`
makes them piecewise-linear in fractional epochs instead, which short runs need.

Precision of float32 matmuls and convolutions (`jax.default_matmul_precision`: "default", "high", "highest"):

* `eval.precision = "highest"`: the in-training validation (the best checkpoint is chosen on it) and its image
  grids. Likelihoods, and so AUROCs, must not depend on a backend's default: on TPU a float32 conv runs as one
  bfloat16 pass by default, on recent NVIDIA GPUs XLA may use TF32. `evaluate.py --precision` defaults to
  "highest" too. On CPU every setting computes in float32.
* `train.precision = "default"`: the backend's fast float32 path for the training step and the data-dependent
  init. Training is a stochastic optimisation whose single-sample gradient noise is far above a bfloat16 pass's
  rounding (about 2^-8 relative per product, accumulated in float32); the reference itself trains its convs in
  TF32 on Ampere and newer GPUs (PyTorch's cuDNN default); and on TPU the default runs the matmul units about 3x
  (vs "high") to 6x (vs "highest") faster, which matters over 1000-2000 epochs. Set
  `--config.train.precision=high` if a TPU run skips many updates.

Multi-process run control: `train.sync_every_steps` is the cadence at which the processes agree on the
decisions that lead to collectives (SIGTERM on any host, the time budget and the wall-clock checkpoint timer on
process 0's clock; see hvaeood/run_control.py). A stop or a timed save lands at most that many steps late.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 1

  config.data = ml_collections.ConfigDict()
  config.data.name = "fashion_mnist"
  config.data.preprocessing = "binarize"
  config.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  config.data.shuffle_buffer = 60_000

  config.model = ml_collections.ConfigDict()
  config.model.name = "hvae"
  config.model.kernels = (5, 3, 3)
  config.model.channels = ((64, 64, 64),) * 3
  config.model.strides = ((1, 1, 2), (1, 1, 2), (1, 1, 1))
  config.model.latent_types = ("conv", "dense", "dense")
  config.model.latent_dims = (8, 16, 8)
  config.model.likelihood = "bernoulli"
  config.model.nr_mix = 10
  config.model.inference = "bottom_up"  # or "ladder" (top-down inference)
  config.model.aux_identity_add = False  # True: add identically shaped skips instead of dropping them (HEAD)
  config.model.compute_dtype = "float32"  # "bfloat16": bf16 convs, float32 likelihoods and KL
  # How convolutions run (no effect on parameters or results beyond float rounding): "auto" = the stride-1
  # rewrites and batch chunking on the CPU backend, where they were measured faster, with their convs on oneDNN
  # on a single float32 CPU device (hvaeood.onednn), plain lax convolutions on GPU/TPU; "onednn" / "fast" (the
  # rewrites on XLA's kernels) / "plain" force one. conv_chunk_bytes: the rewrites' batch-chunk budget (None:
  # the default).
  config.model.conv_impl = "auto"
  config.model.conv_chunk_bytes = None

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 128
  config.train.num_steps = -1  # -1: schedule.epochs * steps_per_epoch
  config.train.time_budget_minutes = 0.0  # > 0: stop (and checkpoint) after this much training wall time
  config.train.log_every_steps = 50
  config.train.eval_every_steps = -1  # -1: every eval.every_epochs epochs
  config.train.precision = "default"  # matmul/conv precision of training (module docstring: why)
  config.train.sync_every_steps = 10  # multi-process: agree on stop/save decisions every this many steps
  config.train.distributed = False  # call jax.distributed.initialize() (multi-host TPU/GPU)
  # Explicit cluster for jax.distributed (None: auto-detected on TPU pods / SLURM / ...).
  config.train.coordinator_address = ml_collections.FieldReference(None, field_type=str)
  config.train.num_processes = ml_collections.FieldReference(None, field_type=int)
  config.train.process_id = ml_collections.FieldReference(None, field_type=int)

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 3e-4
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.grad_clip = 0.0  # > 0: clip the global gradient norm to this
  config.optim.skip_threshold = 0.0  # > 0: skip updates whose gradient norm exceeds this
  config.optim.max_consecutive_skips = 100  # stop the run with a clear error after this many skips in a row
  config.optim.ema_decay = 0.0  # > 0: keep an EMA of the parameters for evaluation (state.ema_step_size)

  config.schedule = ml_collections.ConfigDict()
  config.schedule.epochs = 1000
  config.schedule.warmup_epochs = 200.0
  config.schedule.free_nats = 2.0
  config.schedule.free_nats_constant_epochs = 200.0
  config.schedule.free_nats_anneal_epochs = 200.0
  # "per_layer_total": paper; "per_channel": reference HEAD; "per_layer_batch": free bits on the batch-mean KL
  config.schedule.free_nats_granularity = "per_layer_total"
  config.schedule.continuous = False

  config.eval = ml_collections.ConfigDict()
  config.eval.every_epochs = 10
  config.eval.batch_size = 250
  config.eval.max_examples = 10_000
  config.eval.ood_datasets = ("mnist",)
  config.eval.num_samples = 32  # prior samples in the image grid
  config.eval.precision = "highest"  # likelihoods independent of the backend's default precision

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 2000
  config.checkpoint.every_minutes = 10.0
  config.checkpoint.keep = 3
  return config


def use_svhn(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Swaps a CIFAR10 config's data for SVHN (svhn_cropped), with CIFAR10 as its OOD set."""
  config.data.name = "svhn_cropped"
  config.data.shuffle_buffer = 80_000  # >= the 73,257 training images: a full permutation every epoch
  config.eval.ood_datasets = ("cifar10",)
  return config


def apply_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """Returns the config for `paper` (unchanged), `cpu` or `tiny`."""
  variant = variant or "paper"
  if variant == "paper":
    return config
  if variant == "cpu":
    return cpu_variant(config)
  if variant == "tiny":
    return tiny_variant(config)
  raise ValueError(f"Unknown config variant {variant!r}; choose 'paper', 'cpu' or 'tiny' "
                   "(e.g. --config configs/fashion_mnist_hvae.py:cpu).")


def cpu_variant(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """30 minutes of training on 2 CPU cores: the paper's model at half width, schedules compressed into the budget.

  Half the channels (64 -> 32 for FashionMNIST/MNIST) costs a quarter of the FLOPs. Batch 64, not the paper's 128:
  in a 30-minute run, far from convergence, the number of updates counted for more than the smaller batch's gradient
  noise. On the 2-core AVX2 test machine batch 64 trains at 0.89x the images/s of batch 128 (76 vs 86 synthetic,
  `benchmarks/throughput.py`), so the budget buys 1.8x the updates: 2,121-2,250 steps (2.3-2.4 epochs) instead of
  1,143-1,164, and the LLR>1 AUROC against MNIST was 0.967 / 0.923 / 0.937 for seeds 1-3 (batch 128: 0.931 for seed
  1, 0.748 for seed 3; benchmarks/README.md, issue 14, eighth session). The budget is wall-clock training time
  (evaluation and checkpointing excluded; it survives resumes); `num_steps` (5 FashionMNIST epochs at batch 64) only
  caps it. Adam at 1e-3 with gradient-norm clipping (the single-sample KL is heavy-tailed early in training). The
  schedule keeps the paper's proportions for a 3.75-epoch run (KL warm-up over the first 20% of training, free nats
  held to 20% and annealed to zero by 40%, the plain ELBO after that): warm-up over the first 0.75 epoch, free nats
  held to epoch 0.75 and annealed to zero by epoch 1.5 (step 1,406 at batch 64), so the slow machine's 2.3-2.4-epoch
  runs optimise the plain ELBO for about their last third. The free nats are the batch-mean free bits
  (`per_layer_batch`): with the paper's per-example floor the top latents collapsed within the first 200 steps for
  most seeds (z2 and z3 under 0.5 nats for seeds 2 and 3; benchmarks/README.md, issue 14), which sank LLR>1 and
  LLR>2. Evaluation uses an EMA of the parameters (decay 0.9975: about the last 400 steps, the last 25,600 images as
  at batch 128 with decay 0.995): at batch 128 it gave a better test ELBO and LLR>1 than the raw parameters on the
  same training runs, for every seed measured (benchmarks/README.md).
  """
  m = config.model
  m.channels = tuple(tuple(max(8, c // 2) for c in stage) for stage in m.channels)
  config.train.time_budget_minutes = 30.0
  config.train.batch_size = 64
  config.train.num_steps = 5 * 60_000 // config.train.batch_size  # a cap: 5 FashionMNIST epochs (4,687 steps)
  config.optim.lr = 1e-3
  config.optim.grad_clip = 100.0
  config.schedule.continuous = True
  config.schedule.warmup_epochs = 0.75
  config.schedule.free_nats_constant_epochs = 0.75
  config.schedule.free_nats_anneal_epochs = 0.75
  config.schedule.free_nats_granularity = "per_layer_batch"
  config.optim.ema_decay = 0.9975
  config.train.log_every_steps = 25
  config.train.eval_every_steps = 100_000  # evaluate once, at the end
  config.eval.max_examples = 1000
  config.checkpoint.every_steps = 200
  config.checkpoint.every_minutes = 5.0
  return config


def tiny_variant(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A few-thousand-parameter model for tests and CI (seconds per step budget on CPU)."""
  m = config.model
  m.channels = tuple((8,) * len(c) for c in m.channels)
  m.latent_dims = tuple(min(d, 4) for d in m.latent_dims)
  config.train.batch_size = 16
  config.train.num_steps = 20
  config.train.log_every_steps = 5
  config.train.eval_every_steps = 10
  config.schedule.continuous = True
  config.schedule.warmup_epochs = 0.01
  config.schedule.free_nats_constant_epochs = 0.01
  config.schedule.free_nats_anneal_epochs = 0.01
  config.data.shuffle_buffer = 1000
  config.eval.batch_size = 50
  config.eval.max_examples = 100
  config.eval.num_samples = 8
  config.checkpoint.every_steps = 10
  config.checkpoint.every_minutes = 0.0
  config.checkpoint.keep = 2
  return config
