"""Label Studio as the reviewers' tool: a sink between one tier of the review queue and one
Label Studio project (``pip install 'hitl-triage[labelstudio]'``).

    queue = open_queue("sqlite:///review.db")
    sink = LabelStudioSink(queue, "http://localhost:8080", token, tier="general",
                           classes=profile.class_names)
    sink.push()    # claim the tier's open items and add them to the project as tasks
    sink.pull()    # the project's new annotations become verdicts, each submitted once

Push: the sink claims the tier's items under the reviewer name ``labelstudio:<project id>``
with a long lease (default 7 days) and imports each as a task whose data carries the item (id,
tier, source, category, reasons by name, history, and every pass-through column such as ``uri``)
and, unless the item is blind, the model's prediction as a Label Studio prediction with
``score`` = the item's priority (sort the Data Manager by "Prediction score"; with the project's
default sequential sampling the label stream follows import order, which is claim order, highest
priority first). A blind item (an audit sample served blind) has no prediction, and its data
says nothing of the model's opinion. Overlap items (two reviews needed) get task overlap 2. The
queue has no lease renewal: an item whose lease expires before anyone annotates it is claimed
again by the next push (its delivery count raised; after ``max_deliveries`` it is
dead-lettered), and the sink, which knows the project's tasks by item id, adds no second task.

Pull: the tasks updated since the last pull (less a margin, by the server's clock) are read
with their annotations, newest first; each annotation not pulled before becomes one verdict:
``reviewer`` = the annotator's email (or username), ``tier`` = the sink's tier, ``label`` = the
index of the chosen class, ``action`` = ``confirm`` when it is the predicted class, ``correct``
otherwise, or ``escalate`` / ``out_of_scope`` from the second control (which wins over a class).
Skipped (cancelled) annotations give no verdict. The queue is idempotent per (id, tier,
reviewer); the sink also remembers each annotation id with its ``updated_at``, so a second pull
submits nothing; an annotation edited after it was pulled is logged, never resubmitted (the
queue refuses a changed verdict). A verdict the queue refuses (the item moved on, or was done by
other reviewers) is logged and remembered as pulled. That memory is the process's: a restarted
sink reads every annotation once more, and the queue counts them as duplicates. A webhook
handler can simply call :meth:`LabelStudioSink.pull`.

Authentication: a personal access token (the default in Label Studio 1.23: a JWT refresh token,
exchanged at ``/api/token/refresh/`` for short-lived access tokens, renewed on expiry) or a
legacy token (``Authorization: Token``, only where the organization enables legacy tokens).

Why plain HTTP: ``label-studio-sdk`` 2.x pins ``opencv-python-headless`` 4.12, which caps numpy
below 2.3 (and brings pandas, nltk and a code generator); the handful of endpoints used here
do not need it.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import json
import logging
import math
import time
from typing import Any, Iterator, Sequence
from xml.sax.saxutils import quoteattr

from hitl_triage.engine.policy import reason_names

from .base import QueueError, ReviewQueue
from .items import DECISION_COLUMNS, PREDICTION_COLUMNS

log = logging.getLogger(__name__)

LABEL = "label"          # the Choices control of the class names
ROUTE = "route"          # the Choices control of "escalate" and "out of scope"
TARGET = "item"          # the Text object both controls label (the item's summary)
ROUTES = {"escalate": "escalate", "out of scope": "out_of_scope"}
# Item columns that are the queue's own, not pass-through input columns.
OWN_COLUMNS = frozenset(("id", "classes", "enqueued_at", "embedding", "blind", "deliveries", "lease_until", "history",
                         *DECISION_COLUMNS, *PREDICTION_COLUMNS))
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # the Data Manager's Datetime filter format


class LabelStudioError(RuntimeError):
    """A Label Studio call that failed: method, path, HTTP ``status`` and the server's detail."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def label_config(classes: Sequence[str], *, escalate: bool = True, view: str = "") -> str:
    """The project's label config: the item's summary (``$summary``), the caller's ``view`` (XML
    object tags showing the input, e.g. ``<Image name="image" value="$uri"/>``), one Choices
    control of the class names and one of "escalate" (left out at the top tier) and "out of scope"."""
    names = [str(c) for c in classes]
    if not names or len(set(names)) != len(names) or not all(names):
        raise ValueError(f"classes: expected distinct, non-empty class names, found {names}")
    choices = "".join(f"<Choice value={quoteattr(c)}/>" for c in names)
    routes = "".join(f"<Choice value={quoteattr(r)}/>" for r in ROUTES if escalate or r != "escalate")
    return (f'<View><Text name="{TARGET}" value="$summary"/>{view}'
            f'<Choices name="{LABEL}" toName="{TARGET}" choice="single" showInLine="true">{choices}</Choices>'
            f'<Header value="or"/><Choices name="{ROUTE}" toName="{TARGET}" choice="single">{routes}</Choices></View>')


def task_for(item: dict[str, Any], classes: Sequence[str]) -> dict[str, Any]:
    """The Label Studio task of one claimed item (a row of ``claim``, as a dict): its data, and
    the model's prediction with ``score`` = priority unless the item is blind."""
    extras = {k: _jsonable(v) for k, v in item.items() if k not in OWN_COLUMNS}
    reasons = ", ".join(reason_names(int(item.get("reason_mask") or 0)))
    history = "; ".join(item.get("history") or [])
    ours = {"id": item["id"], "tier": item["tier"], "source": item.get("source"), "category": item.get("category"),
            "reasons": reasons, "history": history}
    lines = [f"{k}: {v}" for k, v in ours.items() if v]
    lines += [f"{k}: {v}" for k, v in extras.items() if isinstance(v, (str, int, float)) and v != ""]
    task: dict[str, Any] = {"data": {**extras, **ours, "summary": "\n".join(lines)}}
    predicted = item.get("predicted_class")
    if not item.get("blind") and predicted is not None and 0 <= predicted < len(classes):
        priority = float(item.get("priority") or 0.0)
        task["predictions"] = [{
            "model_version": str(item.get("profile_version") or "hitl-triage"),
            "score": priority if math.isfinite(priority) else 0.0,
            "result": [{"from_name": LABEL, "to_name": TARGET, "type": "choices",
                        "value": {"choices": [str(classes[predicted])]}}],
        }]
    return task


def verdict_for(annotation: dict[str, Any], *, item_id: str, tier: str, reviewer: str, classes: Sequence[str],
                predicted: int | None) -> dict[str, Any] | None:
    """The verdict of one annotation, or None where it gives none (skipped, or nothing chosen).
    ``predicted``: the item's predicted class, None where it is not known here (a blind item):
    then ``action`` is None, meaning confirm if the queue's predicted class is the label, else
    correct (:meth:`LabelStudioSink.pull` asks the queue)."""
    if annotation.get("was_cancelled"):
        return None
    chosen: dict[str, str] = {}
    for region in annotation.get("result") or []:
        values = (region.get("value") or {}).get("choices") or []
        if region.get("from_name") in (LABEL, ROUTE) and values:
            chosen[region["from_name"]] = values[0]
    ts = dt.datetime.fromisoformat(annotation["created_at"].replace("Z", "+00:00"))
    verdict = {"id": item_id, "tier": tier, "reviewer": reviewer, "ts": ts, "label": -1}
    if chosen.get(ROUTE) in ROUTES:
        return {**verdict, "action": ROUTES[chosen[ROUTE]]}
    names = [str(c) for c in classes]
    if chosen.get(LABEL) not in names:
        return None
    label = names.index(chosen[LABEL])
    action = None if predicted is None else "confirm" if label == predicted else "correct"
    return {**verdict, "label": label, "action": action}


class LabelStudioClient:
    """The few Label Studio HTTP API calls the sink makes, authenticated by ``token`` (a personal
    access token or a legacy token)."""

    def __init__(self, url: str, token: str, *, timeout: float = 30.0):
        import requests  # the labelstudio extra

        self.url = url.rstrip("/")
        self.timeout = timeout
        self._http = requests.Session()
        self._refresh = token if _jwt_claims(token).get("token_type") == "refresh" else None
        self._access, self._expires = ("", 0.0) if self._refresh else (token, math.inf)
        self.server_time: dt.datetime | None = None  # from the last response's Date header

    def call(self, method: str, path: str, *, params: dict | None = None, body: Any = None) -> Any:
        for attempt in (0, 1):
            if self._refresh and (attempt or time.time() > self._expires - 30):
                self._renew()
            scheme = "Bearer" if self._refresh else "Token"
            response = self._http.request(method, self.url + path, params=params, json=body, timeout=self.timeout,
                                          headers={"Authorization": f"{scheme} {self._access}"})
            if response.status_code != 401 or not self._refresh:
                break
        if "Date" in response.headers:
            self.server_time = email.utils.parsedate_to_datetime(response.headers["Date"])
        if response.status_code >= 400:
            raise LabelStudioError(f"Label Studio {method} {path}: HTTP {response.status_code}: {response.text[:500]}",
                                   response.status_code)
        return response.json() if response.content else None

    def _renew(self) -> None:
        response = self._http.post(self.url + "/api/token/refresh/", json={"refresh": self._refresh}, timeout=self.timeout)
        if response.status_code != 200:
            raise LabelStudioError(f"Label Studio POST /api/token/refresh/: HTTP {response.status_code}: "
                                   f"{response.text[:500]} (is the personal access token revoked?)", response.status_code)
        self._access = response.json()["access"]
        self._expires = float(_jwt_claims(self._access).get("exp", time.time() + 60))

    def tasks(self, project: int, *, query: dict | None = None, fields: str | None = None,
              page_size: int = 100) -> Iterator[dict]:
        """The project's tasks (those ``query`` selects: Data Manager filters and ordering), page by page."""
        params: dict[str, Any] = {"project": project, "page_size": page_size}
        if query is not None:
            params["query"] = json.dumps(query)
        if fields:
            params["fields"] = fields
        page = 1
        while True:
            try:
                tasks = self.call("GET", "/api/tasks/", params={**params, "page": page})["tasks"]
            except LabelStudioError as error:
                if error.status == 404 and page > 1:  # past the last page
                    return
                raise
            yield from tasks
            if len(tasks) < page_size:
                return
            page += 1


class LabelStudioSink:
    """Moves one tier's items into a Label Studio project and its annotations back as verdicts
    (see the module docstring). One sink per project: it keeps, in memory, which items have a
    task (rebuilt from the project when it starts) and which annotations it has pulled.

    ``project``: the project's title (found, or created with :func:`label_config`) or its id;
    ``view``: XML shown above the choices (see :func:`label_config`); ``lease``: seconds the
    sink holds each item it pushed; ``margin_s``: how far back each pull looks past the last
    one (covers a transaction that committed late); ``page``: items per claim and tasks per request.
    """

    def __init__(self, queue: ReviewQueue, url: str | LabelStudioClient, token: str = "", *, tier: str,
                 classes: Sequence[str], project: str | int | None = None, view: str = "",
                 lease: float = 7 * 86400.0, margin_s: float = 60.0, page: int = 100):
        self.queue, self.tier, self.classes = queue, tier, [str(c) for c in classes]
        self.lease, self.margin_s, self.page = lease, margin_s, page
        self.client = url if isinstance(url, LabelStudioClient) else LabelStudioClient(url, token)
        if tier not in queue.options.tiers:
            raise QueueError(f"tier: expected one of {queue.options.tiers}, found {tier!r}")
        config = label_config(self.classes, escalate=queue.options.tier_above(tier) is not None, view=view)
        self.project = self._project(project if project is not None else f"hitl-triage {tier}", config)
        self.reviewer = f"labelstudio:{self.project}"
        self._tasks = self._known_tasks()
        self._pending: dict[str, dict[str, Any]] = {}  # claimed, import failed: retried by the next push
        self._pulled: dict[int, str] = {}  # annotation id -> its updated_at when pulled
        self._since: dt.datetime | None = None
        self._users: dict[int, str] = {}
        self._list_users = True

    def _project(self, project: str | int, config: str) -> int:
        if isinstance(project, int):
            found = self.client.call("GET", f"/api/projects/{project}/")
        else:
            listed = self.client.call("GET", "/api/projects/", params={"title": project, "page_size": 1000})
            found = next((p for p in listed.get("results", listed) if p["title"] == project), None)
        if found is None:
            created = self.client.call("POST", "/api/projects/", body={
                "title": project, "label_config": config, "maximum_annotations": 1,
                "description": f"hitl-triage review queue, tier {self.tier!r}: tasks pushed from the queue, "
                               "annotations pulled back as verdicts"})
            log.info("created Label Studio project %s (%r) for tier %r", created["id"], project, self.tier)
            return int(created["id"])
        if found["label_config"] != config:  # new class names: Label Studio checks existing annotations
            self.client.call("PATCH", f"/api/projects/{found['id']}/", body={"label_config": config})
        return int(found["id"])

    def _known_tasks(self) -> dict[str, int]:
        """Item id -> task id of every task in the project that carries an item."""
        return {t["data"]["id"]: t["id"] for t in self.client.tasks(self.project, page_size=1000) if "id" in t["data"]}

    def push(self, n: int | None = None) -> dict[str, int]:
        """Claim up to ``n`` (default: every) open item of the tier and add the new ones to the
        project. Returns counts: ``claimed``, ``created`` (tasks), ``renewed`` (items claimed
        again whose task exists)."""
        counts = {"claimed": 0, "created": 0, "renewed": 0}
        if self._pending:  # a failed import's items, still leased to us (a lease cannot be released)
            self._tasks = self._known_tasks()  # the failure may have come after Label Studio stored them
            retry = [item for item in self._pending.values() if item["id"] not in self._tasks]
            if retry:
                self._import(retry)
            self._set_overlap(list(self._pending))
            counts["created"] += len(retry)
            self._pending = {}
        while n is None or counts["claimed"] < n:
            want = self.page if n is None else min(self.page, n - counts["claimed"])
            items = self.queue.claim(self.tier, self.reviewer, n=want, lease=self.lease).to_pylist()
            counts["claimed"] += len(items)
            fresh = {item["id"]: item for item in items if item["id"] not in self._tasks}
            counts["renewed"] += len(items) - len(fresh)
            if fresh:
                self._pending = fresh
                self._import(list(fresh.values()))
                self._set_overlap(list(fresh))
                self._pending = {}
                counts["created"] += len(fresh)
            if len(items) < want:
                break
        return counts

    def _import(self, items: list[dict[str, Any]]) -> None:
        reply = self.client.call("POST", f"/api/projects/{self.project}/import", params={"return_task_ids": "true"},
                                 body=[task_for(item, self.classes) for item in items])
        ids = [item["id"] for item in items]
        task_ids = reply.get("task_ids") or []
        if len(task_ids) != len(ids):  # an older server: find them by item id
            known = self._known_tasks()
            task_ids = [known[i] for i in ids]
        self._tasks.update(zip(ids, task_ids))

    def _set_overlap(self, ids: list[str]) -> None:
        """Overlap items (two reviews needed) need two annotators before Label Studio calls their task done."""
        for item_id, needed in zip(ids, self.queue.options.needed(ids, self.tier)):
            if needed > 1:
                self.client.call("PATCH", f"/api/tasks/{self._tasks[item_id]}/", body={"overlap": int(needed)})

    def pull(self, *, full: bool = False) -> dict[str, int]:
        """Turn the project's annotations made since the last pull (every one when ``full``) into
        verdicts and submit them. Returns counts: ``annotations`` (new ones read), ``stored``,
        ``duplicates``, ``refused``, ``skipped`` (cancelled or empty), ``changed`` (edited after
        they were pulled: not resubmitted)."""
        self.client.call("GET", "/api/current-user/whoami")  # the server's clock, before reading
        started = self.client.server_time or dt.datetime.now(dt.timezone.utc)
        filters = [{"filter": "filter:tasks:total_annotations", "operator": "greater", "type": "Number", "value": 0}]
        if self._since is not None and not full:
            filters.append({"filter": "filter:tasks:updated_at", "operator": "greater_or_equal", "type": "Datetime",
                            "value": self._since.strftime(TIME_FORMAT)})
        # Newest first: a task updated while we page moves to the front (read by the next pull),
        # so it shifts the unread ones back, never past us.
        query = {"filters": {"conjunction": "and", "items": filters}, "ordering": ["-tasks:updated_at"]}
        counts = dict.fromkeys(("annotations", "stored", "duplicates", "refused", "skipped", "changed"), 0)
        verdicts, seen = [], {}
        for task in self.client.tasks(self.project, query=query, fields="all", page_size=self.page):
            if (task.get("data") or {}).get("id") is None:
                continue  # a task the sink did not make
            predicted = _predicted(task, self.classes)
            for annotation in task.get("annotations") or []:
                key, stamp = int(annotation["id"]), str(annotation["updated_at"])
                if key in seen or self._pulled.get(key) == stamp:
                    continue
                seen[key] = stamp
                if key in self._pulled:
                    log.warning("annotation %s of task %s (item %r) was edited after it was pulled; a verdict cannot "
                                "change, so the edit is not submitted", key, task["id"], task["data"].get("id"))
                    counts["changed"] += 1
                    continue
                counts["annotations"] += 1
                verdict = verdict_for(annotation, item_id=str(task["data"]["id"]), tier=self.tier,
                                      reviewer=self._reviewer(annotation), classes=self.classes, predicted=predicted)
                if verdict is None:
                    counts["skipped"] += 1
                else:
                    verdicts.append(verdict)
        for name, count in self._submit(verdicts).items():
            counts[name] += count
        self._pulled.update(seen)  # only now: a pull that failed half-way is read again
        self._since = started - dt.timedelta(seconds=self.margin_s)
        return counts

    def _submit(self, verdicts: list[dict[str, Any]]) -> dict[str, int]:
        counts = {"stored": 0, "duplicates": 0, "refused": 0}
        known = [v for v in verdicts if v["action"] is not None]
        try:
            reply = self.queue.submit(known) if known else {}
        except QueueError:  # all or nothing: find the refused ones one by one
            reply = {}
            for v in known:
                self._submit_one(v, [v["action"]], counts)
        for name in ("stored", "duplicates"):
            counts[name] += reply.get(name, 0)
        for v in verdicts:
            if v["action"] is None:  # blind: the queue holds the predicted class; a wrong confirm is refused
                self._submit_one(v, ["confirm", "correct"], counts)
        return counts

    def _submit_one(self, verdict: dict[str, Any], actions: list[str], counts: dict[str, int]) -> None:
        refusal: QueueError | None = None
        for action in actions:
            try:
                reply = self.queue.submit([{**verdict, "action": action}])
            except QueueError as error:
                refusal = error
                continue
            counts["stored"] += reply["stored"]
            counts["duplicates"] += reply["duplicates"]
            return
        log.warning("Label Studio project %s: the queue refused %s's verdict on %r: %s",
                    self.project, verdict["reviewer"], verdict["id"], refusal)
        counts["refused"] += 1

    def _reviewer(self, annotation: dict[str, Any]) -> str:
        user = annotation.get("completed_by")
        user = user.get("id") if isinstance(user, dict) else user
        if user not in self._users and self._list_users:
            try:
                listed = self.client.call("GET", "/api/users/")
                self._users = {int(u["id"]): u.get("email") or u.get("username") or f"user-{u['id']}" for u in listed}
            except LabelStudioError as error:  # not an organization admin: the annotation's own label
                log.info("cannot list Label Studio users (%s); reading each annotation's created_username", error)
                self._list_users = False
        if user in self._users:
            return self._users[user]
        name = str(annotation.get("created_username") or "").rsplit(",", 1)[0].split()  # "first last email, id"
        return name[-1] if name else f"labelstudio-user-{user}"

    def sync(self, n: int | None = None) -> dict[str, int]:
        """:meth:`pull` then :meth:`push`: call it more often than ``lease``."""
        return {**self.pull(), **self.push(n)}


def _predicted(task: dict[str, Any], classes: Sequence[str]) -> int | None:
    """The predicted class the sink attached to ``task`` (None: a blind item)."""
    for prediction in task.get("predictions") or []:
        for region in prediction.get("result") or []:
            values = (region.get("value") or {}).get("choices") or []
            if region.get("from_name") == LABEL and values and values[0] in classes:
                return list(classes).index(values[0])
    return None


def _jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT (unverified: only to tell a refresh token and read its expiry), {} if none."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        return json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return {}


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


__all__ = ["LabelStudioClient", "LabelStudioError", "LabelStudioSink", "label_config", "task_for", "verdict_for"]
