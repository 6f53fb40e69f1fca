"""The reduced-budget CIFAR-10 experiments of docs/RESULTS.md: run them, resumably, and collect them.

    ORTHOMOD_DATA=DIR python scripts/experiments.py run [--only SUBSTRING[,SUBSTRING...]]...   # sequential; resumes
    python scripts/experiments.py list
    python scripts/experiments.py collect        # copy the small files of each run to docs/results/runs
    python scripts/experiments.py park           # collect, and keep each unfinished run's checkpoint there too
    python scripts/experiments.py tables [--write]   # the tables of the collected runs (--write: into RESULTS.md)
    python scripts/experiments.py figures [--only GROUP]   # orthomod report over each experiment's runs
    ORTHOMOD_DATA=DIR python scripts/experiments.py propagation   # every method's nets at 20/44/110 layers at step 0

Each experiment is one `orthomod train` command; a run that is already complete (here or in its
collected copy) is skipped and an interrupted one is resumed with `--resume` while its
checkpoint exists, so the queue can be stopped and restarted at any time. Checkpoints live in
runs/paper/, which is not committed; `park` (at the end of a session) copies the checkpoint of
each unfinished run into its collected copy, which is, so that `run` on a fresh machine rebuilds the
run folder from there and resumes instead of starting over (a 64k-step run outlives any one
machine). `collect` drops the parked checkpoint of a run once it has finished, `park` also that of
a run the queue skips under the ranking as it is. The runs use the
orthomod of the Python that runs this script: run it from a separate (non-editable) install to
keep a long queue independent of edits to the working tree, with the TAT extra
(`pip install "<exported tree>[tat]"`): without it the TAT rows stop the queue with a one-line error.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from itertools import combinations
from statistics import fmean, median, stdev
from pathlib import Path

from orthomod.cli import EXIT_DIVERGED
from orthomod.files import RunFolder, copy_file, save_text

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "paper"
COLLECTED = ROOT / "docs" / "results" / "runs"
RESULTS = ROOT / "docs" / "RESULTS.md"
# each leaderboard row's step time against the baseline's (benchmarks/bench_rows.py, AMD EPYC, fp32):
# benchmarks/bench_rows.py's raw outputs, each row paired with the baseline in its own run; a later
# file's row replaces an earlier one's (the LSUV, looks-linear, delta-tanh and isonet-mod rows were
# added after the first run; the last two were timed on the Zen 4 EPYC, in fp32 as the others)
ROW_TIMES = tuple(ROOT / "docs" / "benchmarks" / name for name in
                  ("2026-11-26-bench-rows-plain44-amd-epyc-avx2.json",
                   "2026-11-26-bench-rows-plain44-lsuv-amd-epyc-avx2.json",
                   "2026-11-26-bench-rows-plain44-looks-linear-amd-epyc-avx2.json",
                   "2026-11-27-bench-rows-plain44-delta-tanh-amd-epyc-zen4-fp32.json",
                   "2026-11-27-bench-rows-plain44-isonet-mod-amd-epyc-zen4-fp32.json"))
# rows whose training step is another timed row's (only the lr schedule differs): that row's time
SAME_STEP = {"isonet-lr0.03-warm": "isonet"}

BASE = ["--no-progress", "--log-every", "50", "--diagnostics-every", "100"]
C10 = ["--dataset", "cifar10"]
SHAPES = ["--dataset", "shapes", "--epochs", "6"]  # the built-in set, as the demo preset trained it until 2026-11-25
L2 = ["--init", "msra", "--reg", "l2"]
ORTHO = ["--init", "orthonormal", "--reg", "ortho"]


def c10(model: str, epochs: str, seed: str, flags: list[str]) -> list[str]:
    """A CIFAR-10 run of ``model`` for ``epochs`` with ``seed`` and a method's ``flags``."""
    return [*C10, "--model", model, "--epochs", epochs, "--seed", seed, *flags]


def setting(flags: list[str], flag: str, value: str) -> list[str]:
    """``flags`` with ``flag`` set to ``value`` (its value replaced where it is given)."""
    if flag not in flags:
        return [*flags, flag, value]
    at = flags.index(flag)
    return [*flags[:at + 1], value, *flags[at + 2:]]


def mod(tau: float, until: int | str, rule: str = "consecutive") -> list[str]:
    return ["--modulation", "on", "--modulation-tau", str(tau), "--modulation-until", str(until),
            "--modulation-rule", rule]


# name -> flags; the order is the order of the queue (cheapest decisive runs first)
# Table 2's six optimizers (the paper's list), each at orthomod's default lr for it
OPTIMIZERS = ("sgd", "nesterov", "adagrad", "adadelta", "rmsprop", "adam")

EXPERIMENTS: dict[str, list[str]] = {
    # 1. Figs. 2-3 (and the plain-44 rows of 2): 10 epochs = 3,900 iterations, 6% of the paper's 64k
    "e1-plain44-l2-s0": [*C10, "--model", "plain44", "--epochs", "10", "--seed", "0", *L2],
    "e1-plain44-ortho-s0": [*C10, "--model", "plain44", "--epochs", "10", "--seed", "0", *ORTHO],
    # the built-in shapes set: do depth and method matter there too?
    "s-plain8-l2-s0": ["--model", "plain8", "--seed", "0", *SHAPES, *L2],
    "s-plain56-l2-s0": ["--model", "plain56", "--seed", "0", *SHAPES, *L2],
    "s-plain56-ortho-s0": ["--model", "plain56", "--seed", "0", *SHAPES, *ORTHO],
    "s-plain56-ortho-mod-s0": ["--model", "plain56", "--seed", "0", *SHAPES, *ORTHO, *mod(2.0, 150)],
    # 2 and 4. plain-110 at 4 epochs (1,560 iterations)
    "e2-plain110-ortho-s0": [*C10, "--model", "plain110", "--epochs", "4", "--seed", "0", *ORTHO],
    "e2-plain110-ortho-mod-s0": [*C10, "--model", "plain110", "--epochs", "4", "--seed", "0", *ORTHO, *mod(2.0, 400)],
    "e2-plain110-l2-s0": [*C10, "--model", "plain110", "--epochs", "4", "--seed", "0", *L2],
    "e4-plain110-ortho-mod-always-s0": [*C10, "--model", "plain110", "--epochs", "4", "--seed", "0", *ORTHO, *mod(1.0, "always")],
    "e4-plain110-ortho-modtop-s0": [*C10, "--model", "plain110", "--epochs", "4", "--seed", "0", *ORTHO, *mod(2.0, 400, "top")],
    # added after the band rule (tau 2) diverged like ortho alone: every layer in the first 400
    # iterations only, and He et al.'s remedy for 110 layers (a gentler start) without modulation
    "e4-plain110-ortho-mod-tau1-until400-s0": [*C10, "--model", "plain110", "--epochs", "4", "--seed", "0", *ORTHO,
                                               *mod(1.0, 400)],
    "e2-plain110-ortho-warmup-s0": [*C10, "--model", "plain110", "--epochs", "4", "--seed", "0", *ORTHO,
                                    "--warmup-steps", "400"],
    # 3. Table 2 on plain-110, one epoch (390 iterations, 0.6% of the paper's budget): msra + L2
    # with each optimizer at its customary lr (the paper gives none), against ours
    **{f"t2-plain110-{opt}-s0": [*C10, "--model", "plain110", "--epochs", "1", "--seed", "0", *L2, "--optimizer", opt]
       for opt in OPTIMIZERS},
    # 5. second seeds of the rows that decide a claim
    "e1-plain44-l2-s1": [*C10, "--model", "plain44", "--epochs", "10", "--seed", "1", *L2],
    "e1-plain44-ortho-s1": [*C10, "--model", "plain44", "--epochs", "10", "--seed", "1", *ORTHO],
    "e2-plain110-ortho-s1": [*C10, "--model", "plain110", "--epochs", "4", "--seed", "1", *ORTHO],
    "e2-plain110-ortho-mod-s1": [*C10, "--model", "plain110", "--epochs", "4", "--seed", "1", *ORTHO, *mod(2.0, 400)],
    "e4-plain110-ortho-mod-always-s1": [*C10, "--model", "plain110", "--epochs", "4", "--seed", "1", *ORTHO,
                                        *mod(1.0, "always")],
    # 3. ours at the Table 2 budget on plain-110 (modulation with the defaults chosen in 4)
    "t2-plain110-ours-s0": [*C10, "--model", "plain110", "--epochs", "1", "--seed", "0", *ORTHO, *mod(1.0, "always")],
    # 2. depth: plain-44 with modulation, plain-20 with each method, the residual nets with L2
    "e2-plain44-ortho-mod-s0": [*C10, "--model", "plain44", "--epochs", "10", "--seed", "0", *ORTHO,
                                *mod(1.0, "always")],
    "e2-plain20-l2-s0": [*C10, "--model", "plain20", "--epochs", "10", "--seed", "0", *L2],
    "e2-plain20-ortho-s0": [*C10, "--model", "plain20", "--epochs", "10", "--seed", "0", *ORTHO],
    "e2-plain20-ortho-mod-s0": [*C10, "--model", "plain20", "--epochs", "10", "--seed", "0", *ORTHO,
                                *mod(1.0, "always")],
    "e2-resnet20-l2-s0": [*C10, "--model", "resnet20", "--epochs", "10", "--seed", "0", *L2],
    "e2-resnet44-l2-s0": [*C10, "--model", "resnet44", "--epochs", "10", "--seed", "0", *L2],
    "e2-resnet110-l2-s0": [*C10, "--model", "resnet110", "--epochs", "4", "--seed", "0", *L2],
    "e2-plain110-l2-s1": [*C10, "--model", "plain110", "--epochs", "4", "--seed", "1", *L2],
    # 3. Table 2 on plain-44, two epochs (780 iterations), the six optimizers against ours
    **{f"t2-plain44-{opt}-s0": [*C10, "--model", "plain44", "--epochs", "2", "--seed", "0", *L2, "--optimizer", opt]
       for opt in OPTIMIZERS},
    "t2-plain44-ours-s0": [*C10, "--model", "plain44", "--epochs", "2", "--seed", "0", *ORTHO, *mod(1.0, "always")],
    # 4. a third until_step: modulation through the first lr phase (the drop comes at 50%, step 780),
    # the schedule the paper presets use at full budget
    "e4-plain110-ortho-mod-tau1-until780-s0": [*C10, "--model", "plain110", "--epochs", "4", "--seed", "0", *ORTHO,
                                               *mod(1.0, 780)],
    # Fig. 2's absolute level: is our filter correlation (0.039) above the paper's 6e-3 because the
    # regularizer's integrated pull (lr x lambda summed over the run) is ~16x smaller at this budget?
    "e1-plain44-ortho-coeff1e-3-s0": [*C10, "--model", "plain44", "--epochs", "10", "--seed", "0", *ORTHO,
                                      "--reg-coeff", "1e-3"],
    # 5. third seeds of the plain-44 comparison
    "e1-plain44-l2-s2": [*C10, "--model", "plain44", "--epochs", "10", "--seed", "2", *L2],
    "e1-plain44-ortho-s2": [*C10, "--model", "plain44", "--epochs", "10", "--seed", "2", *ORTHO],
    # 5. second seeds of the rows the first queue left at one seed: modulation on plain-44, the
    # until_step choice on plain-110, the stronger regularizer
    "e2-plain44-ortho-mod-s1": [*C10, "--model", "plain44", "--epochs", "10", "--seed", "1", *ORTHO,
                                *mod(1.0, "always")],
    "e4-plain110-ortho-mod-tau1-until780-s1": [*C10, "--model", "plain110", "--epochs", "4", "--seed", "1", *ORTHO,
                                               *mod(1.0, 780)],
    "e1-plain44-ortho-coeff1e-3-s1": [*C10, "--model", "plain44", "--epochs", "10", "--seed", "1", *ORTHO,
                                      "--reg-coeff", "1e-3"],
    "e4-plain110-ortho-mod-tau1-until400-s1": [*C10, "--model", "plain110", "--epochs", "4", "--seed", "1", *ORTHO,
                                               *mod(1.0, 400)],
    "e2-plain44-ortho-mod-s2": [*C10, "--model", "plain44", "--epochs", "10", "--seed", "2", *ORTHO,
                                *mod(1.0, "always")],
    # 5. fourth and fifth seeds of the plain-44 comparison: three seeds left the 3-point mean gap
    # inside the seed spread
    **{f"e1-plain44-{method}-s3": [*C10, "--model", "plain44", "--epochs", "10", "--seed", "3", *flags]
       for method, flags in (("l2", L2), ("ortho", ORTHO))},
    # 3. does the best optimizer of the one-epoch Table 2 learn plain-110 at ours' 4-epoch budget?
    "t2-plain110-adadelta-4ep-s0": [*C10, "--model", "plain110", "--epochs", "4", "--seed", "0", *L2,
                                    "--optimizer", "adadelta"],
    **{f"e1-plain44-{method}-s4": [*C10, "--model", "plain44", "--epochs", "10", "--seed", "4", *flags]
       for method, flags in (("l2", L2), ("ortho", ORTHO))},
    # 4-5. third seeds of the two until_step settings that two seeds could not tell apart
    "e4-plain110-ortho-mod-always-s2": [*C10, "--model", "plain110", "--epochs", "4", "--seed", "2", *ORTHO,
                                        *mod(1.0, "always")],
    "e4-plain110-ortho-mod-tau1-until780-s2": [*C10, "--model", "plain110", "--epochs", "4", "--seed", "2", *ORTHO,
                                               *mod(1.0, 780)],
    # 3, 5. a second seed of Table 2 on plain-110, the rows behind "the others fail at 110 layers"
    **{f"t2-plain110-{opt}-s1": [*C10, "--model", "plain110", "--epochs", "1", "--seed", "1", *L2, "--optimizer", opt]
       for opt in OPTIMIZERS},
    "t2-plain110-ours-s1": [*C10, "--model", "plain110", "--epochs", "1", "--seed", "1", *ORTHO, *mod(1.0, "always")],
    # 2, 5. second seeds of the depth table's plain-20 row and its residual net
    "e2-plain20-l2-s1": [*C10, "--model", "plain20", "--epochs", "10", "--seed", "1", *L2],
    "e2-plain20-ortho-s1": [*C10, "--model", "plain20", "--epochs", "10", "--seed", "1", *ORTHO],
    "e2-plain20-ortho-mod-s1": [*C10, "--model", "plain20", "--epochs", "10", "--seed", "1", *ORTHO,
                                *mod(1.0, "always")],
    "e2-resnet20-l2-s1": [*C10, "--model", "resnet20", "--epochs", "10", "--seed", "1", *L2],
    # 3, 5. a second seed of Table 2 on plain-44; second seeds of the deeper residual nets
    **{f"t2-plain44-{opt}-s1": [*C10, "--model", "plain44", "--epochs", "2", "--seed", "1", *L2, "--optimizer", opt]
       for opt in OPTIMIZERS},
    "t2-plain44-ours-s1": [*C10, "--model", "plain44", "--epochs", "2", "--seed", "1", *ORTHO, *mod(1.0, "always")],
    "e2-resnet44-l2-s1": [*C10, "--model", "resnet44", "--epochs", "10", "--seed", "1", *L2],
    "e2-resnet110-l2-s1": [*C10, "--model", "resnet110", "--epochs", "4", "--seed", "1", *L2],
    # 4, 5. second seeds of the two plain-110 rows left at one: our top rule (our variant, docs/METHOD-NOTES.md)
    # and AdaDelta at ours' 4-epoch budget
    "e4-plain110-ortho-modtop-s1": [*C10, "--model", "plain110", "--epochs", "4", "--seed", "1", *ORTHO,
                                    *mod(2.0, 400, "top")],
    "t2-plain110-adadelta-4ep-s1": [*C10, "--model", "plain110", "--epochs", "4", "--seed", "1", *L2,
                                    "--optimizer", "adadelta"],
    # 4. the paper's consecutive rule with a narrower band: tau 2 never fires while the moments
    # drift about 1.1x per layer; does a band of 1.1 fire enough to train, and keep some variety?
    **{f"e4-plain110-ortho-mod-tau1.1-always-s{seed}": [*C10, "--model", "plain110", "--epochs", "4", "--seed",
                                                        str(seed), *ORTHO, *mod(1.1, "always")]
       for seed in (0, 1)},
    # 4, 5. a third seed of the top rule: its first two seeds disagree (10.29% and 17.01%)
    "e4-plain110-ortho-modtop-s2": [*C10, "--model", "plain110", "--epochs", "4", "--seed", "2", *ORTHO,
                                    *mod(2.0, 400, "top")],
    # The paper's full protocol (64k iterations, the paper-cifar preset), issue 18's order: plain-44
    # orthonormality, plain-44 msra + L2, plain-110 with modulation for the first n iterations, always
    **{f"f-{preset}-s0": ["--config", preset, "--seed", "0"]
       for preset in ("plain44-ortho", "plain44-l2", "plain110-ortho-mod", "plain110-ortho-mod-always")},
    **{f"f-{preset}-s1": ["--config", preset, "--seed", "1"] for preset in ("plain44-ortho", "plain44-l2")},
    # added 2026-11-27, last: is the plain-44 row's gap to the paper one of augmentation? (it ended
    # at 99.97% training accuracy with flips only; He et al. also pad and crop)
    "f-plain44-ortho-flipcrop-s0": ["--config", "plain44-ortho", "--seed", "0", "--augment", "flip-crop"],
}

# Issue 15's leaderboard: every known way to train a deep plain net at experiment 1's budget
# (plain-44, 10 epochs, CIFAR-10, flips), seed 0 first (a screening pass); rows that decide the
# ranking get seeds 1 and 2. The paper's rows and the residual net are experiment 1's and 2's
# (e1-plain44-l2, e1-plain44-ortho, e2-plain44-ortho-mod, e2-resnet44-l2); lb-plain44-l2 reruns
# the baseline on the queue's own machine, the reference of the wall-time column.
# ISONet's recipe with the coefficients of its authors' code (isonet/utils/config.py of HaozhiQi/ISONet:
# ORTHO_COEFF 1e-4 on the same sum/2 penalty, SGD weight decay 1e-4 beside it; docs/METHOD-NOTES.md)
ISONET = ["--init", "dirac", "--activation", "srelu", "--reg", "conv-ortho", "--reg-coeff", "1e-4",
          "--l2-beside", "1e-4"]
# The rows without BN (isonet, isonet-mod, tat, lsuv) take lr 0.01, the rest the protocol's 0.1 (same
# drops): at 0.1 isonet and tat diverged within 10 steps, TAT at 0.03 at step 46, in 150-step probes
# (docs/RESULTS.md, Leaderboard); ISONet's code trains its nets without BN at 0.01. delta-tanh, without
# BN, trained at all three lrs probed and keeps 0.1.
LEADERBOARD_METHODS: dict[str, tuple[str, list[str]]] = {
    "l2": ("msra + L2 (baseline, rerun here)", L2),
    "delta-ortho-mod": ("delta-orthogonal init + orthonormality + modulation (tau 1)",
                        ["--init", "delta-orthogonal", "--reg", "ortho", *mod(1.0, "always")]),
    "isonet-bn": ("ISONet: Dirac init + SReLU + conv-orthogonality 1e-4 + L2 1e-4, with BN", list(ISONET)),
    "dirac-param": ("DiracNets: Dirac parametrization + L2 (folded for evaluation)",
                    ["--parametrization", "dirac", "--reg", "l2"]),
    "delta-l2": ("delta-orthogonal init + L2", ["--init", "delta-orthogonal", "--reg", "l2"]),
    "srip": ("orthonormal init + SRIP", ["--init", "orthonormal", "--reg", "srip"]),
    "conv-ortho": ("orthonormal init + conv-orthogonality 1e-4",
                   ["--init", "orthonormal", "--reg", "conv-ortho", "--reg-coeff", "1e-4"]),
    "isonet": ("ISONet without BN, lr 0.01", [*ISONET, "--norm", "none", "--lr", "0.01"]),
    "delta-ortho": ("delta-orthogonal init + orthonormality", ["--init", "delta-orthogonal", "--reg", "ortho"]),
    "tat": ("TAT: transformed leaky ReLU + SUO-delta init, no BN, L2, lr 0.01",
            ["--activation", "tat", "--norm", "none", "--init", "suo-delta", "--reg", "l2", "--lr", "0.01"]),
    # added 2026-11-26 (Mishkin & Matas 2016; docs/METHOD-NOTES.md, LSUV), after the rows above in the queue
    "lsuv": ("LSUV: orthonormal init scaled to unit output variance per layer, no BN, L2, lr 0.01",
             ["--init", "lsuv", "--norm", "none", "--reg", "l2", "--lr", "0.01"]),
    # added 2026-11-26 (Balduzzi et al. 2017; docs/METHOD-NOTES.md, Looks-linear), after LSUV in the queue
    "looks-linear": ("looks-linear: CReLU + mirrored orthonormal init, L2",
                     ["--activation", "crelu", "--init", "looks-linear", "--reg", "l2"]),
    # added 2026-11-27 (Xiao et al. 2018's own setting: tanh, no BN, delta-orthogonal init at gain 1,
    # tanh's critical point with zero biases; docs/METHOD-NOTES.md, tanh), after looks-linear in the queue
    "delta-tanh": ("Xiao et al.: delta-orthogonal init + tanh, no BN, L2",
                   ["--activation", "tanh", "--norm", "none", "--init", "delta-orthogonal", "--reg", "l2"]),
    # added 2026-11-27: the paper's modulation on the best row (ISONet without BN, whose errors end the
    # least even of any row), after delta-tanh in the queue
    "isonet-mod": ("ISONet without BN, lr 0.01, + modulation (tau 1)",
                   [*ISONET, "--norm", "none", "--lr", "0.01", *mod(1.0, "always")]),
    # added 2026-11-27: the best row at a larger lr with a warm-up (its lr 0.01 was chosen from
    # 150-step probes, where 0.03 lost to it and 0.1 diverged at step 10; ISONet's own ImageNet
    # configs warm up, docs/METHOD-NOTES.md), after isonet-mod in the queue
    "isonet-lr0.03-warm": ("ISONet without BN, lr 0.03 warmed up over the first epoch",
                           [*ISONET, "--norm", "none", "--lr", "0.03", "--warmup-steps", "390"]),
}
# 150-iteration probes of the rows not yet run when the queue was set (2026-11-26), at the row's
# setting and at the ones it replaced (RESULTS.md, Leaderboard: why conv-orthogonality takes 1e-4
# and the rows without BN lr 0.01)
PROBE_VARIANTS = {"l2": {"": None}, "dirac-param": {"": None}, "srip": {"": None},
                  "conv-ortho": {"-coeff0.1": ("--reg-coeff", "0.1"), "": None},
                  "isonet": {"-lr0.1": ("--lr", "0.1"), "-lr0.03": ("--lr", "0.03"), "": None},
                  "tat": {"-lr0.1": ("--lr", "0.1"), "-lr0.03": ("--lr", "0.03"), "": None},
                  "lsuv": {"-lr0.1": ("--lr", "0.1"), "": None}, "looks-linear": {"": None},
                  "delta-tanh": {"-lr0.03": ("--lr", "0.03"), "-lr0.01": ("--lr", "0.01"), "": None},
                  "isonet-mod": {"": None}}
PROBE_OF = {f"lb-probe-{key}{suffix}-s0": (key, change)  # probe -> (row, the setting changed or None)
            for key, variants in PROBE_VARIANTS.items() for suffix, change in variants.items()}
PROBES = {name: [*C10, "--model", "plain44", "--iterations", "150", "--seed", "0",
                 *(setting(LEADERBOARD_METHODS[key][1], *change) if change else LEADERBOARD_METHODS[key][1])]
          for name, (key, change) in PROBE_OF.items()}
EXPERIMENTS.update(PROBES)
# Each screening row's seed 0, then at once its seeds 1 and 2, which run only where the row decides
# the ranking (checked by `run` when the queue reaches them): its seed 0 completed no more than
# DECIDING_MARGIN points below the best row with RECIPE_MIN_SEEDS seeds, or above it. A promising
# row is thus confirmed before the next one is screened. The baseline rerun needs no more seeds.
DECIDING_MARGIN = 3.0
# Issue 15's budget per depth (epochs), the one table the leaderboard, the depth runs and the
# depth table's labels read
DEPTH_EPOCHS = {20: "10", 44: "10", 110: "4"}
SCREENING = {f"lb-plain44-{key}-s{seed}": c10("plain44", DEPTH_EPOCHS[44], str(seed), flags)
             for key, (_, flags) in LEADERBOARD_METHODS.items() for seed in ((0,) if key == "l2" else (0, 1, 2))}
CONDITIONAL_SEEDS = {name: flags for name, flags in SCREENING.items() if not name.endswith("-s0")}
EXPERIMENTS.update(SCREENING)

# the rows already measured by experiments 1 and 2, in the leaderboard under their own names
LEADERBOARD_EXISTING = {"e1-plain44-l2": "msra + L2 (baseline, experiment 1)",
                        "e1-plain44-ortho": "the paper: orthonormal init + orthonormality",
                        "e2-plain44-ortho-mod": "the paper: orthonormality + modulation (tau 1)",
                        "e2-resnet44-l2": "reference: resnet-44, msra + L2"}
LEADERBOARD_REFERENCE = "e2-resnet44-l2"  # the residual net: the gap column's zero, not a candidate
LEADERBOARD_ROWS = {**LEADERBOARD_EXISTING, **{f"lb-plain44-{key}": label for key, (label, _) in
                                              LEADERBOARD_METHODS.items()}}

# Experiment 4 (and 2's plain-110 rows): plain-110 with orthonormality, by modulation setting
PLAIN110_ROWS = {"e2-plain110-ortho": "none",
                 "e2-plain110-ortho-warmup": "none; lr warmed up from 0.01 to 0.1 over 400 iterations",
                 "e2-plain110-ortho-mod": "paper's rule, tau 2, first 400 iterations",
                 "e4-plain110-ortho-modtop": "our top rule, tau 2, first 400 iterations",
                 "e4-plain110-ortho-mod-tau1.1-always": "paper's rule, tau 1.1, always",
                 "e4-plain110-ortho-mod-tau1-until400": "every layer (tau 1), first 400 iterations",
                 "e4-plain110-ortho-mod-tau1-until780": "every layer (tau 1), first 780 iterations (first lr phase)",
                 "e4-plain110-ortho-mod-always": "every layer (tau 1), always",
                 "e2-plain110-l2": "reference: msra + L2, no modulation"}

# Issue 15, items 2 and 3: the runs of each method at each depth (the baseline's and the paper's
# from experiments 1, 2 and 4; a screening method's `dp-` runs, queued below), by method key
PAPER_METHODS = {"ortho": ("the paper: orthonormal init + orthonormality", ORTHO),
                 "ortho-mod": ("the paper: orthonormality + modulation (tau 1)", [*ORTHO, *mod(1.0, "always")])}
DEPTH_BUDGETS = {depth: f"{epochs} epochs" for depth, epochs in DEPTH_EPOCHS.items()}
DEPTH_RUNS = {"l2": {20: "e2-plain20-l2", 44: "e1-plain44-l2", 110: "e2-plain110-l2"},
              "ortho": {20: "e2-plain20-ortho", 44: "e1-plain44-ortho", 110: "e2-plain110-ortho"},
              "ortho-mod": {20: "e2-plain20-ortho-mod", 44: "e2-plain44-ortho-mod", 110: "e4-plain110-ortho-mod-always"},
              **{key: {20: f"dp-plain20-{key}", 44: f"lb-plain44-{key}", 110: f"dp-plain110-{key}"}
                 for key in LEADERBOARD_METHODS if key != "l2"}}
RESNET_DEPTH_RUNS = {20: "e2-resnet20-l2", 44: "e2-resnet44-l2", 110: "e2-resnet110-l2"}
RESNET_LABEL = "residual, msra + L2"  # its line and column in the depth figure and tables
ROW_METHOD = {"e1-plain44-l2": "l2", "e1-plain44-ortho": "ortho", "e2-plain44-ortho-mod": "ortho-mod",
              **{f"lb-plain44-{key}": key for key in LEADERBOARD_METHODS}}  # plain-44 row -> method key
METHOD_LABELS = {**{key: label for key, (label, _) in {**PAPER_METHODS, **LEADERBOARD_METHODS}.items()},
                 "l2": "msra + L2"}
METHOD_FLAGS = {key: flags for key, (_, flags) in {**PAPER_METHODS, **LEADERBOARD_METHODS}.items()}

# Runs the queue starts only if the ranking calls for them when it reaches them: name -> the test,
# given the runs known then (`_queue_runs`): the conditional seeds above, the depth and 4x-budget
# runs below. `run` skips the others; `list` marks them.
CONDITIONS: dict = {name: lambda runs, name=name: _decides(name, runs) for name in CONDITIONAL_SEEDS}

# Item 2: the depth runs of a screening method that is one of the best two: two seeds at 20
# layers, three at 110 (since 2026-11-27), so that its plain-110 row can decide `plain110-best`
# (RECIPE_MIN_SEEDS); the third seed is queued after the second
DEPTH_SEEDS = {20: ("0", "1"), 110: ("0", "1", "2")}
for _key in LEADERBOARD_METHODS:
    if _key == "l2":
        continue
    for _depth, _seeds_at_depth in DEPTH_SEEDS.items():
        for _seed in _seeds_at_depth:
            _name = f"dp-plain{_depth}-{_key}-s{_seed}"
            EXPERIMENTS[_name] = c10(f"plain{_depth}", DEPTH_EPOCHS[_depth], _seed, METHOD_FLAGS[_key])
            CONDITIONS[_name] = lambda runs, key=_key: key in top_methods(runs)

# Item 3: the best plain-44 method and the paper's against resnet-44 at 4x the leaderboard's budget
# (40 epochs), two seeds, seed by seed so that a comparison is complete early. The paper's method
# always runs; a screening method only if it is the best.
X4_EPOCHS = str(4 * int(DEPTH_EPOCHS[44]))
for _seed in ("0", "1"):
    EXPERIMENTS[f"x4-plain44-ortho-mod-s{_seed}"] = c10("plain44", X4_EPOCHS, _seed, METHOD_FLAGS["ortho-mod"])
    EXPERIMENTS[f"x4-resnet44-l2-s{_seed}"] = c10("resnet44", X4_EPOCHS, _seed, L2)
    for _key in [k for k in METHOD_FLAGS if k != "ortho-mod" and k != "l2"]:
        _name = f"x4-plain44-{_key}-s{_seed}"
        EXPERIMENTS[_name] = c10("plain44", X4_EPOCHS, _seed, METHOD_FLAGS[_key])
        CONDITIONS[_name] = lambda runs, key=_key: top_methods(runs, 1) == [key]

# Presets whose comments quote committed runs: the runs they quote (issue 12's depth demo);
# tests/test_experiments_script.py holds each preset's method and budget to those runs
PRESET_EVIDENCE = {"depth-demo": "e4-plain110-ortho-mod-always", "depth-demo-l2": "e2-plain110-l2"}

# Issue 15, item 4: the recommended recipe per depth, a preset each, and the rows it is chosen from:
# the candidate with the best mean final test accuracy among those run with at least
# RECIPE_MIN_SEEDS seeds, every one completed (tests/test_experiments_script.py holds the presets to it)
RECIPE_MIN_SEEDS = 3
# plain-110: section 4's rows and, since 2026-11-27, each leaderboard method's depth runs
DEPTH110_ROWS = {f"dp-plain110-{key}": label for key, (label, _) in LEADERBOARD_METHODS.items() if key != "l2"}
RECIPES = {"plain44-best": [base for base in LEADERBOARD_ROWS if base != LEADERBOARD_REFERENCE],
           "plain110-best": [*PLAIN110_ROWS, *DEPTH110_ROWS]}
RECIPE_LABELS = {"plain44-best": LEADERBOARD_ROWS,  # how each row is labelled
                 "plain110-best": {**PLAIN110_ROWS, **DEPTH110_ROWS}}
RECIPE_REFERENCE = {"plain44-best": LEADERBOARD_REFERENCE, "plain110-best": "e2-resnet110-l2"}  # the residual net


# the runs of 2026-11-25, each report with the runs it is compared with
LATER = ("e4-plain110-ortho-modtop-s1", "e4-plain110-ortho-modtop-s2", "e4-plain110-ortho-mod-tau1.1-always-s0",
         "e4-plain110-ortho-mod-tau1.1-always-s1", "t2-plain110-adadelta-4ep-s1")
LATER_RULES = ["e4-plain110-ortho-modtop-s0", *(n for n in LATER if n.startswith("e4-")),
               *(f"e4-plain110-ortho-mod-always-s{seed}" for seed in range(3))]
LATER_ADADELTA = ["t2-plain110-adadelta-4ep-s0", "t2-plain110-adadelta-4ep-s1",
                  *(f"e4-plain110-ortho-mod-always-s{seed}" for seed in range(3))]


def _status(name: str) -> str | None:
    """The run's status here, else that of its collected copy (a fresh clone has no runs/)."""
    summary = _summary(name)
    return None if summary is None else summary["status"]


def _run_folder(name: str) -> Path | None:
    """The run's own folder if it is here, else its collected copy (no checkpoint there: no Fig. 6); None if neither."""
    for folder in (RUNS / name, COLLECTED / name):
        if (folder / "summary.json").exists():
            return folder
    return None


def _summary(name: str) -> dict | None:
    """The run's summary here, else its collected copy's."""
    folder = _run_folder(name)
    return None if folder is None else json.loads((folder / "summary.json").read_text())


def _queue_runs() -> dict[str, dict]:
    """Every experiment with a summary, here or collected: what the queue's decisions read."""
    return {name: {"summary": summary} for name in EXPERIMENTS if (summary := _summary(name)) is not None}


def _decides(name: str, runs: dict[str, dict]) -> bool:
    """Whether a conditional seed runs: its row's seed 0 completed within DECIDING_MARGIN points
    of the best row with RECIPE_MIN_SEEDS seeds among ``runs``, or above it."""
    first = _summary(_base(name) + "-s0")
    if first is None or first["status"] != "completed":
        return False
    best = best_row(RECIPES["plain44-best"], runs)
    return best is None or 100 * first["final_test_acc"] >= best[1] - DECIDING_MARGIN


def _runs_now(name: str) -> bool:
    """Whether the queue starts ``name`` now: unconditional, or its condition holds."""
    return name not in CONDITIONS or CONDITIONS[name](_queue_runs())


def _selected(name: str, only: str | None) -> bool:
    """Whether ``--only`` picks the experiment: no filter, or a name containing one of its
    comma-separated substrings (``lb-,dp-,x4-``: those groups, in the queue's order)."""
    return not only or any(part and part in name for part in only.split(","))


def run(only: str | None) -> None:
    for name, flags in EXPERIMENTS.items():
        if not _selected(name, only):
            continue
        status = _status(name)
        if status in FINISHED:
            print(f"{name}: {status}, skipped", flush=True)
            continue
        if not _runs_now(name):
            why = (f"seed 0 of its row did not complete within {DECIDING_MARGIN} points of the best"
                   if name in CONDITIONAL_SEEDS else "its method is not among those the ranking picks")
            print(f"{name}: {why}, skipped", flush=True)
            continue
        if not (RUNS / name / "checkpoint.pt").exists() and (COLLECTED / name / "checkpoint.pt").exists():
            unpark(name)
        if (RUNS / name / "checkpoint.pt").exists():
            cmd = [sys.executable, "-m", "orthomod", "train", "--resume", str(RUNS / name), "--no-progress"]
        else:
            shutil.rmtree(RUNS / name, ignore_errors=True)
            cmd = [sys.executable, "-m", "orthomod", "train", *flags, *BASE, "--out", str(RUNS), "--name", name]
        print("$", " ".join(cmd), flush=True)
        code = subprocess.call(cmd)
        if code == EXIT_DIVERGED:  # a result, recorded in its summary.json: the queue goes on
            print(f"{name}: diverged (exit code {code}), recorded", flush=True)
        elif code != 0:
            print(f"{name}: exit code {code}; stopping the queue", flush=True)
            sys.exit(code)


RUN_FILES = ("config.json", "summary.json", "metrics.jsonl", "diagnostics.jsonl")  # what `collect` copies
FINISHED = ("completed", "diverged")  # statuses of a run that `run` skips; any other resumes from a checkpoint
KEEP_FINAL = ("f-",)  # runs whose last checkpoint `collect` keeps once finished: issue 18's full-protocol
# rows, so that their Fig. 6 and `orthomod analyze` work on a fresh clone (5.4 MB per plain-44, 14 per plain-110)


def command(name: str) -> str:
    """The exact `orthomod train` command of experiment ``name``, as the queue starts it (less --out/--name)."""
    return "orthomod train " + " ".join([*EXPERIMENTS[name], *BASE])


def collect(park: bool = False) -> None:
    """Copy each run's small files to its collected copy; with ``park``, an unfinished run's checkpoint too,
    and the last checkpoint of a finished run named in KEEP_FINAL.

    The checkpoint is copied (atomically) before the records, so the records are as new as it or
    newer; those written after it are dropped again when the run resumes. A parked checkpoint of a
    run that has since finished is removed, and so is one of a run the queue no longer starts (its
    condition fails with the ranking as it is: `run` skips it), so that the repository does not
    carry checkpoints (14 MB for plain-110) that nothing resumes; should the ranking pick that run
    again, it starts over, and its collected records of the partial run remain. The final weights of
    a KEEP_FINAL run are kept (the paper's headline nets: Fig. 6, `orthomod analyze`); `run` skips it.
    """
    for name in EXPERIMENTS:
        source = RUNS / name
        if not (source / "summary.json").exists():
            continue
        target = COLLECTED / name
        target.mkdir(parents=True, exist_ok=True)
        finished = _status(name) in FINISHED
        abandoned = park and not finished and not _runs_now(name)
        parked = park and not finished and not abandoned and (source / "checkpoint.pt").exists()
        kept = park and finished and name.startswith(KEEP_FINAL) and (source / "checkpoint.pt").exists()
        if parked or kept:
            copy_file(source / "checkpoint.pt", target / "checkpoint.pt")
        elif finished or abandoned:
            if abandoned and (target / "checkpoint.pt").exists():
                print(f"{name}: not parked, the queue skips it now; its parked checkpoint is removed")
            (target / "checkpoint.pt").unlink(missing_ok=True)
        for file in RUN_FILES:
            if (source / file).exists():
                shutil.copy2(source / file, target / file)
        (target / "command.txt").write_text(command(name) + "\n")
        print(f"collected and parked {name}" if parked else f"collected {name} with its final weights" if kept
              else f"collected {name}")


def unpark(name: str) -> None:
    """Rebuild a run's folder from its collected copy and parked checkpoint, for ``--resume``."""
    target = RUNS / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for file in (*RUN_FILES, "checkpoint.pt"):
        if (COLLECTED / name / file).exists():
            shutil.copy2(COLLECTED / name / file, target / file)
    print(f"{name}: resuming from its parked checkpoint ({COLLECTED / name / 'checkpoint.pt'})", flush=True)


def _collected() -> dict[str, dict]:
    runs = {}
    for name in EXPERIMENTS:
        folder = COLLECTED / name
        if (folder / "summary.json").exists():
            probes = []
            if (folder / "diagnostics.jsonl").exists():
                probes = [p for p in map(json.loads, (folder / "diagnostics.jsonl").read_text().splitlines())
                          if p.get("kind") == "diagnostics"]
            config, records = folder / "config.json", RunFolder(folder).records()
            runs[name] = {"summary": json.loads((folder / "summary.json").read_text()),
                          "config": json.loads(config.read_text()) if config.exists() else None,
                          "probes": probes, "probe": probes[-1] if probes else None, "speed": _recent_speed(records),
                          "records": records,
                          "command": (folder / "command.txt").read_text().strip()}
    return runs


def _mean_sd(accs: list[float]) -> str:
    """Mean accuracy in percent, ± the sample standard deviation where there are several seeds."""
    return f"{100 * fmean(accs):.2f}" + (f" ± {100 * stdev(accs):.2f}" if len(accs) > 1 else "")


def _cell(value, percent=False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}" if percent else f"{value:.3f}"


def _all_runs(runs: dict[str, dict]) -> list[str]:
    """One markdown row per collected run: the numbers as measured, with steps, time and date.

    Filter correlation and the error moment ratio are those of the run's last diagnostics line.
    """
    lines = ["| run | status | steps | final test acc (%) | best test acc (%) | final train loss | "
             "filter corr. | q(first)/q(last) | wall time (min) | date |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        s, probe = run["summary"], run["probe"] or {}
        status = s["status"] if s["status"] != "diverged" else f"diverged at step {s['diverged_at_step']}"
        ratio = probe.get("moment_ratio_first_last")
        lines.append(f"| {name} | {status} | {s['step']}/{s['total_steps']} | {_cell(s['final_test_acc'], True)} | "
                     f"{_cell(s['best_test_acc'], True)} | {_cell(s['final_train_loss'])} | "
                     f"{_cell(probe.get('filter_correlation_mean'))} | {'-' if ratio is None else f'{ratio:.3g}'} | "
                     f"{s['wall_time_s'] / 60:.1f} | {s['updated'][:10]} |")
    return lines


# Issue 18: the paper's test accuracy (%) for each full-protocol preset (docs/METHOD-NOTES.md; the
# paper gives none for msra + L2 alone, the baseline its 3-4 points are measured against)
FULL_PROTOCOL_PAPER = {"plain44-ortho": "88.42", "plain44-l2": "-", "plain110-ortho-mod": "81.6",
                       "plain110-ortho-mod-always": "73.5"}


RECENT_WINDOWS = 20  # logging windows (50 steps each in this queue) behind a run's recent speed


def _recent_speed(records: list[dict]) -> float | None:
    """A run's recent training speed in images per second from its metrics records (read with
    RunFolder.records, which skips a line being written while ``list`` reads it, as one cut by a
    crash): the median over its last RECENT_WINDOWS logging windows (each window's clock counts its
    steps only, not evaluation or checkpointing; the median leaves out a window that a pause fell
    into); None before its first window."""
    speeds = [r["images_per_s"] for r in records if r.get("kind") == "train"][-RECENT_WINDOWS:]
    return median(speeds) if speeds else None


def _hours_left(summary: dict, images_per_s: float | None) -> float | None:
    """Hours of training to a run's last step at its recent speed (evaluation and pauses excluded, so
    a lower bound on the wall time); None where either is unknown."""
    batch = (summary.get("settings") or {}).get("batch_size")
    if not images_per_s or not batch or "total_steps" not in summary:
        return None
    return (summary["total_steps"] - summary["step"]) * batch / images_per_s / 3600


def _full_protocol_table(runs: dict[str, dict]) -> list[str]:
    """Issue 18's runs in queue order: steps, test accuracy so far against the paper's, and the
    hours of training left at the run's recent speed."""
    lines = ["| run | paper (%) | steps | final test acc (%) | best test acc (%) | at step | "
             "hours of training left at its recent speed | command |", "|---|---|---|---|---|---|---|---|"]
    for name, flags in EXPERIMENTS.items():
        if not name.startswith("f-"):
            continue
        paper = FULL_PROTOCOL_PAPER[flags[flags.index("--config") + 1]]
        changed = flags[flags.index("--seed") + 2:]  # flags beyond the preset's protocol
        if changed and paper != "-":
            paper += f" (without {' '.join(changed)})"
        if name not in runs:
            lines.append(f"| {name} | {paper} | queued | - | - | - | - | `{command(name)}` |")
            continue
        s = runs[name]["summary"]
        if s["status"] in FINISHED:
            steps, left = (s["status"] if s["status"] == "completed" else f"diverged at step {s['diverged_at_step']}"), "-"
        else:
            steps = f"{s['step']:,} of {s['total_steps']:,}"
            left = "-" if (hours := _hours_left(s, runs[name].get("speed"))) is None else f"{hours:.1f}"
        best_step = "-" if s.get("best_step") is None else f"{s['best_step']:,}"  # none before the first evaluation
        lines.append(f"| {name} | {paper} | {steps} | {_cell(s['final_test_acc'], True)} | "
                     f"{_cell(s['best_test_acc'], True)} | {best_step} | {left} | `{command(name)}` |")
    return lines


def _phases(config: dict, total: int) -> list[tuple[int, float, int, int]]:
    """A run's lr phases from its config: (index from 1, lr, first step exclusive, last step)."""
    bounds = [0, *(round(total * m) for m in config["milestones"]), total]
    return [(k + 1, config["lr"] * config["lr_decay"] ** k, start, end)
            for k, (start, end) in enumerate(zip(bounds, bounds[1:]))]


def _phase_table(runs: dict[str, dict]) -> list[str]:
    """Issue 18, Figs. 2-3 at the paper's budget: per full-protocol run and lr phase (the lr and the
    phase's steps from the run's config), the mean filter correlation at the phase's last probe and
    the first/last error moment ratio, median over the phase's probes (it swings from one probe to
    the next), as far as the run got."""
    lines = ["| run | lr phase | steps | probes | filter corr. at the phase's last probe | "
             "q(first)/q(last), median over the phase |", "|---|---|---|---|---|---|"]
    for name in EXPERIMENTS:
        if not name.startswith("f-") or not runs.get(name, {}).get("probes") or not runs[name].get("config"):
            continue
        for _, lr, start, end in _phases(runs[name]["config"], runs[name]["summary"]["total_steps"]):
            probes = [p for p in runs[name]["probes"] if start < p["step"] <= end]
            if not probes:
                continue
            lines.append(f"| {name} | {lr:g} | {start:,}-{probes[-1]['step']:,} | "
                         f"{len(probes)} | {probes[-1]['filter_correlation_mean']:.4f} | {_median_ratio(probes):.3g} |")
    return lines


# Issue 18: each full-protocol preset compared at equal steps with the run it is measured against
# (the paper's +3-4 points over msra + L2; modulation for the first n iterations against always)
FULL_PROTOCOL_AGAINST = {"plain44-ortho": "plain44-l2", "plain110-ortho-mod": "plain110-ortho-mod-always"}


def _pairs() -> list[tuple[str, str]]:
    """(run, the run it is measured against) for each full-protocol run with a partner of the same
    seed and flags in the queue."""
    pairs = []
    for name, flags in EXPERIMENTS.items():
        preset = flags[flags.index("--config") + 1] if name.startswith("f-") else None
        if preset in FULL_PROTOCOL_AGAINST:
            other = setting(flags, "--config", FULL_PROTOCOL_AGAINST[preset])
            pairs += [(name, o) for o, f in EXPERIMENTS.items() if f == other]
    return pairs


def _x4_seeds() -> list[str]:
    """The seeds of the 40-epoch runs (those of resnet-44's, the reference every row is run beside)."""
    return sorted({_base_seed(n) for n in EXPERIMENTS if n.startswith("x4-resnet44-l2-s")})


def _x4_pairs(runs: dict[str, dict]) -> list[tuple[str, str]]:
    """Issue 15, item 3: per seed, the best method's 40-epoch run against the paper's method's and
    resnet-44's."""
    return [(f"x4-plain44-{key}-s{seed}", f"{other}-s{seed}") for key in top_methods(runs, 1) for seed in _x4_seeds()
            for other in ("x4-plain44-ortho-mod", "x4-resnet44-l2") if other != f"x4-plain44-{key}"]


def _pair_table(runs: dict[str, dict], pairs: list[tuple[str, str]]) -> list[str]:
    """Each pair of runs per lr phase (the phases of the first run's config; both have the same
    milestones, not always the same lr), at the steps where both have been evaluated: the mean,
    lowest and highest test accuracy of each, how many of those evaluations the first run is ahead
    at, the mean training loss of their logging windows at the same steps, and the filter
    correlation of each at the phase's last probe they share (the paper's Fig. 2 puts
    orthonormality's about 2.5 times below msra + L2's), as far as both got."""
    lines = ["| run | against | lr phase (the run's lr) | evaluations at the same steps | test acc (%): run, mean (range) | "
             "against | run ahead at | training loss: run | against | filter corr. at the same step: run | "
             "against | against / run |", "|---" * 12 + "|"]

    def at(name: str, kind: str, key: str, start: int, end: int) -> dict[int, float]:
        return {r["step"]: r[key] for r in runs[name]["records"] if r.get("kind") == kind and start < r["step"] <= end}

    def accs(values: list[float]) -> str:
        return f"{100 * fmean(values):.2f} ({100 * min(values):.2f}-{100 * max(values):.2f})"

    for a, b in pairs:
        if not all(runs.get(n, {}).get("config") for n in (a, b)):
            continue
        for k, lr, start, end in _phases(runs[a]["config"], runs[a]["summary"]["total_steps"]):
            tests = [at(n, "eval", "test_acc", start, end) for n in (a, b)]
            steps = sorted(tests[0].keys() & tests[1].keys())
            if not steps:
                continue
            losses = [at(n, "train", "loss", start, end) for n in (a, b)]
            trained = losses[0].keys() & losses[1].keys()
            probes = [{p["step"]: p["filter_correlation_mean"] for p in runs[n]["probes"] if start < p["step"] <= end}
                      for n in (a, b)]
            shared = max(probes[0].keys() & probes[1].keys(), default=None)
            corr = ("- | - | -" if shared is None else
                    f"{probes[0][shared]:.4f} | {probes[1][shared]:.4f} | {probes[1][shared] / probes[0][shared]:.2f}")
            loss = " | ".join(f"{fmean(l[s] for s in trained):.3f}" if trained else "-" for l in losses)
            span = f"step {steps[0]:,}" if len(steps) == 1 else f"steps {steps[0]:,}-{steps[-1]:,}"
            lines.append(f"| {a} | {b} | {k} ({lr:g}) | {len(steps)} ({span}) | "
                         f"{accs([tests[0][s] for s in steps])} | "
                         f"{accs([tests[1][s] for s in steps])} | {sum(tests[0][s] > tests[1][s] for s in steps)} "
                         f"| {loss} | {corr} |")
    return lines


def _fit_table(runs: dict[str, dict]) -> list[str]:
    """The leaderboard's rows (the residual net included) by final training loss: the loss and
    accuracy of the last logging window of training (augmented batches, BN in training mode) beside
    the final test accuracy, means over the completed seeds; does a row lose on fitting or on
    generalizing?"""
    rows = []
    for base, label in {**LEADERBOARD_ROWS, LEADERBOARD_REFERENCE: RESNET_LABEL}.items():
        done = [r["summary"] for r in _seeds(base, runs) if r["summary"]["status"] == "completed"]
        if done:
            rows.append((fmean(s["final_train_loss"] for s in done), fmean(s["final_train_acc"] for s in done),
                         fmean(s["final_test_acc"] for s in done), label, len(done)))
    lines = ["| method | seeds | final training loss | training acc (%) | test acc (%) | training - test (points) |",
             "|---|---|---|---|---|---|"]
    for loss, train, test, label, n in sorted(rows):
        lines.append(f"| {label} | {n} | {loss:.3f} | {100 * train:.2f} | {100 * test:.2f} | {100 * (train - test):+.2f} |")
    if len(rows) > 2:
        rho = _spearman([row[0] for row in rows], [row[2] for row in rows])
        lines += ["", f"(Spearman rank correlation of final training loss and test accuracy over these {len(rows)} "
                      f"rows: {rho:.3f}.)"]
    return lines


def _spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks (ties get their mean rank)."""
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in order[i:j + 1]:
                out[k] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(x), ranks(y)
    mx, my = fmean(rx), fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


def _x4_table(runs: dict[str, dict]) -> list[str]:
    """Issue 15, item 3: plain-44 at 4x the leaderboard's budget (40 epochs) against the same
    method at 10 epochs: the paper's method, the best method (and any other with a 40-epoch run) and
    resnet-44; per seed the final accuracy or the run's progress, the mean once every seed completed,
    and the gap to resnet-44 at each budget."""
    keys = ["ortho-mod", *top_methods(runs, 1)]
    keys += [key for key in METHOD_FLAGS if key not in keys and _seeds(f"x4-plain44-{key}", runs)]
    rows = {METHOD_LABELS[key]: (DEPTH_RUNS[key][44], f"x4-plain44-{key}") for key in keys}
    rows[RESNET_LABEL] = (RESNET_DEPTH_RUNS[44], "x4-resnet44-l2")

    def mean(base: str) -> tuple[str, float | None]:
        seeds = _seeds(base, runs)
        accs = _accuracies(seeds)
        if not accs or len(accs) != len(seeds):
            return "-", None
        return f"{_mean_sd(accs)} ({len(accs)} seed{'s' if len(accs) > 1 else ''})", fmean(accs)

    def progress(name: str) -> str:
        if name not in runs:
            return "queued"
        s = runs[name]["summary"]
        if s["status"] in UNFINISHED:
            return f"{s['status']}: step {s['step']:,} of {s['total_steps']:,}, {_cell(s['final_test_acc'], True)} so far"
        return _result(runs[name])

    seeds = _x4_seeds()
    (_, ref10), (_, ref40) = mean(RESNET_DEPTH_RUNS[44]), mean("x4-resnet44-l2")
    lines = ["| method | 10 epochs: final test acc (%) | gap to resnet-44 | 40 epochs: "
             + " | ".join(f"seed {seed}" for seed in seeds) + " | 40 epochs: mean (%) | gap to resnet-44 | command (seed 0) |",
             "|---" * (6 + len(seeds)) + "|"]
    for label, (base10, base40) in rows.items():
        (cell10, acc10), (cell40, acc40) = mean(base10), mean(base40)
        gap10 = f"{100 * (acc10 - ref10):+.2f}" if acc10 is not None and ref10 is not None else "-"
        gap40 = f"{100 * (acc40 - ref40):+.2f}" if acc40 is not None and ref40 is not None else "-"
        per_seed = " | ".join(progress(f"{base40}-s{seed}") for seed in seeds)
        lines.append(f"| {label} | {cell10} | {gap10} | {per_seed} | {cell40} | {gap40} | `{command(base40 + '-s0')}` |")
    return lines


def table_blocks(runs: dict[str, dict]) -> dict[str, list[str]]:
    """Every generated table of docs/RESULTS.md by the name of its marker, in the order printed."""
    return {"all-runs": _all_runs(runs),
            "commands": [f"- `{name}`: `{run['command']}`" for name, run in runs.items()],
            "seeds": _seed_table(runs),
            "seeds-plain44": _seed_table(runs, ("e1-plain44", "e2-plain44")),  # experiment 1's accuracy claim
            "depth": _depth_table(runs),
            "table2": _table2(runs),
            "modulation": _modulation_table(runs),
            "figures23": _figures23_table(runs),
            "comparisons": _comparisons(runs),
            "leaderboard": leaderboard(runs),
            "probes": _probe_table(runs),
            "propagation": _propagation_table(runs),
            "propagation-depth": _propagation_depth_table(runs),
            "recipes": _recipes_table(runs),
            "fit": _fit_table(runs),
            "x4": _x4_table(runs),
            "full-protocol": _full_protocol_table(runs),
            "full-protocol-phases": _phase_table(runs),
            "full-protocol-pairs": _pair_table(runs, _pairs()),
            "x4-pairs": _pair_table(runs, _x4_pairs(runs))}


# docs/RESULTS.md holds each table of table_blocks between these two lines, a blank line on each side
# (a new pair may hold nothing yet: `tables --write` fills it)
BEGIN, END = "<!-- generated table: {} (scripts/experiments.py tables) -->", "<!-- end of generated table -->"
_BLOCK = re.compile(re.escape(BEGIN).replace(re.escape("{}"), r"([\w-]+)") + r"\n\n(?:.*?\n\n)??" + re.escape(END), re.S)


def filled(text: str, blocks: dict[str, list[str]]) -> str:
    """``text`` with the table between each pair of markers replaced by its block; a ValueError
    names a block that has no markers and markers that name no block."""
    named = _BLOCK.findall(text)
    unknown = sorted(set(named) - set(blocks))
    missing = [name for name in blocks if name not in named]
    if unknown or missing:
        raise ValueError(f"markers without a table: {', '.join(unknown) or 'none'}; "
                         f"tables without markers: {', '.join(missing) or 'none'}")
    return _BLOCK.sub(lambda m: BEGIN.format(m[1]) + "\n\n" + "\n".join(blocks[m[1]]) + "\n\n" + END, text)


def tables(write: bool = False) -> None:
    """Print every generated table, or (``write``) put each into docs/RESULTS.md between its markers."""
    blocks = table_blocks(_collected())
    if not write:
        print("\n\n".join("\n".join(lines) for lines in blocks.values()))
        return
    try:
        text = filled(RESULTS.read_text(), blocks)
    except ValueError as err:
        sys.exit(f"experiments.py: {RESULTS}: {err}")
    save_text(RESULTS, text)
    print(f"wrote {len(blocks)} tables into {RESULTS}")


def _probe_table(runs: dict[str, dict]) -> list[str]:
    """The 150-step probes: each row's setting and the ones it replaced, test accuracy at the end."""
    lines = ["| row | probe | setting | after 150 steps |",
             "|---|---|---|---|"]
    for name, (key, change) in PROBE_OF.items():
        what = f"{change[0]} {change[1]}" if change else "the row's own"
        lines.append(f"| {LEADERBOARD_METHODS[key][0]} | {name} | {what} | {_result(runs.get(name))} |")
    return lines


def _result(run: dict | None) -> str:
    """Final test accuracy in percent, or how the run ended."""
    if run is None:
        return "not run"
    s = run["summary"]
    if s["status"] == "diverged":
        return f"diverged (step {s['diverged_at_step']})"
    return _cell(s["final_test_acc"], True) if s["status"] == "completed" else s["status"]


def _base(name: str) -> str:
    """The run name without its seed: ``e1-plain44-l2-s3`` -> ``e1-plain44-l2``."""
    return name.rsplit("-s", 1)[0]


def _base_seed(name: str) -> str:
    """The seed in a run's name: ``e1-plain44-l2-s3`` -> ``3``."""
    return name.rsplit("-s", 1)[1]


def _seeds(base: str, runs: dict[str, dict]) -> list[dict]:
    """The collected runs ``<base>-s0``, ``<base>-s1``, ... in seed order."""
    return [runs[n] for n in sorted(runs) if _base(n) == base]


UNFINISHED = ("running", "interrupted")  # a run under way: training now, or stopped for `run` to resume


def _accuracies(seeds: list[dict]) -> list[float]:
    """Final test accuracies of the runs that completed."""
    return [r["summary"]["final_test_acc"] for r in seeds if r["summary"]["status"] == "completed"]


def _seed_cells(seeds: list[dict]) -> str:
    """Per-seed results, then mean, sample standard deviation and spread (max - min) in points."""
    accs = _accuracies(seeds)
    shown = ", ".join(_result(r) for r in seeds)
    if len(accs) < 2 or len(accs) != len(seeds):
        return f"{shown} | - | - | -"
    return f"{shown} | {100 * fmean(accs):.2f} | {100 * stdev(accs):.2f} | {100 * (max(accs) - min(accs)):.2f}"


def _seed_table(runs: dict[str, dict], prefixes: tuple[str, ...] = ("",)) -> list[str]:
    """Runs with more than one seed (whose names start with one of ``prefixes``): final accuracy
    per seed, mean, standard deviation and spread."""
    bases = sorted({_base(n) for n in runs if not n.endswith("-s0") and n.startswith(prefixes)})
    lines = ["| run (seeds 0, 1, ...) | final test acc per seed (%) | mean (%) | std (points) | spread (points) |",
             "|---|---|---|---|---|"]
    for base in bases:
        lines.append(f"| {base} | {_seed_cells(_seeds(base, runs))} |")
    return lines


def _figures23_table(runs: dict[str, dict]) -> list[str]:
    """Experiment 1, per plain-44 run: accuracy and the Fig. 2 and Fig. 3 statistics.

    Filter correlation at iteration 100 and at the end; the first/last error moment ratio as the
    median over the last third of the recorded iterations (it swings from one probe to the next);
    the mean over layers of ||V V^T - I||_F at the end (how far the filters are from orthonormal).
    With modulation the ratio is that of the modulated errors (1 by construction when tau = 1).
    """
    lines = ["| run | final test acc (%) | filter corr. at 100 | filter corr. at end | "
             "q(first)/q(last), median of last third | mean Frobenius norm of VV^T - I at end |",
             "|---|---|---|---|---|---|"]
    for name in sorted(runs):
        if not name.startswith(("e1-", "e2-plain44")):
            continue
        probes = runs[name]["probes"]
        if not probes:
            continue
        residual = probes[-1]["ortho_residual"]
        lines.append(f"| {name} | {_result(runs[name])} | {probes[0]['filter_correlation_mean']:.4f} | "
                     f"{probes[-1]['filter_correlation_mean']:.4f} | {_late_ratio(runs[name])} | "
                     f"{fmean(residual):.2f} |")
    return lines


def _permutation_p(a: list[float], b: list[float]) -> float:
    """Exact two-sided permutation test of the difference of means (every split of the pooled runs)."""
    pooled, observed = a + b, abs(fmean(a) - fmean(b))
    splits = list(combinations(range(len(pooled)), len(a)))
    extreme = 0
    for chosen in splits:
        left = [pooled[i] for i in chosen]
        right = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        extreme += abs(fmean(left) - fmean(right)) >= observed - 1e-12
    return extreme / len(splits)


def _comparisons(runs: dict[str, dict]) -> list[str]:
    """Mean differences between configurations run with several seeds, with a permutation p-value."""
    pairs = [("e1-plain44-ortho", "e1-plain44-l2"), ("e2-plain44-ortho-mod", "e1-plain44-l2"),
             ("e2-plain44-ortho-mod", "e1-plain44-ortho"), ("e1-plain44-ortho-coeff1e-3", "e1-plain44-ortho"),
             ("e4-plain110-ortho-mod-always", "e4-plain110-ortho-mod-tau1-until780"),
             ("e4-plain110-ortho-mod-always", "e4-plain110-ortho-mod-tau1-until400"),
             ("e4-plain110-ortho-mod-always", "e4-plain110-ortho-mod-tau1.1-always")]
    lines = ["| comparison | seeds | mean difference (points) | exact permutation p (two-sided) |",
             "|---|---|---|---|"]
    for first, second in pairs:
        a, b = (_accuracies(_seeds(base, runs)) for base in (first, second))
        if len(a) < 2 or len(b) < 2:
            continue
        diff = 100 * (fmean(a) - fmean(b))
        lines.append(f"| {first} - {second} | {len(a)} and {len(b)} | {diff:+.2f} | {_permutation_p(a, b):.3f} |")
    return lines


def _modulation_table(runs: dict[str, dict]) -> list[str]:
    """Experiment 4: plain-110 with orthonormality, by modulation setting, every seed."""
    lines = ["| run | modulation | final test acc per seed (%) | mean (%) | std (points) | spread (points) |",
             "|---|---|---|---|---|---|"]
    for base, label in PLAIN110_ROWS.items():
        lines.append(f"| {base} | {label} | {_seed_cells(_seeds(base, runs))} |")
    return lines


def _table2(runs: dict[str, dict]) -> list[str]:
    """Experiment 3: final test accuracy (%) and final train loss per optimizer and seed, plain-44 and plain-110."""
    def cell(base: str) -> str:
        seeds = _seeds(base, runs)
        if not seeds:
            return "not run"
        shown = " / ".join(_result(r) for r in seeds)
        losses = [r["summary"]["final_train_loss"] for r in seeds if r["summary"]["status"] == "completed"]
        return f"{shown} ({' / '.join(f'{x:.3f}' for x in losses)})" if losses else shown

    lines = ["| optimizer | plain-44, 2 epochs: acc % per seed (train loss) "
             "| plain-110, 1 epoch: acc % per seed (train loss) |",
             "|---|---|---|"]
    for opt in (*OPTIMIZERS, "ours"):
        label = "ours (ortho + modulation, SGD)" if opt == "ours" else f"{opt} (msra + L2)"
        lines.append(f"| {label} | {cell(f't2-plain44-{opt}')} | {cell(f't2-plain110-{opt}')} |")
    return lines


def _mean_over_seeds(base: str, runs: dict[str, dict]) -> str:
    """One cell: the single run's result, the mean over seeds that all completed, or every seed's outcome."""
    seeds = _seeds(base, runs)
    accs = _accuracies(seeds)
    if len(seeds) > 1 and len(accs) == len(seeds):
        return f"{100 * fmean(accs):.2f} ({len(seeds)} seeds)"
    return " / ".join(_result(r) for r in seeds) or "not run"


def _depth_table(runs: dict[str, dict]) -> list[str]:
    """Experiment 2: final test accuracy (%) by depth and method, the mean where there are several seeds."""
    sweep = depth_sweep(runs)
    lines = ["| depth (budget) | " + " | ".join(sweep) + " |",
             "|---" * (len(sweep) + 1) + "|"]
    for depth, budget in DEPTH_BUDGETS.items():
        cells = (_mean_over_seeds(bases[depth], runs) for bases in sweep.values())
        lines.append(f"| plain-{depth} ({budget}) | " + " | ".join(cells) + " |")
    return lines


def _depth_points(runs: dict[str, dict]) -> dict[str, list[tuple]]:
    """Per line of :func:`depth_sweep`: (depth, mean, lowest, highest final test accuracy in %,
    seeds completed, seeds diverged) for each depth with a run; mean and range None where none completed."""
    points = {}
    for method, bases in depth_sweep(runs).items():
        points[method] = []
        for depth, base in bases.items():
            seeds = _seeds(base, runs)
            if not seeds:
                continue
            accs = [100 * a for a in _accuracies(seeds)]
            diverged = sum(r["summary"]["status"] == "diverged" for r in seeds)
            stats = (fmean(accs), min(accs), max(accs)) if accs else (None, None, None)
            points[method].append((depth, *stats, len(accs), diverged))
    return points


def depth_figure(runs: dict[str, dict], out: Path) -> Path:
    """Issue 15's depth figure: final test accuracy against depth, one line per method (mean over
    seeds, bars from the lowest to the highest seed); a depth where every seed diverged is an x at
    chance (10%)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    sweep = _depth_points(runs)
    for i, (method, points) in enumerate(sweep.items()):
        shift = 1 + 0.015 * (i - (len(sweep) - 1) / 2)  # side by side, so that equal points stay visible
        done = [p for p in points if p[1] is not None]
        line = ax.errorbar([shift * p[0] for p in done], [p[1] for p in done],
                           yerr=[[p[1] - p[2] for p in done], [p[3] - p[1] for p in done]],
                           marker="o", capsize=3, label=method)
        failed = [p[0] for p in points if p[1] is None and p[5]]
        if failed:
            ax.plot([shift * d for d in failed], [10.0] * len(failed), "x", markersize=9, color=line[0].get_color())
    ax.axhline(10.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_xticks(list(DEPTH_BUDGETS), [f"{d}\n({b})" for d, b in DEPTH_BUDGETS.items()])
    ax.minorticks_off()
    ax.set_xlabel("depth (budget)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title("CIFAR-10: accuracy against depth (x: every seed diverged)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "accuracy_vs_depth.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ranking(bases: list[str], runs: dict[str, dict]) -> list[tuple[str, float, int]]:
    """``(base, mean final test accuracy in %, seeds)`` of the ``bases`` run with at least
    RECIPE_MIN_SEEDS seeds, every one completed, best first."""
    scored = []
    for base in bases:
        seeds = _seeds(base, runs)
        accs = _accuracies(seeds)
        if len(seeds) >= RECIPE_MIN_SEEDS and len(accs) == len(seeds):
            scored.append((base, 100 * fmean(accs), len(seeds)))
    return sorted(scored, key=lambda row: -row[1])


def best_row(bases: list[str], runs: dict[str, dict]) -> tuple[str, float, int] | None:
    """The first of :func:`ranking`, or None."""
    ranked = ranking(bases, runs)
    return ranked[0] if ranked else None


def top_methods(runs: dict[str, dict], n: int = 2) -> list[str]:
    """The keys of the ``n`` best plain-44 methods (the baseline aside) by :func:`ranking`."""
    keys = [ROW_METHOD[base] for base, _, _ in ranking(RECIPES["plain44-best"], runs)]
    return [key for key in keys if key != "l2"][:n]


def depth_sweep(runs: dict[str, dict]) -> dict[str, dict[int, str]]:
    """Item 2's lines, label -> {depth: base}: the baseline, the paper's method (orthonormality +
    modulation of every layer, this project's subject, whatever its rank), the best two methods, any
    screening method with a completed `dp-` run (queued while it was one of the best two: a result
    is not hidden when the ranking moves on), in the order of DEPTH_RUNS (the paper's first, so that
    the table keeps its columns), and the residual net."""
    measured = {key for key in LEADERBOARD_METHODS if key != "l2"  # the baseline is always shown
                and any(_accuracies(_seeds(DEPTH_RUNS[key][depth], runs)) for depth in DEPTH_SEEDS)}
    shown = {"ortho-mod", *top_methods(runs), *measured}
    return {METHOD_LABELS["l2"]: DEPTH_RUNS["l2"], **{METHOD_LABELS[key]: DEPTH_RUNS[key] for key in DEPTH_RUNS
                                                      if key in shown},
            RESNET_LABEL: RESNET_DEPTH_RUNS}


def _recipes_table(runs: dict[str, dict]) -> list[str]:
    """Issue 15: which row each recommended preset comes from, and its gap to the residual net."""
    lines = [f"| preset | chosen from | best row with >= {RECIPE_MIN_SEEDS} seeds | its label in its table | "
             "mean final test acc (%) | gap to the residual net (points) |",
             "|---|---|---|---|---|---|"]
    for preset, bases in RECIPES.items():
        ranked = ranking(bases, runs)
        depth = preset.removesuffix("-best").replace("plain", "plain-")
        chosen = f"{len(bases)} {depth} rows ({len(ranked)} with >= {RECIPE_MIN_SEEDS} seeds)"
        if not ranked:
            lines.append(f"| `{preset}` | {chosen} | none yet | - | - | - |")
            continue
        base, mean, seeds = ranked[0]
        reference = RECIPE_REFERENCE[preset]
        accs = _accuracies(_seeds(reference, runs))
        gap = (f"{mean - 100 * fmean(accs):+.2f} ({reference.split('-')[1].replace('resnet', 'resnet-')}, "
               f"{len(accs)} seeds)") if accs else "-"
        lines.append(f"| `{preset}` | {chosen} | {base} | {RECIPE_LABELS[preset][base]} | {mean:.2f} ({seeds} seeds) | "
                     f"{gap} |")
    return lines


def _median_ratio(probes: list[dict]) -> float:
    """q(first)/q(last), the median over ``probes`` (the upper one of an even count): it swings
    from one probe to the next."""
    ratios = sorted(p["moment_ratio_first_last"] for p in probes)
    return ratios[len(ratios) // 2]


def _late_ratio(run: dict) -> str:
    """q(first)/q(last), the median over the last third of the probes (Fig. 3's statistic)."""
    probes = run["probes"]
    return f"{_median_ratio(probes[2 * len(probes) // 3:]):.3g}" if probes else "-"


def step_ratios(*paths: Path) -> dict[str, float]:
    """Method key -> its training step's time over the baseline's, from benchmarks/bench_rows.py's
    outputs (``ROW_TIMES`` unless ``paths``; each interleaved in one process, a later file's rows
    replacing an earlier one's; empty where not measured). A row of SAME_STEP takes the time of the
    row whose step it is."""
    ratios = {}
    for path in paths or ROW_TIMES:
        if path.exists():
            ratios |= {key: row["ratio_to_l2"] for key, row in json.loads(path.read_text())["rows"].items()}
    return ratios | {key: ratios[timed] for key, timed in SAME_STEP.items() if timed in ratios}


# Each method's plain net (and the residual net) of each depth at step 0, before any training: how
# its signal and its errors cross the net (`orthomod analyze propagation`, one batch, fp32), written
# by `propagation` and read by the tables beside the leaderboard and the depth sweep
PROPAGATION = ROOT / "docs" / "results" / "propagation.json"
RESNET_KEY = "resnet"  # the residual net's key among the methods' in PROPAGATION


def propagation_flags() -> dict[int, dict[str, list[str]]]:
    """Depth -> method key -> the `orthomod analyze propagation` flags of its seed-0 net: the flags
    its runs train with (those that build the model, its data and its init are what count)."""
    return {depth: {key: [*C10, "--model", f"plain{depth}", "--seed", "0", *flags]
                    for key, flags in METHOD_FLAGS.items()}
            | {RESNET_KEY: [*C10, "--model", f"resnet{depth}", "--seed", "0", *L2]} for depth in DEPTH_EPOCHS}


def propagation() -> None:
    """Run `orthomod analyze propagation --json` for every method at every depth, write PROPAGATION
    and draw each depth's figure."""
    import torch
    from orthomod.hardware import cpu_model

    depths = {}
    for depth, methods in propagation_flags().items():
        rows = depths[str(depth)] = {}
        for key, flags in methods.items():
            cmd = [sys.executable, "-m", "orthomod", "analyze", "propagation", *flags, "--json"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"experiments.py: {key} at {depth} layers: {done.stderr.strip() or done.stdout.strip()}")
            rows[key] = {"command": f"orthomod analyze propagation {' '.join(flags)}", **json.loads(done.stdout)}
            print(f"{depth:>3} {key:<16} signal last/first {rows[key]['forward_last_over_first']:.3g}, "
                  f"q(first)/q(last) {rows[key]['errors_first_over_last']:.3g}")
    record = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "torch": torch.__version__, "depths": depths}
    save_text(PROPAGATION, json.dumps(record, indent=1) + "\n")
    drawn = [propagation_figure(rows, PROPAGATION.with_name(f"propagation-plain{depth}.png"))
             for depth, rows in depths.items()]
    print(f"wrote {PROPAGATION}, {', '.join(path.name for path in drawn)}")


def propagation_figure(rows: dict[str, dict], path: Path) -> Path:
    """One line per distinct net of ``rows`` (method key -> measurement): methods that start from
    the same net (they differ in regularizer or modulation only) share a line, named by their keys."""
    from orthomod.report import propagation_figure as draw

    groups: list[tuple[list[str], dict]] = []  # (keys, net), in the order each net first appears
    for key, row in rows.items():
        same = next((keys for keys, net in groups
                     if (net["forward"], net["errors"]) == (row["forward"], row["errors"])), None)
        if same is None:
            groups.append(([key], row))
        else:
            same.append(key)
    return draw({", ".join(keys): net for keys, net in groups}, path)


def _measured(path: Path, depth: int) -> dict[str, dict]:
    """PROPAGATION's measurements at one depth, by method key (none before `propagation` ran)."""
    return json.loads(path.read_text())["depths"].get(str(depth), {}) if path.exists() else {}


def _propagation_table(runs: dict[str, dict], path: Path = PROPAGATION) -> list[str]:
    """Per leaderboard row: its net at step 0 beside its seed-0 run's errors at the end and its accuracy."""
    measured = _measured(path, 44)
    lines = ["| method | signal at step 0: E[out^2] last / first conv | errors at step 0: q(first)/q(last) | "
             "q(first)/q(last) at the end (seed 0) | final test acc (%) |", "|---|---|---|---|---|"]
    for base, label in LEADERBOARD_ROWS.items():
        key = RESNET_KEY if base == LEADERBOARD_REFERENCE else ROW_METHOD.get(base)
        if key not in measured or base == "lb-plain44-l2":  # the baseline's rerun: the same net as e1's
            continue
        row, seeds = measured[key], _seeds(base, runs)
        late = _late_ratio(seeds[0]) if seeds else "-"
        lines.append(f"| {label} | {row['forward_last_over_first']:.3g} | {row['errors_first_over_last']:.3g} | "
                     f"{late} | {_mean_over_seeds(base, runs)} |")
    return lines


def _propagation_depth_table(runs: dict[str, dict], path: Path = PROPAGATION) -> list[str]:
    """The depth table's methods and depths: q(first)/q(last) of each net at step 0."""
    keys = {label: key for key, label in METHOD_LABELS.items()} | {RESNET_LABEL: RESNET_KEY}
    sweep = depth_sweep(runs)
    lines = ["| depth | " + " | ".join(sweep) + " |", "|---" * (len(sweep) + 1) + "|"]
    for depth in DEPTH_EPOCHS:
        measured = _measured(path, depth)
        cells = (f"{measured[keys[label]]['errors_first_over_last']:.3g}" if keys[label] in measured else "-"
                 for label in sweep)
        lines.append(f"| plain-{depth} | " + " | ".join(cells) + " |")
    return lines


def leaderboard(runs: dict[str, dict]) -> list[str]:
    """Issue 15: one row per method at plain-44, 10 epochs: accuracy over seeds, gap to the
    residual net, the exact permutation p of the difference to the best row (rows with 2 seeds or
    more, all completed), Fig. 3's moment ratio and Fig. 2's filter correlation at the end (seed
    0), the time per training step against the baseline's (:func:`step_ratios`: measured side by
    side, since the runs ran at different times on a machine whose speed drifts), and the command.
    Seeds not finished (running, or interrupted and due to resume) are counted beside the others
    and left out of the statistics."""
    rows = LEADERBOARD_ROWS
    reference = _accuracies(_seeds(LEADERBOARD_REFERENCE, runs))
    ratios = step_ratios()
    best = best_row(RECIPES["plain44-best"], runs)
    best_accs = _accuracies(_seeds(best[0], runs)) if best else []
    lines = ["| method | seeds | final test acc (%) | gap to resnet-44 (points) | p against the best | q(first)/q(last) | "
             "filter corr. | time per step / baseline | command (seed 0) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for base, label in rows.items():
        seeds = _seeds(base, runs)
        wall = f"{ratios[ROW_METHOD[base]]:.2f}" if ROW_METHOD.get(base) in ratios else "-"
        if not seeds:
            lines.append(f"| {label} | 0 | not run | - | - | - | - | {wall} | "
                         f"`{command(base + '-s0')}` |")
            continue
        first = seeds[0]
        # a seed under way (running, or interrupted by a queue's restart and resumed by it) is counted aside
        ended = [r for r in seeds if r["summary"]["status"] not in UNFINISHED]
        busy = "" if not ended or len(ended) == len(seeds) else f" (+{len(seeds) - len(ended)} unfinished)"
        seeds = ended or seeds
        accs = _accuracies(seeds)
        if accs and len(accs) == len(seeds):
            acc = _mean_sd(accs)
        else:
            acc = " / ".join(_result(r) for r in seeds)
        gap = f"{100 * (fmean(accs) - fmean(reference)):+.2f}" if accs and reference else "-"
        corr = first["probe"]["filter_correlation_mean"] if first["probe"] else None
        if best and base == best[0]:
            p = "the best"
        elif len(accs) >= 2 and len(accs) == len(seeds) and len(best_accs) >= 2:
            p = f"{_permutation_p(accs, best_accs):.3f}"
        else:
            p = "-"
        lines.append(f"| {label} | {len(seeds)}{busy} | {acc} | {gap} | {p} | {_late_ratio(first)} | {_cell(corr)} | {wall} | "
                     f"`{first['command']}` |")
    return lines


def figures(only: str | None = None) -> None:
    """``orthomod report`` over the runs of each experiment group, into docs/results/<group>/.

    In a fresh clone the collected copies stand in for the run folders; they carry everything but
    the checkpoint, so the reports have every figure except Fig. 6 (the first layer's filters).
    Runs queued after a report was drawn go into a report of their own (``LATER``), so that
    drawing it does not redraw the earlier reports without the Fig. 6 of their runs.
    """
    later = {"e4-rules-plain110": LATER_RULES, "t2-adadelta-4ep": LATER_ADADELTA}
    groups = {
        "e1-plain44": [n for n in EXPERIMENTS if n.startswith("e1-") and n.endswith("-s0")],
        "e2-plain110": [n for n in EXPERIMENTS if n.startswith(("e2-plain110", "e4-")) and n.endswith("-s0")
                        and n not in LATER],
        "shapes": [n for n in EXPERIMENTS if n.startswith("s-")],
        "e2-depth": [n for n in EXPERIMENTS if n.endswith("-s0") and n.startswith(("e2-plain20", "e2-plain44",
                                                                                     "e2-resnet"))],
        "t2-plain110": [n for n in EXPERIMENTS if n.startswith("t2-plain110") and n not in LATER],
        "t2-plain44": [n for n in EXPERIMENTS if n.startswith("t2-plain44")],
        "seeds-plain44": [n for n in EXPERIMENTS if n.startswith(("e1-", "e2-plain44-ortho-mod"))],
        "seeds-plain110": [n for n in EXPERIMENTS if n.startswith("e4-plain110-ortho-mod-") and n not in LATER],
        **later,
        # issue 15: the leaderboard's runs (probes, every seed) beside the seed 0 of the rows
        # experiments 1 and 2 measured
        "leaderboard-plain44": [f"{base}-s0" for base in LEADERBOARD_EXISTING] + [n for n in EXPERIMENTS
                                                                                  if n.startswith("lb-")],
        "full-protocol": [n for n in EXPERIMENTS if n.startswith("f-")],
        "x4-plain44": [n for n in EXPERIMENTS if n.startswith("x4-")],
        "depth-sweep-screening": [n for n in EXPERIMENTS if n.startswith("dp-")],
    }
    if not only or only in "depth-sweep":
        print("wrote", depth_figure(_collected(), ROOT / "docs" / "results" / "depth-sweep"))
    for group, names in groups.items():
        if only and only not in group:
            continue
        folders = [str(folder) for folder in map(_run_folder, names) if folder is not None]
        if folders:
            subprocess.check_call([sys.executable, "-m", "orthomod", "report", *folders,
                                   "--out", str(ROOT / "docs" / "results" / group)])


def _progress(name: str) -> str:
    """``list``'s status column: a run's status, with its step where it is not finished and the
    hours of training left at its recent speed."""
    summary = _summary(name)
    if summary is None:
        return "if deciding" if name in CONDITIONAL_SEEDS else "if chosen" if name in CONDITIONS else "-"
    if summary["status"] in FINISHED or "total_steps" not in summary:
        return summary["status"]
    parked = not (RUNS / name / "checkpoint.pt").exists() and (COLLECTED / name / "checkpoint.pt").exists()
    left = "" if (hours := _hours_left(summary, _recent_speed(RunFolder(_run_folder(name)).records()))) is None else f", {hours:.1f} h left"
    return f"{summary['status']} {summary['step']}/{summary['total_steps']}" + (", parked" if parked else "") + left


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("run", "list", "collect", "park", "tables", "figures", "propagation"))
    parser.add_argument("--only", action="append", help="run: runs whose names contain one of these comma-separated "
                        "substrings; repeated, one selection after the other (each in the queue's order); "
                        "figures: a group")
    parser.add_argument("--write", action="store_true", help="tables: write them into docs/RESULTS.md")
    args = parser.parse_args()
    if args.action == "run":
        for only in args.only or [None]:
            run(only)
    elif args.action in ("collect", "park"):
        collect(park=args.action == "park")
    elif args.action == "tables":
        tables(args.write)
    elif args.action == "figures":
        for only in args.only or [None]:
            figures(only)
    elif args.action == "propagation":
        propagation()
    else:
        for name, flags in EXPERIMENTS.items():
            print(f"{name:<34} {_progress(name):<40} orthomod train {' '.join(flags)}")


if __name__ == "__main__":
    main()
