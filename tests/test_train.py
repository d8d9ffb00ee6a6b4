"""The training entry point end to end: real torchrun processes, files written, TensorBoard contents, resume, eval."""
import json
import os
import shutil
import subprocess

import pytest
import torch

import main_train_stage2 as main_mod
from conftest import (MAIN, ROOT, TINY_REGISTERS, launch_command, load, main_in_process, read_log, read_tensorboard,
                      stage1_flags)
from util.misc import MODALITIES, modality_pairs, pair_name

PAIRS = [pair_name(a, b) for a, b in modality_pairs(MODALITIES)]
SEED_COMMAND = ["--stage1_checkpoint", "tvl_enc_vittiny.pth", "--batch_size", "64", "--epochs", "100",
                "--num_register_tokens", "4", "--num_overlapping_tokens", "3", "--nested_dropout_rate", "0.5",
                "--complementary_reg_weight", "0.01", "--output_dir", "./output_dir/flux_talk_variant",
                "--datasets_dir", "/data/tvl", "--datasets", "ssvtp", "hct"]


def small_run_flags(tiny_stage1_files, data_dir, out_dir, epochs=2):
    return stage1_flags(tiny_stage1_files) + [
        "--datasets_dir", data_dir, "--device", "cpu", "--output_dir", str(out_dir), "--epochs", str(epochs),
        "--batch_size", "8", *TINY_REGISTERS, "--num_workers", "0", "--print_freq", "2", "--warmup_epochs", "1",
        "--lr", "1e-3", "--save_every", "1"]


def run_training(flags, nproc=1, check=True):
    cmd, env = launch_command(MAIN, nproc)
    proc = subprocess.run(cmd + flags, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def ddp_run(tiny_stage1_files, synthetic_tvl, tmp_path_factory):
    """Two epochs under torchrun --nproc_per_node=2 on CPU (gloo), all three modalities."""
    out = tmp_path_factory.mktemp("ddp_run")
    proc = run_training(small_run_flags(tiny_stage1_files, synthetic_tvl, out), nproc=2)
    return out, proc


@pytest.mark.slow
def test_torchrun_two_processes_writes_every_artifact(ddp_run):
    out, proc = ddp_run
    files = set(os.listdir(out))
    assert {"checkpoint.pth", "checkpoint-best.pth", "checkpoint-0.pth", "checkpoint-1.pth", "log.txt",
            "args.json"} <= files, files
    assert any(f.startswith("events.out.tfevents") for f in files)
    with open(os.path.join(out, "args.json")) as f:
        args = json.load(f)
    assert args["world_size"] == 2 and args["batch_size"] == 8

    log = read_log(out)
    assert [line["epoch"] for line in log] == [0, 1]
    for line in log:
        assert {"epoch", "train_loss", "val_mean_r1"} <= set(line)
        for p in PAIRS:
            assert 0.0 <= line[f"val_{p}_r1"] <= 100.0
            a, b = p.split("_")
            # both directions are kept apart, also for tactile/text (same first letter)
            assert line[f"val_{p}_r1"] == pytest.approx((line[f"val_{p}_{a}2{b}_r1"] + line[f"val_{p}_{b}2{a}_r1"]) / 2)
        # the mean over pairs and directions is what the pairs' means average to
        assert line["val_mean_r1"] == pytest.approx(sum(line[f"val_{p}_r1"] for p in PAIRS) / len(PAIRS))

    # Every file we write loads with weights_only=True; "model" is the trainable state only.
    for name in ("checkpoint.pth", "checkpoint-best.pth", "checkpoint-0.pth", "checkpoint-1.pth"):
        ckpt = load(os.path.join(out, name))
        assert all(not k.startswith(("stage1", "clip", "tactile_encoder")) for k in ckpt["model"])
        assert "register_tokens" in ckpt["model"] and "logit_scale" in ckpt["model"]
    last, best = load(os.path.join(out, "checkpoint.pth")), load(os.path.join(out, "checkpoint-best.pth"))
    assert last["epoch"] == 1 and last["best_val_mean_r1"] == max(line["val_mean_r1"] for line in log)
    best_epoch = max(log, key=lambda line: line["val_mean_r1"])["epoch"]
    assert best["epoch"] == best_epoch


@pytest.mark.slow
def test_torchrun_two_processes_tensorboard_holds_scalars_and_images(ddp_run):
    out, _ = ddp_run
    ea = read_tensorboard(out)
    scalars, images = set(ea.Tags()["scalars"]), set(ea.Tags()["images"])
    expected = {"train/loss", "train/contrastive", "train/comp_l2", "train/comp_div", "train/recon",
                "train/logit_scale", "train/lr", "train/grad_norm", "train/samples_per_s", "train/data_wait_frac",
                "train/max_mem_mb", "train/nested_dropout_rate", "val/mean_r1"}
    for p in PAIRS:
        expected |= {f"train/contrastive_{p}", f"train/r1_{p}", f"val/{p}_r1", f"val/{p}_prefix1_r1",
                     f"affinity/{p}_diagonal", f"affinity/{p}_off_diagonal"}
    for m in MODALITIES:
        expected |= {f"train/comp_l2_{m}", f"train/comp_div_{m}"}
    assert expected <= scalars, expected - scalars
    assert {f"affinity/{p}" for p in PAIRS} | {"val/prefix_curve"} <= images, images
    # keyed by global step: the lr curve has one point per --print_freq steps, increasing steps
    steps = [e.step for e in ea.Scalars("train/lr")]
    assert steps == sorted(steps) and len(set(steps)) == len(steps) and steps[0] > 0
    assert [e.step for e in ea.Scalars("val/mean_r1")][-1] == load(os.path.join(out, "checkpoint.pth"))["global_step"]


@pytest.mark.slow
def test_the_stage1_baseline_is_logged_once_and_affinity_pictures_are_readable(ddp_run):
    out, _ = ddp_run
    log = read_log(out)
    baseline = log[0]["baseline_stage1"]  # the first line carries Stage 1's own numbers on the same split
    assert {"mean_r1", "touch_vision_acc", "touch_language_acc@0.6356", "tactile_vision_r1"} <= set(baseline)
    assert all("baseline_stage1" not in line for line in log[1:])
    ea = read_tensorboard(out)
    tags = set(ea.Tags()["scalars"])
    assert {f"baseline_stage1/val_{k}" for k in baseline} <= tags
    assert [e.step for e in ea.Scalars("baseline_stage1/val_mean_r1")] == [0]
    assert {"val/touch_vision_acc", "val/touch_language_acc@0.6356"} <= tags
    for p in PAIRS:  # one block per sample would be 9 x 9 pixels here: drawn at a readable size
        image = ea.Images(f"affinity/{p}")[-1]
        assert image.width >= 256 and image.height >= 256


@pytest.mark.slow
def test_resume_auto_after_a_finished_epoch_matches_the_uninterrupted_run(ddp_run, tiny_stage1_files,
                                                                          synthetic_tvl, tmp_path):
    """Restart from the end of epoch 0 (as a crash right after it would leave output_dir) and finish under
    torchrun again: weights, optimizer state, schedule position and best metric equal the uninterrupted run's."""
    full, _ = ddp_run
    shutil.copy(os.path.join(full, "checkpoint-0.pth"), os.path.join(tmp_path, "checkpoint.pth"))
    with open(os.path.join(full, "log.txt")) as f:
        first_line = f.readline()
    with open(os.path.join(tmp_path, "log.txt"), "w") as f:
        f.write(first_line)
    proc = run_training(small_run_flags(tiny_stage1_files, synthetic_tvl, tmp_path) + ["--resume", "auto"], nproc=2)
    assert "resumed from" in proc.stdout and "epoch 0" not in proc.stdout.split("resumed from")[1].split("\n", 1)[1]

    a, b = load(os.path.join(full, "checkpoint.pth")), load(os.path.join(tmp_path, "checkpoint.pth"))
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, st in a["optimizer"]["state"].items():
        for name, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][k][name]), (k, name)
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    assert (a["global_step"], a["best_val_mean_r1"]) == (b["global_step"], b["best_val_mean_r1"])
    assert [line["epoch"] for line in read_log(tmp_path)] == [0, 1]


@pytest.mark.slow
def test_eval_only_prints_and_logs_metrics_and_writes_no_checkpoint(ddp_run, tiny_stage1_files, synthetic_tvl,
                                                                     tmp_path, capsys):
    full, _ = ddp_run
    ckpt_path = os.path.join(full, "checkpoint-best.pth")
    # in this process: one process evaluating, as a python launch would (the torchrun evaluation: test_eval.py)
    assert main_in_process(small_run_flags(tiny_stage1_files, synthetic_tvl, tmp_path) +
                           ["--eval_only", "--resume", ckpt_path]) == 0
    assert "mean_r1=" in capsys.readouterr().out
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".pth")]
    (line,) = read_log(tmp_path)
    assert line["eval_only"] is True and line["checkpoint"] == ckpt_path
    # the checkpoint's own validation result comes back (same weights, same split)
    best_line = max(read_log(full), key=lambda x: x["val_mean_r1"])
    assert line["val_mean_r1"] == pytest.approx(best_line["val_mean_r1"])


@pytest.mark.slow
def test_fresh_run_refuses_an_output_dir_that_holds_a_run(ddp_run, tiny_stage1_files, synthetic_tvl, tmp_path,
                                                          capsys):
    full, _ = ddp_run
    shutil.copy(os.path.join(full, "checkpoint.pth"), tmp_path / "checkpoint.pth")
    before = (tmp_path / "checkpoint.pth").read_bytes()
    assert main_mod.main(small_run_flags(tiny_stage1_files, synthetic_tvl, tmp_path)) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --output_dir") and "--resume auto" in line
    assert (tmp_path / "checkpoint.pth").read_bytes() == before and not (tmp_path / "log.txt").exists()


def test_eval_only_without_a_checkpoint_is_refused(tiny_stage1_files, synthetic_tvl, tmp_path, capsys):
    code = main_mod.main(small_run_flags(tiny_stage1_files, synthetic_tvl, tmp_path) + ["--eval_only", "--resume",
                                                                                        "auto"])
    assert code == 2
    assert "error: --eval_only --resume auto: no checkpoint.pth" in capsys.readouterr().err


def test_seed_command_flags_parse_with_those_names():
    args = main_mod.parse_args(SEED_COMMAND)
    assert (args.batch_size, args.epochs, args.num_register_tokens, args.num_overlapping_tokens) == (64, 100, 4, 3)
    assert (args.nested_dropout_rate, args.complementary_reg_weight) == (0.5, 0.01)
    assert args.datasets == ["ssvtp", "hct"] and args.datasets_dir == "/data/tvl"
    assert args.active_modality_names == list(MODALITIES)


def test_complementary_flags_reach_the_loss_and_the_model(tiny_stage1):
    default = main_mod.parse_args(SEED_COMMAND + ["--objective", "mission"])
    loss = main_mod.build_criterion(default)  # the original objective
    assert (loss.reg_weight, loss.reg_terms, loss.l2, loss.recon_weight, loss.residual_weight) == (
        0.01, ("l2", "diversity"), "sum", 0.0, 0.0)
    assert main_mod.build_model(default, tiny_stage1).unwrapped_registers.residual is None
    args = main_mod.parse_args(SEED_COMMAND + ["--objective", "mission", "--complementary_reg_terms", "diversity",
                                               "--complementary_l2", "mean", "--complementary_residual_weight", "0.5"])
    loss = main_mod.build_criterion(args)
    assert (loss.reg_terms, loss.l2, loss.residual_weight) == (("diversity",), "mean", 0.5)
    decoders = main_mod.build_model(args, tiny_stage1).unwrapped_registers.residual
    E = tiny_stage1.embed_dim
    assert sorted(decoders) == sorted(MODALITIES)
    assert all((d.in_features, d.out_features) == (2 * E, E) for d in decoders.values())
    assert main_mod.build_model(args, tiny_stage1).unwrapped_registers.token_decoder is None  # weight 0: none


@pytest.mark.parametrize("target, loss", [("pooled", "cosine"), ("tokens", "cosine"), ("pooled", "infonce")])
def test_token_flags_reach_the_loss_and_the_model(tiny_stage1, target, loss):
    argv = ["--complementary_token_weight", "0.7", "--complementary_token_target", target,
            "--complementary_token_loss", loss]
    args = main_mod.parse_args(SEED_COMMAND + argv)
    criterion = main_mod.build_criterion(args)
    assert (criterion.token_weight, criterion.token_target, criterion.token_loss) == (0.7, target, loss)
    module = main_mod.build_model(args, tiny_stage1).unwrapped_registers
    E, s1 = tiny_stage1.embed_dim, tiny_stage1
    assert sorted(module.token_decoder) == sorted(MODALITIES)
    for m, d in module.token_decoder.items():  # C_m and N_m of Stage 1's tokens of m
        if target == "pooled":
            assert (d.in_features, d.out_features) == (2 * E, s1.feature_dims[m])
        else:
            assert d.queries.shape == (s1.token_counts[m], args.register_width)
            assert d.head.out_features == s1.feature_dims[m]
    decay, no_decay = main_mod.param_groups(module, 0.05)
    no_decay = {id(p) for p in no_decay["params"]}
    for n, p in module.token_decoder.named_parameters():  # learned tokens (queries, slots) as the register tokens
        assert (id(p) in no_decay) == (p.ndim == 1 or n.endswith(("queries", "slots"))), n
    # the token term alone is a complementary objective: the separate pathway then has something to train on
    alone = main_mod.parse_args(SEED_COMMAND + argv + ["--complementary_pathway", "separate",
                                                       "--complementary_reg_weight", "0"])
    assert main_mod.complementary_objective(alone)


NEW_OBJECTIVE_FLAGS = ("objective", "complementary_pathway", "complementary_residual_source",
                       "complementary_difference_weight", "complementary_view_weight", "contrastive_prefixes",
                       "complementary_token_weight", "complementary_token_target", "complementary_token_loss")


def test_objective_mission_is_the_original_objective_and_explicit_flags_override_presets(tiny_stage1):
    plain = vars(main_mod.parse_args(SEED_COMMAND + ["--objective", "mission"]))
    custom = vars(main_mod.parse_args(SEED_COMMAND + ["--objective", "custom"]))
    assert {**custom, "objective": "mission"} == plain  # custom: every flag's own default, the mission's values
    # every flag that existed before the presets keeps its value (those of the SEED_COMMAND and the defaults)
    assert (plain["nested_dropout_rate"], plain["complementary_reg_weight"], plain["complementary_reg_terms"],
            plain["complementary_l2"], plain["complementary_recon_weight"], plain["complementary_residual_weight"]) == (
        0.5, 0.01, ["l2", "diversity"], "sum", 0.0, 0.0)
    assert {k: plain[k] for k in NEW_OBJECTIVE_FLAGS} == {
        "objective": "mission", "complementary_pathway": "shared", "complementary_residual_source": "own",
        "complementary_difference_weight": 0.0, "complementary_view_weight": 0.0, "contrastive_prefixes": "full",
        "complementary_token_weight": 0.0, "complementary_token_target": "pooled", "complementary_token_loss": "cosine"}
    loss = main_mod.build_criterion(main_mod.parse_args(SEED_COMMAND + ["--objective", "mission"]))
    assert (list(loss.prefixes), loss.difference_weight, loss.view_weight, loss.token_weight) == ([3], 0.0, 0.0, 0.0)
    # the preset without the seed command's explicit --nested_dropout_rate 0.5
    base = list(SEED_COMMAND)
    i = base.index("--nested_dropout_rate")
    del base[i:i + 2]
    separate = vars(main_mod.parse_args(base + ["--objective", "separate"]))
    changed = {k: v for k, v in separate.items() if v != plain[k]}
    assert changed == {"objective": "separate", "complementary_pathway": "separate",
                       "complementary_residual_weight": 1.0, "complementary_residual_source": "partner",
                       "contrastive_prefixes": "all", "nested_dropout_rate": 0.0}
    # explicit flags win over the preset, in either order
    for argv in (["--objective", "separate", "--nested_dropout_rate", "0.25", "--contrastive_prefixes", "full"],
                 ["--nested_dropout_rate", "0.25", "--contrastive_prefixes", "full", "--objective", "separate"]):
        args = main_mod.parse_args(base + argv)
        assert (args.nested_dropout_rate, args.contrastive_prefixes, args.complementary_pathway) == (
            0.25, "full", "separate")
    model = main_mod.build_model(main_mod.parse_args(base + ["--objective", "separate"]), tiny_stage1)
    module = model.unwrapped_registers
    assert module.separate and module.residual_source == "partner" and module.comp_tokens.shape[0] == 1
    loss = main_mod.build_criterion(main_mod.parse_args(base + ["--objective", "separate"]))
    assert list(loss.prefixes) == [1, 2, 3] and loss.residual_weight == 1.0 and loss.token_weight == 0.0
    assert module.token_decoder is None  # separate: the token term off, so its loss is the one it always was
    # tokens: separate with the token-level residual (pooled, InfoNCE, partner source) in place of the residual
    tokens = vars(main_mod.parse_args(base + ["--objective", "tokens"]))
    assert vars(main_mod.parse_args(base)) == tokens  # the study's decision (issue 22): tokens is the default objective
    assert {k: v for k, v in tokens.items() if v != separate[k]} == {
        "objective": "tokens", "complementary_residual_weight": 0.0, "complementary_token_weight": 1.0,
        "complementary_token_loss": "infonce"}
    assert (tokens["complementary_token_target"], tokens["complementary_residual_source"]) == ("pooled", "partner")
    model = main_mod.build_model(main_mod.parse_args(base + ["--objective", "tokens"]), tiny_stage1)
    module = model.unwrapped_registers
    assert module.separate and module.residual is None and module.token_decoder is not None


@pytest.mark.parametrize("extra, message", [
    (["--num_overlapping_tokens", "4"], "--num_overlapping_tokens"),
    (["--nested_dropout_rate", "1.0"], "--nested_dropout_rate"),
    (["--nested_dropout_rate", "-0.1"], "--nested_dropout_rate"),
    (["--active_modality_names", "vision", "smell"], "--active_modality_names"),
    (["--active_modality_names", "vision"], "--active_modality_names"),
    (["--precision", "fp8"], "--precision"),
    (["--complementary_reg_weight", "-1"], "--complementary_reg_weight"),
    (["--complementary_residual_weight", "-1"], "--complementary_residual_weight"),
    (["--complementary_reg_terms", "l1"], "--complementary_reg_terms"),
    (["--complementary_l2", "max"], "--complementary_l2"),
    (["--eval_only"], "--eval_only"),
    (["--objective", "best"], "--objective"),
    (["--complementary_pathway", "private"], "--complementary_pathway"),
    (["--complementary_residual_source", "both"], "--complementary_residual_source"),
    (["--complementary_difference_weight", "-1"], "--complementary_difference_weight"),
    (["--contrastive_prefixes", "some"], "--contrastive_prefixes"),
    (["--complementary_pathway", "separate", "--complementary_reg_weight", "0", "--complementary_residual_weight", "0",
      "--complementary_token_weight", "0"], "--complementary_pathway separate"),
    (["--complementary_view_weight", "-1"], "--complementary_view_weight"),
    (["--complementary_view_weight", "1", "--no_augment"], "--complementary_view_weight"),
    (["--complementary_token_weight", "-1"], "--complementary_token_weight"),
    (["--complementary_token_target", "mean"], "--complementary_token_target"),
    (["--complementary_token_loss", "l2"], "--complementary_token_loss"),
    (["--complementary_token_target", "tokens", "--complementary_token_loss", "infonce"],
     "--complementary_token_loss infonce (the tokens preset's) needs --complementary_token_target pooled"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "--device cuda")]))
def test_invalid_values_fail_at_parse_time(extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        main_mod.parse_args(SEED_COMMAND + extra)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
