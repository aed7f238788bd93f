"""Label Studio as the reviewers' tool (serve/queue/labelstudio.py).

The task, label config and verdict mapping are checked on their own first (no server); then a
real Label Studio server (tests/labelstudio_server.py: its own virtual environment, a free
loopback port, data in a temporary directory) takes a round trip: items enqueued -> pushed as
tasks (checked through Label Studio's API) -> annotated through its API by two annotators who
signed up and hold their own personal access tokens -> pulled back -> verdicts in the queue,
each once, and the items where the queue's rules put them. Oracles: the decision batch's own
columns, and the verdicts written out by hand for each annotation."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from hitl_triage.serve.queue import QueueOptions, open_queue
from hitl_triage.serve.queue.labelstudio import (
    LabelStudioClient, LabelStudioSink, label_config, task_for, verdict_for,
)

from queue_fixtures import decision_batch

CLASSES = ["cat", "dog", "bird", "fish"]


# -- without a server -----------------------------------------------------------------------------

def test_label_config_has_the_classes_and_the_routes():
    root = ET.fromstring(label_config(CLASSES, view='<Image name="image" value="$uri"/>'))
    controls = {c.get("name"): [x.get("value") for x in c] for c in root.iter("Choices")}
    assert controls == {"label": CLASSES, "route": ["escalate", "out of scope"]}
    assert root.find("Image").get("value") == "$uri"
    top = ET.fromstring(label_config(CLASSES, escalate=False))  # the top tier: nowhere to escalate to
    assert [x.get("value") for x in top.iter("Choice")][-1:] == ["out of scope"] and "escalate" not in label_config(CLASSES, escalate=False)
    assert ET.fromstring(label_config(['a "quoted" <name>', "b&c"])) is not None  # escaped
    with pytest.raises(ValueError, match="distinct, non-empty class names"):
        label_config(["cat", "cat"])


def test_task_carries_the_item_and_the_prediction_unless_blind():
    item = {"id": "p-3", "tier": "general", "source": "cam-1", "category": "faces", "reason_mask": 1 | 16,
            "priority": np.float32(0.8125).item(), "predicted_class": 2, "confidence": 0.4, "profile_version": "v7",
            "history": ["general/ann: escalate"], "uri": "s3://b/p-3.jpg", "logits": [[0.1, 0.2, 0.3, 0.4]],
            "blind": False, "deliveries": 1, "lease_until": 1e9, "classes": 4, "enqueued_at": 1.0, "audit_weight": 20.0}
    task = task_for(item, CLASSES)
    data = task["data"]
    assert data["id"] == "p-3" and data["uri"] == "s3://b/p-3.jpg" and data["reasons"] == "confidence, audit"
    assert data["source"] == "cam-1" and data["category"] == "faces" and data["history"] == "general/ann: escalate"
    assert "logits" not in data and "confidence" not in data and "audit_weight" not in data
    assert task["predictions"] == [{"model_version": "v7", "score": 0.8125, "result": [
        {"from_name": "label", "to_name": "item", "type": "choices", "value": {"choices": ["bird"]}}]}]
    blind = task_for({**item, "reason_mask": 16, "blind": True, "predicted_class": None, "confidence": None}, CLASSES)
    assert "predictions" not in blind and "bird" not in str(blind["data"])


def annotation(*choices, cancelled=False, **routes):
    result = [{"from_name": "label", "to_name": "item", "type": "choices", "value": {"choices": [c]}} for c in choices]
    result += [{"from_name": "route", "to_name": "item", "type": "choices", "value": {"choices": [r]}} for r in routes.values()]
    return {"id": 1, "result": result, "was_cancelled": cancelled, "created_at": "2026-01-02T03:04:05.000006Z"}


@pytest.mark.parametrize("made, predicted, action, label", [
    (annotation("bird"), 2, "confirm", 2),
    (annotation("dog"), 2, "correct", 1),
    (annotation("dog"), None, None, 1),                                  # blind: the queue decides
    (annotation(route="escalate"), 2, "escalate", -1),
    (annotation("dog", route="out of scope"), 2, "out_of_scope", -1),   # the route wins over a class
    (annotation(cancelled=True), 2, "none", -1),                         # skipped: no verdict
    (annotation(), 2, "none", -1),                                       # nothing chosen: no verdict
])
def test_an_annotation_becomes_one_verdict(made, predicted, action, label):
    verdict = verdict_for(made, item_id="p-1", tier="general", reviewer="ann@x", classes=CLASSES, predicted=predicted)
    if action == "none":
        assert verdict is None
        return
    assert verdict is not None
    assert (verdict["action"], verdict["label"], verdict["reviewer"], verdict["tier"]) == (action, label, "ann@x", "general")
    assert verdict["ts"].isoformat() == "2026-01-02T03:04:05.000006+00:00"


# -- a real server ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    pytest.importorskip("requests", reason="the labelstudio extra (pip install -e '.[labelstudio]')")
    from labelstudio_server import TIMINGS, label_studio_server

    with label_studio_server(tmp_path_factory.mktemp("label-studio")) as server:
        print(f"\nLabel Studio: install {TIMINGS.get('install_s', 0):.0f} s (0: reused), "
              f"start to /health {TIMINGS['start_s']:.0f} s")
        yield server


@pytest.fixture(scope="module")
def annotators(label_studio):
    from labelstudio_server import personal_access_token

    return {email: LabelStudioClient(label_studio.url, personal_access_token(label_studio.url, email, "pw-" + email,
                                                                             signup=True))
            for email in ("bob@example.com", "carol@example.com")}


def annotate(client, task_id, *choices, cancelled=False, **routes):
    made = annotation(*choices, cancelled=cancelled, **routes)
    return client.call("POST", f"/api/tasks/{task_id}/annotations/",
                       body={"result": made["result"], "was_cancelled": cancelled})


@pytest.mark.slow
def test_round_trip_items_to_tasks_to_verdicts_each_once(label_studio, annotators, tmp_path, rng):
    decisions, predictions = decision_batch(rng, 90, escalate_share=1.0, audit_only_share=0.25)
    rows = {r["id"]: r for r in decisions.to_pylist()}
    general = [i for i, r in rows.items() if r["tier"] == "general"]
    options = QueueOptions(overlap={"general": 0.3})
    needed = dict(zip(general, options.needed(general, "general").tolist()))
    queue = open_queue(f"sqlite:///{tmp_path / 'review.db'}", options)
    queue.enqueue(decisions, predictions)
    started = time.monotonic()
    sink = LabelStudioSink(queue, label_studio.url, label_studio.token, tier="general", classes=CLASSES,
                           view='<Text name="uri" value="$uri"/>')
    assert sink.push() == {"claimed": len(general), "created": len(general), "renewed": 0}
    pushed_s = time.monotonic() - started
    assert sink.push() == {"claimed": 0, "created": 0, "renewed": 0}  # every item is leased to the sink

    # What Label Studio holds: one task per item, the prediction (score = priority) unless blind.
    admin = sink.client
    tasks = {t["data"]["id"]: t for t in admin.tasks(sink.project, fields="all")}
    assert sorted(tasks) == sorted(general)
    for item_id, task in tasks.items():
        row = rows[item_id]
        assert task["data"]["uri"] == f"s3://bucket/{item_id}.jpg" and task["data"]["source"] == row["source"]
        assert task["overlap"] == needed[item_id]
        if row["reason_mask"] == 16:  # an audit sample with no other reason: served blind
            assert task["predictions"] == [], item_id
        else:
            [prediction] = task["predictions"]
            assert prediction["score"] == pytest.approx(row["priority"], rel=1e-6)
            assert prediction["result"][0]["value"]["choices"] == [CLASSES[row["predicted_class"]]]
    by_score = [t["data"]["id"] for t in admin.tasks(sink.project, query={"ordering": ["-tasks:predictions_score"]})]
    scored = [i for i in by_score if rows[i]["reason_mask"] != 16]
    assert scored == sorted(scored, key=lambda i: -rows[i]["priority"])  # reviewers sort by priority

    # Two annotators, each with their own token.
    bob, carol = annotators["bob@example.com"], annotators["carol@example.com"]
    blind = [i for i in general if rows[i]["reason_mask"] == 16 and needed[i] == 1]
    single = [i for i in general if rows[i]["reason_mask"] != 16 and needed[i] == 1]
    double = [i for i in general if rows[i]["reason_mask"] != 16 and needed[i] == 2]
    assert len(single) >= 7 and len(blind) >= 2 and len(double) >= 2, (len(single), len(blind), len(double))
    task = {i: tasks[i]["id"] for i in general}
    pred = {i: CLASSES[rows[i]["predicted_class"]] for i in general}
    other = {i: CLASSES[(rows[i]["predicted_class"] + 1) % 4] for i in general}
    expected = set()  # (id, reviewer, action, label)
    B, C = "bob@example.com", "carol@example.com"
    annotate(bob, task[single[0]], pred[single[0]])
    expected.add((single[0], B, "confirm", rows[single[0]]["predicted_class"]))
    edited = annotate(bob, task[single[1]], other[single[1]])
    expected.add((single[1], B, "correct", CLASSES.index(other[single[1]])))
    annotate(bob, task[single[2]], route="escalate")
    expected.add((single[2], B, "escalate", -1))
    annotate(bob, task[single[3]], route="out of scope")
    expected.add((single[3], B, "out_of_scope", -1))
    annotate(bob, task[single[4]], cancelled=True)  # skipped: no verdict from bob
    annotate(carol, task[single[4]], other[single[4]])
    expected.add((single[4], C, "correct", CLASSES.index(other[single[4]])))
    annotate(carol, task[single[5]], pred[single[5]])
    expected.add((single[5], C, "confirm", rows[single[5]]["predicted_class"]))
    annotate(carol, task[single[6]], other[single[6]], route="out of scope")
    expected.add((single[6], C, "out_of_scope", -1))
    annotate(bob, task[blind[0]], pred[blind[0]])  # blind: the sink does not know the prediction
    expected.add((blind[0], B, "confirm", rows[blind[0]]["predicted_class"]))
    annotate(bob, task[blind[1]], other[blind[1]])
    expected.add((blind[1], B, "correct", CLASSES.index(other[blind[1]])))
    for reviewer, client in ((B, bob), (C, carol)):  # overlap: both agree on one, disagree on the other
        annotate(client, task[double[0]], pred[double[0]])
        expected.add((double[0], reviewer, "confirm", rows[double[0]]["predicted_class"]))
    annotate(bob, task[double[1]], pred[double[1]])
    expected.add((double[1], B, "confirm", rows[double[1]]["predicted_class"]))
    annotate(carol, task[double[1]], other[double[1]])
    expected.add((double[1], C, "correct", CLASSES.index(other[double[1]])))

    started = time.monotonic()
    assert sink.pull() == {"annotations": 14, "stored": 13, "duplicates": 0, "refused": 0, "skipped": 1, "changed": 0}
    pulled_s = time.monotonic() - started
    assert sink.pull() == {"annotations": 0, "stored": 0, "duplicates": 0, "refused": 0, "skipped": 0, "changed": 0}
    stored = queue.verdicts()
    assert stored.num_rows == len(expected) == 13
    got = {(r["id"], r["reviewer"], r["action"], r["label"]) for r in stored.to_pylist()}
    assert got == expected and set(stored.column("tier").to_pylist()) == {"general"}

    # The items where the queue's rules put them.
    stats = queue.stats()["tiers"]
    done = {single[0], single[1], single[3], single[4], single[5], single[6], blind[0], blind[1], double[0]}
    assert stats["general"]["done"] == len(done)
    assert stats["general"]["in_flight"] == len(general) - len(done) - 2  # the rest still leased to the sink
    assert stats["specialist"]["depth"] == sum(r["tier"] == "specialist" for r in rows.values()) + 1  # escalated
    assert stats["adjudicator"]["depth"] == 1  # the overlap item whose two verdicts disagree

    # An annotation edited after it was pulled is not resubmitted (a verdict cannot change).
    admin.call("PATCH", f"/api/annotations/{edited['id']}/",
               body={"result": annotation(CLASSES[(CLASSES.index(other[single[1]]) + 1) % 4])["result"]})
    assert sink.pull()["changed"] == 1 and queue.verdicts().num_rows == 13

    # A fresh sink (a restart) finds the project and its tasks, adds none, and re-reads every
    # annotation: the queue keeps one verdict each and refuses the edited one.
    again = LabelStudioSink(queue, label_studio.url, label_studio.token, tier="general", classes=CLASSES,
                            view='<Text name="uri" value="$uri"/>')
    assert again.project == sink.project and again.push()["created"] == 0
    assert again.pull() == {"annotations": 14, "stored": 0, "duplicates": 12, "refused": 1, "skipped": 1, "changed": 0}
    assert queue.verdicts().num_rows == 13
    print(f"\nround trip: {len(general)} items pushed in {pushed_s:.2f} s, {len(expected)} verdicts pulled in {pulled_s:.2f} s")

    # The specialist tier: its own project; the escalated item keeps its history; an expired
    # lease is claimed again without a second task.
    up = LabelStudioSink(queue, label_studio.url, label_studio.token, tier="specialist", classes=CLASSES, lease=1.0)
    first = up.push()
    assert first["created"] == stats["specialist"]["depth"] and up.project != sink.project
    history = {t["data"]["id"]: t["data"]["history"] for t in up.client.tasks(up.project)}
    assert history[single[2]] == "general/bob@example.com: escalate"
    time.sleep(1.2)
    assert up.push() == {"claimed": first["created"], "created": 0, "renewed": first["created"]}
    assert len(list(up.client.tasks(up.project))) == first["created"]
    queue.close()


@pytest.mark.slow
def test_tokens_personal_access_renewed_and_legacy(label_studio):
    client = LabelStudioClient(label_studio.url, label_studio.token)
    assert client.call("GET", "/api/current-user/whoami")["email"] == label_studio.admin
    client._access = "expired"  # an access token Label Studio no longer takes: renewed on the 401
    assert client.call("GET", "/api/current-user/whoami")["email"] == label_studio.admin
    # Legacy tokens, where the organization turns them on.
    client.call("POST", "/api/jwt/settings", body={"api_tokens_enabled": True, "legacy_api_tokens_enabled": True})
    legacy = client.call("GET", "/api/current-user/token")["token"]
    assert LabelStudioClient(label_studio.url, legacy).call("GET", "/api/current-user/whoami")["email"] == label_studio.admin


@pytest.mark.slow
def test_a_failed_import_is_retried_without_a_second_task(label_studio, tmp_path, rng):
    from hitl_triage.serve.queue.labelstudio import LabelStudioError

    decisions, predictions = decision_batch(rng, 30, escalate_share=1.0, tiers=("general", "general"))
    queue = open_queue(f"sqlite:///{tmp_path / 'review.db'}", QueueOptions(overlap={"general": 0.5}))
    queue.enqueue(decisions, predictions)
    sink = LabelStudioSink(queue, label_studio.url, label_studio.token, tier="general", classes=CLASSES,
                           project="import retried")
    call = sink.client.call

    def lost_reply(method, path, **kwargs):  # Label Studio stores the tasks, the reply never comes
        reply = call(method, path, **kwargs)
        if path.endswith("/import"):
            sink.client.call = call
            raise LabelStudioError("Label Studio POST import: connection reset")
        return reply

    sink.client.call = lost_reply  # type: ignore[method-assign]
    with pytest.raises(LabelStudioError, match="connection reset"):
        sink.push()
    assert sink.push() == {"claimed": 0, "created": 0, "renewed": 0}  # found in the project: none added
    tasks = list(sink.client.tasks(sink.project))
    ids = [f"p-{i}" for i in range(30)]
    needed = dict(zip(ids, queue.options.needed(ids, "general").tolist()))
    assert sorted(t["data"]["id"] for t in tasks) == sorted(ids)
    assert {t["data"]["id"]: t["overlap"] for t in tasks} == needed  # the overlap set on the retry
    queue.close()
