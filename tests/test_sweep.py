"""`python -m pipeline sweep`: subsets shared across methods and nested across sizes, the
summary's mean ± std, and the command end to end on a tiny planted store."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pandas as pd
import pytest
import yaml

from stages.pairs import split_pairs
from stages.sweep import SweepSettings, parse_methods, summarise, summary_markdown
from store import UserError
from tests.helpers import one_line_error, run_cli
from tests.test_csa import store  # noqa: F401  (the planted store fixture: 160 train pairs)


def params_file(tmp_path) -> str:
    params = {
        "common": {"dataset": "toy", "image_model": "img", "text_model": "txt"},
        "align": {"epochs": 3, "batch_size": 64, "out_dim": 8, "lr": 0.01, "warmup_steps": 1,
                  "patience": 0},
        "select": {"n_samples": 100},
        "sweep": {"csa_dim": 4},
    }  # fmt: skip
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


def test_subsets_of_one_seed_are_nested_and_differ_across_seeds():
    image_rows = np.repeat(np.arange(300), 2)  # two captions per image
    for seed in (0, 1):
        drawn = [np.concatenate(split_pairs(image_rows, n, 0.1, seed)) for n in (50, 200, 0)]
        assert [len(d) for d in drawn] == [50, 200, 600]
        assert set(drawn[0]) < set(drawn[1]) < set(drawn[2])
    other = np.concatenate(split_pairs(image_rows, 50, 0.1, 1))
    assert set(other) != set(np.concatenate(split_pairs(image_rows, 50, 0.1, 0)))


def test_summary_mean_and_std_against_a_hand_computation():
    rows = pd.DataFrame(
        {
            "method": ["a", "a", "a", "b", "b", "b", "a"],
            "n_pairs": [10, 10, 10, 10, 10, 10, 0],
            "seed": [0, 1, 2, 0, 1, 2, 0],
            "pairs_used": [10, 10, 10, 10, 10, 10, 99],
            "zs_top1": [50.0, 60.0, 70.0, 10.0, 10.0, 40.0, 80.0],
            "zs_top5": [90.0] * 7,
            "i2t_r1": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 3.0],
            "t2i_r1": [np.nan] * 7,
            "seconds": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],
        }
    )
    summary = summarise(rows).set_index(["method", "n_pairs"])
    for method, values in (("a", [50.0, 60.0, 70.0]), ("b", [10.0, 10.0, 40.0])):
        got = summary.loc[(method, 10)]
        assert got["seeds"] == 3
        assert got["zs_top1_mean"] == pytest.approx(statistics.mean(values))
        assert got["zs_top1_std"] == pytest.approx(statistics.stdev(values))  # sample std
    assert summary.loc[("b", 10), "i2t_r1_std"] == pytest.approx(statistics.stdev([8, 16, 32]))
    single = summary.loc[("a", 0)]
    assert single["seeds"] == 1 and single["pairs_used"] == 99 and np.isnan(single["zs_top1_std"])
    text = summary_markdown(summarise(rows))
    assert "| a | 10 | 10 | 3 | 60.0 ± 10.0 | 90.0 ± 0.0 |" in text
    assert "| a | all | 99 | 1 | 80.0 | 90.0 |" in text  # one seed: no ± at all


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="unknown method"):
        parse_methods("linear-last,mlp-best")
    with pytest.raises(UserError, match="unknown method"):
        parse_methods("csa-similar-rs-unpaired")  # CSA's R_S refinement takes no unpaired rows
    with pytest.raises(UserError, match="give both or neither"):
        SweepSettings(methods=("linear-similar-rs-unpaired",))
    with pytest.raises(UserError, match="twice"):
        parse_methods("csa-last,csa-last")
    with pytest.raises(UserError, match="--workers"):
        SweepSettings(workers=0)
    with pytest.raises(UserError, match="--seeds"):
        SweepSettings(seeds=(1, 1))


def test_sweep_command_end_to_end(store, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "sweep"
    methods = "linear-last,lowrank-similar-rs-unpaired,csa-similar-rs"
    args = ["--params", params_file(tmp_path), "sweep", "--store", str(store), "--out", str(out)]
    args += ["--methods", methods, "--n-pairs", "40,100", "--seeds", "0,1"]
    args += ["--unpaired-images", "toy/test", "--unpaired-texts", "toy/test", "--allow-overlap"]
    code, _, err = run_cli([*args, "--select-dir", str(tmp_path / "sel"), "--workers", "2"], capsys)
    assert code == 0, err
    rows = pd.read_csv(out / "sweep.csv")
    assert len(rows) == 3 * 2 * 2
    assert set(rows["method"]) == set(methods.split(","))
    for column in ("zs_top1", "zs_top5", "i2t_r1", "i2t_r10", "t2i_r1"):
        assert rows[column].between(0, 100).all(), column
    # one subset per (n_pairs, seed), whatever the method; another seed, another subset
    digests = rows.groupby(["n_pairs", "seed"])["pairs_digest"].nunique()
    assert (digests == 1).all()
    assert rows.groupby("n_pairs")["pairs_digest"].nunique().tolist() == [2, 2]
    assert rows.set_index("method").loc["csa-similar-rs", "lambda"].eq(0.3).all()
    assert (rows["pairs_used"] == rows["n_pairs"]).all()
    config = json.loads(
        (out / "runs/n40/seed0/lowrank-similar-rs-unpaired/config.json").read_text()
    )
    assert config["unpaired_images"] == "toy/test" and config["n_unpaired"] == [50, 50]
    summary = (out / "summary.md").read_text()
    assert summary.count("\n|") == 1 + 3 * 2 and " ± " in summary
    assert (out / "scaling.png").stat().st_size > 10_000
    # the parallel run gave the same numbers as the same run in this process
    serial = tmp_path / "serial"
    one = ["--methods", "lowrank-similar-rs-unpaired", "--n-pairs", "40", "--seeds", "1"]
    one += ["--unpaired-images", "toy/test", "--unpaired-texts", "toy/test", "--allow-overlap"]
    code, _, err = run_cli(
        [*args[:6], str(serial), *one, "--select-dir", str(tmp_path / "sel")], capsys
    )
    assert code == 0, err
    again = pd.read_csv(serial / "sweep.csv").iloc[0]
    first = rows.set_index(["method", "n_pairs", "seed"]).loc[
        ("lowrank-similar-rs-unpaired", 40, 1)
    ]
    assert again["zs_top1"] == pytest.approx(first["zs_top1"], abs=1e-3)
    assert again["i2t_r1"] == pytest.approx(first["i2t_r1"], abs=1e-3)
    code, _, err = run_cli([*args, "--seeds", "0,x"], capsys)
    assert code == 2 and "--seeds" in one_line_error(err)
