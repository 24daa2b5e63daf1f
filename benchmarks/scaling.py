"""Throughput against batch size and against device count; prints a table and saves a PNG plot.

  python benchmarks/scaling.py --config configs/fashion_mnist_hvae.py \
      [--batch_sizes 16,32,64,128,256] [--devices 1,2,4] [--device_batch 128] [--out benchmarks/scaling.png]

Each point is one `benchmarks/throughput.py` run in a fresh process (so that XLA_FLAGS can set the device
count), and its JSON line is kept in `--json` (default: the PNG's path with .jsonl). On a CPU host the device
counts are fake devices (`--xla_force_host_platform_device_count`), which split the same cores: the curve
shows the cost of sharding (collectives, smaller per-device batches), not a speed-up. On an accelerator host
the device counts must not exceed the real devices (the runs use the first N via `--num_devices`).
Device-count runs keep the global batch at `--device_batch`, so every point trains the same model step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import hvaeood  # noqa: E402


def run_point(config: str, batch_size: int, devices: int, steps: int, repeats: int, fake: bool,
              skip_eval: bool) -> dict:
  env = dict(os.environ)
  hvaeood.set_xla_cpu_defaults(env)  # the XLA:CPU default for throughput.py too (unless env opts out)
  if fake:
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  cmd = [sys.executable, os.path.join(HERE, "throughput.py"), "--config", config, "--batch_size",
         str(batch_size), "--steps", str(steps), "--repeats", str(repeats)]
  if not fake:
    cmd += ["--num_devices", str(devices)]
  if skip_eval:
    cmd.append("--skip_eval")
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f"throughput.py failed for batch {batch_size}, {devices} devices:\n{proc.stderr[-3000:]}")
  return json.loads(lines[-1])


def table(rows: list[dict], key: str) -> str:
  head = f"| {key} | train img/s | achieved GFLOP/s | compile s | eval img/s | peak RSS MB |"
  out = [head, "|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    out.append(f"| {r[key]} | {r['train_img_per_s']:.1f} | {r['achieved_gflops']:.1f} | {r['compile_s']:.1f} | "
               f"{(format(r['eval_img_per_s'], '.1f') if 'eval_img_per_s' in r else '-')} | {r['peak_rss_mb']:.0f} |")
  return "\n".join(out)


def plot(by_batch: list[dict], by_dev: list[dict], path: str, title: str) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(10, 4))
  FigureCanvasAgg(fig)
  for ax, rows, key, xlabel in ((fig.add_subplot(1, 2, 1), by_batch, "batch_size", "global batch size"),
                                (fig.add_subplot(1, 2, 2), by_dev, "device_count", "devices")):
    if not rows:
      ax.set_visible(False)
      continue
    xs = [r[key] for r in rows]
    ax.plot(xs, [r["train_img_per_s"] for r in rows], "o-", label="train")
    if all("eval_img_per_s" in r for r in rows):
      ax.plot(xs, [r["eval_img_per_s"] for r in rows], "s--", label="eval (ELBO + all L>k, S=1)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images / s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  os.replace(tmp, path)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", required=True)
  ap.add_argument("--batch_sizes", default="16,32,64,128,256")
  ap.add_argument("--devices", default="1,2,4")
  ap.add_argument("--device_batch", type=int, default=128, help="global batch of the device-count runs")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--skip_eval", action="store_true")
  ap.add_argument("--out", default=os.path.join(HERE, "scaling.png"))
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  import jax  # pylint: disable=import-outside-toplevel
  backend = jax.default_backend()
  fake = backend == "cpu"
  batches = [int(b) for b in args.batch_sizes.split(",") if b]
  devices = [int(d) for d in args.devices.split(",") if d]
  for d in devices:
    if args.device_batch % d:
      ap.error(f"--device_batch {args.device_batch} does not divide into {d} devices; choose a multiple of each.")
  json_path = args.json or os.path.splitext(args.out)[0] + ".jsonl"
  by_batch, by_dev = [], []
  with open(json_path, "w", encoding="utf-8") as f:
    for b in batches:
      r = run_point(args.config, b, 1, args.steps, args.repeats, fake, args.skip_eval)
      by_batch.append(r)
      f.write(json.dumps(r) + "\n")
      f.flush()
      print(f"batch {b}: {r['train_img_per_s']:.1f} train img/s", file=sys.stderr, flush=True)
    for d in devices:
      r = run_point(args.config, args.device_batch, d, args.steps, args.repeats, fake, args.skip_eval)
      by_dev.append(r)
      f.write(json.dumps(r) + "\n")
      f.flush()
      print(f"{d} devices: {r['train_img_per_s']:.1f} train img/s", file=sys.stderr, flush=True)
  kind = (by_batch or by_dev)[0]["device_kind"]
  print(f"## {args.config} on {kind} ({'fake CPU devices' if fake else 'real devices'})\n")
  print("Against batch size (1 device):\n")
  print(table(by_batch, "batch_size"))
  print(f"\nAgainst device count (global batch {args.device_batch}):\n")
  print(table(by_dev, "device_count"))
  plot(by_batch, by_dev, args.out, f"{os.path.basename(args.config)} on {kind}"
       + (" (fake devices share the same cores)" if fake else ""))
  print(f"\nplot: {args.out}\njson: {json_path}")


if __name__ == "__main__":
  hvaeood.set_xla_cpu_defaults()  # before JAX starts its CPU backend (main asks it for the backend)
  main()
