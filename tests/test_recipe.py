"""Recipe loading: validation against the schema and the real TRL/PEFT dataclasses, overrides, error places."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO, small_recipe, write_recipe

from llmrec.cli import main
from llmrec.errors import LLMRecError
from llmrec.recipe import load_recipe


def _error(tmp_path: Path, recipe: dict | str, overrides=(), instantiate: bool = False) -> str:
    path = tmp_path / "r.yaml"
    if isinstance(recipe, str):
        path.write_text(recipe)
    else:
        write_recipe(path, recipe)
    with pytest.raises(LLMRecError) as err:
        load_recipe(path, overrides, instantiate=instantiate)
    return str(err.value)


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), start=1) if needle in line)


def test_misspelled_top_level_key_names_file_line_and_suggestion(tmp_path):
    recipe = small_recipe(tmp_path)
    recipe["modle"] = recipe.pop("model")
    message = _error(tmp_path, recipe)
    assert f"{tmp_path / 'r.yaml'}:{_line_of(tmp_path / 'r.yaml', 'modle:')}: modle" in message
    assert "Did you mean 'model'?" in message


def test_misspelled_nested_key_in_a_data_source(tmp_path):
    recipe = small_recipe(tmp_path)
    recipe["data"]["source"]["num_userz"] = 10
    message = _error(tmp_path, recipe)
    assert f":{_line_of(tmp_path / 'r.yaml', 'num_userz')}: data.source.num_userz" in message
    assert "Did you mean 'num_users'?" in message


def test_misspelled_trl_argument_is_checked_against_the_real_config(tmp_path):
    recipe = small_recipe(tmp_path)
    recipe["stages"][0]["args"]["learnin_rate"] = 1e-3
    message = _error(tmp_path, recipe)
    assert "stages.0.args.learnin_rate" in message
    assert "SFTConfig" in message and "Did you mean 'learning_rate'?" in message


def test_misspelled_peft_argument(tmp_path):
    recipe = small_recipe(tmp_path)
    recipe["adapter"]["args"]["lora_alpah"] = 8
    message = _error(tmp_path, recipe)
    assert "adapter.args.lora_alpah" in message and "Did you mean 'lora_alpha'?" in message


def test_wrong_value_types(tmp_path):
    recipe = small_recipe(tmp_path)
    recipe["stages"][0]["args"]["max_steps"] = "ten"
    recipe["run"]["seed"] = "abc"
    message = _error(tmp_path, recipe)
    assert "run.seed" in message and "valid integer" in message and "'abc'" in message


def test_wrong_type_of_a_trl_argument(tmp_path):
    recipe = small_recipe(tmp_path)
    recipe["stages"][0]["args"]["max_steps"] = "ten"
    message = _error(tmp_path, recipe)
    assert "stages.0.args.max_steps: expected int, got 'ten'" in message


def test_unknown_trainer_adapter_and_format_get_suggestions(tmp_path):
    recipe = small_recipe(tmp_path)
    recipe["stages"][0]["trainer"] = "stf"
    recipe["adapter"]["method"] = "lroa"
    message = _error(tmp_path, recipe)
    assert "stages.0.trainer" in message and "Did you mean 'sft'?" in message
    assert "adapter.method" in message and "Did you mean 'lora'?" in message
    recipe = small_recipe(tmp_path)
    recipe["data"]["source"]["format"] = "synthetik"
    assert "Did you mean 'synthetic'?" in _error(tmp_path, recipe)


def test_missing_required_key(tmp_path):
    recipe = small_recipe(tmp_path)
    del recipe["model"]
    message = _error(tmp_path, recipe)
    assert ": model: this key is required but missing." in message


def test_overrides_with_dotted_paths_and_yaml_values(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", small_recipe(tmp_path))
    recipe = load_recipe(path, ["stages.0.args.learning_rate=1e-4", "eval.ks=[1, 3]", "run.name=other"],
                         instantiate=False)
    assert recipe.stages[0].args["learning_rate"] == pytest.approx(1e-4)
    assert isinstance(recipe.stages[0].args["learning_rate"], float)
    assert recipe.eval.ks == [1, 3]
    assert recipe.run.name == "other"


def test_a_bad_override_is_named_as_an_override(tmp_path):
    message = _error(tmp_path, small_recipe(tmp_path), ["stages.0.args.learning_rat=1e-4"])
    assert "override 'stages.0.args.learning_rat=1e-4'" in message and "Did you mean 'learning_rate'?" in message
    message = _error(tmp_path, small_recipe(tmp_path), ["stages.3.args.max_steps=1"])
    assert "a list of 1 entries" in message
    message = _error(tmp_path, small_recipe(tmp_path), ["stages"])
    assert "expected key=value" in message


def test_yaml_exponent_floats_and_duplicate_keys(tmp_path):
    text = (REPO / "recipes" / "quickstart.yaml").read_text().replace("learning_rate: 3.0e-3", "learning_rate: 3e-3")
    path = tmp_path / "q.yaml"
    path.write_text(text)
    assert load_recipe(path, instantiate=False).stages[0].args["learning_rate"] == pytest.approx(3e-3)
    duplicated = "run:\n  name: a\n  name: b\nmodel:\n  name: tiny:qwen2-xs\n"
    message = _error(tmp_path, duplicated)
    assert ":3:" in message and "appears twice" in message


def test_reserved_output_dir_and_invalid_yaml(tmp_path):
    recipe = small_recipe(tmp_path)
    recipe["stages"][0]["args"]["output_dir"] = "elsewhere"
    assert "run.output_dir" in _error(tmp_path, recipe)
    assert "not valid YAML" in _error(tmp_path, "run: [unclosed\n")


def test_cross_field_errors_from_trl_are_reported_at_the_stage(tmp_path):
    recipe = small_recipe(tmp_path)
    recipe["stages"][0]["args"]["lr_scheduler_type"] = "cosin"
    message = _error(tmp_path, recipe, instantiate=True)
    assert "stages.0.args" in message and "cosin" in message


def test_unknown_tiny_preset(tmp_path):
    recipe = small_recipe(tmp_path)
    recipe["model"]["name"] = "tiny:qwen2-xxs"
    message = _error(tmp_path, recipe)
    assert "model.name" in message and "Did you mean 'qwen2-xs'?" in message


def test_recipe_show_prints_defaults_and_all_trl_fields(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", small_recipe(tmp_path))
    assert main(["recipe", "show", str(path)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["data"]["source"]["num_genres"] == 8  # a default the file did not set
    assert shown["stages"][0]["args"]["report_to"] == "none"
    assert shown["stages"][0]["args"]["max_steps"] == 6
    assert main(["recipe", "show", str(path), "--all"]) == 0
    every = yaml.safe_load(capsys.readouterr().out)["stages"][0]["args"]
    assert every["adam_beta1"] == pytest.approx(0.9) and every["max_steps"] == 6


def test_recipe_check_cli_exit_codes(tmp_path, capsys):
    recipe = small_recipe(tmp_path)
    good = write_recipe(tmp_path / "good.yaml", recipe)
    assert main(["recipe", "check", str(good)]) == 0
    assert "ok" in capsys.readouterr().out
    recipe["eval"]["kss"] = [5]
    bad = write_recipe(tmp_path / "bad.yaml", recipe)
    assert main(["recipe", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Did you mean 'ks'?" in err and "Traceback" not in err


@pytest.mark.parametrize("path", sorted((REPO / "recipes").rglob("*.yaml")), ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_is_valid(path):
    import yaml

    if "inputs" in yaml.safe_load(path.read_text()):  # a merge recipe (`llmrec merge RECIPE`)
        from llmrec.merging.recipe import load_merge_recipe

        recipe, merge, _, _ = load_merge_recipe(path)
        assert all((REPO / source.partition("#client=")[0]).is_file() for source in recipe.inputs) and merge.method
        return
    recipe = load_recipe(path, instantiate=False)
    assert recipe.stages, "every shipped recipe trains something"


def test_recipe_check_reads_merge_recipes_and_their_inputs(tmp_path, capsys):
    assert main(["recipe", "check", str(REPO / "recipes" / "merging" / "domains-tiny.yaml")]) == 0
    assert "ok (merge recipe: ties of 3 inputs)" in capsys.readouterr().out
    bad_input = tmp_path / "expert.yaml"
    bad_input.write_text((REPO / "recipes" / "merging" / "domain-drama-tiny.yaml").read_text().replace("ks:", "kz:"))
    merge = tmp_path / "merge.yaml"
    merge.write_text(f"run: {{name: m}}\ninputs: [{bad_input}, {bad_input}]\nmerge: {{method: cat}}\n")
    assert main(["recipe", "check", str(merge)]) == 2
    line = bad_input.read_text().splitlines().index("  kz: [5, 10, 20]") + 1
    assert f"expert.yaml:{line}: eval.kz: unknown key 'kz'" in capsys.readouterr().err


def test_stage_data_sections_are_validated_by_the_trainer(tmp_path):
    path = REPO / "recipes" / "causal_dpo" / "tiny.yaml"
    with pytest.raises(LLMRecError, match=r"stages\.1\.data\.negativs: unknown key.*Did you mean 'negatives'\?"):
        load_recipe(path, ["stages.1.data.negativs=3"], instantiate=False)
    with pytest.raises(LLMRecError, match=r"stages\.1\.data\.sampler: .*'uniform', 'popularity' or 'model'"):
        load_recipe(path, ["stages.1.data.sampler=hard"], instantiate=False)
    with pytest.raises(LLMRecError, match=r"stages\.0\.data\.negatives: unknown key .*valid keys are tasks"):
        load_recipe(path, ["stages.0.data={negatives: 2}"], instantiate=False)  # sft's data section lists tasks only
    with pytest.raises(LLMRecError, match=r"stages\.1\.args\.num_enviroments: .*Did you mean 'num_environments'\?"):
        load_recipe(path, ["stages.1.args.num_enviroments=3"], instantiate=False)
    resolved = load_recipe(path, instantiate=False).to_dict()
    assert resolved["stages"][1]["data"]["model_top_k"] == 20 and "data" not in resolved["stages"][0]


def test_ood_splits_need_their_shift(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", small_recipe(tmp_path, eval={"splits": ["test", "ood_temporal"]}))
    with pytest.raises(LLMRecError, match=r"eval\.splits: 'ood_temporal' needs a temporal entry in data\.shifts"):
        load_recipe(path, instantiate=False)
    with pytest.raises(LLMRecError, match=r"data\.shifts\.0: unknown kind 'temporl'.*Did you mean 'temporal'\?"):
        load_recipe(path, ["data.shifts=[{kind: temporl}]"], instantiate=False)
    assert load_recipe(path, ["data.shifts=[{kind: temporal}]"], instantiate=False).data.shifts[0].fraction == 0.2
