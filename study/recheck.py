"""Re-check of the study's conclusions on latent data it never saw, with other probes.

    python study/recheck.py                          # -> study/recheck/ (RESULTS.md, results.json, plots)
    python study/recheck.py --output /tmp/recheck --seeds 3

run_study.py picked the default objective and validated content_gain on its own latent source, with ridge probes.
Here the same code, arms (run_study's --quick plan: the default's arm and control, the mission, the other
presets), decision rule and both settings of the latent-source axis run on a latent source of another structure:
other latent sizes, token count, noise and token spans (HELDOUT_SPEC, HELDOUT_SPANS below, written once before the
first run and never changed, so every random draw differs too), and every probe, the known-factor ones and
content_gain's, is a k-nearest-neighbour one (study/probes.py knn_many, k = 20) instead of ridge: a factor counts
in any smooth form, not only linearly. Nothing here was tuned; whatever the numbers say is reported.
"""
import argparse
import os
import sys
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script from anywhere

from study import latent_tokens, probes, run_study  # noqa: E402

# latent_tokens.SPEC / SPANS of the study: shared 4, 6 classes, specific 4, nuisance 4, 12 tokens, noise 0.3.
HELDOUT_SPEC = dict(shared_dim=6, num_classes=4, specific_dim=3, nuisance_dim=6, num_context=16, noise=0.5)
HELDOUT_SPANS = {"shared": (0.0, 0.6), "class": (0.4, 0.8), "specific": (0.1, 0.5), "nuisance": (0.3, 1.0)}
PREAMBLE = ("**Re-check** (`study/recheck.py`): a latent source the study never used (latent_tokens.SPEC "
            f"{HELDOUT_SPEC}, SPANS {HELDOUT_SPANS}), and every probe, the known-factor ones and content_gain's, is a "
            "k-nearest-neighbour regressor / classifier (k = 20, standardised features; study/probes.py knn_many), "
            "not the ridge probes the text below names. Fixed before the first run; nothing tuned.")


def main(argv=None):
    p = argparse.ArgumentParser("FluxTalk study re-check", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", default=os.path.join(ROOT, "study", "recheck"), help="results folder")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm")
    p.add_argument("--work_dir", default=None, help="data, caches and checkpoints (default: OUTPUT/work)")
    p.add_argument("--smoke", action="store_true", help="tiny everything: checks the plumbing only")
    a = p.parse_args(argv)
    study_argv = ["--quick", "--sources", *run_study.LATENT_SOURCES, "--output", a.output, "--seeds", str(a.seeds),
                  "--lengths"] + (["--work_dir", a.work_dir] if a.work_dir else []) + (["--smoke"] if a.smoke else [])
    command = " ".join(["python study/recheck.py"] + (argv if argv is not None else sys.argv[1:]))
    with mock.patch.dict(latent_tokens.SPEC, HELDOUT_SPEC), mock.patch.dict(latent_tokens.SPANS, HELDOUT_SPANS), \
            mock.patch.object(run_study, "probe_many", probes.knn_many), \
            mock.patch.object(probes, "probe_many", probes.knn_many):
        return run_study.main(study_argv, setting={"command": command, "preamble": PREAMBLE})


if __name__ == "__main__":
    sys.exit(main())
