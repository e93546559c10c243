"""The ClientApp's one parse of a message: a deployed institution takes no path from the coordinator."""

from fedsilo.client.client_app import institution_settings
from fedsilo.common.settings import RunSettings


def test_a_deployed_institution_takes_no_path_from_the_message_and_a_simulated_one_does() -> None:
    sent = RunSettings(
        rounds=3, out_dir="/c/run", schema_path="/c/schema.toml", state_root="/c/state", simulation_policy="/c/p.toml"
    )
    message = {**sent.to_config(), "server-round": 1, "run-name": "r"}
    deployed = institution_settings({"data-path": "/mine.csv", "state-dir": "/mine"}, message)
    assert deployed == RunSettings.of(sent.proposal)  # the proposal, and none of the coordinator's paths
    simulated = institution_settings({"partition-id": 0, "num-partitions": 3}, message)
    assert simulated.proposal == sent.proposal
    assert (simulated.state_root, simulated.simulation_policy, simulated.schema_path) == (
        "/c/state",
        "/c/p.toml",
        "/c/schema.toml",
    )
