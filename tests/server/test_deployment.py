"""A real deployment on 127.0.0.1: a SuperLink and three SuperNodes over TLS with node authentication.

Everything runs through the commands users run (``fedsilo-server init/admit/start/run``,
``fedsilo-client keys/start``), as separate processes on free ports, and is stopped
afterwards. The run is interrupted after its first round (the SuperLink is stopped
and restarted) and finished with ``run --resume``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedsilo.common.accounting import epsilon_spent
from fedsilo.common.datasets import load_builtin
from fedsilo.common.ledger import PrivacyLedger
from fedsilo.runtime.keys import issue_server_certificates
from fedsilo.runtime.processes import executable, flower_env, free_port
from fedsilo.server.processes import healthy

pytestmark = pytest.mark.deployment
BANKS = ("bank-1", "bank-2", "bank-3")
ROUNDS = 2


class Processes:
    """Background processes with their output in files; all stopped at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[subprocess.Popen[bytes]] = []

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, *, ctrl_c: bool = False
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` with its output in ``name``.log; ``ctrl_c``: SIGINT acts as at a terminal.

        A test run started in the background (``make test &``, a CI runner) ignores SIGINT, and
        its children inherit that; ``ctrl_c`` gives the process SIGINT's default action back.
        """
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        preexec = (lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if ctrl_c else None
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=preexec
        )
        self.running.append(process)
        return process

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    @staticmethod
    def stop(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def stop_all(self) -> None:
        for process in reversed(self.running):
            self.stop(process)
            with contextlib.suppress(ProcessLookupError):  # what the group left behind (Flower's helpers)
                os.killpg(process.pid, signal.SIGKILL)


def wait_for(what: str, condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("deployment")
    (root / "logs").mkdir()
    procs = Processes(root / "logs")
    port = free_port()
    fed = root / "fed"
    server, client = executable("fedsilo-server"), executable("fedsilo-client")
    done = cli(server, "init", str(fed), "--dataset", "german-credit", "--port", str(port))
    assert done.returncode == 0, done.stdout + done.stderr
    # German credit, split three ways: each bank holds its own CSV.
    frame = load_builtin("german-credit").frame
    order = np.random.default_rng(0).permutation(len(frame))
    # The banks accept SecAgg+ rounds of two (the deployed default is three), so that a round of the
    # kept-institutions restart test goes on when one of them drops out (see that test).
    policy = "max-epsilon = 10.0\nmin-noise-multiplier = 0.3\nshare-eval-metrics = true\nmin-round-size = 2\n"
    (root / "policy.toml").write_text(policy)
    for bank, rows in zip(BANKS, np.array_split(order, 3), strict=True):
        (root / bank).mkdir()
        frame.iloc[np.sort(rows)].to_csv(root / bank / "records.csv", index=False)
        assert cli(client, "keys", str(root / bank)).returncode == 0
        admitted = cli(server, "admit", str(fed), str(root / bank / "node.key.pub"), "--name", bank)
        assert admitted.returncode == 0, admitted.stdout + admitted.stderr
    assert cli(client, "keys", str(root / "intruder")).returncode == 0  # never admitted

    def start_server() -> subprocess.Popen[bytes]:
        process = procs.start("server", [server, "start", str(fed)])
        wait_for("the SuperLink", lambda: healthy(f"127.0.0.1:{port}", fed / "certs" / "ca.crt"), 60)
        return process

    def start_bank(bank: str, *extra: str, data: Path | None = None) -> subprocess.Popen[bytes]:
        argv = [client, "start", "--server", f"127.0.0.1:{port}", "--ca", str(fed / "certs" / "ca.crt")]
        argv += ["--key", str(root / bank / "node.key"), "--data", str(data or root / bank / "records.csv")]
        argv += ["--schema", str(fed / "schema.toml"), "--policy", str(root / "policy.toml")]
        argv += ["--state-dir", str(root / bank / "state"), "--name", bank, "--port", str(free_port()), *extra]
        return procs.start(bank, argv)

    context = {"root": root, "fed": fed, "port": port, "procs": procs}
    context.update(start_server=start_server, start_bank=start_bank, server=server)
    try:
        context["superlink"] = start_server()
        context["banks"] = {bank: start_bank(bank) for bank in BANKS}
        yield context
    finally:
        procs.stop_all()


def test_two_secure_rounds_survive_a_superlink_restart_and_resume(deployment: dict[str, Any]) -> None:
    fed, procs = deployment["fed"], deployment["procs"]
    run = procs.start("run", [deployment["server"], "run", str(fed), "--rounds", str(ROUNDS)])
    progress: list[Path] = []

    def first_round_done() -> bool:
        progress[:] = list((fed / "runs").glob("*/progress.json"))
        return bool(progress) and len(json.loads(progress[0].read_text())["rounds"]) >= 1  # round 1 evaluated

    wait_for("round 1", first_round_done, 400)
    run_dir = progress[0].parent
    # Stop everything mid-run (the institutions first, so that no SuperNode holds a message
    # of the stopped run), then bring the coordinator and the institutions back.
    for bank in deployment["banks"].values():
        procs.stop(bank)
    procs.stop(deployment["superlink"])
    procs.stop(run)
    assert not (run_dir / "report.json").exists()
    deployment["superlink"] = deployment["start_server"]()
    for bank in BANKS:
        deployment["banks"][bank] = deployment["start_bank"](bank)
    resumed = subprocess.run(
        [deployment["server"], "run", str(fed), "--resume"], capture_output=True, text=True, timeout=500, check=False
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr + procs.log("server")
    report = json.loads((run_dir / "report.json").read_text())
    # Round 1 ran once; the resumed run did round 2 only.
    assert [row["round"] for row in report["rounds"]] == [1, 2]
    assert f"rounds {ROUNDS} to {ROUNDS}" in resumed.stdout
    assert report["rounds_completed"] == ROUNDS and report["secure_aggregation"] is True
    assert 0 < report["final_metrics"]["accuracy"] <= 1  # the banks' policy shares evaluation metrics
    # A deployed federation's secure evaluation (on by default): round 2 scored round 1's model, pooled and noisy.
    # (At this size and epsilon the noise swamps ~200 held-out records: the figure is there, not its precision.)
    assert report["rounds"][-1]["dp_model_round"] == 1 and report["rounds"][-1]["dp_noise_sd"] > 0
    assert "accuracy" in report["secure_evaluation"]["latest"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-0001.pt", "round-0002.pt"]
    final, last = torch.load(run_dir / "model.pt"), torch.load(run_dir / "checkpoints" / "round-0002.pt")
    assert list(final) == list(last) and all(torch.equal(final[k], last[k]) for k in final)
    assert (run_dir / "schema.toml").read_text() == (fed / "schema.toml").read_text()
    # Each institution's epsilon in the report is what its own ledger says of this run (its share, not other runs').
    assert [i["name"] for i in report["institutions"]] == list(BANKS)
    for inst in report["institutions"]:
        (ledger_file,) = (deployment["root"] / inst["name"] / "state" / "ledgers").glob("*.json")
        ledger = PrivacyLedger.for_dataset(ledger_file.parent.parent, ledger_file.stem)
        this_run = [e.event() for e in ledger.entries if e.run_id == run_dir.name]
        assert inst["neighbouring"] == "replace-one"  # a deployed institution's default: its count is public
        spent = epsilon_spent(this_run, delta=inst["delta"], neighbouring=inst["neighbouring"])
        assert inst["epsilon"] == pytest.approx(spent, rel=1e-12)
        assert [e.round for e in ledger.entries if e.round == 1] == [1]  # the completed round was not repeated
        assert {e.round for e in ledger.entries} == {1, 2}
        assert inst["epsilon"] <= 10.0
    status = subprocess.run([deployment["server"], "status", str(fed)], capture_output=True, text=True, check=False)
    assert "healthy" in status.stdout and run_dir.name in status.stdout
    assert all(f"{bank} " in status.stdout for bank in BANKS)


def test_a_superlink_restart_mid_run_needs_no_institution_restart(deployment: dict[str, Any]) -> None:
    # The coordinator's machine goes down and comes back; the institutions' processes stay up,
    # drop what they held of the stopped run, and take part in the resumed run.
    fed, procs = deployment["fed"], deployment["procs"]
    before = set((fed / "runs").iterdir())
    # A stage of SecAgg+ waits at most 60 s (secagg-timeout), as a deployment should: a SuperNode kept
    # across the restart sometimes never answers the resumed run's first message (Flower 1.41 loses it
    # after the stopped run), and SecAgg+'s dropout handling lets the round go on with the others.
    argv = [deployment["server"], "run", str(fed), "--rounds", "3", "--config", "secagg-timeout=60"]
    run = procs.start("run-kept-banks", argv)
    progress: list[Path] = []

    def first_round_done() -> bool:
        progress[:] = [p for p in (fed / "runs").glob("*/progress.json") if p.parent not in before]
        return bool(progress) and len(json.loads(progress[0].read_text())["rounds"]) >= 1

    wait_for("round 1", first_round_done, 400)
    procs.stop(deployment["superlink"])
    procs.stop(run)
    deployment["superlink"] = deployment["start_server"]()
    try:
        argv = [deployment["server"], "run", str(fed), "--resume"]
        resumed = subprocess.run(argv, capture_output=True, text=True, timeout=400, check=False)
    finally:  # a resumed run that hangs must not leave a Flower run behind for the tests after this one
        cli(deployment["server"], "stop", str(fed))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr + procs.log("server")
    report = json.loads((progress[0].parent / "report.json").read_text())
    rounds = [row["round"] for row in report["rounds"]]
    assert rounds == sorted(set(rounds)) and rounds[-1] == 3 and report["rounds_completed"] == 3
    assert all(bank.poll() is None for bank in deployment["banks"].values())  # never restarted


def test_an_institution_that_was_not_admitted_is_refused(deployment: dict[str, Any]) -> None:
    data = deployment["root"] / "bank-1" / "records.csv"
    intruder = deployment["start_bank"]("intruder", "--max-retries", "1", data=data)
    assert intruder.wait(120) != 0
    assert "Failed to activate SuperNode" in deployment["procs"].log("intruder")


def test_a_client_that_does_not_trust_the_ca_cannot_connect(deployment: dict[str, Any]) -> None:
    other = deployment["root"] / "other-ca"
    issue_server_certificates(other)
    client = executable("fedsilo-client")
    port = deployment["port"]
    root = deployment["root"]
    argv = [client, "start", "--server", f"127.0.0.1:{port}", "--ca", str(other / "ca.crt")]
    argv += ["--key", str(root / "bank-1" / "node.key"), "--data", str(root / "bank-1" / "records.csv")]
    argv += ["--schema", str(deployment["fed"] / "schema.toml"), "--policy", str(root / "policy.toml")]
    argv += ["--state-dir", str(root / "untrusting"), "--port", str(free_port()), "--max-retries", "1"]
    process = deployment["procs"].start("untrusting", argv)
    assert process.wait(120) != 0
    assert "SSL/TLS handshake error" in deployment["procs"].log("untrusting")


def test_a_plaintext_client_cannot_talk_to_the_tls_server(deployment: dict[str, Any]) -> None:
    argv = [executable("flower-supernode"), "--superlink", f"127.0.0.1:{deployment['port']}", "--insecure"]
    argv += ["--port", str(free_port()), "--max-retries", "1"]
    process = deployment["procs"].start("plaintext", argv, env=flower_env(deployment["root"] / "plaintext"))
    assert process.wait(120) != 0
    assert "Giving up reconnection" in deployment["procs"].log("plaintext")


def test_bad_data_stops_an_institution_before_its_supernode_starts(deployment: dict[str, Any]) -> None:
    root = deployment["root"]
    (root / "broken.csv").write_text("a,b\n1,2\n")
    client = executable("fedsilo-client")
    argv = [client, "start", "--server", f"127.0.0.1:{deployment['port']}"]
    argv += ["--ca", str(deployment["fed"] / "certs" / "ca.crt"), "--key", str(root / "bank-1" / "node.key")]
    argv += ["--data", str(root / "broken.csv"), "--schema", str(deployment["fed"] / "schema.toml")]
    argv += ["--policy", str(root / "policy.toml"), "--state-dir", str(root / "broken-state")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert "broken.csv" in done.stdout and "the SuperNode was not started" in done.stdout
    assert not (root / "broken-state").exists()


def _post(address: str, path: str, ca: Path) -> tuple[int, str]:
    """A raw HTTPS POST (the path is sent as written, not normalised)."""
    import http.client
    import ssl

    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPSConnection(host, int(port), context=ssl.create_default_context(cafile=str(ca)))
    try:
        connection.request("POST", path, body=b"", headers={"Content-Type": "application/protobuf"})
        reply = connection.getresponse()
        return reply.status, reply.read().decode(errors="replace")
    finally:
        connection.close()


def test_the_public_port_serves_only_the_fleet_api(deployment: dict[str, Any]) -> None:
    fed, ca = deployment["fed"], deployment["fed"] / "certs" / "ca.crt"
    public = f"127.0.0.1:{deployment['port']}"
    internal = json.loads((fed / "superlink" / "superlink.json").read_text())["address"]
    assert internal != public and internal.startswith("127.0.0.1:")
    # The Control and Runtime APIs (no caller authentication in Flower 1.41) answer on loopback only.
    for path in ("/v1/control/list-runs", "/v1/control/stop-run", "/v1/runtime/get-run"):
        status, body = _post(public, path, ca)
        assert status == 404 and "only the Fleet API" in body, (path, status, body)
        assert "only the Fleet API" not in _post(internal, path, ca)[1], path  # Flower's own answer
    for path in ("/v1/fleet/../control/list-runs", "/v1/fleet/%2e%2e/control/list-runs", "/v1/fleetx/get-run"):
        assert _post(public, path, ca)[0] == 404, path
    # Fleet calls pass through to the SuperLink, whose node authentication refuses an unsigned call.
    status, body = _post(public, "/v1/fleet/get-run", ca)
    assert status == 401 and "SuperNode authentication" in body, (status, body)


EVIL_SERVER = """
import json
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes = list(grid.get_node_ids())
    content = RecordDict({"c": ConfigRecord({"marker": str(context.run_config["marker"])})})
    messages = [Message(content, dst_node_id=node, message_type="query") for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=120))
    answers = [r.error.code if r.has_error() else "ran" for r in replies]
    Path(str(context.run_config["out"])).write_text(json.dumps({"nodes": len(nodes), "answers": answers}))
"""
EVIL_CLIENT = """
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(message: Message, context: Context) -> Message:
    # What a malicious coordinator would ship: code that reads the institution's records.
    Path(str(message.content["c"]["marker"])).write_text(str(context.node_config.get("data-path")))
    return Message(RecordDict(), reply_to=message)
"""


def test_an_app_that_brings_its_own_code_is_refused_by_every_institution(deployment: dict[str, Any]) -> None:
    from fedsilo.server.federation import Federation
    from fedsilo.server.processes import flwr

    root, fed = deployment["root"], Federation(deployment["fed"])
    app = root / "evil-app"
    app.mkdir()
    (app / "evil_server.py").write_text(EVIL_SERVER)
    (app / "evil_client.py").write_text(EVIL_CLIENT)
    pyproject = (fed.write_app() / "pyproject.toml").read_text()
    pyproject = pyproject.replace('"fedsilo.client.client_app:app"', '"evil_client:app"')
    pyproject = pyproject.replace('"fedsilo.server.server_app:app"', '"evil_server:app"')
    (app / "pyproject.toml").write_text(
        pyproject.split("[tool.flwr.app.config]")[0] + '[tool.flwr.app.config]\nout = ""\nmarker = ""\n'
    )
    out, marker = root / "evil-answers.json", root / "evil-marker"
    submitted = flwr(fed, "run", str(app), "fedsilo", "--run-config", f'out="{out}" marker="{marker}"')
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    wait_for("the coordinator's app to collect its replies", out.exists, 180)
    answers = json.loads(out.read_text())
    assert answers["nodes"] == len(BANKS) and len(answers["answers"]) == len(BANKS), answers
    assert all(a != "ran" for a in answers["answers"]), answers  # every bank replied with Flower's INVALID_FAB
    assert not marker.exists()  # and no line of the coordinator's code ran at any institution
    assert all("refused a run's app" in deployment["procs"].log(bank) for bank in BANKS)


def test_ctrl_c_on_run_stops_the_flower_run_and_one_run_drives_at_a_time(deployment: dict[str, Any]) -> None:
    from fedsilo.server.federation import Federation
    from fedsilo.server.processes import active_runs

    fed, server, procs = deployment["fed"], deployment["server"], deployment["procs"]
    federation = Federation(fed)
    # Rounds enough that the run cannot finish before the Ctrl-C (a round takes seconds now).
    # PYTHONFAULTHANDLER: if the run hangs after Ctrl-C, SIGABRT below writes every thread's stack to its log.
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    first = procs.start("interrupted-run", [server, "run", str(fed), "--rounds", "50"], env=env, ctrl_c=True)
    wait_for("the run to start", lambda: bool(active_runs(federation)), 120)
    # Its progress streams as it comes (not held back in a pipe's buffer), and it is mid-run.
    wait_for("the run's first round", lambda: "round 1/50" in procs.log("interrupted-run"), 180)
    second = cli(server, "run", str(fed), "--rounds", "1")
    assert second.returncode == 2 and "is driving a run" in second.stdout, second.stdout + second.stderr
    first.send_signal(signal.SIGINT)  # what Ctrl-C sends
    try:
        first.wait(180)
    except subprocess.TimeoutExpired:
        first.send_signal(signal.SIGABRT)
        time.sleep(2)
        raise AssertionError("run did not exit after Ctrl-C:\n" + procs.log("interrupted-run")) from None
    log = procs.log("interrupted-run")
    assert first.returncode == 130, log
    assert "stopped Flower run" in log and "--resume" in log, log + "\nSuperLink:\n" + procs.log("server")[-3000:]
    wait_for("the Flower run to stop", lambda: not active_runs(federation), 60)


def test_distributed_dp_runs_over_real_secagg_with_each_banks_noise_share(deployment: dict[str, Any]) -> None:
    # Last in this file: its Skellam rounds join the banks' ledgers, composed by RDP from then on.
    fed, procs = deployment["fed"], deployment["procs"]
    before = set((fed / "runs").glob("*"))
    # A fixed noise leaves no target for the secure evaluation's tenth, so the run turns it off.
    settings = ["dp-mode=distributed", "noise-multiplier=8", "sample-rate=0.2", "eval-every=3", "secagg-timeout=60"]
    settings += ["secure-evaluation=false"]
    argv = [deployment["server"], "run", str(fed), "--rounds", "3"]
    for setting in settings:
        argv += ["--config", setting]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=500, check=False)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr + procs.log("server")
    (run_dir,) = set((fed / "runs").glob("*")) - before
    report = json.loads((run_dir / "report.json").read_text())
    print(f"distributed DP over TLS and SecAgg+: 3 rounds in {elapsed:.1f} s")
    assert report["rounds_completed"] == 3
    assert [row["round"] for row in report["rounds"]] == [1, 2, 3]
    assert [row["accuracy"] is not None for row in report["rounds"]] == [False, False, True]  # eval-every 3
    for inst in report["institutions"]:
        (ledger_file,) = (deployment["root"] / inst["name"] / "state" / "ledgers").glob("*.json")
        ledger = PrivacyLedger.for_dataset(ledger_file.parent.parent, ledger_file.stem)
        skellam = [e for e in ledger.entries if e.mechanism == "skellam"]
        assert len(skellam) == len(inst["ledger"]) >= 2  # a bank kept from a restart may miss one round
        # Each bank counts on nobody else (min-honest 1): its own share is the whole noise, and the
        # setup it checked is the one Flower ran (3 sampled, threshold round(0.67 x 3) = 2).
        assert all((e.sample, e.threshold, e.counted_honest) == (3, 2, 1) for e in skellam)
        assert all(e.own_variance == pytest.approx(e.variance) for e in skellam)
        # The bank reports this run's share; its ledger also holds the earlier runs of this file.
        this_run = [e.event() for e in ledger.entries if e.run_id == run_dir.name]
        assert inst["neighbouring"] == "replace-one"  # a deployed institution's default: its count is public
        spent = epsilon_spent(this_run, delta=inst["delta"], neighbouring=inst["neighbouring"])
        assert inst["epsilon"] == pytest.approx(spent, rel=1e-12)
    first, final = torch.load(run_dir / "checkpoints" / "round-0001.pt"), torch.load(run_dir / "model.pt")
    assert any(not torch.equal(first[k], final[k]) for k in final)  # the steps moved the model
