"""Operating conventions (issue 14): --version, --log-level, JSON logs, /readyz
apart from /healthz, events reporting the Pod's name."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import pytest

from tether import cli, logs
from tether.health import Health


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("tether ")


def test_log_level_flag_is_parsed() -> None:
    args = cli._parser(cli._commands()).parse_args(["run", "--log-level", "warning"])
    assert args.log_level == "warning"
    with pytest.raises(SystemExit):
        cli._parser(cli._commands()).parse_args(["run", "--log-level", "loud"])


def test_log_level_is_applied() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure(fmt="text", level="warning")
        assert root.level == logging.WARNING
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def test_json_lines_have_iso_time_with_zone_and_keep_every_field() -> None:
    record = logging.LogRecord("tether.reconciling", logging.WARNING, __file__, 1, "stuck %s", ("x",), None)
    record.tether_ref = {"namespace": "ns", "name": "web", "kind": "consulservices"}
    record.attempt = 3
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["time"].endswith("+00:00") and "T" in line["time"]
    assert (line["level"], line["logger"], line["message"]) == ("warning", "tether.reconciling", "stuck x")
    fields = (line["namespace"], line["name"], line["kind"], line["attempt"])
    assert fields == ("ns", "web", "consulservices", 3)


def test_readiness_is_not_liveness() -> None:
    health = Health()
    assert health.problem() is None  # alive from the first second
    assert health.unready() == "starting"  # but not ready yet
    health.ready, health.state = True, "ok"
    assert health.unready() is None
    health.ready, health.state = False, "stopping"
    assert health.unready() == "stopping" and health.problem() is None


def test_a_wedged_operator_is_neither_alive_nor_ready() -> None:
    health = Health(wedged_after=0.0)
    health.ready = True
    health.progress = lambda: (True, 5)
    health.problem()  # first sight records the count
    assert health.problem() is not None and health.unready() is not None


async def test_events_name_the_pod_as_reporting_instance() -> None:
    from tether.api import ObjectRef
    from tether.clients.kube.client import Involved, KubeClient

    client = KubeClient(instance="tether-7d9f-abcde")
    sent: list[tuple[str, str, Any]] = []

    async def request(method: str, path: str, *, body: Any = None, **_: Any) -> Any:
        sent.append((method, path, body))
        return {}

    client.http.request = request  # type: ignore[method-assign]
    await client.event(Involved("ConsulService", ObjectRef("consulservices", "ns", "web"), "u"),
                       type_="Normal", reason="Registered", message="ok")
    assert [(m, p) for m, p, _ in sent] == [("POST", "apis/events.k8s.io/v1/namespaces/ns/events")]
    body = sent[0][2]
    assert body["apiVersion"] == "events.k8s.io/v1" and body["kind"] == "Event"
    assert body["reportingInstance"] == "tether-7d9f-abcde"
    assert body["reportingController"] == "tether.dev/operator"
    assert body["action"] == "Reconcile" and body["reason"] == "Registered"
    assert body["type"] == "Normal" and body["note"] == "ok"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", body["eventTime"])
    assert body["regarding"] == {"apiVersion": "tether.dev/v1alpha1", "kind": "ConsulService",
                                 "name": "web", "namespace": "ns", "uid": "u"}
    # The events.k8s.io/v1 API refuses the deprecated core fields on create.
    assert not {"source", "count", "firstTimestamp", "lastTimestamp", "involvedObject",
                "message"} & body.keys()


async def test_event_note_is_cut_to_1_kib_of_utf8() -> None:
    from tether.api import ObjectRef
    from tether.clients.kube.client import Involved, KubeClient

    client = KubeClient(instance="i")
    sent: list[Any] = []

    async def request(method: str, path: str, *, body: Any = None, **_: Any) -> Any:
        sent.append(body)
        return {}

    client.http.request = request  # type: ignore[method-assign]
    await client.event(Involved("EtcdConfig", ObjectRef("etcdconfigs", "ns", "c"), "u"),
                       type_="Warning", reason="Conflict", message="é" * 1000, action="Release")
    note = sent[0]["note"]
    assert len(note.encode()) <= 1024 and note == "é" * 512
    assert sent[0]["action"] == "Release"
