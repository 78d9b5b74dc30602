"""The benchmark's logic, never its speed: the variants train what they say, ratios are paired,
and the committed tables are what the committed raw results give.

Timing belongs to `python -m benchmarks`; here nothing is timed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import measure as M
from benchmarks import variants as V
from benchmarks.report import MODEL_NAMES, analyse, markdown

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@pytest.fixture(scope="module")
def committed() -> dict:
    doc = json.loads((RESULTS / "benchmark.json").read_text())
    doc.pop("analysis", None)
    return doc


def test_committed_markdown_is_what_the_committed_raw_results_give(committed):
    assert markdown(committed, analyse(committed)) == (RESULTS / "benchmark.md").read_text(), (
        "the table is stale: python -m benchmarks.report benchmarks/results/benchmark.json")


def test_targets_use_paired_ratios_of_the_raw_rounds(committed):
    timing = next(t for t in committed["tasks"] if t["spec"]["task"] == "train_timing" and t["model"] == "vit_b16")
    rlrr, lora = timing["variants"]["rlrr"]["wall"], timing["variants"]["lora_r8"]["wall"]
    target = next(t for t in analyse(committed)["targets"] if t["target"] == "ViT-B/16 training step, RLRR / PEFT LoRA r=8")
    ratios = sorted(a / b for a, b in zip(rlrr, lora))
    assert target["measured"] == pytest.approx((ratios[4] + ratios[5]) / 2)  # ten rounds: the middle two
    assert len(rlrr) == len(lora) == 10


def test_the_floor_is_a_row_of_its_own_and_a_target(committed):
    a = analyse(committed)
    for model in ("ViT-S/16", "ViT-B/16"):
        target = next(t for t in a["targets"] if t["target"] == f"{model} training step, RLRR / full FT forward + backward (the floor)")
        timing = next(t for t in committed["tasks"] if t["spec"]["task"] == "floor_ratio" and MODEL_NAMES[t["model"]] == model)
        ratios = sorted(r / f for r, f in zip(timing["variants"]["rlrr"]["wall"], timing["variants"]["full_fwd_bwd"]["wall"]))
        n = len(ratios)
        assert n >= 20 and target["measured"] == pytest.approx((ratios[n // 2 - 1] + ratios[n // 2]) / 2 if n % 2 == 0 else ratios[n // 2])
        assert target["bound"] == "≤ 1.06" and f"{n} rounds of the floor, full FT and RLRR alone" in target["detail"]
    md = (RESULTS / "benchmark.md").read_text()
    assert "Machine: " in md and committed["environment"]["cpu"] in md and committed["environment"]["blas"] in md


def _timing_task(task: str, ratio: float, variants=("full_fwd_bwd", "full", "rlrr"), rounds: int = 4) -> dict:
    """A made-up timing result: every variant 1 s a step, RLRR `ratio` s."""
    row = lambda s: {"wall": [s] * rounds, "cpu": [2 * s] * rounds, "median_s": s, "median_cpu_s": 2 * s, "trainable_params": 1,
                     "phases_s": {"forward": s / 3, "backward": 2 * s / 3, "optimizer": 0.0}}
    return {"spec": {"task": task, "model": "vit_s16"}, "ok": True, "model": "vit_s16", "rounds": rounds, "warmup": 1, "load_before": [1.0],
            "variants": {v: row(ratio if v == "rlrr" else 1.0) for v in variants}}


def test_the_floor_targets_come_from_floor_ratio_when_it_ran(committed):
    """The floor and full-FT targets take the many-round `floor_ratio` task; LoRA's stays with `train_timing`."""
    from benchmarks.report import compare

    doc = {"tasks": [_timing_task("train_timing", 1.2, ("full_fwd_bwd", "full", "rlrr", "lora_r8")), _timing_task("floor_ratio", 1.04, rounds=6)]}
    targets = {t["target"].split("RLRR / ")[1]: t for t in analyse(doc)["targets"]}
    assert targets["full FT forward + backward (the floor)"]["measured"] == pytest.approx(1.04)
    assert targets["full fine-tuning"]["measured"] == pytest.approx(1.04) and "6 rounds" in targets["full fine-tuning"]["detail"]
    assert targets["PEFT LoRA r=8"]["measured"] == pytest.approx(1.2)
    assert "## RLRR at the floor, ViT-S/16" in markdown({**committed, **doc}, analyse(doc))
    rows = compare(doc, {"tasks": [_timing_task("floor_ratio", 1.02)]}).splitlines()[2:]
    assert len(rows) == 2 and "1.040" in rows[0] and "1.020" in rows[0]


def test_the_default_run_measures_the_floor_for_many_rounds():
    from benchmarks.run import parse_args, plan

    floors = {t["model"]: t["rounds"] for t in plan(parse_args([])) if t["task"] == "floor_ratio"}
    assert floors == {"vit_s16": 60, "vit_b16": 40}


def test_paired_ratio_takes_the_ratio_within_each_round():
    # the load doubles in round 2: unpaired medians would mix rounds, paired ratios stay at 1.1
    r = M.paired_ratio([1.1, 2.2, 1.1], [1.0, 2.0, 1.0])
    assert r["median"] == pytest.approx(1.1) and r["min"] == pytest.approx(1.1) and r["max"] == pytest.approx(1.1) and r["n"] == 3
    quartiles = M.paired_ratio([1.0, 2.0, 3.0, 4.0, 5.0], [1.0] * 5)
    assert (quartiles["q25"], quartiles["median"], quartiles["q75"]) == (2.0, 3.0, 4.0)


@pytest.mark.parametrize(
    ("variant", "trainable"),
    [
        ("full", None),  # every parameter
        ("full_fwd_bwd", None),
        ("linear_probe", {"head.weight", "head.bias"}),
        ("dense_floor", {"pos_embed"}),
        ("rlrr", None),
        ("rlrr_eager", None),
        ("rlrr_compiled", None),
        ("rlrr_linears", None),
        ("ssf", None),
    ],
)
def test_variants_train_what_they_say(committed, variant, trainable):
    model = V.TRAIN_VARIANTS[variant](V.build("vit_s16"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if trainable is not None:
        assert names == trainable
    if variant.startswith("rlrr"):
        assert {"head.weight", "head.bias"} <= names
        assert all(n.startswith("head.") or ".rlrr_" in n for n in names)
        linears = [n for n in names if n.endswith("rlrr_s_left")]
        assert len(linears) == 4 * 12  # qkv, proj, fc1, fc2 of 12 blocks
        norms = [n for n in names if "norm" in n.split(".parametrizations")[0] and n.endswith("rlrr_scale")]
        assert len(norms) == (25 if variant in ("rlrr", "rlrr_eager", "rlrr_compiled") else 0)  # paper placement: 2 a block + the final norm
    if variant == "ssf":
        assert all(n.startswith("head.") or n.endswith(("ssf_scale", "ssf_shift")) for n in names)
    timing = next(t for t in committed["tasks"] if t["spec"]["task"] == "train_timing" and t["model"] == "vit_s16")
    assert V.trainable_parameters(model) == timing["variants"][variant]["trainable_params"]


def test_rlrr_variants_differ_only_in_the_path(committed, monkeypatch):
    """The eager-kernel and parametrize ablations compute the same step as the RLRR variant."""
    monkeypatch.setattr(V, "RLRR_KERNELS", "aot_eager")  # the compiled kernels' graphs, without compiling C++ in CI
    torch._dynamo.reset()
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 224, 224), torch.randint(0, V.NUM_CLASSES, (2,))
    grads = []
    for variant in ("rlrr", "rlrr_eager", "rlrr_compiled", "rlrr_parametrize"):
        torch.manual_seed(1)
        model = V.TRAIN_VARIANTS[variant](V.build("vit_s16"))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for other in grads[1:]:
        assert grads[0].keys() == other.keys()
        for n in grads[0]:
            torch.testing.assert_close(grads[0][n], other[n], rtol=1e-4, atol=1e-6, msg=n)


def test_lora_variant_targets_the_same_linears(committed):
    pytest.importorskip("peft")  # the `bench` extra
    model = V.lora(V.build("vit_s16"))
    adapted = {n.rsplit(".lora_A", 1)[0].split("base_model.model.", 1)[1] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert len(adapted) == 48 and all(n.split(".")[-1] in ("qkv", "proj", "fc1", "fc2") and n.startswith("blocks.") for n in adapted)
    timing = next(t for t in committed["tasks"] if t["spec"]["task"] == "train_timing" and t["model"] == "vit_s16")
    assert V.trainable_parameters(model) == timing["variants"]["lora_r8"]["trainable_params"]


def test_the_gpu_command_is_planned_without_a_gpu():
    from benchmarks.run import parse_args, plan

    tasks = plan(parse_args(["--device", "cuda"]))
    assert {t["task"] for t in tasks} >= {"train_timing", "train_memory", "inference"} and not any(t["task"].startswith("big") for t in tasks)
    timing = tasks[0]
    assert (timing["model"], timing["batch"], timing["amp"], timing["device"], timing["rounds"]) == ("vit_b16", 64, "bfloat16", "cuda", 10)
    assert {"full", "full_fwd_bwd", "rlrr", "rlrr_eager", "rlrr_compiled", "rlrr_parametrize"} <= set(timing["variants"])


def test_the_gpu_command_runs_on_cpu_at_ci_size(tmp_path, monkeypatch):
    """`--smoke` is the --device run's tasks at CI size (ViT-Ti at 32², batch 2, bf16 autocast), here in-process."""
    from benchmarks.run import main

    monkeypatch.setattr(V, "RLRR_KERNELS", V.RLRR_KERNELS)  # the run sets it; put it back after
    threads = torch.get_num_threads()
    try:
        code = main(["--device", "cpu", "--smoke", "--in-process", "--kernels", "aot_eager", "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    doc = json.loads((tmp_path / "benchmark.json").read_text())
    assert code == 0, [t.get("error") for t in doc["tasks"] if not t.get("ok")]
    timing = next(t for t in doc["tasks"] if t["spec"]["task"] == "train_timing")
    assert (timing["batch"], timing["amp"], timing["model"]) == (2, "bfloat16", "vit_t16_32")
    assert all(v["faults_per_step"] is not None for v in timing["variants"].values())
    md = (tmp_path / "benchmark.md").read_text()
    assert "RLRR / full FT forward + backward (the floor)" in md and "bfloat16 autocast" in md and md.startswith("# RLRR benchmark")


def test_the_gpu_command_says_when_there_is_no_gpu(capsys):
    from benchmarks.run import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_a_run_in_parts_keeps_every_part_and_the_newest_result_of_a_task():
    from benchmarks.run import merge, parse_args, plan

    assert [t["task"] for t in plan(parse_args(["--tasks", "big_apply_fold", "--models", ""]))] == ["big_apply_fold"]
    env = {"cpu": "x"}

    def part(command, started, *tasks):
        return {"command": command, "started": started, "finished": started, "environment": env, "kernels": "inductor", "skipped": [],
                "tasks": [{"spec": {"task": t, "model": "vit_s16"}, "ok": True, "n": started} for t in tasks]}

    doc = merge(part("a", "1", "train_timing", "gemm_floor"), part("b", "2", "gemm_floor"))
    assert doc["command"] == "a; b" and doc["started"] == "1" and [(t["spec"]["task"], t["n"]) for t in doc["tasks"]] == [("train_timing", "1"), ("gemm_floor", "2")]
    with pytest.raises(SystemExit, match="another machine"):
        merge(part("a", "1"), {**part("b", "2"), "environment": {"cpu": "y"}})


@pytest.mark.parametrize("argv", [["--tasks", "floor_rato"], ["--models", "vit_s16,vit_x"], ["--big", "../vit_h14"]])
def test_a_mistyped_task_or_model_is_refused_before_anything_runs(argv, capsys):
    from benchmarks.run import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2 and "unknown" in capsys.readouterr().err


def test_options_that_select_no_task_write_nothing(tmp_path, capsys):
    from benchmarks.run import main

    assert main(["--models", "", "--big", "", "--tasks", "train_timing", "--out", str(tmp_path)]) == 2
    assert "nothing written" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_compare_puts_two_runs_side_by_side(committed):
    from benchmarks.report import compare

    rows = compare(committed, committed).splitlines()[2:]
    assert rows and all(r.endswith("| yes |") for r in rows)
    assert any("| floor |" in r for r in rows)


def test_own_work_clocks_the_native_and_op_by_op_kernels():
    """The `own_work` task at CI size: both paths ran their kernels, the native loops were built."""
    from benchmarks.tasks import own_work

    out = own_work("vit_t16_32", rounds=1, warmup=1, batch=2)
    assert out["native_failed"] is None and set(out["variants"]) == {"rlrr", "rlrr_eager"}
    for r in out["variants"].values():
        assert 0 < r["median_kernel_s"] < r["median_s"] and 0 < r["share"] < 1


def test_big_apply_fold_reports_the_median_round_against_its_own_yardstick(committed):
    """Each round: apply, random adapters, fold, copies; the median round's ratio is the target, with the first and the range."""
    from benchmarks.tasks import big_apply_fold

    out = big_apply_fold("vit_t16_32", rounds=3, copies=2)
    rounds = out["rounds"]
    assert len(rounds) == 3 and all(len(r["copy_s"]) == 2 for r in rounds)
    for r in rounds:
        assert r["apply_fold_copies"] == pytest.approx((r["apply_s"] + r["fold_s"]) / min(r["copy_s"]))
    assert out["apply_fold_copies"] == sorted(r["apply_fold_copies"] for r in rounds)[1]
    assert out["apply_fold_copies_first"] == rounds[0]["apply_fold_copies"]
    doc = {**committed, "tasks": [{"spec": {"task": "big_apply_fold"}, "ok": True, **out}]}
    a = analyse(doc)
    target = next(t for t in a["targets"] if "apply + fold, in copies" in t["target"])
    assert target["measured"] == out["apply_fold_copies"] and "median of 3 rounds" in target["detail"]
    assert "per round in copies" in markdown(doc, a)


def test_gemm_floor_clocks_one_read_of_each_weight_per_direction(committed):
    """`gemm_floor` at CI size: the reads between the GEMMs are clocked; the targets say what they and RLRR's parts come to."""
    from benchmarks.tasks import gemm_floor

    out = gemm_floor("vit_t16_32", rounds=2, warmup=1, batch=2)
    assert out["layers"] == 48 and len(out["reads"]) == 2 and out["read_s"] == M.median(out["reads"])
    assert 0 < out["read_s"] < out["with_dw_read"]["median_s"] and set(out) >= {"dense", "with_dw", "with_dw_read", "model_floor"}
    out |= {"spec": {"task": "gemm_floor", "model": "vit_s16"}, "ok": True, "model": "vit_s16"}
    tasks = [t for t in committed["tasks"] if not (t["spec"]["task"] == "gemm_floor" and t["model"] == "vit_s16")]
    doc = {**committed, "tasks": tasks + [out]}
    a = analyse(doc)
    target = next(t for t in a["targets"] if t["target"] == "ViT-S/16 training step, RLRR / full fine-tuning")
    floor = a["floor"]["vit_s16"]["rows"]
    expected = floor["full_fwd_bwd"]["x_full"]["median"] * (1 + out["read_s"] / out["model_floor"]["median_s"])
    assert f"with W read once per direction outside the GEMMs {expected:.3f}" in target["detail"]
    assert "with RLRR's measured kernels and optimizer step" in target["detail"]
    assert "clocked between the GEMMs" in markdown(doc, a)
    lora = a["training"]["vit_s16"]["rows"]["full_fwd_bwd"]["x_lora_r8"]["median"]  # RLRR runs the floor's GEMMs: floor / LoRA, paired
    target = next(t for t in a["targets"] if t["target"] == "ViT-S/16 training step, RLRR / PEFT LoRA r=8")
    assert f"lower bound by arithmetic {lora:.3f}" in target["detail"]
