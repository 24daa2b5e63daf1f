"""Evaluates a trained checkpoint for OOD detection and writes the paper's table.

  python evaluate.py --checkpoint WORKDIR --ood mnist --output_dir OUT [--iw_samples 1000] [--k 1,2]
  python evaluate.py --checkpoint WORKDIR --ood mnist,path/to/pngs,letters.npz,tfds:emnist/letters --output_dir OUT

PATH is a training workdir (its best checkpoint, i.e. the best in-distribution test ELBO seen during training, as
the reference evaluates; the latest where no best was saved, or with --which=latest) or one checkpoint step
directory. The checkpoint path and step used are printed first. The model config and the in-distribution dataset
come from the checkpoint. Outputs in OUT:
results.json (written last), results.md, scores.npz, roc.png, hist.png; see hvaeood/evaluate.py.
User errors print one `error: ...` line and exit with status 2.
"""

from absl import app, flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir or checkpoint step directory (required).")
_WHICH = flags.DEFINE_string("which", None, "For a workdir: 'best' or 'latest' checkpoint (default: best where "
                             "the workdir has one, else latest).")
_OOD = flags.DEFINE_list("ood", None, "OOD sets, comma-separated: dataset names (mnist,kmnist), folders of PNG/JPEG "
                         "images, .npy/.npz files of uint8 images (FILE.npz:KEY) or tfds:NAME[/CONFIG][:SPLIT] "
                         "(default: the config's eval.ood_datasets).")
_RESIZE = flags.DEFINE_bool("resize", False, "Resize folder/array/tfds OOD images of another size to the model's "
                            "(PIL bilinear); without it another size is an error.")
_FIT_EXAMPLES = flags.DEFINE_integer("fit_examples", 10_000, "Examples of the in-distribution train split that the "
                                     "fitted scores (typicality, DoSE, fisher) are fitted on (at most "
                                     "--max_examples); 0: none.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Directory for the outputs (required).")
_IW = flags.DEFINE_integer("iw_samples", 1, "Importance samples S of the ELBO.")
_IW_K = flags.DEFINE_integer("iw_samples_k", 1, "Importance samples S_k of each L^{>k}.")
_K = flags.DEFINE_list("k", None, "k values of L^{>k} and LLR^{>k} (default: every k in 0..L-1).")
_SPLIT = flags.DEFINE_string("split", "test", "Split of every dataset.")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", None, "Use at most this many examples per dataset.")
_BATCH = flags.DEFINE_integer("batch_size", 500, "Global batch size (padded to a multiple of the devices; the "
                              "padding is masked).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of data noise, latent samples and subsampling.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: the checkpoint config's).")
_MAX_ROWS = flags.DEFINE_integer("max_rows", None, "Memory bound: replicas x batch rows evaluated at once "
                                 "(default 2048).")
_NO_EMA = flags.DEFINE_bool("no_ema", False, "Evaluate the raw parameters instead of the EMA.")
_PRIOR_SAMPLE = flags.DEFINE_bool("prior_sample", False, "L^{>k} with z_{<=k} sampled from the conditional prior "
                                  "(the paper's definition) instead of its mean (the reference's code).")
_TRAIN_REFERENCE = flags.DEFINE_bool("train_reference", False, "Also score the in-distribution train split against "
                                     "the evaluated split (the reference's sanity row), capped at its size.")
_PRECISION = flags.DEFINE_string("precision", "highest", "Matmul/conv precision: highest (default: likelihoods "
                                 "independent of the backend's default), high or default.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")


def _ints(values, flag):
  if values is None:
    return None
  try:
    return [int(v) for v in values]
  except ValueError:
    raise ValueError(f"--{flag} must be a comma-separated list of integers, got {','.join(values)!r}.") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from hvaeood import cli  # pylint: disable=import-outside-toplevel

  def run():
    from hvaeood import evaluate  # pylint: disable=import-outside-toplevel
    if _DISTRIBUTED.value:
      import jax  # pylint: disable=import-outside-toplevel
      jax.distributed.initialize()
    return evaluate.evaluate(
        _CHECKPOINT.value, _OUTPUT_DIR.value, which=_WHICH.value, ood=_OOD.value, iw_samples=_IW.value,
        iw_samples_k=_IW_K.value, ks=_ints(_K.value, "k"), split=_SPLIT.value, max_examples=_MAX_EXAMPLES.value,
        batch_size=_BATCH.value, seed=_SEED.value, data_dir=_DATA_DIR.value, max_rows=_MAX_ROWS.value,
        use_ema=not _NO_EMA.value, prior_sample=_PRIOR_SAMPLE.value, train_reference=_TRAIN_REFERENCE.value,
        precision=_PRECISION.value, fit_examples=_FIT_EXAMPLES.value, resize=_RESIZE.value)

  cli.run_guarded(run)


if __name__ == "__main__":
  import hvaeood  # pylint: disable=g-import-not-at-top
  hvaeood.set_xla_cpu_defaults()  # before JAX starts its CPU backend
  from hvaeood import cli as _cli  # pylint: disable=g-import-not-at-top
  _cli.quiet_library_logs()
  _cli.tensorflow_without_keras()  # before anything imports TensorFlow
  app.run(main, flags_parser=_cli.flags_parser)
