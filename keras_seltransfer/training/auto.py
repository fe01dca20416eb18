"""`method="auto"`: choose the method for the user's data by cross-validation.

No method wins on every data set (docs/results/RESULTS.md), and a small
validation split is too noisy to choose on: on ELPV at 15% it holds about
60 images, where one image is 1.7 points of accuracy. The auto mode scores
each candidate by stratified k-fold cross-validation over the images a run
may learn from (its training and validation images; the test split is never
touched), chooses with a rule that prefers the simpler candidate when the
difference is within noise, and trains the choice exactly as
`finetune(method=<choice>)` would, so the exported model, report and
SavedModel are those of an ordinary run, with the selection added to the
report.

The pieces are pure functions, tested without training: `parse_candidates`
(the candidate specs), `fold_splits` (the folds), `select` (the rule) and
`single_split_agreement` (how often one fold alone picks what k folds pick).

Folds run in rounds (fold 1 of every candidate, then fold 2, ...), so a time
budget that runs out leaves every candidate scored on the same folds. Each
fold is a run directory under `<output_dir>/auto/`; a finished fold is
reused when the command is rerun, an interrupted one resumes from its
checkpoint.

Example:

```python
config = FinetuneConfig(target="elpv", fraction=0.15, method="auto", auto_folds=5)
outputs = finetune(config)
outputs["report"]["auto"]["choice"]  # e.g. "lp_ft"
```
"""

import dataclasses
import json
import os
import re
import time

import numpy as np
from sklearn.model_selection import StratifiedKFold

from keras_seltransfer import methods
from keras_seltransfer import evaluation
from keras_seltransfer.training import defaults
from keras_seltransfer.training import finetuning
from keras_seltransfer.training import loop
from keras_seltransfer.utils.io import atomic_write_text
from keras_seltransfer.utils.io import load_json_object
from keras_seltransfer.utils.options import option_info

# Settings a candidate may not change: they define the data every candidate
# is scored on, or the auto run itself.
_FIXED = frozenset({
    "method", "target", "fraction", "per_class", "seed", "test_fraction", "split_seed",
    "val_fraction", "output_dir", "channels", "image_size", "export", "tensorboard", "verbose",
    "strategy", "force",
})

# Settings that change how a run reports (or whether it may take over its
# directory), not what it computes.
_PRESENTATION = frozenset({"verbose", "tensorboard", "export", "output_dir", "force"})

FOLD_REPORT = "fold_report.json"
SUMMARY = "auto.json"


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One method the auto mode may choose, with its own settings.

    Attributes:
        label: the spec as written (`"baseline:batchnorm=train"`).
        method: the registered method name.
        overrides: `{option: value}` the candidate sets on the run's config.

    Example:

    >>> from keras_seltransfer.training import FinetuneConfig
    >>> (candidate,) = parse_candidates("baseline:batchnorm=train", FinetuneConfig)
    >>> candidate.method, candidate.overrides, candidate.slug
    ('baseline', {'batchnorm': 'train'}, 'baseline-batchnorm=train')
    """

    label: str
    method: str
    overrides: dict

    @property
    def slug(self):
        """The label as a directory name."""
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.label.replace(":", "-"))


def _convert(field, text, label):
    kind = option_info(field)["type"]
    if text.lower() in ("none", "") and field.default is None:
        return None
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        return kind(text)
    except ValueError:
        raise ValueError(
            f"Candidate {label!r}: `{field.name}` takes a {kind.__name__}. "
            f"Received: {field.name}={text!r}"
        ) from None


def parse_candidates(spec, config_cls):
    """The `Candidate`s of an `auto_candidates` spec.

    Args:
        spec: comma-separated candidates (a sequence of them works too),
            each a method name optionally followed by `:option=value`
            settings, e.g. `"linear_probe, baseline:batchnorm=train"`; None
            gives `defaults.AUTO_CANDIDATES`.
        config_cls: the config class whose options the settings name
            (`FinetuneConfig`).

    Returns:
        A list of `Candidate`, in the given order.

    Raises:
        ValueError: for an unknown method or option, a setting that would
            change the data every candidate is scored on (`fraction`,
            `seed`, ...), a value of the wrong type, a repeated candidate or
            an empty list.

    Example:

    >>> from keras_seltransfer.training import FinetuneConfig
    >>> [c.overrides for c in parse_candidates("lp_ft,baseline:batchnorm=train", FinetuneConfig)]
    [{}, {'batchnorm': 'train'}]
    """
    if spec is None:
        spec = defaults.AUTO_CANDIDATES
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [item.strip() for item in items if item and item.strip()]
    if not items:
        raise ValueError(
            "`auto_candidates` must name at least one method. "
            f"Received: auto_candidates={spec!r}"
        )
    fields = {field.name: field for field in dataclasses.fields(config_cls)}
    candidates, seen = [], set()
    for item in items:
        name, *settings = [part.strip() for part in item.split(":")]
        if name == methods.AUTO or name not in methods.names():
            raise ValueError(
                f"`auto_candidates` takes method names from {methods.names()}. "
                f"Received: {name!r} in auto_candidates={spec!r}"
            )
        overrides = {}
        for setting in settings:
            key, sep, text = setting.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(
                    f"Candidate {item!r}: settings are written option=value after a colon "
                    f"(baseline:batchnorm=train). Received: {setting!r}"
                )
            if key not in fields or key.startswith("auto_"):
                close = [n for n in fields if not n.startswith("auto_")]
                raise ValueError(
                    f"Candidate {item!r}: unknown option {key!r}. Expected one of the "
                    f"options of FinetuneConfig (apps.finetune --help), e.g. "
                    f"{', '.join(sorted(close)[:6])}, ..."
                )
            if key in _FIXED:
                raise ValueError(
                    f"Candidate {item!r}: `{key}` is the same for every candidate (it defines "
                    "the images they are scored on, or the run); set it on the auto run itself."
                )
            overrides[key] = _convert(fields[key], text.strip(), item)
        label = ":".join([name] + [f"{k}={v}" for k, v in overrides.items()])
        if label in seen:
            raise ValueError(f"Candidate {label!r} is listed twice in auto_candidates={spec!r}")
        seen.add(label)
        candidates.append(Candidate(label, name, overrides))
    return candidates


def fold_splits(labels, folds, seed):
    """Stratified folds over images with `labels`: `[(train, held_out), ...]`.

    Positions index `labels`; every image is held out in exactly one fold,
    and each class is spread over the folds in proportion.

    Raises:
        ValueError: if a class has fewer images than there are folds.

    Example:

    >>> splits = fold_splits([0, 0, 0, 1, 1, 1], folds=3, seed=0)
    >>> sorted(int(i) for _, held in splits for i in held)
    [0, 1, 2, 3, 4, 5]
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() < folds:
        smallest = classes[int(np.argmin(counts))].item()
        raise ValueError(
            f"`auto_folds={folds}` needs at least {folds} images of every class in the "
            f"training and validation images; class {smallest!r} has {counts.min()}. Pass "
            f"auto_folds={max(2, int(counts.min()))} or fewer, or keep more images."
        )
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels))


def _best(means):
    # The highest mean; a tie goes to the earliest (simplest).
    return int(np.flatnonzero(means == means.max())[0])


def select(scores, rule="one_se"):
    """Chooses among candidates scored on the same folds (higher is better).

    `one_se`: the earliest candidate whose mean is within one standard error
    of the best's, the standard error being that of the paired per-fold
    differences to the best (folds are shared, so pairing removes the
    variation between folds); the list is ordered simplest first, so within
    noise the simpler method wins (the one-standard-error rule of Breiman
    et al., Classification and Regression Trees, 1984, with paired folds).
    With one fold there is no standard error and it equals `best`, the
    highest mean (a tie goes to the earlier candidate).

    Args:
        scores: `{label: per-fold scores}`, in simplicity order, every
            candidate scored on the same folds.
        rule: `"one_se"` or `"best"`.

    Returns:
        A dict: `choice` and `best` (labels), `reason` (a sentence), and
        `candidates` (`{label: {mean, std, difference, se, within_noise}}`).

    Raises:
        ValueError: for an unknown rule, no candidates, or candidates
            scored on different numbers of folds.

    Example:

    >>> picked = select({"lp_ft": [0.70, 0.72, 0.68], "sjft": [0.71, 0.73, 0.69]})
    >>> picked["best"], picked["choice"]
    ('sjft', 'sjft')
    >>> select({"lp_ft": [0.70, 0.75, 0.68], "sjft": [0.72, 0.73, 0.70]})["choice"]
    'lp_ft'
    """
    if rule not in defaults.AUTO_RULES:
        raise ValueError(f"`rule` must be one of {defaults.AUTO_RULES}. Received: rule={rule!r}")
    if not scores:
        raise ValueError("`scores` must hold at least one candidate. Received: scores={}")
    labels = list(scores)
    lengths = {len(scores[label]) for label in labels}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(
            "Every candidate must be scored on the same (nonzero) number of folds. Received: "
            + ", ".join(f"{label}: {len(scores[label])}" for label in labels)
        )
    table = np.asarray([np.asarray(scores[label], float) for label in labels])
    folds = table.shape[1]
    means = table.mean(axis=1)
    best = _best(means)
    differences = table[best] - table
    spread = differences.std(axis=1, ddof=1) if folds > 1 else np.zeros(len(labels))
    se = spread / np.sqrt(folds)
    # A tolerance for the rounding of equal scores.
    within = differences.mean(axis=1) <= se + 1e-12
    if rule == "best" or folds == 1:
        choice = best
    else:
        choice = int(np.flatnonzero(within)[0])
    candidates = {
        label: {
            "mean": float(means[i]),
            "std": float(table[i].std(ddof=1)) if folds > 1 else 0.0,
            "difference": float(differences[i].mean()),
            "se": float(se[i]),
            "within_noise": bool(within[i]),
        }
        for i, label in enumerate(labels)
    }
    if choice == best:
        reason = f"{labels[best]} has the highest mean fold score ({means[best]:.4f})"
        if rule == "one_se" and folds == 1:
            reason += "; one fold gives no standard error, so the highest mean is taken"
        elif rule == "one_se":
            reason += " and no simpler candidate is within one standard error of it"
    else:
        reason = (
            f"{labels[choice]} ({means[choice]:.4f}) is the simplest candidate within one "
            f"standard error of the best, {labels[best]} ({means[best]:.4f}): paired "
            f"difference {differences[choice].mean():.4f} <= SE {se[choice]:.4f} over "
            f"{folds} folds"
        )
    return {"choice": labels[choice], "best": labels[best], "reason": reason,
            "candidates": candidates}


def single_split_agreement(scores):
    """How often one fold alone picks the candidate with the best mean.

    A single validation split is one fold: its winner (highest score, ties
    to the earlier candidate) is what choosing on it would give. This is
    the share of folds whose winner is the candidate with the highest mean
    over all folds, and the winner of each fold.

    Example:

    >>> single_split_agreement({"a": [0.7, 0.8, 0.6], "b": [0.75, 0.7, 0.7]})
    {'agreement': 0.6666666666666666, 'fold_winners': ['b', 'a', 'b']}
    """
    labels = list(scores)
    table = np.asarray([np.asarray(scores[label], float) for label in labels])
    best = labels[_best(table.mean(axis=1))]
    winners = [labels[_best(table[:, fold])] for fold in range(table.shape[1])]
    return {"agreement": float(np.mean([w == best for w in winners])), "fold_winners": winners}


def _comparable(config_dict):
    return {k: v for k, v in config_dict.items() if k not in _PRESENTATION}


def _fold_config(config, candidate, fold):
    return dataclasses.replace(
        config,
        method=candidate.method,
        output_dir=os.path.join(config.output_dir, "auto", candidate.slug, f"fold{fold}"),
        export=False,
        tensorboard=False,
        verbose=0,
        **candidate.overrides,
    )


def candidate_configs(config):
    """`[(Candidate, the config of its first fold), ...]` for an auto `config`.

    Raises:
        ValueError: for a bad `auto_candidates` spec, or a candidate whose
            settings its method refuses, naming the candidate.

    Example:

    ```python
    config = FinetuneConfig(method="auto", auto_candidates="lp_ft,baseline:batchnorm=train")
    [c.label for c, _ in candidate_configs(config)]  # ['lp_ft', 'baseline:batchnorm=train']
    ```
    """
    configs = []
    for candidate in parse_candidates(config.auto_candidates, type(config)):
        try:
            configs.append((candidate, _fold_config(config, candidate, 0)))
        except ValueError as e:
            raise ValueError(f"Candidate {candidate.label!r}: {e}") from e
    return configs


def _cached_fold(fold_config, held_ids):
    """The stored report of a finished fold, None if not finished.

    Raises:
        ValueError: if the stored fold was run with other settings.
    """
    path = os.path.join(fold_config.output_dir, FOLD_REPORT)
    if not os.path.isfile(path):
        return None
    stored = load_json_object(path, f"fold report {path!r}")
    wanted = _comparable(dataclasses.asdict(fold_config))
    have = _comparable(stored.get("config", {}))
    # Options added to the library since the fold ran are not compared:
    # their defaults keep what the fold computed.
    changed = sorted(k for k in set(wanted) & set(have) if wanted[k] != have[k])
    if changed or stored.get("held_out") != [int(i) for i in held_ids]:
        what = ", ".join(f"{k}: {have.get(k)!r} -> {wanted.get(k)!r}" for k in changed[:5])
        raise ValueError(
            f"The fold in {fold_config.output_dir!r} was run with other settings "
            f"({what or 'other held-out images'}). Use another --output_dir, or delete that "
            "directory to rerun it."
        )
    return stored


def _round_cached(config, candidates, fold, held_ids, failed):
    """Whether every candidate's fold `fold` is already finished (a rerun
    reuses finished rounds whatever the budget)."""
    return all(
        candidate.label in failed
        or _cached_fold(_fold_config(config, candidate, fold), held_ids) is not None
        for candidate in candidates
    )


def _log(config, message):
    if config.verbose:
        print(f"auto: {message}", flush=True)


def cross_validate(config):
    """Scores every candidate of an auto `config` by k-fold cross-validation.

    Returns the summary `finetune_auto` reports (see there) without training
    the choice. Finished folds under `<output_dir>/auto/` are reused.

    Raises:
        ValueError: for bad candidates, too few images per class for the
            folds, or when no candidate could be scored.

    Example:

    ```python
    summary = cross_validate(FinetuneConfig(target="elpv", fraction=0.15, method="auto"))
    summary["choice"], summary["candidates"]["lp_ft"]["mean"]
    ```
    """
    candidates = [candidate for candidate, _ in candidate_configs(config)]
    train_full, _, train_ids, val_ids = finetuning.finetune_split(config)
    pool = np.concatenate([train_ids, val_ids])
    splits = fold_splits(train_full.labels[pool], config.auto_folds, config.seed)
    start = time.time()
    budget = config.auto_time_budget * 60.0
    spent = 0.0
    scores = {c.label: [] for c in candidates}
    seconds = {c.label: 0.0 for c in candidates}
    failed = {}
    stopped = None
    total = len(candidates) * len(splits)
    for fold, (fit_pos, held_pos) in enumerate(splits):
        # The budget is checked between rounds: a round once started
        # completes, so every candidate is scored on the same folds.
        if budget and spent >= budget and fold >= 1 and not _round_cached(
            config, candidates, fold, pool[held_pos], failed
        ):
            stopped = (
                f"the time budget of {config.auto_time_budget:g} min was spent after "
                f"{fold} of {len(splits)} folds ({spent / 60:.1f} min)"
            )
            _log(config, f"stopped: {stopped}")
            break
        for index, candidate in enumerate(candidates):
            if candidate.label in failed:
                continue
            fold_config = _fold_config(config, candidate, fold)
            fit_ids, held_ids = pool[fit_pos], pool[held_pos]
            done = _cached_fold(fold_config, held_ids)
            step = f"[{fold * len(candidates) + index + 1}/{total}] fold {fold + 1}/{len(splits)}"
            if done is None:
                _log(config, f"{step} {candidate.label} ...")
                try:
                    report = finetuning.fit_and_score(fold_config, fit_ids, held_ids)
                    done = {"report": {k: v for k, v in report.items() if k != "history"}}
                except ValueError as e:
                    # A method that does not apply to this backbone or data
                    # (no subsampling layer to anti-alias, ...) is left out,
                    # and stays out when the command is rerun.
                    done = {"failed": " ".join(str(e).split())}
                done.update(
                    config=dataclasses.asdict(fold_config), held_out=[int(i) for i in held_ids]
                )
                os.makedirs(fold_config.output_dir, exist_ok=True)
                atomic_write_text(
                    os.path.join(fold_config.output_dir, FOLD_REPORT),
                    json.dumps(done, indent=2, sort_keys=True) + "\n",
                )
            if done.get("failed"):
                failed[candidate.label] = done["failed"]
                _log(config, f"{step} {candidate.label} left out: {done['failed']}")
                continue
            score = float(done["report"][config.auto_metric])
            scores[candidate.label].append(score)
            seconds[candidate.label] += float(done["report"]["seconds"])
            spent += float(done["report"]["seconds"])
            _log(
                config,
                f"{step} {candidate.label}: {config.auto_metric} {score:.4f} "
                f"({done['report']['seconds']:.0f} s)",
            )
    scored = {label: s for label, s in scores.items() if s and label not in failed}
    if not scored:
        reasons = "; ".join(f"{k}: {v}" for k, v in failed.items()) or stopped or "no folds"
        raise ValueError(f"No candidate of --method=auto could be scored ({reasons}).")
    used = min(len(s) for s in scored.values())
    scored = {label: s[:used] for label, s in scored.items()}
    picked = select(scored, config.auto_rule)
    status = {}
    for candidate in candidates:
        if candidate.label in failed:
            status[candidate.label] = f"left out: {failed[candidate.label]}"
        elif candidate.label not in scored:
            status[candidate.label] = f"not scored: {stopped}"
        else:
            status[candidate.label] = "scored"
    return {
        "choice": picked["choice"],
        "best": picked["best"],
        "reason": picked["reason"],
        "rule": config.auto_rule,
        "metric": config.auto_metric,
        "folds": len(splits),
        "folds_used": used,
        "stopped_early": stopped,
        "images": int(len(pool)),
        "candidates": {
            c.label: {
                "method": c.method,
                "overrides": c.overrides,
                "status": status[c.label],
                "fold_scores": scored.get(c.label, []),
                "seconds": round(seconds[c.label], 1),
                **picked["candidates"].get(c.label, {}),
            }
            for c in candidates
        },
        "single_split_agreement": single_split_agreement(scored),
        "cross_validation_seconds": round(time.time() - start, 1),
    }


def summary_markdown(summary):
    """The auto mode's summary as a Markdown section (candidates, scores, choice).

    Example:

    ```python
    print(summary_markdown(report["auto"]))
    ```
    """
    metric = summary["metric"].replace("_", " ")
    lines = [
        "## Method selection (--method=auto)",
        "",
        f"{summary['folds_used']} of {summary['folds']} stratified folds over "
        f"{summary['images']} training and validation images; score: held-out {metric}; "
        f"rule: {summary['rule']}.",
        "",
        "| candidate | mean | std | paired diff. to best | SE | within noise | seconds | status |",
        "|---|---:|---:|---:|---:|:---:|---:|---|",
    ]
    for label, row in summary["candidates"].items():
        if row.get("mean") is None:
            lines.append(f"| {label} | | | | | | {row['seconds']:.0f} | {row['status']} |")
            continue
        mark = " **(chosen)**" if label == summary["choice"] else ""
        lines.append(
            f"| {label}{mark} | {row['mean']:.4f} | {row['std']:.4f} | {row['difference']:.4f} "
            f"| {row['se']:.4f} | {'yes' if row['within_noise'] else 'no'} | "
            f"{row['seconds']:.0f} | {row['status']} |"
        )
    agreement = summary["single_split_agreement"]
    lines += [
        "",
        f"Choice: **{summary['choice']}**, because {summary['reason']}.",
        "",
        f"A single split (one fold) picks the best-mean candidate in "
        f"{agreement['agreement']:.0%} of folds (fold winners: "
        f"{', '.join(agreement['fold_winners'])}).",
    ]
    if summary.get("stopped_early"):
        lines += ["", f"Stopped early: {summary['stopped_early']}."]
    return "\n".join(lines) + "\n"


def finetune_auto(config):
    """Runs `method="auto"`: cross-validates the candidates, trains the choice.

    The choice is trained as `finetune` trains that method (same images,
    validation split, seed and settings) into `config.output_dir`; its
    report gains an `auto` entry (every candidate's fold scores, mean,
    spread, paired difference to the best, time, the choice and why, and
    how often a single fold would have chosen the same), also written as
    `auto.json` and as a section of `report.md`.

    The whole run, folds and final training, holds one lock on
    `config.output_dir` (as `finetune` does); the final run, nested in it,
    holds it again rather than waiting for itself.

    Args:
        config: a `FinetuneConfig` with `method="auto"`.

    Returns:
        `finetune`'s outputs for the chosen method, with `auto_json`.

    Example:

    ```python
    outputs = finetune(FinetuneConfig(target="elpv", fraction=0.15, method="auto"))
    print(outputs["report"]["auto"]["reason"])
    ```
    """
    if config.method != methods.AUTO:
        raise ValueError(
            f"`finetune_auto` runs method={methods.AUTO!r}. Received: method={config.method!r}"
        )
    with loop.run_directory_lock(config):
        return _finetune_auto(config)


def _finetune_auto(config):
    summary = cross_validate(config)
    chosen = next(
        c for c in parse_candidates(config.auto_candidates, type(config))
        if c.label == summary["choice"]
    )
    _log(config, f"chose {chosen.label}: {summary['reason']}. Training it.")
    final = dataclasses.replace(config, method=chosen.method, **chosen.overrides)
    start = time.time()
    outputs = finetuning.finetune(final)
    summary["final_seconds"] = round(time.time() - start, 1)
    report = dict(outputs["report"], auto=summary, auto_choice=chosen.label)
    outputs["report"] = report
    if "report_json" in outputs:
        title = f"Fine-tuning report: auto chose {chosen.label} on {config.target}"
        json_path, md_path = evaluation.write_report(report, config.output_dir, title=title)
        with open(md_path, encoding="utf-8") as f:
            text = f.read()
        atomic_write_text(md_path, text + "\n" + summary_markdown(summary))
        outputs["auto_json"] = os.path.join(config.output_dir, SUMMARY)
        atomic_write_text(outputs["auto_json"], json.dumps(summary, indent=2) + "\n")
    return outputs


__all__ = [
    "Candidate",
    "candidate_configs",
    "cross_validate",
    "finetune_auto",
    "fold_splits",
    "parse_candidates",
    "select",
    "single_split_agreement",
    "summary_markdown",
]
