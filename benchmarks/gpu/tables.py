"""The GPU run's summary: benchmark images/s and share of the GPU's peak, and the
full-scale tables beside the paper's numbers, with every stage's time.

    python benchmarks/gpu/tables.py OUT_DIR
"""
import json
import os
import sys

# H200 (SXM) dense tensor-core peaks, TFLOP/s: what XLA and cuDNN use for float32
# convolutions (TF32) and for bfloat16.
PEAK_TFLOPS = {"float32 (TF32 tensor cores)": 494.7, "bfloat16": 989.4}
PAPER = {"table3": {"teacher": 91.91, "scratch": 87.91, "student": 88.70},
         "table1": {"teacher": 91.75, "teacher_short": 90.64, "student": 92.14}}
# The zoo's rows beside RepDistiller's published CIFAR-100 top-1 for resnet32x4 ->
# resnet8x4 (DKD: mdistiller's): another data set, the same recipe.
PAPER["zoo"] = {"scratch": 72.50, "kd": 73.33, "student": 72.62, "at": 73.44,
                "crd": 75.51, "dkd": 76.32}
PAPER_TITLE = {"zoo": "published CIFAR-100 % (32x4 -> 8x4)"}
LABELS = {"teacher": "teacher ResNet-26", "student": "FSP student",
          "scratch": "student from scratch", "teacher_short": "teacher arch., short",
          "fsp": "stage 1 (FSP)"}


def _json_lines(path):
  if not os.path.exists(path):
    return []
  out = []
  for line in open(path):
    line = line.strip()
    if line.startswith("{"):
      out.append(json.loads(line))
  return out


def bench_table(out_dir):
  rows = ["| run | step | images/s | TFLOP/s | share of peak |", "|---|---|---|---|---|"]
  for name, peak_key in (("bench_f32", "float32 (TF32 tensor cores)"),
                         ("bench_bf16", "bfloat16"),
                         ("bench_seeds_vmap", "float32 (TF32 tensor cores)"),
                         ("bench_seeds_unrolled", "float32 (TF32 tensor cores)")):
    for r in _json_lines(os.path.join(out_dir, name + ".json")):
      for step in ("main", "fsp", "teacher"):
        ips = r.get(f"{step}_images_per_s")
        gflop = r.get("memory", {}).get(step, {}).get("gflop_per_call")
        if ips is None:
          continue
        per_image = gflop / (r["batch_size"] * r["steps_per_call"] * r["num_seeds"]) \
            if gflop else None
        tflops = ips * per_image / 1e3 if per_image else None
        share = f"{100 * tflops / PEAK_TFLOPS[peak_key]:.2f} %" if tflops else "-"
        label = (f"jax {'float32' if 'seeds' in name else name[6:]}, "
                 f"{r['steps_per_call']} steps/call, {r['num_seeds']} seeds"
                 + (f" ({r['seed_axis']})" if r.get("num_seeds", 1) > 1 else ""))
        rows.append(f"| {label} | {step} | {ips:,.0f} | "
                    f"{tflops:.3g} | {share} |" if tflops else
                    f"| {label} | {step} | {ips:,.0f} | - | - |")
  for r in _json_lines(os.path.join(out_dir, "torch.json")):
    if "error" in r:
      rows.append(f"| torch amp={r.get('amp_bf16', '-')} compile={r.get('compile', '-')} | - | "
                  f"{r['error']} | | |")
      continue
    for step in ("main", "fsp", "teacher"):
      rows.append(f"| torch, channels-last, amp={r['amp_bf16']}, "
                  f"compile={r['compile']} | {step} | "
                  f"{r[f'{step}_images_per_s']:,.0f} | | |")
  return "\n".join(rows)


def results_table(out_dir, table):
  path = os.path.join(out_dir, table, "results.json")
  if not os.path.exists(path):
    return f"{table}: not run"
  results = json.load(open(path))
  rows = [f"### {table}", "", "| stage | steps | test acc % (mean ± std) | ensemble % | "
          f"{PAPER_TITLE.get(table, 'paper %')} | wall time s |", "|---|---|---|---|---|---|"]
  for stage, r in results.items():
    acc = "-"
    if "test_accuracy" in r:
      acc = f"{100 * r['test_accuracy']:.2f}"
      if "test_accuracy_std" in r:
        acc += f" ± {100 * r['test_accuracy_std']:.2f}"
    elif any(k.endswith("_loss") for k in r):
      key = next(k for k in r if k.startswith("test_") and k.endswith("_loss"))
      acc = f"(test loss {r[key]:.4g})"
    ens = (f"{100 * r['ensemble_test_accuracy']:.2f}"
           if "ensemble_test_accuracy" in r else "-")
    paper = PAPER.get(table, {}).get(stage, "-")
    rows.append(f"| {LABELS.get(stage, stage)} | {r['steps']} | {acc} | {ens} | "
                f"{paper} | {r['wall_time_s']:.0f} |")
  return "\n".join(rows)


def main(out_dir):
  print("## Benchmark\n")
  print(bench_table(out_dir))
  for table in ("table3", "table1", "zoo"):
    print()
    print(results_table(out_dir, table))


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "runs/gpu")
