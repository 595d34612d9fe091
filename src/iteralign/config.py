"""Load, validate, complete and hash an experiment config.

The schema (schemas/config.schema.yaml) is the single source of defaults. The
Snakefile validates with the same file; the CLI re-validates whatever it is given,
so a step run by hand gets the same checks and defaults as one run by Snakemake.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import sys
from importlib import resources
from pathlib import Path

import yaml

from iteralign.errors import UserError
from iteralign.redaction import register_secret_env, secret_env_names
from iteralign.train.objectives import objective_of

SCHEMA_PATH = Path(str(resources.files("iteralign") / "schemas" / "config.schema.yaml"))

# Keys that change where or how fast a job runs, how long its checkpoints are kept
# or where its metrics are sent, but not what it computes; they are left out of the
# config hash so that moving to a cluster (or pruning, or tracking) keeps provenance.
_HASH_EXCLUDED = ("resources", "checkpoints", "tracking")


class ConfigError(UserError):
    """A config that does not match the schema or is inconsistent."""


def load_schema() -> dict:
    # libyaml's parser where PyYAML has it: the same document, read about 8x faster. A user's
    # config keeps the pure-Python parser, whose errors quote the offending line.
    return yaml.load(SCHEMA_PATH.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _validator_with_defaults(schema: dict):
    import jsonschema
    from jsonschema import validators

    base = jsonschema.Draft202012Validator

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    return validators.extend(base, {"properties": set_defaults})(schema)


# YAML 1.1 (PyYAML, and yte which Snakemake uses) reads `5e-7` -- no dot -- as text.
_NUMBER_TEXT = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")
# `snakemake --config section='{key: 1}'` hands nested values over as text.
_INTEGER_TEXT = re.compile(r"^\s*[-+]?\d+\s*$")


def coerce_numbers(config: dict, schema: dict | None = None) -> dict:
    """Turn number-like strings into numbers where the schema expects one (in place).

    Only strings that are a plain decimal or scientific number and sit at a key whose
    schema allows ``number`` (a float) or, for whole numbers, ``integer`` (an int) change;
    everything else is left for validation to judge.
    """
    schema = schema if schema is not None else load_schema()
    return _coerce(config, schema, schema)


def _resolve(sub: dict, root: dict) -> dict:
    ref = sub.get("$ref")
    if ref and ref.startswith("#/"):
        target = root
        for part in ref[2:].split("/"):
            target = target[part]
        return {**target, **{k: v for k, v in sub.items() if k != "$ref"}}
    return sub


def _branches(sub: dict, root: dict) -> list[dict]:
    sub = _resolve(sub, root)
    return [sub] + [_resolve(b, root) for key in ("oneOf", "anyOf") for b in sub.get(key, [])]


def _coerce(node, sub: dict, root: dict):
    branches = _branches(sub, root)
    if isinstance(node, dict):
        for key in list(node):
            children = [b["properties"][key] for b in branches if key in b.get("properties", {})]
            if children:
                node[key] = _coerce(node[key], children[0], root)
        return node
    if isinstance(node, list):
        items = [b["items"] for b in branches if isinstance(b.get("items"), dict)]
        return [_coerce(value, items[0], root) for value in node] if items else node
    if isinstance(node, str) and _NUMBER_TEXT.match(node):
        types = [t for b in branches for t in ([b["type"]] if isinstance(b.get("type"), str) else b.get("type", []))]
        if "integer" in types and _INTEGER_TEXT.match(node):
            return int(node)
        if "number" in types:
            return float(node)
    return node


def _error_path(error) -> str:
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "<top level>"


def _dotted(error, name: str) -> str:
    """The dotted key of ``name`` inside the mapping an error is about."""
    return ".".join([*(str(p) for p in error.absolute_path), name])


def validate(config: dict, source: str = "config") -> dict:
    """Return a completed copy of ``config`` (defaults filled) or raise ConfigError.

    The message names the key (dotted path), what was found and what was expected.
    """
    completed = copy.deepcopy(config) if config is not None else {}
    if not isinstance(completed, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, found {type(config).__name__}")
    schema = load_schema()  # read once: coercion and validation walk the same document
    coerce_numbers(completed, schema)
    validator = _validator_with_defaults(schema)
    # Two passes: the first fills defaults (including whole sections), the second
    # reports errors against the completed document.
    list(validator.iter_errors(completed))
    errors = sorted(validator.iter_errors(completed), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for error in errors:
            key = _error_path(error)
            if error.validator == "additionalProperties":
                known = sorted(error.schema.get("properties", {}))
                unknown = sorted(set(error.instance) - set(known)) if isinstance(error.instance, dict) else []
                key = ", ".join(_dotted(error, name) for name in unknown) or key
                lines.append(f"{source}: key {key}: unknown ({error.message}); known keys here: {', '.join(known)}")
            else:
                found = json.dumps(error.instance, default=str)
                lines.append(f"{source}: key {key}: found {found}: {error.message}")
        raise ConfigError("\n  ".join(lines))  # the first line names the first key
    _check_consistency(completed, source)
    for name in secret_env_names(completed):  # their values are redacted from everything written
        register_secret_env(name)
    return completed


def exit_on_input_error(function, *args, errors: tuple[type[Exception], ...] = (UserError,)):
    """``function(*args)``, or, when it raises one of ``errors`` (input a user can fix), the CLI's one
    line (and hint) on stderr and exit status 2: what the Snakefile calls at parse time, so that
    Snakemake prints neither the schema nor a traceback around it."""
    from iteralign.errors import user_message

    try:
        return function(*args)
    except errors as exc:
        print(user_message("workflow", exc), file=sys.stderr)
        raise SystemExit(2) from None


def validate_workflow_config(config: dict, configfiles: list) -> dict:
    """The Snakefile's config validated and completed (validate()), and what it names outside itself
    checked (check_environment()), its errors naming the config files."""
    source = ", ".join(str(path) for path in configfiles) or "config.yaml"
    completed = exit_on_input_error(validate, config, source)
    exit_on_input_error(check_environment, completed, source)
    return completed


def scorer_sections(config: dict) -> list[tuple[str, dict]]:
    """(key, section) of every scorer a validated config uses: training's, and evaluation's own."""
    sections = [("scoring", config["scoring"])]
    if config["evaluation"]["scorer"] is not None:
        sections.append(("evaluation.scorer", config["evaluation"]["scorer"]))
    return sections


def check_environment(config: dict, source: str = "config") -> None:
    """What a validated config names outside itself is there, before any job runs.

    A Python reward ``module:function`` imports and takes ``(prompt, output)``; every judge's
    API-key variable is set. Raises ConfigError naming the key.
    """
    from iteralign.score.python import load_function

    for key, section in scorer_sections(config):
        if section["scorer"] == "python":
            try:
                load_function(section["python"]["function"], f"{key}.python.function")
            except UserError as exc:
                raise ConfigError(f"{source}: {exc}", exc.hint) from None
        env_name = section["judge"]["api_key_env"]
        if section["scorer"] == "judge" and env_name and not os.environ.get(env_name):
            raise ConfigError(
                f"{source}: {key}.judge.api_key_env: environment variable {env_name} is not set; "
                "expected the judge's API key in it",
                hint=f"export {env_name}=... before the run, or set {key}.judge.api_key_env: null "
                "for a server without keys",
            )


def _check_consistency(config: dict, source: str) -> None:
    """Checks across keys that a JSON schema cannot express clearly."""
    training, feedback = config["training"], config["feedback"]
    accepted = objective_of(training).feedback_types
    if feedback["type"] not in accepted:
        raise ConfigError(
            f"{source}: training.loss={training['loss']!r} needs feedback.type in {sorted(accepted)}, "
            f"found feedback.type={feedback['type']!r}"
        )
    if config["sampling"]["num_samples"] < 2 and feedback["type"] == "pairwise":
        raise ConfigError(
            f"{source}: feedback.type='pairwise' needs sampling.num_samples >= 2, "
            f"found {config['sampling']['num_samples']}"
        )
    sampling = config["sampling"]
    if sampling["temperature"] == 0 and sampling["num_samples"] > 1:
        raise ConfigError(
            f"{source}: sampling.temperature=0 (greedy decoding) gives sampling.num_samples="
            f"{sampling['num_samples']} identical samples; expected temperature > 0 or num_samples: 1"
        )
    if training["max_prompt_length"] >= training["max_length"]:
        raise ConfigError(
            f"{source}: training.max_prompt_length ({training['max_prompt_length']}) must be below "
            f"training.max_length ({training['max_length']})"
        )
    _check_objective(config, source)
    _check_scoring(config["scoring"], source)
    _check_slurm_extra(config["resources"], source)


# What to set instead of an sbatch option the SLURM plugin sets itself (its validation names the option).
_SLURM_OPTION_KEYS = {
    "partition": "resources.<rule>.partition", "account": "resources.<rule>.account",
    "quality of service": "resources.<rule>.qos", "node constraints": "resources.<rule>.constraint",
    "memory": "resources.<rule>.mem_mb", "runtime/time limit": "resources.<rule>.runtime",
    "CPUs per task": "resources.<rule>.threads", "CPUs per GPU": "resources.<rule>.cpus_per_gpu",
    "GPU allocation": "sampling.tensor_parallel_size, scoring.gpus or training.gpus",
    "generic resources (GRES)": "sampling.tensor_parallel_size, scoring.gpus or training.gpus",
    "number of nodes": "training.nodes",
}


def _check_slurm_extra(resources: dict, source: str) -> None:
    """resources.<rule>.slurm_extra holds no option the SLURM plugin sets (it would refuse the job at submission)."""
    extras = {rule: values["slurm_extra"] for rule, values in resources.items() if values.get("slurm_extra")}
    if not extras:  # importing the plugin runs `scontrol show config` (up to 10 s without a controller)
        return
    try:
        from snakemake_executor_plugin_slurm.validation import get_forbidden_slurm_options
    except ImportError:  # no SLURM plugin here: nothing will be submitted with it
        return
    for rule, extra in extras.items():
        for pattern, option in get_forbidden_slurm_options().items():
            match = re.search(pattern, extra)
            if match:
                instead = _SLURM_OPTION_KEYS.get(option, "the matching resources.<rule> key").replace("<rule>", rule)
                raise ConfigError(
                    f"{source}: key resources.{rule}.slurm_extra: found {extra!r}, whose {match.group().strip()!r} "
                    f"({option}) the SLURM plugin sets itself; set {instead} instead"
                )


def _check_scoring(scoring: dict, source: str) -> None:
    """The chosen scorer has what it needs; GPUs only where a model runs."""
    kind = scoring["scorer"]
    if kind == "reward_model" and not scoring["reward_model"]["path"]:
        raise ConfigError(f"{source}: scoring.scorer='reward_model' needs scoring.reward_model.path, found null")
    if kind == "reward_server" and not scoring["reward_server"]["model"]:
        raise ConfigError(f"{source}: scoring.scorer='reward_server' needs scoring.reward_server.model, found null")
    if kind == "judge" and not scoring["judge"]["model"]:
        raise ConfigError(f"{source}: scoring.scorer='judge' needs scoring.judge.model, found null")
    if kind != "reward_model" and scoring["gpus"] > 0:
        raise ConfigError(
            f"{source}: scoring.gpus={scoring['gpus']} but scorer {kind!r} runs no model on a GPU; set scoring.gpus: 0"
        )
    rm = scoring["reward_model"]
    if rm["objective_weights"] and rm["head"] not in ("auto", "multi_objective"):
        raise ConfigError(
            f"{source}: scoring.reward_model.objective_weights needs head 'multi_objective' (or 'auto'), "
            f"found head={rm['head']!r}"
        )
    if rm["objective_weights"] and rm["objectives"]:
        unknown = sorted(set(rm["objective_weights"]) - set(rm["objectives"]))
        if unknown:
            raise ConfigError(
                f"{source}: scoring.reward_model.objective_weights names {unknown}, which are not in "
                f"scoring.reward_model.objectives {rm['objectives']}"
            )
    judge = scoring["judge"]
    if "{output}" not in judge["template"]:
        raise ConfigError(f"{source}: scoring.judge.template must contain {{output}}, found {judge['template']!r}")
    low_high = judge["score_range"]
    if low_high is not None and low_high[0] > low_high[1]:
        raise ConfigError(f"{source}: scoring.judge.score_range {low_high} has lo > hi")
    try:
        groups = re.compile(judge["score_pattern"]).groups
    except re.error as exc:
        raise ConfigError(f"{source}: scoring.judge.score_pattern is not a regular expression ({exc})") from None
    if groups != 1:
        raise ConfigError(
            f"{source}: scoring.judge.score_pattern must have exactly one group (the number), found {groups}"
        )


def _check_objective(config: dict, source: str) -> None:
    """An on-policy loss trains on its round's own samples; a group loss needs groups to compare."""
    training = config["training"]
    objective = objective_of(training)
    if objective.on_policy and training["history"] != "current":
        raise ConfigError(
            f"{source}: training.loss={training['loss']!r} is on-policy and trains on the round's own samples "
            f"only: training.history must be 'current', found {training['history']!r}"
        )
    if objective.groups and config["sampling"]["num_samples"] < 2:
        raise ConfigError(
            f"{source}: training.loss={training['loss']!r} compares completions within a prompt's group and needs "
            f"sampling.num_samples >= 2, found {config['sampling']['num_samples']}"
        )


def uses_reference(training: dict) -> bool:
    """Whether the round's loss needs reference log-probs: its registry entry says."""
    return objective_of(training).needs_reference(training)


def reference_in_train_job(training: dict) -> bool:
    """Whether the train job computes the reference log-probs itself, with its LoRA adapter
    switched off (training.lora.reference: adapter_off), so that no reference job runs."""
    return uses_reference(training) and bool(training["lora"]) and training["lora"]["reference"] == "adapter_off"


def uses_reference_job(training: dict) -> bool:
    """Whether each round's reference job computes the reference log-probs the train job reads."""
    return uses_reference(training) and not reference_in_train_job(training)


def sampling_round(config: dict, round_n: int) -> int:
    """The round whose checkpoint samples round ``round_n`` (sampling.lag behind the one it trains from)."""
    return max(0, round_n - 1 - config["sampling"]["lag"])


def old_policy_job(config: dict) -> bool:
    """Whether an old_policy job scores each round's feedback under the checkpoint that sampled it.

    A loss with an importance ratio (GRPO) needs pi_old(y|x) of the policy that sampled y. On
    policy (sampling.lag 0) that is the policy the train job starts from, scored in the job.
    """
    return objective_of(config["training"]).old_policy and config["sampling"]["lag"] > 0


def history_rounds(training: dict, round_n: int) -> list[int]:
    """The rounds whose feedback round ``round_n`` trains on (training.history)."""
    if training["history"] == "current":
        return [round_n]
    first = 1 if training["history"] == "all" else max(1, round_n - training["history_k"] + 1)
    return list(range(first, round_n + 1))


def load(path: str | Path) -> dict:
    """Read a YAML/JSON config file and return it validated and completed."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    return validate(raw or {}, source=str(path))


# Keys whose default hashes as a config without the key does (full fine-tuning, padded
# batches, on-policy sampling), so that adding them kept the hashes of experiments that
# leave them unset.
_HASH_OMITTED_DEFAULTS = (("training", "lora", None), ("training", "padding_free", False), ("sampling", "lag", 0))


def config_hash(config: dict) -> str:
    """A short, stable hash of everything in the config that affects results."""
    relevant = {k: v for k, v in config.items() if k not in _HASH_EXCLUDED}
    for section, key, default in _HASH_OMITTED_DEFAULTS:
        values = relevant.get(section)
        if isinstance(values, dict) and key in values and values[key] == default:
            relevant[section] = {k: v for k, v in values.items() if k != key}
    canonical = json.dumps(relevant, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def dump(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def write_resolved(config: dict) -> Path:
    """The validated config with defaults as every step reads it (layout.resolved_config), written
    atomically and only when its content is new; returns its path."""
    from iteralign import layout
    from iteralign.artifacts import atomic_path

    path = experiment_dir(config) / layout.resolved_config(config_hash(config))
    text = dump(config)
    if not path.exists() or path.read_text() != text:
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return path


def experiment_dir(config: dict) -> Path:
    return Path(config["results_dir"]) / config["experiment"]


def derived_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th stream drawn from ``seed`` (a round, a batch, a prompt)."""
    return seed * 1_000_003 + index


def round_seed(config: dict, round_n: int) -> int:
    """The seed of everything random in round ``round_n``: sampling, pairing, training order."""
    return derived_seed(config["seed"], round_n)
