"""The demo, on data made here, on the CPU, in well under a minute:

    python main_train_stage2.py --demo [trainer flags]      # hands over to main() here
    python tools/demo.py [trainer flags]

Under output_dir (default ./output_dir/demo): data/ (synthetic TVL-format data), stage1/ (a tiny random Stage 1),
cache/seed<seed>/ (its features, computed once by cache_features.py's code), all reused when present. Then it trains
as a user would, main_train_stage2.main() with the demo's flags (from the cache, --eval_at_start) followed by any the
user gave, which win, and prints the retrieval metrics before and after training from the run's log.txt.
"""
import glob
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import cache_features  # noqa: E402
import main_train_stage2 as trainer  # noqa: E402
import util.dist as dist  # noqa: E402
from data_stage2 import DataError  # noqa: E402
from stage1 import Stage1Error  # noqa: E402
from util.checkpoint import CheckpointError, folder_lock  # noqa: E402
from util.misc import headline_keys  # noqa: E402

# From the cache a step is the register module alone, so workers would only add start-up time; the inputs are not
# augmented: one encoder pass over each split is all the demo pays for Stage 1.
DEMO = dict(epochs=10, batch_size=32, lr=2e-3, warmup_epochs=1, num_workers=0, print_freq=5, register_width=128,
            device="cpu")
DEMO_SWITCHES = ["--no_augment", "--eval_at_start"]
OUTPUT_DIR = "./output_dir/demo"
CACHE_WORKERS = 2  # image decoding overlaps the encoder forward while caching


def demo_files(output_dir, seed):
    """The inputs the demo writes under output_dir, as trainer flags: one cache per --seed."""
    stage1 = os.path.join(output_dir, "stage1")
    return dict(output_dir=output_dir, datasets_dir=os.path.join(output_dir, "data"),
                stage1_checkpoint=os.path.join(stage1, "tiny_stage1.pth"), clip_model="fluxtalk-tiny",
                clip_pretrained=os.path.join(stage1, "tiny_clip.pt"),
                feature_cache=os.path.join(output_dir, "cache", f"seed{seed}"))


def trainer_argv(argv):
    """The trainer's command line: the demo's flags, then the user's `argv` (argparse keeps a flag's last value, so
    the user's win)."""
    parser = trainer.get_args_parser()
    parser.set_defaults(output_dir=OUTPUT_DIR)
    given, _ = parser.parse_known_args(argv)
    flags = {**demo_files(given.output_dir, given.seed), **DEMO}
    return [a for k, v in flags.items() for a in (f"--{k}", str(v))] + DEMO_SWITCHES + argv


def cache_args(args):
    """cache_features.py's flags for the run's data, Stage 1, modalities, seed (--use_not_contact draws its frames
    with it) and every data-recipe flag given on the command line (the cache must hold what training will read)."""
    argv = ["--output", args.feature_cache, "--splits", "train", "val", "--num_workers", str(CACHE_WORKERS),
            "--datasets", *args.datasets, "--active_modality_names", *args.active_modality_names,
            "--seed", str(args.seed)]
    for k in ("datasets_dir", "stage1_checkpoint", "clip_model", "clip_pretrained", "tactile_model", "device",
              "precision", "text_prompt", "percent_not_contact", "subtract_background", "tactile_background"):
        argv += [f"--{k}", str(getattr(args, k))] if getattr(args, k) is not None else []
    argv += ["--no_text_prompt"] if args.no_text_prompt else []
    for k in ("shuffle_text", "replace_synonyms", "use_not_contact", "color_jitter"):  # --flag / --no-flag / unset
        argv += [] if getattr(args, k) is None else [f"--{k}" if getattr(args, k) else f"--no-{k}"]
    return cache_features.parse_args(argv)


def prepare(args):
    """Every rank, holding output_dir's lock as a run does while it writes there: rank 0 writes the synthetic dataset
    and the tiny Stage 1 (each reused when present) and clears the previous demo run; then all ranks cache the
    features (once; reused when present). The process group started here is the one the trainer joins."""
    dist.init_distributed(args.device)
    with folder_lock(args.output_dir, "--output_dir"):
        if dist.is_main():
            from tools.make_synthetic_tvl import make_synthetic_tvl
            from tools.make_tiny_stage1 import make_tiny_stage1
            files = demo_files(args.output_dir, args.seed)
            if not os.path.isdir(files["datasets_dir"]):  # written whole, then renamed: a folder there is complete
                partial = files["datasets_dir"] + ".partial"
                shutil.rmtree(partial, ignore_errors=True)
                os.replace(make_synthetic_tvl(partial, n_ssvtp=240, n_hct=240, seed=0), files["datasets_dir"])
            make_tiny_stage1(os.path.dirname(files["stage1_checkpoint"]), seed=0)
            print("demo: the tiny Stage 1 is random on purpose (seeded, no pretrained weights): the demo shows Stage 2 "
                  "learning on top of any frozen encoder")
            start_over(args)
        dist.barrier()
        cache_features.run(cache_args(args))


def start_over(args):
    """The demo always starts over: without --resume, the checkpoints of the previous demo run in output_dir go (the
    trainer refuses a folder holding a checkpoint.pth). Only a demo run's: one whose args.json names this Stage 1.
    Another run's folder is left to the trainer's refusal."""
    try:
        with open(os.path.join(args.output_dir, "args.json")) as f:
            previous = json.load(f).get("stage1_checkpoint")
    except (OSError, ValueError):
        return
    if args.resume or not previous or os.path.realpath(previous) != os.path.realpath(args.stage1_checkpoint):
        return
    for path in glob.glob(os.path.join(args.output_dir, "checkpoint*.pth")):
        os.remove(path)


def print_summary(args):
    """The before/after table of the headline metrics and the one-line verdict, read from log.txt: the last
    --eval_at_start line and the last epoch's."""
    with open(os.path.join(args.output_dir, "log.txt")) as f:
        lines = [json.loads(ln) for ln in f if ln.strip()]
    before = [ln for ln in lines if ln.get("eval_at_start")][-1]
    after = lines[-1]
    print(f"\n{'metric':<32}{'before':>10}{'after':>10}")
    for k in headline_keys(args):
        print(f"{k:<32}{before[k]:>10.2f}{after[k]:>10.2f}")
    split = args.eval_split
    chance = 100.0 / after[f"{split}_num_samples"]
    print(f"demo: {split}_mean_r1 before={before[f'{split}_mean_r1']:.2f} after={after[f'{split}_mean_r1']:.2f} "
          f"chance={chance:.2f}", flush=True)


def run(args, argv):
    """Every rank: the inputs, then the trainer (its own entry point: its exit code, one-line errors, the process
    group torn down at its end); rank 0 prints the table. -> the trainer's exit code."""
    prepare(args)
    main_rank = dist.is_main()  # asked before the trainer ends the process group
    code = trainer.main(argv)
    if code == 0 and main_rank:
        print_summary(args)
    return code


def main(argv=None):
    argv = trainer_argv(sys.argv[1:] if argv is None else list(argv))
    args = trainer.parse_args(argv)  # what the trainer will read; a bad flag ends here, before anything is written
    codes = []
    code = dist.run_entry_point(lambda a: codes.append(run(a, argv)), args,
                                [((Stage1Error, DataError, CheckpointError), trainer.EXIT_BAD_INPUT, "error")])
    return code or codes[0]


if __name__ == "__main__":
    sys.exit(main())
