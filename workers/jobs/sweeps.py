"""A sweep's steps and its pruning, with Optuna's samplers and pruners over the trials
SQL holds (``shared.sweeps``).

No process drives a sweep. A step (the ``captrain.sweep_step`` task) runs when the
sweep is submitted and whenever one of its trials ends: it rebuilds the study in
memory from the trial rows and asks for as many new trials as there are free slots,
each written as a train job in the step's transaction; or, once every trial has
ended, it finishes the sweep and points the registry alias ``best`` at the best
trial's model. A pruning decision is made the same way, at each epoch's end, by the
trial's own training process.

Why in-memory studies over captrain's tables, not Optuna's RDB storage: the trials
then live with the runs they are (one transaction writes both), every write takes
the project's retry and locking discipline, and parallel trials on SQLite cannot
meet Optuna's "database is locked" (optuna#820, #4994).
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
    json_to_distribution,
)
from optuna.trial import FrozenTrial, TrialState, create_trial
from sqlalchemy.exc import IntegrityError

from shared import sweeps
from shared.db import session_scope
from shared.dispatch import send_job
from shared.errors import DatabaseUnavailable
from shared.space import Dimension
from shared.spec import SweepSpec, derive_seed
from shared.state import ENDED, finish_sweep, get_job, start_sweep

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)

_STATES = {"running": TrialState.RUNNING, "complete": TrialState.COMPLETE,
           "pruned": TrialState.PRUNED, "failed": TrialState.FAIL}


def distribution(dim: Dimension) -> BaseDistribution:
    """The Optuna distribution of one search dimension."""
    if dim.kind == "choice":
        return CategoricalDistribution(list(dim.args))
    low, high = dim.args
    if dim.kind == "int":
        return IntDistribution(low, high)
    return FloatDistribution(low, high, log=dim.kind == "loguniform")


def sampler(spec: SweepSpec, number: int) -> optuna.samplers.BaseSampler:
    """The sampler that draws trial ``number``, seeded by (sweep seed, number): a step
    that runs again after a crash draws what the lost one would have."""
    seed = derive_seed(spec.seed, number) % 2**32
    dims = [Dimension.from_dict(d) for d in spec.space]
    if spec.sampler == "grid":
        return optuna.samplers.GridSampler({d.name: d.grid() for d in dims}, seed=seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: trials still running count as if they had ended badly, so that
    # parallel trials spread out instead of all asking for the same point.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True,
                                      n_startup_trials=min(10, max(2, spec.trials // 4)))


def pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    """The pruner of ``--pruner``: median (prune below the median of earlier trials at
    the same epoch, once two trials have completed, from the second epoch on),
    asha (successive halving from epoch 1, keeping a third) or none."""
    if spec.pruner == "median":
        # Steps are epochs, from 1: judged from epoch 2 on (step >= n_warmup_steps).
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)
    if spec.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def frozen(view: sweeps.TrialView, state: str | None = None) -> FrozenTrial:
    """An Optuna trial of what SQL holds for one trial."""
    state = state or view.state
    return create_trial(
        state=_STATES[state], value=view.value if state == "complete" else None,
        params=view.params,
        distributions={k: json_to_distribution(v) for k, v in view.distributions.items()},
        system_attrs=view.system_attrs, intermediate_values=dict(view.intermediate))


def study(spec: SweepSpec, views: list[sweeps.TrialView], number: int) -> optuna.Study:
    """An in-memory study of the sweep's trials, ready to ask for trial ``number``."""
    direction = (optuna.study.StudyDirection.MAXIMIZE if sweeps.maximize(spec.metric)
                 else optuna.study.StudyDirection.MINIMIZE)
    st = optuna.create_study(direction=direction, sampler=sampler(spec, number),
                             pruner=pruner(spec))
    for view in views:
        # A complete trial whose metric is missing cannot inform the sampler.
        if view.state == "complete" and view.value is None:
            st.add_trial(frozen(view, "failed"))
        else:
            st.add_trial(frozen(view))
    return st


def _suggest(trial: optuna.Trial, dims: list[Dimension]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in dims:
        if d.kind == "choice":
            out[d.name] = trial.suggest_categorical(d.name, list(d.args))
        elif d.kind == "int":
            out[d.name] = trial.suggest_int(d.name, *d.args)
        else:
            out[d.name] = trial.suggest_float(d.name, *d.args, log=d.kind == "loguniform")
    return out


def step(sweep_job_id: int) -> list[int]:
    """Ask for the trials that fill the sweep's free slots, or finish the sweep. Returns
    the new trials' train job ids, to send once committed. Steps at once run one
    after another (``shared.sweeps.lock``); a step with nothing to do changes
    nothing. Raises NotFound."""
    with session_scope() as s:
        job = sweeps.lock(s, sweep_job_id)
        if job.status in ENDED:
            return []
        spec = SweepSpec(**job.spec)
        views = sweeps.trials(s, sweep_job_id)
        active = sum(t.state == "running" for t in views)
        if len(views) >= spec.trials:
            if not active:
                top = sweeps.best(spec, views)
                all_failed = all(t.state == "failed" for t in views)
                finish_sweep(s, job, top.run if top else None,
                             "every trial failed" if all_failed else None)
            return []
        start_sweep(job)
        dims = [Dimension.from_dict(d) for d in spec.space]
        new: list[int] = []
        while active + len(new) < spec.parallel and len(views) < spec.trials:
            number = len(views)  # numbers are 0, 1, ... with no gap
            st = study(spec, views, number)
            ask = st.ask()
            params = _suggest(ask, dims)
            system = dict(st.trials[-1].system_attrs)  # the grid sampler's point
            dists = {k: distribution_to_json(v) for k, v in ask.distributions.items()}
            new.append(sweeps.add_trial(s, job, number, params, dists, system))
            # The next ask of this step sees this trial as running.
            views = [*views, sweeps.TrialView(number, "running", params, dists, system,
                                              run=0, job=new[-1])]
        return new


def run_step(sweep_job_id: int) -> list[int]:
    """A step (``step``), then each new trial's message sent. Returns the new trials'
    train job ids. Two steps that raced for one trial number (only possible if a row
    lock was lost) leave one; the other retries as a transient error."""
    try:
        new = step(sweep_job_id)
    except IntegrityError as exc:
        raise DatabaseUnavailable(f"another step wrote sweep {sweep_job_id}'s trial first: "
                                  f"{exc.orig}") from exc
    for job_id in new:
        send_job(job_id)
    return new


def should_prune(run_id: int, epoch: int) -> bool:
    """Whether trial run ``run_id`` should stop after ``epoch`` (its metrics of that
    epoch are stored): the sweep's pruner, over every trial's values so far. False
    for a run that is not a trial. What the pruner records on the trial (successive
    halving's rungs) is written back to its row, for the next epoch's decision and
    for the other trials'."""
    with session_scope() as s:
        sweep_id = sweeps.sweep_of_run(s, run_id)
        if sweep_id is None:
            return False
        spec = SweepSpec(**get_job(s, sweep_id).spec)
        if spec.pruner == "none":
            return False
        views = sweeps.trials(s, sweep_id)
        me = next(i for i, t in enumerate(views) if t.run == run_id)
        if epoch not in views[me].intermediate:
            return False  # the metric is missing: nothing to judge by
        views[me].state = "running"  # it is, whatever a stale status says
        # Judged as of ``epoch``: a resumed run may hold later epochs' rows already.
        views[me].intermediate = {e: v for e, v in views[me].intermediate.items()
                                  if e <= epoch}
        st = study(spec, views, views[me].number)
        trial = st.trials[me]
        prune = bool(st.pruner.prune(st, trial))
        attrs = st.trials[me].system_attrs
        if attrs != views[me].system_attrs:
            sweeps.set_system_attrs(s, run_id, attrs)
    return prune
