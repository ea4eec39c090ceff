"""Does RetroMAE pre-training give a better starting point for a retriever than MLM, judged the field's way?

    python -m experiments.probe_evidence                    # every stage; finished ones are reused
    python -m experiments.probe_evidence --stage probe      # one stage: pairs, pretrain, probe, report
    python -m experiments.probe_evidence --stage convergence --convergence-steps 150 600 1200
    python -m experiments.probe_evidence --stage reference  # the full fine-tune the lengths are judged by

Stages:
1. pairs: a real query-passage set that is not cut from the pre-training text: the manual pages installed
   here, NAME description -> DESCRIPTION (experiments/manpage_pairs.py), split by page name into
   fine-tuning pairs and an evaluation set.
2. pretrain: the ablation's scratch preset (bert-tiny from random init, an 8k WordPiece vocabulary trained
   on the demo corpus, 3,600 steps, RetroMAE and MLM, 3 seeds), keeping a checkpoint every --save-every
   steps.
3. probe: `retromae-ds probe` on every kept checkpoint of seed 1 (RetroMAE and MLM: the curves) and on the
   final checkpoint of the other seeds, and on the same architecture at random init (the scratch
   tokenizer); MiniLM-L6 (a trained retriever's encoder) zero-shot, as reference lines. BM25 comes with
   every probe. The probe's setting: `bge` (cosine, temperature 0.02) at lr 2e-3, 600 steps of 32. Chosen on
   RetroMAE seed 1's step-720 checkpoint with 300-step probes (nDCG@10 from 0.008): `bge` at lr 1e-4 0.030,
   5e-4 0.089, 2e-3 0.189; `retromae-paper` (dot product, temperature 1) at lr 5e-5 and 1e-4 collapsed a
   random bert-tiny on the synthetic benchmark pairs (bench/results/2026-12-05-retrieval-cpu.md). The
   product's defaults (`retromae-paper`, lr 5e-5) are for pre-trained base-size encoders.
4. report: zero-shot and after-fine-tune nDCG@10 and MRR@10, mean over seeds, and the paired RetroMAE - MLM
   difference with a 95% two-stage bootstrap interval (seeds and queries), as JSON and markdown.
5. convergence (run on its own, `--stage convergence`): the probe at several lengths on every kept checkpoint
   of one RetroMAE run and the MLM run's last; the Spearman correlation of each length's ranking with the
   longest fine-tune's.
6. reference (run on its own after 5, `--stage reference`): the full fine-tune every length is judged
   against, `retromae-ds probe --val-pairs`: the fine-tuning pairs split by page name into 5/6 to learn
   from and 1/6 held out; evaluated on the held-out part every 150 steps, stopped after 4 evaluations
   without a gain (at most 3,000 steps), its best state scored on the evaluation set. On seed 1's
   checkpoints and MLM's last (the Spearman correlation of each probe length with it, with an interval
   over queries), and on the other seeds' finals (RetroMAE - MLM at convergence, 3 seeds paired); again
   with fine-tune seed 1 on --reseed's encoders (the reference's own noise).

On 2 CPU cores (2026-12-05, bench/results/2026-12-05-probe-evidence-cpu.md): the pre-training took 91 min
beside the probes (~45 min alone), each 600-step probe of bert-tiny 7-12 min with up to 6 processes on the
cores (~2 min alone); the whole run ~2 h 10 min. On a GPU, minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OBJECTIVES = ("retromae", "mlm")
METRICS = ("ndcg10", "mrr10")


def pairs_stage(args) -> None:
    if (Path(args.pairs_dir) / "eval.jsonl").exists():
        print(f"pairs: reusing {args.pairs_dir}")
        return
    from experiments.manpage_pairs import main as build

    build(["--out", args.pairs_dir])


def pretrain_stage(args) -> None:
    cmd = [sys.executable, "-m", "experiments.ablation", "--preset", "scratch", "--seeds", *map(str, args.seeds),
           "--steps", str(args.pretrain_steps), "--save-interval", str(args.save_every), "--reuse",
           "--out-dir", args.runs_dir, "--json", f"{args.runs_dir}/ablation.json",
           "--md", f"{args.runs_dir}/ablation.md", "--png", f"{args.runs_dir}/curves.png"]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def probe_flags(args, steps: int | None = None, train_pairs: Path | None = None, seed: int = 0) -> list[str]:
    return ["--train-pairs", str(train_pairs or f"{args.pairs_dir}/train.jsonl"), "--pairs",
            f"{args.pairs_dir}/eval.jsonl", "--steps", str(steps or args.probe_steps), "--batch-size",
            str(args.batch_size), "--lr", str(args.lr), "--max-length", str(args.max_length), "--setting",
            args.setting, "--seed", str(seed)]


def retromae_ds(*argv: str, log: Path | None = None) -> None:
    """One `retromae-ds` command at one thread (probes run --jobs at a time: one-thread processes side by
    side use 2 cores better than one process with two threads, see experiments/ablation.py)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    if log is None:
        subprocess.run([sys.executable, "-m", "retromae_ds.cli", *argv], cwd=REPO, env=env, check=True)
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        res = subprocess.run([sys.executable, "-m", "retromae_ds.cli", *argv], cwd=REPO, env=env, stdout=f,
                             stderr=subprocess.STDOUT)
    if res.returncode:
        raise SystemExit(f"retromae-ds {' '.join(argv[:2])} failed ({res.returncode}): see {log}")


def run_all(jobs: int, tasks: list[tuple[str, list[str], Path]]) -> None:
    """(name, retromae-ds argv, log) tasks, `jobs` at a time; prints each as it ends."""
    def one(task):
        name, argv, log = task
        retromae_ds(*argv, log=log)
        print(f"  done: {name} ({log})", flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(one, t) for t in tasks]:
            future.result()


def random_init_encoder(args) -> Path:
    """bert-tiny at random init with the scratch tokenizer, as the pre-training runs start (seed 1)."""
    folder = Path(args.runs_dir) / "random_init_encoder"
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoModel, AutoTokenizer

    from retromae_ds.model.presets import preset_config

    tokenizer = AutoTokenizer.from_pretrained(Path(args.runs_dir) / "tokenizer")
    config = preset_config("bert-tiny", tokenizer, args.max_length)
    torch.manual_seed(1)
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def final_export(run: Path, steps: int) -> Path:
    """The encoder of the run's last checkpoint, which must be its --pretrain-steps one (a run still training
    would give an early checkpoint)."""
    from retromae_ds.engine.checkpoint import read_marker

    folder = run / "final_export"
    if not (folder / "config.json").exists():
        if read_marker(run / "checkpoints" / f"step_{steps:08d}") is None:
            raise SystemExit(f"{run} has no complete step-{steps} checkpoint yet: run the pretrain stage to its end")
        retromae_ds("export", str(run), str(folder), "--overwrite")
    return folder


def probe_stage(args) -> None:
    from retromae_ds.data.demo_corpus import minilm_path

    flags = probe_flags(args)
    logs = Path(args.runs_dir) / "logs"
    tasks = []
    for objective in OBJECTIVES:  # the curves: every kept checkpoint of the first seed (probed ones skipped)
        run = Path(args.runs_dir) / f"{objective}_seed{args.seeds[0]}"
        tasks.append((f"curve {run.name}", ["probe", str(run), *flags], logs / f"probe_curve_{run.name}.log"))
    targets = {f"{objective}_seed{seed}": final_export(Path(args.runs_dir) / f"{objective}_seed{seed}",
                                                       args.pretrain_steps)
               for objective in OBJECTIVES for seed in args.seeds[1:]}
    targets["random_init"] = random_init_encoder(args)
    # MiniLM, a trained retriever, zero-shot only: a fine-tune at a from-scratch tiny model's learning rate
    # would say nothing about it, and at its own it costs ~10 tiny probes on 2 CPU cores
    minilm = Path(args.runs_dir) / "probes" / "minilm" / "zero_shot.json"
    if not minilm.exists():
        similarity = "cos" if args.setting == "bge" else "dot"
        tasks.append(("minilm zero-shot", ["eval", str(minilm_path()), "--pairs", f"{args.pairs_dir}/eval.jsonl",
                                           "--no-lee", "--no-bm25", "--similarity", similarity, "--max-length",
                                           str(args.max_length), "--json", str(minilm)], logs / "eval_minilm.log"))
    for name, folder in targets.items():
        out = Path(args.runs_dir) / "probes" / name
        if list(out.glob("probe-*.json")):
            print(f"probe: reusing {out}")
            continue
        tasks.append((name, ["probe", str(folder), *flags, "--out", str(out)], logs / f"probe_{name}.log"))
    run_all(args.jobs, tasks)


def convergence_stage(args) -> dict:
    """Does the short probe rank checkpoints as a long fine-tune does? Every kept checkpoint of RetroMAE
    seed 1 and MLM seed 1's last, fine-tuned for each of --convergence-steps (the longest: until held-out
    MRR@10 is flat, judged by the two longest), then the Spearman correlation of each length's ranking of
    the encoders with the longest one's."""
    from retromae_ds.engine.checkpoint import complete_checkpoints
    from retromae_ds.evaluate import spearman

    root = Path(args.runs_dir)
    encoders = {}
    for checkpoint in complete_checkpoints(root / f"retromae_seed{args.seeds[0]}"):
        folder = root / "convergence" / "encoders" / f"retromae_{checkpoint.name}"
        if not (folder / "config.json").exists():
            retromae_ds("export", str(checkpoint), str(folder), "--overwrite")
        encoders[f"retromae_{checkpoint.name}"] = folder
    encoders["mlm_last"] = final_export(root / f"mlm_seed{args.seeds[0]}", args.pretrain_steps)
    # the probe stage's curves already hold the --probe-steps fine-tune of these encoders (same seed and
    # settings: the probe is deterministic), so that length is read from them, not run again
    curve = {o: {e["step"]: e for e in _load(root / f"{o}_seed{args.seeds[0]}" / "probe")["checkpoints"]}
             for o in OBJECTIVES}
    reused = {f"retromae_step_{step:08d}": e for step, e in curve["retromae"].items()}
    reused["mlm_last"] = curve["mlm"][max(curve["mlm"])]
    table, tasks = {}, []
    for steps in sorted(args.convergence_steps, reverse=True):  # the reference first
        for name, folder in encoders.items():
            out = root / "convergence" / f"steps{steps}" / name
            if steps == args.probe_steps and name in reused:
                continue
            if not list(out.glob("probe-*.json")):
                tasks.append((f"{name} {steps} steps", ["probe", str(folder), *probe_flags(args, steps), "--out",
                                                          str(out)], root / "logs" / f"convergence_{steps}_{name}.log"))
    run_all(args.jobs, tasks)
    for steps in args.convergence_steps:
        for name in encoders:
            entry = reused[name] if steps == args.probe_steps and name in reused else \
                _load(root / "convergence" / f"steps{steps}" / name)
            table.setdefault(steps, {})[name] = entry["after"]
    longest = max(args.convergence_steps)
    names = list(encoders)
    reference = [table[longest][n]["pairs/ndcg10_cls"] for n in names]
    result = {"encoders": names, "steps": {}}
    for steps in args.convergence_steps:
        values = [table[steps][n]["pairs/ndcg10_cls"] for n in names]
        result["steps"][steps] = {"ndcg10": dict(zip(names, values)),
                                  "mrr10": {n: table[steps][n]["pairs/mrr10_cls"] for n in names},
                                  "spearman_vs_longest": spearman(np.asarray(values), np.asarray(reference))}
    out = Path(args.report).with_name("probe_convergence.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({s: r["spearman_vs_longest"] for s, r in result["steps"].items()}))
    return result


def validation_split(args) -> tuple[Path, Path]:
    """The fine-tuning pairs cut in two by a hash of the page name (--val-share to the held-out part): the
    full fine-tune learns from one and stops on the other, and the evaluation set stays untouched."""
    import hashlib

    fit, val = Path(args.pairs_dir) / "fit.jsonl", Path(args.pairs_dir) / "val.jsonl"
    if fit.exists() and val.exists():
        return fit, val
    rows = {"fit": [], "val": []}
    for line in (Path(args.pairs_dir) / "train.jsonl").read_text().splitlines():
        page = json.loads(line)["page"]
        digest = hashlib.blake2b(f"val:{page}".encode(), digest_size=8).digest()
        rows["val" if int.from_bytes(digest, "big") / 2**64 < args.val_share else "fit"].append(line)
    for path, lines in ((fit, rows["fit"]), (val, rows["val"])):
        tmp = path.with_suffix(".partial")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(path)
    print(f"validation split: {len(rows['fit'])} fine-tuning pairs ({fit}), {len(rows['val'])} held out ({val})")
    return fit, val


def reference_stage(args) -> dict:
    """The full fine-tune each shorter probe is judged against: until held-out nDCG@10 is flat (early
    stopping on a held-out part of the fine-tuning pairs, evaluated every --reference-eval-every steps,
    patience --reference-patience, at most --reference-steps), on every kept checkpoint of RetroMAE seed 1,
    MLM seed 1's last, and the other seeds' last (for RetroMAE - MLM at convergence). Then the Spearman
    correlation with it of each probe length the convergence stage ran, and the paired difference."""
    from experiments.paired_statistics import paired_bootstrap
    from retromae_ds.engine.checkpoint import complete_checkpoints
    from retromae_ds.evaluate import spearman

    root = Path(args.runs_dir)
    fit, val = validation_split(args)
    encoders = {}
    for checkpoint in complete_checkpoints(root / f"retromae_seed{args.seeds[0]}"):
        encoders[f"retromae_{checkpoint.name}"] = root / "convergence" / "encoders" / f"retromae_{checkpoint.name}"
    encoders["mlm_last"] = final_export(root / f"mlm_seed{args.seeds[0]}", args.pretrain_steps)
    for seed in args.seeds[1:]:
        for objective in OBJECTIVES:
            encoders[f"{objective}_seed{seed}"] = final_export(root / f"{objective}_seed{seed}", args.pretrain_steps)
    early_stopping = ["--val-pairs", str(val), "--eval-every", str(args.reference_eval_every), "--patience",
                      str(args.reference_patience), "--warmup", str(args.reference_warmup)]

    def flags(seed: int) -> list[str]:
        return [*probe_flags(args, args.reference_steps, train_pairs=fit, seed=seed), *early_stopping]

    tasks = []
    for name, folder in encoders.items():
        if not (folder / "config.json").exists():
            raise SystemExit(f"{folder} is missing: run the convergence stage first (it exports the checkpoints)")
        out = root / "reference" / name
        if not list(out.glob("probe-*.json")):
            tasks.append((f"{name} reference", ["probe", str(folder), *flags(0), "--out", str(out)],
                          root / "logs" / f"reference_{name}.log"))
    for name in args.reseed:  # the reference's own noise: the same full fine-tune with fine-tune seed 1
        out = root / "reference_seed1" / name
        if not list(out.glob("probe-*.json")):
            tasks.append((f"{name} reference, seed 1", ["probe", str(encoders[name]), *flags(1), "--out", str(out)],
                          root / "logs" / f"reference_seed1_{name}.log"))
    run_all(args.jobs, tasks)
    ref = {name: _load(root / "reference" / name) for name in encoders}
    seed1 = [n for n in encoders if n.startswith("retromae_step") or n == "mlm_last"]
    result = {"settings": ref[seed1[0]]["settings"], "encoders": {}, "spearman_vs_reference": {}, "paired": {}}
    for name, entry in ref.items():
        v = entry["validation"]
        result["encoders"][name] = {"ndcg10": entry["after"]["pairs/ndcg10_cls"],
                                    "mrr10": entry["after"]["pairs/mrr10_cls"], "best_step": v["best_step"],
                                    "stopped_at": v["stopped_at"], "best_val_ndcg10": v["best_ndcg10"],
                                    "history": v["history"]}
    after = lambda entry: np.asarray(entry["per_query"]["after"]["ndcg10"])  # noqa: E731
    reference = {n: after(ref[n]) for n in encoders}
    for steps in args.convergence_steps:  # the convergence stage's fine-tunes of seed 1's encoders
        if steps == args.probe_steps:
            continue
        found = {n: root / "convergence" / f"steps{steps}" / n for n in seed1}
        if all(list(f.glob("probe-*.json")) for f in found.values()):
            result["spearman_vs_reference"][f"seed1_{steps}"] = spearman_interval(
                {n: after(_load(f)) for n, f in found.items()}, reference, spearman)
    # the probe's default length: seed 1's curves and the other seeds' finals, from the probe stage
    probe = {n: e for n, e in final_entries(args).items() if n.split("_seed")[0] in OBJECTIVES}
    curve = {e["checkpoint"]: e for e in _load(root / f"retromae_seed{args.seeds[0]}" / "probe")["checkpoints"]}
    at_default = {**{f"retromae_{c}": after(e) for c, e in curve.items()},
                  "mlm_last": after(probe[f"mlm_seed{args.seeds[0]}"]),
                  **{n: after(probe[n]) for n in encoders if "_seed" in n}}
    result["spearman_vs_reference"][f"seed1_{args.probe_steps}"] = spearman_interval(
        {n: at_default[n] for n in seed1}, reference, spearman)
    result["spearman_vs_reference"][f"all_{args.probe_steps}"] = spearman_interval(at_default, reference, spearman)
    last = {(o, args.seeds[0]): ref[f"retromae_step_{args.pretrain_steps:08d}" if o == "retromae" else "mlm_last"]
            for o in OBJECTIVES}
    last.update({(o, s): ref[f"{o}_seed{s}"] for o in OBJECTIVES for s in args.seeds[1:]})
    for metric in METRICS:
        a = [np.asarray(last["retromae", s]["per_query"]["after"][metric]) for s in args.seeds]
        b = [np.asarray(last["mlm", s]["per_query"]["after"][metric]) for s in args.seeds]
        result["paired"][metric] = paired_bootstrap(
            a, b, lambda run, idx: float(run.mean() if idx is None else run[idx].mean()), len(a[0]), n_boot=2000,
            seed=0)
    for name in encoders:
        other = root / "reference_seed1" / name
        if list(other.glob("probe-*.json")):
            again = _load(other)
            result["encoders"][name]["fine_tune_seed1"] = {
                "ndcg10": again["after"]["pairs/ndcg10_cls"], "mrr10": again["after"]["pairs/mrr10_cls"],
                "best_step": again["validation"]["best_step"], "best_val_ndcg10": again["validation"]["best_ndcg10"]}
    out = Path(args.report).with_name("probe_reference.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"spearman": {k: [round(v["rho"], 3), round(v["low"], 3), round(v["high"], 3)]
                                   for k, v in result["spearman_vs_reference"].items()},
                      "paired": {m: [r["diff"], r["low"], r["high"]] for m, r in result["paired"].items()},
                      "ndcg10": {n: round(e["ndcg10"], 4) for n, e in result["encoders"].items()}}, indent=1))
    return result


def spearman_interval(probe: dict, reference: dict, spearman, resamples: int = 2000) -> dict:
    """Spearman correlation of the encoders' mean nDCG@10 under ``probe`` with that under ``reference``
    ({encoder: per-query values}, the same queries), and its 95% interval over the evaluation queries
    (resampled with replacement, the same draw for every encoder): how much the query sample alone moves it.
    The fine-tunes' own randomness is not in it."""
    names = [n for n in probe if n in reference]
    a = np.stack([probe[n] for n in names])
    b = np.stack([reference[n] for n in names])
    rng = np.random.default_rng(0)
    draws = [spearman(a[:, idx].mean(1), b[:, idx].mean(1))
             for idx in (rng.integers(0, a.shape[1], a.shape[1]) for _ in range(resamples))]
    return {"encoders": names, "rho": spearman(a.mean(1), b.mean(1)),
            "low": float(np.percentile(draws, 2.5)), "high": float(np.percentile(draws, 97.5))}


def _load(path: Path) -> dict:
    (found,) = sorted(path.glob("probe-*.json"))
    return json.loads(found.read_text())


def final_entries(args) -> dict[str, dict]:
    """{run name: probe entry of its final checkpoint} for every objective x seed, and the references."""
    entries = {}
    for objective in OBJECTIVES:
        curve = _load(Path(args.runs_dir) / f"{objective}_seed{args.seeds[0]}" / "probe")
        entries[f"{objective}_seed{args.seeds[0]}"] = curve["checkpoints"][-1]
        for seed in args.seeds[1:]:
            entries[f"{objective}_seed{seed}"] = _load(Path(args.runs_dir) / "probes" / f"{objective}_seed{seed}")
    entries["random_init"] = _load(Path(args.runs_dir) / "probes" / "random_init")
    minilm = json.loads((Path(args.runs_dir) / "probes" / "minilm" / "zero_shot.json").read_text())
    entries["minilm"] = {"zero_shot": minilm["metrics"], "after": None}
    return entries


def report_stage(args) -> dict:
    from experiments.paired_statistics import paired_bootstrap

    entries = final_entries(args)
    curve = {o: _load(Path(args.runs_dir) / f"{o}_seed{args.seeds[0]}" / "probe") for o in OBJECTIVES}
    report = {"settings": curve["retromae"]["settings"], "bm25": curve["retromae"]["bm25"], "runs": {},
              "paired": {}, "curves": {}}
    for name, entry in entries.items():
        report["runs"][name] = {stage: {m: entry[stage][f"pairs/{m}_cls"] for m in METRICS} if entry[stage] else None
                                for stage in ("zero_shot", "after")}
    for stage in ("zero_shot", "after"):
        for metric in METRICS:
            a = [np.asarray(entries[f"retromae_seed{s}"]["per_query"][stage][metric]) for s in args.seeds]
            b = [np.asarray(entries[f"mlm_seed{s}"]["per_query"][stage][metric]) for s in args.seeds]
            result = paired_bootstrap(a, b, lambda run, idx: float(run.mean() if idx is None else run[idx].mean()),
                                      len(a[0]), n_boot=2000, seed=0)
            report["paired"][f"{stage}/{metric}"] = result
            for objective, runs in (("retromae", a), ("mlm", b)):
                report["runs"].setdefault(f"{objective}_mean", {}).setdefault(stage, {})[metric] = float(
                    np.mean([r.mean() for r in runs]))
    for objective in OBJECTIVES:
        report["curves"][objective] = [
            {"step": e["step"], **{f"{stage}/{m}": e[stage][f"pairs/{m}_cls"] for stage in ("zero_shot", "after")
                                   for m in METRICS}} for e in curve[objective]["checkpoints"]]
    out = Path(args.report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(markdown(report)) + "\n")
    print("\n".join(markdown(report)))
    return report


def markdown(report: dict) -> list[str]:
    s = report["settings"]
    lines = [f"Probe: {s['setting']}, {s['steps']} steps of {s['batch_size']} pairs at lr {s['learning_rate']:g}, "
             f"{s['train_rows']} fine-tuning pairs, {s['eval_queries']} evaluation queries; [CLS] pooling.", "",
             "| encoder | zero-shot nDCG@10 | zero-shot MRR@10 | after nDCG@10 | after MRR@10 |",
             "| --- | --- | --- | --- | --- |"]
    for name, row in report["runs"].items():
        z, a = row["zero_shot"], row["after"]
        after = f"{a['ndcg10']:.4f} | {a['mrr10']:.4f}" if a else "(not fine-tuned) |"
        lines.append(f"| {name} | {z['ndcg10']:.4f} | {z['mrr10']:.4f} | {after} |")
    bm25 = report["bm25"]
    lines.append(f"| BM25 | {bm25['pairs/ndcg10_bm25']:.4f} | {bm25['pairs/mrr10_bm25']:.4f} | | |")
    seeds = next(iter(report["paired"].values()))["n_seeds"] if report["paired"] else 0
    lines += ["", f"| RetroMAE - MLM ({seeds} seeds, paired) | difference | 95% interval | per seed |",
              "| --- | --- | --- | --- |"]
    for key, r in report["paired"].items():
        lines.append(f"| {key} | {r['diff']:+.4f} | [{r['low']:+.4f}, {r['high']:+.4f}] | "
                     f"{', '.join(f'{x:+.4f}' for x in r['per_seed'])} |")
    lines += ["", "| step | RetroMAE after nDCG@10 | MLM after nDCG@10 | RetroMAE zero-shot | MLM zero-shot |",
              "| --- | --- | --- | --- | --- |"]
    mlm = {e["step"]: e for e in report["curves"]["mlm"]}
    for e in report["curves"]["retromae"]:
        m = mlm.get(e["step"], {})
        lines.append(f"| {e['step']} | {e['after/ndcg10']:.4f} | {m.get('after/ndcg10', float('nan')):.4f} | "
                     f"{e['zero_shot/ndcg10']:.4f} | {m.get('zero_shot/ndcg10', float('nan')):.4f} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=("all", "pairs", "pretrain", "probe", "report", "convergence", "reference"), default="all")
    ap.add_argument("--pairs-dir", default=str(REPO / "data" / "manpages"))
    ap.add_argument("--runs-dir", default=str(REPO / "runs" / "evidence"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--pretrain-steps", type=int, default=3600)
    ap.add_argument("--save-every", type=int, default=600)
    ap.add_argument("--probe-steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3, help="the fine-tune's peak learning rate (default 2e-3: "
                    "chosen for bert-tiny from scratch, see the module docstring)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--setting", default="bge")
    ap.add_argument("--convergence-steps", type=int, nargs="+", default=[150, 300, 600, 1200],
                    help="fine-tuning lengths the convergence stage compares (the longest is the reference: "
                         "1,200 steps of 32 are 21 passes over the 1,832 manual-page fine-tuning pairs)")
    ap.add_argument("--val-share", type=float, default=1 / 6,
                    help="share of the fine-tuning pairs (by page-name hash) the reference stops on")
    ap.add_argument("--reference-steps", type=int, default=3000, help="the reference fine-tune's most steps")
    ap.add_argument("--reference-eval-every", type=int, default=150)
    ap.add_argument("--reference-patience", type=int, default=4)
    ap.add_argument("--reference-warmup", type=float, default=0.05)
    ap.add_argument("--reseed", nargs="*", default=["retromae_step_00003600", "mlm_last"], metavar="ENCODER",
                    help="encoders whose reference fine-tune runs again with fine-tune seed 1 (its own noise)")
    ap.add_argument("--jobs", type=int, default=2, help="probes run at once, one thread each (default 2)")
    ap.add_argument("--report", default=str(REPO / "experiments" / "results" / "probe_evidence.json"))
    args = ap.parse_args(argv)
    stages = ("pairs", "pretrain", "probe", "report") if args.stage == "all" else (args.stage,)
    for stage in stages:
        globals()[f"{stage}_stage"](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
