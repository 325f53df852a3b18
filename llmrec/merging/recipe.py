"""Merge recipes: `llmrec merge RECIPE.yaml [key=value ...]`, a merge that is reproducible from one file.

```yaml
run: {name: multitask-tiny, output_dir: runs}
inputs:                        # training recipes (trained first when their run is not finished) or run directories;
                               # RECIPE_OR_RUN#client=K: client K's personal adapter of a federated run
  - recipes/merging/ranking-tiny.yaml
  - recipes/merging/ctr-tiny.yaml
merge: {method: adamerging}    # the fields of llmrec.merging.MergeConfig
adamerging: {granularity: layer, steps: 100}   # AdaMergingConfig (method adamerging only)
surgery: {steps: 200, rank: 16}                 # SurgeryConfig, optional
```

The merged run is `<run.output_dir>/<run.name>`; a finished one is reported, not merged again. Mistakes name the
file and line (or the override), like training recipes' do.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from llmrec.errors import LLMRecError
from llmrec.logs import get_logger
from llmrec.schema import Section

from .adamerging import AdaMergingConfig
from .static import MergeConfig
from .surgery import SurgeryConfig

logger = get_logger(__name__)


class MergeRunSection(Section):
    name: str = Field(min_length=1, description="The merged run's folder name.")
    output_dir: str = Field("runs", description="Where the merged run's folder goes.")


class MergeRecipe(Section):
    run: MergeRunSection
    inputs: list[str] = Field(min_length=2, description="Training recipes or finished run directories to merge.")
    merge: dict = Field(description="The fields of llmrec.merging.MergeConfig (method, weights, density, ...).")
    adamerging: dict | None = Field(None, description="AdaMergingConfig fields (merge.method: adamerging).")
    surgery: dict | None = Field(None, description="SurgeryConfig fields: add Representation Surgery.")


def load_merge_recipe(path: str | Path, overrides: list[str] | None = None):
    """(recipe, MergeConfig, AdaMergingConfig | None, SurgeryConfig | None) of a merge recipe file."""
    from llmrec.recipe.loader import Places, apply_override, check_dataclass_args, check_section, load_yaml

    path = Path(path)
    if not path.is_file():
        raise LLMRecError("no such merge recipe file.", str(path))
    raw, lines = load_yaml(path)
    places = Places(path, lines)
    for override in overrides or []:
        apply_override(raw, override, places)
    if not isinstance(raw, dict):
        raise LLMRecError("a merge recipe is a mapping with run, inputs and merge.", str(path))
    errors = check_section(MergeRecipe, raw, (), places)
    if not errors:
        for key, config_class in (("merge", MergeConfig), ("adamerging", AdaMergingConfig),
                                  ("surgery", SurgeryConfig)):
            if isinstance(raw.get(key), dict):
                errors += check_dataclass_args(config_class, raw[key], (key,), places)
    if not errors and raw["merge"].get("method") != "adamerging" and raw.get("adamerging"):
        errors.append(f"{places(('adamerging',))}: is for merge.method: adamerging.")
    if errors:
        raise LLMRecError("the merge recipe has problems:\n  " + "\n  ".join(errors))
    recipe = MergeRecipe.model_validate(raw)
    try:
        merge = MergeConfig(**recipe.merge)
        adamerging = AdaMergingConfig(**recipe.adamerging) if merge.method == "adamerging" else None
        surgery = SurgeryConfig(**recipe.surgery) if recipe.surgery is not None else None
    except LLMRecError as err:
        raise LLMRecError(err.message, places(("merge",))) from None
    return recipe, merge, adamerging, surgery


def run_merge_recipe(path: str | Path, overrides: list[str] | None = None) -> Path:
    """Train the recipe's input recipes whose runs are not finished, then merge them; returns the merged run."""
    from llmrec.recipe import load_recipe
    from llmrec.run import train
    from llmrec.rundir import RunDir

    from .runs import CLIENT, merge_runs

    recipe, merge, adamerging, surgery = load_merge_recipe(path, overrides)
    out = Path(recipe.run.output_dir) / recipe.run.name
    if RunDir(out).is_complete():
        logger.info(f"{out} is already merged; delete it to merge again.")
        return out
    run_dirs = []
    for index, source in enumerate(recipe.inputs):
        file, _, client = source.partition(CLIENT)
        suffix = f"{CLIENT}{client}" if client else ""
        if Path(file).suffix in (".yaml", ".yml"):
            training = load_recipe(file)
            run = RunDir(Path(training.run.output_dir) / training.run.name)
            if not run.is_complete():
                logger.info(f"training input {index} ({source}) first")
                if training.federated is not None:
                    from llmrec.federated.run import federate

                    federate(training)
                else:
                    train(training)
            run_dirs.append(f"{run.path}{suffix}")
        elif Path(file).is_dir():
            run_dirs.append(source)
        else:
            raise LLMRecError("neither a training recipe (.yaml) nor a run directory (either may end in "
                              f"{CLIENT}K for a federated run's client K).", f"{path}: inputs.{index}")
    return merge_runs(run_dirs, out, merge, adamerging, surgery)
