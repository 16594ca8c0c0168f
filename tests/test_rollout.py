"""Model roll-outs that cannot hurt (issue 25, item 4): every poisoned model directory is refused with its reason
through the real loading path (`consumer.rollout.load_vetted`: `Scorer.load` with the parameter budget, then the
probe posts), the reloader's thread survives whatever a directory holds, and a running consumer on a real broker
keeps scoring with the old model while candidate after candidate is refused.

Model directories are real: the `tiny-random` preset saved, then copies poisoned on disk (weights rewritten with
safetensors, config.json and calibration.json edited, symlinks flipped as a Kubernetes volume update does).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from consumer.errors import EXIT_CONFIGURATION
from consumer.metrics import Metrics
from consumer.reload import UNREADABLE, ModelReloader, fingerprint
from consumer.rollout import load_vetted, probe_problem, refusal_reason
from consumer.settings import Settings
from mmsent import ModelRefused, RefusalReason, Scorer, ScoreResult
from tests.consumerutil import (
    SteadyProducer,
    Topics,
    all_committed,
    app_in_thread,
    committed_total,
    make_settings,
    settings_env,
    synthetic_posts,
    wait_until,
)
from tests.kafkautil import create_topics, read_all
from tests.modelutil import POISONS, point, poisoned, save_tiny_model
from tooling.reconcile import reconcile, render_table

BUDGET = 50_000_000  # parameters: the tiny preset has about a million


# -- model directories, good and poisoned ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "good", "1")


def settings(**values: Any) -> Settings:
    return Settings(redis_url=None, model_max_params=BUDGET, cpu_runtime="torch", **values)


# -- each poison refused with its reason, through the real loading path ---------------------------------------------


def test_a_good_model_passes_every_check(good_model: Path) -> None:
    scorer = load_vetted(settings(), str(good_model))
    assert scorer.info["version"] == "1"


@pytest.mark.parametrize("name", sorted(POISONS))
def test_a_poisoned_model_is_refused_with_its_reason(good_model: Path, name: str, tmp_path: Path) -> None:
    candidate = poisoned(good_model, name, tmp_path)
    with pytest.raises(ModelRefused) as refused:
        load_vetted(settings(), str(candidate))
    assert refused.value.reason == POISONS[name][1], refused.value
    assert refusal_reason(refused.value) == POISONS[name][1].value
    assert refused.value.reason.value in str(refused.value)  # the message names the code, then what was found


def test_a_dangling_model_link_is_refused_as_missing(tmp_path: Path) -> None:
    link = tmp_path / "current"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(ModelRefused) as refused:
        load_vetted(settings(), str(link))
    assert refused.value.reason == RefusalReason.MODEL_MISSING


def test_the_wrong_shape_names_the_tensor_and_both_shapes(good_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelRefused, match=r"head\.mlp\.0\.weight: \[7, 5\] in the file, \[32, 48\] in the model"):
        Scorer.load(poisoned(good_model, "wrong_shape", tmp_path))


@pytest.mark.parametrize("name", ["huge_config", "deep_config"])
def test_an_oversized_config_is_refused_fast_without_allocating_it(good_model: Path, name: str,
                                                                   tmp_path: Path) -> None:
    """Refused from config.json alone: no weight read, no tensor of the model allocated (its 10^12+ parameters would
    be terabytes). The peak RSS of this process does not move by more than a small model's worth."""
    candidate = poisoned(good_model, name, tmp_path)
    (candidate / "model.safetensors").unlink()  # nothing to read: a check that read the weights would fail otherwise
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    started = time.perf_counter()
    with pytest.raises(ModelRefused) as refused:
        load_vetted(settings(), str(candidate))
    seconds = time.perf_counter() - started
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert refused.value.reason == RefusalReason.TOO_MANY_PARAMETERS
    assert "over the budget of 50,000,000" in refused.value.detail
    assert seconds < 2.0 and grown_mib < 64, (seconds, grown_mib)
    print(f"\n[{name}] {refused.value.detail}: refused in {seconds * 1000:.0f} ms, peak RSS +{grown_mib:.1f} MiB")


def test_the_counted_parameters_are_the_built_models() -> None:
    """The count from the config (meta device, layers and heads extrapolated) is the built model's, exactly."""
    from mmsent.model import parameter_count
    from mmsent.presets import from_config, preset_config

    for fusion, ensemble, layers in (("concat", 1, 2), ("gated", 3, 3), ("attention", 2, 1)):
        cfg = replace(preset_config("tiny-random", fusion=fusion), ensemble=ensemble)
        text = replace(cfg.text, config={**(cfg.text.config or {}), "num_layers": layers})
        cfg = replace(cfg, text=text)
        built = from_config(cfg)
        assert parameter_count(cfg) == sum(p.numel() for p in built.parameters()), (fusion, ensemble, layers)


def test_the_budget_holds_for_presets_too() -> None:
    with pytest.raises(ModelRefused) as refused:
        Scorer.load("tiny-random", max_params=1000)
    assert refused.value.reason == RefusalReason.TOO_MANY_PARAMETERS


def test_probe_scores_that_are_not_probabilities_are_refused() -> None:
    """The decision on the probe posts' scores (the overflowing model above gives the NaN case for real)."""
    fine = ScoreResult("neutral", {"negative": 0.2, "neutral": 0.5, "positive": 0.3}, False,
                       {"text": {"negative": 0.2, "neutral": 0.5, "positive": 0.3}})
    assert probe_problem([fine]) is None
    cases = {
        RefusalReason.NON_FINITE_SCORES: {"negative": math.nan, "neutral": 0.5, "positive": 0.5},
        RefusalReason.SCORES_OUT_OF_RANGE: {"negative": -0.5, "neutral": 1.0, "positive": 0.5},
    }
    for reason, scores in cases.items():
        problem = probe_problem([fine, replace(fine, scores_by_modality={"image": scores})])
        assert problem is not None and problem.reason == reason and "probe post 1: image" in problem.detail
    short = probe_problem([replace(fine, scores={"negative": 0.2, "neutral": 0.2, "positive": 0.2})])
    assert short is not None and short.reason == RefusalReason.SCORES_OUT_OF_RANGE


# -- the reloader survives whatever a directory holds ---------------------------------------------------------------


def test_fingerprint_of_a_dangling_link_and_of_a_dangling_file_never_raises(good_model: Path, tmp_path: Path) -> None:
    link = tmp_path / "current"
    link.symlink_to(tmp_path / "gone")
    assert fingerprint(link) is None
    model = tmp_path / "model"
    shutil.copytree(good_model, model)
    (model / "dangling").symlink_to(tmp_path / "nowhere")  # listed by os.walk, then os.stat raises
    real, stamps = fingerprint(model)  # type: ignore[misc]
    assert ("dangling", UNREADABLE, UNREADABLE) in stamps and real == str(model.resolve())
    (tmp_path / "nowhere").write_text("now it is there")
    assert fingerprint(model) != (real, stamps)  # its repair is a change, so it triggers a reload


def test_fingerprint_survives_files_vanishing_mid_scan(tmp_path: Path) -> None:
    """A writer creates and deletes files as fast as it can while the directory is fingerprinted again and again:
    files listed by os.walk and gone before os.stat (the race) never make it raise."""
    churn = tmp_path / "model" / "sub"
    churn.mkdir(parents=True)
    stop = threading.Event()

    def writer() -> None:
        k = 0
        while not stop.is_set():
            path = churn / f"f{k % 50}"
            path.write_bytes(b"x")
            path.unlink()
            k += 1

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        seen = [fingerprint(tmp_path / "model") for _ in range(3000)]
    finally:
        stop.set()
        thread.join(5)
    assert all(fp is not None for fp in seen)


def _fingerprint_as_nobody(directory: str, out: Any) -> None:
    """In a child process: drop root (setuid to nobody), then fingerprint `directory`."""
    if os.getuid() == 0:
        os.setgid(65534)
        os.setuid(65534)
    out.put(fingerprint(Path(directory)))


def test_fingerprint_records_what_it_may_not_read() -> None:
    """Permission errors, real ones: a subdirectory it may not list, and one it may list but not search (its files'
    stat refused). Root may read anything, so as root the scan runs in a child process that dropped to the `nobody`
    user (works for root and non-root runners alike)."""
    with tempfile.TemporaryDirectory() as top:  # not under pytest's 0700 tmp root, which nobody may not enter
        os.chmod(top, 0o755)
        model = Path(top) / "model"
        (model / "locked").mkdir(parents=True)
        (model / "listable").mkdir()
        (model / "config.json").write_text("{}")
        (model / "listable" / "weights").write_text("w")
        os.chmod(model, 0o755)
        os.chmod(model / "locked", 0o000)
        os.chmod(model / "listable", 0o444)  # read without search: names listed, stat refused
        try:
            out: Any = multiprocessing.get_context("fork").Queue()
            child = multiprocessing.get_context("fork").Process(target=_fingerprint_as_nobody, args=(str(model), out))
            child.start()
            result = out.get(timeout=30)
            child.join(30)
        finally:
            os.chmod(model / "locked", 0o755)
            os.chmod(model / "listable", 0o755)
    assert child.exitcode == 0
    _real, stamps = result
    assert ("locked", UNREADABLE, UNREADABLE) in stamps
    assert (os.path.join("listable", "weights"), UNREADABLE, UNREADABLE) in stamps
    assert any(name == "config.json" and size == 2 for name, size, _ in stamps)


def test_the_reloader_survives_a_round_that_raises_and_sighup_still_reloads(good_model: Path, tmp_path: Path) -> None:
    """A reporter that raises (the first refusal) fails its round: logged, counted, and the thread goes on; a
    dangling link is watched through; the next request (what SIGHUP sends) loads the good model."""
    link = tmp_path / "current"
    link.symlink_to(tmp_path / "gone")
    refusals: list[BaseException] = []
    failures: list[BaseException] = []

    def on_refused(exc: BaseException) -> None:
        refusals.append(exc)
        if len(refusals) == 1:
            raise RuntimeError("the first report fails")

    reloader = ModelReloader(lambda: load_vetted(settings(), str(link)), on_refused, watched=link, interval_s=0.05,
                             on_failed=failures.append).start()
    try:
        reloader.request()
        assert wait_until(lambda: reloader.failures == 1, 10)
        assert isinstance(failures[0], RuntimeError) and reloader.watching
        assert isinstance(refusals[0], ModelRefused) and refusals[0].reason == RefusalReason.MODEL_MISSING
        time.sleep(0.3)  # rounds over the dangling link: nothing changes, nothing raises
        assert reloader.failures == 1 and reloader.watching and reloader.take() is None
        point(link, good_model)
        assert wait_until(lambda: reloader.take() is not None, 30), "the flipped link was not loaded"
        reloader.request()  # SIGHUP's request, after all that
        assert wait_until(lambda: reloader.take() is not None, 30), "a request after a failed round did nothing"
    finally:
        reloader.close()
    assert len(refusals) == 1 and reloader.failures == 1


# -- a running consumer on a real broker ------------------------------------------------------------------------


@pytest.fixture
def candidates(good_model: Path, tmp_path: Path) -> Iterator[list[Path]]:
    """Every poison, in the order the consumer test flips them in, plus a dangling target."""
    base = tmp_path / "v1"
    shutil.copytree(good_model, base)
    names = ["nan_weights", "wrong_shape", "huge_config", "nan_calibration", "overflowing_weights", "garbage_weights"]
    yield [poisoned(base, name, tmp_path) for name in names] + [tmp_path / "gone"]


@pytest.mark.kafka
def test_a_running_consumer_refuses_every_poisoned_candidate_and_takes_the_good_one_last(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path, good_model: Path, candidates: list[Path]
) -> None:
    """Each candidate goes through `consumer.rollout.load_vetted`: the huge config is counted before it is built, the
    overflowing model's probe scores are looked at, and the serving model goes on meanwhile."""
    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 2, topics.sentiment: 2, topics.dlq: 1})
    v1, v2 = tmp_path / "v1", save_tiny_model(tmp_path / "v2", "2")
    current = tmp_path / "current"
    current.symlink_to(v1)
    env = settings_env(kafka_bootstrap, topics, None, model=str(current), model_watch_s=0.2,
                       model_max_params=BUDGET)
    values = synthetic_posts(2000, lambda i: None)
    reloads = Metrics.get().model_reloads
    loaded_before, refused_before = reloads.labels("loaded")._value.get(), reloads.labels("refused")._value.get()
    stream = SteadyProducer(kafka_bootstrap, topics.posts, values, per_burst=10, interval_s=0.05).start()
    with app_in_thread(make_settings(env)) as app:
        assert wait_until(lambda: committed_total(kafka_bootstrap, topics) >= 100, 60), "no progress on v1"
        for k, candidate in enumerate(candidates, start=1):
            point(current, candidate)
            assert wait_until(lambda k=k: reloads.labels("refused")._value.get() >= refused_before + k, 60), (
                f"{candidate.name} was not refused")
            assert app.model_info is not None and app.model_info.version == "1", candidate.name
        point(current, v2)
        assert wait_until(lambda: app.model_info is not None and app.model_info.version == "2", 60)
        stream.join(120)
        assert wait_until(lambda: all_committed(kafka_bootstrap, topics), 60), "not all offsets committed"
    assert app.rc == 0  # type: ignore[attr-defined]
    assert reloads.labels("refused")._value.get() == refused_before + len(candidates)
    assert reloads.labels("loaded")._value.get() == loaded_before + 1

    events = read_all(kafka_bootstrap, topics.sentiment)
    assert not read_all(kafka_bootstrap, topics.dlq)
    report = reconcile({"bootstrap.servers": kafka_bootstrap}, topics.posts, topics.sentiment, topics.dlq)
    assert report.ok and report.as_dict()["totals"]["inputs"] == len(values), render_table(report)
    versions = [json.loads(r.value)["model"]["version"] for r in events]
    assert set(versions) == {"1", "2"}  # every post scored by the old model or the good new one, none by a poison
    for record in events:
        scores = json.loads(record.value)["scores"]
        assert all(math.isfinite(p) and 0 <= p <= 1 for p in scores.values())
    print(f"\n[rollout] {len(values)} posts -> {len(events)} events ({versions.count('1')} by v1, "
          f"{versions.count('2')} by v2); {len(candidates)} poisoned candidates refused")


@pytest.mark.kafka
@pytest.mark.parametrize("name", ["nan_weights", "overflowing_weights"])
def test_a_poisoned_first_model_stops_the_consumer_at_start_up_with_the_reason(
    kafka_bootstrap: str, unique_name: str, good_model: Path, tmp_path: Path, name: str,
    capfd: pytest.CaptureFixture[str]
) -> None:
    """Fatal for every record, so fatal at start-up: exit code 2 (refused, fix the settings) before the consumer
    joins its group, and the log says why (the probe posts run in `load_vetted`)."""
    from consumer.app import Application

    topics = Topics.named(unique_name)
    create_topics(kafka_bootstrap, {topics.posts: 1, topics.sentiment: 1, topics.dlq: 1})
    env = settings_env(kafka_bootstrap, topics, None, model=str(poisoned(good_model, name, tmp_path)))
    app = Application(make_settings(env), serve_http=False)
    exit_code: list[int] = []
    thread = threading.Thread(target=lambda: exit_code.append(app.run()), daemon=True)
    thread.start()
    thread.join(60)
    started = thread.is_alive()  # a model that was taken: the consumer serves until stopped
    app.stop()
    thread.join(60)
    assert not started and exit_code == [EXIT_CONFIGURATION], "the poisoned model was taken and served"
    assert app.consumer is None and app.model_info is None
    logged = capfd.readouterr()
    assert "consumer_start_failed" in logged.out + logged.err
    assert POISONS[name][1].value in logged.out + logged.err
