"""The federation directory: init, admit and settings, checked before anything runs."""

import os
import stat
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsilo.common.errors import ConfigError
from fedsilo.common.settings import PrivacySettings, Proposal, RunSettings
from fedsilo.runtime.keys import new_node_keys
from fedsilo.server.cli import app
from fedsilo.server.federation import Federation
from tests.runtime.certificates import certificate_hosts

RUNNER = CliRunner()


def test_init_writes_certificates_schema_and_settings(tmp_path: Path) -> None:
    result = RUNNER.invoke(app, ["init", str(tmp_path / "fed"), "--dataset", "german-credit", "--host", "10.1.2.3"])
    assert result.exit_code == 0, result.output
    fed = Federation(tmp_path / "fed")
    for name in ("ca.crt", "ca.key", "server.crt", "server.key"):
        assert (fed.certs / name).exists()
    assert stat.S_IMODE((fed.certs / "ca.key").stat().st_mode) == 0o600
    # The given host, and loopback for the coordinator's own tools.
    assert set(certificate_hosts(fed.certs / "server.crt")) == {"10.1.2.3", "localhost", "127.0.0.1", "::1"}
    assert "german-credit" in fed.schema_path.read_text() or "creditability" in fed.schema_path.read_text()
    settings = fed.settings()
    assert settings.data.dataset == "german-credit" and settings.schema_path == str(fed.schema_path)
    again = RUNNER.invoke(app, ["init", str(tmp_path / "fed")])
    assert again.exit_code == 2 and "already holds a federation" in again.output


def test_the_app_carries_the_federations_settings(tmp_path: Path) -> None:
    fed = Federation.init(tmp_path / "fed", proposal=Proposal(rounds=5, privacy=PrivacySettings(target_epsilon=1.0)))
    config = tomllib.loads(fed.write_app().joinpath("pyproject.toml").read_text())["tool"]["flwr"]
    assert config["app"]["components"]["clientapp"] == "fedsilo.client.client_app:app"
    assert RunSettings.from_config(config["app"]["config"]) == fed.settings()
    assert fed.settings().rounds == 5 and fed.settings().privacy.target_epsilon == 1.0


def test_federationtoml_values_are_checked(tmp_path: Path) -> None:
    fed = Federation.init(tmp_path / "fed")
    text = fed.config_path.read_text()
    fed.config_path.write_text(text.replace("num-server-rounds = 8", "num-server-rounds = 0"))
    with pytest.raises(ConfigError, match=r"federation\.toml.*num-server-rounds"):
        fed.load()
    fed.config_path.write_text(text + 'out-dir = "/elsewhere"\n')
    with pytest.raises(ConfigError, match="may not set"):
        fed.load()
    fed.config_path.write_text(text + "target-epsilion = 3\n")
    with pytest.raises(ConfigError, match="unknown run setting"):
        fed.load()


def test_admit_records_keys_and_refuses_duplicates_and_bad_keys(tmp_path: Path) -> None:
    fed = Federation.init(tmp_path / "fed")
    one, two = new_node_keys(tmp_path / "a" / "node.key"), new_node_keys(tmp_path / "b" / "node.key")
    result = RUNNER.invoke(app, ["admit", str(fed.root), str(one), "--name", "bank-1"])
    assert result.exit_code == 0 and "SHA256:" in result.output
    assert list(fed.institutions()) == ["bank-1"]
    for args, words in (
        ([str(two), "--name", "bank-1"], "bank-1 is already admitted"),
        ([str(one), "--name", "bank-2"], "already admitted as bank-1"),
        ([str(tmp_path / "a" / "node.key"), "--name", "bank-3"], "not an OpenSSH public key"),
        ([str(two), "--name", "bank 2"], "use letters, digits"),
    ):
        refused = RUNNER.invoke(app, ["admit", str(fed.root), *args])
        assert refused.exit_code == 2 and words in " ".join(refused.output.split()), refused.output
    assert list(fed.institutions()) == ["bank-1"]


def test_admit_stores_the_key_itself_and_a_withdrawal_rewrites_the_registry(tmp_path: Path) -> None:
    fed = Federation.init(tmp_path / "fed")
    one, two = new_node_keys(tmp_path / "a" / "node.key"), new_node_keys(tmp_path / "b" / "node.key")
    key = one.read_text().split()[:2]
    one.write_text(f"  {key[0]} {key[1]} someone@laptop = [institutions.evil]\n\n")  # comment, stray text
    fed.admit(one, "bank-1")
    fed.admit(two, "bank-2")
    assert fed.institutions()["bank-1"].public_key == " ".join(key)
    fed.withdraw("bank-1")
    assert list(fed.institutions()) == ["bank-2"]
    assert fed.institutions()["bank-2"].public_key == " ".join(two.read_text().split()[:2])


def test_a_failed_init_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedsilo.server.federation

    def failing(directory: Path, hosts: tuple[str, ...]) -> None:
        directory.mkdir(parents=True)
        (directory / "ca.key").write_text("half-written")
        raise ConfigError("the disk is full")

    monkeypatch.setattr(fedsilo.server.federation, "issue_server_certificates", failing)
    with pytest.raises(ConfigError, match="disk is full"):
        Federation.init(tmp_path / "fed")
    assert list(tmp_path.iterdir()) == []  # no DIR, no scratch folder
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="disk is full"):
        Federation.init(tmp_path / "existing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
    assert [p.name for p in (tmp_path / "existing").iterdir()] == ["notes.txt"]


def test_commands_on_a_directory_that_is_no_federation_say_so(tmp_path: Path) -> None:
    for command in (["status", str(tmp_path)], ["run", str(tmp_path)], ["start", str(tmp_path)]):
        result = RUNNER.invoke(app, command)
        assert result.exit_code == 2 and "not a federation directory" in result.output


def test_run_refuses_unknown_and_managed_settings_before_submitting(tmp_path: Path) -> None:
    fed = Federation.init(tmp_path / "fed")
    fed.admit(new_node_keys(tmp_path / "a" / "node.key"), "bank-1")
    (fed.superlink_dir).mkdir(parents=True)
    (fed.superlink_dir / "superlink.json").write_text(f'{{"pid": {os.getpid()}, "address": "127.0.0.1:1"}}')
    for config, words in (("target-epsilion=3", "unknown run setting"), ('out-dir="/x"', "may not set")):
        result = RUNNER.invoke(app, ["run", str(fed.root), "--config", config])
        assert result.exit_code == 2 and words in result.output, result.output
    assert not fed.app_dir.exists()  # nothing was written or submitted


def test_a_new_run_takes_federationtoml_then_config_then_the_options(tmp_path: Path) -> None:
    fed = Federation.init(tmp_path / "fed", proposal=Proposal(rounds=5))
    fed.admit(new_node_keys(tmp_path / "a" / "node.key"), "bank-1")
    settings = fed.new_run({"learning-rate": 0.1, "num-server-rounds": 6}, epsilon=3.0)
    assert settings.rounds == 6 and settings.train.learning_rate == 0.1 and settings.privacy.target_epsilon == 3.0
    assert settings.min_institutions == 1  # every admitted institution, by default
    assert Path(settings.out_dir).parent == fed.runs_dir and settings.schema_path == str(fed.schema_path)
    assert fed.new_run({"min-institutions": 3}).min_institutions == 3
    assert fed.new_run(rounds=2, min_institutions=4).rounds == 2
    assert (
        fed.write_app(settings)
        and RunSettings.from_config(
            tomllib.loads((fed.app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
        )
        == settings
    )  # flattened once, into the app the ServerApp parses once
