"""The export HTTP API (gateway.web) as a client sees it: a real gateway on loopback, data sent
with dcmsend from several calling AEs, archives fetched over HTTP and checked whole
(``tests.test_export.check_archive``: ``unzip -t``, ``sha256sum -c``, the schema, every
``.dcm`` the spool's bytes with the UIDs received)."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import sqlalchemy as sa
import urllib3
from alembic import command
from alembic.config import Config

from gateway.app import Gateway
from gateway.config import ExportJob, GatewayConfig
from gateway.db.engine import make_engine
from gateway.db.migrate import MIGRATIONS, upgrade
from gateway.export import metadata
from gateway.query.attributes import changed_values, ledger_values
from gateway.web import api as web_api
from gateway.web.auth import new_token, token_sha256
from tests.conftest import rows, wait_for
from tests.factory import make_dataset, write_file
from tests.test_export import check_archive, export_rows, send, simple_study

SITES = [{"name": "north", "calling_aes": ["MOD_A"], "institution_names": ["Klinikum Süd"]},
         {"name": "south", "calling_aes": ["MOD_B"]}]
PATIENT_A = "Müller Jörg/../1"  # non-ASCII, a space, a slash, two dots: all of it the ID
PLAIN = {"previews": False, "dicomdir": False}


@dataclass
class Api:
    app: Gateway
    db: str
    spool: Path
    base: str
    tokens: dict[str, str]  # name -> token
    studies: dict[str, str]  # label -> Study Instance UID
    out: Path

    def get(self, path: str, token: str | None = None, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.tokens[token]}"} if token else {}
        return urllib3.request("GET", self.base + path, headers=headers, retries=False,
                               timeout=60, **kwargs)

    def save(self, path: str, token: str, name: str) -> Path:
        response = self.get(path, token)
        assert response.status == 200, response.data
        target = self.out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(response.data)
        return target


def make_api(make_gateway: Callable[..., Gateway], tmp_path: Path, db: str,
             options: dict[str, Any] | None = None) -> Api:
    tokens = {name: new_token() for name in ("north", "south", "admin", "north_admin")}
    grants = {"north": ("exporter", ["north"]), "south": ("exporter", ["south"]),
              "admin": ("admin", ["*"]), "north_admin": ("admin", ["north"])}
    app = make_gateway(db=db, sites=SITES, api={
        "tokens": [{"name": n, "sha256": token_sha256(tokens[n]), "role": role, "sites": sites}
                   for n, (role, sites) in grants.items()],
        "export_options": options or PLAIN})
    send_to = tmp_path / "send"
    north = simple_study(send_to / "north", 3, PatientID=PATIENT_A, PatientName="Jörg^Müller",
                         SpecificCharacterSet="ISO_IR 192")
    south = simple_study(send_to / "south", 2, PatientID="PAT-SOUTH", PatientName="Süd^Bob")
    mixed = simple_study(send_to / "mixed", 3, PatientID="PAT-MIXED", PatientName="Mix^Ed")
    by_name = simple_study(send_to / "inst", 2, PatientID="PAT-INST", PatientName="Inst^Ina",
                           SpecificCharacterSet="ISO_IR 192", InstitutionName="Klinikum Süd")
    nobody = simple_study(send_to / "nobody", 1, PatientID="PAT-NOBODY", PatientName="No^Body")
    port = app.config.dicom.port
    send(port, north + mixed[:2], "MOD_A")
    send(port, south + mixed[2:], "MOD_B")
    send(port, by_name + nobody, "OTHER_AE")
    wait_for(lambda: len(rows(db, "SELECT id FROM instances")) == 11, 30, "11 instances kept")
    assert app.http is not None
    studies = {label: _study(files) for label, files in (
        ("north", north), ("south", south), ("mixed", mixed), ("inst", by_name),
        ("nobody", nobody))}
    return Api(app, db, app.config.storage.spool_dir, f"http://127.0.0.1:{app.http.port}",
               tokens, studies, tmp_path / "out")


def encoded(patient_id: str) -> str:
    """Percent-encoded whole, dots too: a client removes "." and ".." path segments
    (RFC 3986 5.2.4) unless they are encoded."""
    return quote(patient_id, safe="").replace(".", "%2E")


def _study(files: list[Path]) -> str:
    import pydicom

    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


@pytest.fixture
def api(make_gateway: Callable[..., Gateway], tmp_path: Path, db_url: str) -> Api:
    return make_api(make_gateway, tmp_path, db_url)


def leftovers(api: Api) -> list[Path]:
    root = api.spool / web_api.TEMPORARY
    return list(root.rglob("*")) if root.exists() else []


# -- the routes -----------------------------------------------------------------------------------

def test_sites_routes_and_archives_on_both_databases(
        api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    north = api.studies["north"]
    # a study: the ZIP verifies whole, named as the archive, audited as api:north
    response = api.get(f"/api/export/study/{north}", "north")
    assert response.status == 200, response.data
    assert response.headers["Content-Type"] == "application/zip"
    assert response.headers["Content-Disposition"] == (
        f'attachment; filename="study_{north}_export.zip"')
    (api.out / "s.zip").parent.mkdir(parents=True)
    (api.out / "s.zip").write_bytes(response.data)
    checked = check_archive(api.out / "s.zip", api.db, api.spool, "study_data.json")
    assert len([n for n in checked.names if n.endswith(".dcm")]) == 3
    (row, detail), = export_rows(api.db)
    assert (row.actor, detail["outcome"], detail["instances"]) == ("api:north", "success", 3)

    # the patient: its ID percent-encoded whole ('/' as %2F) reaches the selector exactly
    path = f"/api/export/patient/{encoded(PATIENT_A)}"
    checked = check_archive(api.save(path, "north", "p.zip"), api.db, api.spool,
                            "patient_data.json")
    assert checked.document["patient"]["patientID"] == PATIENT_A

    # Institution Name makes an instance the site's, whatever AE sent it
    assert api.get(f"/api/export/study/{api.studies['inst']}", "north").status == 200
    assert rows(api.db, "SELECT DISTINCT institution_name FROM instances WHERE "
                "study_instance_uid = :s", s=api.studies["inst"])[0][0] == "Klinikum Süd"

    # another site's study or patient, a mixed study, nothing at all: the same 404
    bodies = set()
    for path in (f"/api/export/study/{api.studies['south']}",
                 f"/api/export/study/{api.studies['mixed']}",
                 f"/api/export/study/{api.studies['nobody']}",
                 "/api/export/study/1.2.3.4.5.6.7.8.9"):
        response = api.get(path, "north")
        assert response.status == 404, path
        bodies.add(response.data)
    assert len(bodies) == 1 and b"visible to this token" in bodies.pop()
    patients = set()
    for patient in ("PAT-SOUTH", "PAT-MIXED", "PAT-NOBODY", "NO-SUCH-PATIENT"):
        response = api.get(f"/api/export/patient/{encoded(patient)}", "north")
        assert response.status == 404, patient
        patients.add(response.data)
    assert len(patients) == 1
    assert api.get(f"/api/export/study/{api.studies['mixed']}", "south").status == 404
    assert api.get(f"/api/export/study/{api.studies['south']}", "south").status == 200

    # all: admins only; a site admin's holds its site's patients only
    assert api.get("/api/export/all", "north").status == 403
    outer = api.save("/api/export/all", "north_admin", "all.zip")
    assert set(inner_archives(outer, api)) == {"PAT-INST", PATIENT_A}
    outer = api.save("/api/export/all", "admin", "everything.zip")
    assert set(inner_archives(outer, api)) == {PATIENT_A, "PAT-SOUTH", "PAT-MIXED", "PAT-INST",
                                               "PAT-NOBODY"}
    actors = {r.actor for r, _ in export_rows(api.db)}
    assert actors == {"api:north", "api:south", "api:north_admin", "api:admin"}

    assert not leftovers(api)
    for token in api.tokens.values():
        assert token not in caplog.text
    for patient in (PATIENT_A, "PAT-SOUTH", "PAT-MIXED", "PAT-INST", "PAT-NOBODY", "Müller"):
        assert patient not in caplog.text


def inner_archives(outer: Path, api: Api) -> list[str]:
    """The outer ZIP of /all verifies, and so does every patient archive in it; their IDs."""
    import subprocess

    tested = subprocess.run(["unzip", "-t", str(outer)], capture_output=True, text=True,
                            check=False)
    assert tested.returncode == 0, tested.stdout
    found = []
    with zipfile.ZipFile(outer) as archive:
        for number, info in enumerate(archive.infolist()):
            assert info.filename.startswith("patient_") and info.filename.endswith(".zip")
            inner = outer.with_name(f"{outer.stem}-{number}.zip")
            inner.write_bytes(archive.read(info))
            checked = check_archive(inner, api.db, api.spool, "patient_data.json")
            found.append(checked.document["patient"]["patientID"])
    return found


def test_tokens_and_parameters_are_refused_clearly(
        make_gateway: Callable[..., Gateway], tmp_path: Path, sqlite_url: str) -> None:
    api = make_api(make_gateway, tmp_path, sqlite_url)
    study = f"/api/export/study/{api.studies['north']}"
    missing = api.get(study)
    assert missing.status == 401 and missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in missing.json()["fix"]
    wrong = "x" + api.tokens["north"]
    unknown = urllib3.request("GET", api.base + study, retries=False,
                              headers={"Authorization": f"Bearer {wrong}"})
    assert unknown.status == 401 and 'error="invalid_token"' in unknown.headers["WWW-Authenticate"]
    assert wrong.encode() not in unknown.data
    basic = urllib3.request("GET", api.base + study, retries=False,
                            headers={"Authorization": "Basic " + api.tokens["north"]})
    assert basic.status == 401
    for query, named in (("format=folder", "'folder'"), ("includeImages=maybe", "'maybe'"),
                         ("include_images=false", "'include_images'"),
                         ("format=zip&format=json", "2 times")):
        response = api.get(f"{study}?{query}", "north")
        assert response.status == 400, query
        assert named in response.json()["error"]
        assert response.json()["fix"]
    assert "zip or json" in api.get(f"{study}?format=folder", "north").json()["fix"]
    assert api.get("/api/export/study/not-a-uid", "north").status == 400
    assert api.get("/api/export/elsewhere", "north").status == 404
    assert api.get(study).status == 401  # no token: 401 before anything else

    # format=json: the document alone, valid against the schema
    response = api.get(f"{study}?format=json", "north")
    assert response.status == 200 and response.headers["Content-Type"] == "application/json"
    document = response.json()
    metadata.check(document)
    assert len(document["instances"]) == 3
    # includeImages=false: a ZIP of the JSON and the manifest
    path = api.save(f"{study}?includeImages=false", "north", "meta.zip")
    checked = check_archive(path, api.db, api.spool, "study_data.json")
    assert not [n for n in checked.names if n.endswith(".dcm")]
    assert checked.document["metadata"]["includesImages"] is False
    # /metrics and /healthz are as they were, on the same port, without a token
    assert urllib3.request("GET", api.base + "/healthz").json()["status"] == "ok"
    assert b"gateway_" in urllib3.request("GET", api.base + "/metrics").data


# Patient IDs as a class: what LO allows (PS3.5 6.2: no backslash, no control characters)
PATIENT_IDS = ["Ğürsoy Ayşe", "a/b", "..", "../../etc", "x/../y", "100%", "a+b c", "日本/語",
               "%2F", "?#;"]


def test_patient_ids_of_every_kind_work_end_to_end(
        make_gateway: Callable[..., Gateway], tmp_path: Path, sqlite_url: str) -> None:
    tokens = {"t": new_token()}
    app = make_gateway(db=sqlite_url, api={"tokens": [
        {"name": "t", "sha256": token_sha256(tokens["t"]), "role": "exporter",
         "sites": ["*"]}], "export_options": PLAIN})
    files = [write_file(make_dataset(PatientID=pid, SpecificCharacterSet="ISO_IR 192"),
                        tmp_path / "send" / f"{n}.dcm") for n, pid in enumerate(PATIENT_IDS)]
    send(app.config.dicom.port, files)
    wait_for(lambda: len(rows(sqlite_url, "SELECT id FROM instances")) == len(PATIENT_IDS), 30,
             "every instance kept")
    assert app.http is not None
    for pid in PATIENT_IDS:
        response = urllib3.request(
            "GET", f"http://127.0.0.1:{app.http.port}/api/export/patient/{encoded(pid)}",
            headers={"Authorization": f"Bearer {tokens['t']}"}, retries=False)
        assert response.status == 200, (pid, response.data)
        with zipfile.ZipFile(io.BytesIO(response.data)) as archive:
            document = json.loads(archive.read("patient_data.json"))
            assert archive.testzip() is None
        assert document["patient"]["patientID"] == pid
        assert "/" not in response.headers["Content-Disposition"].split("filename=")[1]


# -- streaming --------------------------------------------------------------------------------------

@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """The API's exports stop after their third instance until the test sets the event."""
    gate = threading.Event()
    original = web_api._Reporter.advance
    count = {"n": 0}

    def advance(self: Any, instances: int, bytes: int, skipped: bool = False) -> None:
        count["n"] += 1
        if count["n"] == 3:
            assert gate.wait(30), "the test never opened the gate"
        original(self, instances, bytes, skipped)

    monkeypatch.setattr(web_api._Reporter, "advance", advance)
    yield gate
    gate.set()


def open_stream(api: Api, path: str, token: str) -> tuple[http.client.HTTPConnection,
                                                           http.client.HTTPResponse]:
    host, port = api.base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("GET", path, headers={"Authorization": f"Bearer {api.tokens[token]}"})
    return connection, connection.getresponse()


def test_bytes_reach_the_client_while_the_archive_is_built(
        make_gateway: Callable[..., Gateway], tmp_path: Path, sqlite_url: str,
        gated: threading.Event) -> None:
    api = make_api(make_gateway, tmp_path, sqlite_url)
    connection, response = open_stream(api, f"/api/export/study/{api.studies['north']}", "north")
    assert response.status == 200
    first = response.read1(1 << 20)  # the first instances' entries, final already
    assert first.startswith(b"PK\x03\x04")
    # the export is still running (held after its third instance): no audit row yet
    assert export_rows(api.db) == []
    assert leftovers(api)
    gated.set()
    whole = first + response.read()
    connection.close()
    (api.out).mkdir(parents=True)
    (api.out / "streamed.zip").write_bytes(whole)
    check_archive(api.out / "streamed.zip", api.db, api.spool, "study_data.json")
    (row, detail), = export_rows(api.db)
    assert (row.actor, detail["sha256"]) == ("api:north", hashlib.sha256(whole).hexdigest())
    wait_for(lambda: not leftovers(api), 10, "the temporary folder removed")


def test_a_client_that_leaves_mid_stream_leaves_nothing_behind(
        make_gateway: Callable[..., Gateway], tmp_path: Path, sqlite_url: str,
        gated: threading.Event) -> None:
    api = make_api(make_gateway, tmp_path, sqlite_url)
    connection, response = open_stream(api, f"/api/export/study/{api.studies['north']}", "north")
    assert response.status == 200
    assert response.read1(1 << 20).startswith(b"PK")
    assert leftovers(api)
    response.close()
    connection.close()
    gated.set()
    wait_for(lambda: not leftovers(api), 15, "the temporary files removed")
    wait_for(lambda: export_rows(api.db), 10, "the cancelled export audited")
    (row, detail), = export_rows(api.db)
    assert (row.actor, detail["outcome"]) == ("api:north", "cancelled")
    # and the API still answers
    assert api.get(f"/api/export/study/{api.studies['north']}", "north").status == 200


# -- ledger, migration, configuration ----------------------------------------------------------

def test_institution_name_is_a_ledger_column_on_ingest_and_remap() -> None:
    ds = make_dataset(InstitutionName="Klinikum Süd")
    assert ledger_values(ds, {})["institution_name"] == "Klinikum Süd"
    assert ledger_values(ds, {"InstitutionName": "Other"})["institution_name"] == "Other"
    assert changed_values({"InstitutionName": "Other"}) == {"institution_name": "Other"}


def test_migration_0011_up_and_down(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine, "0010")
        assert "institution_name" not in columns(engine)
        upgrade(engine, "0011")
        assert "institution_name" in columns(engine)
        assert "ix_instances_institution_name" in {
            i["name"] for i in sa.inspect(engine).get_indexes("instances")}
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0010")
        assert "institution_name" not in columns(engine)
        upgrade(engine)
        assert "institution_name" in columns(engine)
    finally:
        engine.dispose()


def columns(engine: sa.Engine) -> set[str]:
    return {c["name"] for c in sa.inspect(engine).get_columns("instances")}


def config_with(**data: Any) -> Any:
    return GatewayConfig.model_validate(data)


@pytest.mark.parametrize(("api", "problem"), [
    ({"tokens": [{"name": "t", "sha256": "A" * 64, "role": "admin", "sites": ["*"]}]},
     "64 lowercase hex"),
    ({"tokens": [{"name": "t", "sha256": "ab" * 16, "role": "admin", "sites": ["*"]}]},
     "gateway token new"),
    ({"tokens": [{"name": "t", "sha256": "a" * 64, "role": "admin", "sites": ["nort"]}]},
     "did you mean 'north'?"),
    ({"tokens": [{"name": "t", "sha256": "a" * 64, "role": "boss", "sites": ["*"]}]},
     "'admin' or 'exporter'"),
    ({"tokens": [{"name": "t", "sha256": "a" * 64, "role": "admin", "sites": ["*", "north"]}]},
     "stands alone"),
])
def test_check_config_names_the_bad_token_key(tmp_path: Path, api: dict[str, Any],
                                              problem: str) -> None:
    from tests.conftest import write_toml

    path = write_toml(tmp_path / "g.toml", {"sites": SITES, "api": {}})
    text = path.read_text(encoding="utf-8").replace("[api]\n", "")
    for token in api["tokens"]:
        text += "\n[[api.tokens]]\n" + "\n".join(
            f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in token.items()) + "\n"
    path.write_text(text, encoding="utf-8")
    from gateway.config import load
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError) as raised:
        load(path, environ={})
    message = "\n".join(raised.value.problems)
    assert problem in message, message
    assert "ab" * 16 not in message  # a token pasted as its hash is not printed back
    assert "api.tokens" in message


def test_an_export_job_selects_by_site_with_the_same_rule(
        make_gateway: Callable[..., Gateway], tmp_path: Path, db_url: str) -> None:
    from gateway.db.engine import make_sessions
    from gateway.export.service import run_job

    api = make_api(make_gateway, tmp_path, db_url)
    data = api.app.config.model_dump(mode="json")
    data["jobs"] = [{"name": "north-nightly", "kind": "export", "every_s": 3600,
                     "destination": str(tmp_path / "nightly"), "select": {"sites": ["north"]},
                     "options": PLAIN}]
    config = GatewayConfig.model_validate(data)
    engine = make_engine(api.db)
    try:
        job = config.jobs[0]
        assert isinstance(job, ExportJob)
        counts = run_job(config, job, make_sessions(engine), "node",
                         lambda: datetime.now(UTC),
                         lambda line: None)
    finally:
        engine.dispose()
    made = sorted(p.name for p in (tmp_path / "nightly").iterdir())
    assert made == sorted(f"study_{api.studies[s]}_export.zip" for s in ("north", "inst"))
    assert counts["archives"] == 2
